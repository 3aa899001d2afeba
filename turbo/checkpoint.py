"""Trained models on disk: our `.safetensors` format, and loading of the original `.pkl` files.

Format (version 1): one safetensors file. Tensor keys:
  unet.<module>.lora_A.weight / unet.<module>.lora_B.weight   UNet LoRA (diffusers module names)
  unet.conv_in.weight, unet.conv_in.bias                      the retrained first conv (optional)
  unet.conv_in_pretrained.weight, .bias                       twin conv of diverse-output models
  vae.<direction>.<module>.lora_A.weight / .lora_B.weight     VAE LoRA, per direction (a2b, b2a)
  vae.<direction>.decoder.skip_conv_<i>.weight                skip convs (LoRA on them as above)
Metadata (all strings): format="turbo", format_version="1", kind (paired|unpaired), stochastic
(true|false), rank_unet, alpha_unet, rank_vae, alpha_vae, prompts (JSON: direction -> default
prompt or caption), input (canny|sketch|none|unpaired), image_prep, base_model.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from turbo.preprocess import EVAL_IMAGE_PREPS

FORMAT_VERSION = 1
KINDS = ("paired", "unpaired")
INPUTS = ("canny", "sketch", "none", "unpaired")
DIRECTIONS = ("a2b", "b2a")


class CheckpointError(ValueError):
    """A file that is not a usable checkpoint, with the reason."""


@dataclass
class TurboCheckpoint:
    """Every trained tensor of one model plus what is needed to run it.

    `unet` keys: "<module>.lora_A.weight", "<module>.lora_B.weight", optional "conv_in.weight",
    "conv_in.bias" and, for twin (stochastic) models, "conv_in_pretrained.weight"/".bias".
    `vae[direction]` keys: "<module>.lora_A/B.weight" and "decoder.skip_conv_<i>.weight".
    Paired models have the single direction "a2b".
    """

    kind: str
    stochastic: bool
    rank_unet: int
    alpha_unet: float
    rank_vae: int
    alpha_vae: float
    unet: dict[str, torch.Tensor]
    vae: dict[str, dict[str, torch.Tensor]]
    prompts: dict[str, str] = field(default_factory=dict)
    input: str = "none"
    image_prep: str | None = None
    base_model: str = "stabilityai/sd-turbo"
    source: str = ""

    @property
    def directions(self) -> list[str]:
        return list(self.vae)

    def prompt_for(self, direction: str) -> str | None:
        return self.prompts.get(direction) or None

    def validate(self) -> None:
        where = self.source or "checkpoint"
        if self.kind not in KINDS:
            raise CheckpointError(f"{where}: kind must be one of {KINDS}, got {self.kind!r}")
        if self.input not in INPUTS:
            raise CheckpointError(f"{where}: input must be one of {INPUTS}, got {self.input!r}")
        if self.image_prep is not None and self.image_prep not in EVAL_IMAGE_PREPS:
            raise CheckpointError(
                f"{where}: image_prep must be one of {', '.join(EVAL_IMAGE_PREPS)} (deterministic), "
                f"got {self.image_prep!r}"
            )
        if not self.vae or any(d not in DIRECTIONS for d in self.vae):
            raise CheckpointError(f"{where}: VAE directions must be among {DIRECTIONS}, got {list(self.vae)}")
        if self.stochastic and "conv_in_pretrained.weight" not in self.unet:
            raise CheckpointError(f"{where}: a stochastic model needs conv_in_pretrained weights")
        if not any(k.endswith(".lora_A.weight") for k in self.unet):
            raise CheckpointError(f"{where}: no UNet LoRA weights")
        for d, sd in self.vae.items():
            if not any(k.startswith("decoder.skip_conv_") and ".lora_" not in k for k in sd):
                raise CheckpointError(f"{where}: direction {d} has no skip-conv weights")


def save_checkpoint(ckpt: TurboCheckpoint, path: str | Path) -> Path:
    """Write `ckpt` as one safetensors file, atomically (temp file in the same folder, then rename)."""
    ckpt.validate()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"unet.{k}": v for k, v in ckpt.unet.items()}
    for d, sd in ckpt.vae.items():
        tensors.update({f"vae.{d}.{k}": v for k, v in sd.items()})
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    meta = {
        "format": "turbo",
        "format_version": str(FORMAT_VERSION),
        "kind": ckpt.kind,
        "stochastic": "true" if ckpt.stochastic else "false",
        "rank_unet": str(ckpt.rank_unet),
        "alpha_unet": repr(float(ckpt.alpha_unet)),
        "rank_vae": str(ckpt.rank_vae),
        "alpha_vae": repr(float(ckpt.alpha_vae)),
        "prompts": json.dumps(ckpt.prompts),
        "input": ckpt.input,
        "image_prep": ckpt.image_prep or "",
        "base_model": ckpt.base_model,
    }
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _load_safetensors(path: Path) -> TurboCheckpoint:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
    if meta.get("format") != "turbo":
        raise CheckpointError(f"{path}: a safetensors file, but not a turbo model (no format=turbo metadata)")
    version = int(meta.get("format_version", "0"))
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: format version {version} is newer than this turbo ({FORMAT_VERSION})")
    unet, vae = {}, {}
    for k, v in tensors.items():
        head, _, rest = k.partition(".")
        if head == "unet":
            unet[rest] = v
        elif head == "vae":
            d, _, rest = rest.partition(".")
            vae.setdefault(d, {})[rest] = v
        else:
            raise CheckpointError(f"{path}: unexpected tensor {k!r}")
    try:
        ckpt = TurboCheckpoint(
            kind=meta["kind"],
            stochastic=meta.get("stochastic") == "true",
            rank_unet=int(meta["rank_unet"]),
            alpha_unet=float(meta["alpha_unet"]),
            rank_vae=int(meta["rank_vae"]),
            alpha_vae=float(meta["alpha_vae"]),
            unet=unet,
            vae=vae,
            prompts=json.loads(meta.get("prompts") or "{}"),
            input=meta.get("input", "none"),
            image_prep=meta.get("image_prep") or None,
            base_model=meta.get("base_model", "stabilityai/sd-turbo"),
            source=str(path),
        )
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{path}: incomplete turbo metadata ({e})") from e
    ckpt.validate()
    return ckpt


def file_version(path: Path) -> tuple[int, int] | None:
    """(size, mtime in ns) of a file, what tells a replaced checkpoint from the one read before (an
    mtime in seconds can miss two writes within its resolution); None when it is gone."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def is_torch_save(head: bytes) -> bool:
    """Whether a file starting with `head` is a torch.save file: a zip archive ("PK") or, for older
    files, a pickle (protocol 2 and up start with 0x80)."""
    return head[:2] == b"PK" or head[:1] == b"\x80"


def load_checkpoint(path: str | Path) -> TurboCheckpoint:
    """Load our `.safetensors` or one of the original `.pkl` layouts (never full unpickling)."""
    from turbo.original_checkpoint import load_original_pkl

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no such checkpoint file: {path}")
    with open(path, "rb") as f:
        head = f.read(8)
    # Other suffixes are sniffed: safetensors starts with a little-endian u64 header length.
    sniffed = path.suffix != ".pkl" and len(head) == 8 and not is_torch_save(head)
    if path.suffix == ".safetensors" or sniffed:
        return _load_safetensors(path)
    return load_original_pkl(path)
