"""Building the frozen helper networks of the objectives from a hub id or a local folder.

Real runs name hub ids (downloaded once into the Hugging Face cache); tests save tiny random models
with `save_pretrained` and pass their folders, through this same code.
"""

from __future__ import annotations

import logging

import torch

from training.discriminator import CLIPDiscriminator
from training.losses import CLIPSimilarityLoss, LPIPSLoss
from turbo.errors import TurboError

logger = logging.getLogger(__name__)


class FrozenNetworkError(TurboError):
    """A helper network that could not be loaded."""


def _load(what: str, source: str, build):
    try:
        return build()
    except (OSError, ValueError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise FrozenNetworkError(
            f"could not load the {what} from {source!r} (a hub id needs network access once, or pass a local "
            f"folder saved with save_pretrained): {first}"
        ) from e


def build_lpips(pretrained: bool, device: torch.device) -> LPIPSLoss:
    """LPIPS (VGG), frozen; pretrained=False gives a random trunk and needs no download."""
    return _load("LPIPS VGG trunk", "torchvision", lambda: LPIPSLoss(pretrained_trunk=pretrained)).to(device)


def build_clip_similarity(source: str, device: torch.device) -> CLIPSimilarityLoss:
    """CLIP text-image similarity loss from a CLIPModel + tokenizer (hub id or folder)."""
    return _load("CLIP model", source, lambda: CLIPSimilarityLoss.from_pretrained(source)).to(device)


def build_discriminator(source: str, loss_type: str, device: torch.device) -> CLIPDiscriminator:
    """The vision-aided CLIP discriminator on the vision tower in `source`; heads trainable, in train mode."""
    disc = _load(
        "discriminator backbone",
        source,
        lambda: CLIPDiscriminator.from_pretrained(source, loss_type=loss_type),
    )
    disc.requires_grad_heads(True)
    return disc.to(device).train()
