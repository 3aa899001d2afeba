"""Paired training step time and peak memory, tiny and full-size (random weights, nothing downloaded).

    python benchmarks/train_step.py --sizes tiny full --resolution 256 --steps 3 [--cpu]

Each (size, gradient checkpointing, mixed precision) case runs in its own process (peak memory is
per process): it builds the base (tiny: tests/tiny.py; full: SD-Turbo's architecture from
/work/shared/sd-turbo-architecture.md), a CLIP ViT-B/32-shaped discriminator and CLIP loss (tiny
ones for the tiny size), a random-trunk LPIPS, and times `PairedTrainer.train_step` (the whole
objective: reconstruction + CLIP step, generator GAN step, two discriminator steps) after one
warm-up step. Peak memory: GPU max allocated on cuda, process max RSS on the cpu.

    python benchmarks/train_step.py --unpaired-memory --sizes tiny full --resolution 512

estimates instead, without a GPU and without computing anything, the tensor memory of one unpaired
(CycleGAN-Turbo) training step as `UnpairedTrainer.train_step` runs it with --mixed-precision bf16
--gradient-checkpointing (frozen weights bf16, text encoder freed): every network is built from
fake tensors (`torch._subclasses.FakeTensorMode`: shapes, dtypes and autograd, no data), two
steps run (the first creates the optimizer states), and a dispatch mode adds up the bytes of the
tensor storages alive after every operation. What a GPU adds on top (CUDA context, allocator
rounding and fragmentation, cuDNN workspaces) is not in it. Autograd cannot run fake CUDA tensors
without a GPU, so the fake step runs on the cpu, with CUDA autocast's fp32 ops emulated (see
`_cuda_autocast_policy`). For the tiny size the same step also runs on real tensors, as a check of
the accounting (it gives the same bytes); `--real` does that for every size, on the GPU if there is
one, where it also reports torch's peaks (max allocated and reserved over both steps) and the time
of the second step: the check of the estimate. `--cap-gib 22` makes torch's allocator refuse more
than 22 GiB, so a step that would not fit a 24 GB card fails with an out-of-memory error.

    python benchmarks/train_step.py --unpaired-memory --real --real-only --sizes full --resolution 512 \
        --cap-gib 22
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
GIB = 2**30


def _full_base(device, dtype):
    import torch

    from turbo.fast.bench import random_base  # SD-Turbo's full-size architecture, random weights

    return random_base(torch.device(device), dtype)


# The discriminator's CLIP vision tower in the "tiny" cases (the "full" ones use ViT-B/32).
TINY_VISION = dict(
    image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
    num_attention_heads=2, projection_dim=16,
)  # fmt: skip


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
            vision_config=TINY_VISION,
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


# ---- unpaired step: tensor memory without a GPU (--unpaired-memory) ------------------------------


def _memory_tools():
    """The dispatch modes of the estimate (built on first use: torch is imported late)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten
    from torch.utils.weak import WeakIdKeyDictionary

    class TensorMemory(TorchDispatchMode):
        """Bytes of the live tensor storages: those made by operations inside the mode and those passed
        to `track`. A storage is counted once, however many views share it, until it is freed."""

        def __init__(self) -> None:
            super().__init__()
            self._counted = WeakIdKeyDictionary()
            self.current = self.peak = 0

        def track(self, *tensors) -> None:
            for t in tensors:
                storage = t.untyped_storage()
                if storage in self._counted:
                    continue
                self._counted[storage] = n = storage.nbytes()
                self.current += n
                weakref.finalize(storage, self._free, n)
            self.peak = max(self.peak, self.current)

        def _free(self, n: int) -> None:
            self.current -= n

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.track(*(t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)))
            return out

    class NoValues(TorchDispatchMode):
        """Fake tensors hold no values: code that reads one as a python number (a logged loss, Adam's
        step count, the noise schedule's alpha) reads 1.0. Values never decide what is allocated here."""

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                return 1.0
            return func(*args, **(kwargs or {}))

    return TensorMemory, NoValues


@contextlib.contextmanager
def _fake_tensors(fake: bool):
    """FakeTensorMode for building and running the networks (a no-op when not `fake`)."""
    if not fake:
        yield
        return
    import torch
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    _, NoValues = _memory_tools()
    real_swap = torch.utils.swap_tensors

    def swap(t1, t2):
        # Module.to() swaps each parameter for its converted copy, which torch refuses for tensors
        # with a weak reference, as every FakeTensor has; replacing the data does the same job here.
        if isinstance(t1, FakeTensor):
            t1.data = t2.data
        else:
            real_swap(t1, t2)

    torch.utils.swap_tensors = swap
    try:
        # real tensors (token ids, the scheduler's tables) are converted on first use
        with FakeTensorMode(allow_non_fake_inputs=True), NoValues():
            yield
    finally:
        torch.utils.swap_tensors = real_swap


@contextlib.contextmanager
def _cuda_autocast_policy():
    """CUDA autocast runs group_norm, layer_norm and softmax in fp32 (their outputs, saved for the
    backward, are fp32) where cpu autocast keeps them in the input's bf16: upcast them as CUDA autocast
    would, so that the cpu-run estimate is the GPU's. (Both send convs, linears, matmuls and attention
    to bf16; the other ops on CUDA's fp32 list only see small or already-fp32 tensors here.) The
    functions are replaced rather than intercepted by a mode, which the checkpoints' recomputation
    inside the backward would not see."""
    import torch
    import torch.nn.functional as F
    from torch.utils._pytree import tree_map_only

    def in_fp32(fn):
        def run(*args, **kwargs):
            if torch.is_autocast_enabled("cpu"):
                args, kwargs = tree_map_only(
                    torch.Tensor, lambda t: t.float() if t.is_floating_point() else t, (args, kwargs)
                )
            return fn(*args, **kwargs)

        return run

    real = {name: getattr(F, name) for name in ("group_norm", "layer_norm", "softmax", "log_softmax")}
    for name, fn in real.items():
        setattr(F, name, in_fp32(fn))
    try:
        yield
    finally:
        for name, fn in real.items():
            setattr(F, name, fn)


def _networks(size: str, device, dtype):
    """Base (SD-Turbo's shapes for "full", the tests' tiny one otherwise), discriminator, LPIPS."""
    import torch
    from diffusers import DDPMScheduler
    from transformers import CLIPConfig, CLIPVisionModelWithProjection

    from training.discriminator import CLIPDiscriminator
    from training.losses import LPIPSLoss
    from turbo.base import BaseModel, OneStepSchedule
    from turbo.fast.bench import SCHEDULER, _char_tokenizer, random_base

    if size == "full":
        base = random_base(device, dtype)
        vision = CLIPConfig().vision_config  # ViT-B/32
    else:
        from tests.tiny import tiny_text_encoder, tiny_unet, tiny_vae

        nets = [tiny_text_encoder(), tiny_unet(), tiny_vae()]
        for net in nets:
            net.requires_grad_(False).eval().to(device, dtype)
        schedule = OneStepSchedule.from_scheduler(DDPMScheduler(**SCHEDULER))
        base = BaseModel("tiny", _char_tokenizer(), *nets, schedule, torch.device(device), dtype)
        vision = CLIPConfig(vision_config=TINY_VISION).vision_config
    disc = CLIPDiscriminator(CLIPVisionModelWithProjection(vision)).to(device).train()
    disc.requires_grad_heads(True)
    return base, {"disc_a": disc, "lpips": LPIPSLoss(pretrained_trunk=False).to(device)}


def unpaired_memory(
    size: str,
    resolution: int,
    batch: int,
    fake: bool,
    frozen_dtype: str = "auto",
    cap_gib: float | None = None,
) -> dict:
    """Tensor bytes of two unpaired training steps (bf16 autocast, frozen weights in `frozen_dtype`, auto
    = bf16, gradient checkpointing): the weights, the optimizer states, and the peak of each phase of
    the second step.
    Fake tensors run on the cpu; real ones on the GPU if there is one (then torch's own peaks over both
    steps are added, and `cap_gib` limits what torch's allocator may take, as a smaller card would)."""
    import torch
    from PIL import Image

    from training.runtime import Runtime
    from training.unpaired import UnpairedConfig, UnpairedTrainer

    TensorMemory, _ = _memory_tools()
    on_gpu = not fake and torch.cuda.is_available()
    if on_gpu and cap_gib:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * GIB / total))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for domain in "AB":
            (tmp / f"train_{domain}").mkdir()
            Image.new("RGB", (resolution, resolution)).save(tmp / f"train_{domain}" / "0.png")
        (tmp / "fixed_prompt_a.txt").write_text("a photo in the day\n")
        (tmp / "fixed_prompt_b.txt").write_text("a photo at night\n")
        cfg = UnpairedConfig(
            dataset=str(tmp), output=str(tmp / "out"), train_image_prep="no_resize", batch_size=batch,
            max_steps=2, eval_every=0, checkpoint_every=0, report_to="none", cpu=not on_gpu,
            mixed_precision="bf16", frozen_dtype=frozen_dtype, gradient_checkpointing=True,
            lpips_pretrained=False, track_dino=False,
        )  # fmt: skip
        rt = Runtime(cfg)
        with _fake_tensors(fake):
            base, networks = _networks(size, rt.device, rt.frozen_dtype)
            trainer = UnpairedTrainer(cfg, rt, base=base, networks=networks)
            a, b = (torch.rand(batch, 3, resolution, resolution, device=rt.device) * 2 - 1 for _ in range(2))
            mem = TensorMemory()
            nets = [trainer.gen, trainer.disc["a"], trainer.disc["b"], trainer.lpips]
            tensors = [t for n in nets for t in (*n.parameters(), *n.buffers())]
            mem.track(*tensors, *trainer.emb.values(), a, b)
            weights = mem.current
            trainable = sum(p.numel() * p.element_size() for p in trainer.params)
            phases = []
            real_update = trainer._gen_update

            def update_and_mark_phase():  # the generator updates end the cycle, GAN and identity phases
                real_update()
                phases.append(mem.peak)
                mem.peak = mem.current

            trainer._gen_update = update_and_mark_phase
            policy = contextlib.nullcontext() if on_gpu else _cuda_autocast_policy()
            with mem, policy:
                trainer.train_step([(a, b)])  # creates the optimizer states
                after_first = mem.current
                phases.clear()
                mem.peak = mem.current
                if on_gpu:
                    torch.cuda.synchronize()
                start = time.perf_counter()
                trainer.train_step([(a, b)])
                if on_gpu:
                    torch.cuda.synchronize()
                step_s = time.perf_counter() - start
            phases.append(mem.peak)  # the discriminator phase
        rt.close()
    return {
        "size": size, "resolution": resolution, "batch": batch, "frozen": str(rt.frozen_dtype)[6:],
        "tensors": f"{'fake' if fake else 'real'}, {rt.device.type}",
        "weights_gib": weights / GIB, "trainable_gib": trainable / GIB,
        "optimizer_gib": (after_first - weights) / GIB, "phases_gib": [p / GIB for p in phases],
        "peak_gib": max(phases) / GIB,
        "cuda_max_allocated_gib": torch.cuda.max_memory_allocated() / GIB if on_gpu else None,
        "cuda_max_reserved_gib": torch.cuda.max_memory_reserved() / GIB if on_gpu else None,
        "cap_gib": cap_gib if on_gpu else None, "step_s": step_s,
    }  # fmt: skip


def print_unpaired_memory(args: argparse.Namespace) -> None:
    print("| size | resolution | batch | frozen weights | tensors | weights (trainable) | optimizer states | "
          "peak: cycle / GAN / identity / discriminators | peak tensor memory (GiB) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for size in args.sizes:
        res = args.resolution if size == "full" else args.tiny_resolution
        # real tensors too for the tiny size: a check that the fake run counts the same bytes
        kinds = (True, False) if size == "tiny" or args.real else (True,)
        for fake in kinds[1:] if args.real_only else kinds:
            case = dict(
                size=size, resolution=res, batch=args.batch, fake=fake, frozen_dtype=args.frozen_dtype,
                cap_gib=args.cap_gib,
            )  # fmt: skip
            r = _one_process(case, "--one-memory")
            row = f"| {size} | {res} | {args.batch} | "
            if "error" in r:
                print(row + f"{args.frozen_dtype} | fake={fake} | failed: {r['error']} |")
                continue
            phases = " / ".join(f"{p:.3f}" for p in r["phases_gib"])
            peak = f"{r['peak_gib']:.3f}"
            if r["cuda_max_allocated_gib"] is not None:
                cap = f", allocator capped at {r['cap_gib']} GiB" if r["cap_gib"] else ""
                peak += (
                    f" (cuda, both steps: max allocated {r['cuda_max_allocated_gib']:.3f}, max reserved "
                    f"{r['cuda_max_reserved_gib']:.3f}{cap}; second step {r['step_s']:.2f} s with every op "
                    "counted: not a training speed)"
                )
            row += f"{r['frozen']} | {r['tensors']} | {r['weights_gib']:.3f} ({r['trainable_gib']:.3f}) | "
            print(row + f"{r['optimizer_gib']:.3f} | {phases} | {peak} |", flush=True)


def _one_process(case: dict, flag: str) -> dict:
    """Run one case in a fresh process (peaks and fake-tensor state per process); its RESULT line."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, __file__, flag, json.dumps(case)], capture_output=True, text=True,
        env=os.environ | {"PYTHONPATH": path},
    )  # fmt: skip
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {"error": proc.stderr.strip()[-300:]}
    return json.loads(lines[-1][7:])


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
    p.add_argument(
        "--unpaired-memory", action="store_true",
        help="estimate the tensor memory of an unpaired bf16 step instead (fake tensors, no GPU needed)",
    )  # fmt: skip
    p.add_argument(
        "--real", action="store_true",
        help="with --unpaired-memory: every size on real tensors too (on a GPU: the check of the estimate)",
    )  # fmt: skip
    p.add_argument("--real-only", action="store_true", help="with --real: skip the fake-tensor estimate")
    p.add_argument(
        "--cap-gib", type=float, default=None,
        help="with --real on a GPU: let torch's allocator take at most this much, as a smaller card would",
    )  # fmt: skip
    p.add_argument("--frozen-dtype", default="auto", choices=["auto", "fp32"], help="with --unpaired-memory")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    p.add_argument("--one-memory", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_case(**json.loads(args.one))), flush=True)
        return
    if args.one_memory:
        print("RESULT " + json.dumps(unpaired_memory(**json.loads(args.one_memory))), flush=True)
        return
    if args.unpaired_memory:
        print_unpaired_memory(args)
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
                    size=size, ckpt=ckpt, mp=mp, resolution=res, steps=args.steps, batch=args.batch,
                    cpu=args.cpu, threads=args.threads,
                )  # fmt: skip
                r = _one_process(case, "--one")
                if "error" in r:
                    print(f"| {size} | {res} | {args.batch} | {ckpt} | {mp} | failed: {r['error']} | |")
                    continue
                print(
                    f"| {size} | {res} | {r['batch']} | {'on' if ckpt else 'off'} | {mp} | "
                    f"{r['step_s']:.2f} | "
                    f"{r['peak_gib']:.2f} ({r['peak_kind']}, {r['device']}) |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
