"""Paired training step time and peak memory, tiny and full-size (random weights, nothing downloaded).

    python benchmarks/train_step.py --sizes tiny full --resolution 256 --steps 3 [--cpu]

Each (size, gradient checkpointing, mixed precision) case runs in its own process (peak memory is
per process): it builds the base (tiny: tests/tiny.py; full: SD-Turbo's architecture from
/work/shared/sd-turbo-architecture.md), a CLIP ViT-B/32-shaped discriminator and CLIP loss (tiny
ones for the tiny size), a random-trunk LPIPS, and times `PairedTrainer.train_step` (the whole
objective: reconstruction + CLIP step, generator GAN step, two discriminator steps) after one
warm-up step. Peak memory: GPU max allocated on cuda, process max RSS on the cpu.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _full_base(device, dtype):
    import torch

    from turbo.bench import random_base  # SD-Turbo's full-size architecture, random weights

    return random_base(torch.device(device), dtype)


def _clip_nets(size: str, device):
    from transformers import CLIPConfig, CLIPModel, CLIPVisionModelWithProjection

    from training.discriminator import CLIPDiscriminator
    from training.losses import CLIPSimilarityLoss

    if size == "full":
        config = CLIPConfig()  # transformers' defaults are ViT-B/32's shapes
    else:
        config = CLIPConfig(
            text_config=dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=2, projection_dim=16),
            vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                               num_hidden_layers=3, num_attention_heads=2, projection_dim=16),
            projection_dim=16,
        )  # fmt: skip
    clip = CLIPModel(config)
    vision = CLIPVisionModelWithProjection(config.vision_config)
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        from tests.tiny import _write_tokenizer

        _write_tokenizer(Path(tmp))
        tok = CLIPTokenizer.from_pretrained(tmp)
    disc = CLIPDiscriminator(vision).to(device).train()
    return disc, CLIPSimilarityLoss(clip, tok).to(device)


def run_case(
    size: str, ckpt: bool, mp: str, resolution: int, steps: int, batch: int, cpu: bool, threads: int | None
) -> dict:
    import numpy as np
    import torch

    if threads:
        torch.set_num_threads(threads)
    from PIL import Image

    from tests.tiny import make_tiny_base
    from training.losses import LPIPSLoss
    from training.paired import PairedConfig, PairedTrainer
    from training.runtime import Runtime

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for split in ("train_A", "train_B"):
            (tmp / "data" / split).mkdir(parents=True)
            for i in range(batch):
                arr = np.random.default_rng(i).integers(0, 255, (resolution, resolution, 3), dtype=np.uint8)
                Image.fromarray(arr).save(tmp / "data" / split / f"{i}.png")
        (tmp / "data" / "train_prompts.json").write_text(
            json.dumps({f"{i}.png": "a photo" for i in range(batch)})
        )
        cfg = PairedConfig(
            dataset=str(tmp / "data"), output=str(tmp / "out"), train_image_prep="no_resize",
            batch_size=batch,
            max_steps=steps + 1, eval_every=0, checkpoint_every=0, report_to="none", cpu=cpu,
            gradient_checkpointing=ckpt, mixed_precision=mp, lpips_pretrained=False,
        )  # fmt: skip
        rt = Runtime(cfg)
        dtype = rt.frozen_dtype
        if size == "full":
            base = _full_base(rt.device, dtype)
        else:
            from turbo.base import load_base

            base = load_base(make_tiny_base(tmp / "base"), device=rt.device, dtype=dtype)
        disc, clip = _clip_nets(size, rt.device)
        lpips = LPIPSLoss(pretrained_trunk=False).to(rt.device)
        trainer = PairedTrainer(cfg, rt, base=base, networks={"disc": disc, "clip": clip, "lpips": lpips})
        from training.sampler import batches

        stream = batches(trainer.loader, trainer.sampler)
        mb = trainer._inputs(next(stream)[1])
        trainer.train_step([mb])  # warm-up
        if rt.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(steps):
            trainer.train_step([mb])
        if rt.device.type == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() / 2**30
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        rt.close()
    return {
        "size": size, "gradient_checkpointing": ckpt, "mixed_precision": mp, "resolution": resolution,
        "batch": batch, "device": str(rt.device), "step_s": (time.perf_counter() - t0) / steps,
        "peak_gib": peak, "peak_kind": "gpu max allocated" if rt.device.type == "cuda" else "process max RSS",
    }  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", default=["tiny", "full"], choices=["tiny", "full"])
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--tiny-resolution", type=int, default=64)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch cpu threads (default: torch's)")
    p.add_argument("--mixed-precision", nargs="+", default=["no", "bf16"])
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_case(**json.loads(args.one))), flush=True)
        return
    print(
        "| size | resolution | batch | grad. checkpointing | mixed precision | step (s) | peak memory (GiB) |"
    )
    print("|---|---|---|---|---|---|---|")
    for size in args.sizes:
        res = args.resolution if size == "full" else args.tiny_resolution
        for mp in args.mixed_precision:
            for ckpt in (False, True):
                case = dict(
                    size=size,
                    ckpt=ckpt,
                    mp=mp,
                    resolution=res,
                    steps=args.steps,
                    batch=args.batch,
                    cpu=args.cpu,
                    threads=args.threads,
                )
                proc = subprocess.run(
                    [sys.executable, __file__, "--one", json.dumps(case)], capture_output=True, text=True,
                    env=os.environ | {"PYTHONPATH": str(REPO)},
                )  # fmt: skip
                lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
                if proc.returncode != 0 or not lines:
                    print(
                        f"| {size} | {res} | {args.batch} | {ckpt} | {mp} | failed: "
                        f"{proc.stderr.strip()[-300:]} | |"
                    )
                    continue
                r = json.loads(lines[-1][7:])
                print(
                    f"| {size} | {res} | {r['batch']} | {'on' if ckpt else 'off'} | {mp} | "
                    f"{r['step_s']:.2f} | "
                    f"{r['peak_gib']:.2f} ({r['peak_kind']}, {r['device']}) |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
