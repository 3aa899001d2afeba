"""Checkpoints of a training run that can be resumed exactly, written so a kill never corrupts one.

Layout under `<output>/checkpoints/`::

    step_00000500/model.safetensors   the model in turbo's format (loadable by the app and CLI)
    step_00000500/state.pt            trainer state: weights, optimizers, schedulers, step, data position
    step_00000500/rng_<rank>.pt       each process's python/numpy/torch/cuda RNG states
    latest                            the name of the newest complete checkpoint folder

A checkpoint is written into `.step_<N>.partial/` and renamed into place only once every file is on
disk, then `latest` is replaced (temp file + rename). Saving a step that already has a folder (a run
resumed from an earlier checkpoint reaching it again) renames the new folder to `.step_<N>.new/`, the
old one to `.step_<N>.old/`, then the new one into place: at every instant a complete checkpoint of
step N exists under one of those names, and resuming reads `.new` (else `step_N`, else `.old`). Pruned
folders are renamed to `.step_<N>.deleting/` before they are removed, so no half-deleted folder looks
complete. The next save finishes whatever a kill interrupted. The state is read with
`torch.load(weights_only=True)`: it holds only tensors, numbers, strings and containers.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
import signal
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from turbo.download import fsync_directory
from turbo.errors import TurboError, first_line
from turbo.formats import TurboCheckpoint, save_checkpoint

logger = logging.getLogger(__name__)

# Test hook: a process whose environment sets this to a step number SIGKILLs itself while saving that
# step, once its folder is in place and before `latest` names it (tests/test_train_paired.py).
KILL_AT_CHECKPOINT_ENV = "TURBO_TEST_KILL_AT_CHECKPOINT"
CHECKPOINTS = "checkpoints"
MODEL_FILE = "model.safetensors"
STATE_FILE = "state.pt"
LATEST_FILE = "latest"
# what every training state holds (a trainer adds its own parts)
STATE_KEYS = ("step", "epoch", "batch", "generator", "opt_g", "sched_g")
_STEP_DIR = re.compile(r"^step_(\d+)$")
# Hidden folders of one step: being written, written and waiting to replace step_N, replaced by a
# newer step_N, being pruned. The numbers rank the complete ones: the newest data of a step first.
_HIDDEN_DIR = re.compile(r"^\.step_(\d+)\.(partial|new|old|deleting)$")
_PREFERENCE = {"new": 0, "": 1, "old": 2}


class ResumeError(TurboError):
    """No usable checkpoint where --resume points."""


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


# --- RNG ------------------------------------------------------------------------------------------


def rng_state() -> dict:
    """This process's RNG states (python, numpy, torch cpu, cuda) as tensors and numbers."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    assert isinstance(np_state, tuple), "the global MT19937's legacy state is a tuple"
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np_state
    state = {
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "name": np_name,
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` returned."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["name"], keys, n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- files ----------------------------------------------------------------------------------------


def _torch_save(obj, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_directory(path.parent)


def _is_complete(folder: Path) -> bool:
    return (folder / STATE_FILE).is_file() and (folder / MODEL_FILE).is_file()


def _step_folders(root: Path) -> dict[int, list[tuple[str, Path]]]:
    """step -> [(kind, folder)] of every folder of that step: kind "" (step_N), partial, new, old,
    deleting."""
    found: dict[int, list[tuple[str, Path]]] = {}
    for entry in root.iterdir():
        m = _STEP_DIR.match(entry.name)
        kind = ""
        if not m:
            m = _HIDDEN_DIR.match(entry.name)
            if not m:
                continue
            kind = m.group(2)
        if entry.is_dir():
            found.setdefault(int(m.group(1)), []).append((kind, entry))
    return found


def _preferred(folders: list[tuple[str, Path]]) -> Path | None:
    """The complete folder of one step that resume reads (see `complete_checkpoints`), or None."""
    usable = sorted((_PREFERENCE[k], f) for k, f in folders if k in _PREFERENCE and _is_complete(f))
    return usable[0][1] if usable else None


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint under root, oldest first.

    One folder per step: `step_N`, or what an interrupted save left complete in its place (a newer
    `.step_N.new`, preferred to `step_N`, or the replaced `.step_N.old`)."""
    if not root.is_dir():
        return []
    found = [(step, _preferred(folders)) for step, folders in _step_folders(root).items()]
    return sorted((step, folder) for step, folder in found if folder is not None)


def _remove(folder: Path, root: Path, step: int) -> None:
    """Delete a checkpoint folder; renamed first, so that a kill half way leaves no folder that looks
    complete under a name resume reads."""
    doomed = root / f".step_{step:08d}.deleting"
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(folder, doomed)
    fsync_directory(root)
    shutil.rmtree(doomed, ignore_errors=True)


def recover(root: Path) -> None:
    """Finish what a killed save or prune left behind (one process, before writing): the folder
    `complete_checkpoints` picks for a step becomes `step_N`; every other hidden folder goes."""
    if not root.is_dir():
        return
    for step, folders in _step_folders(root).items():
        final = root / step_dir_name(step)
        chosen = _preferred(folders)
        if chosen is not None and chosen != final:
            logger.warning("finishing an interrupted save: %s becomes %s", chosen.name, final.name)
            if final.exists():
                _remove(final, root, step)
            os.replace(chosen, final)
        for kind, folder in folders:
            if kind and folder.exists():
                shutil.rmtree(folder, ignore_errors=True)
    fsync_directory(root)


class CheckpointWriter:
    """Writes and prunes the checkpoints of one run; every process calls `save` together.

    rank/world: this process and the number of processes; barrier: waits for all of them (a no-op for
    one process). Rank 0 writes the model and the state; every rank writes its own RNG file.
    keep_last: how many checkpoints up to the one being saved are kept (0: all). Checkpoints of later
    steps (a run resumed from an earlier checkpoint) are kept until this run saves those steps again.
    """

    def __init__(
        self,
        output: str | Path,
        keep_last: int = 3,
        rank: int = 0,
        world: int = 1,
        barrier: Callable = lambda: None,
    ) -> None:
        self.root = Path(output) / CHECKPOINTS
        self.keep_last = keep_last
        self.rank, self.world, self.barrier = rank, world, barrier

    def save(self, step: int, model: TurboCheckpoint | None, state: dict) -> Path:
        """Write checkpoint `step` (model: needed on rank 0 only) and return its folder."""
        final = self.root / step_dir_name(step)
        tmp = self.root / f".{final.name}.partial"
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            recover(self.root)
            tmp.mkdir()
        self.barrier()
        _torch_save(rng_state(), tmp / f"rng_{self.rank}.pt")
        if self.rank == 0:
            if model is None:
                raise ValueError("rank 0 must pass the model to save")
            save_checkpoint(model, tmp / MODEL_FILE)
            _torch_save({**state, "world_size": self.world}, tmp / STATE_FILE)
        self.barrier()
        if self.rank == 0:
            fsync_directory(tmp)
            if final.exists():  # the same step saved again (a resumed run passing it once more)
                new, old = self.root / f".{final.name}.new", self.root / f".{final.name}.old"
                os.replace(tmp, new)
                fsync_directory(self.root)
                os.replace(final, old)
                os.replace(new, final)
                fsync_directory(self.root)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
            fsync_directory(self.root)
            if os.environ.get(KILL_AT_CHECKPOINT_ENV) == str(step):
                os.kill(os.getpid(), signal.SIGKILL)
            _write_text_atomic(self.root / LATEST_FILE, final.name + "\n")
            self._prune(step)
            logger.info("saved checkpoint %s", final)
        self.barrier()
        return final

    def _prune(self, step: int) -> None:
        if self.keep_last <= 0:
            return
        # Only checkpoints up to this one compete: the one just written is always kept, and `latest`
        # (which names it) never dangles.
        earlier = [(s, f) for s, f in complete_checkpoints(self.root) if s <= step]
        for s, folder in earlier[: -self.keep_last]:
            _remove(folder, self.root, s)


def resolve_checkpoint(resume: str, output: str | Path) -> Path:
    """The checkpoint folder `--resume` names: "latest" (in output), a run folder, or a step folder."""
    if resume == "latest":
        root = Path(output) / CHECKPOINTS
    else:
        path = Path(resume)
        if (path / STATE_FILE).is_file():
            return path
        if not path.exists():
            raise ResumeError(f"--resume {resume}: no such folder")
        root = path / CHECKPOINTS if (path / CHECKPOINTS).is_dir() else path
    found = complete_checkpoints(root)
    pointer = root / LATEST_FILE
    if pointer.is_file():
        name = pointer.read_text().strip()
        m = _STEP_DIR.match(name)
        by_step = dict(found)
        if m and int(m.group(1)) in by_step:
            folder = by_step[int(m.group(1))]
            if folder.name != name:
                logger.warning("%s: using %s, left complete by an interrupted save", pointer, folder.name)
            return folder
        logger.warning("%s names %r, which is not a complete checkpoint; using the newest complete one",
                       pointer, name)  # fmt: skip
    if not found:
        raise ResumeError(f"--resume {resume}: no complete checkpoint in {root}")
    return found[-1][1]


def _load_file(path: Path, what: str):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError, EOFError, UnpicklingError, OSError, ...
        raise ResumeError(f"{path}: cannot read the {what} ({first_line(e)})") from e


def load_state(folder: Path, rank: int = 0) -> tuple[dict, dict | None]:
    """(trainer state, this rank's RNG state or None if it was not saved) from a checkpoint folder.

    Raises ResumeError naming the file when either cannot be read or is not what a trainer saved."""
    path = folder / STATE_FILE
    state = _load_file(path, "training state")
    missing = [k for k in STATE_KEYS if k not in state] if isinstance(state, dict) else list(STATE_KEYS)
    if missing:
        raise ResumeError(f"{path}: not a training state (it has no {', '.join(missing)})")
    rng_path = folder / f"rng_{rank}.pt"
    if not rng_path.is_file():
        logger.warning("%s is missing: this process's random numbers start afresh, so the resumed run "
                       "will not repeat an uninterrupted one exactly", rng_path)  # fmt: skip
        return state, None
    rng = _load_file(rng_path, "random number generator state")
    saved = rng_state()
    try:  # try it here, so that a bad file is named now rather than failing later
        set_rng_state(rng)
    except Exception as e:  # KeyError, TypeError, ValueError, RuntimeError, ...
        raise ResumeError(f"{rng_path}: not a random number generator state ({first_line(e)})") from e
    finally:
        set_rng_state(saved)
    return state, rng
