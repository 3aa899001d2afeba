"""Add a delta to a weight in place, and take it out again bit for bit, with a small side record.

Many models share one set of base weights, so the fast path may fold a model's LoRA delta into
them (`s = round(W + d)`) only if the base comes back exactly on a switch. Subtracting again,
`b = round(s - d)`, gives W back for most elements but not all: rounding `W + d` loses low bits of
W where `W + d` lands in a coarser binade than W, or exactly halfway between two neighbours. Those
bits are gone from `s`, so something must be kept; the question is how little, and how cheaply.

The record holds one int8 per element, in storage order: `bits(W) - bits(b)`, modulo the bits'
width (0 almost everywhere, a few units in the last place where bits were lost), and (position,
value) pairs for the rare elements whose difference does not fit in int8 (a sign change, or W far
below d: about 1e-4 of the elements with the benchmark's random deltas). Fold and restore compute
`b` with the same operation from the same tensors, so `bits(b) + code` is W's bits by
construction, whatever the dtype. A fold is some six passes over the weight and a restore two,
elementwise and in chunks that stay in the cpu's cache: no data-dependent gathers, one reduction
per chunk to find the rare exceptions. (A first version kept an int8 only where `b` was
ambiguous, ~0.2 bytes per element, but finding those elements took a dozen passes and two
`nonzero` per chunk: a fold 3-10x slower.)

`d` must be recomputed bit-identically on restore: callers pass a function that computes rows of
the delta from tensors that do not change while the fold is in place.

The other way to give the base back exactly is to keep a copy of it: `host_copy` once per weight
(pinned host memory on a GPU), `add_plain_` to fold, `copy_back_` to restore. It keeps a byte per
byte of folded weight (4 per element in fp32, against the record's 1), but a restore is one copy and
a fold one add per layer, the fewest passes there are (see `turbo.fast.path.FastOptions.restore`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

# rows [r0, r1) of the delta, in fp32, flattened in the weight's storage order
DeltaRows = Callable[[int, int], torch.Tensor]

_BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


@dataclass
class FoldRecord:
    """What a fold keeps so that `subtract_` restores the weight exactly (in host memory)."""

    codes: torch.Tensor  # int8 per element, in storage order: bits(W) - bits(round(s - d)), modular
    index: torch.Tensor  # int32 storage positions the codes cannot restore
    values: torch.Tensor  # the original values there
    version: int = -1  # the weight's version counter after the fold: an edit since then is reported

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.index, self.values))


def flat_storage(t: torch.Tensor) -> torch.Tensor:
    """A 1-D view of `t` in storage order (contiguous or channels_last weights)."""
    if not t.is_contiguous() and not t.is_contiguous(memory_format=torch.channels_last):
        raise ValueError("folding needs contiguous or channels_last weights")
    return t.as_strided((t.numel(),), (1,), t.storage_offset())


def _chunks(weight: torch.Tensor) -> Iterator[tuple[int, int, int, int]]:
    """(r0, r1, start, stop): row ranges and their element ranges in storage order.

    The first dimension is outermost in both contiguous and channels_last layouts, so a range of
    rows is a contiguous range of storage."""
    rows = weight.shape[0]
    per_row = weight.numel() // rows
    # Chunks of 4 MB (fp32) keep a chunk's temporaries in the cpu's cache while giving the delta's
    # matmul enough rows (a 1280x1280x3x3 conv at rank 128 on 2 cores: 2.0x faster than 1 MB chunks
    # with the copy restore, 1.25x with the record); a GPU prefers few large kernels.
    target = 1 << 20 if weight.device.type == "cpu" else 1 << 24
    step = max(1, target // per_row)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        yield r0, r1, r0 * per_row, r1 * per_row


def _subtract(s: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """`round(s - d)` in place in `s`: the op restore uses, so the fold predicts its result exactly
    (an fp32 `d` makes the subtraction compute in fp32 and round once to s's dtype)."""
    return s.sub_(d)


def _outside_int8(x: torch.Tensor, block: int = 256) -> torch.Tensor:
    """Positions of the (few) elements of int tensor `x` outside [-128, 127].

    `nonzero` over a whole chunk costs some 25 times a pass over it on the cpu: find the blocks
    that hold such elements first (one reduction), then look inside those alone."""
    n = x.numel() // block * block
    low, high = x[:n].view(-1, block).aminmax(dim=1)
    blocks = ((low < -128) | (high > 127)).nonzero().squeeze(1)
    inner = x[:n].view(-1, block)[blocks]
    rows, cols = ((inner < -128) | (inner > 127)).nonzero().unbind(1)
    tail = x[n:]
    return torch.cat([blocks[rows] * block + cols, ((tail < -128) | (tail > 127)).nonzero().squeeze(1) + n])


def add_(weight: torch.Tensor, delta_rows: DeltaRows) -> FoldRecord:
    """`weight += delta` in place (rounded to the weight's dtype); returns what restores it exactly.

    Per element: `s = round(W + d)`, `back = round(s - d)`, code = bits(W) - bits(back) as int8
    (modulo the bits' width: a few units in the last place where rounding lost bits of W, else 0).
    The rare elements whose code does not fit (a sign change, or W far below d) are kept whole.
    Some six passes over the weight besides the delta's matmul, all on one chunk in the cache.
    """
    if weight.dtype not in _BITS:
        raise ValueError(f"cannot fold into {weight.dtype} weights")
    flat, bits_dtype = flat_storage(weight.data), _BITS[weight.dtype]
    codes = torch.empty(weight.numel(), dtype=torch.int8, device=weight.device)
    index, values = [], []
    for r0, r1, start, stop in _chunks(weight):
        w, d = flat[start:stop], delta_rows(r0, r1)
        s = torch.add(w, d).to(w.dtype)  # fp32 arithmetic, rounded once, as add_plain_ does
        back = _subtract(s.clone(), d).view(bits_dtype)
        diff = torch.sub(w.view(bits_dtype), back, out=back)
        code = codes[start:stop]
        code.copy_(diff)
        low, high = diff.aminmax()
        if low < -128 or high > 127:  # the code cannot give these back: keep them whole
            lost = _outside_int8(diff)
            index.append((lost + start).to(torch.int32).cpu())
            values.append(w[lost].cpu())
        w.copy_(s)
    empty = torch.empty(0, dtype=torch.int32)
    return FoldRecord(
        codes.cpu(),
        torch.cat(index) if index else empty,
        torch.cat(values) if values else torch.empty(0, dtype=weight.dtype),
        weight._version,
    )


def subtract_(weight: torch.Tensor, delta_rows: DeltaRows, record: FoldRecord) -> None:
    """Undo `add_` exactly: `weight` gets back the bits it had before (two passes per chunk)."""
    if weight._version != record.version or record.codes.numel() != weight.numel():
        raise RuntimeError("fold record does not match the weight (changed while folded?)")
    flat, bits_dtype = flat_storage(weight.data), _BITS[weight.dtype]
    codes = record.codes.to(flat.device)
    for r0, r1, start, stop in _chunks(weight):
        s = flat[start:stop]
        _subtract(s, delta_rows(r0, r1)).view(bits_dtype).add_(codes[start:stop])
    if record.index.numel():
        flat[record.index.to(flat.device).long()] = record.values.to(flat.device)


def add_plain_(weight: torch.Tensor, delta_rows: DeltaRows) -> None:
    """`weight += delta` in place (rounded to the weight's dtype), keeping nothing: restore it from
    a `host_copy` taken before."""
    flat = flat_storage(weight.data)
    for r0, r1, start, stop in _chunks(weight):
        # An fp32 delta makes the in-place add compute in fp32 and round once: the bits of
        # `(w.float() + d).to(w.dtype)` in one kernel instead of four.
        flat[start:stop].add_(delta_rows(r0, r1))


def add_from_(weight: torch.Tensor, copy: torch.Tensor, delta_rows: DeltaRows) -> None:
    """`weight = copy + delta` (the bits `copy_back_` then `add_plain_` give) in one pass, whatever
    `weight` holds now; cpu only (on a GPU the copy is in host memory)."""
    flat, src = flat_storage(weight.data), flat_storage(copy)
    for r0, r1, start, stop in _chunks(weight):
        torch.add(src[start:stop], delta_rows(r0, r1), out=flat[start:stop])


def host_copy(weight: torch.Tensor) -> torch.Tensor:
    """A copy of `weight` in host memory with the same strides (pinned, for fast copies, on a GPU)."""
    copy = torch.empty_like(weight.data, device="cpu", pin_memory=weight.is_cuda)
    return copy.copy_(weight.data)


def copy_back_(weight: torch.Tensor, copy: torch.Tensor) -> None:
    """Give `weight` the bits of its `host_copy` back (asynchronously on a GPU: stream-ordered)."""
    weight.data.copy_(copy, non_blocking=True)
