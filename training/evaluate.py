"""Evaluating unpaired translation: FID and DINO-ViT structure distance on a dataset's test split.

    python -m training.evaluate --model FILE_NAME_OR_HUB_ID --dataset DIR --direction a2b|b2a [--output DIR]

What is measured, as the original img2img-turbo's training validation does it:

- Inputs: the source domain's test images (test_A for a2b, test_B for b2a), sorted by name, each
  prepared with the validation transform (`--image-prep`, default the model's own preparation) and
  centre-cropped to multiples of 8; outputs are saved as PNG (`samples/00000.png`, ...).
- DINO structure: mean over the images of the distance between the prepared input and its output
  (`training.dino_structure`, DINO ViT-B/8 key self-similarity).
- FID: outputs against the target domain's test images (test_B for a2b) prepared with the same
  transform, with clean-fid's "clean" protocol (`training.fid`). The Fréchet distance's trace term
  is computed from eigenvalues (`training.fid.frechet_distance`), which agrees with scipy's `sqrtm` to ~1e-8
  relative and is several times faster on a cpu.

Results go to `<output>/metrics.json` and `<output>/metrics.md`. Training validation uses this
module with the model being trained: `training.unpaired` the `Evaluator`, `training.paired` the
`PairedEvaluator` (pairs scored against their targets: L2, LPIPS, PSNR, CLIP similarity, FID).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms
from tqdm.auto import tqdm

from training.data import DatasetError, crop_to_multiple_of_8, list_images
from training.dino_structure import DINO_HUB_ID, DinoStructureDistance
from training.fid import FIDExtractor, fid_inception_v3, frechet_distance, stats_from_features
from training.metrics import psnr
from turbo.errors import TurboError, first_line
from turbo.preprocess import EVAL_IMAGE_PREPS, build_transform, load_image, to_model_input, to_pil

logger = logging.getLogger(__name__)

DIRECTIONS = ("a2b", "b2a")
# direction -> (folder of the inputs, folder of the target domain's references)
SPLITS = {"a2b": ("test_A", "test_B"), "b2a": ("test_B", "test_A")}
DEFAULT_IMAGE_PREP = "no_resize"
FID_SHORT_SIDE = 512  # the original paired trainer's --resolution default

Translate = Callable[[torch.Tensor], torch.Tensor]


class EvaluationError(TurboError):
    """A model, dataset or option that cannot be evaluated."""


# --- evaluation ---------------------------------------------------------------------------------


@dataclass
class EvalResult:
    """One direction's scores. fid / dino_structure are None when not computed."""

    direction: str
    num_images: int
    fid: float | None
    dino_structure: float | None
    image_prep: str
    samples: str


def test_files(dataset: str | Path, direction: str) -> tuple[list[Path], list[Path]]:
    """(input files, reference files) of a direction, sorted by name; raises DatasetError if absent."""
    if direction not in SPLITS:
        raise EvaluationError(f"--direction {direction!r} is not one of {', '.join(DIRECTIONS)}")
    root = Path(dataset)
    found = []
    for split in SPLITS[direction]:
        folder = root / split
        if not folder.is_dir():
            raise DatasetError(f"{folder} is missing (evaluation reads the test split)")
        names = list_images(folder)
        if not names:
            raise DatasetError(f"no images in {folder}")
        found.append([folder / n for n in names])
    return found[0], found[1]


def prepare(path: Path, image_prep: str) -> Image.Image:
    """Validation preparation: load as RGB, the image_prep transform, centre crop to multiples of 8."""
    return crop_to_multiple_of_8(build_transform(image_prep)(load_image(path)), path)


class Evaluator:
    """One direction's evaluation on a dataset's test split; build once, `run` per model state.

    The prepared inputs and the references' FID statistics are computed here, once. fid / dino:
    the metric networks, or None to skip that metric. num_images: 0 for all test inputs.
    """

    def __init__(
        self,
        dataset: str | Path,
        direction: str,
        image_prep: str = DEFAULT_IMAGE_PREP,
        fid: FIDExtractor | None = None,
        dino: DinoStructureDistance | None = None,
        num_images: int = 0,
    ) -> None:
        if image_prep not in EVAL_IMAGE_PREPS:  # a random crop or flip would make the figures unrepeatable
            raise EvaluationError(
                f"--image-prep {image_prep!r} is not one of {', '.join(EVAL_IMAGE_PREPS)} (deterministic)"
            )
        if num_images < 0:
            raise EvaluationError(f"--num-images must be 0 (all) or more, got {num_images}")
        inputs, references = test_files(dataset, direction)
        if num_images:
            inputs = inputs[:num_images]
        self.direction, self.image_prep, self.fid, self.dino = direction, image_prep, fid, dino
        self.inputs = [prepare(p, image_prep) for p in inputs]
        self.ref_stats: tuple[np.ndarray, np.ndarray] | None = None
        if fid is not None:
            if len(self.inputs) < 2 or len(references) < 2:
                logger.warning("FID needs at least 2 inputs and 2 references; FID is off")
                self.fid = None
            else:
                refs = [prepare(p, image_prep) for p in references]
                self.ref_stats = stats_from_features(fid.features(refs, "FID reference features"))

    @torch.no_grad()
    def translate_all(
        self, translate: Translate, batch_size: int = 1, progress: bool = True
    ) -> list[Image.Image]:
        """Outputs of `translate` (image batch in [-1, 1] -> image batch in [-1, 1]) for every input.

        Consecutive inputs of equal size are batched together, up to batch_size.
        """
        outputs: list[Image.Image] = []
        bar = tqdm(total=len(self.inputs), desc=f"translating {self.direction}", disable=not progress)
        i = 0
        while i < len(self.inputs):
            group = [self.inputs[i]]
            while len(group) < batch_size and i + len(group) < len(self.inputs):
                if self.inputs[i + len(group)].size != group[0].size:
                    break
                group.append(self.inputs[i + len(group)])
            x = torch.cat([to_model_input(im, "unpaired") for im in group])
            out = translate(x)
            outputs += [to_pil(o) for o in out.float().cpu()]
            i += len(group)
            bar.update(len(group))
        bar.close()
        return outputs

    def run(
        self, translate: Translate, output: str | Path, batch_size: int = 1, progress: bool = True
    ) -> EvalResult:
        """Translate the inputs, save them under `<output>/samples/`, and score them."""
        samples = Path(output) / "samples"
        samples.mkdir(parents=True, exist_ok=True)
        outputs = self.translate_all(translate, batch_size, progress)
        for i, im in enumerate(outputs):
            im.save(samples / f"{i:05d}.png")
        dino = None
        if self.dino is not None:
            dino = self.dino.mean_distance(self.inputs, outputs, progress=progress)
        fid = None
        if self.fid is not None:
            assert self.ref_stats is not None  # FID stays on only once the references' are computed
            mu, sigma = stats_from_features(self.fid.features(outputs, "FID output features"))
            fid = frechet_distance(mu, sigma, *self.ref_stats)
        return EvalResult(self.direction, len(outputs), fid, dino, self.image_prep, str(samples))


class PairedEvaluator:
    """Paired validation (`training.paired`) on a dataset's test split; build once, `run` per model
    state. Each pair's input is translated with its prompt and scored against its target: L2, LPIPS,
    PSNR (dB, images in [-1, 1]), CLIP similarity (with `clip`) and FID (with `fid`, a function
    building the FID network): the outputs against test_B, both resized to 512 on the short side
    (`fid_resize`), as the original's validation; fid_reference: the file caching the targets' FID
    statistics (needed with `fid`). num_images: -1 for all, else the first ones."""

    def __init__(
        self,
        val_set,
        lpips,
        clip=None,
        fid: Callable[[], FIDExtractor] | None = None,
        *,
        num_images: int = -1,
        batch_size: int = 4,
        num_grid: int = 4,
        seed: int = 0,
        fid_reference: Path | None = None,
    ) -> None:
        self.val_set, self.lpips, self.clip, self._fid_factory = val_set, lpips, clip, fid
        self.count = len(val_set) if num_images < 0 else min(num_images, len(val_set))
        # "no_resize" keeps each image's own size: one per batch
        self.batch_size = 1 if val_set.image_prep == "no_resize" else batch_size
        self.num_grid, self.seed, self.fid_reference = num_grid, seed, fid_reference
        self._fid: FIDExtractor | None = None

    @torch.no_grad()
    def run(
        self,
        translate: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor],
        encode: Callable[[list[str]], torch.Tensor],
        device: torch.device,
        autocast: Callable,
        with_noise: bool,
        fid_dir: Path | None,
    ) -> tuple[dict[str, float], list[list[torch.Tensor]]]:
        """(metrics, grid rows input | output | target). translate(x in [0, 1], encode(captions), noise)
        -> output in [-1, 1], run under autocast(); noise (B, 4, h/8, w/8) from a generator seeded with
        `seed` when with_noise, else None. Outputs for FID are written to fid_dir (emptied first)."""
        subset = torch.utils.data.Subset(self.val_set, range(self.count))
        loader = torch.utils.data.DataLoader(subset, batch_size=self.batch_size, shuffle=False, num_workers=0)
        noise_rng = torch.Generator(device="cpu").manual_seed(self.seed)
        sums = {"val/l2": 0.0, "val/lpips": 0.0, "val/psnr": 0.0}
        if self.clip is not None:
            sums["val/clipsim"] = 0.0
        rows: list[list[torch.Tensor]] = []
        written = 0
        if fid_dir is not None:
            # a run resumed from before this step, or a reused output folder, left older images here
            shutil.rmtree(fid_dir, ignore_errors=True)
            fid_dir.mkdir(parents=True)
        for batch in loader:
            x = batch["conditioning_pixel_values"].to(device)
            y = batch["output_pixel_values"].to(device)
            captions = list(batch["caption"])
            emb = encode(captions)
            b, _, h, w = x.shape
            noise = None
            if with_noise:
                noise = torch.randn(b, 4, h // 8, w // 8, generator=noise_rng).to(device)
            with autocast():
                pred = translate(x, emb, noise)
                lp = self.lpips(pred, y.float())
                if self.clip is not None:
                    sums["val/clipsim"] += float(self.clip.similarity(pred, captions).diagonal().sum())
            sums["val/l2"] += float(F.mse_loss(pred, y, reduction="none").flatten(1).mean(1).sum())
            sums["val/lpips"] += float(lp.sum())
            sums["val/psnr"] += float(psnr(pred, y).clamp(max=100).sum())
            for j in range(b):
                if len(rows) < self.num_grid:
                    rows.append([x[j].cpu() * 2 - 1, pred[j].cpu(), y[j].cpu()])
                if fid_dir is not None:
                    to_pil(pred[j]).save(fid_dir / f"val_{written:05d}.png")
                    written += 1
        metrics = {k: v / self.count for k, v in sums.items()}
        if fid_dir is not None and self._fid_factory is not None:
            metrics["val/fid"] = self._fid_score(fid_dir)
        return metrics, rows

    def _fid_score(self, folder: Path) -> float:
        from training.fid import cached_stats

        assert self._fid_factory is not None and self.fid_reference is not None  # FID needs both
        if self._fid is None:
            self._fid = self._fid_factory()
        ref = cached_stats(str(self.val_set.output_folder), self._fid, self.fid_reference, fid_resize)
        mu, sigma = self._fid.compute_stats(str(folder), fid_resize)
        return frechet_distance(mu, sigma, *ref)


def fid_resize(image: np.ndarray) -> np.ndarray:
    """The original's FID preparation of paired targets and outputs alike: short side to 512 (its
    `--resolution`), LANCZOS, before clean-fid's own resize. uint8 (H, W, 3) -> uint8 (h, w, 3)."""
    resize = transforms.Resize(FID_SHORT_SIDE, interpolation=transforms.InterpolationMode.LANCZOS)
    return np.asarray(resize(Image.fromarray(image)))


def write_report(results: Sequence[EvalResult], output: str | Path, model: str = "") -> tuple[Path, Path]:
    """Write `<output>/metrics.json` and a markdown table `<output>/metrics.md`; returns both paths."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    json_path, md_path = output / "metrics.json", output / "metrics.md"
    json_path.write_text(
        json.dumps({"model": model, "results": [asdict(r) for r in results]}, indent=2) + "\n"
    )

    def fmt(v: float | None, scale: float = 1.0) -> str:
        return "-" if v is None else f"{v * scale:.4f}"

    lines = [
        f"Model: `{model}`" if model else "",
        "",
        "| direction | images | FID | DINO structure (x100) | image prep |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r.direction} | {r.num_images} | {fmt(r.fid)} | {fmt(r.dino_structure, 100)} | {r.image_prep} |"
        for r in results
    ]
    md_path.write_text("\n".join(lines).lstrip("\n") + "\n")
    return json_path, md_path


# --- the CLI ------------------------------------------------------------------------------------


def load_fid_weights(path: str) -> dict[str, torch.Tensor]:
    """A FID Inception state dict from a file (.safetensors, or a torch file read with weights_only)."""
    p = Path(path)
    if not p.is_file():
        raise EvaluationError(f"--fid-weights {path}: no such file")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(p)
        else:
            state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # torch and safetensors raise many kinds for a file that is not theirs
        raise EvaluationError(f"--fid-weights {path}: cannot read it ({first_line(e)})") from e
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise EvaluationError(f"--fid-weights {path}: not a state dict (a mapping of names to tensors)")
    return state


def fid_extractor(fid_weights: str | None, device: torch.device) -> FIDExtractor:
    """The FID network with `--fid-weights` (None: the real weights, downloaded once)."""
    if fid_weights is None:
        return FIDExtractor(device=device, progress=False)
    state = load_fid_weights(fid_weights)
    try:
        return FIDExtractor(state_dict=state, device=device, progress=False)
    except RuntimeError as e:  # load_state_dict lists every missing and unexpected key
        expected = fid_inception_v3().state_dict()
        missing, unexpected = len(set(expected) - set(state)), len(set(state) - set(expected))
        reshaped = sum(1 for k, v in state.items() if k in expected and v.shape != expected[k].shape)
        raise EvaluationError(
            f"--fid-weights {fid_weights}: not the FID Inception weights (of its {len(expected)} tensors "
            f"{missing} missing, {reshaped} of another shape; {unexpected} unexpected)"
        ) from e


def build_metrics(
    no_fid: bool, no_dino: bool, dino_model: str, fid_weights: str | None, device: torch.device
) -> tuple[FIDExtractor | None, DinoStructureDistance | None]:
    """The metric networks the flags ask for (None where skipped)."""
    fid = None if no_fid else fid_extractor(fid_weights, device)
    dino = None if no_dino else DinoStructureDistance(device=device, hub_id=dino_model)
    return fid, dino


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model",
        required=True,
        help="a checkpoint file, a released name or a Hub id (owner/repo[@REV][/FILE]), in that order",
    )
    p.add_argument("--dataset", required=True, help="unpaired dataset folder (reads test_A/ and test_B/)")
    p.add_argument("--direction", default=None, choices=DIRECTIONS, help="default: the model's first")
    p.add_argument("--output", default="evaluation", help="folder for samples/, metrics.json, metrics.md")
    p.add_argument(
        "--image-prep", default=None, choices=EVAL_IMAGE_PREPS, help="default: the model's, else no_resize"
    )
    p.add_argument("--num-images", type=int, default=0, help="first N test inputs; 0: all")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument(
        "--base", default=None, help="SD-Turbo hub id or local folder (default stabilityai/sd-turbo)"
    )
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: best available)")
    p.add_argument("--dtype", default=None, choices=("fp32", "fp16", "bf16"))
    p.add_argument("--prompt", default=None, help="caption to use instead of the model's")
    p.add_argument("--no-fid", action="store_true", help="skip FID")
    p.add_argument("--no-dino", action="store_true", help="skip the DINO structure distance")
    p.add_argument("--dino-model", default=DINO_HUB_ID, help="DINO ViT: hub id or local folder")
    p.add_argument("--fid-weights", default=None, help="FID Inception state dict file (default: download)")
    return p


def evaluate_model(args: argparse.Namespace) -> EvalResult:
    """Run the CLI's evaluation (see module doc) and write its report."""
    from turbo.base import DEFAULT_BASE
    from turbo.model_source import model_file
    from turbo.pipeline import Pipeline

    if args.batch_size < 1:
        raise EvaluationError(f"--batch-size must be at least 1, got {args.batch_size}")
    model_file(args.model)  # a bad name, or a Hub repo that is not there, fails before the base loads
    pipe = Pipeline(args.base or DEFAULT_BASE, device=args.device, dtype=args.dtype, max_models=1)
    info = pipe.load(args.model)
    if info.kind != "unpaired":
        raise EvaluationError(f"{args.model} is a {info.kind} model; this evaluation is for unpaired ones")
    direction = args.direction or info.default_direction
    if direction not in info.directions:
        raise EvaluationError(
            f"{info.name} has no direction {direction} (it has {', '.join(info.directions)})"
        )
    prompt = pipe.pick_prompt(info, args.prompt, direction)
    image_prep = args.image_prep or info.image_prep or DEFAULT_IMAGE_PREP
    fid, dino = build_metrics(args.no_fid, args.no_dino, args.dino_model, args.fid_weights, pipe.base.device)
    evaluator = Evaluator(args.dataset, direction, image_prep, fid, dino, args.num_images)
    emb = pipe.prompt_embedding(prompt)

    def translate(x: torch.Tensor) -> torch.Tensor:
        return pipe.generator(x.to(pipe.base.device), emb, info.key, direction)

    result = evaluator.run(translate, args.output, args.batch_size)
    write_report([result], args.output, str(args.model))
    return result


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        result = evaluate_model(args)
    except TurboError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(asdict(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
