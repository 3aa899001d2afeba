"""PyTorch's GroupNorm against `turbo.fast.group_norm.SplitGroupNorm` on the shapes of an SD-Turbo forward.

    python benchmarks/group_norm.py [--dtype fp16] [--repeats 50]

For each activation shape the VAE and UNet normalise at 512x512 (batch 1, 32 groups), in the
contiguous and the channels_last layout: the median time of each (CUDA events, after warm-up), the
ratio, and the largest difference between the two outputs. Prints a markdown table. CUDA only.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from turbo.fast.group_norm import SplitGroupNorm  # noqa: E402

# (channels, height, width): the VAE at 512, 256, 128 and 64 px, then the UNet's 64x64 latent levels
SHAPES = [(128, 512, 512), (256, 512, 512), (256, 256, 256), (512, 256, 256), (512, 128, 128),
          (512, 64, 64), (320, 64, 64), (640, 32, 32), (1280, 16, 16), (1280, 8, 8)]  # fmt: skip
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _time(fn, x: torch.Tensor, repeats: int) -> float:
    """Median milliseconds of `fn(x)` over `repeats` calls after 3 warm-up calls."""
    for _ in range(3):
        fn(x)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(x)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


@torch.inference_mode()
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dtype", choices=list(DTYPES), default="fp16")
    p.add_argument("--repeats", type=int, default=50)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("error: this benchmark needs a CUDA device")
    dtype = DTYPES[args.dtype]
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, {args.dtype}, batch 1, 32 groups\n")
    print("| shape | layout | PyTorch, ms | split, ms | x PyTorch | max diff |")
    print("|---|---|---|---|---|---|")
    total = {"contiguous": [0.0, 0.0], "channels_last": [0.0, 0.0]}
    for c, h, w in SHAPES:
        norm = nn.GroupNorm(32, c, eps=1e-6).cuda().to(dtype)
        nn.init.normal_(norm.weight)
        nn.init.normal_(norm.bias)
        split = SplitGroupNorm(norm, split_from=0)  # always split, to find the break-even
        x = (torch.randn(1, c, h, w, device="cuda") * 2 + 0.5).to(dtype)
        for layout, fmt in (("contiguous", torch.contiguous_format), ("channels_last", torch.channels_last)):
            xl = x.contiguous(memory_format=fmt)
            native, ours = _time(norm, xl, args.repeats), _time(split, xl, args.repeats)
            total[layout][0] += native
            total[layout][1] += ours
            diff = (norm(xl).float() - split(xl).float()).abs().max().item()
            row = [
                f"{c}x{h}x{w}",
                layout,
                f"{native:.3f}",
                f"{ours:.3f}",
                f"{ours / native:.2f}",
                f"{diff:.4f}",
            ]
            print("| " + " | ".join(row) + " |")
    for layout, (native, ours) in total.items():
        print(f"| all shapes once | {layout} | {native:.3f} | {ours:.3f} | {ours / native:.2f} | |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
