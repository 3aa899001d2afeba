"""The one-step generator G(x, z, gamma) of Parmar et al. 2024 on a shared SD-Turbo base.

    latent = enc(x)                                  VAE encoder, keeping its skip activations
    latent = gamma * latent + (1 - gamma) * z        only in stochastic mode (noise map z given)
    eps    = unet(latent, t=999, prompt)             LoRA deltas scaled by gamma
    x0     = (latent - sqrt(1 - a) * eps) / sqrt(a)  one-step prediction, a = alphas_cumprod[999]
    out    = dec(x0, gamma * skips).clamp(-1, 1)     decoder with skip convs (and VAE LoRA)

`one_step` is that computation, the only copy of it: `Generator.forward` runs it on the networks
with peft's adapters, `turbo.fast.FastPath` on the same networks with one model folded into the
weights. The file reads top down: the step, the generator's modules and its forward, then the
bookkeeping of the adapters (adding, loading, removing, training and exporting models).

Many models (adapter sets) can be loaded into one generator; each call names the model and the
direction it runs, so no state carries over from one call to the next.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
from peft.tuners.lora import LoraLayer
from torch import nn

from turbo import lora
from turbo.base import BaseModel, OneStepSchedule
from turbo.conv_in import SwitchableConvIn
from turbo.errors import TurboError
from turbo.formats import CheckpointError, TurboCheckpoint
from turbo.formats.checkpoint import Direction, Kind
from turbo.skip_vae import SkipConvs, SkipVAE

if TYPE_CHECKING:
    from turbo.fast.path import FastPath


class ModelNameTakenError(TurboError):
    """A model name that is already loaded (names the adapters, so it must be unique)."""


Gamma = float | torch.Tensor  # a float in [0, 1], or per-sample (B,) in training; a graph's 0-d input


@dataclass
class StepNetworks:
    """What `one_step` runs: the shared networks, bound to one model and direction.

    adapt(gamma) makes the networks compute the model at `gamma` before the step: peft's LoRA scale
    and the first conv's twin blend (`Generator.activate`), or the fold of all of it into the
    weights (`FastPath.fold`); None when that was done already (a captured CUDA graph).
    skips_scaled: the skip convs already carry gamma (folded), so the decoder must not apply it again.
    """

    encode: Callable[[torch.Tensor], tuple[torch.Tensor, list[torch.Tensor]]]  # SkipVAE.encode
    unet: Callable[..., UNet2DConditionOutput]  # diffusers' UNet: (latent, t, encoder_hidden_states=)
    decode: Callable[..., torch.Tensor]  # SkipVAE.decode: (x0, activations, skips, skip scale)
    skips: nn.Module
    schedule: OneStepSchedule
    timestep: torch.Tensor  # (1,) long: the schedule's one timestep, on the device
    adapt: Callable[[Gamma], None] | None = None
    skips_scaled: bool = False


def one_step(
    net: StepNetworks,
    x: torch.Tensor,
    text_emb: torch.Tensor,
    gamma: Gamma = 1.0,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """G(x, z, gamma): translate `x` in one step (inputs on the device, in the networks' dtype).

    x: (B, 3, H, W), H and W multiples of 8; text_emb: (B or 1, 77, D); noise z: (B or 1, 4, H/8,
    W/8) or None (deterministic, gamma 1). Returns the image in [-1, 1], (B, 3, H, W).
    gamma plays four roles, all from here:
      1. LoRA scale: every adapter's delta is gamma * alpha / r * B @ A     (net.adapt)
      2. first conv: gamma * trained(x) + (1 - gamma) * pretrained twin(x)   (net.adapt)
      3. latent blend: gamma * enc(x) + (1 - gamma) * z                      (below)
      4. skip scale: each skip activation times gamma before its 1x1 conv   (decode, or folded)
    """
    if net.adapt is not None:
        net.adapt(gamma)  # roles 1 and 2 (and 4 when folded)
    latent, acts = net.encode(x)
    if noise is not None:  # role 3
        g = gamma
        if isinstance(gamma, torch.Tensor) and gamma.dim() > 0:  # per sample: (B,) -> (B, 1, 1, 1)
            g = gamma.to(latent.device, latent.dtype).reshape(-1, 1, 1, 1)
        latent = latent * g + noise * (1 - g)
    if text_emb.shape[0] != latent.shape[0]:
        text_emb = text_emb.expand(latent.shape[0], *text_emb.shape[1:])
    eps = net.unet(latent, net.timestep, encoder_hidden_states=text_emb).sample
    x0 = net.schedule.x0(eps, latent)
    skip_scale = 1.0 if net.skips_scaled else gamma  # role 4
    return net.decode(x0, acts, net.skips, skip_scale).clamp(-1, 1)


@dataclass
class LoadedModel:
    """Book-keeping for one model loaded into the generator."""

    name: str
    id: str
    kind: Kind
    stochastic: bool
    rank_unet: int
    alpha_unet: float
    rank_vae: int
    alpha_vae: float
    directions: list[Direction]
    has_conv_in: bool = True

    def vae_id(self, direction: str) -> str:
        return f"{self.id}_{direction}"


class Generator(nn.Module):
    """SD-Turbo's UNet and VAE (frozen) plus per-model LoRA adapters, skip convs and first convs."""

    def __init__(self, base: BaseModel):
        super().__init__()
        unet = base.unet
        if not isinstance(unet.conv_in, SwitchableConvIn):
            # cast: diffusers annotates a Conv2d; ours computes like one (and carries its channels)
            unet.conv_in = cast(nn.Conv2d, SwitchableConvIn(unet.conv_in))
        self.unet = unet
        self.vae = SkipVAE(base.vae)
        self.schedule = base.schedule
        self.models: dict[str, LoadedModel] = {}
        self._ids = itertools.count()
        # Set by `turbo.fast.path.FastPath` while it has a model folded into the base weights.
        self.folded: FastPath | None = None

    @property
    def conv_in(self) -> SwitchableConvIn:
        """The UNet's first conv: ours, except while a fast path has it swapped out (folded), which
        every method that uses it undoes first (`unfold`)."""
        return cast(SwitchableConvIn, self.unet.conv_in)

    def skips(self, vae_id: str) -> SkipConvs:
        """The skip convs of one model's direction (`LoadedModel.vae_id`)."""
        return cast(SkipConvs, self.vae.skips[vae_id])

    # ---- the step ----
    def forward(
        self,
        x: torch.Tensor,
        text_emb: torch.Tensor,
        model: str,
        direction: str = "a2b",
        gamma: Gamma = 1.0,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Translate `x` in one step (`one_step` with peft's adapters).

        x: input image, (B, 3, H, W), H and W multiples of 8; [0, 1] for paired models (edges,
        sketches), [-1, 1] for unpaired ones. text_emb: (B or 1, 77, D). gamma in [0, 1], a float
        or a per-sample tensor (B,); with gamma < 1 a noise map z (B, 4, H/8, W/8) is required.
        Returns the image in [-1, 1], (B, 3, H, W).
        """
        if noise is None and not (isinstance(gamma, (int, float)) and gamma == 1):
            raise ValueError("gamma < 1 needs a noise map (stochastic mode)")
        m = self.check_active(model, direction)
        dtype = self.unet.dtype
        noise = None if noise is None else noise.to(x.device, dtype)
        return one_step(
            self.step_networks(m, direction, x.device), x.to(dtype), text_emb.to(dtype), gamma, noise
        )

    def step_networks(self, m: LoadedModel, direction: str, device: torch.device) -> StepNetworks:
        """The networks with peft's adapters, for model `m` in `direction`: adapt = `activate`."""
        return StepNetworks(
            encode=self.vae.encode,
            unet=self.unet,
            decode=self.vae.decode,
            skips=self.skips(m.vae_id(direction)),
            schedule=self.schedule,
            timestep=torch.tensor([self.schedule.timestep], device=device, dtype=torch.long),
            adapt=lambda gamma: self.activate(m.name, direction, gamma),
        )

    def check_active(self, name: str, direction: str) -> LoadedModel:
        """The loaded model `name`; KeyError if it is not loaded, ValueError if it lacks `direction`."""
        m = self.models.get(name)
        if m is None:
            raise KeyError(f"model {name!r} is not loaded (loaded: {', '.join(self.models) or 'none'})")
        if direction not in m.directions:
            raise ValueError(
                f"model {name!r} has no direction {direction!r} (it has {', '.join(m.directions)})"
            )
        return m

    def activate(self, name: str, direction: str = "a2b", gamma: Gamma = 1.0) -> None:
        """Make `name`'s adapters for `direction` the ones that run, scaled by `gamma` (its roles 1
        and 2 in `one_step`: peft's LoRA scale, the first conv's twin blend)."""
        m = self.check_active(name, direction)
        self.unfold()
        lora.activate(self.unet, m.id, gamma)
        lora.activate(self.vae, m.vae_id(direction), gamma)
        self.conv_in.active, self.conv_in.gamma = m.id, gamma

    # ---- the fast path's fold: undone before anything changes the networks ----
    def unfold(self) -> None:
        """Restore the exact base weights and peft adapters if a fast path folded them (else no-op).

        Every method that changes models, trains or runs the plain (unfolded) path calls it first.
        """
        if self.folded is not None:
            self.folded.restore()

    def _apply(self, fn, recurse=True):
        self.unfold()  # folded layers remember positions in the weights' storage: restore them first
        return super()._apply(fn, recurse)

    # ---- names: checkpoints use the diffusers module names; adapters get short internal ids ----
    @staticmethod
    def _unet_module(mid: str, name: str) -> str:
        return f"conv_in.trained.{mid}" if name == "conv_in" else name

    @staticmethod
    def _vae_module(vid: str, name: str) -> str:
        return name.replace("decoder.skip_conv_", f"skips.{vid}.skip_conv_", 1)

    def _unet_targets(self, patterns) -> list[str]:
        return lora.find_targets(self.unet, patterns, skip_prefixes=("conv_in.",)) + (
            ["conv_in"] if lora.matches("conv_in", patterns) else []
        )

    def _vae_targets(self, patterns) -> list[str]:
        names = lora.find_targets(self.vae, patterns, skip_prefixes=("skips.",))
        n = len(self.vae.skip_in_channels)
        return names + [
            f"decoder.skip_conv_{i + 1}" for i in range(n) if lora.matches(f"skip_conv_{i + 1}", patterns)
        ]

    # ---- adding and removing models ----
    def _add(
        self,
        name: str,
        kind: Kind,
        stochastic: bool,
        ranks: tuple[int, float, int, float],  # rank_unet, alpha_unet, rank_vae, alpha_vae
        unet_targets: list[str],
        vae_targets: dict[Direction, list[str]],
        directions: list[Direction],
    ) -> LoadedModel:
        if name in self.models:
            raise ModelNameTakenError(f"a model named {name!r} is already loaded")
        self.unfold()
        m = LoadedModel(name, f"m{next(self._ids)}", kind, stochastic, *ranks, directions=list(directions))
        self.models[name] = m
        try:
            self.conv_in.add(m.id, twin=stochastic)
            lora.add_lora(self.unet, m.id, [self._unet_module(m.id, t) for t in unet_targets], *ranks[:2])
            for d in directions:
                vid = m.vae_id(d)
                self.vae.add_skips(vid)
                lora.add_lora(self.vae, vid, [self._vae_module(vid, t) for t in vae_targets[d]], *ranks[2:])
        except Exception:
            self.remove_model(name)
            raise
        return m

    def new_model(
        self,
        name: str,
        kind: Kind = "paired",
        stochastic: bool = False,
        rank_unet: int = 8,
        rank_vae: int = 4,
        alpha_unet: float | None = None,
        alpha_vae: float = 8,
        unet_targets: list[str] | None = None,
        vae_targets: list[str] | None = None,
    ) -> LoadedModel:
        """A fresh model to train, initialised as the original: LoRA B = 0, skip convs = 1e-5.

        Defaults follow the original: paired LoRA alpha 8 (peft's default), unpaired UNet alpha =
        rank with targets grepped from the UNet; target lists are diffusers module names.
        """
        directions: list[Direction] = ["a2b"] if kind == "paired" else ["a2b", "b2a"]
        if unet_targets is None:
            if kind == "paired":
                unet_targets = self._unet_targets(lora.PAIRED_UNET_PATTERNS)
            else:
                unet_targets = [t for g in lora.unpaired_unet_groups(self.unet).values() for t in g]
        if alpha_unet is None:
            alpha_unet = 8 if kind == "paired" else rank_unet
        vae_targets = vae_targets or self._vae_targets(lora.VAE_PATTERNS)
        ranks = (rank_unet, alpha_unet, rank_vae, alpha_vae)
        return self._add(
            name, kind, stochastic, ranks, unet_targets, dict.fromkeys(directions, vae_targets), directions
        )

    def add_checkpoint(self, name: str, ckpt: TurboCheckpoint) -> LoadedModel:
        """Load a trained model; raises CheckpointError (and adds nothing) if it does not fit the base."""
        where = ckpt.source or name

        def targets(sd):
            return sorted({k.rsplit(".lora_", 1)[0] for k in sd if k.endswith(".lora_A.weight")})

        vae_targets = {d: targets(sd) for d, sd in ckpt.vae.items()}
        ranks = (ckpt.rank_unet, ckpt.alpha_unet, ckpt.rank_vae, ckpt.alpha_vae)
        try:
            m = self._add(
                name, ckpt.kind, ckpt.stochastic, ranks, targets(ckpt.unet), vae_targets, ckpt.directions
            )
        except ModelNameTakenError:
            raise
        except (ValueError, KeyError, AttributeError, RuntimeError) as e:
            raise CheckpointError(f"{where} does not fit the base model: {e}") from e
        try:
            self._load_weights(m, ckpt, where)
        except (lora.LoraWeightsError, RuntimeError, KeyError, CheckpointError) as e:
            self.remove_model(name)
            reason = str(e).removeprefix(f"{where}: ")
            raise CheckpointError(f"{where} does not fit the base model: {reason}") from e
        return m

    def _load_weights(self, m: LoadedModel, ckpt: TurboCheckpoint, where: str) -> None:
        unet_lora = {}
        for k, v in ckpt.unet.items():
            if ".lora_" in k:
                module, tail = k.rsplit(".lora_", 1)
                unet_lora[f"{self._unet_module(m.id, module)}.lora_{tail}"] = v
        lora.load_lora_weights(self.unet, m.id, unet_lora, where)
        conv = self.conv_in
        with torch.no_grad():
            for src, dst in (
                ("conv_in", conv.trained[m.id]),
                ("conv_in_pretrained", conv.twins[m.id] if m.stochastic else None),
            ):
                if dst is None:
                    continue
                for p in ("weight", "bias"):
                    if f"{src}.{p}" in ckpt.unet:
                        _copy(getattr(dst, p), ckpt.unet[f"{src}.{p}"], f"{where}: unet {src}.{p}")
            for d, sd in ckpt.vae.items():
                vid = m.vae_id(d)
                lora.load_lora_weights(
                    self.vae,
                    vid,
                    {self._vae_module(vid, k): v for k, v in sd.items() if ".lora_" in k},
                    where,
                )
                skips = self.skips(vid)
                for i, sname in enumerate(skips.names):
                    key = f"decoder.{sname}.weight"
                    if key not in sd:
                        raise KeyError(f"direction {d} lacks {key}")
                    _copy(skips.base(i).weight, sd[key], f"{where}: vae {d} {key}")

    def remove_model(self, name: str) -> None:
        """Unload a model: its LoRA layers, skip convs and first conv are deleted."""
        if name not in self.models:
            return
        self.unfold()
        m = self.models.pop(name)
        lora.remove_lora(self.unet, m.id)
        self.conv_in.remove(m.id)
        for d in m.directions:
            lora.remove_lora(self.vae, m.vae_id(d))
            if m.vae_id(d) in self.vae.skips:
                del self.vae.skips[m.vae_id(d)]

    # ---- training and export ----
    def trainable_parameters(self, name: str) -> list[nn.Parameter]:
        """What the original trains: UNet/VAE LoRA and the first conv; a paired model's skip convs too.

        An unpaired model's skip convs keep their initial weights and learn through their LoRA
        alone: the original makes them trainable and then adds the VAE adapter with peft, which
        freezes every weight that is not LoRA (pix2pix-turbo turns them back on, CycleGAN-Turbo not).
        """
        self.unfold()
        m = self.models[name]
        params = lora.lora_parameters(self.unet, m.id) + list(self.conv_in.trained[m.id].parameters())
        for d in m.directions:
            params += lora.lora_parameters(self.vae, m.vae_id(d))
            skips = self.skips(m.vae_id(d))
            for i in range(len(skips.names)):
                weight = cast(nn.Parameter, skips.base(i).weight)  # torch annotates a Tensor
                weight.requires_grad_(m.kind == "paired")
                if m.kind == "paired":
                    params.append(weight)
        seen, out = set(), []
        for p in params:
            if id(p) not in seen:
                seen.add(id(p))
                p.requires_grad_(True)
                out.append(p)
        return out

    def export(self, name: str, **fields) -> TurboCheckpoint:
        """The model's trained tensors as a `TurboCheckpoint` (fields: prompts, input, image_prep, ...)."""
        self.unfold()
        m = self.models[name]

        def unet_key(k: str) -> str:
            return k.replace(f"conv_in.trained.{m.id}.", "conv_in.")

        unet = {unet_key(k): v for k, v in lora.lora_weights(self.unet, m.id).items()}
        unet.update(_first_conv_state("conv_in", self.conv_in.trained[m.id]))
        if m.stochastic:
            unet.update(_first_conv_state("conv_in_pretrained", self.conv_in.twins[m.id]))
        vae: dict[Direction, dict[str, torch.Tensor]] = {}
        for d in m.directions:
            vid = m.vae_id(d)
            sd = {
                k.replace(f"skips.{vid}.", "decoder."): v for k, v in lora.lora_weights(self.vae, vid).items()
            }
            skips = self.skips(vid)
            for i, sname in enumerate(skips.names):
                sd[f"decoder.{sname}.weight"] = skips.base(i).weight.detach()
            vae[d] = sd
        ckpt = TurboCheckpoint(
            kind=m.kind, stochastic=m.stochastic, rank_unet=m.rank_unet, alpha_unet=m.alpha_unet,
            rank_vae=m.rank_vae, alpha_vae=m.alpha_vae, unet=unet, vae=vae, **fields,
        )  # fmt: skip
        if "preprocess" not in fields:
            ckpt.preprocess = "unpaired" if m.kind == "unpaired" else ("sketch" if m.stochastic else "none")
        return ckpt


def _first_conv_state(prefix: str, module: nn.Module) -> dict[str, torch.Tensor]:
    """`{prefix}.weight` and `.bias` (detached) of a first conv, trained or twin, out of its LoRA wrapper."""
    base = module.get_base_layer() if isinstance(module, LoraLayer) else module
    conv = cast(nn.Conv2d, base)  # SwitchableConvIn's ModuleDicts hold copies of the UNet's Conv2d
    assert conv.bias is not None, "SD-Turbo's first conv has a bias"
    return {f"{prefix}.weight": conv.weight.detach(), f"{prefix}.bias": conv.bias.detach()}


def _copy(dst: torch.Tensor, src: torch.Tensor, what: str) -> None:
    if dst.shape != src.shape:
        raise CheckpointError(f"{what} has shape {tuple(src.shape)}, the base needs {tuple(dst.shape)}")
    dst.copy_(src.to(dst.dtype))
