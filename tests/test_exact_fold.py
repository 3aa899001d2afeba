"""Folding a delta into weights in place and taking it out again restores every bit, with a small record."""

import pytest
import torch
from diffusers.models.upsampling import Upsample2D

from turbo.fast import exact_fold
from turbo.fast.subpixel import SubpixelUpsample

BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def weights_and_delta(shape, dtype, relative, seed=0, extremes=True):
    """Weights (with zeros and tiny values if `extremes`) and a low-rank delta `relative` x their spread."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.02
    if extremes:
        w.view(-1)[::97] = 0.0
        w.view(-1)[1::89] *= 1e-6  # far below the delta: the fold loses them entirely
    rank, rows, fan_in = 4, shape[0], w[0].numel()
    a = torch.randn(rank, fan_in, generator=g)
    b = torch.randn(rows, rank, generator=g) * 0.02 * relative / rank**0.5

    def delta_rows(r0, r1):
        return (b[r0:r1] @ a).reshape(-1)

    return w.to(dtype), delta_rows


def bits(t):
    return t.contiguous().view(BITS[t.dtype]).clone()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(300, 1000), (40, 24, 3, 3), (1100, 1000)])  # the last: two chunks
def test_fold_then_unfold_gives_every_bit_back(dtype, shape):
    w, delta_rows = weights_and_delta(shape, dtype, relative=0.3)
    before = bits(w)
    expected = (w.float() + delta_rows(0, shape[0]).view(shape)).to(dtype)
    record = exact_fold.add_(w, delta_rows)
    assert torch.equal(w, expected)  # the fold is the rounded sum, nothing else
    assert record.codes.numel() > 0 and record.index.numel() > 0  # both kinds of record are used
    exact_fold.subtract_(w, delta_rows, record)
    assert torch.equal(bits(w), before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(300, 1000), (40, 24, 3, 3), (1100, 1000)])  # the last: two chunks
def test_the_copy_way_folds_the_same_bits_and_copies_them_back(dtype, shape):
    w, delta_rows = weights_and_delta(shape, dtype, relative=0.3)
    before = bits(w)
    recorded = w.clone()
    exact_fold.add_(recorded, delta_rows)
    copy = exact_fold.host_copy(w)
    exact_fold.add_plain_(w, delta_rows)
    assert torch.equal(bits(w), bits(recorded))  # both ways fold the same rounded sum
    exact_fold.copy_back_(w, copy)
    assert torch.equal(bits(w), before)
    _, other = weights_and_delta(shape, dtype, relative=0.2, seed=1)
    exact_fold.add_plain_(w, other)  # another fold in place: the refold writes copy + delta over it
    exact_fold.add_from_(w, copy, delta_rows)
    assert torch.equal(bits(w), bits(recorded))


def test_channels_last_weights_and_many_cycles():
    w, _ = weights_and_delta((32, 16, 3, 3), torch.float32, relative=0.1)
    w = w.contiguous(memory_format=torch.channels_last)
    before = bits(w)
    for seed in range(1, 6):  # a different delta each time, as switching between models does
        _, rows = weights_and_delta((32, 16, 3, 3), torch.float32, relative=0.1 * seed, seed=seed)

        def in_storage_order(r0, r1, rows=rows):  # channels_last storage: (out, kh, kw, in)
            return rows(r0, r1).view(r1 - r0, 16, 3, 3).permute(0, 2, 3, 1).reshape(-1)

        expected = (w.float() + rows(0, 32).view(w.shape)).to(w.dtype)
        record = exact_fold.add_(w, in_storage_order)
        assert torch.equal(w, expected)
        exact_fold.subtract_(w, in_storage_order, record)
    assert w.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(bits(w), before)


def test_the_record_is_one_byte_per_element():
    w, delta_rows = weights_and_delta((512, 2048), torch.float32, relative=0.1, extremes=False)
    before = bits(w)
    record = exact_fold.add_(w, delta_rows)
    lost = (bits((w.float() - delta_rows(0, 512).view(w.shape)).to(w.dtype)) != before).float().mean()
    assert lost > 0.05  # a plain subtraction would not restore these
    # a quarter of a copy of fp32 weights; keeping each lost element's position and value: 8 bytes each
    assert record.codes.numel() == w.numel() and record.codes.dtype == torch.int8
    assert record.index.numel() < 0.001 * w.numel()
    assert record.nbytes < 1.01 * w.numel()


def test_a_weight_changed_while_folded_is_reported():
    w, delta_rows = weights_and_delta((64, 256), torch.float32, relative=0.3)
    record = exact_fold.add_(w, delta_rows)
    w.zero_()
    with pytest.raises(RuntimeError, match="does not match"):
        exact_fold.subtract_(w, delta_rows, record)
    with pytest.raises(ValueError, match="cannot fold"):
        exact_fold.add_(torch.zeros(4, 4, dtype=torch.float64), delta_rows)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("size", [(4, 4), (5, 7)])
def test_subpixel_upsample_equals_upsample_then_conv(channels_last, size):
    torch.manual_seed(0)
    up = Upsample2D(8, use_conv=True, out_channels=6).eval()
    x = torch.randn(2, 8, *size)
    if channels_last:
        up.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    sub = SubpixelUpsample(up.conv)
    with torch.no_grad():
        expected, out = up(x), sub(x)
        assert out.shape == (2, 6, 2 * size[0], 2 * size[1])
        assert (out - expected).abs().max() < 1e-5 * expected.abs().max()
        assert out.is_contiguous(memory_format=torch.channels_last) == channels_last
        up.conv.weight.mul_(-2)  # a fold changes the conv in place: refresh follows it
        sub.refresh(up.conv)
        assert (sub(x) - up(x)).abs().max() < 1e-5 * expected.abs().max() * 2
    with pytest.raises(ValueError, match="3x3"):
        SubpixelUpsample(torch.nn.Conv2d(8, 6, 1))
