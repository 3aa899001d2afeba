"""The fast inference path: one model's LoRA folded into the shared base weights.

`FastPath(generator)(x, text_emb, model, direction, gamma, noise)` gives the same image as
`Generator.forward` (within float rounding; both run `turbo.generator.one_step`) at the cost of a
plain SD-Turbo forward:

- the active (model, direction, gamma)'s LoRA deltas `gamma * alpha / r * B @ A` are added to the
  base weights they adapt, and peft's wrappers are taken out of the networks while folded, so the
  adapters cost nothing per image;
- the first conv (trained conv + LoRA, blended with its twin by gamma) becomes one conv, and the
  skip convs (+ LoRA, times gamma) become plain 1x1 convs; both are persistent modules whose
  weights are overwritten in place, so a compiled graph survives a switch;
- the VAE decoder's upsamplers (nearest 2x, then a 3x3 conv) run as four 2x2 convs at the lower
  resolution (`turbo.fast.subpixel`): the same result with 16/36 of the multiply-adds;
- the timestep tensor is made once; channels_last and inference mode are on; on CUDA each input
  shape's forward is captured once as a CUDA graph and replayed (`turbo.fast.cuda_graph`), and GroupNorm
  runs as reductions that fill the GPU (`turbo.fast.group_norm`); torch.compile is optional.

Exactness of a switch. Many models share the base weights, so a switch must give the base back
bit for bit (`FastOptions.restore`): by default ("copy") the first fold of each base weight keeps
a copy of it in host memory (pinned on a GPU) and a restore copies it back, one pass each;
"record" keeps one int8 per folded element instead (`turbo.fast.exact_fold`; the delta is
recomputed on unfold by the same code from the same LoRA tensors, hence bit-identical), a quarter
of the copy in fp32 for slower switches; "none" keeps nothing, for a process that folds one model
and never switches (the CLI).

Training never sees this: every mutating or plain-path method of `Generator` calls
`Generator.unfold()` first, which restores the base and the peft wrappers.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeGuard, cast

import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
from diffusers.models.upsampling import Upsample2D
from peft.tuners.lora import LoraLayer
from torch import nn

from turbo import lora
from turbo.conv_in import SwitchableConvIn
from turbo.errors import SettingError, TurboError
from turbo.fast import exact_fold
from turbo.fast.cuda_graph import GraphCache
from turbo.fast.group_norm import restore_group_norms, swap_group_norms
from turbo.fast.subpixel import SubpixelUpsample
from turbo.generator import Generator, StepNetworks, one_step
from turbo.skip_vae import SkipConvs

logger = logging.getLogger(__name__)


class FastPathError(TurboError):
    """A call the fast path cannot serve (e.g. a per-sample gamma, which only training uses)."""


RESTORE_MODES = ("auto", "copy", "record", "none")


@dataclass
class FastOptions:
    """Which optimisations are on. `fold=False` keeps peft's unfolded adapters (for comparisons)."""

    fold: bool = True
    channels_last: bool = True
    inference_mode: bool = True
    subpixel: bool = True  # the VAE decoder's upsample + conv at low resolution (needs `fold`)
    compile: bool = False
    compile_mode: str | None = None  # torch.compile's mode, e.g. "max-autotune"
    # On CUDA, with the fold and without compile: replay one captured CUDA graph per input shape
    # (`turbo.fast.cuda_graph`), which takes the cpu's kernel-launch time out of each image.
    cuda_graph: bool = True
    # GroupNorm as `turbo.fast.group_norm.SplitGroupNorm` while folded; None: on CUDA without compile (there
    # PyTorch's kernel fills a fraction of the GPU at batch 1; on the cpu and under inductor it need not)
    split_group_norm: bool | None = None
    # How a switch gives the base its exact weights back (`turbo.fast.exact_fold`):
    # "copy" keeps a copy of every folded base weight in host memory (pinned on CUDA), taken at its
    # first fold (one extra pass), and restores by copying (one pass); "record" keeps one byte per
    # folded element instead (a quarter of the copy in fp32) and costs some six passes per fold;
    # "none" keeps nothing: the first fold is in place for good, for a process that never switches
    # (the CLI with one model), and anything that would need the base back raises; "auto": "copy".
    restore: str = "auto"

    def restore_mode(self, device: torch.device) -> str:
        if self.restore not in RESTORE_MODES:
            raise SettingError(f"restore must be one of {', '.join(RESTORE_MODES)}, not {self.restore!r}")
        return "copy" if self.restore == "auto" else self.restore

    def splits_group_norm(self, device: torch.device) -> bool:
        if self.split_group_norm is None:
            return device.type == "cuda" and not self.compile
        return self.split_group_norm


def bf16_is_native(device: torch.device) -> bool:
    """Whether bf16 runs at full speed: CUDA with bf16 support, or a cpu with AVX512-BF16/AMX."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def _base_weight(layer: LoraLayer) -> torch.Tensor:
    """The weight of the Linear or Conv2d a LoRA layer wraps."""
    return cast(torch.Tensor, layer.get_base_layer().weight)  # nn.Module's lookup: Tensor | Module


def _delta(layer: LoraLayer, adapter: str, scale: float) -> torch.Tensor:
    """The adapter's delta `scale * alpha / r * B @ A`, fp32, shape (out, fan_in)."""
    a = lora.adapter_weight(layer.lora_A, adapter).flatten(1).float()
    b = lora.adapter_weight(layer.lora_B, adapter).flatten(1).float()
    return (b @ a).mul_(scale * layer.lora_alpha[adapter] / layer.r[adapter])


def _delta_rows(layer: LoraLayer, adapter: str, scale: float) -> exact_fold.DeltaRows:
    """The delta's rows flattened in the base weight's storage order (channels_last: out, kh, kw, in)."""
    w = _base_weight(layer)
    a = lora.adapter_weight(layer.lora_A, adapter).float()
    if w.dim() == 4 and not w.is_contiguous():
        # A's columns in the weight's storage order, once per layer: each chunk's product then
        # comes out in that order, with no permuted copy per chunk.
        a = a.permute(0, 2, 3, 1)
    a = a.reshape(a.shape[0], -1)
    b = lora.adapter_weight(layer.lora_B, adapter).flatten(1).float()
    s = scale * layer.lora_alpha[adapter] / layer.r[adapter]

    def rows(r0: int, r1: int) -> torch.Tensor:
        return (b[r0:r1] @ a).mul_(s).view(-1)

    return rows


@dataclass
class _FoldedLayer:
    layer: LoraLayer
    adapter: str
    scale: float
    record: exact_fold.FoldRecord | None  # None: restored from `copy`, or not at all (restore "none")
    copy: torch.Tensor | None = None

    def restore(self) -> None:
        weight = _base_weight(self.layer)
        if self.copy is not None:
            exact_fold.copy_back_(weight, self.copy)
        elif self.record is None:
            raise FastPathError(_FOLDED_FOR_GOOD)
        else:
            exact_fold.subtract_(weight, _delta_rows(self.layer, self.adapter, self.scale), self.record)


@dataclass
class _BaseCopy:
    """A base weight's host copy, valid while the weight's (data_ptr, dtype, version) is `state`."""

    weight: torch.Tensor
    state: tuple
    copy: torch.Tensor


_FOLDED_FOR_GOOD = (
    "this fast path folded its model into the base for good (restore='none'): it cannot switch to "
    "another model, direction or gamma, nor give the base back; build it with restore='copy' or 'record'"
)


def _copy_state(weight: torch.Tensor) -> tuple:
    return (weight.data_ptr(), weight.dtype, weight._version)


def _fold_layer(
    layer: LoraLayer,
    adapter: str,
    scale: float,
    mode: str,
    copies: dict[int, _BaseCopy],
    from_copy: bool = False,
) -> _FoldedLayer:
    """Fold one adapter into its base weight, keeping what `mode` (`FastOptions.restore`) restores from.

    from_copy: the weight still holds another fold and its copy is valid: write copy + delta."""
    weight = _base_weight(layer)
    rows = _delta_rows(layer, adapter, scale)
    if from_copy:
        held = copies[id(weight)].copy
        exact_fold.add_from_(weight, held, rows)
        return _FoldedLayer(layer, adapter, scale, None, held)
    if mode == "record":
        return _FoldedLayer(layer, adapter, scale, exact_fold.add_(weight, rows))
    if mode == "none":
        exact_fold.add_plain_(weight, rows)
        return _FoldedLayer(layer, adapter, scale, None)
    # A copy stays valid while the weight keeps its storage, dtype and version: our folds write
    # through `.data`, which leaves the version alone, while `.to()` or a user's in-place edit do not.
    state = _copy_state(weight)
    kept = copies.get(id(weight))
    if kept is None or kept.weight is not weight or kept.state != state:
        kept = copies[id(weight)] = _BaseCopy(weight, state, exact_fold.host_copy(weight))
    exact_fold.add_plain_(weight, rows)
    return _FoldedLayer(layer, adapter, scale, None, kept.copy)


def _base(module: nn.Module) -> nn.Module:
    return module.get_base_layer() if isinstance(module, LoraLayer) else module


def _to_channels_last(*modules: nn.Module) -> None:
    # through nn.Module: diffusers' `@wraps(Module.to)` on its models' `to` reads as unbound to mypy
    for module in modules:
        module.to(memory_format=torch.channels_last)


def _plain_nearest_upsampler(up: nn.Module) -> TypeGuard[Upsample2D]:
    """A diffusers `Upsample2D` doing nearest 2x then a 3x3 conv (what SubpixelUpsample computes)."""
    return (
        isinstance(up, Upsample2D)
        and up.use_conv
        and up.interpolate
        and not up.use_conv_transpose
        and up.norm is None
        and up.name == "conv"
        and SubpixelUpsample.supports(_base(up.conv))
    )


def _upsample_conv(up: Upsample2D) -> nn.Conv2d:
    """The 3x3 conv (out of its LoRA wrapper) of an upsampler `_plain_nearest_upsampler` accepted."""
    conv = cast(nn.Module, up.conv)  # diffusers' attribute reads as its first value's type
    return cast(nn.Conv2d, _base(conv))  # `SubpixelUpsample.supports` checked it


def _set_upsampler(block: nn.Module, up: nn.Module) -> None:
    """Put `up` in place of a decoder up block's (only) upsampler."""
    cast(nn.ModuleList, block.upsamplers)[0] = up  # diffusers' up blocks: a ModuleList or None


def _conv_weights(conv: nn.Module, adapter: str, scale: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A (possibly LoRA-wrapped) conv's effective weight (fp32) and bias with the adapter at `scale`."""
    base = cast(nn.Conv2d, _base(conv))
    w = base.weight.float()
    if isinstance(conv, LoraLayer) and adapter in conv.lora_A:
        w = w + _delta(conv, adapter, scale).view(w.shape)
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
        if self.options.channels_last and not self.options.fold:  # folded networks convert in _enter
            _to_channels_last(unet, vae)
        self.timestep = torch.tensor([generator.schedule.timestep], device=self.device, dtype=torch.long)
        # Persistent fused modules: their weights change in place, so compiled graphs stay valid.
        self.conv_in = copy.deepcopy(generator.conv_in.pretrained).requires_grad_(False)
        self.skips = SkipConvs(vae.skip_in_channels, vae.skip_out_channels, init=None)
        self.skips.requires_grad_(False).to(self.device, self.dtype)
        if self.options.channels_last:
            self.conv_in.to(memory_format=torch.channels_last)
            self.skips.to(memory_format=torch.channels_last)
        # (up block, its Upsample2D, the stand-in used while folded)
        self.upsamplers: list[tuple[nn.Module, Upsample2D, SubpixelUpsample]] = []
        if self.options.subpixel and self.options.fold:
            for block in vae.decoder.up_blocks:
                for up in cast("nn.ModuleList | None", block.upsamplers) or []:
                    if _plain_nearest_upsampler(up):
                        self.upsamplers.append((block, up, SubpixelUpsample(_upsample_conv(up))))
        self.active: tuple[str, str, float] | None = None
        self._unet_key: tuple | None = None
        self._vae_key: tuple | None = None
        self._unet_folds: list[_FoldedLayer] = []
        self._vae_folds: list[_FoldedLayer] = []
        self._stripped: dict[str, list[tuple[nn.Module, str, LoraLayer]]] = {"unet": [], "vae": []}
        self._switchable_conv_in: SwitchableConvIn | None = None  # the generator's, while folded
        self._split_norms = self.options.splits_group_norm(self.device)
        self._swapped_norms: list = []
        self._unet: Callable[..., UNet2DConditionOutput] = unet
        self._encode: Callable[[torch.Tensor], tuple[torch.Tensor, list[torch.Tensor]]] = vae.encode
        self._decode: Callable[..., torch.Tensor] = vae.decode
        use_graphs = self.options.cuda_graph and self.options.fold and not self.options.compile
        self._graphs = GraphCache(self._forward) if use_graphs and self.device.type == "cuda" else None
        self._restore = self.options.restore_mode(self.device)
        # restore by copy: id(weight) -> its host copy, taken at the weight's first fold
        self._copies: dict[int, _BaseCopy] = {}
        if self.options.compile:
            mode = self.options.compile_mode or None  # None: torch.compile's default
            self._unet = torch.compile(unet, mode=mode)
            self._encode = torch.compile(vae.encode, mode=mode)
            self._decode = torch.compile(vae.decode, mode=mode)
        # What `one_step` runs while folded: gamma's roles 1, 2 and 4 are in the weights.
        self._folded = StepNetworks(
            encode=self._encode, unet=self._unet, decode=self._decode, skips=self.skips,
            schedule=generator.schedule, timestep=self.timestep, skips_scaled=True,
        )  # fmt: skip

    # ---- folding ----
    @property
    def folded(self) -> bool:
        return self.generator.folded is self

    def restore_bytes(self) -> int:
        """Host memory held to restore the base exactly (see `turbo.fast.exact_fold`)."""
        if self._restore == "copy":
            return sum(kept.copy.numel() * kept.copy.element_size() for kept in self._copies.values())
        return sum(f.record.nbytes for f in self._unet_folds + self._vae_folds if f.record is not None)

    def _enter(self) -> None:
        """Take peft's wrappers out of the shared networks and put the fused first conv in."""
        g = self.generator
        g.unfold()
        if self.options.channels_last:
            # Here, not when built: a pipeline that never translates does not pay for the copy (a
            # no-op once converted). Only while unfolded: folded layers remember storage positions.
            # Outside inference mode (a call folds inside it): the new weights must stay normal
            # tensors, which restores and training may write in place.
            with torch.inference_mode(False):
                _to_channels_last(g.unet, g.vae)
        for key, net, own in (("unet", g.unet, "conv_in"), ("vae", g.vae, "skips.")):
            for name, layer in list(lora.lora_layers(net)):
                if name.startswith(own):  # per-model modules: replaced by fused copies instead
                    continue
                parent_name, _, child = name.rpartition(".")
                parent = net.get_submodule(parent_name) if parent_name else net
                setattr(parent, child, layer.get_base_layer())
                self._stripped[key].append((parent, child, layer))
        self._switchable_conv_in = g.conv_in
        g.unet.conv_in = self.conv_in
        for block, _, sub in self.upsamplers:
            _set_upsampler(block, sub)
        if self._split_norms:
            self._swapped_norms = swap_group_norms(g.unet) + swap_group_norms(g.vae)
        if self._graphs is not None:
            # Whatever unfolded the networks (a new dtype or device, training) may have moved weights.
            self._graphs.clear()
        g.folded = self

    def restore(self) -> None:
        """Give the base its exact weights and the networks their peft wrappers back."""
        if self._restore == "none" and (self._unet_folds or self._vae_folds):
            raise FastPathError(_FOLDED_FOR_GOOD)
        with torch.no_grad():
            for f in reversed(self._unet_folds + self._vae_folds):
                f.restore()
        self._unet_folds, self._vae_folds = [], []
        for stripped in self._stripped.values():
            for parent, child, layer in reversed(stripped):
                setattr(parent, child, layer)
            stripped.clear()
        if self._switchable_conv_in is not None:
            # cast: diffusers annotates a Conv2d; ours computes like one
            self.generator.unet.conv_in = cast(nn.Conv2d, self._switchable_conv_in)
            self._switchable_conv_in = None
        for block, up, _ in self.upsamplers:
            _set_upsampler(block, up)
        restore_group_norms(self._swapped_norms)
        self._swapped_norms = []
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
        if self._restore == "none" and self.folded:
            raise FastPathError(_FOLDED_FOR_GOOD)
        with torch.no_grad():
            if not self.folded:
                self._enter()
            unet_key, vae_key = (m.id, gamma), (m.vae_id(direction), gamma)
            if unet_key != self._unet_key:
                self._unet_folds = self._refold("unet", self._unet_folds, m.id, gamma)
                self._fuse_conv_in(m.id, m.stochastic, gamma)
                self._unet_key = unet_key
            if vae_key != self._vae_key:
                self._vae_folds = self._refold("vae", self._vae_folds, vae_key[0], gamma)
                self._fuse_skips(vae_key[0], gamma)
                for _, up, sub in self.upsamplers:
                    sub.refresh(_upsample_conv(up))  # the conv may have had a LoRA delta folded in
                self._vae_key = vae_key
        self.active = (model, direction, gamma)
        logger.debug(
            "folded %s %s gamma=%s (%d bytes kept to restore)", model, direction, gamma, self.restore_bytes()
        )

    def _refold(self, net: str, old: list[_FoldedLayer], adapter: str, gamma: float) -> list[_FoldedLayer]:
        """Restore `old` and fold `adapter` at `gamma` into network `net`.

        On the cpu with restore by copy, a weight that both fold is rewritten as copy + delta in one
        pass instead of being copied back first and then added to (one pass over it saved)."""
        layers = [layer for _, _, layer in self._stripped[net] if adapter in layer.lora_A]
        rewrite: set[int] = set()
        if self._restore == "copy" and self.device.type == "cpu":
            again = {id(_base_weight(layer)) for layer in layers}
            for f in old:
                w = _base_weight(f.layer)
                kept = self._copies.get(id(w))
                if id(w) in again and kept is not None and kept.weight is w and kept.state == _copy_state(w):
                    rewrite.add(id(w))
        for f in reversed(old):
            if id(_base_weight(f.layer)) not in rewrite:
                f.restore()
        return [
            _fold_layer(
                layer,
                adapter,
                gamma,
                self._restore,
                self._copies,
                id(_base_weight(layer)) in rewrite,
            )
            for layer in layers
        ]

    def _fuse_conv_in(self, mid: str, stochastic: bool, gamma: float) -> None:
        conv, fused = self._switchable_conv_in, self.conv_in
        assert conv is not None, "called while folded, when `_enter` has put the generator's aside"
        w, b = _conv_weights(conv.trained[mid], mid, gamma)
        assert b is not None and fused.bias is not None, "SD-Turbo's first conv has a bias"
        if mid in conv.twins:
            tw, tb = _conv_weights(conv.twins[mid], mid, gamma)
            assert tb is not None, "a twin copies the pretrained first conv, bias included"
            w = tw * (1 - gamma) + w * gamma
            b = tb * (1 - gamma) + b * gamma
        fused.weight.copy_(w)
        fused.bias.copy_(b)

    def _fuse_skips(self, vid: str, gamma: float) -> None:
        # The decoder scales each skip activation by gamma before its (linear) conv: fold it in.
        trained = self.generator.skips(vid)
        for i in range(len(trained.names)):
            w, _ = _conv_weights(trained[i], vid, gamma)
            self.skips.base(i).weight.copy_(w * gamma)

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
            fmt = torch.channels_last if self.options.channels_last else torch.contiguous_format
            x = x.to(self.device, self.dtype, memory_format=fmt)
            text_emb = text_emb.to(self.device, self.dtype)
            noise = None if noise is None else noise.to(self.device, self.dtype)
            if not self.options.fold:  # peft's adapters at run time, as Generator.forward
                g = self.generator
                m = g.check_active(model, direction)
                net = dataclasses.replace(
                    self._folded,
                    skips=g.skips(m.vae_id(direction)),
                    adapt=lambda gm: g.activate(model, direction, gm),
                    skips_scaled=False,
                )
                return one_step(net, x, text_emb, gamma, noise)
            if self._graphs is None:
                net = dataclasses.replace(
                    self._folded, adapt=lambda gm: self.fold(model, direction, float(gm))
                )
                return one_step(net, x, text_emb, gamma, noise)
            self.fold(model, direction, gamma)  # outside the graph: a capture cannot fold
            if noise is None:
                return self._graphs(x, text_emb)
            return self._graphs(x, text_emb, noise, torch.full((), gamma, device=self.device))

    def _forward(
        self,
        x: torch.Tensor,
        text_emb: torch.Tensor,
        noise: torch.Tensor | None = None,
        gamma: float | torch.Tensor = 1.0,
    ) -> torch.Tensor:
        """`one_step` on the folded networks, inputs already on the device (what a CUDA graph
        captures: gamma is a float, or there a 0-d tensor input)."""
        return one_step(self._folded, x, text_emb, gamma, noise)
