"""Checkpoints of a training run that can be resumed exactly, written so a kill never corrupts one.

Layout under `<output>/checkpoints/`::

    step_00000500/model.safetensors   the model in turbo's format (loadable by the app and CLI)
    step_00000500/state.pt            trainer state: weights, optimizers, schedulers, step, data position
    step_00000500/rng_<rank>.pt       each process's python/numpy/torch/cuda RNG states
    latest                            the name of the newest complete checkpoint folder

A checkpoint is written into `.step_<N>.partial/` and renamed into place only once every file is on
disk, then `latest` is replaced (temp file + rename); a kill at any moment leaves the previous
checkpoint and `latest` intact. Stale `.partial` folders are removed by the next save. The state is
read with `torch.load(weights_only=True)`: it holds only tensors, numbers, strings and containers.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from turbo.checkpoint import TurboCheckpoint, save_checkpoint
from turbo.download import fsync_directory

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
MODEL_FILE = "model.safetensors"
STATE_FILE = "state.pt"
LATEST_FILE = "latest"
_STEP_DIR = re.compile(r"^step_(\d+)$")


class ResumeError(ValueError):
    """No usable checkpoint where --resume points."""


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


# --- RNG ------------------------------------------------------------------------------------------


def rng_state() -> dict:
    """This process's RNG states (python, numpy, torch cpu, cuda) as tensors and numbers."""
    version, internal, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
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


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint under root, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        m = _STEP_DIR.match(entry.name)
        if m and (entry / STATE_FILE).is_file() and (entry / MODEL_FILE).is_file():
            found.append((int(m.group(1)), entry))
    return sorted(found)


class CheckpointWriter:
    """Writes and prunes the checkpoints of one run; every process calls `save` together.

    rank/world: this process and the number of processes; barrier: waits for all of them (a no-op for
    one process). Rank 0 writes the model and the state; every rank writes its own RNG file.
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
            for stale in self.root.glob(".step_*.partial"):
                shutil.rmtree(stale, ignore_errors=True)
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
                old = self.root / f".{final.name}.old"
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
            fsync_directory(self.root)
            _write_text_atomic(self.root / LATEST_FILE, final.name + "\n")
            self._prune()
            logger.info("saved checkpoint %s", final)
        self.barrier()
        return final

    def _prune(self) -> None:
        if self.keep_last <= 0:
            return
        for _, folder in complete_checkpoints(self.root)[: -self.keep_last]:
            shutil.rmtree(folder, ignore_errors=True)


def resolve_checkpoint(resume: str, output: str | Path) -> Path:
    """The checkpoint folder `--resume` names: "latest" (in output), a run folder, or a step folder."""
    if resume == "latest":
        root = Path(output) / CHECKPOINTS
    else:
        path = Path(resume)
        if (path / STATE_FILE).is_file():
            return path
        root = path / CHECKPOINTS if (path / CHECKPOINTS).is_dir() else path
    pointer = root / LATEST_FILE
    if pointer.is_file():
        folder = root / pointer.read_text().strip()
        if (folder / STATE_FILE).is_file() and (folder / MODEL_FILE).is_file():
            return folder
        logger.warning("%s points to %s, which is incomplete; using the newest complete one", pointer, folder)
    found = complete_checkpoints(root)
    if not found:
        raise ResumeError(f"--resume {resume}: no complete checkpoint in {root}")
    return found[-1][1]


def load_state(folder: Path, rank: int = 0) -> tuple[dict, dict | None]:
    """(trainer state, this rank's RNG state or None if it was not saved) from a checkpoint folder."""
    try:
        state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError) as e:
        raise ResumeError(f"{folder / STATE_FILE}: cannot read the training state ({e})") from e
    rng_path = folder / f"rng_{rank}.pt"
    rng = torch.load(rng_path, map_location="cpu", weights_only=True) if rng_path.is_file() else None
    return state, rng
