"""GroupNorm for inference at batch 1 on a GPU: the statistics as reductions that fill the device.

PyTorch's CUDA GroupNorm reduces each (sample, group) in one thread block: at batch 1 with 32
groups that is 32 blocks on a GPU of 132 multiprocessors, while the VAE's 512x512 activations hold
8-33 M values each. In an eager fp16 forward on an H200, GroupNorm took 20 of the 45 ms of GPU time
(docs/performance.md), plus layout copies, since its CUDA kernel wants contiguous inputs and the
fast path runs channels_last. Here the mean and the mean square are two reductions, which PyTorch
splits over many blocks when there are few outputs, accumulated in fp32 whatever the input's dtype
(the second around the first: see `forward`), and the normalisation with the affine is one
elementwise pass computed in fp32, rounded once, in the input's memory layout.

On small activations (the UNet's, at 64x64 and below) PyTorch's kernel is faster, the launch of
several small kernels costing more than the reduction: `SplitGroupNorm` uses it below `SPLIT_FROM`
values per sample (benchmarks/group_norm.py measured the break-even near 2^23 on an H200).

The variance is taken around the mean rounded to the input's dtype, not as E[x^2] - E[x]^2 from
the raw sums: that form lost most of its digits on a group of mean 300 and spread 2 (0.14 absolute
output error in fp32 on the cpu, where PyTorch's is exact). The deviations cost one more
elementwise pass over each large activation. The output is `x * scale + shift` with fp32 scale and
shift, as PyTorch's kernel computes it, to within its error (tests/test_group_norm.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SPLIT_FROM = 1 << 23  # values per sample (e.g. 128 x 256 x 256) from which the split version is faster


class SplitGroupNorm(nn.Module):
    """Stands in for an `nn.GroupNorm`, sharing its weight and bias (no copy). Inference only."""

    def __init__(self, norm: nn.GroupNorm, split_from: int | None = None):
        super().__init__()
        self.num_groups, self.eps = norm.num_groups, norm.eps
        self.split_from = SPLIT_FROM if split_from is None else split_from
        self.weight, self.bias = norm.weight, norm.bias  # None when not affine

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, C, *), C a multiple of num_groups, any float dtype -> the same shape, dtype and layout."""
        if x[0].numel() < self.split_from:
            return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        n, c = x.shape[:2]
        groups = x.unflatten(1, (self.num_groups, c // self.num_groups))
        dims = tuple(range(2, groups.dim()))
        count = groups[0, 0].numel()
        # The variance from the deviations from a center near the mean (the mean rounded to x's dtype):
        # E[x^2] - E[x]^2 from the raw sums cancels away its digits when the mean is large against the
        # spread (0.14 off at mean 300, spread 2, in fp32), the deviations' sums keep them. Each
        # deviation is computed in fp32 and rounded once to x's dtype: a relative error, no cancellation.
        mean = torch.mean(groups, dims, dtype=torch.float32)  # (N, G)
        center = mean.to(x.dtype)
        deviations = groups - center.view(n, self.num_groups, *(1,) * len(dims))
        offset = mean - center.float()  # the deviations' mean
        spread_sq = torch.linalg.vector_norm(deviations, 2, dims, dtype=torch.float32).square() / count
        del deviations  # freed before the output is allocated: one activation less at the peak
        rstd = torch.rsqrt((spread_sq - offset.square()).clamp_min(0) + self.eps)
        per_channel = c // self.num_groups
        scale = rstd.repeat_interleave(per_channel, dim=1)  # (N, C)
        # y = x * scale + shift as PyTorch's kernel computes it (one rounding to x's dtype); the fp32
        # terms x * scale and mean * scale cancel to ~1e-7 of |mean| / spread, below fp16's rounding
        # unless the mean is thousands of times the spread
        shift = -mean.repeat_interleave(per_channel, dim=1) * scale
        if self.weight is not None:
            scale = scale * self.weight.float()
            shift = shift * self.weight.float() + self.bias.float()
        shape = (n, c) + (1,) * (x.dim() - 2)
        # out= in x's dtype: computed in fp32 (the promoted type), rounded once on the store
        return torch.addcmul(shift.view(shape), x, scale.view(shape), out=torch.empty_like(x))


def swap_group_norms(
    net: nn.Module, split_from: int | None = None
) -> list[tuple[nn.Module, str, nn.GroupNorm]]:
    """Replace every `nn.GroupNorm` in `net` by a `SplitGroupNorm`; returns what restoring needs."""
    swapped = []
    for name, module in list(net.named_modules()):
        if type(module) is nn.GroupNorm:
            parent_name, _, child = name.rpartition(".")
            parent = net.get_submodule(parent_name) if parent_name else net
            setattr(parent, child, SplitGroupNorm(module, split_from))
            swapped.append((parent, child, module))
    return swapped


def restore_group_norms(swapped: list[tuple[nn.Module, str, nn.GroupNorm]]) -> None:
    """Put back the norms `swap_group_norms` replaced."""
    for parent, child, norm in reversed(swapped):
        setattr(parent, child, norm)
