"""The Hub model card (README.md) of a turbo model: YAML front matter in the Hub's conventions and a
body that says what the model does, how to run it and how it was trained.

Pure: it builds text from a `TurboCheckpoint` and the training figures given to it; `turbo.push`
gathers those from files and uploads.
"""

from __future__ import annotations

import json
import math
import re
import shlex
from collections.abc import Iterable
from dataclasses import dataclass, field

from huggingface_hub import ModelCard, ModelCardData

from turbo.base import DEFAULT_BASE
from turbo.formats import TurboCheckpoint
from turbo.pipeline import DEFAULT_GAMMA

LIBRARY_NAME = "turbo"
PIPELINE_TAG = "image-to-image"
DEFAULT_LICENSE = "other"  # the weights adapt the base, whose own license applies to them
KIND_TAGS = {"paired": "pix2pix-turbo", "unpaired": "cyclegan-turbo"}
# which way each validation figure is better, for the card's table
BETTER = {"fid": "lower", "dino_struct": "lower", "l2": "lower", "lpips": "lower", "psnr": "higher"}

_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass
class TrainingFigures:
    """What a training run's metrics.jsonl says: the last logged losses and validation values.

    `losses` are the `train/*` scalars without the prefix (train/lr left out), `metrics` the `val/*`
    ones; each with the step it was logged at. `max_steps`: the run's target, when known."""

    step: int
    max_steps: int | None = None
    losses: dict[str, float] = field(default_factory=dict)
    losses_step: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    metrics_step: int | None = None
    trainer: str | None = None  # "training.paired" or "training.unpaired"


def figures_from_metrics(
    lines: Iterable[str], max_steps: int | None = None, up_to: int | None = None
) -> TrainingFigures | None:
    """The last losses and validation values of a metrics.jsonl (one JSON object per line, each with
    "step"), of steps up to `up_to` when given (a checkpoint's figures); None when it holds no step.
    Lines that do not parse are skipped (a run killed mid-write leaves half a line); null values (a
    NaN loss) are left out."""
    step, losses, losses_step, metrics, metrics_step = None, {}, None, {}, None
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if not isinstance(entry, dict) or not isinstance(entry.get("step"), int):
            continue
        at = entry["step"]
        if up_to is not None and at > up_to:
            continue
        step = at if step is None else max(step, at)
        train = {k[6:]: v for k, v in entry.items() if k.startswith("train/") and k != "train/lr"}
        val = {k[4:]: v for k, v in entry.items() if k.startswith("val/")}
        if train:
            losses, losses_step = _numbers(train), at
        if val:
            metrics, metrics_step = _numbers(val), at
    if step is None:
        return None
    return TrainingFigures(step, max_steps, losses, losses_step, metrics, metrics_step)


def _numbers(values: dict) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in values.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }


def is_hub_id(name: str) -> bool:
    """Whether `name` has the form of a Hub model id, owner/name, by huggingface_hub's rules (letters,
    digits, '-', '_', '.'; no '--' or '..'; at most 96 characters); a local path has more parts."""
    return (
        bool(_HUB_ID.fullmatch(name))
        and len(name) <= 96
        and ".." not in name
        and "--" not in name
        and not name.endswith((".", "-", ".git"))
    )


def card_metadata(
    ckpt: TurboCheckpoint,
    *,
    license: str = DEFAULT_LICENSE,
    datasets: list[str] | None = None,
    base_on_hub: bool = True,
) -> ModelCardData:
    """The front matter. `base_model` only when the base is a Hub id (`base_on_hub` False: the model
    was made on a local folder, which the Hub cannot link to). `license`: a Hub license id; "other"
    (the default) names the base's license and links to the base's page."""
    tags = [LIBRARY_NAME, KIND_TAGS[ckpt.kind], "lora", PIPELINE_TAG]
    if ckpt.stochastic:
        tags.append("stochastic")
    base = ckpt.base_model if base_on_hub and is_hub_id(ckpt.base_model) else None
    # "other" asks for a name and a link (the Hub's card spec): the base's license, on its page
    other = license == "other" and base is not None
    return ModelCardData(
        base_model=base,
        base_model_relation="adapter" if base else None,
        pipeline_tag=PIPELINE_TAG,
        library_name=LIBRARY_NAME,
        license=license,
        license_name=f"{base.split('/')[1].lower()}-license" if other and base else None,
        license_link=f"https://huggingface.co/{base}" if other and base else None,
        tags=tags,
        datasets=list(datasets) if datasets else None,
    )


def build_model_card(
    ckpt: TurboCheckpoint,
    repo_id: str,
    *,
    license: str = DEFAULT_LICENSE,
    datasets: list[str] | None = None,
    base_on_hub: bool = True,
    figures: TrainingFigures | None = None,
    grid_file: str | None = None,
    config_file: str | None = None,
    model_file: str = "model.safetensors",
) -> str:
    """The README.md text of `repo_id` holding `ckpt` as `model_file`; `grid_file` / `config_file`:
    the validation grid image and the training options file in the repo, when uploaded."""
    data = card_metadata(ckpt, license=license, datasets=datasets, base_on_hub=base_on_hub)
    name = repo_id.split("/")[-1]
    parts = [f"# {name}", _what(ckpt, base_on_hub), _usage(ckpt, repo_id)]
    if figures is not None or grid_file or config_file:
        parts.append(_training(ckpt, figures, grid_file, config_file))
    parts.append(_files(ckpt, model_file, grid_file, config_file))
    parts.append(_license(ckpt, license, base_on_hub))
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(parts) + "\n")
    return str(card)


def _what(ckpt: TurboCheckpoint, base_on_hub: bool) -> str:
    base = ckpt.base_model
    base_text = f"[{base}](https://huggingface.co/{base})" if base_on_hub and is_hub_id(base) else f"`{base}`"
    if ckpt.kind == "paired":
        lines = [
            f"A **pix2pix-turbo** model (paired image-to-image translation in one step) on {base_text}, "
            "made with turbo: LoRA adapters on the UNet and the VAE plus skip connections from the "
            "encoder to the decoder.",
            "",
            f"- Input: {_INPUT_TEXT.get(ckpt.preprocess, ckpt.preprocess)}",
        ]
        prompt = ckpt.prompt_for("a2b")
        lines.append(f"- Default prompt: `{prompt}`" if prompt else "- Default prompt: none (give one)")
        if ckpt.stochastic:
            lines.append(
                "- Stochastic: gamma in [0, 1] sets how closely the output follows the input: 1 is "
                "deterministic, lower values blend in more of a noise map (the seed picks it) for varied "
                f"outputs; default {DEFAULT_GAMMA}"
            )
        else:
            lines.append("- Deterministic: no gamma")
    else:
        lines = [
            f"A **CycleGAN-Turbo** model (unpaired image-to-image translation in one step) on {base_text}, "
            "made with turbo: LoRA adapters on the UNet and one VAE per direction, with skip connections.",
            "",
        ]
        for d in ckpt.directions:
            caption = ckpt.prompt_for(d)
            what = "domain A to domain B" if d == "a2b" else "domain B to domain A"
            prompt = f", prompt (the output domain's caption) `{caption}`" if caption else ""
            lines.append(f"- `{d}`: {what}{prompt}")
        lines.append(f"- Image preparation: `{ckpt.image_prep or 'no_resize'}`")
    lines.append(f"- LoRA ranks: UNet {ckpt.rank_unet}, VAE {ckpt.rank_vae}")
    return "\n".join(lines)


_INPUT_TEXT = {
    "canny": "an image, turned into Canny edges (low/high thresholds 100/200 by default)",
    "sketch": "a sketch: dark strokes on a light background",
    "none": "the image as given",
}


def _usage(ckpt: TurboCheckpoint, repo_id: str) -> str:
    base = f" --base {shlex.quote(ckpt.base_model)}" if ckpt.base_model != DEFAULT_BASE else ""
    cli = []
    if ckpt.kind == "paired":
        prompt = ckpt.prompt_for("a2b") or "a description of the output"
        gamma = f" --gamma {DEFAULT_GAMMA}" if ckpt.stochastic else ""
        cli.append(
            f"python -m turbo translate --model {repo_id} --input input.png --output output.png "
            f"--prompt {_shell(prompt)}{gamma}{base}"
        )
    else:
        for d in ckpt.directions:
            cli.append(
                f"python -m turbo translate --model {repo_id} --direction {d} --input input.png "
                f"--output output.png{base}"
            )
    app = f"TURBO_MODELS={repo_id} python app.py{base}"
    return "\n".join(
        [
            "## How to use",
            "",
            "With turbo's command line (the model downloads from the Hub on first use):",
            "",
            "```bash",
            *cli,
            "```",
            "",
            "In turbo's app (locally, or in a Space with `TURBO_MODELS` set):",
            "",
            "```bash",
            app,
            "```",
        ]
    )


def _shell(text: str) -> str:
    """`text` as one shell word: in double quotes when nothing in it would be expanded there, else as
    shlex quotes it."""
    if not any(c in text for c in '"$`\\!'):
        return f'"{text}"'
    return shlex.quote(text)


def _training(
    ckpt: TurboCheckpoint, figures: TrainingFigures | None, grid_file: str | None, config_file: str | None
) -> str:
    lines = ["## Training", ""]
    if figures is not None:
        trainer = figures.trainer or f"training.{ckpt.kind}"
        of = f" of {figures.max_steps}" if figures.max_steps and figures.max_steps != figures.step else ""
        steps = f"{figures.step} step{'' if figures.step == 1 else 's'}"
        lines.append(f"Trained with `python -m {trainer}` for {steps}{of}.")
        if figures.losses:
            lines += ["", f"Last losses (step {figures.losses_step}):", ""]
            lines += ["| loss | value |", "| --- | --- |"]
            lines += [f"| {k} | {_fmt(v)} |" for k, v in sorted(figures.losses.items())]
        if figures.metrics:
            lines += [
                "",
                f"Validation (step {figures.metrics_step}):",
                "",
                "| metric | value | better |",
                "| --- | --- | --- |",
            ]
            lines += [f"| {k} | {_fmt(v)} | {_better(k)} |" for k, v in sorted(figures.metrics.items())]
    if grid_file:
        columns = "input, output, target" if ckpt.kind == "paired" else "input, output"
        at = f" at step {figures.metrics_step}" if figures and figures.metrics_step is not None else ""
        lines += ["", f"Validation samples{at} (columns: {columns}):", ""]
        lines.append(f"![validation samples]({grid_file})")
    if config_file:
        lines += ["", f"The training options are in [{config_file}]({config_file})."]
    return "\n".join(lines)


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def _better(metric: str) -> str:
    for prefix, better in BETTER.items():
        if metric == prefix or metric.startswith(prefix + "_"):
            return better
    return ""


def _files(ckpt: TurboCheckpoint, model_file: str, grid_file: str | None, config_file: str | None) -> str:
    lines = [
        "## Files",
        "",
        f"- `{model_file}`: the model in turbo's format (safetensors; its metadata holds the kind, "
        "ranks, prompts and base)",
    ]
    if grid_file:
        lines.append(f"- `{grid_file}`: the last validation samples")
    if config_file:
        lines.append(f"- `{config_file}`: the training options")
    return "\n".join(lines)


def _license(ckpt: TurboCheckpoint, license: str, base_on_hub: bool) -> str:
    base = ckpt.base_model
    where = f"[{base}](https://huggingface.co/{base})" if base_on_hub and is_hub_id(base) else f"`{base}`"
    stated = "" if license == DEFAULT_LICENSE else f" This card states the license `{license}`."
    text = f"These weights adapt {where} and run only with it: its license applies to them.{stated}"
    return "## License\n\n" + text
