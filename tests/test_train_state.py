"""Training-state pieces without models: RNG capture, resumable data order, checkpoint folders (pruning,
crash-safe replacement, bad files, resolution), the fresh-run guard and Ctrl-C."""

from __future__ import annotations

import os
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from training import state as state_mod
from training.config import CommonConfig, ConfigError
from training.sampler import Position, ResumableBatchSampler, SamplerError, batches
from training.state import (
    CheckpointWriter,
    ResumeError,
    load_state,
    resolve_checkpoint,
    rng_state,
    set_rng_state,
)
from training.trainer import check_output, cli_main


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.normal()  # leaves a cached gaussian in numpy's state
    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.normal(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (random.random(), np.random.normal(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_sampler_shards_are_disjoint_and_resume_mid_epoch():
    ranks = [ResumableBatchSampler(10, 2, rank=r, world=2, seed=5) for r in range(2)]
    epoch0 = [list(s) for s in ranks]
    assert [len(e) for e in epoch0] == [2, 2]  # 10 // (2 x 2) batches per process, remainder dropped
    seen = [i for e in epoch0 for b in e for i in b]
    assert len(seen) == len(set(seen)) == 8
    # a sampler placed at (epoch 0, batch 1) continues exactly where the first pass was
    s = ResumableBatchSampler(10, 2, rank=1, world=2, seed=5)
    s.position = Position(0, 1)
    assert list(s) == epoch0[1][1:]
    # epochs are shuffled differently, reproducibly
    a, b = ResumableBatchSampler(10, 2, seed=5), ResumableBatchSampler(10, 2, seed=5)
    assert a.epoch_order(0) != a.epoch_order(1) and a.epoch_order(1) == b.epoch_order(1)
    with pytest.raises(SamplerError, match="lower --batch-size"):
        ResumableBatchSampler(3, 2, world=2)


def test_batches_reports_the_position_after_each_batch():
    data = list(range(6))
    sampler = ResumableBatchSampler(6, 2, seed=0)
    loader = torch.utils.data.DataLoader(data, batch_sampler=sampler)
    stream = batches(loader, sampler)
    positions = [next(stream)[0] for _ in range(4)]
    assert positions == [Position(0, 1), Position(0, 2), Position(1, 0), Position(1, 1)]
    # restarting from a saved position gives the same next batch
    sampler2 = ResumableBatchSampler(6, 2, seed=0)
    sampler2.position = positions[1]
    loader2 = torch.utils.data.DataLoader(data, batch_sampler=sampler2)
    sampler3 = ResumableBatchSampler(6, 2, seed=0)
    fresh = batches(torch.utils.data.DataLoader(data, batch_sampler=sampler3), sampler3)
    expected = [next(fresh)[1] for _ in range(4)][2:]
    stream2 = batches(loader2, sampler2)
    got = [next(stream2)[1] for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


def test_resume_without_checkpoints_says_where_it_looked(tmp_path):
    with pytest.raises(ResumeError, match="no complete checkpoint"):
        resolve_checkpoint("latest", tmp_path)
    (tmp_path / "checkpoints" / ".step_00000004.partial").mkdir(parents=True)
    with pytest.raises(ResumeError, match="no complete checkpoint"):
        resolve_checkpoint(str(tmp_path), tmp_path)


# --- checkpoint folders: pruning, crash-safe replacement, bad files ---------------------------------


@pytest.fixture
def writer(tmp_path, monkeypatch):
    """A CheckpointWriter of tmp_path/run whose model file is a stand-in (no model needed here)."""
    monkeypatch.setattr(state_mod, "save_checkpoint", lambda model, path: Path(path).write_bytes(b"model"))
    return CheckpointWriter(tmp_path / "run", keep_last=2)


def fake_state(step: int, **extra) -> dict:
    return {"step": step, "epoch": 0, "batch": step, "generator": {}, "opt_g": {}, "sched_g": {}, **extra}


def saved_step(folder: Path) -> tuple[int, str]:
    state, _ = load_state(folder)
    return state["step"], state.get("run", "")


def test_pruning_never_removes_the_checkpoint_just_written(writer, tmp_path):
    root = tmp_path / "run" / "checkpoints"
    for step in (2, 4, 6):
        writer.save(step, "model", fake_state(step, run="first"))
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000004", "step_00000006"]
    # a run resumed from an earlier checkpoint (here: another folder's step 2) saves step 3
    writer.save(3, "model", fake_state(3, run="second"))
    assert (root / "step_00000003").is_dir()  # step-ordered pruning deleted it: it was the oldest
    assert saved_step(resolve_checkpoint("latest", tmp_path / "run")) == (3, "second")
    # it passes step 4 again (replaced), then 5: only checkpoints up to the current step compete
    writer.save(4, "model", fake_state(4, run="second"))
    writer.save(5, "model", fake_state(5, run="second"))
    names = sorted(p.name for p in root.iterdir())
    assert names == ["latest", "step_00000004", "step_00000005", "step_00000006"]
    assert saved_step(resolve_checkpoint("latest", tmp_path / "run")) == (5, "second")
    assert saved_step(root / "step_00000004") == (4, "second")


def test_a_kill_while_replacing_a_checkpoint_leaves_one_that_resume_finds(writer, tmp_path, monkeypatch):
    root = tmp_path / "run" / "checkpoints"
    writer.save(4, "model", fake_state(4, run="first"))
    real_replace = os.replace

    def killed_after_moving_the_old_one_away(src, dst):
        real_replace(src, dst)
        if Path(src) == root / "step_00000004":
            raise KeyboardInterrupt  # the process dies between the renames

    monkeypatch.setattr(state_mod.os, "replace", killed_after_moving_the_old_one_away)
    with pytest.raises(KeyboardInterrupt):
        writer.save(4, "model", fake_state(4, run="second"))
    monkeypatch.setattr(state_mod.os, "replace", real_replace)
    assert not (root / "step_00000004").exists()
    # resume reads the complete new copy the save left under its hidden name
    folder = resolve_checkpoint("latest", tmp_path / "run")
    assert saved_step(folder) == (4, "second")
    # the next save puts it in place and removes the leftovers
    writer.save(5, "model", fake_state(5, run="second"))
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000004", "step_00000005"]
    assert saved_step(root / "step_00000004") == (4, "second")


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("truncated rng", "rng_0.pt: cannot read the random number generator state"),
        ("garbage state", "state.pt: cannot read the training state"),
        ("other torch file", "state.pt: not a training state (it has no step, epoch"),
        ("other rng dict", "rng_0.pt: not a random number generator state"),
    ],
)
def test_bad_checkpoint_files_are_named(writer, tmp_path, damage, message):
    folder = writer.save(1, "model", fake_state(1))
    if damage == "truncated rng":
        data = (folder / "rng_0.pt").read_bytes()
        (folder / "rng_0.pt").write_bytes(data[: len(data) // 2])
    elif damage == "garbage state":
        (folder / "state.pt").write_bytes(b"not a torch file at all")
    elif damage == "other torch file":
        torch.save({"weights": torch.zeros(3)}, folder / "state.pt")
    else:
        torch.save({"python": 1, "torch": torch.zeros(3)}, folder / "rng_0.pt")
    before = torch.get_rng_state()
    with pytest.raises(ResumeError, match=re.escape(message)):
        load_state(resolve_checkpoint("latest", tmp_path / "run"))
    assert torch.equal(before, torch.get_rng_state())  # trying the RNG file changed nothing


def test_a_missing_rng_file_is_a_warning(writer, tmp_path, caplog):
    folder = writer.save(1, "model", fake_state(1))
    (folder / "rng_0.pt").unlink()
    state, rng = load_state(folder)
    assert state["step"] == 1 and rng is None
    assert "rng_0.pt is missing" in caplog.text


def test_a_fresh_run_refuses_a_folder_with_checkpoints(writer, tmp_path):
    cfg = CommonConfig(dataset="d", output=str(tmp_path / "run"))
    check_output(cfg)  # nothing there yet
    writer.save(3, "model", fake_state(3))
    with pytest.raises(ConfigError, match="step_00000003.*pass --resume latest to continue it, or choose"):
        check_output(cfg)
    cfg.resume = "latest"
    check_output(cfg)


def test_ctrl_c_says_where_the_last_checkpoint_is(writer, tmp_path, caplog):
    cfg = CommonConfig(dataset="d", output=str(tmp_path / "run"))

    def interrupted(cfg):
        writer.save(7, "model", fake_state(7))
        raise KeyboardInterrupt

    assert cli_main(lambda argv: cfg, interrupted, []) == 130
    assert "training stopped" in caplog.text
    assert str(tmp_path / "run" / "checkpoints" / "step_00000007") in caplog.text
    assert "--resume latest" in caplog.text
