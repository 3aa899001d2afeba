"""A test-only re-statement of the original img2img-turbo computation, on any base folder.

It builds the networks the way the original code does (diffusers models with peft adapters added
through `add_adapter`, skip convs on the decoder, a twin first conv), randomises every trained
tensor, writes the original `.pkl` layouts, and computes reference outputs. The only departure is
the one turbo makes on purpose: the VAE posterior mean instead of a posterior sample.
"""

from __future__ import annotations

import copy

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from torch import nn

from turbo.lora import PAIRED_UNET_PATTERNS, VAE_PATTERNS, unpaired_unet_groups


class RefTwinConv(nn.Module):
    def __init__(self, pretrained: nn.Conv2d, current: nn.Conv2d):
        super().__init__()
        self.conv_in_pretrained = copy.deepcopy(pretrained)
        self.conv_in_curr = copy.deepcopy(current)
        self.r = None

    def forward(self, x):
        return self.conv_in_pretrained(x).detach() * (1 - self.r) + self.conv_in_curr(x) * self.r


def _skip_channels(vae: AutoencoderKL):
    boc = list(vae.config.block_out_channels)
    n = len(boc)
    enc = [boc[max(i - 1, 0)] for i in range(n)][::-1]
    rev = boc[::-1]
    return enc, [rev[max(i - 1, 0)] for i in range(n)]


class RefVAE(nn.Module):
    """AutoencoderKL + the original's encoder/decoder forward with skip connections."""

    def __init__(self, folder: str):
        super().__init__()
        self.vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
        enc, dec = _skip_channels(self.vae)
        for i, (ci, co) in enumerate(zip(enc, dec, strict=True)):
            setattr(self.vae.decoder, f"skip_conv_{i + 1}", nn.Conv2d(ci, co, 1, bias=False))
        self.gamma = 1.0

    def encode(self, x):
        e = self.vae.encoder
        h = e.conv_in(x)
        self.acts = []
        for b in e.down_blocks:
            self.acts.append(h)
            h = b(h)
        h = e.conv_out(e.conv_act(e.conv_norm_out(e.mid_block(h))))
        moments = self.vae.quant_conv(h)
        return moments.chunk(2, dim=1)[0] * self.vae.config.scaling_factor

    def decode(self, z):
        d = self.vae.decoder
        h = d.conv_in(self.vae.post_quant_conv(z / self.vae.config.scaling_factor))
        h = d.mid_block(h, None)
        acts = self.acts[::-1]
        for i, b in enumerate(d.up_blocks):
            h = h + getattr(d, f"skip_conv_{i + 1}")(acts[i] * self.gamma)
            h = b(h, None)
        return d.conv_out(d.conv_act(d.conv_norm_out(h))).clamp(-1, 1)


def _randomise(params, generator, scale=0.05):
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=generator) * scale)


def _sched(folder):
    s = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    s.set_timesteps(1)
    return s


class RefPaired(nn.Module):
    """pix2pix-turbo as the original builds it; `twin=True` is the stochastic sketch model."""

    def __init__(self, folder: str, rank_unet=8, rank_vae=4, twin=False, seed=0):
        super().__init__()
        self.sched = _sched(folder)
        self.unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
        self.rvae = RefVAE(folder)
        if twin:
            self.unet.conv_in = RefTwinConv(self.unet.conv_in, self.unet.conv_in)
        self.rvae.vae.add_adapter(
            LoraConfig(r=rank_vae, init_lora_weights="gaussian", target_modules=list(VAE_PATTERNS)),
            "vae_skip",
        )
        self.unet.add_adapter(
            LoraConfig(r=rank_unet, init_lora_weights="gaussian", target_modules=list(PAIRED_UNET_PATTERNS))
        )
        self.ranks, self.twin = (rank_unet, rank_vae), twin
        g = torch.Generator().manual_seed(seed)
        trained = [p for n, p in self.unet.named_parameters() if "lora" in n or "conv_in" in n]
        if twin:  # the pretrained branch keeps the base weights
            trained = [p for n, p in self.unet.named_parameters() if "lora" in n or "conv_in_curr" in n]
        trained += [p for n, p in self.rvae.vae.named_parameters() if "lora" in n or "skip" in n]
        _randomise(trained, g)

    def save_pkl(self, path):
        sd = {
            "unet_lora_target_modules": list(PAIRED_UNET_PATTERNS),
            "vae_lora_target_modules": list(VAE_PATTERNS),
            "rank_unet": self.ranks[0],
            "rank_vae": self.ranks[1],
            "state_dict_unet": {
                k: v for k, v in self.unet.state_dict().items() if "lora" in k or "conv_in" in k
            },
            "state_dict_vae": {
                k: v for k, v in self.rvae.vae.state_dict().items() if "lora" in k or "skip" in k
            },
        }
        torch.save(sd, path)

    @torch.no_grad()
    def forward(self, c_t, emb, r=1.0, noise=None, deterministic=True):
        t = torch.tensor([999]).long()
        if deterministic:
            self.rvae.gamma = 1.0
            z = self.rvae.encode(c_t)
            pred = self.unet(z, t, encoder_hidden_states=emb).sample
            return self.rvae.decode(self.sched.step(pred, t, z).prev_sample)
        self.unet.set_adapters(["default"], weights=[r])
        self.rvae.vae.set_adapters(["vae_skip"], weights=[r])
        z = self.rvae.encode(c_t) * r + noise * (1 - r)
        self.unet.conv_in.r = r
        pred = self.unet(z, t, encoder_hidden_states=emb).sample
        self.unet.conv_in.r = None
        self.rvae.gamma = r
        out = self.rvae.decode(self.sched.step(pred, t, z).prev_sample)
        # the original leaves these set; the reference resets them so calls are independent
        self.unet.set_adapters(["default"], weights=[1.0])
        self.rvae.vae.set_adapters(["vae_skip"], weights=[1.0])
        return out


class RefUnpaired(nn.Module):
    """CycleGAN-Turbo as the original builds it (shared UNet, one VAE per direction)."""

    def __init__(self, folder: str, rank_unet=8, rank_vae=4, seed=0):
        super().__init__()
        self.sched = _sched(folder)
        self.unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
        self.groups = unpaired_unet_groups(self.unet)
        for gname, adapter in (
            ("encoder", "default_encoder"),
            ("decoder", "default_decoder"),
            ("other", "default_others"),
        ):
            cfg = LoraConfig(
                r=rank_unet,
                init_lora_weights="gaussian",
                target_modules=self.groups[gname],
                lora_alpha=rank_unet,
            )
            self.unet.add_adapter(cfg, adapter_name=adapter)
        self.unet.set_adapters(["default_encoder", "default_decoder", "default_others"])
        self.a2b = RefVAE(folder)
        self.a2b.vae.add_adapter(
            LoraConfig(r=rank_vae, init_lora_weights="gaussian", target_modules=list(VAE_PATTERNS)),
            "vae_skip",
        )
        self.b2a = copy.deepcopy(self.a2b)
        self.ranks = (rank_unet, rank_vae)
        g = torch.Generator().manual_seed(seed)
        trained = [p for n, p in self.unet.named_parameters() if "lora" in n]
        for v in (self.a2b, self.b2a):
            trained += [p for n, p in v.vae.named_parameters() if "lora" in n or "skip" in n]
        _randomise(trained, g)

    def save_pkl(self, path):
        whole = {**{f"vae.{k}": v for k, v in self.a2b.vae.state_dict().items()},
                 **{f"vae_b2a.{k}": v for k, v in self.b2a.vae.state_dict().items()}}  # fmt: skip
        sd = {
            "l_target_modules_encoder": self.groups["encoder"],
            "l_target_modules_decoder": self.groups["decoder"],
            "l_modules_others": self.groups["other"],
            "rank_unet": self.ranks[0],
            "sd_encoder": get_peft_model_state_dict(self.unet, adapter_name="default_encoder"),
            "sd_decoder": get_peft_model_state_dict(self.unet, adapter_name="default_decoder"),
            "sd_other": get_peft_model_state_dict(self.unet, adapter_name="default_others"),
            "rank_vae": self.ranks[1],
            "vae_lora_target_modules": list(VAE_PATTERNS),
            "sd_vae_enc": whole,
            "sd_vae_dec": whole,
        }
        torch.save(sd, path)

    @torch.no_grad()
    def forward(self, x, emb, direction):
        v = self.a2b if direction == "a2b" else self.b2a
        t = torch.tensor([999]).long()
        z = v.encode(x)
        pred = self.unet(z, t, encoder_hidden_states=emb).sample
        x0 = torch.stack([self.sched.step(pred[i], t[0], z[i]).prev_sample for i in range(z.shape[0])])
        return v.decode(x0)
