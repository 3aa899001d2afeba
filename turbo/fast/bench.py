"""`python -m turbo.fast.bench`: latency and peak memory of the plain path, the fast path and each
optimisation.

Builds the full-size SD-Turbo architecture with random weights (no download; or `--base` a local
diffusers folder), adds randomised models of each kind (paired, stochastic paired with a twin first
conv, unpaired with two directions), and prints markdown tables:

- per size: median per-image latency after warm-up, peak memory, the ratio to the plain path and
  the largest pixel difference to the plain path's image, for
  plain       what the original code does: peft LoRA unfolded, prompt encoded every call, no_grad
  fast        our default (turbo.fast.path.FastPath with the prompt embedding cached)
  +fold, +fold +subpixel, (+fold +CUDA graph, +fold +split GroupNorm), +prompt cache, +channels_last,
              +inference_mode: each optimisation alone on top of plain (subpixel upsampling, CUDA
              graphs and the split GroupNorm need the fold; the last two are CUDA only); on CUDA
              also the default without channels_last, with PyTorch's GroupNorm, and without both
  compiled / other dtypes (plain and fast in each) / cuDNN's autotuner, when asked (--compile,
              --dtypes, --cudnn-benchmark); on CUDA, fp32 runs without TF32 unless --tf32
- the direction-switch time of the fast path (refold with exact restore of the base), and the
  memory it keeps to restore the base exactly;
- with --compile, the first image after each kind of switch on the compiled path, and the graphs it
  compiled (none expected: switches write the weights in place);
- with --profile-switch / --profile-forward FILE, torch.profiler's table of a steady-state switch /
  of one fast-path image (eager), to see where the time goes.

Peak memory is the process's peak resident set on the cpu (reset before each variant through
/proc/self/clear_refs), and torch's peak allocation on cuda.

python -m turbo.fast.bench --sizes 256 512 --repeats 3
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import itertools
import json
import statistics
import string
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# from their own packages rather than diffusers' top level, whose lazy imports show type checkers
# placeholder classes
from diffusers.models import AutoencoderKL, UNet2DConditionModel
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler
from torch import nn
from tqdm import tqdm
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from turbo.base import DTYPES, BaseModel, OneStepSchedule, load_base, resolve_device
from turbo.fast.path import FastOptions, FastPath
from turbo.generator import Generator

# Numbers from stabilityai/sd-turbo's config files (see the architecture notes in the README).
UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True,
    norm_num_groups=32, act_fn="silu", flip_sin_to_cos=True, freq_shift=0,
)  # fmt: skip
VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
    layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, act_fn="silu",
    scaling_factor=0.18215, sample_size=768,
)  # fmt: skip
TEXT: dict[str, Any] = dict(  # CLIPTextConfig's keyword arguments
    vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
    num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu", projection_dim=512,
)  # fmt: skip
SCHEDULER = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
    prediction_type="epsilon", timestep_spacing="trailing", steps_offset=1,
)  # fmt: skip
PROMPT = "a photo of a red house by a lake"


def _char_tokenizer() -> CLIPTokenizer:
    """A CLIP tokenizer over single characters: the real BPE files would need a download, and
    tokenizing is a negligible part of a forward."""
    chars = string.ascii_lowercase + string.digits + ".,'-"
    tokens = ["!", *chars, *(c + "</w>" for c in chars), "<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(
        vocab={t: i for i, t in enumerate(tokens)}, merges=[], pad_token="!", model_max_length=77
    )


def random_base(device: torch.device, dtype: torch.dtype) -> BaseModel:
    """SD-Turbo's full-size networks with random weights, frozen and in eval mode."""
    tokenizer = _char_tokenizer()
    ids = tokenizer.convert_tokens_to_ids(["<|startoftext|>", "<|endoftext|>"])
    assert isinstance(ids, list)  # a list of tokens gives a list of ids
    torch.manual_seed(0)
    with torch.device(device):  # initialised where they run: a GPU draws 1.3 B random weights in no time
        text = CLIPTextModel(CLIPTextConfig(**TEXT, pad_token_id=0, bos_token_id=ids[0], eos_token_id=ids[1]))
        unet, vae = UNet2DConditionModel(**UNET), AutoencoderKL(**VAE)
    for net in (text, unet, vae):
        net.requires_grad_(False).eval().to(device, dtype)
    schedule = OneStepSchedule.from_scheduler(DDPMScheduler(**SCHEDULER))
    return BaseModel("random sd-turbo", tokenizer, text, unet, vae, schedule, device, dtype)


def add_random_models(gen: Generator, unpaired_rank: int, seed: int = 0) -> None:
    """One model of each kind with every trained tensor randomised (ranks of the released models)."""
    gen.new_model("paired", "paired", rank_unet=8, rank_vae=4)
    gen.new_model("stochastic", "paired", stochastic=True, rank_unet=8, rank_vae=4)
    gen.new_model("unpaired", "unpaired", rank_unet=unpaired_rank, rank_vae=4)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in gen.models:
            for p in gen.trainable_parameters(name):
                noise = torch.randn(p.shape, generator=g).to(p.device, p.dtype)
                # LoRA B starts at zero: give it a delta of a few percent of the base weights.
                p.add_(noise * (0.005 if p.abs().max() == 0 else 0.1 * p.float().std().nan_to_num(0.01)))
                p.requires_grad_(False)


# ---- measuring ----
def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed memory back, so peaks start from the floor
    except OSError:
        pass


def _reset_peak(device: torch.device) -> None:
    _trim()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@dataclass
class Row:
    name: str
    size: int
    ms: float
    peak_mb: float
    diff: float  # largest difference to the plain image, in 1/255 units

    def cells(self, plain: Row) -> list[str]:
        return [
            self.name,
            f"{self.ms:,.0f}",
            f"{self.ms / plain.ms:.2f}",
            f"{self.peak_mb:,.0f}",
            f"{self.diff:.3f}",
        ]


@dataclass
class Variant:
    name: str
    options: FastOptions | None  # None: Generator.forward, as the original code runs
    cache_prompt: bool
    dtype: torch.dtype | None = None
    cudnn_benchmark: bool = False  # let cuDNN time its conv algorithms for each new shape


def variants(args: argparse.Namespace, device: torch.device) -> list[Variant]:
    def opts(**on) -> FastOptions:  # every fast variant restores the base as --restore says
        return FastOptions(restore=args.restore, **on)

    off = dict(fold=False, channels_last=False, inference_mode=False, subpixel=False, cuda_graph=False)
    off["split_group_norm"] = False
    folds = [
        ("+ fold LoRA only", {"fold": True}),
        ("+ fold + subpixel upsampling", {"fold": True, "subpixel": True}),
    ]
    if device.type == "cuda":  # graphs and the split GroupNorm run folded networks, on CUDA only
        folds.append(("+ fold + CUDA graph", {"fold": True, "cuda_graph": True}))
        folds.append(("+ fold + split GroupNorm", {"fold": True, "split_group_norm": True}))
    others = [
        ("+ channels_last only", {"channels_last": True}),
        ("+ inference_mode only", {"inference_mode": True}),
    ]
    out = [
        Variant(f"plain (original: unfolded LoRA, text every call, {args.dtype})", None, False),
        Variant("fast (default)", opts(), True),
        *(Variant(name, opts(**{**off, **on}), False) for name, on in folds),
        Variant("+ prompt cache only", None, True),
        *(Variant(name, opts(**{**off, **on}), False) for name, on in others),
    ]
    if args.compile:
        out.append(Variant("fast + torch.compile", opts(compile=True), True))
    if args.cudnn_benchmark:
        out.append(Variant("fast + cudnn.benchmark", opts(), True, cudnn_benchmark=True))
    if device.type == "cuda":
        # CUDA's GroupNorm has no channels_last kernel (it returns contiguous outputs), so on a GPU
        # channels_last may cost two layout copies per norm + conv pair: measure the default without it.
        out.append(Variant("fast without channels_last", opts(channels_last=False), True))
        out.append(Variant("fast with PyTorch's GroupNorm", opts(split_group_norm=False), True))
        no_split = opts(channels_last=False, split_group_norm=False)
        out.append(Variant("fast with PyTorch's GroupNorm, without channels_last", no_split, True))
    for name in args.dtypes:  # the plain path in that dtype too: its difference is the dtype's own
        out.append(Variant(f"plain, {name}", None, False, DTYPES[name]))
        out.append(Variant(f"fast, {name}", opts(compile=args.compile), True, DTYPES[name]))
    return out


def _set_format(gen: Generator, channels_last: bool) -> None:
    gen.unfold()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    # as nn.Module: diffusers' `@wraps(Module.to)` on its models' `to` reads as unbound to mypy
    nets: tuple[nn.Module, ...] = (gen.unet, gen.vae)
    for net in nets:
        net.to(memory_format=fmt)


def _set_dtype(gen: Generator, base: BaseModel, dtype: torch.dtype) -> None:
    gen.unfold()
    gen.to(dtype)
    # as nn.Module: transformers' `@wraps(Module.to)` on its models' `to` reads as unbound to mypy
    text: nn.Module = base.text_encoder
    text.to(dtype)
    base.dtype = dtype


def _runner(gen: Generator, base: BaseModel, v: Variant, model: str, gamma: float) -> Callable:
    # Every variant starts from contiguous weights: FastPath converts them only when its option asks,
    # so a variant without channels_last would otherwise inherit the previous variant's layout.
    _set_format(gen, False)
    fast = FastPath(gen, v.options) if v.options is not None else None
    cached = base.encode_prompt(PROMPT) if v.cache_prompt else None

    def run(x: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        emb = cached if cached is not None else base.encode_prompt(PROMPT)
        if fast is not None:
            return fast(x, emb, model, "a2b", gamma, noise)
        with torch.no_grad():
            return gen(x, emb, model, "a2b", gamma, noise)

    return run


def measure(
    gen, base, v: Variant, size: int, args, reference: torch.Tensor | None
) -> tuple[Row, torch.Tensor]:
    dev = base.device
    g = torch.Generator().manual_seed(size)
    x = torch.rand(args.batch, 3, size, size, generator=g).to(dev)
    noise = torch.randn(1, 4, size // 8, size // 8, generator=g).to(dev) if args.gamma < 1 else None
    run = _runner(gen, base, v, args.model, args.gamma)
    before, torch.backends.cudnn.benchmark = torch.backends.cudnn.benchmark, v.cudnn_benchmark
    try:
        for _ in range(args.warmup):
            run(x, noise)
        _reset_peak(dev)
        times = []
        for _ in range(args.repeats):
            _sync(dev)
            start = time.perf_counter()
            out = run(x, noise)
            _sync(dev)
            times.append((time.perf_counter() - start) * 1000 / args.batch)
    finally:
        torch.backends.cudnn.benchmark = before
    peak = _peak_mb(dev)
    out = out.float().cpu()
    diff = 0.0 if reference is None else ((out - reference).abs().max().item() / 2 * 255)
    return Row(v.name, size, statistics.median(times), peak, diff), out


def switch_times(gen: Generator, args, device: torch.device) -> list[list[str]]:
    """Median time of the fast path's refold for each kind of switch and each restore mode in
    `args.switch_restores` (interleaved: each repeat times every mode once), and what each keeps."""
    modes = args.switch_restores or [args.restore]
    cases = [
        ("paired -> unpaired a2b (UNet + VAE)", ("paired", "a2b", 1.0), ("unpaired", "a2b", 1.0)),
        ("unpaired a2b -> b2a (VAE only)", ("unpaired", "a2b", 1.0), ("unpaired", "b2a", 1.0)),
        ("stochastic gamma 0.4 -> 0.6 (UNet + VAE)", ("stochastic", "a2b", 0.4), ("stochastic", "a2b", 0.6)),
    ]
    rows = []
    for label, start, end in tqdm(cases, desc="switches", leave=False):
        times: dict[str, list[float]] = {m: [] for m in modes}
        kept = {}
        fasts = {m: FastPath(gen, FastOptions(restore=m)) for m in modes}
        for _ in range(args.switch_repeats):
            for mode, fast in fasts.items():
                fast.fold(*start)  # also the first fold's copies, when the mode takes them
                _sync(device)
                t = time.perf_counter()
                fast.fold(*end)
                _sync(device)
                times[mode].append((time.perf_counter() - t) * 1000)
                kept[mode] = fast.restore_bytes() / 2**20
        gen.unfold()  # time the plain path's switch alone, not the restore
        plain = time.perf_counter()
        gen.activate(*end)
        plain = (time.perf_counter() - plain) * 1000
        for mode in modes:
            ms = f"{statistics.median(times[mode]):,.0f}"
            rows.append([label, mode, ms, f"{min(times[mode]):,.0f}", f"{kept[mode]:,.1f}", f"{plain:.1f}"])
    gen.unfold()
    return rows


def compiled_switches(gen: Generator, base: BaseModel, args, device: torch.device) -> list[list[str]]:
    """The first image after each kind of switch on a compiled fast path, and how many graphs it
    compiled: folding writes the weights in place, so a switch should compile nothing."""
    from torch._dynamo.utils import counters

    fast = FastPath(gen, FastOptions(compile=True, restore=args.restore))
    emb = base.encode_prompt(PROMPT)
    size = args.sizes[0]
    g = torch.Generator().manual_seed(size)
    x = torch.rand(1, 3, size, size, generator=g).to(device)
    noise = torch.randn(1, 4, size // 8, size // 8, generator=g).to(device)
    order = [
        ("paired", "a2b", 1.0), ("unpaired", "a2b", 1.0), ("unpaired", "b2a", 1.0),
        ("stochastic", "a2b", 0.4), ("stochastic", "a2b", 0.6), ("paired", "a2b", 1.0),
    ]  # fmt: skip
    fast(x, emb, *order[0])  # compiles
    rows = []
    for before, after in itertools.pairwise(order):
        graphs = counters["stats"]["unique_graphs"]
        _sync(device)
        start = time.perf_counter()
        fast(x, emb, *after, noise if after[2] < 1 else None)
        _sync(device)
        ms = (time.perf_counter() - start) * 1000
        label = f"{before[0]} {before[1]} {before[2]} -> {after[0]} {after[1]} {after[2]}"
        rows.append([label, f"{ms:,.1f}", str(counters["stats"]["unique_graphs"] - graphs)])
    gen.unfold()
    return rows


def _profile(fn: Callable[[], object], device: torch.device, sort_by: str) -> str:
    """torch.profiler's table of one call of `fn` (25 rows)."""
    from torch.profiler import ProfilerActivity, profile

    _sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        _sync(device)
    return prof.key_averages().table(sort_by=sort_by, row_limit=25)


def profile_switch(gen: Generator, args, device: torch.device) -> None:
    """The profile (by self cpu time: launches and host syncs) of a paired -> unpaired switch in the
    steady state, written to `args.profile_switch`."""
    fast = FastPath(gen, FastOptions(restore=args.restore))
    for model in ("paired", "unpaired", "paired"):  # steady state: restore-by-copy copies taken
        fast.fold(model)
    text = _profile(lambda: fast.fold("unpaired", "a2b"), device, "self_cpu_time_total")
    args.profile_switch.write_text(text)
    gen.unfold()


def profile_forward(gen: Generator, base: BaseModel, args, device: torch.device) -> None:
    """The profile of one default fast-path image at the first size, run eagerly (a CUDA graph's replay
    would hide its kernels), by self device time on CUDA; written to `args.profile_forward`."""
    fast = FastPath(gen, FastOptions(restore=args.restore, cuda_graph=False))
    emb = base.encode_prompt(PROMPT)
    size = args.sizes[0]
    x = torch.rand(args.batch, 3, size, size, generator=torch.Generator().manual_seed(size)).to(device)
    for _ in range(2):  # warm: the fold, cuDNN's handles
        fast(x, emb, "paired")
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    args.profile_forward.write_text(_profile(lambda: fast(x, emb, "paired"), device, sort_by))
    gen.unfold()


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m turbo.fast.bench", description=__doc__.split("\n")[0])
    p.add_argument(
        "--sizes", type=int, nargs="+", default=[256, 512], help="square image sizes (multiples of 8)"
    )
    p.add_argument("--repeats", type=int, default=3, help="timed runs per variant (the median is reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--batch", type=int, default=1, help="images per forward (latency is per image)")
    p.add_argument("--device", default=None, help="cuda, cpu (default: the best available)")
    p.add_argument(
        "--dtype", choices=list(DTYPES), default="fp32", help="dtype of the plain path and the fast one"
    )
    p.add_argument("--dtypes", choices=list(DTYPES), nargs="*", default=[], help="extra fast-path rows")
    p.add_argument("--compile", action="store_true", help="add a torch.compile row")
    p.add_argument(
        "--tf32", action="store_true",
        help="let CUDA fp32 convs and matmuls use TF32 (off by default: fp32 rows are compared to 1/255)",
    )  # fmt: skip
    p.add_argument("--model", choices=["paired", "stochastic", "unpaired"], default="paired")
    p.add_argument("--gamma", type=float, default=1.0, help="< 1 for the stochastic model")
    p.add_argument("--only", nargs="*", help="run only the variants whose name starts with one of these")
    p.add_argument("--switch-repeats", type=int, default=3)
    p.add_argument(
        "--restore", choices=["auto", "record", "copy"], default="auto",
        help="how the fast path restores the base on a switch (FastOptions.restore)",
    )  # fmt: skip
    p.add_argument(
        "--switch-restores", nargs="*", choices=["auto", "record", "copy"], default=[],
        help="time the switches with each of these restore modes, interleaved (default: --restore)",
    )  # fmt: skip
    p.add_argument("--unpaired-rank", type=int, default=128, help="UNet LoRA rank of the unpaired model")
    p.add_argument("--base", help="a local diffusers folder instead of random full-size weights")
    p.add_argument("--json", type=Path, help="also write the rows as JSON here")
    p.add_argument(
        "--cudnn-benchmark", action="store_true",
        help="add a row with torch.backends.cudnn.benchmark on (CUDA only: cuDNN times its algorithms)",
    )  # fmt: skip
    p.add_argument("--profile-switch", type=Path, help="write a profile of one UNet + VAE switch here")
    p.add_argument(
        "--profile-forward", type=Path,
        help="write a profile of one fast-path image (eager, at the first size) here",
    )  # fmt: skip
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.model != "stochastic" and args.gamma != 1:
        raise SystemExit("error: --gamma < 1 needs --model stochastic")
    device = resolve_device(args.device)
    if args.cudnn_benchmark and device.type != "cuda":
        raise SystemExit("error: --cudnn-benchmark needs a CUDA device")
    dtype = DTYPES[args.dtype]
    if device.type == "cuda":  # PyTorch lets cuDNN's fp32 convs use TF32 unless told otherwise
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = args.tf32
    start = time.perf_counter()
    base = load_base(args.base, device, dtype) if args.base else random_base(device, dtype)
    gen = Generator(base).eval()
    add_random_models(gen, args.unpaired_rank)
    built = time.perf_counter() - start
    every = variants(args, device)
    chosen = every[:1] + [v for v in every[1:] if not args.only or v.name.startswith(tuple(args.only))]
    rows: list[Row] = []
    with tqdm(total=len(args.sizes) * len(chosen), desc="benchmark") as bar:
        for size in args.sizes:
            reference = None
            for v in chosen:  # plain first: every other row is compared with it
                bar.set_postfix_str(f"{size}px {v.name.split(' (')[0]}")
                if v.dtype is not None and v.dtype != base.dtype:
                    _set_dtype(gen, base, v.dtype)
                row, out = measure(gen, base, v, size, args, reference)
                reference = out if reference is None else reference
                rows.append(row)
                bar.update()
            if base.dtype != dtype:  # back to the main dtype for the next size
                _set_dtype(gen, base, dtype)
    switches = switch_times(gen, args, device)
    compiled = compiled_switches(gen, base, args, device) if args.compile else []
    if args.profile_switch:
        profile_switch(gen, args, device)
    if args.profile_forward:
        profile_forward(gen, base, args, device)

    if device.type == "cuda":
        name = f"{torch.cuda.get_device_name()} (TF32 {'on' if args.tf32 else 'off'})"
    else:
        name = f"cpu ({torch.get_num_threads()} threads)"
    print(
        f"\n{name}, torch {torch.__version__}, {args.dtype}, model {args.model}, gamma {args.gamma}, "
        f"batch {args.batch}, median of {args.repeats} after {args.warmup} warm-up; built in {built:.0f} s\n"
    )
    for size in args.sizes:
        sized = [r for r in rows if r.size == size]
        header = [f"{size}x{size}", "ms / image", "x plain", "peak MB", "max diff (1/255)"]
        print(table(header, [r.cells(sized[0]) for r in sized]) + "\n")
    header = ["switch (fast path)", "restore", "median ms", "best ms", "kept for exact restore, MB"]
    print(table([*header, "plain activate, ms"], switches))
    if compiled:
        header = [
            f"compiled fast path, {args.sizes[0]}px: first image after a switch",
            "ms",
            "graphs compiled",
        ]
        print("\n" + table(header, compiled))
    if args.json:
        result = {"rows": [vars(r) for r in rows], "switches": switches, "compiled_switches": compiled}
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
