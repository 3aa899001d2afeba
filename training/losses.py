"""Frozen perceptual losses the original trainers use: LPIPS (VGG) and CLIP image-text similarity.

Both networks are frozen and stay in eval mode; gradients flow only to the images passed in.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence

import lpips
import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPModel, CLIPTokenizer, CLIPVisionConfig, PreTrainedTokenizerBase

from turbo.errors import TurboError, first_line

logger = logging.getLogger(__name__)

DEFAULT_CLIP_ID = "openai/clip-vit-base-patch32"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_CONTEXT_LENGTH = 77  # OpenAI CLIP's text context; longer captions are truncated


class LossInputError(TurboError):
    """Images or captions a loss cannot take."""


def _check_images(x: torch.Tensor, name: str) -> None:
    if x.dim() != 4 or x.shape[1] != 3:
        raise LossInputError(f"{name} must have shape (B, 3, H, W), got {tuple(x.shape)}")


class LPIPSLoss(nn.Module):
    """LPIPS distance with the VGG trunk (`lpips.LPIPS(net="vgg")`), frozen.

    pretrained_trunk=True: ImageNet VGG-16 weights (torchvision downloads them into the torch cache on
    first use); False: a random trunk, nothing downloaded (tests). The linear heads ship with the
    lpips package either way.
    """

    def __init__(self, pretrained_trunk: bool = True, net: lpips.LPIPS | None = None) -> None:
        super().__init__()
        if net is None:
            with warnings.catch_warnings():
                # lpips 0.1.4 calls torchvision's deprecated `pretrained=` API; the result is right
                warnings.filterwarnings("ignore", ".*(pretrained|weight enum).*", UserWarning)
                net = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=not pretrained_trunk, verbose=False)
        self.net = net
        self.net.requires_grad_(False)
        self.net.eval()

    @classmethod
    def from_vgg16_state_dict(cls, state: dict[str, torch.Tensor]) -> LPIPSLoss:
        """LPIPS whose trunk takes its weights from a torchvision VGG-16 state dict (the whole model's
        `features.N.*` keys, as `torchvision.models.vgg16(weights="IMAGENET1K_V1").state_dict()`
        gives, or the features' own `N.*`); raises ValueError if it does not fit."""
        if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
            raise ValueError("not a state dict (a mapping of names to tensors)")
        features = {k.removeprefix("features."): v for k, v in state.items()}
        loss = cls(pretrained_trunk=False)
        trunk = loss.net.net  # lpips's vgg16: slice1..slice5 holding the features' layers by index
        wanted = {}
        for name in trunk.state_dict():
            _, index, param = name.split(".")  # "slice2.5.weight"
            wanted[name] = f"{index}.{param}"
        missing = [v for v in wanted.values() if v not in features]
        if missing:
            raise ValueError(
                f"not a VGG-16 state dict: {len(missing)} of the {len(wanted)} trunk tensors are missing "
                f"(first: features.{missing[0]})"
            )
        try:
            trunk.load_state_dict({name: features[key] for name, key in wanted.items()})
        except RuntimeError as e:
            raise ValueError(f"not a VGG-16 state dict ({first_line(e)})") from e
        return loss

    def train(self, mode: bool = True) -> LPIPSLoss:
        """Always eval: LPIPS's heads contain dropout, which must stay off."""
        super().train(mode)
        self.net.eval()
        return self

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-sample LPIPS, shape (B,), for images in [-1, 1] of shape (B, 3, H, W).

        The original trainers use `.mean()` of it.
        """
        _check_images(pred, "pred")
        _check_images(target, "target")
        if pred.shape != target.shape:
            raise LossInputError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
        return self.net(pred, target).flatten()


class CLIPSimilarityLoss(nn.Module):
    """`1 - mean(logits_per_image) / 100`, the original's CLIP similarity loss (its `loss_clipsim`).

    logits_per_image = logit_scale.exp() * cos(image_embedding, text_embedding), with
    logit_scale.exp() = 100 for OpenAI's CLIP ViT-B/32. As in the original, the mean runs over the
    whole (B images x B captions) matrix, mismatched pairs included; matched_pairs_only=True
    averages only the diagonal (image i with caption i) instead.
    """

    # buffers (registered in __init__)
    mean: torch.Tensor
    std: torch.Tensor

    def __init__(
        self,
        model: CLIPModel,
        tokenizer: PreTrainedTokenizerBase | None = None,
        matched_pairs_only: bool = False,
    ) -> None:
        super().__init__()
        self.model = model
        self.model.requires_grad_(False)
        self.model.eval()
        self.tokenizer = tokenizer
        self.matched_pairs_only = matched_pairs_only
        vision = model.config.vision_config
        image_size = vision.image_size if isinstance(vision, CLIPVisionConfig) else None
        if not isinstance(image_size, int):
            raise LossInputError(
                f"the CLIP model must take square images (one image_size), got {image_size!r}"
            )
        self.image_size = image_size
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def from_pretrained(cls, model_id: str = DEFAULT_CLIP_ID, **kwargs) -> CLIPSimilarityLoss:
        """Load CLIP and its tokenizer (downloads openai/clip-vit-base-patch32 by default)."""
        return cls(CLIPModel.from_pretrained(model_id), CLIPTokenizer.from_pretrained(model_id), **kwargs)

    def train(self, mode: bool = True) -> CLIPSimilarityLoss:
        super().train(mode)
        self.model.eval()
        return self

    def tokenize(self, captions: Sequence[str]) -> torch.Tensor:
        """Token ids, shape (N, 77): padded, truncated to CLIP's 77-token context (end token kept)."""
        if self.tokenizer is None:
            raise LossInputError(
                "this CLIPSimilarityLoss has no tokenizer: pass input_ids instead of captions"
            )
        if isinstance(captions, str):
            captions = [captions]
        return self.tokenizer(
            list(captions),
            padding="max_length",
            max_length=CLIP_CONTEXT_LENGTH,
            truncation=True,
            return_tensors="pt",
        ).input_ids

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[-1, 1] images -> CLIP input: x*0.5+0.5, CLIP normalisation, bilinear resize to 224."""
        x = (images * 0.5 + 0.5 - self.mean.to(images.dtype)) / self.std.to(images.dtype)
        return F.interpolate(x, (self.image_size, self.image_size), mode="bilinear", align_corners=False)

    def similarity(
        self,
        images: torch.Tensor,
        captions: Sequence[str] | None = None,
        input_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """CLIP logits_per_image, shape (B images, N captions): 100 * cosine similarity for ViT-B/32."""
        _check_images(images, "images")
        if input_ids is None:
            if captions is None:
                raise LossInputError("give captions or input_ids")
            input_ids = self.tokenize(captions)
        pixels = self.preprocess(images).to(self.model.visual_projection.weight.dtype)
        # No attention mask, as OpenAI's CLIP: its text tower is causal, so padding after the end
        # token cannot change the pooled (end-token) state.
        out = self.model(input_ids=input_ids.to(images.device), pixel_values=pixels)
        return out.logits_per_image

    def forward(
        self,
        images: torch.Tensor,
        captions: Sequence[str] | None = None,
        input_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Scalar loss for generated images in [-1, 1], shape (B, 3, H, W), and their captions.

        captions: B strings (tokenized here), or input_ids of shape (B, 77) from `tokenize`.
        """
        sim = self.similarity(images, captions, input_ids)
        if self.matched_pairs_only:
            if sim.shape[0] != sim.shape[1]:
                raise LossInputError(f"{sim.shape[0]} images but {sim.shape[1]} captions")
            sim = sim.diagonal()
        return 1 - sim.float().mean() / 100
