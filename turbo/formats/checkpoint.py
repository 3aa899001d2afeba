"""A trained turbo model in memory (`TurboCheckpoint`), whatever file it came from, and its checks."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from numbers import Real
from pathlib import Path
from typing import Any, Literal, TypeGuard, TypeVar, get_args

import torch

from turbo.errors import TurboError
from turbo.preprocess import EVAL_IMAGE_PREPS, PREPROCESSES, Preprocess

FORMAT_VERSION = 1
# pix2pix-turbo (paired, prompted) or CycleGAN-Turbo (unpaired, both directions)
Kind = Literal["paired", "unpaired"]
Direction = Literal["a2b", "b2a"]
KINDS: tuple[Kind, ...] = get_args(Kind)
# the input preparation; the literal lives in turbo.preprocess, which checkpoints import from
DIRECTIONS: tuple[Direction, ...] = get_args(Direction)

_T = TypeVar("_T")


class CheckpointError(TurboError):
    """A file that is not a usable checkpoint, with the reason."""


@dataclass
class TurboCheckpoint:
    """Every trained tensor of one model plus what is needed to run it.

    `unet` keys: "<module>.lora_A.weight", "<module>.lora_B.weight", optional "conv_in.weight",
    "conv_in.bias" and, for twin (stochastic) models, "conv_in_pretrained.weight"/".bias".
    `vae[direction]` keys: "<module>.lora_A/B.weight" and "decoder.skip_conv_<i>.weight".
    Paired models have the single direction "a2b".
    """

    kind: Kind
    stochastic: bool
    rank_unet: int
    alpha_unet: float
    rank_vae: int
    alpha_vae: float
    unet: dict[str, torch.Tensor]
    vae: dict[Direction, dict[str, torch.Tensor]]
    prompts: dict[Direction, str] = field(default_factory=dict)
    preprocess: Preprocess = "none"
    image_prep: str | None = None
    base_model: str = "stabilityai/sd-turbo"
    source: str = ""

    @property
    def directions(self) -> list[Direction]:
        return list(self.vae)

    def prompt_for(self, direction: Direction) -> str | None:
        return self.prompts.get(direction) or None

    def validate(self) -> None:
        """Raise CheckpointError (naming `source`) unless every field is usable and the LoRA tensors
        have the ranks the checkpoint states (checked before any layer is built from them)."""
        where = self.source or "checkpoint"
        checked_kind(self.kind, where)
        checked_preprocess(self.preprocess, where)
        check_image_prep(self.image_prep, where)
        checked_directions(self.vae, where)
        if not isinstance(self.stochastic, bool):
            raise CheckpointError(f"{where}: stochastic must be true or false, got {shown(self.stochastic)}")
        checked_prompts(self.prompts, where)
        for name in ("rank_unet", "rank_vae"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise CheckpointError(f"{where}: {name} must be a whole number >= 1, got {shown(value)}")
        for name in ("alpha_unet", "alpha_vae"):
            value = getattr(self, name)
            usable = isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)
            if not usable or value <= 0:
                raise CheckpointError(f"{where}: {name} must be a finite number > 0, got {shown(value)}")
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


# What a reader of untrusted metadata narrows its strings with, before it builds a TurboCheckpoint
# (validate() checks a built one the same way, in the same order, with the same messages).


def is_kind(value: object) -> TypeGuard[Kind]:
    return value in KINDS


def is_preprocess(value: object) -> TypeGuard[Preprocess]:
    return value in PREPROCESSES


def is_direction(value: object) -> TypeGuard[Direction]:
    return value in DIRECTIONS


def _known_directions(vae: dict[Any, _T]) -> TypeGuard[dict[Direction, _T]]:
    return bool(vae) and all(is_direction(d) for d in vae)


def checked_kind(value: object, where: str) -> Kind:
    if not is_kind(value):
        raise CheckpointError(f"{where}: kind must be one of {KINDS}, got {value!r}")
    return value


def checked_preprocess(value: object, where: str) -> Preprocess:
    if not is_preprocess(value):
        raise CheckpointError(f"{where}: preprocess must be one of {PREPROCESSES}, got {value!r}")
    return value


def check_image_prep(value: object, where: str) -> None:
    if value is not None and value not in EVAL_IMAGE_PREPS:
        raise CheckpointError(
            f"{where}: image_prep must be one of {', '.join(EVAL_IMAGE_PREPS)} (deterministic), got {value!r}"
        )


def checked_directions(vae: dict[Any, _T], where: str) -> dict[Direction, _T]:
    """`vae` (direction -> state dict) if it has at least one direction and only known ones."""
    if not _known_directions(vae):
        raise CheckpointError(f"{where}: VAE directions must be among {DIRECTIONS}, got {list(vae)}")
    return vae


def checked_prompts(prompts: object, where: str) -> dict[Direction, str]:
    """`prompts` if it maps known directions to texts."""
    if not isinstance(prompts, dict) or not all(
        k in DIRECTIONS and isinstance(v, str) for k, v in prompts.items()
    ):
        raise CheckpointError(
            f"{where}: prompts must map directions ({', '.join(DIRECTIONS)}) to prompt texts, "
            f"got {shown(prompts)}"
        )
    return prompts


def shown(value: object, limit: int = 60) -> str:
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
