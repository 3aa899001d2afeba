"""DINO-ViT structure distance (Tumanyan et al. 2022), computed as the original img2img-turbo does.

Each image is resized so its short side is 224 (bilinear), turned into a tensor and normalised with
ImageNet mean/std. DINO ViT-B/8 runs on it; the keys of the last block (layer 11), all heads
concatenated per token with CLS included, form a (tokens x 768) matrix whose cosine
self-similarity (tokens x tokens) describes the image's structure. The distance between two images
is the MSE between their self-similarity matrices; a set is reported as the mean over pairs.

Weights: transformers' port of DINO ViT-B/8, hub id `facebook/dino-vitb8`, downloaded on first use
into the Hugging Face cache (`HF_HOME`, default `~/.cache/huggingface`). Tests pass a tiny random
`ViTModel` instead.

Non-224x224 inputs need interpolated position embeddings. DINO interpolates with a scale factor of
(grid + 0.1) / 28 while transformers' ViT interpolates to an exact size, which samples slightly
different points, so the model's embeddings are swapped for `DinoViTEmbeddings` (same parameters,
DINO's interpolation).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms
from tqdm.auto import tqdm
from transformers import ViTModel
from transformers.models.vit.modeling_vit import ViTEmbeddings

from turbo.errors import TurboError

DINO_HUB_ID = "facebook/dino-vitb8"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DINO_SHORT_SIDE = 224
# DINO's ViTs use LayerNorm(eps=1e-6); the hub's DINO configs say transformers' default 1e-12.
DINO_LAYER_NORM_EPS = 1e-6


class DinoStructureInputError(TurboError):
    """Images whose self-similarity matrices cannot be compared, or a DINO model folder that is not there."""


def dino_preprocess() -> transforms.Compose:
    """PIL image -> normalised tensor (3, H', W'), short side 224 (the original's transform)."""
    return transforms.Compose(
        [
            transforms.Resize(DINO_SHORT_SIDE),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


class DinoViTEmbeddings(ViTEmbeddings):
    """ViT embeddings whose position interpolation is DINO's (scale factor with the +0.1 offset)."""

    def interpolate_pos_encoding(self, embeddings: torch.Tensor, height: int, width: int) -> torch.Tensor:
        num_patches = embeddings.shape[1] - 1
        num_positions = self.position_embeddings.shape[1] - 1
        if num_patches == num_positions and height == width:
            return self.position_embeddings
        dim = embeddings.shape[-1]
        side = math.sqrt(num_positions)
        # DINO's offset keeps floor(side * scale) at the wanted grid size despite float error.
        patch = self.patch_size
        if not isinstance(patch, int):
            raise DinoStructureInputError(
                f"DINO's position interpolation needs square patches, got {patch!r}"
            )
        grid_h = height // patch + 0.1
        grid_w = width // patch + 0.1
        patch_pos = self.position_embeddings[:, 1:].reshape(1, int(side), int(side), dim).permute(0, 3, 1, 2)
        patch_pos = F.interpolate(patch_pos, scale_factor=(grid_h / side, grid_w / side), mode="bicubic")
        if patch_pos.shape[-2:] != (int(grid_h), int(grid_w)):
            raise DinoStructureInputError(
                f"position grid {tuple(patch_pos.shape[-2:])} != patch grid {(int(grid_h), int(grid_w))}"
            )
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, -1, dim)
        return torch.cat((self.position_embeddings[:, :1], patch_pos), dim=1)


def use_dino_position_interpolation(model: ViTModel) -> ViTModel:
    """Swap `model.embeddings` (in place) for `DinoViTEmbeddings` with the same parameters."""
    old = model.embeddings
    if isinstance(old, DinoViTEmbeddings):
        return model
    new = DinoViTEmbeddings(model.config, use_mask_token=old.mask_token is not None)
    new.load_state_dict(old.state_dict())
    model.embeddings = new.to(device=old.position_embeddings.device, dtype=old.position_embeddings.dtype)
    return model


def _is_path(name: str) -> bool:
    """Whether `name` cannot be a hub id ("name" or "owner/name") and so names a folder."""
    return os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1


def load_dino_vit(hub_id: str = DINO_HUB_ID, cache_dir: str | None = None) -> ViTModel:
    """DINO ViT from the Hugging Face hub (downloaded once into the HF cache), without pooler.

    LayerNorm eps is set to DINO's 1e-6 whatever the hub config says. A hub_id that can only be a
    path (absolute, relative with "./" or "~", or with more than one "/") must be an existing folder.
    """
    if not os.path.isdir(os.path.expanduser(hub_id)) and _is_path(hub_id):
        raise DinoStructureInputError(
            f"DINO model folder {hub_id} does not exist (pass a folder saved with save_pretrained, or a "
            f"hub id such as {DINO_HUB_ID})"
        )
    if os.path.isdir(os.path.expanduser(hub_id)):
        hub_id = os.path.expanduser(hub_id)
    return ViTModel.from_pretrained(
        hub_id, add_pooling_layer=False, cache_dir=cache_dir, layer_norm_eps=DINO_LAYER_NORM_EPS
    )


def cosine_self_similarity(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(B, T, D) -> (B, T, T) cosine similarities; the norm product is clamped at `eps` (original)."""
    norm = x.norm(dim=-1, keepdim=True)
    factor = torch.clamp(norm @ norm.transpose(1, 2), min=eps)
    return (x @ x.transpose(1, 2)) / factor


class DinoStructureDistance:
    """Structure distance between images from the last ViT block's key self-similarity.

    `model`: a transformers `ViTModel` (its embeddings are swapped in place for DINO's
    interpolation); None loads `hub_id` (a hub id or a local folder) with `load_dino_vit`.
    """

    def __init__(
        self, model: ViTModel | None = None, device: str | torch.device = "cpu", hub_id: str = DINO_HUB_ID
    ):
        if model is None:
            model = load_dino_vit(hub_id)
        self.device = torch.device(device)
        model = use_dino_position_interpolation(model)
        # transformers wraps PreTrainedModel.to with functools.wraps, which mypy does not bind as a
        # method (it takes the device for `self`); the call moves the model in place
        model.to(self.device)  # type: ignore[arg-type]
        self.model = model.eval().requires_grad_(False)
        self.preprocess = dino_preprocess()

    def keys(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Last block's keys, heads concatenated per token, CLS first: (B, 1 + patches, hidden).

        `pixel_values`: preprocessed images (B, 3, H, W) (see `dino_preprocess`). Differentiable
        with respect to `pixel_values`.
        """
        captured: list[torch.Tensor] = []
        # The key projection's output is already (B, T, heads * head_dim) in head-major order,
        # exactly the original's per-token concatenation of the heads' keys.
        key_proj = self.model.layers[-1].attention.k_proj
        handle = key_proj.register_forward_hook(lambda _module, _inp, out: captured.append(out))
        try:
            self.model(pixel_values.to(self.device), interpolate_pos_encoding=True)
        finally:
            handle.remove()
        return captured[0]

    def self_similarity(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Cosine self-similarity of the last block's keys: (B, T, T) in [-1, 1]."""
        return cosine_self_similarity(self.keys(pixel_values))

    def distance(self, img_a: Image.Image, img_b: Image.Image) -> float:
        """MSE between the two images' key self-similarity matrices (0 for identical images).

        Both images must give the same token count (same size after the short-side-224 resize).
        """
        a = self.preprocess(img_a.convert("RGB")).unsqueeze(0)
        b = self.preprocess(img_b.convert("RGB")).unsqueeze(0)
        if a.shape != b.shape:
            raise DinoStructureInputError(
                f"images differ in size after preprocessing: {tuple(a.shape[2:])} vs {tuple(b.shape[2:])}"
            )
        with torch.no_grad():
            sim = self.self_similarity(torch.cat([a, b]))
        return F.mse_loss(sim[1], sim[0]).item()

    def mean_distance(
        self, inputs: Sequence[Image.Image], outputs: Sequence[Image.Image], progress: bool = True
    ) -> float:
        """Mean of `distance` over (input, output) pairs, as the original reports it."""
        if len(inputs) != len(outputs) or not inputs:
            raise DinoStructureInputError(
                f"need equal, non-zero counts, got {len(inputs)} and {len(outputs)}"
            )
        pairs = tqdm(
            zip(inputs, outputs, strict=True), total=len(inputs), desc="DINO structure", disable=not progress
        )
        return float(np.mean([self.distance(a, b) for a, b in pairs]))
