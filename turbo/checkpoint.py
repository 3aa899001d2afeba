"""Trained models on disk: our `.safetensors` format, and loading of the original `.pkl` files.

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
import math
import os
import re
import stat
import tempfile
from dataclasses import dataclass, field
from numbers import Real
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
        """Raise CheckpointError (naming `source`) unless every field is usable and the LoRA tensors
        have the ranks the checkpoint states (checked before any layer is built from them)."""
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
        if not isinstance(self.stochastic, bool):
            raise CheckpointError(f"{where}: stochastic must be true or false, got {_shown(self.stochastic)}")
        if not isinstance(self.prompts, dict) or not all(
            k in DIRECTIONS and isinstance(v, str) for k, v in self.prompts.items()
        ):
            raise CheckpointError(
                f"{where}: prompts must map directions ({', '.join(DIRECTIONS)}) to prompt texts, "
                f"got {_shown(self.prompts)}"
            )
        for name in ("rank_unet", "rank_vae"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise CheckpointError(f"{where}: {name} must be a whole number >= 1, got {_shown(value)}")
        for name in ("alpha_unet", "alpha_vae"):
            value = getattr(self, name)
            usable = isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)
            if not usable or value <= 0:
                raise CheckpointError(f"{where}: {name} must be a finite number > 0, got {_shown(value)}")
        twin = "conv_in_pretrained.weight" in self.unet
        if self.stochastic and not twin:
            raise CheckpointError(f"{where}: a stochastic model needs conv_in_pretrained weights")
        if twin and not self.stochastic:
            # the twin conv would be silently ignored: the model would run, but not as trained
            raise CheckpointError(f"{where}: conv_in_pretrained weights in a model that is not stochastic")
        if not any(k.endswith(".lora_A.weight") for k in self.unet):
            raise CheckpointError(f"{where}: no UNet LoRA weights")
        _check_ranks(self.unet, self.rank_unet, "rank_unet", "UNet", where)
        for d, sd in self.vae.items():
            if not any(k.startswith("decoder.skip_conv_") and ".lora_" not in k for k in sd):
                raise CheckpointError(f"{where}: direction {d} has no skip-conv weights")
            _check_ranks(sd, self.rank_vae, "rank_vae", f"VAE {d}", where)


def _shown(value: object, limit: int = 60) -> str:
    """repr of a value for an error message, cut short (metadata can be arbitrarily long)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_ranks(sd: dict[str, torch.Tensor], rank: int, name: str, what: str, where: str) -> None:
    """Every LoRA pair in `sd` must have the stated rank: A is (rank, in, ...), B is (out, rank, ...).

    Checked before layers are built: layers are sized by the stated rank, so a wrong (say huge) rank
    would allocate them in full before the weight copy could notice."""
    for k, v in sd.items():
        if ".lora_A." in k or ".lora_B." in k:
            dim = 0 if ".lora_A." in k else 1
            if not isinstance(v, torch.Tensor) or v.dim() < 2 or v.shape[dim] != rank:
                shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
                raise CheckpointError(
                    f"{where}: {what} LoRA weight {k} has shape {shape}, which does not fit {name} = {rank}"
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
        "input": ckpt.input,
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
            f"{path}: metadata {name} must be a whole number (at most 12 digits), got {_shown(text)}"
        )
    return int(text)


def _meta_float(meta: dict[str, str], name: str, path: Path) -> float:
    try:
        return float(meta[name])
    except ValueError:
        raise CheckpointError(f"{path}: metadata {name} must be a number, got {_shown(meta[name])}") from None


def _meta_prompts(meta: dict[str, str], path: Path) -> dict[str, str]:
    text = meta.get("prompts", "{}")
    try:
        prompts = json.loads(text)
    except (ValueError, RecursionError):  # deeply nested JSON overflows the parser's stack
        prompts = None
    if not isinstance(prompts, dict) or not all(isinstance(v, str) for v in prompts.values()):
        raise CheckpointError(
            f"{path}: metadata prompts must be a JSON object of direction -> prompt text, got {_shown(text)}"
        )
    return prompts


def _load_safetensors(path: Path) -> TurboCheckpoint:
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
            f"{path}: metadata stochastic must be 'true' or 'false', got {_shown(meta['stochastic'])}"
        )
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
    ckpt = TurboCheckpoint(
        kind=meta["kind"],
        stochastic=meta["stochastic"] == "true",
        rank_unet=_meta_int(meta, "rank_unet", path),
        alpha_unet=_meta_float(meta, "alpha_unet", path),
        rank_vae=_meta_int(meta, "rank_vae", path),
        alpha_vae=_meta_float(meta, "alpha_vae", path),
        unet=unet,
        vae=vae,
        prompts=_meta_prompts(meta, path),
        input=meta.get("input", "none"),
        image_prep=meta.get("image_prep") or None,
        base_model=meta.get("base_model", "stabilityai/sd-turbo"),
        source=str(path),
    )
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
