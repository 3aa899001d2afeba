"""Evaluation metrics in one place: PSNR here, FID and DINO structure re-exported from their modules."""

from __future__ import annotations

import torch

from training.dino_structure import DinoStructureDistance
from training.fid import FIDExtractor, cached_stats, fid_between, frechet_distance
from turbo.errors import TurboError

__all__ = [
    "DinoStructureDistance",
    "FIDExtractor",
    "cached_stats",
    "fid_between",
    "frechet_distance",
    "mean_psnr",
    "psnr",
]


class PSNRInputError(TurboError):
    """Tensors PSNR cannot compare."""


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Per-image PSNR in dB, shape (B,), of image tensors (B, C, H, W) (or one image (C, H, W)).

    Default `data_range=2.0` is for tensors in [-1, 1]; pass 1.0 for [0, 1], 255.0 for [0, 255].
    PSNR = 10 log10(data_range^2 / MSE), MSE over each image's pixels, computed in float64;
    identical images give +inf.
    """
    if a.shape != b.shape:
        raise PSNRInputError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.dim() not in (3, 4):
        raise PSNRInputError(f"expected (B, C, H, W) or (C, H, W), got {tuple(a.shape)}")
    if a.dim() == 3:
        a, b = a.unsqueeze(0), b.unsqueeze(0)
    mse = (a.double() - b.double()).square().flatten(1).mean(dim=1)
    return 10 * torch.log10(data_range**2 / mse)


def mean_psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> float:
    """Mean over the batch of per-image `psnr` (inf if any pair is identical)."""
    return psnr(a, b, data_range).mean().item()
