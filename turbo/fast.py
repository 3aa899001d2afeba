"""The fast inference path: one model's LoRA folded into the shared base weights.

`FastPath(generator)(x, text_emb, model, direction, gamma, noise)` gives the same image as
`Generator.forward` (within float rounding) at the cost of a plain SD-Turbo forward:

- the active (model, direction, gamma)'s LoRA deltas `gamma * alpha / r * B @ A` are added to the
  base weights they adapt, and peft's wrappers are taken out of the networks while folded, so the
  adapters cost nothing per image;
- the first conv (trained conv + LoRA, blended with its twin by gamma) becomes one conv, and the
  skip convs (+ LoRA, times gamma) become plain 1x1 convs; both are persistent modules whose
  weights are overwritten in place, so a compiled graph survives a switch;
- the timestep tensor is made once; channels_last and inference mode are on; torch.compile is
  optional.

Exactness of a switch. Many models share the base weights, so a switch must give the base back
bit for bit. Folding computes `s = round(W + d)` per element; unfolding computes
`round(s - d)`, which equals W except where the rounding of `W + d` lost low bits of W (a few
percent of the elements: W much smaller than d, or W + d in a higher binade). Those elements'
original values are kept, as (int32 index, value) pairs, and written back after the subtraction.
So the base is restored exactly, with no full copy of the weights: the cost is 4 bytes plus one
weight per exception (measured by `FastPath.exception_bytes`), for the folded model only.
`d` is recomputed on unfold by the same code on the same tensors, hence bit-identical.

Training never sees this: every mutating or plain-path method of `Generator` calls
`Generator.unfold()` first, which restores the base and the peft wrappers.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from turbo import lora
from turbo.generator import Generator
from turbo.skip_vae import SkipConvs

logger = logging.getLogger(__name__)


class FastPathError(ValueError):
    """A call the fast path cannot serve (e.g. a per-sample gamma, which only training uses)."""


@dataclass
class FastOptions:
    """Which optimisations are on. `fold=False` keeps peft's unfolded adapters (for comparisons)."""

    fold: bool = True
    channels_last: bool = True
    inference_mode: bool = True
    compile: bool = False
    compile_mode: str | None = None  # torch.compile's mode, e.g. "max-autotune"


def bf16_is_native(device: torch.device) -> bool:
    """Whether bf16 runs at full speed: CUDA with bf16 support, or a cpu with AVX512-BF16/AMX."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def _flat(t: torch.Tensor) -> torch.Tensor:
    """A 1-D view in storage order (so contiguous and channels_last weights both work)."""
    if not t.is_contiguous() and not t.is_contiguous(memory_format=torch.channels_last):
        raise FastPathError("folding needs contiguous or channels_last weights")
    return t.as_strided((t.numel(),), (1,), t.storage_offset())


def _delta(layer: LoraLayer, adapter: str, scale: float, like: torch.Tensor) -> torch.Tensor:
    """The adapter's weight delta `scale * alpha / r * B @ A`, in fp32 and in `like`'s layout."""
    a = layer.lora_A[adapter].weight.flatten(1).float()
    b = layer.lora_B[adapter].weight.flatten(1).float()
    d = (b @ a).mul_(scale * layer.lora_alpha[adapter] / layer.r[adapter])
    out = torch.empty_like(like, dtype=torch.float32)
    out.copy_(d.view(like.shape))
    return out


@dataclass
class _FoldedLayer:
    layer: LoraLayer
    adapter: str
    scale: float
    index: torch.Tensor  # int32 positions (storage order) whose base value the fold loses
    values: torch.Tensor  # their original values

    def restore(self) -> None:
        w = self.layer.get_base_layer().weight
        flat, d = _flat(w.data), _flat(_delta(self.layer, self.adapter, self.scale, w))
        back = torch.sub(flat.float(), d).to(w.dtype)
        back[self.index.long()] = self.values
        flat.copy_(back)


def _fold_layer(layer: LoraLayer, adapter: str, scale: float) -> _FoldedLayer:
    w = layer.get_base_layer().weight
    flat, d = _flat(w.data), _flat(_delta(layer, adapter, scale, w))
    folded = torch.add(flat.float(), d).to(w.dtype)
    lost = (torch.sub(folded.float(), d).to(w.dtype) != flat).nonzero().squeeze(1)
    kept = _FoldedLayer(layer, adapter, scale, lost.to(torch.int32), flat[lost].clone())
    flat.copy_(folded)
    return kept


def _conv_weights(conv: nn.Module, adapter: str, scale: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A (possibly LoRA-wrapped) conv's effective weight (fp32) and bias with the adapter at `scale`."""
    base = conv.get_base_layer() if isinstance(conv, LoraLayer) else conv
    w = base.weight.float()
    if isinstance(conv, LoraLayer) and adapter in conv.lora_A:
        w = w + _delta(conv, adapter, scale, base.weight)
    return w, None if base.bias is None else base.bias.float()


class FastPath:
    """Runs a `Generator`'s models with their adapters folded into the base (see the module doc).

    Not thread-safe on its own; `turbo.pipeline.Pipeline` serialises calls with its lock.
    """

    def __init__(self, generator: Generator, options: FastOptions | None = None):
        generator.unfold()  # another fast path may have the networks folded
        self.generator = generator
        self.options = options or FastOptions()
        unet, vae = generator.unet, generator.vae
        p = next(unet.parameters())
        self.device, self.dtype = p.device, p.dtype
        if self.options.channels_last:
            # Only while unfolded: folded layers remember positions in the storage order.
            unet.to(memory_format=torch.channels_last)
            vae.to(memory_format=torch.channels_last)
        self.timestep = torch.tensor([generator.schedule.timestep], device=self.device, dtype=torch.long)
        # Persistent fused modules: their weights change in place, so compiled graphs stay valid.
        self.conv_in = copy.deepcopy(unet.conv_in.pretrained).requires_grad_(False)
        self.skips = SkipConvs(vae.skip_in_channels, vae.skip_out_channels, init=None)
        self.skips.requires_grad_(False).to(self.device, self.dtype)
        if self.options.channels_last:
            self.conv_in.to(memory_format=torch.channels_last)
            self.skips.to(memory_format=torch.channels_last)
        self.active: tuple[str, str, float] | None = None
        self._unet_key: tuple | None = None
        self._vae_key: tuple | None = None
        self._unet_folds: list[_FoldedLayer] = []
        self._vae_folds: list[_FoldedLayer] = []
        self._stripped: dict[str, list[tuple[nn.Module, str, LoraLayer]]] = {"unet": [], "vae": []}
        self._switchable_conv_in: nn.Module | None = None
        self._unet, self._encode, self._decode = unet, vae.encode, vae.decode
        if self.options.compile:
            kw = {"mode": self.options.compile_mode} if self.options.compile_mode else {}
            self._unet = torch.compile(unet, **kw)
            self._encode = torch.compile(vae.encode, **kw)
            self._decode = torch.compile(vae.decode, **kw)

    # ---- folding ----
    @property
    def folded(self) -> bool:
        return self.generator.folded is self

    def exception_bytes(self) -> int:
        """Memory held to restore the base exactly (indices and values of the lost elements)."""
        return sum(
            f.index.numel() * f.index.element_size() + f.values.numel() * f.values.element_size()
            for f in self._unet_folds + self._vae_folds
        )

    def _enter(self) -> None:
        """Take peft's wrappers out of the shared networks and put the fused first conv in."""
        g = self.generator
        g.unfold()
        for key, net, own in (("unet", g.unet, "conv_in"), ("vae", g.vae, "skips.")):
            for name, layer in list(lora.lora_layers(net)):
                if name.startswith(own):  # per-model modules: replaced by fused copies instead
                    continue
                parent_name, _, child = name.rpartition(".")
                parent = net.get_submodule(parent_name) if parent_name else net
                setattr(parent, child, layer.get_base_layer())
                self._stripped[key].append((parent, child, layer))
        self._switchable_conv_in, g.unet.conv_in = g.unet.conv_in, self.conv_in
        g.folded = self

    def restore(self) -> None:
        """Give the base its exact weights and the networks their peft wrappers back."""
        with torch.no_grad():
            for f in reversed(self._unet_folds + self._vae_folds):
                f.restore()
        self._unet_folds, self._vae_folds = [], []
        for stripped in self._stripped.values():
            for parent, child, layer in reversed(stripped):
                setattr(parent, child, layer)
            stripped.clear()
        if self._switchable_conv_in is not None:
            self.generator.unet.conv_in, self._switchable_conv_in = self._switchable_conv_in, None
        self._unet_key = self._vae_key = self.active = None
        if self.generator.folded is self:
            self.generator.folded = None

    def fold(self, model: str, direction: str = "a2b", gamma: float = 1.0) -> None:
        """Fold `model`'s adapters for `direction` at `gamma` (a no-op if they already are).

        Only the networks whose adapters change are refolded: switching the direction of an
        unpaired model refolds the VAE alone (its UNet adapter is shared by both directions).
        """
        g, gamma = self.generator, float(gamma)
        if self.active == (model, direction, gamma) and self.folded:
            return
        m = g.check_active(model, direction)
        with torch.no_grad():
            if not self.folded:
                self._enter()
            unet_key, vae_key = (m.id, gamma), (m.vae_id(direction), gamma)
            if unet_key != self._unet_key:
                for f in reversed(self._unet_folds):
                    f.restore()
                self._unet_folds = self._fold("unet", m.id, gamma)
                self._fuse_conv_in(m.id, m.stochastic, gamma)
                self._unet_key = unet_key
            if vae_key != self._vae_key:
                for f in reversed(self._vae_folds):
                    f.restore()
                self._vae_folds = self._fold("vae", vae_key[0], gamma)
                self._fuse_skips(vae_key[0], gamma)
                self._vae_key = vae_key
        self.active = (model, direction, gamma)
        logger.debug(
            "folded %s %s gamma=%s (%d exception bytes)", model, direction, gamma, self.exception_bytes()
        )

    def _fold(self, net: str, adapter: str, gamma: float) -> list[_FoldedLayer]:
        return [
            _fold_layer(layer, adapter, gamma)
            for _, _, layer in self._stripped[net]
            if adapter in layer.lora_A
        ]

    def _fuse_conv_in(self, mid: str, stochastic: bool, gamma: float) -> None:
        conv = self._switchable_conv_in
        w, b = _conv_weights(conv.trained[mid], mid, gamma)
        if mid in conv.twins:
            tw, tb = _conv_weights(conv.twins[mid], mid, gamma)
            w = tw * (1 - gamma) + w * gamma
            b = tb * (1 - gamma) + b * gamma
        self.conv_in.weight.copy_(w)
        self.conv_in.bias.copy_(b)

    def _fuse_skips(self, vid: str, gamma: float) -> None:
        # The decoder scales each skip activation by gamma before its (linear) conv: fold it in.
        trained = self.generator.vae.skips[vid]
        for i in range(len(trained.names)):
            w, _ = _conv_weights(trained[i], vid, gamma)
            self.skips[i].weight.copy_(w * gamma)

    # ---- the forward pass ----
    def __call__(
        self,
        x: torch.Tensor,
        text_emb: torch.Tensor,
        model: str,
        direction: str = "a2b",
        gamma: float = 1.0,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Same contract as `Generator.forward`, with a scalar gamma in [0, 1] only.

        x: (B, 3, H, W), H and W multiples of 8, in [0, 1] (paired) or [-1, 1] (unpaired);
        text_emb: (B or 1, 77, D); noise: (B or 1, 4, H/8, W/8), required when gamma < 1.
        Returns the image in [-1, 1], (B, 3, H, W).
        """
        if isinstance(gamma, torch.Tensor):
            raise FastPathError("the fast path takes one gamma per call; per-sample gammas are for training")
        if noise is None and gamma != 1:
            raise FastPathError("gamma < 1 needs a noise map (stochastic mode)")
        grad_off = torch.inference_mode() if self.options.inference_mode else torch.no_grad()
        with grad_off:
            g = self.generator
            if self.options.fold:
                self.fold(model, direction, gamma)
                skips, skip_gamma = self.skips, 1.0
            else:
                g.activate(model, direction, gamma)
                skips, skip_gamma = g.vae.skips[g.models[model].vae_id(direction)], gamma
            fmt = torch.channels_last if self.options.channels_last else torch.contiguous_format
            x = x.to(self.device, self.dtype, memory_format=fmt)
            latent, acts = self._encode(x)
            if noise is not None:
                latent = latent * gamma + noise.to(latent.device, latent.dtype) * (1 - gamma)
            if text_emb.shape[0] != latent.shape[0]:
                text_emb = text_emb.expand(latent.shape[0], *text_emb.shape[1:])
            eps = self._unet(latent, self.timestep, encoder_hidden_states=text_emb.to(self.dtype)).sample
            x0 = g.schedule.x0(eps, latent)
            return self._decode(x0, acts, skips, skip_gamma).clamp(-1, 1)
