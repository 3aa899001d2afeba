"""`python -m turbo`: translate images, convert original checkpoints.

python -m turbo translate --model edge_to_image --input bird.png --output out.png --prompt "a blue bird"
python -m turbo translate --model day_to_night --input photos/ --output nights/
python -m turbo convert model.pkl model.safetensors [--prompt ...]
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from tqdm import tqdm

from turbo.base import DEFAULT_BASE, DTYPES, BaseModelError
from turbo.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from turbo.download import DownloadError
from turbo.pipeline import GammaError, Pipeline, PromptError
from turbo.preprocess import ImageError, load_image
from turbo.registry import RELEASED, UnknownModelError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif"}
USER_ERRORS = (
    ImageError, CheckpointError, UnknownModelError, PromptError, GammaError, DownloadError, BaseModelError,
    FileNotFoundError, ValueError,
)  # fmt: skip


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m turbo", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("translate", help="translate an image or a folder of images")
    t.add_argument(
        "--model", required=True, help=f"a released model ({', '.join(RELEASED)}) or a checkpoint file"
    )
    t.add_argument("--input", required=True, type=Path, help="an image file or a folder of images")
    t.add_argument("--output", required=True, type=Path, help="output file (or folder, for a folder input)")
    t.add_argument("--prompt", help="text prompt (paired models need one; unpaired ones use their caption)")
    t.add_argument(
        "--direction", choices=["a2b", "b2a"], help="for unpaired checkpoints (default: the model's)"
    )
    t.add_argument("--gamma", type=float, help="0..1, stochastic mode of paired models (sketch default 0.4)")
    t.add_argument("--seed", type=int, default=42, help="seed of the noise map in stochastic mode")
    t.add_argument("--base", default=DEFAULT_BASE, help="base model: hub id or local diffusers folder")
    t.add_argument("--device", default=None, help="cuda, mps, cpu (default: the best available)")
    t.add_argument(
        "--dtype", choices=list(DTYPES), default=None, help="default: fp16 on cuda, fp32 elsewhere"
    )
    t.add_argument(
        "--preprocess",
        choices=["canny", "sketch", "none"],
        help="paired models: canny edges, sketch strokes, or the image as given (default: the model's)",
    )
    t.add_argument("--canny-low", type=int, default=100)
    t.add_argument("--canny-high", type=int, default=200)
    t.add_argument(
        "--batch-size", type=_positive, default=4, help="folder input: images of one size translated together"
    )
    t.add_argument("--compile", action="store_true", help="torch.compile the networks (slow first image)")
    t.add_argument(
        "--plain", action="store_true", help="run the adapters unfolded, as the original code (slower)"
    )

    c = sub.add_parser("convert", help="convert an original .pkl checkpoint to turbo's .safetensors")
    c.add_argument("input", type=Path)
    c.add_argument("output", type=Path)
    c.add_argument("--prompt", help="default prompt of a paired model")
    c.add_argument("--caption-a", help="unpaired: caption of domain A (used for b2a)")
    c.add_argument("--caption-b", help="unpaired: caption of domain B (used for a2b)")
    c.add_argument(
        "--input-kind", choices=["canny", "sketch", "none"], help="paired: how inputs are prepared"
    )
    c.add_argument("--image-prep", help="unpaired: image preparation, e.g. resize_512x512")
    c.add_argument("--base-model", default=DEFAULT_BASE, help="base model id recorded in the file")
    return parser


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def translate(args: argparse.Namespace) -> int:
    if not args.input.exists():
        raise FileNotFoundError(f"no such input: {args.input}")
    if args.gamma is not None and not 0.0 <= args.gamma <= 1.0:
        raise GammaError(f"--gamma must be in [0, 1], got {args.gamma}")
    Pipeline.resolve(args.model)  # an unknown model fails before the base loads
    pipe = Pipeline(
        args.base, args.device, args.dtype, max_models=1, fast=not args.plain, compile=args.compile
    )
    info = pipe.load(args.model)
    pipe.pick_prompt(info, args.prompt, args.direction or info.default_direction)  # fail before any work
    kwargs = dict(
        model=args.model, prompt=args.prompt, direction=args.direction, gamma=args.gamma, seed=args.seed,
        canny_low=args.canny_low, canny_high=args.canny_high, preprocess=args.preprocess,
    )  # fmt: skip
    if args.input.is_dir():
        images = _images_in(args.input)
        if not images:
            raise ImageError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {args.input}")
        args.output.mkdir(parents=True, exist_ok=True)
        failed = 0
        window = 4 * args.batch_size  # images read at a time, grouped by size into batches
        with tqdm(total=len(images), desc="translating", unit="img") as bar:
            for first in range(0, len(images), window):
                failed += _translate_window(pipe, images[first : first + window], args, kwargs)
                bar.update(len(images[first : first + window]))
        print(
            f"wrote {len(images) - failed} images to {args.output}"
            + (f" ({failed} skipped)" if failed else "")
        )
        return 1 if failed else 0
    result = pipe.translate(load_image(args.input, pipe.max_side), **kwargs)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    result.image.save(args.output)
    print(f"wrote {args.output} ({result.seconds:.2f} s)")
    return 0


def _translate_window(pipe: Pipeline, paths: list[Path], args: argparse.Namespace, kwargs: dict) -> int:
    """Translate `paths` in batches, writing `<stem>.png` files; returns how many were skipped."""
    loaded = []
    for path in paths:
        try:
            loaded.append((path, load_image(path, pipe.max_side)))
        except ImageError as e:
            tqdm.write(f"skipped: {e}")
    try:
        results = pipe.translate_batch([im for _, im in loaded], batch_size=args.batch_size, **kwargs)
    except ImageError:  # one bad image: find it by translating one at a time
        results = []
        for _, image in loaded:
            try:
                results.append(pipe.translate(image, **kwargs))
            except ImageError as e:
                tqdm.write(f"skipped: {e}")
                results.append(None)
    for (path, _), result in zip(loaded, results, strict=True):
        if result is not None:
            result.image.save(args.output / f"{path.stem}.png")
    return len(paths) - sum(r is not None for r in results)


def convert(args: argparse.Namespace) -> int:
    ckpt = load_checkpoint(args.input)
    released = next((m for m in RELEASED.values() if m.filename == args.input.name), None)
    if released is not None:  # fill in what the original code hard-codes for its released files
        ckpt.input, ckpt.image_prep = released.preprocess, released.image_prep
        if released.caption:
            ckpt.prompts[released.direction] = released.caption
    if ckpt.kind == "paired":
        if args.prompt:
            ckpt.prompts["a2b"] = args.prompt
        if args.input_kind:
            ckpt.input = args.input_kind
    else:
        if args.caption_b:
            ckpt.prompts["a2b"] = args.caption_b
        if args.caption_a:
            ckpt.prompts["b2a"] = args.caption_a
        if args.image_prep:
            ckpt.image_prep = args.image_prep
    ckpt.base_model = args.base_model
    save_checkpoint(ckpt, args.output)
    print(f"wrote {args.output} ({ckpt.kind}, directions {', '.join(ckpt.directions)})")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s: %(message)s"
    )
    try:
        return translate(args) if args.command == "translate" else convert(args)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
