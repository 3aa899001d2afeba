"""Uploading a turbo model to the Hugging Face Hub: the model file, its card, the training files.

A repo holds one model as `model.safetensors` (our format: an original `.pkl` is converted first, so
what the Hub serves carries its kind, prompts and base), `README.md` (the card, `turbo.model_card`),
and from a training run `validation.png` (the last validation grid) and `training_config.json`.
Everything goes in one commit through `huggingface_hub` (`create_repo`, `create_commit`); the token
is huggingface_hub's own (`hf auth login`, or `HF_TOKEN`).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import httpx2
from huggingface_hub import CommitOperationAdd, HfApi, get_token
from huggingface_hub.errors import HfHubHTTPError, HFValidationError, OfflineModeIsEnabled
from huggingface_hub.utils import validate_repo_id
from safetensors import SafetensorError, safe_open

from turbo.errors import TurboError, first_line
from turbo.formats import TurboCheckpoint, load_checkpoint, save_checkpoint
from turbo.model_card import (
    DEFAULT_LICENSE,
    TrainingFigures,
    build_model_card,
    figures_from_metrics,
    is_hub_id,
)

logger = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
CARD_FILE = "README.md"
GRID_FILE = "validation.png"
CONFIG_FILE = "training_config.json"
METRICS_FILE = "metrics.jsonl"  # written by training.runtime in the run folder
LOGIN_HINT = "run `hf auth login` or set HF_TOKEN to a token with write access"


class PushError(TurboError):
    """A push that cannot start (repo id, token, model file) or an upload the Hub refused or lost."""


def check_repo_id(repo_id: str, what: str = "repo id") -> str:
    """`repo_id` if it is a Hub model id of the form owner/name, else PushError (no request made)."""
    if not isinstance(repo_id, str) or not is_hub_id(repo_id):
        raise PushError(
            f"{what} {repo_id!r} is not a Hub repo id: give owner/name (letters, digits, '-', '_' and '.', "
            "no '--' or '..', at most 96 characters), e.g. me/day2night"
        )
    return repo_id


def check_dataset_id(dataset: str, what: str = "--dataset") -> str:
    """`dataset` if huggingface_hub takes it as a dataset id ("name" or "owner/name"), else PushError."""
    try:
        validate_repo_id(dataset)
    except HFValidationError:
        raise PushError(f"{what} {dataset!r} is not a Hub dataset id (owner/name)") from None
    return dataset


def check_token() -> str:
    """The Hub token huggingface_hub would send (HF_TOKEN, else the one `hf auth login` saved), or
    PushError: without one nothing can be uploaded, and saying so up front saves a failed request."""
    token = get_token()
    if not token:
        raise PushError(f"not logged in to the Hugging Face Hub: {LOGIN_HINT}")
    return token


@dataclass
class RunFiles:
    """What a training run adds to a push: its figures, its last validation grid, its options."""

    figures: TrainingFigures | None = None
    grid: Path | None = None
    config: dict = field(default_factory=dict)


def read_run(run: str | Path, config: dict | None = None, step: int | None = None) -> RunFiles:
    """The figures (metrics.jsonl), the newest validation grid (eval/step_<N>.png, N <= step when
    given) and the options (`config`, else the run's training_config.json) of the run folder `run`."""
    run = Path(run)
    if not run.is_dir():
        raise PushError(f"--run {run}: no such training run folder")
    if config is None:
        config = {}
        path = run / CONFIG_FILE
        if path.is_file():
            try:
                config = json.loads(path.read_text())
            except ValueError as e:
                raise PushError(f"{path}: not readable JSON ({first_line(e)})") from e
    max_steps = config.get("max_steps") if isinstance(config.get("max_steps"), int) else None
    figures = None
    metrics = run / METRICS_FILE
    if metrics.is_file():
        with open(metrics) as f:
            figures = figures_from_metrics(f, max_steps, up_to=step)
    if figures is not None and step is not None:
        figures.step = step
    grids = sorted((run / "eval").glob("step_*.png"))
    if step is not None:
        grids = [g for g in grids if (s := _grid_step(g)) is not None and s <= step]
    return RunFiles(figures, grids[-1] if grids else None, config)


def _grid_step(path: Path) -> int | None:
    digits = path.stem.removeprefix("step_")
    return int(digits) if digits.isdigit() else None


def base_on_hub(base: str) -> bool:
    """Whether a checkpoint's base names a Hub model (a local folder of that name would win when
    loading, and the Hub could not link to it)."""
    return is_hub_id(base) and not Path(base).exists()


def stage(
    folder: Path,
    ckpt: TurboCheckpoint,
    model_file: Path,
    repo_id: str,
    run: RunFiles | None = None,
    license: str = DEFAULT_LICENSE,
    datasets: list[str] | None = None,
) -> Path:
    """Lay out in `folder` exactly the files the repo gets: the model (a hard link to `model_file`
    where the file system allows, so a checkpoint pruned meanwhile keeps its data; else a copy), the
    card, and the run's grid and options. Returns `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    _link_or_copy(model_file, folder / MODEL_FILE)
    run = run or RunFiles()
    grid = config = None
    if run.grid is not None:
        _link_or_copy(run.grid, folder / GRID_FILE)
        grid = GRID_FILE
    if run.config:
        (folder / CONFIG_FILE).write_text(json.dumps(run.config, indent=2, sort_keys=True) + "\n")
        config = CONFIG_FILE
    card = build_model_card(
        ckpt, repo_id, license=license, datasets=datasets, base_on_hub=base_on_hub(ckpt.base_model),
        figures=run.figures, grid_file=grid, config_file=config, model_file=MODEL_FILE,
    )  # fmt: skip
    (folder / CARD_FILE).write_text(card, encoding="utf-8")
    return folder


def _link_or_copy(source: Path, target: Path) -> None:
    target.unlink(missing_ok=True)
    try:
        target.hardlink_to(source)
    except OSError:  # another file system, or links not allowed
        shutil.copyfile(source, target)


def upload(
    folder: Path, repo_id: str, *, private: bool = False, message: str | None = None, api: HfApi | None = None
) -> str:
    """Create `repo_id` if needed (`private` applies only then) and commit every file of `folder`
    to it in one commit; returns the commit's URL. PushError, in one line, when the Hub refuses or
    cannot be reached."""
    api = api or HfApi()
    names = sorted(p.name for p in folder.iterdir() if p.is_file())
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        operations = [CommitOperationAdd(path_in_repo=n, path_or_fileobj=str(folder / n)) for n in names]
        message = message or f"Upload {MODEL_FILE} with turbo"
        info = api.create_commit(repo_id, operations, commit_message=message, repo_type="model")
    except OfflineModeIsEnabled as e:
        raise PushError(f"cannot push to {repo_id}: HF_HUB_OFFLINE is set; unset it to reach the Hub") from e
    except HfHubHTTPError as e:
        raise PushError(_http_message(e, repo_id)) from e
    # huggingface_hub's client (httpx2) raises its own transport errors (no connection, DNS, a
    # timeout) once its retries are spent; they are not OSErrors
    except (httpx2.TransportError, OSError, TimeoutError) as e:
        raise PushError(f"upload to {repo_id} failed: the Hub could not be reached ({first_line(e)})") from e
    return str(getattr(info, "commit_url", "") or f"https://huggingface.co/{repo_id}")


def _http_message(e: HfHubHTTPError, repo_id: str) -> str:
    status = getattr(getattr(e, "response", None), "status_code", None)
    if status == 401:
        return f"the Hub refused the token (401 Unauthorized) for {repo_id}: {LOGIN_HINT}"
    if status == 403:
        return (
            f"no write access to {repo_id} (403 Forbidden): the token may be read-only, or "
            f"{repo_id.split('/')[0]} is neither you nor an organisation you can write to"
        )
    return f"upload to {repo_id} failed: {first_line(e)}"


def push_model(
    model: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    message: str | None = None,
    run: str | Path | None = None,
    license: str = DEFAULT_LICENSE,
    datasets: list[str] | None = None,
    api: HfApi | None = None,
) -> str:
    """`python -m turbo push`: check the id, the token and the model (all before any request), then
    upload the model, its card and, with `run` (a training run folder; default: the model's folder
    when it holds metrics.jsonl), the run's figures, grid and options. Returns the commit URL."""
    check_repo_id(repo_id)
    for d in datasets or []:
        check_dataset_id(d)
    check_token()
    model = Path(model)
    ckpt = load_checkpoint(model)  # CheckpointError: not a turbo model, before anything is sent
    step = checkpoint_step(model)
    if run is None:
        run = _run_of(model, step)
    files = read_run(run, step=step) if run is not None else None
    with tempfile.TemporaryDirectory(prefix="turbo-push-") as tmp:
        source = model
        if not _is_turbo_file(model):  # an original .pkl: the Hub gets our format, with its metadata
            source = save_checkpoint(ckpt, Path(tmp) / "converted" / MODEL_FILE)
        folder = stage(Path(tmp) / "repo", ckpt, source, repo_id, files, license, datasets)
        url = upload(folder, repo_id, private=private, message=message, api=api)
    logger.info("pushed %s to %s", model, repo_id)
    return url


def checkpoint_step(model: Path) -> int | None:
    """N for a training checkpoint's model (RUN/checkpoints/step_N/model.safetensors), else None."""
    folder = model.resolve().parent
    digits = folder.name.removeprefix("step_")
    if folder.parent.name == "checkpoints" and folder.name.startswith("step_") and digits.isdigit():
        return int(digits)
    return None


def _run_of(model: Path, step: int | None) -> Path | None:
    """The training run a model file belongs to: its own folder (RUN/model.safetensors) or, for a
    checkpoint's, the run above; None when that holds no metrics.jsonl."""
    folder = model.resolve().parent
    run = folder.parent.parent if step is not None else folder
    return run if (run / METRICS_FILE).is_file() else None


def _is_turbo_file(path: Path) -> bool:
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format") == "turbo"
    except (SafetensorError, OSError):  # not a safetensors file at all (a .pkl)
        return False
