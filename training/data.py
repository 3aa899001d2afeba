"""Training datasets in the original img2img-turbo folder layouts, checked up front.

Paired (pix2pix-turbo)::

    root/train_A/x.png  root/train_B/x.png  root/train_prompts.json   (or train_prompts.jsonl)
    root/test_A/...     root/test_B/...     root/test_prompts.json    (or test_prompts.jsonl)

`*_prompts.json` is one object {file name: prompt}; `*_prompts.jsonl` has one object per line with a
file-name key ("file_name", "image" or "name") and a prompt key ("prompt", "text" or "caption").

Unpaired (CycleGAN-Turbo)::

    root/train_A/  root/train_B/  root/test_A/  root/test_B/  root/fixed_prompt_a.txt  root/fixed_prompt_b.txt

Images: .jpg .jpeg .png .bmp .webp .gif (any case); other files are ignored. Images are loaded as
8-bit RGB (grayscale, palette, 16-bit and transparent images are converted; see
`turbo.preprocess.load_image`), then prepared with `turbo.preprocess.build_transform(image_prep)`.
A prepared image whose sides are not multiples of 8 (possible with "no_resize") is centre-cropped
to the largest multiple of 8 per side: the VAE downsamples by 8, and cropping keeps paired pixels
aligned where resizing would blur them.

Randomness (random crops and flips, the unpaired datasets' random picks) comes from a generator seeded
per (seed, epoch, index) when a seed is given, so a resumed run sees the same samples; call
`set_epoch(epoch)` before each epoch (with `persistent_workers=False`, so workers get the new
epoch). Without a seed, each item draws its seed from torch's global RNG (which DataLoader workers
seed). In a paired item the input and the target get the same crop and flip (the original applied
its random transform to each separately, so their crops could differ).

Items' "input_ids" have shape (77,) (a batch stacks to (B, 77)); the original's had (1, 77).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import ExifTags, Image

from turbo.errors import TurboError
from turbo.preprocess import MAX_PIXELS, ImageError, build_transform, load_image

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif")
SPLITS = ("train", "test")
NAME_KEYS = ("file_name", "image", "name")
PROMPT_KEYS = ("prompt", "text", "caption")
MAX_LISTED = 20  # per kind of problem in an error message; DatasetError.problems has them all


class DatasetError(TurboError):
    """A dataset folder that cannot be trained on; `problems` lists every problem found."""

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = problems if problems is not None else [message]


@dataclass
class _Report:
    """Problems grouped by kind, in the order found."""

    title: str
    kinds: dict[str, list[str]] = field(default_factory=dict)

    def add(self, kind: str, item: str) -> None:
        self.kinds.setdefault(kind, []).append(item)

    def raise_if_any(self) -> None:
        if not self.kinds:
            return
        problems = [f"{kind}: {item}" for kind, items in self.kinds.items() for item in items]
        lines = [f"{self.title}: {len(problems)} problem(s)"]
        for kind, items in self.kinds.items():
            lines.append(f"  {kind} ({len(items)}):")
            lines += [f"    - {item}" for item in items[:MAX_LISTED]]
            if len(items) > MAX_LISTED:
                lines.append(f"    ... and {len(items) - MAX_LISTED} more")
        raise DatasetError("\n".join(lines), problems)


def check_all(*checks: Callable[[], object]) -> list:
    """Run every check (a dataset constructor, say) and return their results; if any raised
    DatasetError, raise one that lists every problem of every check, in order."""
    results, failed = [], []
    for check in checks:
        try:
            results.append(check())
        except DatasetError as e:
            failed.append(e)
            results.append(None)
    if failed:
        message = "\n".join(str(e) for e in failed)
        raise DatasetError(message, [p for e in failed for p in e.problems])
    return results


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def list_images(folder: str | os.PathLike[str]) -> list[str]:
    """Sorted names of the image files directly in folder (see IMAGE_EXTENSIONS)."""
    return sorted(e.name for e in os.scandir(folder) if e.is_file() and is_image_file(e.name))


def _loaded_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) of an opened image as `load_image` returns it: turned by its EXIF orientation."""
    try:
        turned = image.getexif().get(ExifTags.Base.Orientation) in (5, 6, 7, 8)
    except Exception:  # load_image ignores an unreadable EXIF block too
        turned = False
    return image.size[::-1] if turned else image.size


def _inspect_image(path: Path) -> tuple[int, int] | str:
    """An image's size (width, height) as loaded if it decodes completely, else what is wrong with it."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            image.verify()  # checksums (PNG's CRCs) that decoding does not check
        if width == 0 or height == 0 or width * height > MAX_PIXELS:
            return f"unusable size {width}x{height}"
        # verify() reads no pixel data (a truncated JPEG passes it): decode every byte, as training
        # will. A JPEG decodes at 1/8 scale here, which still reads its whole stream, several times
        # faster.
        with Image.open(path) as image:
            size = _loaded_size(image)
            image.draft("RGB", (max(1, width // 8), max(1, height // 8)))
            image.load()
    except Exception as exc:  # PIL raises many kinds (OSError, SyntaxError, struct.error, ...)
        return f"{type(exc).__name__}: {exc}"
    return size


def _inspect_images(folder: Path, names: list[str], report: _Report) -> dict[str, tuple[int, int]]:
    """Open, verify and decode each image (a few threads: PIL decodes without the GIL); returns the
    readable ones' sizes (width, height)."""
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        results = list(pool.map(_inspect_image, [folder / name for name in names]))
    sizes = {}
    for name, result in zip(names, results, strict=True):
        if isinstance(result, str):
            report.add("unreadable images", f"{folder / name}: {result}")
        else:
            sizes[name] = result
    return sizes


def _check_sizes(folder: Path, sizes: dict[str, tuple[int, int]], batch_size: int, report: _Report) -> None:
    """What "no_resize" needs of a folder's images (sizes: width, height): sides of at least 8 px and,
    to stack a batch of several, one size after the crop to multiples of 8."""
    for name, size in sizes.items():
        if min(size) < 8:
            report.add("images smaller than 8 px (no_resize)", f"{folder / name}: {size[0]}x{size[1]}")
    if batch_size < 2:
        return
    groups: dict[tuple[int, int], list[str]] = {}
    for name, (w, h) in sizes.items():
        if min(w, h) >= 8:
            groups.setdefault((w - w % 8, h - h % 8), []).append(name)
    if len(groups) > 1:
        kind = (
            f"images of different sizes in {folder} (no_resize keeps each size, cropped to multiples of 8; "
            f"a batch of {batch_size} needs one: use --batch-size 1 or a resizing image preparation)"
        )
        for (w, h), names in sorted(groups.items(), key=lambda g: -len(g[1])):
            report.add(kind, f"{w}x{h}: {len(names)} image(s), e.g. {folder / names[0]}")


def _scan_folder(folder: Path, report: _Report) -> tuple[list[str], list[str]] | None:
    """(image names, other file names) in folder, or None (reported) if it is missing."""
    if not folder.is_dir():
        report.add("missing folders", str(folder))
        return None
    files = sorted(e.name for e in os.scandir(folder) if e.is_file() and not e.name.startswith("."))
    return [n for n in files if is_image_file(n)], [n for n in files if not is_image_file(n)]


# --- prompts ---------------------------------------------------------------------------------------


def _read_json_prompts(path: Path, report: _Report) -> dict[str, str] | None:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        report.add("bad prompt file", f"{path}: cannot read: {exc}")
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        report.add(
            "bad prompt file", f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
        )
        return None
    if not isinstance(data, dict):
        report.add("bad prompt file", f"{path}: expected one JSON object {{file name: prompt}}")
        return None
    prompts = {}
    for name, prompt in data.items():
        if not isinstance(prompt, str):
            report.add("bad prompt file", f"{path}: prompt for {name!r} is not a string")
            continue
        prompts[name] = prompt
    return prompts


def _first_key(obj: dict, keys: tuple[str, ...]) -> str | None:
    return next((k for k in keys if k in obj), None)


def _read_jsonl_prompts(path: Path, report: _Report) -> dict[str, str] | None:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        report.add("bad prompt file", f"{path}: cannot read: {exc}")
        return None
    prompts: dict[str, str] = {}
    first_line: dict[str, int] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            report.add("bad prompt file", f"{where}: invalid JSON at column {exc.colno}: {exc.msg}")
            continue
        if not isinstance(obj, dict):
            report.add("bad prompt file", f"{where}: expected a JSON object")
            continue
        name_key, prompt_key = _first_key(obj, NAME_KEYS), _first_key(obj, PROMPT_KEYS)
        if name_key is None or prompt_key is None:
            missing = [
                f"{what} key (one of {', '.join(keys)})"
                for what, key, keys in (
                    ("file-name", name_key, NAME_KEYS),
                    ("prompt", prompt_key, PROMPT_KEYS),
                )
                if key is None
            ]
            report.add("bad prompt file", f"{where}: no {' and no '.join(missing)}")
            continue
        name, prompt = obj[name_key], obj[prompt_key]
        if not isinstance(name, str) or not isinstance(prompt, str):
            report.add("bad prompt file", f"{where}: file name and prompt must be strings")
            continue
        name = os.path.basename(name)  # a path like "train_A/x.png" names the file x.png
        if name in first_line:
            report.add("bad prompt file", f"{where}: {name!r} already has a prompt (line {first_line[name]})")
            continue
        first_line[name] = number
        prompts[name] = prompt
    return prompts


def _read_prompts(root: Path, split: str, report: _Report) -> dict[str, str] | None:
    json_path, jsonl_path = root / f"{split}_prompts.json", root / f"{split}_prompts.jsonl"
    if json_path.is_file() and jsonl_path.is_file():
        report.add(
            "bad prompt file", f"both {json_path.name} and {jsonl_path.name} exist in {root}; keep one"
        )
        return None
    if json_path.is_file():
        return _read_json_prompts(json_path, report)
    if jsonl_path.is_file():
        return _read_jsonl_prompts(jsonl_path, report)
    report.add("missing prompt file", f"{json_path} (or {jsonl_path.name})")
    return None


# --- paired ----------------------------------------------------------------------------------------


@dataclass
class _PairedScan:
    names: list[str]
    prompts: dict[str, str]


def _scan_paired(root: Path, split: str, image_prep: str | None, batch_size: int = 1) -> _PairedScan:
    _check_split(split)
    report = _Report(f"paired dataset {root}, split {split!r}")
    folder_a, folder_b = root / f"{split}_A", root / f"{split}_B"
    scan_a, scan_b = _scan_folder(folder_a, report), _scan_folder(folder_b, report)
    prompts = _read_prompts(root, split, report)
    names_a, other_a = scan_a if scan_a else ([], [])
    names_b, _ = scan_b if scan_b else ([], [])
    if scan_a and scan_b:
        set_b = set(names_b)
        for name in names_a:
            if name not in set_b:
                report.add(f"images in {folder_a.name} without a partner in {folder_b.name}", name)
        set_a = set(names_a)
        for name in names_b:
            if name not in set_a:
                report.add(f"images in {folder_b.name} without a partner in {folder_a.name}", name)
    if prompts is not None and scan_a:
        for name in names_a:
            if name not in prompts:
                report.add(f"images in {folder_a.name} without a prompt", name)
        set_a, unsupported = set(names_a), set(other_a)
        for name in prompts:
            if name in unsupported:
                report.add("prompts whose image is missing", f"{name} (unsupported file type)")
            elif name not in set_a:
                report.add("prompts whose image is missing", f"{name} (not in {folder_a.name})")
    if scan_a and scan_b and not names_a and not names_b:
        report.add("empty split", f"no images in {folder_a} or {folder_b}")
    sizes_a = _inspect_images(folder_a, names_a, report)
    sizes_b = _inspect_images(folder_b, names_b, report)
    if image_prep == "no_resize":
        # Only "no_resize" keeps sizes; every other preparation makes both sides the same size.
        for name, size in sizes_a.items():
            if name in sizes_b and sizes_b[name] != size:
                other = sizes_b[name]
                report.add(
                    "pairs of different sizes (no_resize keeps sizes)",
                    f"{name}: {size[0]}x{size[1]} vs {other[0]}x{other[1]}",
                )
        _check_sizes(folder_a, sizes_a, batch_size, report)
    report.raise_if_any()
    present = set(names_a)
    order = [name for name in (prompts or {}) if name in present]
    return _PairedScan(order, prompts or {})


def check_paired_dataset(
    root: str | os.PathLike, split: str = "train", image_prep: str | None = None, batch_size: int = 1
) -> None:
    """Check a paired dataset split; raise DatasetError listing EVERY problem found.

    Checks: folders and prompt file present, prompt file valid (JSON errors with line numbers),
    every image in A has a partner in B and vice versa, every image has a prompt and every prompt an
    image, every image opens, verifies and decodes completely, the split is not empty. With
    image_prep="no_resize", also that partners have equal sizes of at least 8 px and, with a
    batch_size over 1, that all pairs have one size (after the crop to multiples of 8).
    """
    _scan_paired(Path(root), split, image_prep, batch_size)


def _item_seed(seed: int | None, epoch: int, index: int) -> int:
    """A 63-bit seed for one item: from (seed, epoch, index), or from torch's global RNG."""
    if seed is None:
        return int(torch.randint(0, 2**62, (1,)).item())
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def crop_to_multiple_of_8(image: Image.Image, name: str | os.PathLike | None = None) -> Image.Image:
    """Centre-crop each side down to a multiple of 8 (no-op if already); sides under 8 px raise
    DatasetError (naming the image's file `name` if given)."""
    width, height = image.size
    if width < 8 or height < 8:
        where = f"{name}: " if name is not None else ""
        raise DatasetError(
            f"{where}image is too small after preparation: {width}x{height}, each side must be >= 8"
        )
    new_w, new_h = width - width % 8, height - height % 8
    if (new_w, new_h) == (width, height):
        return image
    left, top = (width - new_w) // 2, (height - new_h) // 2
    return image.crop((left, top, left + new_w, top + new_h))


def _prepare(
    transform: Callable[[Image.Image], Image.Image], image: Image.Image, seed: int, path: Path
) -> Image.Image:
    """Apply a (possibly random) torchvision transform with its randomness fixed by seed.

    The same seed on same-sized images gives the same crop and flip; torch's global RNG is left as
    it was. path: the image's file, for messages.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        image = transform(image)
    return crop_to_multiple_of_8(image, path)


def _tokenize(tokenizer, caption: str) -> torch.Tensor:
    return tokenizer(
        caption,
        max_length=tokenizer.model_max_length,
        padding="max_length",
        truncation=True,
        return_tensors="pt",
    ).input_ids[0]


def _load(path: Path, split: str) -> Image.Image:
    try:
        return load_image(path)
    except ImageError as exc:
        what = {"train": "training"}.get(split, split)
        raise DatasetError(f"cannot load {what} image: {exc}") from exc  # exc names the file


class _SplitDataset(torch.utils.data.Dataset):
    """What both datasets share: one split of a dataset folder, its preparation and its randomness."""

    def __init__(
        self, root: str | os.PathLike, split: str, image_prep: str, tokenizer, seed: int | None
    ) -> None:
        super().__init__()
        _check_split(split)
        self.root = Path(root)
        self.split = split
        self.image_prep = image_prep
        self.transform = build_transform(image_prep)
        self.tokenizer = tokenizer
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass's random choices (crops, flips, picks) those of this epoch (only used
        with a seed)."""
        self.epoch = epoch


class PairedDataset(_SplitDataset):
    """Paired samples (input image, target image, prompt), as the original's PairedDataset.

    Items: "conditioning_pixel_values" (3, H, W) in [0, 1]; "output_pixel_values" (3, H, W) in
    [-1, 1]; "caption" (str); "input_ids" (77,) if a tokenizer is given. Input and target get the
    same random crop/flip. check=True runs check_paired_dataset first (with batch_size: the
    training batch, which with "no_resize" needs pairs of one size).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str,
        image_prep: str,
        tokenizer=None,
        *,
        seed: int | None = None,
        check: bool = True,
        batch_size: int = 1,
    ) -> None:
        super().__init__(root, split, image_prep, tokenizer, seed)
        if check:
            scan = _scan_paired(self.root, split, image_prep, batch_size)
        else:
            report = _Report(f"paired dataset {self.root}, split {split!r}")
            prompts = _read_prompts(self.root, split, report) or {}
            report.raise_if_any()
            scan = _PairedScan(list(prompts), prompts)
        self.names = scan.names
        self.prompts = scan.prompts
        self.input_folder = self.root / f"{split}_A"
        self.output_folder = self.root / f"{split}_B"

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> dict:
        name = self.names[index]
        paths = self.input_folder / name, self.output_folder / name
        source, target = (_load(p, self.split) for p in paths)
        item_seed = _item_seed(self.seed, self.epoch, index)
        source = _prepare(self.transform, source, item_seed, paths[0])
        target = _prepare(self.transform, target, item_seed, paths[1])
        if source.size != target.size:
            raise DatasetError(
                f"{name}: input {source.size[0]}x{source.size[1]} and target"
                f" {target.size[0]}x{target.size[1]} differ in size after {self.image_prep!r}"
            )
        caption = self.prompts[name]
        item = {
            "output_pixel_values": TF.normalize(TF.to_tensor(target), mean=[0.5], std=[0.5]),
            "conditioning_pixel_values": TF.to_tensor(source),
            "caption": caption,
        }
        if self.tokenizer is not None:
            item["input_ids"] = _tokenize(self.tokenizer, caption)
        return item


# --- unpaired --------------------------------------------------------------------------------------


@dataclass
class _UnpairedScan:
    names_a: list[str]
    names_b: list[str]
    caption_a: str
    caption_b: str


def _read_caption(path: Path, report: _Report) -> str:
    if not path.is_file():
        report.add("missing caption files", str(path))
        return ""
    try:
        caption = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        report.add("unreadable caption files", f"{path}: {exc}")
        return ""
    if not caption:
        report.add("empty caption files", str(path))
    return caption


def _scan_unpaired(
    root: Path,
    split: str,
    verify: bool,
    image_prep: str | None = None,
    batch_size: int = 1,
    captions: bool = True,
) -> _UnpairedScan:
    _check_split(split)
    report = _Report(f"unpaired dataset {root}, split {split!r}")
    folder_a, folder_b = root / f"{split}_A", root / f"{split}_B"
    scan_a, scan_b = _scan_folder(folder_a, report), _scan_folder(folder_b, report)
    caption_a = _read_caption(root / "fixed_prompt_a.txt", report) if captions else ""
    caption_b = _read_caption(root / "fixed_prompt_b.txt", report) if captions else ""
    names_a = scan_a[0] if scan_a else []
    names_b = scan_b[0] if scan_b else []
    for folder, scan in ((folder_a, scan_a), (folder_b, scan_b)):
        if scan is not None and not scan[0]:
            report.add("empty split", f"no images in {folder}")
    if verify:
        sizes_a = _inspect_images(folder_a, names_a, report)
        sizes_b = _inspect_images(folder_b, names_b, report)
        if image_prep == "no_resize":  # every other preparation gives one size, 256 px or more
            _check_sizes(folder_a, sizes_a, batch_size, report)
            _check_sizes(folder_b, sizes_b, batch_size, report)
    report.raise_if_any()
    return _UnpairedScan(names_a, names_b, caption_a, caption_b)


def check_unpaired_dataset(
    root: str | os.PathLike,
    split: str = "train",
    image_prep: str | None = None,
    batch_size: int = 1,
    captions: bool = True,
) -> None:
    """Check an unpaired dataset split; raise DatasetError listing EVERY problem found.

    Checks: both folders present and non-empty, both caption files present, readable and not
    empty (captions=False: not checked, as for a test split checked after the training split),
    every image opens, verifies and decodes completely. A and B may differ in size and number.
    With image_prep="no_resize", also that every image has sides of at least 8 px and, with a
    batch_size over 1, that each domain's images have one size (after the crop to multiples of 8).
    """
    _scan_unpaired(Path(root), split, True, image_prep, batch_size, captions)


class UnpairedDataset(_SplitDataset):
    """Unpaired samples, as the original's UnpairedDataset.

    Length len(A) + len(B); item i takes source image A[i] if i < len(A) else a random A image, and
    always a random B image. Items: "pixel_values_src", "pixel_values_tgt" (3, H, W) in [-1, 1];
    "caption_src", "caption_tgt" (the fixed prompts); "input_ids_src", "input_ids_tgt" (77,) if a
    tokenizer is given. With a seed, the random picks and crops depend only on (seed, epoch, index).
    check=True runs check_unpaired_dataset first (with image_prep and batch_size: with "no_resize",
    images need sides of 8 px or more and, to batch several, one size per domain).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str,
        image_prep: str,
        tokenizer=None,
        *,
        seed: int | None = None,
        check: bool = True,
        batch_size: int = 1,
    ) -> None:
        super().__init__(root, split, image_prep, tokenizer, seed)
        scan = _scan_unpaired(self.root, split, verify=check, image_prep=image_prep, batch_size=batch_size)
        self.source_folder = self.root / f"{split}_A"
        self.target_folder = self.root / f"{split}_B"
        self.names_src, self.names_tgt = scan.names_a, scan.names_b
        self.caption_src, self.caption_tgt = scan.caption_a, scan.caption_b
        if tokenizer is not None:
            self.input_ids_src = _tokenize(tokenizer, self.caption_src)
            self.input_ids_tgt = _tokenize(tokenizer, self.caption_tgt)

    def __len__(self) -> int:
        return len(self.names_src) + len(self.names_tgt)

    def __getitem__(self, index: int) -> dict:
        rng = np.random.default_rng(_item_seed(self.seed, self.epoch, index))
        src_index = index if index < len(self.names_src) else int(rng.integers(len(self.names_src)))
        tgt_index = int(rng.integers(len(self.names_tgt)))
        seed_src, seed_tgt = (int(s) for s in rng.integers(0, 2**62, size=2))
        src_path = self.source_folder / self.names_src[src_index]
        tgt_path = self.target_folder / self.names_tgt[tgt_index]
        source = _prepare(self.transform, _load(src_path, self.split), seed_src, src_path)
        target = _prepare(self.transform, _load(tgt_path, self.split), seed_tgt, tgt_path)
        item = {
            "pixel_values_src": TF.normalize(TF.to_tensor(source), mean=[0.5], std=[0.5]),
            "pixel_values_tgt": TF.normalize(TF.to_tensor(target), mean=[0.5], std=[0.5]),
            "caption_src": self.caption_src,
            "caption_tgt": self.caption_tgt,
        }
        if self.tokenizer is not None:
            item["input_ids_src"] = self.input_ids_src.clone()
            item["input_ids_tgt"] = self.input_ids_tgt.clone()
        return item
