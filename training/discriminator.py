"""The vision-aided CLIP discriminator the original trains with (`vagan_clip` from vision_aided_loss 0.1.0).

A frozen CLIP ViT vision tower looks at the (DiffAugment-ed) image; small trainable heads read three
of its feature levels and give real/fake logits; the loss is a sum of per-level BCE-with-logits.

Behaviour matches `vision_aided_loss.Discriminator(cv_type="clip", output_type="conv_multi_level")`:

- input in [-1, 1] -> DiffAugment ("color,translation,cutout") -> `x * 0.5 + 0.5` -> resize to the
  tower's input size (224) with `mode="area"` -> CLIP mean/std normalisation;
- features: patch tokens after transformer blocks 4 and 8 (transformers' `hidden_states[4]` and
  `hidden_states[8]`, index 0 being the embeddings after `pre_layrnorm`) as (C, g, g) maps, and the
  final CLS token through `post_layernorm` and the visual projection;
- heads: per map, SN-conv3x3 C->256, LeakyReLU(0.2), BlurPool (4x4 binomial, stride 1, zero pad 1),
  SN-conv1x1 256->1 with stride 2 (7x7 -> 3x3 logits); for the vector, SN-Linear P->256,
  LeakyReLU(0.2), SN-Linear 256->1 (the package spectral-normalises this last layer too);
- loss "multilevel_sigmoid" (target 1 for real and for the generator, 0 for fake) or
  "multilevel_sigmoid_s" (target 0.8 instead of 1): per level BCE-with-logits averaged over the
  spatial positions, summed over levels; one value per sample, shape (B, 1). The original trainers
  take `.mean()` of it.

Generator step: the discriminator must take no gradient there. Either wrap the call in
`with disc.frozen_heads(): loss_g = disc(fake, for_G=True).mean()` or call
`disc.requires_grad_heads(False)` before and `disc.requires_grad_heads(True)` after. Gradients still
flow through the frozen network to the image. Under DDP, call the unwrapped module for the generator
step (DDP expects every trainable parameter to get a gradient once its wrapper's forward has run).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from turbo.errors import TurboError

logger = logging.getLogger(__name__)

DEFAULT_CLIP_ID = "openai/clip-vit-base-patch32"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DIFFAUG_POLICY = "color,translation,cutout"
# loss name -> target value for "real" (and for the generator's step); "fake" is always 0
LOSS_TARGETS = {"multilevel_sigmoid": 1.0, "multilevel_sigmoid_s": 0.8}
HEAD_CHANNELS = 256


class DiscriminatorError(TurboError):
    """Bad discriminator configuration or call."""


# a full CLIP checkpoint's weights that the vision tower leaves unused
_TEXT_HALF = ("text_model.", "text_projection.", "logit_scale")


def _hold_back_load_report(record: logging.LogRecord) -> bool:
    """Drop transformers' load report when all it lists is unused weights."""
    message = record.getMessage()
    return "LOAD REPORT" not in message or any(w in message for w in ("MISSING", "MISMATCH", "CONVERSION"))


def load_vision_tower(model_id: str) -> CLIPVisionModelWithProjection:
    """The vision tower and projection of a CLIP checkpoint (hub id or folder).

    transformers would warn about each weight of the text half it leaves unused (about 200 lines
    for CLIP ViT-B/32, per process); that report is held back unless it lists a missing,
    mismatched or unconverted weight. A tower weight missing from the checkpoint is a
    DiscriminatorError; an unused weight outside the text half, a one-line warning.
    """
    # a filter, not a higher level: transformers reads its logger's level to decide other warnings
    report = logging.getLogger("transformers.modeling_utils")
    report.addFilter(_hold_back_load_report)
    try:
        # transformers types the result as the model alone; output_loading_info adds the report
        tower, info = cast(
            tuple[CLIPVisionModelWithProjection, dict[str, list[str]]],
            CLIPVisionModelWithProjection.from_pretrained(model_id, output_loading_info=True),
        )
    finally:
        report.removeFilter(_hold_back_load_report)
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise DiscriminatorError(
            f"{model_id} is not a CLIP vision checkpoint: {len(missing)} tower weights are missing "
            f"(first: {missing[0]})"
        )
    unused = sorted(k for k in info["unexpected_keys"] if not k.startswith(_TEXT_HALF))
    if unused:
        logger.warning(
            "%s: %d weights unused by the CLIP vision tower (first: %s)", model_id, len(unused), unused[0]
        )
    return tower


# --- DiffAugment (Zhao et al. 2020), as vision_aided_loss implements it --------------------------
# The random draws happen in the same order, with the same shapes, as the package's, so with the same
# seed the same augmentation comes out.


def _brightness(x: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
    return x + (torch.rand(x.size(0), 1, 1, 1, dtype=x.dtype, device=x.device, generator=g) - 0.5)


def _saturation(x: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
    mean = x.mean(dim=1, keepdim=True)
    factor = torch.rand(x.size(0), 1, 1, 1, dtype=x.dtype, device=x.device, generator=g) * 2
    return (x - mean) * factor + mean


def _contrast(x: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
    mean = x.mean(dim=[1, 2, 3], keepdim=True)
    factor = torch.rand(x.size(0), 1, 1, 1, dtype=x.dtype, device=x.device, generator=g) + 0.5
    return (x - mean) * factor + mean


def _translation(x: torch.Tensor, g: torch.Generator | None, ratio: float = 0.125) -> torch.Tensor:
    """Shift each image by up to ratio*size pixels, filling with zeros."""
    b, _, h, w = x.shape
    max_h, max_w = int(h * ratio + 0.5), int(w * ratio + 0.5)
    shift_h = torch.randint(-max_h, max_h + 1, size=[b, 1, 1], device=x.device, generator=g)
    shift_w = torch.randint(-max_w, max_w + 1, size=[b, 1, 1], device=x.device, generator=g)
    # Source row/column in the zero-padded image; out-of-range sources land on the zero border.
    rows = (torch.arange(h, device=x.device).view(1, h, 1) + shift_h + 1).clamp(0, h + 1)
    cols = (torch.arange(w, device=x.device).view(1, 1, w) + shift_w + 1).clamp(0, w + 1)
    padded = F.pad(x, [1, 1, 1, 1]).permute(0, 2, 3, 1)
    batch = torch.arange(b, device=x.device).view(b, 1, 1)
    return padded[batch, rows, cols].permute(0, 3, 1, 2)


def _cutout(x: torch.Tensor, g: torch.Generator | None, ratio: float = 0.5) -> torch.Tensor:
    """Zero one rectangle of ratio*size per image (clipped at the borders)."""
    b, _, h, w = x.shape
    size_h, size_w = int(h * ratio + 0.5), int(w * ratio + 0.5)
    centre_h = torch.randint(0, h + (1 - size_h % 2), size=[b, 1, 1], device=x.device, generator=g)
    centre_w = torch.randint(0, w + (1 - size_w % 2), size=[b, 1, 1], device=x.device, generator=g)
    top, left = centre_h - size_h // 2, centre_w - size_w // 2
    # The package scatters zeros at clamped indices; since its rectangle always overlaps the image,
    # that equals zeroing the rectangle's intersection with the image, which is what this does.
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    inside = (rows >= top) & (rows < top + size_h) & (cols >= left) & (cols < left + size_w)
    return x * (~inside).to(x.dtype).unsqueeze(1)


_AUGMENTS = {
    "color": (_brightness, _saturation, _contrast),
    "translation": (_translation,),
    "cutout": (_cutout,),
}


def diff_augment(
    x: torch.Tensor, policy: str = DIFFAUG_POLICY, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Differentiable augmentation of a batch, shape (B, C, H, W), any value range.

    policy: comma-separated subset of "color", "translation", "cutout" ("" = identity).
    generator: random source (default: torch's global RNG, as the package uses).
    """
    if not policy:
        return x
    for name in policy.split(","):
        if name not in _AUGMENTS:
            raise DiscriminatorError(f"unknown DiffAugment policy {name!r}; valid: {', '.join(_AUGMENTS)}")
        for augment in _AUGMENTS[name]:
            x = augment(x, generator)
    return x.contiguous()


# --- heads ----------------------------------------------------------------------------------------


class BlurPool(nn.Module):
    """Depthwise 4x4 binomial blur ([1, 3, 3, 1] outer product / 64) with zero padding 1, stride 1."""

    kernel: torch.Tensor  # a buffer

    def __init__(self, channels: int) -> None:
        super().__init__()
        taps = torch.tensor([1.0, 3.0, 3.0, 1.0])
        kernel = taps[:, None] * taps[None, :]
        kernel = (kernel / kernel.sum()).expand(channels, 1, 4, 4).clone()
        self.register_buffer("kernel", kernel, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(x, [1, 1, 1, 1]), self.kernel.to(x.dtype), groups=x.shape[1])


def _map_head(in_channels: int) -> nn.Sequential:
    return nn.Sequential(
        spectral_norm(nn.Conv2d(in_channels, HEAD_CHANNELS, kernel_size=3, stride=1, padding=1)),
        nn.LeakyReLU(0.2),
        BlurPool(HEAD_CHANNELS),
        spectral_norm(nn.Conv2d(HEAD_CHANNELS, 1, kernel_size=1, stride=2)),
    )


def _vector_head(in_features: int) -> nn.Sequential:
    return nn.Sequential(
        spectral_norm(nn.Linear(in_features, HEAD_CHANNELS)),
        nn.LeakyReLU(0.2),
        spectral_norm(nn.Linear(HEAD_CHANNELS, 1)),
    )


# --- the discriminator -----------------------------------------------------------------------------


class CLIPDiscriminator(nn.Module):
    """Vision-aided CLIP discriminator: frozen CLIP vision tower + trainable multi-level heads.

    backbone: a CLIPVisionModelWithProjection (its parameters are frozen here and it stays in eval
    mode). feature_layers: the blocks after which patch-token maps are read; default (L//3, 2L//3),
    i.e. (4, 8) for ViT-B/32's 12 blocks. loss_type: "multilevel_sigmoid" or "multilevel_sigmoid_s".
    diffaug: apply DiffAugment before the backbone (the original always does).
    """

    # buffers (registered in __init__)
    mean: torch.Tensor
    std: torch.Tensor

    def __init__(
        self,
        backbone: CLIPVisionModelWithProjection,
        loss_type: str = "multilevel_sigmoid_s",
        diffaug: bool = True,
        feature_layers: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if loss_type not in LOSS_TARGETS:
            raise DiscriminatorError(f"unknown loss_type {loss_type!r}; valid: {', '.join(LOSS_TARGETS)}")
        config = backbone.config
        num_layers = config.num_hidden_layers
        if feature_layers is None:
            feature_layers = (num_layers // 3, 2 * num_layers // 3)
        feature_layers = tuple(int(i) for i in feature_layers)
        if not all(1 <= i <= num_layers for i in feature_layers):
            raise DiscriminatorError(f"feature_layers {feature_layers} must lie in 1..{num_layers}")
        self.loss_type = loss_type
        self.real_target = LOSS_TARGETS[loss_type]
        self.diffaug = diffaug
        self.feature_layers = feature_layers
        image_size, patch_size = config.image_size, config.patch_size
        if not isinstance(image_size, int) or not isinstance(patch_size, int):
            raise DiscriminatorError(
                f"the CLIP tower must take square images in square patches (one number each), got "
                f"image_size {image_size!r}, patch_size {patch_size!r}"
            )
        self.image_size = image_size
        self.grid = image_size // patch_size
        self.backbone = backbone
        self.backbone.requires_grad_(False)
        self.backbone.eval()
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)
        self.heads = nn.ModuleList([_map_head(config.hidden_size) for _ in feature_layers])
        self.heads.append(_vector_head(config.projection_dim))

    @classmethod
    def from_pretrained(cls, model_id: str = DEFAULT_CLIP_ID, **kwargs) -> CLIPDiscriminator:
        """Build on a hub/local CLIP checkpoint (downloads openai/clip-vit-base-patch32 by default)."""
        return cls(load_vision_tower(model_id), **kwargs)

    @classmethod
    def from_config(cls, config: CLIPVisionConfig, **kwargs) -> CLIPDiscriminator:
        """Build on a randomly initialised tower (tests)."""
        return cls(CLIPVisionModelWithProjection(config), **kwargs)

    # -- trainability ------------------------------------------------------------------------------

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The heads' parameters (what the discriminator's optimizer should get)."""
        return list(self.heads.parameters())

    def requires_grad_(self, requires_grad: bool = True) -> CLIPDiscriminator:
        """Sets the heads only: the backbone stays frozen whatever the caller asks for."""
        self.heads.requires_grad_(requires_grad)
        return self

    def requires_grad_heads(self, requires_grad: bool) -> None:
        """Freeze (False, for the generator's step) or unfreeze (True) the heads."""
        self.heads.requires_grad_(requires_grad)

    @contextmanager
    def frozen_heads(self) -> Iterator[CLIPDiscriminator]:
        """Context for the generator's step: heads frozen inside, restored after."""
        previous = [p.requires_grad for p in self.heads.parameters()]
        self.heads.requires_grad_(False)
        try:
            yield self
        finally:
            for param, flag in zip(self.heads.parameters(), previous, strict=True):
                param.requires_grad_(flag)

    def train(self, mode: bool = True) -> CLIPDiscriminator:
        """Heads follow mode; the backbone always stays in eval mode (as in the package)."""
        super().train(mode)
        self.backbone.eval()
        return self

    # -- forward -----------------------------------------------------------------------------------

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Backbone features of an (already augmented) image in [-1, 1], shape (B, 3, H, W).

        Returns one (B, C, g, g) map per feature layer and the (B, P) projected CLS embedding.
        """
        x = F.interpolate(x * 0.5 + 0.5, size=(self.image_size, self.image_size), mode="area")
        x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        dtype = self.backbone.visual_projection.weight.dtype
        out = self.backbone(pixel_values=x.to(dtype), output_hidden_states=True)
        maps = []
        for layer in self.feature_layers:
            tokens = out.hidden_states[layer][:, 1:, :]  # drop CLS; patches in row-major order
            b, n, c = tokens.shape
            maps.append(tokens.transpose(1, 2).reshape(b, c, self.grid, self.grid).float())
        return [*maps, out.image_embeds.float()]

    def logits(self, x: torch.Tensor, generator: torch.Generator | None = None) -> list[torch.Tensor]:
        """Per-level logits for an image in [-1, 1], shape (B, 3, H, W).

        Returns [(B, h, w) for each map level..., (B, 1) for the CLS level]; h = w = 3 for ViT-B/32.
        generator: random source for DiffAugment (default: torch's global RNG).
        """
        if x.dim() != 4 or x.shape[1] != 3:
            raise DiscriminatorError(f"expected an image batch of shape (B, 3, H, W), got {tuple(x.shape)}")
        if self.diffaug:
            x = diff_augment(x, DIFFAUG_POLICY, generator)
        feats = self.features(x)
        outs = [head(feat).squeeze(1) for head, feat in zip(self.heads[:-1], feats[:-1], strict=True)]
        outs.append(self.heads[-1](feats[-1]))
        return outs

    def loss_from_logits(
        self, logits: Sequence[torch.Tensor], for_real: bool | None = None, for_G: bool = False
    ) -> torch.Tensor:
        """Sum over levels of BCE-with-logits (spatial mean per sample); shape (B, 1)."""
        if for_G:
            for_real = True
        if for_real is None:
            raise DiscriminatorError("say what the images are: for_real=True/False, or for_G=True")
        target = self.real_target if for_real else 0.0
        total: torch.Tensor | None = None
        for level in logits:
            loss = F.binary_cross_entropy_with_logits(level, torch.full_like(level, target), reduction="none")
            if loss.dim() > 2:
                loss = loss.mean(dim=[1, 2]).reshape(-1, 1)
            total = loss if total is None else total + loss
        if total is None:
            raise DiscriminatorError("no logits to take a loss of")
        return total

    def forward(
        self,
        x: torch.Tensor,
        for_real: bool | None = None,
        for_G: bool = False,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Discriminator loss per sample, shape (B, 1), for images in [-1, 1], shape (B, 3, H, W).

        for_G=True: the generator's loss (target "real"); else for_real says whether x is real.
        Take `.mean()` for the scalar the original trainers use.
        """
        return self.loss_from_logits(self.logits(x, generator), for_real=for_real, for_G=for_G)

    def heads_state_dict(self) -> dict[str, torch.Tensor]:
        """The trainable part's state (the backbone is a fixed public checkpoint)."""
        return self.heads.state_dict()

    def load_heads_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.heads.load_state_dict(state)
