"""The fast path's GroupNorm gives PyTorch's values in the input's dtype and memory layout."""

import pytest
import torch
from torch import nn

from turbo.fast.group_norm import SplitGroupNorm, restore_group_norms, swap_group_norms

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU"))]


def _norm(groups: int, channels: int, affine: bool = True, eps: float = 1e-6) -> nn.GroupNorm:
    norm = nn.GroupNorm(groups, channels, eps=eps, affine=affine)
    if affine:
        nn.init.normal_(norm.weight)
        nn.init.normal_(norm.bias)
    return norm


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "shape,groups", [((1, 64, 24, 16), 32), ((3, 96, 8, 8), 32), ((2, 320, 77), 32), ((1, 6, 5, 7), 3)]
)
@pytest.mark.parametrize("channels_last", [False, True])
@torch.inference_mode()
def test_values_layout_and_dtype_match_pytorch(device, shape, groups, channels_last):
    torch.manual_seed(0)
    norm = _norm(groups, shape[1]).to(device)
    x = (torch.randn(shape) * 3 + 2).to(device)  # a mean away from 0 and a spread not 1
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    out = SplitGroupNorm(norm, split_from=0)(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.is_contiguous(memory_format=torch.channels_last) == (channels_last and x.dim() == 4)
    torch.testing.assert_close(out, norm(x.contiguous()), atol=2e-5, rtol=1e-5)
    lower = torch.float16 if device == "cuda" else torch.bfloat16
    low = norm.to(lower)
    x_low = x.to(lower)
    out_low = SplitGroupNorm(low, split_from=0)(x_low)
    assert out_low.dtype == lower
    ref = nn.functional.group_norm(x_low.float(), groups, low.weight.float(), low.bias.float(), low.eps)
    # statistics in fp32, one rounding at the end: within one unit of the lower dtype's last place
    ulp = torch.finfo(lower).eps * ref.abs().clamp_min(1)
    assert ((out_low.float() - ref).abs() <= ulp).all()


@torch.inference_mode()
def test_without_affine_and_with_a_constant_group():
    norm = _norm(2, 4, affine=False, eps=1e-5)
    x = torch.randn(2, 4, 3, 3)
    x[:, :2] = 7.0  # zero variance: normalised to 0, not NaN
    out = SplitGroupNorm(norm, split_from=0)(x)
    torch.testing.assert_close(out, norm(x), atol=1e-5, rtol=1e-5)
    assert out[:, :2].abs().max() < 1e-3


def test_swap_and_restore_put_back_the_same_modules():
    net = nn.Sequential(_norm(2, 4), nn.SiLU(), nn.Sequential(nn.Conv2d(4, 4, 1), _norm(4, 4)))
    before = [m for m in net.modules() if isinstance(m, nn.GroupNorm)]
    swapped = swap_group_norms(net, split_from=0)
    assert len(swapped) == 2
    assert not any(isinstance(m, nn.GroupNorm) for m in net.modules())
    assert net[0].weight is before[0].weight  # shared, not copied: a fold's in-place edits reach it
    x = torch.randn(1, 4, 5, 5)
    with torch.no_grad():
        swapped_out = net(x)
        restore_group_norms(swapped)
        assert [m for m in net.modules() if isinstance(m, nn.GroupNorm)] == before
        torch.testing.assert_close(swapped_out, net(x), atol=1e-5, rtol=1e-5)


@torch.inference_mode()
def test_small_activations_take_pytorchs_kernel(monkeypatch):
    norm = _norm(4, 8)
    x = torch.randn(2, 8, 6, 6)
    calls = []
    monkeypatch.setattr(torch.linalg, "vector_norm", lambda *a, **k: calls.append(1) or 1 / 0)
    torch.testing.assert_close(SplitGroupNorm(norm, split_from=8 * 6 * 6 + 1)(x), norm(x))
    assert not calls
    with pytest.raises(ZeroDivisionError):  # at the threshold: the split reductions
        SplitGroupNorm(norm, split_from=8 * 6 * 6)(x)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mean,spread", [(300.0, 2.0), (2e3, 1.0), (-50.0, 1e-2), (0.0, 1.0)])
@torch.inference_mode()
def test_a_mean_large_against_the_spread_keeps_its_digits(device, mean, spread):
    """As close to the exact values as PyTorch's GroupNorm. The variance as E[x^2] - E[x]^2 from raw
    fp32 sums lost most of its digits here (0.14 off in fp32 at mean 300, spread 2)."""
    torch.manual_seed(1)
    norm = _norm(4, 16).to(device)
    x = (torch.randn(2, 16, 64, 64, dtype=torch.float64) * spread + mean).to(device)
    dtypes = [torch.float32, torch.bfloat16] + ([torch.float16] if device == "cuda" else [])
    for dtype in dtypes:
        low = norm.to(dtype)
        xd = x.to(dtype)
        ref = nn.functional.group_norm(xd.double(), 4, low.weight.double(), low.bias.double(), norm.eps)
        error = (SplitGroupNorm(low, split_from=0)(xd).double() - ref).abs().max().item()
        pytorch_error = (low(xd).double() - ref).abs().max().item()
        one_place = (torch.finfo(dtype).eps * ref.abs().max()).item()  # a unit in the last place, at most
        assert error <= max(2 * pytorch_error, 1e-4 if dtype == torch.float32 else one_place), (dtype, error)
        norm.float()
