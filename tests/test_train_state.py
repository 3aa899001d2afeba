"""Training-state pieces without models: RNG capture, resumable data order, checkpoint resolution."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from training.sampler import Position, ResumableBatchSampler, SamplerError, batches
from training.state import ResumeError, resolve_checkpoint, rng_state, set_rng_state


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
