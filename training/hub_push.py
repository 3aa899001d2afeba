"""`--push-to-hub owner/name`: a training run's model, card, last validation grid and options uploaded
to the Hugging Face Hub at the end of the run (and with `--push-every-checkpoint` at each checkpoint).

Uploads run in one background thread on rank 0, so training does not wait for the network. A push is
staged first, in the training thread, as the files the repo gets (`<output>/hub_push/<step>/`, the
model hard-linked so pruning its checkpoint loses nothing); a later push replaces one still waiting.
A failed upload never stops training: it logs a warning, keeps its staged files, and the next push
uploads the latest state. The run's end waits for the last upload and reports a failure (the
command to retry it) instead of raising: the trained model is on disk either way.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

from huggingface_hub import HfApi

from training.config import CommonConfig
from turbo.formats import TurboCheckpoint
from turbo.push import CONFIG_FILE, PushError, check_token, read_run, stage, upload

logger = logging.getLogger(__name__)

STAGING = "hub_push"  # in the run folder: what each push uploads, kept when it failed


@dataclass
class _Request:
    step: int
    folder: Path
    message: str
    final: bool


class HubPush:
    """The pushes of one training run. Disabled (every method a no-op) without cfg.push_to_hub and on
    every process but rank 0; `api`: an HfApi to use (tests pass a recorder)."""

    def __init__(self, cfg: CommonConfig, is_main: bool, api: HfApi | None = None) -> None:
        self.cfg = cfg
        self.repo_id = cfg.push_to_hub or ""
        self.enabled = bool(self.repo_id) and is_main
        self.failed: str | None = None  # the last upload's error, None once one succeeds
        self.final_error: str | None = "not pushed"  # the final push's error; None once it is up
        if not self.repo_id:
            return
        check_token()  # on every process: all of them stop alike, before the base loads
        if not self.enabled:
            return
        self.api = api
        self.output = Path(cfg.output)
        self.config = json.loads(json.dumps(asdict(cfg), default=str))
        self.output.mkdir(parents=True, exist_ok=True)
        # beside metrics.jsonl, so `python -m turbo push <output>/model.safetensors` finds the options
        (self.output / CONFIG_FILE).write_text(json.dumps(self.config, indent=2, sort_keys=True) + "\n")
        self._cond = threading.Condition()
        self._pending: _Request | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="hub-push", daemon=True)
        self._thread.start()

    def checkpoint(self, step: int, model: TurboCheckpoint | None, model_file: Path) -> None:
        """After checkpoint `step` was saved (its model in `model_file`): push it with
        --push-every-checkpoint; the last step is left to `finish`, which pushes it with its figures."""
        every = self.enabled and self.cfg.push_every_checkpoint
        if every and step < self.cfg.max_steps and model is not None:
            self._submit(model, model_file, step, f"Training checkpoint, step {step}", final=False)

    def finish(self, step: int, model: TurboCheckpoint | None, model_file: Path) -> bool:
        """Push the final model and wait for the upload; False (logged as an error with the command
        that retries it) when it failed. Never raises for an upload that failed."""
        if not self.enabled:
            return True
        assert model is not None, "rank 0 exports the model it pushes"
        try:
            self._submit(model, model_file, step, f"Trained model, step {step}", final=True)
        finally:
            with self._cond:
                self._closed = True
                self._cond.notify_all()
            self._thread.join()
        if self.final_error is not None:
            logger.error(
                "the push of %s to %s failed: %s; push it again with: python -m turbo push %s %s --run %s",
                model_file, self.repo_id, self.final_error, model_file, self.repo_id, self.output,
            )  # fmt: skip
            return False
        logger.info("pushed the model of step %d to https://huggingface.co/%s", step, self.repo_id)
        return True

    # -- the training thread's half ----------------------------------------------------------------

    def _submit(self, model: TurboCheckpoint, model_file: Path, step: int, message: str, final: bool) -> None:
        name = f"{'final' if final else 'step'}_{step:08d}"
        folder = self.output / STAGING / name
        shutil.rmtree(folder, ignore_errors=True)  # a failed push of this step from an earlier run
        try:
            run = read_run(self.output, self.config, step)
            ds = [self.cfg.push_dataset] if self.cfg.push_dataset else None
            stage(folder, model, model_file, self.repo_id, run, self.cfg.push_license, ds)
        except Exception as e:  # a full disk, or a bug in the card: neither may stop training
            expected = isinstance(e, (OSError, PushError))
            logger.warning("could not prepare the push of step %d to %s: %s", step, self.repo_id, e,
                           exc_info=not expected)  # fmt: skip
            self.failed = str(e) if expected else f"{type(e).__name__}: {e}"
            if final:
                self.final_error = self.failed
            return
        with self._cond:
            if self._pending is not None:  # not started yet: the newer state replaces it
                logger.info("push of step %d skipped: step %d is newer", self._pending.step, step)
                shutil.rmtree(self._pending.folder, ignore_errors=True)
            self._pending = _Request(step, folder, message, final)
            self._cond.notify_all()

    # -- the upload thread -------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._cond:
                while self._pending is None and not self._closed:
                    self._cond.wait()
                if self._pending is None:
                    return
                request, self._pending = self._pending, None
            self._upload(request)

    def _upload(self, request: _Request) -> None:
        try:
            upload(request.folder, self.repo_id, private=self.cfg.push_private, message=request.message,
                   api=self.api)  # fmt: skip
        except Exception as e:  # the thread's boundary: no failure, even a bug, may end the pushes
            self.failed = str(e) if isinstance(e, PushError) else f"{type(e).__name__}: {e}"
            if request.final:  # `finish` reports it, with the command that retries it
                self.final_error = self.failed
                if not isinstance(e, PushError):
                    logger.warning("push of step %d failed", request.step, exc_info=True)
            else:
                logger.warning(
                    "push of step %d to %s failed (training goes on; the next push uploads the latest "
                    "state; this one's files are kept in %s): %s", request.step, self.repo_id,
                    request.folder, self.failed, exc_info=not isinstance(e, PushError),
                )  # fmt: skip
        else:
            self.failed = None
            if request.final:
                self.final_error = None
            logger.info("pushed step %d to %s", request.step, self.repo_id)
            # this state is on the Hub: what earlier pushes (failed ones) kept is not needed any more;
            # a waiting push is of a later step
            for folder in (self.output / STAGING).iterdir():
                step = folder.name.rpartition("_")[2]
                if folder.is_dir() and step.isdigit() and int(step) <= request.step:
                    shutil.rmtree(folder, ignore_errors=True)
