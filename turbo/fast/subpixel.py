"""A 2x nearest upsampling followed by a 3x3 conv, computed at the input's resolution.

The VAE decoder's upsamplers (diffusers' `Upsample2D`) repeat every pixel 2x2 and then run a 3x3
conv at the new size. Each output pixel of a given phase (row parity a, column parity b) only
sees a 2x2 window of input pixels, with the 3x3 kernel's taps summed where they land on the same
input pixel. So the same result is four 2x2 convs on the input (one per phase, stacked as 4x the
output channels) interleaved into the output: 16 multiply-adds per input pixel and channel pair
instead of 36, with the same zero padding at the borders. The outputs differ from the upsample +
conv only by float rounding (the summed taps). At 512x512 on the 2-core cpu the folded forward went
from 55.6 s to 44.8 s with it (docs/performance.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# For output row parity a, which 3x3 kernel rows fall on input rows (i - 1 + a, i + a).
_TAPS = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]], [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])


class SubpixelUpsample(nn.Module):
    """Stands in for an `Upsample2D` (nearest 2x, 3x3 conv with padding 1) over the same conv.

    Holds derived weights only: `refresh(conv)` recomputes them from the conv's current weights
    (after a LoRA fold, for instance), in place, so compiled graphs stay valid.
    """

    # buffers (registered in __init__)
    weight: torch.Tensor
    bias: torch.Tensor
    taps: torch.Tensor

    @staticmethod
    def supports(conv: nn.Module) -> bool:
        """Whether `conv` is the 3x3, padding 1, stride 1, ungrouped conv this module can stand in for."""
        return (
            isinstance(conv, nn.Conv2d)
            and conv.kernel_size == (3, 3)
            and conv.padding == (1, 1)
            and conv.stride == (1, 1)
            and conv.groups == 1
        )

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        if not self.supports(conv):
            raise ValueError("SubpixelUpsample stands in for a 3x3, padding 1, stride 1 conv only")
        cout, cin = conv.out_channels, conv.in_channels
        like = conv.weight
        self.out_channels = cout
        self.register_buffer("weight", like.new_empty(4 * cout, cin, 2, 2), persistent=False)
        self.register_buffer("bias", like.new_zeros(4 * cout), persistent=False)
        # kept on the weights' device: a host-to-device copy at every refresh would wait for the GPU
        self.register_buffer("taps", _TAPS.to(like.device), persistent=False)
        if like.is_contiguous(memory_format=torch.channels_last) and not like.is_contiguous():
            self.weight = self.weight.contiguous(memory_format=torch.channels_last)
        self.refresh(conv)

    @torch.no_grad()
    def refresh(self, conv: nn.Conv2d) -> None:
        """Derive the four phase kernels from `conv`'s weight and bias (summed in fp32)."""
        w = torch.einsum("apu,oiuv,bqv->aboipq", self.taps, conv.weight.float(), self.taps)
        self.weight.copy_(w.reshape(self.weight.shape))
        if conv.bias is not None:
            self.bias.copy_(conv.bias.repeat(4))

    def forward(self, x: torch.Tensor, output_size: tuple[int, int] | None = None) -> torch.Tensor:
        """x: (B, C_in, H, W) -> (B, C_out, 2H, 2W), as `conv(interpolate(x, scale_factor=2))`."""
        b, _, h, w = x.shape
        if output_size is not None and tuple(output_size) != (2 * h, 2 * w):
            raise ValueError(f"SubpixelUpsample doubles the size, not {(h, w)} -> {tuple(output_size)}")
        y = F.conv2d(x, self.weight, self.bias, padding=1)  # (B, 4 C_out, H + 1, W + 1)
        cout = self.out_channels
        channels_last = x.is_contiguous(memory_format=torch.channels_last)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        out = torch.empty((b, cout, 2 * h, 2 * w), dtype=x.dtype, device=x.device, memory_format=fmt)
        for a in (0, 1):
            for c in (0, 1):
                k = 2 * a + c
                out[:, :, a::2, c::2] = y[:, k * cout : (k + 1) * cout, a : a + h, c : c + w]
        return out
