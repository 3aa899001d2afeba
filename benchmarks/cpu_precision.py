"""Per-image time and error of the folded generator on the cpu in other precisions and runtimes.

    python benchmarks/cpu_precision.py --sizes 256 512 --repeats 3

Builds the full-size SD-Turbo architecture with random weights (`turbo.fast.bench.random_base`),
folds the paired model (`FastPath`, the default options) and times one image per variant,
interleaved (each round runs every variant once; the best round is reported, so a shared machine's
noise hurts every variant alike):

  fp32            the default cpu path (the reference of the error columns)
  bf16            the folded networks and inputs in bf16 (oneDNN's native bf16 on AVX512-BF16/AMX)
  openvino fp32   the folded forward converted with `openvino.convert_model`, compiled for the cpu
                  with inference precision f32
  openvino bf16   the same model compiled with inference precision bf16 (OpenVINO's cpu default
                  where the cpu has native bf16)

The error is the output image's difference to fp32's, in 1/255 of the [0, 1] range: mean and max.
OpenVINO rows need the `openvino` package (skipped without it).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from turbo.fast.bench import PROMPT, add_random_models, random_base, table
from turbo.fast.path import FastOptions, FastPath, bf16_is_native
from turbo.generator import Generator


class Folded(nn.Module):
    """The fast path's one step (model folded, gamma 1) as a module of (x, text embedding)."""

    def __init__(self, fast: FastPath):
        super().__init__()
        self.fast = fast
        # registered so that convert_model sees the weights as constants of one module tree
        self.unet, self.vae, self.conv_in, self.skips = (
            fast.generator.unet,
            fast.generator.vae,
            fast.conv_in,
            fast.skips,
        )

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self.fast._forward(x, emb)


def _openvino(module: nn.Module, x: torch.Tensor, emb: torch.Tensor, precisions: list[str]) -> dict:
    """The folded forward converted once (shapes stay dynamic), compiled in each precision."""
    import openvino as ov

    start = time.perf_counter()
    with torch.no_grad():
        model = ov.convert_model(module, example_input=(x, emb))
    core, runs = ov.Core(), {}
    for precision in precisions:
        compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": precision})

        def run(x: torch.Tensor, emb: torch.Tensor, compiled=compiled) -> torch.Tensor:
            return torch.from_numpy(compiled((x.contiguous().numpy(), emb.numpy()))[0])

        runs[f"openvino {precision}"] = run
    del model  # the compiled models hold their own weights
    print(f"openvino: converted and compiled in {time.perf_counter() - start:.0f} s", flush=True)
    return runs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    p.add_argument("--repeats", type=int, default=3, help="rounds; each runs every variant once")
    p.add_argument("--only", nargs="*", help="variants to run besides fp32 (default: all)")
    args = p.parse_args(argv)

    def wanted(name: str) -> bool:
        return not args.only or name.startswith(tuple(args.only))

    folded = {}
    dtypes = [torch.float32] + ([torch.bfloat16] if wanted("bf16") else [])
    for dtype in dtypes:  # the same random weights, rounded to bf16
        base = random_base(torch.device("cpu"), dtype)
        gen = Generator(base).eval()
        add_random_models(gen, unpaired_rank=8)
        fast = FastPath(gen, FastOptions(restore="none"))  # keeps no copy: less memory
        fast.fold("paired")
        emb = base.encode_prompt(PROMPT).float()
        base.text_encoder = None  # not needed any more: its memory goes back
        folded[dtype] = Folded(fast).eval()
    print(f"native bf16: {bf16_is_native(torch.device('cpu'))}, threads {torch.get_num_threads()}")

    rows, openvino = [], None
    for size in args.sizes:
        x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(size))
        x = x.contiguous(memory_format=torch.channels_last)
        variants = {"fp32 (default)": folded[torch.float32]}
        if torch.bfloat16 in folded:
            bf16 = folded[torch.bfloat16]
            variants["bf16"] = lambda x, e, bf16=bf16: bf16(x.to(torch.bfloat16), e.to(torch.bfloat16))
        precisions = [p for p in ("f32", "bf16") if wanted(f"openvino {p}")]
        if openvino is None and precisions:
            try:
                openvino = _openvino(folded[torch.float32], x.contiguous(), emb, precisions)
            except ImportError:
                openvino = {}
                print("openvino is not installed: its rows are skipped")
        variants.update(openvino or {})
        chosen = {
            k: v
            for k, v in variants.items()
            if k.startswith("fp32") or not args.only or k.startswith(tuple(args.only))
        }
        outs, best = {}, dict.fromkeys(chosen, float("inf"))
        with torch.inference_mode():
            for name, run in chosen.items():  # warm-up (oneDNN primitives, OpenVINO's first inference)
                outs[name] = run(x, emb).float().clamp(-1, 1)
            for _ in range(args.repeats):
                for name, run in chosen.items():
                    start = time.perf_counter()
                    run(x, emb)
                    best[name] = min(best[name], time.perf_counter() - start)
        ref = outs["fp32 (default)"]
        for name in chosen:
            err = (outs[name] - ref).abs() / 2 * 255
            ms, ratio = best[name] * 1000, best["fp32 (default)"] / best[name]
            cells = [f"{ms:,.0f}", f"{ratio:.2f}", f"{err.mean().item():.3f}", f"{err.max().item():.2f}"]
            rows.append([f"{size}x{size}", name, *cells])
            print(rows[-1], flush=True)
    header = ["size", "variant", "ms / image (best)", "x fp32", "mean err (1/255)", "max err (1/255)"]
    print(table(header, rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
