"""SD-Turbo's VAE with skip connections from the encoder into the decoder.

The encoder keeps the activation entering each of its down blocks; the decoder adds each one,
through a 1x1 conv, to the input of the matching up block (Parmar et al. 2024, Sec. 3.1).
"""

from __future__ import annotations

import torch

# from its own package rather than diffusers' top level, whose lazy imports show type checkers
# placeholder classes
from diffusers.models import AutoencoderKL
from torch import nn
from torch.utils.checkpoint import checkpoint


class SkipConvs(nn.Module):
    """The four (one per down block) 1x1 convs of one adapter, named as in the original code."""

    def __init__(self, in_channels: list[int], out_channels: list[int], init: float | None = 1e-5):
        super().__init__()
        self.names = [f"skip_conv_{i + 1}" for i in range(len(in_channels))]
        for name, cin, cout in zip(self.names, in_channels, out_channels, strict=True):
            conv = nn.Conv2d(cin, cout, kernel_size=1, bias=False)
            if init is not None:
                nn.init.constant_(conv.weight, init)
            setattr(self, name, conv)

    def __getitem__(self, i: int) -> nn.Module:
        return getattr(self, self.names[i])

    def base(self, i: int) -> nn.Conv2d:
        """The i-th conv itself, taken out of its LoRA wrapper when it has one."""
        conv = self[i]
        get_base_layer = getattr(conv, "get_base_layer", None)
        base = get_base_layer() if get_base_layer is not None else conv
        assert isinstance(base, nn.Conv2d), "skip convs are 1x1 Conv2d, wrapped at most once by LoRA"
        return base


class SkipVAE(nn.Module):
    """Encoder/decoder of an `AutoencoderKL` (shared, frozen) plus named sets of skip convs."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.encoder, self.decoder = vae.encoder, vae.decoder
        self.quant_conv, self.post_quant_conv = vae.quant_conv, vae.post_quant_conv
        self.scaling_factor = float(vae.config["scaling_factor"])
        self.skips = nn.ModuleDict()
        self.gradient_checkpointing = False
        boc = list(vae.config["block_out_channels"])
        n = len(boc)
        # Encoder down block i receives boc[i-1] channels (boc[0] for the first); the decoder uses
        # them deepest first. Decoder up block i receives reversed(boc)[i-1] (reversed(boc)[0] first).
        enc = [boc[max(i - 1, 0)] for i in range(n)][::-1]
        rev = boc[::-1]
        dec = [rev[max(i - 1, 0)] for i in range(n)]
        self.skip_in_channels, self.skip_out_channels = enc, dec

    def add_skips(self, name: str, init: float | None = 1e-5) -> SkipConvs:
        """New skip convs for adapter `name`, initialised to `init` (the original uses 1e-5)."""
        p = next(self.decoder.parameters())
        skips = SkipConvs(self.skip_in_channels, self.skip_out_channels, init).to(p.device, p.dtype)
        self.skips[name] = skips
        return skips

    def _run(self, block: nn.Module, *args):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Image in [-1, 1] or [0, 1], (B, 3, H, W) -> (scaled posterior-mean latent (B, 4, H/8, W/8),
        the activations entering each down block)."""
        enc = self.encoder
        h = enc.conv_in(x)
        acts = []
        for block in enc.down_blocks:
            acts.append(h)
            h = self._run(block, h)
        h = self._run(enc.mid_block, h)
        h = enc.conv_out(enc.conv_act(enc.conv_norm_out(h)))
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        mean = h.chunk(2, dim=1)[0]  # the posterior mean: deterministic, unlike .sample()
        return mean * self.scaling_factor, acts

    def decode(
        self,
        latent: torch.Tensor,
        acts: list[torch.Tensor],
        skips: SkipConvs | None,
        gamma: float | torch.Tensor = 1.0,
    ) -> torch.Tensor:
        """Scaled latent -> image (B, 3, H, W), unclamped. Each skip activation is multiplied by
        `gamma` (float or per-sample tensor (B,)) before its conv; `skips=None` decodes without them."""
        dec = self.decoder
        z = latent / self.scaling_factor
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        h = dec.conv_in(z)
        h = self._run(dec.mid_block, h, None)
        h = h.to(next(iter(dec.up_blocks.parameters())).dtype)
        if isinstance(gamma, torch.Tensor):
            gamma = gamma.reshape(-1, 1, 1, 1).to(h.dtype)
        for i, block in enumerate(dec.up_blocks):
            if skips is not None:
                h = h + skips[i](acts[-1 - i] * gamma)
            h = self._run(block, h, None)
        return dec.conv_out(dec.conv_act(dec.conv_norm_out(h)))
