"""pix2pix-turbo training: `python -m training.paired --dataset DIR --output DIR [...]`.

The objective is the paper's (and the original train_pix2pix_turbo.py's), in the original's order
within one step:

1. reconstruction + text: lambda_l2 * L2 + lambda_lpips * LPIPS(VGG) + lambda_clipsim * (1 - CLIP
   similarity / 100); clip the gradient norm; generator optimizer step;
2. generator GAN step on a fresh forward pass: lambda_gan * D(G(x), for_G) with the discriminator's
   heads frozen (they take no gradient here, unlike the original where it leaked into step 3);
3. discriminator on the targets (real), then on step 2's outputs, detached (fake): two steps.

`--stochastic` trains the diverse-output (gamma) model of the paper: a twin first conv, per-sample
gamma ~ U[0, 1], a noise map z blended into the latent, and the reconstruction terms (L2, LPIPS) of each
sample weighted by its gamma. With gradient accumulation each of the four updates accumulates over the
micro-batches before stepping. LR schedules advance once per step (the original advanced the
generator's twice, which only matters for non-constant schedules).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.optimization import get_scheduler

from training.config import CommonConfig, ConfigError, add_common_arguments, config_from_args
from training.data import PairedDataset
from training.frozen import build_clip_similarity, build_discriminator, build_lpips
from training.metrics import psnr
from training.runtime import Runtime, save_grid
from training.sampler import Position, ResumableBatchSampler, batches
from training.state import CheckpointWriter, ResumeError, load_state, resolve_checkpoint, set_rng_state
from turbo.base import BaseModel, load_base
from turbo.checkpoint import TurboCheckpoint, load_checkpoint, save_checkpoint
from turbo.generator import Generator

logger = logging.getLogger(__name__)

MODEL = "train"  # the name of the model being trained inside the Generator
INPUT_KINDS = ("auto", "canny", "sketch", "none")


@dataclass
class PairedConfig(CommonConfig):
    """Paired-training options on top of CommonConfig; defaults are the original's."""

    lambda_gan: float = 0.5
    lambda_lpips: float = 5.0
    lambda_l2: float = 1.0
    lambda_clipsim: float = 5.0
    gan_loss_type: str = "multilevel_sigmoid_s"
    rank_unet: int = 8
    rank_vae: int = 4
    stochastic: bool = False
    init_from: str | None = None
    default_prompt: str | None = None
    input: str = "auto"
    eval_gamma: float = 1.0

    def validate(self) -> None:
        super().validate()
        for f in ("lambda_gan", "lambda_lpips", "lambda_l2", "lambda_clipsim"):
            if getattr(self, f) < 0:
                raise ConfigError(f"--{f.replace('_', '-')} must be 0 or more, got {getattr(self, f)}")
        if self.input not in INPUT_KINDS:
            raise ConfigError(f"--input {self.input!r} is not one of {', '.join(INPUT_KINDS)}")
        if not 0.0 <= self.eval_gamma <= 1.0:
            raise ConfigError(f"--eval-gamma must lie in [0, 1], got {self.eval_gamma}")
        if self.eval_gamma < 1 and not self.stochastic:
            raise ConfigError("--eval-gamma below 1 needs --stochastic")
        if self.frozen_dtype not in ("auto", "fp32") and self.mixed_precision == "no":
            raise ConfigError(
                "--frozen-dtype fp16/bf16 needs --mixed-precision (trainable weights stay fp32)"
            )


@dataclass
class TrainResult:
    """What a finished run returns (on every process)."""

    step: int
    checkpoint: TurboCheckpoint
    metrics: dict[str, float] = field(default_factory=dict)  # the last validation's
    first_metrics: dict[str, float] = field(default_factory=dict)  # validation before training (fresh runs)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.paired", description=__doc__.split("\n\n")[0])
    add_common_arguments(p)
    d = PairedConfig("", "")
    g = p.add_argument_group("paired objective and model")
    g.add_argument("--lambda-gan", type=float, default=d.lambda_gan)
    g.add_argument("--lambda-lpips", type=float, default=d.lambda_lpips)
    g.add_argument("--lambda-l2", type=float, default=d.lambda_l2)
    g.add_argument("--lambda-clipsim", type=float, default=d.lambda_clipsim)
    g.add_argument(
        "--gan-loss-type", default=d.gan_loss_type, choices=("multilevel_sigmoid_s", "multilevel_sigmoid")
    )
    g.add_argument("--rank-unet", type=int, default=d.rank_unet)
    g.add_argument("--rank-vae", type=int, default=d.rank_vae)
    g.add_argument("--stochastic", action="store_true", help="train the diverse-output (gamma) model")
    g.add_argument("--init-from", default=None, help="start from a released model name or a model file")
    g.add_argument(
        "--default-prompt", default=None, help="prompt stored in the model (default: first caption)"
    )
    g.add_argument(
        "--input",
        default=d.input,
        choices=INPUT_KINDS,
        help="how the app prepares inputs; auto: sketch if --stochastic else canny",
    )
    g.add_argument("--eval-gamma", type=float, default=d.eval_gamma, help="gamma for validation (stochastic)")
    return p


def parse_config(argv: list[str] | None = None) -> PairedConfig:
    return config_from_args(PairedConfig, build_parser().parse_args(argv))


def _as_fp32(ckpt: TurboCheckpoint) -> TurboCheckpoint:
    ckpt.unet = {k: v.float() for k, v in ckpt.unet.items()}
    ckpt.vae = {d: {k: v.float() for k, v in sd.items()} for d, sd in ckpt.vae.items()}
    return ckpt


class PairedTrainer:
    """One training run; build it on every process, then call `run()`."""

    def __init__(
        self,
        cfg: PairedConfig,
        rt: Runtime | None = None,
        base: BaseModel | None = None,
        networks: dict[str, torch.nn.Module] | None = None,
    ) -> None:
        """base / networks ("disc", "clip", "lpips"): already built ones to use instead of loading
        them from cfg (benchmarks build random full-size networks in memory)."""
        cfg.validate()
        self.cfg = cfg
        self.rt = rt or Runtime(cfg)
        rt, dev = self.rt, self.rt.device
        # Same seed everywhere while building, so every process starts from identical weights.
        rt.seed(cfg.seed, per_process=False)
        self.train_set = PairedDataset(cfg.dataset, "train", cfg.train_image_prep, seed=cfg.seed)
        self.val_set = None
        if cfg.eval_every > 0 and cfg.num_eval_samples > 0:
            if (Path(cfg.dataset) / "test_A").is_dir():
                self.val_set = PairedDataset(cfg.dataset, "test", cfg.test_image_prep, seed=cfg.seed)
            else:
                logger.warning("no test_A/ in %s: validation is off", cfg.dataset)
        self.base = base or load_base(cfg.base, device=dev, dtype=rt.frozen_dtype)
        self.gen = Generator(self.base)
        self._add_model()
        self.params = self.gen.trainable_parameters(MODEL)
        for p in self.params:
            p.data = p.data.float()  # trainable weights stay fp32 whatever the frozen dtype
        if cfg.gradient_checkpointing:
            self.gen.unet.enable_gradient_checkpointing()
            self.gen.vae.gradient_checkpointing = True
        nets = networks or {}
        self.disc = self.clip = None
        if cfg.lambda_gan > 0:
            self.disc = nets.get("disc") or build_discriminator(cfg.disc_backbone, cfg.gan_loss_type, dev)
        self.lpips = nets.get("lpips") or build_lpips(cfg.lpips_pretrained, dev)
        if cfg.lambda_clipsim > 0:
            self.clip = nets.get("clip") or build_clip_similarity(cfg.clip_model, dev)

        def adamw(params):
            return torch.optim.AdamW(
                params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay,
                eps=cfg.adam_epsilon,
            )  # fmt: skip

        def schedule(opt):
            return get_scheduler(
                cfg.lr_scheduler, optimizer=opt, num_warmup_steps=cfg.lr_warmup_steps,
                num_training_steps=cfg.max_steps, num_cycles=cfg.lr_num_cycles, power=cfg.lr_power,
            )  # fmt: skip

        opt_g = adamw(self.params)
        self.sched_g = schedule(opt_g)
        acc = rt.accelerator
        if self.disc is not None:
            opt_d = adamw(self.disc.trainable_parameters())
            self.sched_d = schedule(opt_d)
            self.gen_ddp, self.disc_ddp, self.opt_g, self.opt_d = acc.prepare(
                self.gen, self.disc, opt_g, opt_d
            )
        else:
            self.gen_ddp, self.opt_g = acc.prepare(self.gen, opt_g)
            self.disc_ddp = self.opt_d = self.sched_d = None
        self.sampler = ResumableBatchSampler(len(self.train_set), cfg.batch_size, rt.rank, rt.world, cfg.seed)
        # The loader draws a worker base seed each epoch; its own generator keeps that draw out of the
        # global RNG stream, which a resumed run must replay exactly.
        self.loader = torch.utils.data.DataLoader(
            self.train_set, batch_sampler=self.sampler, num_workers=cfg.num_workers,
            pin_memory=dev.type == "cuda", generator=torch.Generator().manual_seed(cfg.seed),
        )  # fmt: skip
        self.writer = CheckpointWriter(cfg.output, cfg.keep_last, rt.rank, rt.world, rt.barrier)
        self.step = 0
        self.name = cfg.name or Path(cfg.output).resolve().name
        self.prompt = cfg.default_prompt or self.train_set.prompts[self.train_set.names[0]]
        self.input_kind = cfg.input if cfg.input != "auto" else ("sketch" if cfg.stochastic else "canny")
        rng = self._resume() if cfg.resume else None
        # From here on each process draws its own noise, gamma and augmentations.
        rt.seed(cfg.seed + 1, per_process=True)
        if rng is not None:
            set_rng_state(rng)

    # -- model -------------------------------------------------------------------------------------

    def _add_model(self) -> None:
        cfg = self.cfg
        if cfg.init_from is None:
            self.gen.new_model(
                MODEL, "paired", cfg.stochastic, rank_unet=cfg.rank_unet, rank_vae=cfg.rank_vae
            )
            return
        path = Path(cfg.init_from)
        if not path.is_file():
            from turbo.registry import checkpoint_path

            path = checkpoint_path(cfg.init_from)
        ckpt = load_checkpoint(path)
        if ckpt.kind != "paired":
            raise ConfigError(
                f"--init-from {cfg.init_from}: a {ckpt.kind} model; paired training needs a paired one"
            )
        if cfg.stochastic and not ckpt.stochastic:
            # The twin is the base's own first conv, as in the released stochastic model.
            pretrained = self.gen.unet.conv_in.pretrained
            ckpt.unet["conv_in_pretrained.weight"] = pretrained.weight.detach().clone()
            ckpt.unet["conv_in_pretrained.bias"] = pretrained.bias.detach().clone()
            ckpt.stochastic = True
        elif ckpt.stochastic and not cfg.stochastic:
            raise ConfigError(f"--init-from {cfg.init_from} is a stochastic model: add --stochastic")
        self.gen.add_checkpoint(MODEL, ckpt)
        logger.info("starting from %s (LoRA ranks %d/%d)", path, ckpt.rank_unet, ckpt.rank_vae)

    def export(self) -> TurboCheckpoint:
        """The model trained so far, in turbo's format (fp32 tensors, prompt and input metadata)."""
        ckpt = self.gen.export(
            MODEL, prompts={"a2b": self.prompt}, input=self.input_kind, base_model=self.cfg.base
        )
        return _as_fp32(ckpt)

    # -- state -------------------------------------------------------------------------------------

    def _named_trainable(self) -> dict[str, torch.nn.Parameter]:
        ids = {id(p) for p in self.params}
        return {n: p for n, p in self.gen.named_parameters() if id(p) in ids}

    def state_dict(self, position: Position) -> dict:
        state = {
            "step": self.step,
            "epoch": position.epoch,
            "batch": position.batch,
            "generator": {n: p.detach().cpu().clone() for n, p in self._named_trainable().items()},
            "opt_g": self.opt_g.state_dict(),
            "sched_g": self.sched_g.state_dict(),
            "config": json.dumps(asdict(self.cfg)),
        }
        if self.disc is not None:
            state["discriminator"] = {k: v.cpu() for k, v in self.disc.heads_state_dict().items()}
            state["opt_d"] = self.opt_d.state_dict()
            state["sched_d"] = self.sched_d.state_dict()
        scaler = self.rt.accelerator.scaler
        if scaler is not None:
            state["scaler"] = scaler.state_dict()
        return state

    def _resume(self) -> dict | None:
        folder = resolve_checkpoint(self.cfg.resume, self.cfg.output)
        state, rng = load_state(folder, self.rt.rank)
        named = self._named_trainable()
        saved = state["generator"]
        if set(saved) != set(named):
            raise ResumeError(
                f"{folder}: its generator does not match this run's model (other ranks or --stochastic?)"
            )
        with torch.no_grad():
            for n, p in named.items():
                if saved[n].shape != p.shape:
                    raise ResumeError(
                        f"{folder}: {n} has shape {tuple(saved[n].shape)}, this run needs {tuple(p.shape)}"
                    )
                p.copy_(saved[n])
        self.opt_g.load_state_dict(state["opt_g"])
        self.sched_g.load_state_dict(state["sched_g"])
        if self.disc is not None:
            if "discriminator" not in state:
                raise ResumeError(f"{folder}: saved without a discriminator (--lambda-gan 0); keep it at 0")
            self.disc.load_heads_state_dict(state["discriminator"])
            self.opt_d.load_state_dict(state["opt_d"])
            self.sched_d.load_state_dict(state["sched_d"])
        if "scaler" in state and self.rt.accelerator.scaler is not None:
            self.rt.accelerator.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.sampler.position = Position(int(state["epoch"]), int(state["batch"]))
        if int(state.get("world_size", 1)) != self.rt.world:
            logger.warning("resuming on %d process(es), saved with %d: data order and RNG streams differ",
                           self.rt.world, state.get("world_size", 1))  # fmt: skip
            rng = None
        logger.info("resumed from %s at step %d", folder, self.step)
        return rng

    def save(self, position: Position) -> None:
        model = self.export() if self.rt.is_main else None
        self.writer.save(self.step, model, self.state_dict(position))
        if self.rt.is_main and self.cfg.publish_to:
            save_checkpoint(model, Path(self.cfg.publish_to) / f"{self.name}.safetensors")

    # -- one step ----------------------------------------------------------------------------------

    def _inputs(self, batch: dict) -> dict:
        dev = self.rt.device
        x = batch["conditioning_pixel_values"].to(dev, non_blocking=True)
        y = batch["output_pixel_values"].to(dev, non_blocking=True)
        out = {
            "x": x,
            "y": y,
            "captions": list(batch["caption"]),
            "emb": self.base.encode_prompt(list(batch["caption"])),
        }
        if self.cfg.stochastic:
            b, _, h, w = x.shape
            out["gamma"] = torch.rand(b, device=dev)
            out["noise"] = torch.randn(b, 4, h // 8, w // 8, device=dev)
        else:
            out["gamma"], out["noise"] = 1.0, None
        return out

    def _forward(self, mb: dict) -> torch.Tensor:
        return self.gen_ddp(mb["x"], mb["emb"], model=MODEL, gamma=mb["gamma"], noise=mb["noise"])

    def train_step(self, micro: list[dict]) -> dict[str, float]:
        """One optimisation step over the micro-batches (prepared by `_inputs`); returns the losses."""
        cfg, rt, acc, n = self.cfg, self.rt, self.rt.accelerator, len(micro)
        logs: dict[str, float] = {}

        def add(k, v):
            logs[k] = logs.get(k, 0.0) + float(v.detach() if torch.is_tensor(v) else v) / n

        # 1. reconstruction + CLIP similarity
        for i, mb in enumerate(micro):
            with rt.no_sync(self.gen_ddp, i == n - 1), rt.autocast():
                pred = self._forward(mb)
                l2 = F.mse_loss(pred.float(), mb["y"].float(), reduction="none").flatten(1).mean(1)
                lp = (
                    self.lpips(pred.float(), mb["y"].float())
                    if cfg.lambda_lpips > 0
                    else torch.zeros_like(l2)
                )
                if cfg.stochastic:
                    l2, lp = l2 * mb["gamma"], lp * mb["gamma"]
                loss = cfg.lambda_l2 * l2.mean() + cfg.lambda_lpips * lp.mean()
                if self.clip is not None:
                    clipsim = self.clip(pred, mb["captions"])
                    loss = loss + cfg.lambda_clipsim * clipsim
                    add("loss_clipsim", clipsim)
            acc.backward(loss / n)
            add("loss_l2", l2.mean() * cfg.lambda_l2)
            add("loss_lpips", lp.mean() * cfg.lambda_lpips)
        acc.clip_grad_norm_(self.params, cfg.max_grad_norm)
        self.opt_g.step()
        self.opt_g.zero_grad(set_to_none=True)
        if self.disc is None:
            self.sched_g.step()
            return logs
        # 2. generator GAN step (discriminator heads frozen: they take no gradient)
        fakes = []
        for i, mb in enumerate(micro):
            with rt.no_sync(self.gen_ddp, i == n - 1), rt.autocast(), self.disc.frozen_heads():
                pred = self._forward(mb)
                loss_g = self.disc(pred, for_G=True).mean() * cfg.lambda_gan
            acc.backward(loss_g / n)
            fakes.append(pred.detach())
            add("lossG", loss_g)
        acc.clip_grad_norm_(self.params, cfg.max_grad_norm)
        self.opt_g.step()
        self.opt_g.zero_grad(set_to_none=True)
        self.sched_g.step()
        # 3. discriminator: real targets, then the generator's (detached) outputs
        heads = self.disc.trainable_parameters()
        for what, images in (("real", [mb["y"] for mb in micro]), ("fake", fakes)):
            for i, img in enumerate(images):
                with rt.no_sync(self.disc_ddp, i == n - 1), rt.autocast():
                    loss_d = self.disc_ddp(img, for_real=what == "real").mean() * cfg.lambda_gan
                acc.backward(loss_d / n)
                add("lossD", loss_d)
            acc.clip_grad_norm_(heads, cfg.max_grad_norm)
            self.opt_d.step()
            self.opt_d.zero_grad(set_to_none=True)
        self.sched_d.step()
        return logs

    # -- validation --------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation on rank 0 (others wait): L2, LPIPS, PSNR (dB), CLIP similarity, FID if asked.

        Also saves a grid (input | output | target) to <output>/eval/step_<N>.png.
        """
        if self.val_set is None:
            return {}
        metrics: dict[str, float] = {}
        if self.rt.is_main:
            metrics = self._evaluate_main()
            self.rt.log(metrics, self.step)
        self.rt.barrier()
        return metrics

    def _evaluate_main(self) -> dict[str, float]:
        cfg, dev = self.cfg, self.rt.device
        count = min(cfg.num_eval_samples, len(self.val_set))
        bs = 1 if cfg.test_image_prep == "no_resize" else cfg.eval_batch_size
        subset = torch.utils.data.Subset(self.val_set, range(count))
        loader = torch.utils.data.DataLoader(subset, batch_size=bs, shuffle=False, num_workers=0)
        noise_rng = torch.Generator(device="cpu").manual_seed(cfg.seed)
        sums = {"val/l2": 0.0, "val/lpips": 0.0, "val/psnr": 0.0}
        if self.clip is not None:
            sums["val/clipsim"] = 0.0
        rows, fid_dir = [], None
        if cfg.track_fid:
            fid_dir = Path(cfg.output) / "eval" / f"fid_{self.step:08d}"
            fid_dir.mkdir(parents=True, exist_ok=True)
        for batch in loader:
            x = batch["conditioning_pixel_values"].to(dev)
            y = batch["output_pixel_values"].to(dev)
            emb = self.base.encode_prompt(list(batch["caption"]))
            b, _, h, w = x.shape
            noise = None
            if cfg.eval_gamma < 1:
                noise = torch.randn(b, 4, h // 8, w // 8, generator=noise_rng).to(dev)
            with self.rt.autocast():
                pred = self.gen(x, emb, model=MODEL, gamma=cfg.eval_gamma, noise=noise).float()
                lp = self.lpips(pred, y.float())
                if self.clip is not None:
                    sums["val/clipsim"] += float(
                        self.clip.similarity(pred, list(batch["caption"])).diagonal().sum()
                    )
            sums["val/l2"] += float(F.mse_loss(pred, y, reduction="none").flatten(1).mean(1).sum())
            sums["val/lpips"] += float(lp.sum())
            sums["val/psnr"] += float(psnr(pred, y).clamp(max=100).sum())
            for j in range(b):
                if len(rows) < cfg.num_grid:
                    rows.append([x[j].cpu() * 2 - 1, pred[j].cpu(), y[j].cpu()])
                if fid_dir is not None:
                    from turbo.preprocess import to_pil

                    to_pil(pred[j]).save(fid_dir / f"val_{len(list(fid_dir.iterdir())):05d}.png")
        metrics = {k: v / count for k, v in sums.items()}
        if rows:
            save_grid(rows, Path(cfg.output) / "eval" / f"step_{self.step:08d}.png")
        if fid_dir is not None:
            metrics["val/fid"] = self._fid(fid_dir)
        return metrics

    def _fid(self, folder: Path) -> float:
        from training.metrics import FIDExtractor, cached_stats, frechet_distance

        if not hasattr(self, "_fid_extractor"):
            self._fid_extractor = FIDExtractor(device=self.rt.device, progress=False)
        ref = cached_stats(
            str(Path(self.cfg.dataset) / "test_B"),
            self._fid_extractor,
            Path(self.cfg.output) / "eval" / "fid_ref.npz",
        )
        mu, sigma = self._fid_extractor.compute_stats(str(folder))
        return frechet_distance(mu, sigma, *ref)

    # -- the loop ----------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        cfg, rt = self.cfg, self.rt
        first = self.evaluate() if self.step == 0 else {}
        last = dict(first)
        bar = rt.progress(cfg.max_steps, self.step)
        stream = batches(self.loader, self.sampler)
        position = self.sampler.position
        saved_at = -1
        while self.step < cfg.max_steps:
            micro = []
            for _ in range(cfg.gradient_accumulation_steps):
                position, batch = next(stream)
                micro.append(self._inputs(batch))
            logs = self.train_step(micro)
            self.step += 1
            bar.update(1)
            if rt.is_main:
                bar.set_postfix({k: f"{v:.4f}" for k, v in logs.items()}, refresh=False)
            if self.step % cfg.log_every == 0:
                rt.log(
                    {f"train/{k}": v for k, v in logs.items()} | {"train/lr": self.sched_g.get_last_lr()[0]},
                    self.step,
                )
            if cfg.eval_every and self.step % cfg.eval_every == 0:
                last = self.evaluate() or last
            if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                self.save(position)
                saved_at = self.step
        bar.close()
        if saved_at != self.step:
            self.save(position)
        if cfg.eval_every and self.step % cfg.eval_every != 0:
            last = self.evaluate() or last
        ckpt = self.export()
        if rt.is_main:
            save_checkpoint(ckpt, Path(cfg.output) / "model.safetensors")
        rt.barrier()
        return TrainResult(self.step, ckpt, last, first)


def train(cfg: PairedConfig) -> TrainResult:
    """Run paired training to cfg.max_steps (from a checkpoint with cfg.resume); see module doc."""
    cfg.validate()
    rt = Runtime(cfg)
    try:
        return PairedTrainer(cfg, rt).run()
    finally:
        rt.close()


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = parse_config(argv)
        result = train(cfg)
    except (ValueError, OSError) as e:  # our errors subclass ValueError; say them in one line
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"step": result.step, "output": cfg.output, **result.metrics}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
