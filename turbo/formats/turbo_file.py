"""Our file format: one `.safetensors` file per model.

Format (version 1): one safetensors file. Tensor keys:
  unet.<module>.lora_A.weight / unet.<module>.lora_B.weight   UNet LoRA (diffusers module names)
  unet.conv_in.weight, unet.conv_in.bias                      the retrained first conv (optional)
  unet.conv_in_pretrained.weight, .bias                       twin conv of diverse-output models
  vae.<direction>.<module>.lora_A.weight / .lora_B.weight     VAE LoRA, per direction (a2b, b2a)
  vae.<direction>.decoder.skip_conv_<i>.weight                skip convs (LoRA on them as above)
Metadata (all strings): format="turbo", format_version="1", kind (paired|unpaired), stochastic
(true|false), rank_unet, alpha_unet, rank_vae, alpha_vae, prompts (JSON: direction -> default
prompt or caption), input (canny|sketch|none|unpaired), image_prep, base_model. The reader takes
only what the writer writes: prompts, input, image_prep and base_model may be absent (defaults),
every other field must be there; ranks must match the LoRA tensors' shapes.
"""

from __future__ import annotations

import json
import os
import re
import stat
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from turbo.formats.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    TurboCheckpoint,
    check_image_prep,
    checked_directions,
    checked_kind,
    checked_preprocess,
    checked_prompts,
    shown,
)


def _file_mode(path: Path) -> int:
    """The permissions open() would leave path with: an existing file's own, else 0o666 less the
    umask (the temp file from mkstemp is 0o600, private to the owner, which a model file should not be)."""
    if path.is_file() and not path.is_symlink():
        return stat.S_IMODE(path.stat().st_mode)
    umask = os.umask(0)  # the only way to read it; set straight back
    os.umask(umask)
    return 0o666 & ~umask


def save_checkpoint(ckpt: TurboCheckpoint, path: str | Path) -> Path:
    """Write `ckpt` as one safetensors file, atomically (temp file in the same folder, then rename),
    with the permissions a plain write would give it."""
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
        "preprocess": ckpt.preprocess,
        "image_prep": ckpt.image_prep or "",
        "base_model": ckpt.base_model,
    }
    mode = _file_mode(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.chmod(tmp, mode)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


# What str(int) writes (int() would also take " 1", "+1", "1_0"); the length bound keeps int() within
# Python's digit limit, and no real rank or version comes near it.
_WHOLE = re.compile(r"[0-9]{1,12}")


def _meta_int(meta: dict[str, str], name: str, path: Path) -> int:
    text = meta[name]
    if not _WHOLE.fullmatch(text):
        raise CheckpointError(
            f"{path}: metadata {name} must be a whole number (at most 12 digits), got {shown(text)}"
        )
    return int(text)


def _meta_float(meta: dict[str, str], name: str, path: Path) -> float:
    try:
        return float(meta[name])
    except ValueError:
        raise CheckpointError(f"{path}: metadata {name} must be a number, got {shown(meta[name])}") from None


def _meta_prompts(meta: dict[str, str], path: Path) -> dict[str, str]:
    text = meta.get("prompts", "{}")
    try:
        prompts = json.loads(text)
    except (ValueError, RecursionError):  # deeply nested JSON overflows the parser's stack
        prompts = None
    if not isinstance(prompts, dict) or not all(isinstance(v, str) for v in prompts.values()):
        raise CheckpointError(
            f"{path}: metadata prompts must be a JSON object of direction -> prompt text, got {shown(text)}"
        )
    return prompts


def load_safetensors(path: Path) -> TurboCheckpoint:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
    if meta.get("format") != "turbo":
        raise CheckpointError(f"{path}: a safetensors file, but not a turbo model (no format=turbo metadata)")
    required = ("format_version", "kind", "stochastic", "rank_unet", "alpha_unet", "rank_vae", "alpha_vae")
    missing = [k for k in required if k not in meta]
    if missing:
        raise CheckpointError(f"{path}: incomplete turbo metadata (no {', '.join(missing)})")
    version = _meta_int(meta, "format_version", path)
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: format version {version} is newer than this turbo ({FORMAT_VERSION})")
    if version < 1:
        raise CheckpointError(f"{path}: metadata format_version must be 1 to {FORMAT_VERSION}, got {version}")
    if meta["stochastic"] not in ("true", "false"):
        raise CheckpointError(
            f"{path}: metadata stochastic must be 'true' or 'false', got {shown(meta['stochastic'])}"
        )
    unet: dict[str, torch.Tensor] = {}
    vae: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        head, _, rest = k.partition(".")
        if head == "unet":
            unet[rest] = v
        elif head == "vae":
            d, _, rest = rest.partition(".")
            vae.setdefault(d, {})[rest] = v
        else:
            raise CheckpointError(f"{path}: unexpected tensor {k!r}")
    rank_unet, alpha_unet = _meta_int(meta, "rank_unet", path), _meta_float(meta, "alpha_unet", path)
    rank_vae, alpha_vae = _meta_int(meta, "rank_vae", path), _meta_float(meta, "alpha_vae", path)
    prompts = _meta_prompts(meta, path)
    image_prep = meta.get("image_prep") or None
    # the labels are narrowed here in validate()'s order, so the first problem found is the same
    where = str(path)
    # files written before the rename to one name per concept call it "input"
    preprocess = checked_preprocess(meta.get("preprocess", meta.get("input", "none")), where)
    kind = checked_kind(meta["kind"], where)
    check_image_prep(image_prep, where)
    ckpt = TurboCheckpoint(
        kind=kind,
        stochastic=meta["stochastic"] == "true",
        rank_unet=rank_unet,
        alpha_unet=alpha_unet,
        rank_vae=rank_vae,
        alpha_vae=alpha_vae,
        unet=unet,
        vae=checked_directions(vae, where),
        prompts=checked_prompts(prompts, where),
        preprocess=preprocess,
        image_prep=image_prep,
        base_model=meta.get("base_model", "stabilityai/sd-turbo"),
        source=where,
    )
    ckpt.validate()
    return ckpt
