"""Model files: our `.safetensors` format (`turbo_file`) and the original img2img-turbo `.pkl` layouts
(`original`), both read into a `TurboCheckpoint` (`checkpoint`).

Imports go one way: `checkpoint` <- `turbo_file`, `original` <- this package's `load_checkpoint`, which
also applies the released files' conventions (`turbo.registry`) to an original file by its name.
"""

from __future__ import annotations

from pathlib import Path

from turbo.formats.checkpoint import (
    DIRECTIONS,
    KINDS,
    CheckpointError,
    TurboCheckpoint,
    file_version,
    is_torch_save,
)
from turbo.formats.original import load_original_pkl
from turbo.formats.turbo_file import load_safetensors, save_checkpoint
from turbo.preprocess import PREPROCESSES
from turbo.registry import apply_released_conventions

__all__ = [
    "DIRECTIONS",
    "PREPROCESSES",
    "KINDS",
    "CheckpointError",
    "TurboCheckpoint",
    "file_version",
    "load_checkpoint",
    "save_checkpoint",
]


def load_checkpoint(path: str | Path) -> TurboCheckpoint:
    """Load our `.safetensors` or one of the original `.pkl` layouts (never full unpickling).

    A released original file (by its released name, e.g. `edge_to_image_loras.pkl`) is fed as the
    original code feeds it: its input preparation and caption come from `turbo.registry`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no such checkpoint file: {path}")
    with open(path, "rb") as f:
        head = f.read(8)
    # Other suffixes are sniffed: safetensors starts with a little-endian u64 header length.
    sniffed = path.suffix != ".pkl" and len(head) == 8 and not is_torch_save(head)
    if path.suffix == ".safetensors" or sniffed:
        return load_safetensors(path)
    ckpt = load_original_pkl(path)
    if apply_released_conventions(ckpt, path.name):
        ckpt.validate()
    return ckpt
