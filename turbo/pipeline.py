"""The cached translation pipeline: one base per process, models loaded once and kept (LRU).

`Pipeline.translate` takes a PIL image and returns the translated PIL image of the same size,
doing the preprocessing each model was trained with (Canny edges, sketch strokes, [-1, 1] photos).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from numbers import Integral
from pathlib import Path
from typing import TypeGuard

import torch
from PIL import Image

from turbo import preprocess as pp
from turbo.base import DEFAULT_BASE, load_base
from turbo.errors import SettingError, TurboError
from turbo.fast.path import FastOptions, FastPath, bf16_is_native
from turbo.formats import CheckpointError, TurboCheckpoint, file_version, load_checkpoint
from turbo.formats.checkpoint import Direction, Kind, is_direction
from turbo.generator import Generator
from turbo.model_source import ModelSource, model_file, parse_model
from turbo.registry import RELEASED

logger = logging.getLogger(__name__)


class PromptError(TurboError):
    """A prompt is missing where the model needs one."""


class SeedError(TurboError):
    """A seed that is not a whole number in 0..MAX_SEED."""


class GammaError(TurboError):
    """A gamma outside [0, 1], or given to a model that has no use for it."""


@dataclass
class ModelInfo:
    """What the app and the CLI need to know about a loaded model."""

    key: str  # released name, or the resolved checkpoint path
    name: str  # what users see
    kind: Kind
    stochastic: bool
    directions: list[Direction]
    preprocess: pp.Preprocess
    image_prep: str | None
    prompts: dict[Direction, str] = field(default_factory=dict)
    default_direction: Direction = "a2b"
    default_gamma: float | None = None
    example_prompt: str | None = None
    version: tuple[int, int] | None = None  # a checkpoint file's (size, mtime_ns) when it was read


@dataclass
class Translation:
    image: Image.Image
    seconds: float
    condition: Image.Image | None  # what the model saw for edge/sketch inputs (for display)
    prompt: str
    direction: Direction
    gamma: float


# A stochastic model's gamma when none is asked for (the released sketch model's, as the original demo).
DEFAULT_GAMMA = 0.4
# Seeds the app and the CLI take: exact in the browser's numbers (doubles), the same in both.
MAX_SEED = 2**32 - 1
# What `preprocess` may override a paired model's input preparation with.
PREPROCESS_CHOICES: tuple[pp.Preprocess, ...] = ("canny", "sketch", "none")


def _check_seed(seed: object) -> int:
    """`seed` as an int if it is a whole number in 0..MAX_SEED (not a bool, not a float); else SeedError."""
    if isinstance(seed, bool) or not isinstance(seed, Integral) or not 0 <= int(seed) <= MAX_SEED:
        raise SeedError(f"seed must be a whole number from 0 to {MAX_SEED}, got {seed!r}")
    return int(seed)


def _is_preprocess_choice(value: object) -> TypeGuard[pp.Preprocess]:
    return value in PREPROCESS_CHOICES


def _check_preprocess(preprocess: object) -> pp.Preprocess | None:
    """`preprocess` if it is None (the model's own) or one of PREPROCESS_CHOICES; else SettingError."""
    if preprocess is not None and not _is_preprocess_choice(preprocess):
        raise SettingError(
            f"preprocess must be one of {', '.join(PREPROCESS_CHOICES)} (or None), got {preprocess!r}"
        )
    return preprocess


def noise_map(seed: int, height: int, width: int) -> torch.Tensor:
    """The stochastic mode's noise z, (1, 4, height/8, width/8), drawn on the cpu so a seed gives
    the same image on every device."""
    g = torch.Generator("cpu").manual_seed(int(seed))
    return torch.randn((1, 4, height // 8, width // 8), generator=g)


def _info_for(source: ModelSource, ckpt: TurboCheckpoint, version: tuple[int, int] | None) -> ModelInfo:
    key = source.key
    released = RELEASED.get(key) if source.kind == "released" else None
    if released is not None:
        direction = released.direction or "a2b"
        prompts = {direction: released.caption} if released.caption else {}
        return ModelInfo(
            key=key, name=key, kind=released.kind, stochastic=released.stochastic, directions=[direction],
            preprocess=released.preprocess, image_prep=released.image_prep, prompts=prompts,
            default_direction=direction, default_gamma=released.default_gamma,
            example_prompt=released.example_prompt,
        )  # fmt: skip
    # a released unpaired file (night2day.pkl) has a caption for the direction it was released for
    name = str(source.hub) if source.hub else Path(key).stem
    default_direction = next((d for d in ckpt.directions if ckpt.prompts.get(d)), ckpt.directions[0])
    return ModelInfo(
        key=key, name=name, kind=ckpt.kind, stochastic=ckpt.stochastic, directions=ckpt.directions,
        preprocess=ckpt.preprocess, image_prep=ckpt.image_prep, prompts=dict(ckpt.prompts),
        default_direction=default_direction, default_gamma=DEFAULT_GAMMA if ckpt.stochastic else None,
        version=version,
    )  # fmt: skip


def _read(source: ModelSource, path: Path) -> TurboCheckpoint:
    """The checkpoint at `path`; a Hub model's messages name its id, not its place in the Hub cache."""
    if source.hub is None:
        return load_checkpoint(path)
    try:
        ckpt = load_checkpoint(path)
    except CheckpointError as e:
        raise CheckpointError(str(e).replace(str(path), f"{source.hub} ({path.name})")) from e
    ckpt.source = str(source.hub)
    return ckpt


class Pipeline:
    """A base model with a bounded, least-recently-used cache of loaded models.

    Thread-safe: translations run one at a time (the lock also guards loading and eviction).
    `fast=True` (the default) runs `turbo.fast.path.FastPath`: the active model's adapters folded into
    the base, the base restored exactly on a switch (`restore`: how, see `FastOptions.restore`);
    `compile=True` adds torch.compile to it.
    """

    def __init__(
        self,
        base: str | Path = DEFAULT_BASE,
        device: str | None = None,
        dtype: str | None = None,
        max_models: int = 4,
        cache_dir: Path | None = None,
        max_side: int = 2048,
        fast: bool = True,
        compile: bool = False,
        restore: str = "auto",
    ):
        if max_models < 1:
            raise SettingError(f"max_models must be at least 1, got {max_models}")
        if max_side < 8:
            raise SettingError(f"max_side must be at least 8 pixels, got {max_side}")
        self.base = load_base(base, device, dtype)
        if self.base.dtype == torch.bfloat16 and not bf16_is_native(self.base.device):
            logger.warning(
                "bf16 asked for, but this %s has no native bf16: expect it to be slow", self.base.device
            )
        self.generator = Generator(self.base).eval()
        options = FastOptions(compile=compile, restore=restore)
        self.fast = FastPath(self.generator, options) if fast else None
        self.max_models = max_models
        self.cache_dir = cache_dir
        self.max_side = max_side
        self.models: OrderedDict[str, ModelInfo] = OrderedDict()
        self._prompts: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.lock = threading.RLock()

    # ---- models ----
    @staticmethod
    def file_key(path: str | Path) -> str:
        """The cache key of a checkpoint file: its absolute path, symbolic links not followed (a
        deleted link can still be named, and a link pointed elsewhere is another version)."""
        return os.path.abspath(Path(path).expanduser())

    @staticmethod
    def resolve(model: str | Path) -> tuple[str, Path | None]:
        """A released name -> (name, None); a checkpoint file -> (`file_key`, path); a Hub id ->
        (the id, None). Reads the model string only (`turbo.model_source.parse_model`: a local file,
        a released name, a Hub id, in that order): nothing is downloaded, so a bad one fails at once."""
        source = parse_model(model)
        return source.key, (Path(source.key) if source.kind == "file" else None)

    def load(self, model: str | Path) -> ModelInfo:
        """Load (or fetch from the cache) a released model, a checkpoint file or a Hub model; a file
        that changed on disk since it was loaded is loaded again. A Hub model is downloaded before
        the lock is taken, so translations go on meanwhile."""
        source = parse_model(model)
        key = source.key
        path = source.path if source.kind == "file" else None
        with self.lock:
            version = file_version(path) if path is not None else None
            info = self.models.get(key)
            if info is not None and info.version == version:
                self.models.move_to_end(key)
                return info
        if path is None:  # released or Hub: download outside the lock
            path = model_file(source, self.cache_dir)
        with self.lock:
            info = self.models.get(key)  # another thread may have loaded it meanwhile
            if info is not None and info.version == version:
                self.models.move_to_end(key)
                return info
            ckpt = _read(source, path)
            # Everything that can fail is done before the generator takes the model, so a failed load
            # leaves nothing behind (a retry would otherwise find the name taken).
            info = _info_for(source, ckpt, version)
            self.unload(key)  # the version read before, if any
            while len(self.models) >= self.max_models:
                oldest = next(iter(self.models))
                logger.info("evicting %s from the model cache", oldest)
                self.unload(oldest)
            self.generator.add_checkpoint(key, ckpt)
            self.models[key] = info
            return info

    def unload(self, key: str) -> None:
        with self.lock:
            self.models.pop(key, None)
            self.generator.remove_model(key)

    # ---- prompts ----
    def prompt_embedding(self, prompt: str) -> torch.Tensor:
        """Text embedding (1, 77, D), cached per prompt (bounded)."""
        emb = self._prompts.get(prompt)
        if emb is None:
            emb = self.base.encode_prompt([prompt])
            self._prompts[prompt] = emb
            if len(self._prompts) > 64:
                self._prompts.popitem(last=False)
        else:
            self._prompts.move_to_end(prompt)
        return emb

    @staticmethod
    def pick_prompt(info: ModelInfo, prompt: str | None, direction: Direction) -> str:
        prompt = (prompt or "").strip() or info.prompts.get(direction)
        if not prompt:
            raise PromptError(f"model {info.name} needs a prompt (describe the image you want)")
        return prompt

    # ---- translation ----
    def prepare(
        self,
        image: Image.Image,
        info: ModelInfo,
        canny_low: int = 100,
        canny_high: int = 200,
        preprocess: str | None = None,
    ) -> tuple[torch.Tensor, Image.Image | None]:
        """PIL image -> model input (1, 3, H, W) (H, W multiples of 8) and the condition image shown
        to users (edges/sketch, or None). `preprocess` overrides a paired model's own preparation."""
        kind = info.preprocess
        override = _check_preprocess(preprocess)
        if override is not None:
            if info.kind != "paired":
                raise SettingError("a preprocessing override applies to paired models only")
            kind = override
        if kind == "unpaired":
            prepped = pp.build_transform(info.image_prep)(image) if info.image_prep else image
            return pp.to_model_input(pp.resize_to_multiple_of_8(prepped), "unpaired"), None
        image = pp.resize_to_multiple_of_8(image)
        if kind == "canny":
            edges = pp.canny_edges(image, canny_low, canny_high)
            return pp.to_model_input(edges, "canny"), pp.invert(edges)
        if kind == "sketch":
            return pp.to_model_input(image, "sketch"), image
        return pp.to_model_input(image, "none"), None

    def _settings(
        self, model: str | Path, prompt: str | None, direction: str | None, gamma: float | None
    ) -> tuple[ModelInfo, Direction, str, float]:
        """Load `model` and resolve (info, direction, prompt, gamma) with the model's defaults."""
        if gamma is not None and not 0.0 <= float(gamma) <= 1.0:
            raise GammaError(f"gamma must be in [0, 1], got {gamma}")
        info = self.load(model)
        wanted = direction or info.default_direction
        if not is_direction(wanted) or wanted not in info.directions:
            raise SettingError(
                f"model {info.name} has no direction {wanted} (it has {', '.join(info.directions)})"
            )
        prompt = self.pick_prompt(info, prompt, wanted)
        if gamma is None:
            gamma = info.default_gamma if info.default_gamma is not None else 1.0
        if not info.stochastic and gamma != 1.0:
            raise GammaError(
                f"model {info.name} translates deterministically: gamma applies to stochastic models "
                "(trained with noise, e.g. sketch_to_image_stochastic) only"
            )
        return info, wanted, prompt, float(gamma)

    def _run(
        self, x: torch.Tensor, emb: torch.Tensor, key: str, direction: Direction, gamma: float, seed: int
    ) -> torch.Tensor:
        """Model inputs (B, 3, H, W) -> outputs in [-1, 1]; every image gets the same noise map."""
        dev = self.base.device
        noise = noise_map(seed, x.shape[2], x.shape[3]).to(dev) if gamma < 1.0 else None
        if self.fast is not None:
            return self.fast(x.to(dev), emb, key, direction, gamma, noise)
        with torch.inference_mode():
            return self.generator(x.to(dev), emb, key, direction, gamma, noise)

    def translate(
        self,
        image: Image.Image | str | Path,
        model: str | Path,
        prompt: str | None = None,
        direction: str | None = None,
        gamma: float | None = None,
        seed: int = 42,
        canny_low: int = 100,
        canny_high: int = 200,
        preprocess: str | None = None,
    ) -> Translation:
        """Translate one image with `model` (released name or checkpoint path).

        gamma in [0, 1] (stochastic mode, paired models; default: the model's, else deterministic);
        the noise map comes from `seed`, a whole number in 0..MAX_SEED (see `noise_map`).
        preprocess: None (the model's own) or one of PREPROCESS_CHOICES, for paired models.
        Returns an image of the input's size.
        """
        return self.translate_batch(
            [image], model, prompt, direction, gamma, seed, canny_low, canny_high, preprocess, batch_size=1
        )[0]

    def translate_batch(
        self,
        images: Sequence[Image.Image | str | Path],
        model: str | Path,
        prompt: str | None = None,
        direction: str | None = None,
        gamma: float | None = None,
        seed: int = 42,
        canny_low: int = 100,
        canny_high: int = 200,
        preprocess: str | None = None,
        batch_size: int = 4,
    ) -> list[Translation]:
        """Translate several images with the same settings, as `translate` does one.

        Images whose model inputs have the same size run together, up to `batch_size` (>= 1) per
        forward; each gets the noise map of `seed`, so results equal one-by-one translation.
        Results come in the order of `images`; `seconds` is the mean time per image.
        """
        if batch_size < 1:
            raise SettingError(f"batch_size must be at least 1, got {batch_size}")
        # before the images and the model load: a wrong argument should not cost a download first
        seed, preprocess = _check_seed(seed), _check_preprocess(preprocess)
        loaded = [
            im if isinstance(im, Image.Image) else pp.load_image(im, max_side=self.max_side) for im in images
        ]
        with self.lock:
            start = time.perf_counter()
            info, wanted, prompt, gamma = self._settings(model, prompt, direction, gamma)
            prepared = [self.prepare(im, info, canny_low, canny_high, preprocess) for im in loaded]
            emb = self.prompt_embedding(prompt)
            by_size: dict[tuple[int, ...], list[int]] = {}
            for i, (x, _) in enumerate(prepared):
                by_size.setdefault(tuple(x.shape[2:]), []).append(i)
            results: list[Image.Image | None] = [None] * len(loaded)
            for indices in by_size.values():
                for first in range(0, len(indices), batch_size):
                    chunk = indices[first : first + batch_size]
                    x = torch.cat([prepared[i][0] for i in chunk])
                    out = self._run(x, emb, info.key, wanted, gamma, seed)
                    for row, i in zip(out, chunk, strict=True):
                        results[i] = pp.restore_size(pp.to_pil(row), loaded[i].size)
            seconds = (time.perf_counter() - start) / max(len(loaded), 1)
            done = [result for result in results if result is not None]
            assert len(done) == len(loaded), "every image belongs to one size group"
            return [
                Translation(result, seconds, cond, prompt, wanted, gamma)
                for result, (_, cond) in zip(done, prepared, strict=True)
            ]


_shared: dict[tuple, Pipeline] = {}
_shared_lock = threading.Lock()


def get_pipeline(
    base: str | Path = DEFAULT_BASE, device: str | None = None, dtype: str | None = None, **kw
) -> Pipeline:
    """The process-wide pipeline for (base, device, dtype): the base loads once per process."""
    key = (str(base), device, dtype)
    with _shared_lock:
        if key not in _shared:
            _shared[key] = Pipeline(base, device, dtype, **kw)
        return _shared[key]
