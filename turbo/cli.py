"""`python -m turbo`: translate images, convert original checkpoints, push models to the Hub.

python -m turbo translate --model edge_to_image --input bird.png --output out.png --prompt "a blue bird"
python -m turbo translate --model day_to_night --input photos/ --output nights/
python -m turbo convert model.pkl model.safetensors [--prompt ...] [--overwrite]
python -m turbo push model.safetensors me/day2night [--private] [--message M]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections import Counter
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from turbo.base import DEFAULT_BASE, DTYPES, BaseModelError, resolve_device
from turbo.deprecated_flags import add_renamed
from turbo.errors import TurboError
from turbo.formats import CheckpointError, load_checkpoint, save_checkpoint
from turbo.model_card import DEFAULT_LICENSE
from turbo.model_source import FORMS, model_file, parse_model
from turbo.pipeline import MAX_SEED, PREPROCESS_CHOICES, GammaError, Pipeline, Translation
from turbo.preprocess import (
    EVAL_IMAGE_PREPS,
    ImageError,
    check_canny_thresholds,
    load_image_limited,
    restore_size,
)
from turbo.push import push_model
from turbo.registry import RELEASED

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif"}
# Pillow may be built without a writer for some of them (webp)
OUTPUT_SUFFIXES = sorted(s for s in IMAGE_SUFFIXES if Image.registered_extensions().get(s) in Image.SAVE)


# what the models run on; torch knows more device types (meta, xpu, ...) that cannot run them here
RUNNABLE_DEVICES = ("cpu", "cuda", "mps")


class OutputError(TurboError):
    """An --output that cannot be written, or would overwrite the input or an existing file."""


# argparse types raise ArgumentTypeError with the whole message: for a plain ValueError argparse
# writes "invalid <function name> value", which reads badly for private helpers ("invalid _seed value")
def _whole(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None


def _positive(text: str) -> int:
    value = _whole(text, "a whole number, at least 1")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def _seed(text: str) -> int:
    value = _whole(text, f"a whole number in 0..{MAX_SEED} (2**32 - 1)")
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be in 0..{MAX_SEED} (2**32 - 1), got {text}")
    return value


def _threshold(text: str) -> int:
    # only the form here: the range and low <= high are checked together, as one error line
    return _whole(text, "a whole number in 0..255")


def _gamma(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], got {text!r}") from None


def check_device(device: str | None) -> None:
    """BaseModelError unless `device` (None: the best available) is one the models can run on here:
    cpu, cuda, cuda:N or mps, with its backend present. Checked before the base loads, which takes
    a while; a device such as "meta" would otherwise load and then fail with a traceback."""
    dev = resolve_device(device)  # unknown names, CUDA or MPS missing
    if dev.type not in RUNNABLE_DEVICES:
        raise BaseModelError(
            f"device {device!r} cannot run the models: choose cpu, cuda, cuda:N or mps "
            "(or leave --device out for the best available)"
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m turbo", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("translate", help="translate an image or a folder of images")
    t.add_argument(
        "--model",
        required=True,
        help=f"a checkpoint file, a released model ({', '.join(RELEASED)}), or a Hugging Face Hub id "
        f"({FORMS}), looked for in that order",
    )
    t.add_argument("--input", required=True, type=Path, help="an image file or a folder of images")
    t.add_argument(
        "--output",
        required=True,
        type=Path,
        help=f"output image ({', '.join(OUTPUT_SUFFIXES)}), or a folder for a folder input",
    )
    t.add_argument("--prompt", help="text prompt (paired models need one; unpaired ones use their caption)")
    t.add_argument(
        "--direction", choices=["a2b", "b2a"], help="for unpaired checkpoints (default: the model's)"
    )
    t.add_argument("--gamma", type=_gamma, help="0..1, for stochastic models (sketch default 0.4)")
    t.add_argument(
        "--seed", type=_seed, default=42, help=f"0..{MAX_SEED}, seed of the noise map in stochastic mode"
    )
    t.add_argument("--base", default=DEFAULT_BASE, help="base model: hub id or local diffusers folder")
    t.add_argument("--device", default=None, help="cpu, cuda, cuda:N, mps (default: the best available)")
    t.add_argument(
        "--dtype", choices=list(DTYPES), default=None, help="default: fp16 on cuda, fp32 elsewhere"
    )
    t.add_argument(
        "--preprocess",
        choices=PREPROCESS_CHOICES,
        help="paired models: canny edges, sketch strokes, or the image as given (default: the model's)",
    )
    t.add_argument("--canny-low", type=_threshold, default=100, help="0..255, at most --canny-high")
    t.add_argument("--canny-high", type=_threshold, default=200, help="0..255")
    t.add_argument(
        "--batch-size", type=_positive, default=4, help="folder input: images of one size translated together"
    )
    t.add_argument("--compile", action="store_true", help="torch.compile the networks (slow first image)")
    t.add_argument(
        "--plain", action="store_true", help="run the adapters unfolded, as the original code (slower)"
    )
    t.add_argument(
        "--overwrite",
        action="store_true",
        help="folder input: replace outputs already in the output folder (default: keep them and skip "
        "their inputs)",
    )

    c = sub.add_parser("convert", help="convert an original .pkl checkpoint to turbo's .safetensors")
    c.add_argument("input", type=Path, help="a .pkl (or .safetensors) checkpoint")
    c.add_argument("output", type=Path, help="the .safetensors file to write (not the input)")
    c.add_argument("--overwrite", action="store_true", help="replace the output file if it exists")
    c.add_argument("--prompt", help="default prompt of a paired model")
    c.add_argument("--caption-a", help="unpaired: caption of domain A (used for b2a)")
    c.add_argument("--caption-b", help="unpaired: caption of domain B (used for a2b)")
    c.add_argument(
        "--preprocess", choices=PREPROCESS_CHOICES, help="paired: how the model's inputs are prepared"
    )
    add_renamed(c, "--input-kind", "--preprocess", choices=PREPROCESS_CHOICES)
    c.add_argument("--image-prep", choices=EVAL_IMAGE_PREPS, help="unpaired: image preparation")
    c.add_argument("--base-model", default=DEFAULT_BASE, help="base model id recorded in the file")

    p = sub.add_parser("push", help="upload a model and its model card to the Hugging Face Hub")
    p.add_argument("model", type=Path, help="a turbo .safetensors or original .pkl (uploaded converted)")
    p.add_argument("repo", help="the Hub model repo, owner/name (created if it does not exist)")
    p.add_argument(
        "--private", action="store_true", help="create the repo private (an existing repo keeps its own)"
    )
    p.add_argument("--message", help="commit message (default: 'Upload model.safetensors with turbo')")
    p.add_argument(
        "--run",
        type=Path,
        help="training run folder whose figures, last validation grid and options go into the card "
        "(default: the run the model file is in, RUN/ or RUN/checkpoints/step_N/, if it has metrics.jsonl)",
    )
    p.add_argument("--license", default=DEFAULT_LICENSE, help="license id for the card (default: other)")
    p.add_argument(
        "--dataset", action="append", default=[], help="Hub dataset id the model was trained on (repeatable)"
    )
    return parser


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def output_names(paths: list[Path]) -> dict[Path, str]:
    """The output file name of each input of a folder: `<stem>.png`, or `<stem>_<ext>.png` for inputs
    that share their stem (a.png, a.jpg -> a_png.png, a_jpg.png), with `-2`, `-3`... if that still
    clashes, so no output overwrites another. Clashes ignore case, as macOS and Windows file systems do.
    """
    stems = Counter(p.stem.casefold() for p in paths)
    names: dict[Path, str] = {}
    taken: set[str] = set()
    for path in paths:
        name = path.stem if stems[path.stem.casefold()] == 1 else f"{path.stem}_{path.suffix[1:].lower()}"
        unique, n = name, 1
        while unique.casefold() in taken:
            n += 1
            unique = f"{name}-{n}"
        taken.add(unique.casefold())
        names[path] = f"{unique}.png"
    return names


def check_output(source: Path, output: Path) -> None:
    """Refuse an --output that cannot be written or would overwrite the input (OutputError), before
    any model loads: loading and translating can take minutes."""
    if _same(output, source):
        what = "folder" if source.is_dir() else "file"
        raise OutputError(
            f"--output {output} is the input {what}: the results would overwrite the inputs; "
            f"choose another {what}"
        )
    _check_parent(output)
    if source.is_dir():
        if output.exists() and not output.is_dir():
            raise OutputError(f"--output {output} is a file; a folder of inputs needs an output folder")
        return
    if output.is_dir():
        raise OutputError(
            f"--output {output} is a folder; give an image file, e.g. {output / (source.stem + '.png')}"
        )
    if output.suffix.lower() not in OUTPUT_SUFFIXES:
        raise OutputError(f"--output {output} needs an image extension: one of {', '.join(OUTPUT_SUFFIXES)}")


def _same(a: Path, b: Path) -> bool:
    """Whether a and b name the same file or folder: through symlinks and `..`, and (samefile)
    through hard links, bind mounts and case-insensitive file systems."""
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return False


def _check_parent(output: Path) -> None:
    for parent in output.parents:  # the nearest existing one is where the output gets created
        if parent.exists():
            if not parent.is_dir():
                raise OutputError(f"cannot write {output}: {parent} is a file, not a folder")
            break


def translate(args: argparse.Namespace) -> int:
    # every argument is checked before the base loads: loading and translating can take minutes
    if not args.input.exists():
        raise ImageError(f"no such input: {args.input}")
    if args.gamma is not None and not 0.0 <= args.gamma <= 1.0:
        raise GammaError(f"--gamma must be in [0, 1], got {args.gamma}")
    check_canny_thresholds(args.canny_low, args.canny_high)  # once, not once per image of a folder
    check_device(args.device)
    check_output(args.input, args.output)
    images, kept = _folder_plan(args) if args.input.is_dir() else ([], [])
    source = parse_model(args.model)  # an unknown model fails before the base loads
    if kept and not images:  # nothing left to do: no need to load anything
        _report_kept(kept, args.output)
        print(f"wrote 0 images to {args.output} ({len(kept)} skipped)")
        return 1
    model_file(source)  # downloaded now: a repo that is not there fails before the base loads
    # One model, one direction and one gamma for the whole run: the fold never needs undoing, so it
    # keeps nothing to restore the base from (FastOptions.restore "none").
    pipe = Pipeline(
        args.base, args.device, args.dtype, max_models=1, fast=not args.plain, compile=args.compile,
        restore="none",
    )  # fmt: skip
    info = pipe.load(args.model)
    pipe.pick_prompt(info, args.prompt, args.direction or info.default_direction)  # fail before any work
    kwargs = dict(
        model=args.model, prompt=args.prompt, direction=args.direction, gamma=args.gamma, seed=args.seed,
        canny_low=args.canny_low, canny_high=args.canny_high, preprocess=args.preprocess,
    )  # fmt: skip
    if args.input.is_dir():
        _make_folder(args.output)
        if kept:
            _report_kept(kept, args.output)
        names = output_names(images + kept)  # as _folder_plan named them: the kept ones take their names
        failed, smaller = len(kept), 0
        window = 4 * args.batch_size  # images read at a time, grouped by size into batches
        with tqdm(total=len(images), desc="translating", unit="img") as bar:
            for first in range(0, len(images), window):
                f, s = _translate_window(pipe, images[first : first + window], names, args, kwargs)
                failed, smaller = failed + f, smaller + s
                bar.update(len(images[first : first + window]))
        skipped = f" ({failed} skipped)" if failed else ""
        resized = f"; {smaller} over {pipe.max_side} px translated smaller, resized back" if smaller else ""
        print(f"wrote {len(images) + len(kept) - failed} images to {args.output}{skipped}{resized}")
        return 1 if failed else 0
    image, size = load_image_limited(args.input, pipe.max_side)
    result = pipe.translate(image, **kwargs)
    _make_folder(args.output.parent)
    _save(restore_size(result.image, size), args.output)
    # the downscale itself was logged when the image loaded; say what the file holds
    note = f", resized back from {image.width}x{image.height}" if image.size != size else ""
    print(f"wrote {args.output} ({size[0]}x{size[1]}{note}; {result.seconds:.2f} s)")
    return 0


def _folder_plan(args: argparse.Namespace) -> tuple[list[Path], list[Path]]:
    """The images of the input folder to translate, and those skipped because their output is already
    in the output folder (none with --overwrite): a rerun finishes an interrupted one, and a file
    there, perhaps not ours, is never replaced unasked."""
    images = _images_in(args.input)
    if not images:
        raise ImageError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {args.input}")
    if args.overwrite:
        return images, []
    names = output_names(images)
    kept = [p for p in images if os.path.lexists(args.output / names[p])]  # a dangling link counts too
    return [p for p in images if p not in kept], kept


def _report_kept(kept: list[Path], output: Path) -> None:
    # one line, not one per image: rerunning an interrupted folder of thousands keeps most of them
    shown = ", ".join(p.name for p in kept[:3]) + (", ..." if len(kept) > 3 else "")
    images = f"{len(kept)} image{'s' if len(kept) != 1 else ''}"
    tqdm.write(f"skipped {images} whose output is already in {output} ({shown}); --overwrite replaces them")


def _translate_window(
    pipe: Pipeline, paths: list[Path], names: dict[Path, str], args: argparse.Namespace, kwargs: dict
) -> tuple[int, int]:
    """Translate `paths` in batches, writing each at its own size as `names[path]` in the output
    folder; returns (how many were skipped, how many were translated at a smaller size)."""
    loaded = []
    for path in paths:
        try:
            loaded.append((path, *load_image_limited(path, pipe.max_side)))
        except ImageError as e:
            tqdm.write(f"skipped {path.name}: {e}")
    results: list[Translation | None]
    try:
        images = [im for _, im, _ in loaded]
        results = list(pipe.translate_batch(images, batch_size=args.batch_size, **kwargs))
    except ImageError:  # one bad image: find it by translating one at a time
        results = []
        for path, image, _ in loaded:
            try:
                results.append(pipe.translate(image, **kwargs))
            except ImageError as e:
                tqdm.write(f"skipped {path.name}: {e}")
                results.append(None)
    smaller = written = 0
    for (path, image, size), result in zip(loaded, results, strict=True):
        if result is None:
            continue
        out = args.output / names[path]
        if args.overwrite:
            _save(restore_size(result.image, size), out)
        elif not _save_new(restore_size(result.image, size), out):
            tqdm.write(f"skipped {path.name}: {out} appeared while translating; --overwrite replaces it")
            continue
        written += 1
        smaller += image.size != size
    return len(paths) - written, smaller


def _make_folder(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # permission denied, or a file created in the way since check_output
        raise OutputError(f"cannot create the folder {folder}: {e.strerror or e}") from e


def _save(image: Image.Image, path: Path) -> None:
    try:
        image.save(path)
    except OSError as e:  # permission denied, disk full
        raise OutputError(f"cannot write {path}: {e.strerror or e}") from e


def _save_new(image: Image.Image, path: Path) -> bool:
    """Write image as a PNG at path only if nothing is there (exclusive create, so a file made since
    the folder was listed is not replaced either); False if something is."""
    try:
        with open(path, "xb") as f:
            try:
                image.save(f, format="PNG")
            except BaseException:  # a partial file would pass for a finished one on the next run
                f.close()
                path.unlink(missing_ok=True)
                raise
    except FileExistsError:
        return False
    except OSError as e:  # permission denied, disk full
        raise OutputError(f"cannot write {path}: {e.strerror or e}") from e
    return True


CHECKPOINT_SUFFIX = ".safetensors"


def check_convert_output(source: Path, output: Path, overwrite: bool = False) -> None:
    """Refuse a convert output (OutputError) that is a folder, the input itself (also through a link),
    not a .safetensors name, under a file, or an existing file without overwrite; before the
    input is read."""
    if output.is_dir():
        raise OutputError(
            f"{output} is a folder; give a file name, e.g. {output / (source.stem + CHECKPOINT_SUFFIX)}"
        )
    if _same(output, source):
        raise OutputError(f"{output} is the input file: converting it in place would lose the original")
    if output.suffix.lower() != CHECKPOINT_SUFFIX:
        raise OutputError(
            f"{output} must end in {CHECKPOINT_SUFFIX} (the format written), e.g. "
            f"{output.with_name(output.stem + CHECKPOINT_SUFFIX)}"
        )
    _check_parent(output)
    if os.path.lexists(output) and not overwrite:
        raise OutputError(f"{output} already exists; pass --overwrite to replace it")


def convert(args: argparse.Namespace) -> int:
    if not args.input.exists():
        raise ImageError(f"no such input: {args.input}")
    if args.input.is_dir():
        raise CheckpointError(f"{args.input} is a folder; give the checkpoint file to convert")
    check_convert_output(args.input, args.output, args.overwrite)
    ckpt = load_checkpoint(args.input)  # a released file gets what the original hard-codes for it
    if ckpt.kind == "paired":
        if args.prompt:
            ckpt.prompts["a2b"] = args.prompt
        if args.preprocess:
            ckpt.preprocess = args.preprocess
    else:
        if args.caption_b:
            ckpt.prompts["a2b"] = args.caption_b
        if args.caption_a:
            ckpt.prompts["b2a"] = args.caption_a
        if args.image_prep:
            ckpt.image_prep = args.image_prep
    ckpt.base_model = args.base_model
    try:
        save_checkpoint(ckpt, args.output)
    except OSError as e:  # permission denied, disk full
        raise OutputError(f"cannot write {args.output}: {e.strerror or e}") from e
    print(f"wrote {args.output} ({ckpt.kind}, directions {', '.join(ckpt.directions)})")
    return 0


def push(args: argparse.Namespace) -> int:
    url = push_model(
        args.model, args.repo, private=args.private, message=args.message, run=args.run,
        license=args.license, datasets=args.dataset,
    )  # fmt: skip
    print(f"pushed {args.model} to {args.repo} ({url})")
    return 0


COMMANDS = {"translate": translate, "convert": convert, "push": push}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s: %(message)s"
    )
    try:
        return COMMANDS[args.command](args)
    except TurboError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
