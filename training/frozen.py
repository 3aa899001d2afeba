"""Building the frozen helper networks of the objectives from a hub id, a local folder or a file.

Real runs name hub ids (downloaded once into the Hugging Face cache) or, offline, folders saved with
`save_pretrained` and a VGG-16 state dict file for LPIPS (docs/training.md, "Training offline");
tests save tiny random models and pass their folders, through this same code. Every error names the
flag that chose the network.
"""

from __future__ import annotations

import logging
import os

import torch

from training.discriminator import CLIPDiscriminator
from training.losses import CLIPSimilarityLoss, LPIPSLoss
from turbo.errors import TurboError, first_line

logger = logging.getLogger(__name__)

OFFLINE_HINT = 'offline, see docs/training.md, "Training offline"'


class FrozenNetworkError(TurboError):
    """A helper network that could not be loaded."""


def _load(what: str, flag: str, source: str, build, hint: str):
    try:
        return build()
    except (OSError, ValueError) as e:
        raise FrozenNetworkError(
            f"could not load the {what} from {flag} {source} ({hint}; {OFFLINE_HINT}): {first_line(e)}"
        ) from e


_HUB_HINT = "a hub id needs network access once, or pass a local folder saved with save_pretrained"


def build_lpips(pretrained: bool, device: torch.device, vgg_file: str | None = None) -> LPIPSLoss:
    """LPIPS (VGG), frozen. vgg_file: a torchvision VGG-16 state dict for the trunk (no download);
    else pretrained=True downloads torchvision's ImageNet weights once, False gives a random trunk."""
    if vgg_file is None:
        hint = "torchvision downloads them once into the torch cache, or pass --lpips-vgg FILE"
        return _load(
            "LPIPS VGG trunk", "--lpips-pretrained", "(torchvision's ImageNet VGG-16)",
            lambda: LPIPSLoss(pretrained_trunk=pretrained), hint,
        ).to(device)  # fmt: skip
    path = os.path.expanduser(vgg_file)

    def build():
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many kinds for a file that is not its own
            raise ValueError(f"cannot read it ({first_line(e)})") from e
        return LPIPSLoss.from_vgg16_state_dict(state)

    hint = "a torchvision VGG-16 state dict"
    return _load("LPIPS VGG trunk", "--lpips-vgg", vgg_file, build, hint).to(device)


def build_clip_similarity(source: str, device: torch.device) -> CLIPSimilarityLoss:
    """CLIP text-image similarity loss from a CLIPModel + tokenizer (hub id or folder, --clip-model)."""
    return _load(
        "CLIP model", "--clip-model", source, lambda: CLIPSimilarityLoss.from_pretrained(source), _HUB_HINT
    ).to(device)


def build_discriminator(source: str, loss_type: str, device: torch.device) -> CLIPDiscriminator:
    """The vision-aided CLIP discriminator on the vision tower in `source` (--disc-backbone); heads
    trainable, in train mode."""
    disc = _load(
        "discriminator backbone",
        "--disc-backbone",
        source,
        lambda: CLIPDiscriminator.from_pretrained(source, loss_type=loss_type),
        _HUB_HINT,
    )
    disc.requires_grad_heads(True)
    return disc.to(device).train()
