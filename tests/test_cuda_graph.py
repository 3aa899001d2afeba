"""turbo.fast.cuda_graph on small functions (needs a CUDA GPU; skipped elsewhere)."""

import pytest
import torch

from turbo.fast.cuda_graph import GraphCache

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_replay_follows_new_inputs_and_weights_changed_in_place():
    weight = torch.randn(8, 8, device="cuda")
    graphs = GraphCache(lambda x, g: torch.tanh(x @ weight) * g)
    for _ in range(3):
        x, g = torch.randn(4, 8, device="cuda"), torch.rand((), device="cuda")
        assert torch.allclose(graphs(x, g), torch.tanh(x @ weight) * g, atol=1e-5)
    weight.mul_(-2)  # in place, as the fast path's folds write
    x = torch.randn(4, 8, device="cuda")
    out = graphs(x, torch.ones((), device="cuda"))
    assert torch.allclose(out, torch.tanh(x @ weight), atol=1e-5)
    assert len(graphs.graphs) == 1
    again = graphs(x, torch.ones((), device="cuda"))
    assert again.data_ptr() != out.data_ptr()  # callers get their own copy of the output


def test_one_graph_per_shape_and_least_recently_used_dropped():
    graphs = GraphCache(lambda x: x * 2 + 1, max_graphs=2)
    for n in (1, 2, 1, 3):
        x = torch.randn(n, 5, device="cuda")
        assert torch.equal(graphs(x), x * 2 + 1)
    assert [k[0][0][0] for k in graphs.graphs] == [1, 3]  # 2 was the least recently used


def test_a_failed_capture_falls_back_to_eager():
    graphs = GraphCache(lambda x: x * x.sum().item())  # .item() synchronises: no capture
    x = torch.randn(3, device="cuda")
    assert torch.allclose(graphs(x), x * x.sum().item())
    assert graphs.eager and not graphs.graphs
    assert torch.allclose(graphs(2 * x), 2 * x * (2 * x).sum().item())
