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
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
import torch.nn.functional as F

from training.config import CommonConfig, ConfigError, add_common_arguments
from training.config import parse_config as parse_into
from training.data import PairedDataset, check_all
from training.discriminator import CLIPDiscriminator
from training.evaluate import PairedEvaluator, fid_resize

__all__ = ["PairedConfig", "PairedTrainer", "TrainResult", "fid_resize", "train", "main"]
from training.frozen import build_clip_similarity, build_discriminator, build_lpips
from training.losses import CLIPSimilarityLoss, LPIPSLoss
from training.runtime import save_grid
from training.state import ResumeError
from training.trainer import Trainer, TrainResult, as_fp32, cli_main, run_training
from turbo.base import BaseModel
from turbo.conv_in import SwitchableConvIn
from turbo.deprecated_flags import add_renamed
from turbo.formats import TurboCheckpoint, load_checkpoint
from turbo.generator import Generator

logger = logging.getLogger(__name__)

MODEL = "train"  # the name of the model being trained inside the Generator
PREPROCESS_CHOICES = ("auto", "canny", "sketch", "none")


@dataclass
class PairedConfig(CommonConfig):
    """Paired-training options on top of CommonConfig; defaults are the original's (but max_steps:
    the original trains --num_training_epochs epochs, see docs/training.md). Checks shared with the
    unpaired trainer (lambdas, ranks, finite numbers) are CommonConfig.validate's."""

    network_fields = (*CommonConfig.network_fields, "clip_model")

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
    preprocess: str = "auto"
    eval_gamma: float = 1.0

    def validate(self) -> None:
        super().validate()
        if self.preprocess not in PREPROCESS_CHOICES:
            raise ConfigError(
                f"--preprocess {self.preprocess!r} is not one of {', '.join(PREPROCESS_CHOICES)}"
            )
        if not 0.0 <= self.eval_gamma <= 1.0:
            raise ConfigError(f"--eval-gamma must lie in [0, 1], got {self.eval_gamma}")
        if self.eval_gamma < 1 and not self.stochastic:
            raise ConfigError("--eval-gamma below 1 needs --stochastic")


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
    g.add_argument(
        "--init-from",
        default=None,
        help="start from a paired model: a file, a released name or a Hub id (owner/repo[@REV][/FILE])",
    )
    g.add_argument(
        "--default-prompt", default=None, help="prompt stored in the model (default: first caption)"
    )
    g.add_argument(
        "--preprocess",
        default=d.preprocess,
        choices=PREPROCESS_CHOICES,
        help="how the model's inputs are prepared (stored in it); auto: sketch if --stochastic else canny",
    )
    add_renamed(g, "--input", "--preprocess", choices=PREPROCESS_CHOICES)
    g.add_argument("--eval-gamma", type=float, default=d.eval_gamma, help="gamma for validation (stochastic)")
    return p


def parse_config(argv: list[str] | None = None) -> PairedConfig:
    return parse_into(PairedConfig, build_parser(), argv)


class PairedTrainer(Trainer):
    """One training run; build it on every process, then call `run()` (the loop, checkpoints and
    resuming are `training.trainer.Trainer`'s; the objective and validation are here)."""

    kind = "paired"
    cfg: PairedConfig
    disc: CLIPDiscriminator | None  # None with --lambda-gan 0
    clip: CLIPSimilarityLoss | None  # None with --lambda-clipsim 0
    lpips: LPIPSLoss

    def _datasets(self) -> None:
        """The training set and the validation set, every problem of both splits at once."""
        cfg = self.cfg
        validate = cfg.eval_every > 0 and cfg.num_eval_samples != 0
        if validate and not (Path(cfg.dataset) / "test_A").is_dir():
            logger.warning("no test_A/ in %s: validation is off", cfg.dataset)
            validate = False
        self.train_set, self.val_set = check_all(
            lambda: PairedDataset(
                cfg.dataset, "train", cfg.train_image_prep, seed=cfg.seed, batch_size=cfg.batch_size
            ),
            lambda: PairedDataset(cfg.dataset, "test", cfg.test_image_prep, seed=cfg.seed)
            if validate
            else None,
        )

    def _build(self, base: BaseModel | None, networks: dict[str, torch.nn.Module]) -> None:
        """networks: "disc", "clip", "lpips" (see Trainer)."""
        cfg, rt, dev = self.cfg, self.rt, self.rt.device
        init = self._read_init()  # before the base loads: a bad --init-from fails in seconds
        self.base = self._load_base(base)
        self.gen = Generator(self.base)
        self._add_model(init)
        self.params = self.gen.trainable_parameters(MODEL)
        self._prepare_trainable()
        # each given network is the kind its name says (see the docstring)
        disc = cast("CLIPDiscriminator | None", networks.get("disc"))
        lpips = cast("LPIPSLoss | None", networks.get("lpips"))
        clip = cast("CLIPSimilarityLoss | None", networks.get("clip"))
        self.disc = self.clip = None
        if cfg.lambda_gan > 0:
            self.disc = disc or build_discriminator(cfg.disc_backbone, cfg.gan_loss_type, dev)
        self.lpips = lpips or build_lpips(cfg.lpips_pretrained, dev, cfg.lpips_vgg)
        if cfg.lambda_clipsim > 0:
            self.clip = clip or build_clip_similarity(cfg.clip_model, dev)
        opt_g = self._adamw(self.params)
        self.sched_g = self._schedule(opt_g)
        acc = rt.accelerator
        if self.disc is not None:
            opt_d = self._adamw(self.disc.trainable_parameters())
            self.sched_d = self._schedule(opt_d)
            self.gen_ddp, self.disc_ddp, self.opt_g, self.opt_d = acc.prepare(
                self.gen, self.disc, opt_g, opt_d
            )
        else:
            self.gen_ddp, self.opt_g = acc.prepare(self.gen, opt_g)
            self.disc_ddp = self.opt_d = self.sched_d = None
        self._setup_data(self.train_set)
        self.prompt = cfg.default_prompt or self.train_set.prompts[self.train_set.names[0]]
        auto = "sketch" if cfg.stochastic else "canny"
        self.preprocess = cfg.preprocess if cfg.preprocess != "auto" else auto
        self.evaluator: PairedEvaluator | None = None  # built at the first validation

    # -- model -------------------------------------------------------------------------------------

    def _read_init(self) -> TurboCheckpoint | None:
        """The --init-from checkpoint (a file; a released name or a Hub id: downloaded), checked; None
        if none."""
        cfg = self.cfg
        if cfg.init_from is None:
            return None
        from turbo.model_source import model_file

        ckpt = load_checkpoint(model_file(cfg.init_from))
        if ckpt.kind != "paired":
            raise ConfigError(
                f"--init-from {cfg.init_from}: a {ckpt.kind} model; paired training needs a paired one"
            )
        if ckpt.stochastic and not cfg.stochastic:
            raise ConfigError(f"--init-from {cfg.init_from} is a stochastic model: add --stochastic")
        return ckpt

    def _add_model(self, ckpt: TurboCheckpoint | None) -> None:
        cfg = self.cfg
        if ckpt is None:
            self.gen.new_model(
                MODEL, "paired", cfg.stochastic, rank_unet=cfg.rank_unet, rank_vae=cfg.rank_vae
            )
            return
        if cfg.stochastic and not ckpt.stochastic:
            # The twin is the base's own first conv, as in the released stochastic model (the Generator
            # put a SwitchableConvIn where diffusers types a Conv2d).
            pretrained = cast(SwitchableConvIn, self.gen.unet.conv_in).pretrained
            assert pretrained.bias is not None  # SD's first conv has a bias
            ckpt.unet["conv_in_pretrained.weight"] = pretrained.weight.detach().clone()
            ckpt.unet["conv_in_pretrained.bias"] = pretrained.bias.detach().clone()
            ckpt.stochastic = True
        self.gen.add_checkpoint(MODEL, ckpt)
        logger.info("starting from %s (LoRA ranks %d/%d)", cfg.init_from, ckpt.rank_unet, ckpt.rank_vae)

    def export(self) -> TurboCheckpoint:
        """The model trained so far, in turbo's format (fp32 tensors, prompt and input metadata)."""
        ckpt = self.gen.export(
            MODEL, prompts={"a2b": self.prompt}, preprocess=self.preprocess, base_model=self.cfg.base
        )
        return as_fp32(ckpt)

    # -- state (the rest in training.trainer) ---------------------------------------------------------

    def _extra_state(self) -> dict:
        if self.disc is None:
            return {}
        return {
            "discriminator": {k: v.cpu() for k, v in self.disc.heads_state_dict().items()},
            "opt_d": self.opt_d.state_dict(),
            "sched_d": self.sched_d.state_dict(),
        }

    def _check_state(self, folder: Path, state: dict, saved_cfg: dict) -> None:
        if self.cfg.lambda_gan > 0 and "discriminator" not in state:
            raise ResumeError(f"{folder}: saved without a discriminator (--lambda-gan 0); keep it at 0")
        saved = saved_cfg.get("stochastic")
        if saved is not None and bool(saved) != self.cfg.stochastic:
            said = "with" if saved else "without"
            raise ResumeError(
                f"{folder}: saved {said} --stochastic, which makes a different model; resume {said} it"
            )

    def _load_extra_state(self, folder: Path, state: dict) -> None:
        if self.disc is not None:
            if "discriminator" not in state:
                raise ResumeError(f"{folder}: saved without a discriminator (--lambda-gan 0); keep it at 0")
            self.disc.load_heads_state_dict(state["discriminator"])
            self.opt_d.load_state_dict(state["opt_d"])
            self.sched_d.load_state_dict(state["sched_d"])

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
        cfg = self.cfg
        if self.evaluator is None:
            fid_factory = None
            if cfg.track_fid:
                from training.evaluate import fid_extractor

                fid_factory = lambda: fid_extractor(cfg.fid_weights, self.rt.device)  # noqa: E731
            self.evaluator = PairedEvaluator(
                self.val_set, self.lpips, self.clip, fid_factory, num_images=cfg.num_eval_samples,
                batch_size=cfg.eval_batch_size, num_grid=cfg.num_grid, seed=cfg.seed,
                fid_reference=Path(cfg.output) / "eval" / "fid_ref_512.npz",
            )  # fmt: skip

        def translate(x: torch.Tensor, emb: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
            return self.gen(x, emb, model=MODEL, gamma=cfg.eval_gamma, noise=noise).float()

        eval_dir = Path(cfg.output) / "eval"
        metrics, rows = self.evaluator.run(
            translate, self.base.encode_prompt, self.rt.device, self.rt.autocast, cfg.eval_gamma < 1,
            eval_dir / f"fid_{self.step:08d}" if cfg.track_fid else None,
        )  # fmt: skip
        if rows:
            save_grid(rows, eval_dir / f"step_{self.step:08d}.png")
        return metrics


def train(cfg: PairedConfig) -> TrainResult:
    """Run paired training to cfg.max_steps (from a checkpoint with cfg.resume); see module doc."""
    return run_training(PairedTrainer, cfg)


def main(argv: list[str] | None = None) -> int:
    return cli_main(parse_config, train, argv)


if __name__ == "__main__":
    sys.exit(main())
