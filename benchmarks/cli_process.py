"""Whole-process time of `turbo translate`: load + a few images, fast path against `--plain`.

    python benchmarks/cli_process.py --work /tmp/turbo-cli-bench --images 3 --size 256 --repeats 2

The first run writes, under --work, SD-Turbo's full-size architecture with random weights as a
diffusers folder (about 5 GB) and a paired model in the original `.pkl` layout (written by the
test suite's re-statement of the original code, `tests/reference.py`), and random input images.
Then each round runs one `python -m turbo translate` process per variant, alternating (so a shared
machine's load hits both alike), and the table gives the best and the median round per variant,
the ratio to `--plain` (which computes what the original code computes, the same way) and the
largest pixel difference between the variants' images.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"plain (original computation)": ["--plain"], "fast (default)": []}


def _prepare(work: Path, images: int, size: int) -> tuple[Path, Path, Path]:
    base, pkl, inputs = work / "base", work / "paired.pkl", work / f"in{size}x{images}"
    if not (base / "scheduler").is_dir():
        import torch

        from turbo.fast.bench import SCHEDULER, random_base

        print("writing the random full-size base ...", flush=True)
        b = random_base(torch.device("cpu"), torch.float32)
        b.tokenizer.save_pretrained(str(base / "tokenizer"))
        b.text_encoder.save_pretrained(base / "text_encoder")
        b.unet.save_pretrained(base / "unet")
        b.vae.save_pretrained(base / "vae")
        (base / "scheduler").mkdir(parents=True, exist_ok=True)
        config = {"_class_name": "DDPMScheduler", **SCHEDULER}
        (base / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
        del b
    if not pkl.exists():
        sys.path.insert(0, str(ROOT / "tests"))
        from reference import RefPaired

        print("writing the original-layout paired model ...", flush=True)
        RefPaired(str(base), seed=0).save_pkl(pkl)
    if not inputs.is_dir():
        inputs.mkdir(parents=True)
        rng = np.random.default_rng(0)
        for i in range(images):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(inputs / f"{i}.png")
    return base, pkl, inputs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/turbo-cli-bench"))
    p.add_argument("--images", type=int, default=3)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=2, help="rounds; each runs every variant once")
    p.add_argument("--extra", nargs="*", default=[], help="more arguments for every translate process")
    args = p.parse_args(argv)
    base, pkl, inputs = _prepare(args.work, args.images, args.size)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for r in range(args.repeats):
        for name, flags in VARIANTS.items():
            out = args.work / ("out-plain" if flags else "out-fast")
            cmd = [sys.executable, "-m", "turbo", "translate", "--model", str(pkl), "--input", str(inputs),
                   "--output", str(out), "--base", str(base), "--prompt", "a photo of a red house",
                   "--device", "cpu", "--overwrite", *flags, *args.extra]  # fmt: skip
            start = time.perf_counter()
            subprocess.run(cmd, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
            times[name].append(time.perf_counter() - start)
            print(f"round {r + 1}: {name}: {times[name][-1]:.1f} s", flush=True)
    diffs = []
    outs = sorted((args.work / "out-fast").iterdir())
    for f in outs:
        a = np.asarray(Image.open(f), dtype=np.int16)
        b = np.asarray(Image.open(args.work / "out-plain" / f.name), dtype=np.int16)
        diffs.append(np.abs(a - b).max())
    plain = min(times[next(iter(VARIANTS))])
    print(
        f"\n{args.images} images {args.size}x{args.size}, {os.cpu_count()} cpus, "
        f"best of {args.repeats} rounds\n"
    )
    print("| whole process | best, s | median, s | x plain |\n|---|---|---|---|")
    for name, t in times.items():
        print(f"| {name} | {min(t):.1f} | {statistics.median(t):.1f} | {min(t) / plain:.2f} |")
    print(f"\nlargest pixel difference fast vs plain: {max(diffs)}/255 (8-bit images)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
