"""CycleGAN-Turbo training: `python -m training.unpaired --dataset DIR --output DIR [...]`.

The paper's objective, in the original train_cyclegan_turbo.py's order within one step. One shared
UNet (LoRA, rank 128, in the original's down/up/other groups, conv_in trainable) and, per
direction, VAE LoRA and skip convs over one frozen VAE; the direction's target domain is named by
its caption (a2b runs with caption B, b2a with caption A). D_b judges domain B images, D_a domain A.

1. cycle: lambda_cycle * L1(G_b2a(G_a2b(a)), a) + lambda_cycle_lpips * LPIPS(...), and the same from
   b; generator optimizer step;
2. GAN: lambda_gan * (D_b(G_a2b(a), for_G) + D_a(G_b2a(b), for_G)) on fresh forward passes, the
   discriminators' heads frozen (they take no gradient); generator step;
3. identity: lambda_idt * L1(G_a2b(b), b) + lambda_idt_lpips * LPIPS(...), and the same for
   G_b2a(a) vs a; generator step;
4. discriminators on step 2's outputs, detached (fake), then on the real images: two steps.

Every optimizer step clips the gradient norm (10) and advances its LR schedule, as the original does
(three generator and two discriminator schedule steps per training step). Unlike the original, the
schedules' lengths count those optimizer updates (warmup and total x3 for the generator, x2 for the
discriminators), so --lr-warmup-steps and --max-steps keep meaning training steps and a decaying
schedule ends at the end of the run, not at a third of it. With the default constant schedule this
makes no difference.

Memory (`--gradient-checkpointing`, `--mixed-precision bf16`): the captions are encoded once and the
text encoder is freed; trainable weights stay fp32 and every loss is computed in fp32.
"""

from __future__ import annotations

import argparse
import gc
import logging
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import cast

import torch
import torch.nn.functional as F

from training.config import CommonConfig, add_common_arguments
from training.config import parse_config as parse_into
from training.data import UnpairedDataset, check_all, check_unpaired_dataset
from training.dino_structure import DINO_HUB_ID
from training.discriminator import CLIPDiscriminator
from training.evaluate import EvalResult, Evaluator, build_metrics, write_report
from training.frozen import build_discriminator, build_lpips
from training.losses import LPIPSLoss
from training.runtime import save_grid
from training.state import ResumeError
from training.trainer import Trainer, TrainResult, as_fp32, cli_main, run_training
from turbo import lora
from turbo.base import BaseModel
from turbo.conv_in import SwitchableConvIn
from turbo.formats import TurboCheckpoint
from turbo.generator import Generator
from turbo.preprocess import to_model_input
from turbo.skip_vae import SkipConvs

logger = logging.getLogger(__name__)

MODEL = "train"  # the name of the model being trained inside the Generator
DOMAINS = ("a", "b")
GEN_UPDATES_PER_STEP = 3  # cycle, GAN, identity
DISC_UPDATES_PER_STEP = 2  # fake, real

__all__ = ["UnpairedConfig", "UnpairedTrainer", "TrainResult", "train", "main"]


@dataclass
class UnpairedConfig(CommonConfig):
    """Unpaired-training options on top of CommonConfig. The defaults are the original's horse2zebra
    recipe (the command in its README), which sets most of them on the command line: its argparse
    has no default for some (max steps) and paired-training ones for others. Checks shared with the
    paired trainer (lambdas, ranks, finite numbers) are CommonConfig.validate's."""

    network_fields = (*CommonConfig.network_fields, "dino_model")

    # the recipe's values where they differ from the shared (paired) ones
    train_image_prep: str = "resize_286_randomcrop_256x256_hflip"
    test_image_prep: str = "no_resize"
    batch_size: int = 1
    lr: float = 1e-5
    max_steps: int = 25_000  # the original has no default; its horse2zebra recipe trains 25,000 steps
    eval_every: int = 500
    num_eval_samples: int = -1  # every test image
    max_grad_norm: float = 10.0
    lambda_gan: float = 0.5
    lambda_idt: float = 1.0
    lambda_cycle: float = 1.0
    lambda_cycle_lpips: float = 10.0
    lambda_idt_lpips: float = 1.0
    gan_loss_type: str = "multilevel_sigmoid"
    rank_unet: int = 128
    rank_vae: int = 4
    double_conv_updates: bool = True  # the original's optimizer lists these LoRA weights twice
    dino_model: str = DINO_HUB_ID
    track_dino: bool = True

    def validate(self) -> None:
        super().validate()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.unpaired", description=__doc__.split("\n\n")[0])
    add_common_arguments(p)
    d = UnpairedConfig("", "")
    # The shared parser's defaults are the paired ones; the unpaired defaults replace them.
    p.set_defaults(
        lr=d.lr, max_grad_norm=d.max_grad_norm, batch_size=d.batch_size, max_steps=d.max_steps,
        train_image_prep=d.train_image_prep, test_image_prep=d.test_image_prep,
        eval_every=d.eval_every, num_eval_samples=d.num_eval_samples,
    )  # fmt: skip
    g = p.add_argument_group("unpaired objective and model")
    g.add_argument("--lambda-gan", type=float, default=d.lambda_gan)
    g.add_argument("--lambda-idt", type=float, default=d.lambda_idt)
    g.add_argument("--lambda-cycle", type=float, default=d.lambda_cycle)
    g.add_argument("--lambda-cycle-lpips", type=float, default=d.lambda_cycle_lpips)
    g.add_argument("--lambda-idt-lpips", type=float, default=d.lambda_idt_lpips)
    g.add_argument(
        "--gan-loss-type", default=d.gan_loss_type, choices=("multilevel_sigmoid", "multilevel_sigmoid_s")
    )
    g.add_argument("--rank-unet", type=int, default=d.rank_unet)
    g.add_argument("--rank-vae", type=int, default=d.rank_vae)
    g.add_argument(
        "--double-conv-updates", action=argparse.BooleanOptionalAction, default=d.double_conv_updates,
        help="two AdamW updates per step for the first conv's and skip convs' LoRA weights, as the "
        "original's optimizer, which lists them twice, gives them",
    )  # fmt: skip
    g = p.add_argument_group("unpaired validation (test_A/test_B, both directions)")
    g.add_argument("--dino-model", default=d.dino_model, help="DINO ViT for the structure distance")
    g.add_argument(
        "--track-dino", action=argparse.BooleanOptionalAction, default=d.track_dino,
        help="DINO structure distance in validation",
    )  # fmt: skip
    return p


def parse_config(argv: list[str] | None = None) -> UnpairedConfig:
    return parse_into(UnpairedConfig, build_parser(), argv)


class UnpairedTrainer(Trainer):
    """One training run; build it on every process, then call `run()` (the loop, checkpoints and
    resuming are `training.trainer.Trainer`'s; the objective and validation are here)."""

    kind = "unpaired"
    cfg: UnpairedConfig
    disc: dict[str, CLIPDiscriminator]  # by the domain it judges: "a", "b"
    lpips: LPIPSLoss

    def _datasets(self) -> None:
        """The training set; the test split (both domains) too when validation will read it: every
        problem of every split at once."""
        cfg = self.cfg
        root = Path(cfg.dataset)
        validate = cfg.eval_every > 0 and cfg.num_eval_samples != 0
        if validate and not ((root / "test_A").is_dir() and (root / "test_B").is_dir()):
            logger.warning("no test_A/ or test_B/ in %s: validation is off", cfg.dataset)
            validate = False
        self.validate_on_test = validate
        self.train_set, _ = check_all(
            lambda: UnpairedDataset(
                cfg.dataset, "train", cfg.train_image_prep, seed=cfg.seed, batch_size=cfg.batch_size
            ),
            lambda: check_unpaired_dataset(cfg.dataset, "test", cfg.test_image_prep, captions=False)
            if validate
            else None,
        )

    def _build(self, base: BaseModel | None, networks: dict[str, torch.nn.Module]) -> None:
        """networks: "disc_a", "disc_b", "lpips" (see Trainer)."""
        cfg, rt, dev = self.cfg, self.rt, self.rt.device
        self.base = self._load_base(base)
        # The captions are fixed: encode them once and free the text encoder.
        self.captions = {"a": self.train_set.caption_src, "b": self.train_set.caption_tgt}
        self.emb = {
            "a2b": self.base.encode_prompt(self.captions["b"]).float(),
            "b2a": self.base.encode_prompt(self.captions["a"]).float(),
        }
        self.base.text_encoder = None  # type: ignore[assignment]  # freed: nothing encodes text after this
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self.gen = Generator(self.base)
        self.gen.new_model(MODEL, "unpaired", rank_unet=cfg.rank_unet, rank_vae=cfg.rank_vae)
        self.params = self.gen.trainable_parameters(MODEL)
        self._prepare_trainable()
        twice = self.listed_twice() if cfg.double_conv_updates else []
        # clipped as the original clips its list: the norm counts these twice
        self.clip_params = self.params + twice
        # each given network is the kind its name says (see the docstring)
        disc_a = cast("CLIPDiscriminator | None", networks.get("disc_a")) or build_discriminator(
            cfg.disc_backbone, cfg.gan_loss_type, dev
        )
        # Both discriminators share one frozen CLIP tower (only their heads differ), stored in the
        # frozen dtype: one ViT-B/32 in memory instead of two.
        # transformers wraps Module.to with functools.wraps, which mypy reads as unbound (self missing)
        disc_a.backbone.to(dtype=rt.frozen_dtype)  # type: ignore[call-arg]
        disc_b = cast("CLIPDiscriminator | None", networks.get("disc_b")) or CLIPDiscriminator(
            disc_a.backbone, loss_type=cfg.gan_loss_type
        )
        self.disc = {"a": disc_a, "b": disc_b.to(dev).train()}
        self.lpips = cast("LPIPSLoss | None", networks.get("lpips")) or build_lpips(
            cfg.lpips_pretrained, dev, cfg.lpips_vgg
        )
        twice_ids = {id(p) for p in twice}
        once = [p for p in self.params if id(p) not in twice_ids]
        opt_g = self._adamw([{"params": once}] + ([{"params": twice, "updates": 2}] if twice else []))
        opt_d = self._adamw(self.disc["a"].trainable_parameters() + self.disc["b"].trainable_parameters())
        self.sched_g = self._schedule(opt_g, GEN_UPDATES_PER_STEP)
        self.sched_d = self._schedule(opt_d, DISC_UPDATES_PER_STEP)
        acc = rt.accelerator
        self.gen_ddp, disc_a, disc_b, self.opt_g, self.opt_d = acc.prepare(
            self.gen, self.disc["a"], self.disc["b"], opt_g, opt_d
        )
        self.disc_ddp = {"a": disc_a, "b": disc_b}
        self._setup_data(self.train_set)
        self.evaluators: dict[str, Evaluator] = {}
        if rt.is_main and cfg.eval_every > 0 and cfg.num_eval_samples != 0:
            self._build_evaluators()
        rt.barrier()

    # -- model -------------------------------------------------------------------------------------

    def export(self) -> TurboCheckpoint:
        """The model trained so far: both directions, each with its target domain's caption."""
        ckpt = self.gen.export(
            MODEL, prompts={"a2b": self.captions["b"], "b2a": self.captions["a"]},
            image_prep=self.cfg.test_image_prep, base_model=self.cfg.base,
        )  # fmt: skip
        return as_fp32(ckpt)

    def listed_twice(self) -> list[torch.nn.Parameter]:
        """The trainable weights the original's optimizer list holds twice: its `get_traininable_params`
        adds every LoRA weight, then the first conv's and each skip conv's parameters, which include
        those convs' LoRA weights again."""
        m = self.gen.models[MODEL]
        lora_weights = lora.lora_parameters(self.gen.unet, m.id)
        # the Generator put a SwitchableConvIn where diffusers types a Conv2d
        convs = list(cast(SwitchableConvIn, self.gen.unet.conv_in).trained[m.id].parameters())
        for d in m.directions:
            lora_weights += lora.lora_parameters(self.gen.vae, m.vae_id(d))
            skips = cast(SkipConvs, self.gen.vae.skips[m.vae_id(d)])
            convs += [p for i in range(len(skips.names)) for p in skips[i].parameters()]
        in_lora = {id(p) for p in lora_weights}
        trainable = {id(p) for p in self.params}
        twice, seen = [], set()
        for p in convs:
            if id(p) in in_lora and id(p) in trainable and id(p) not in seen:
                seen.add(id(p))
                twice.append(p)
        return twice

    def translate(self, x: torch.Tensor, direction: str) -> torch.Tensor:
        """Images in [-1, 1] (B, 3, H, W) -> the other domain, with the model being trained."""
        with self.rt.autocast():
            return self.gen(
                x.to(self.rt.device), self.emb[direction], model=MODEL, direction=direction
            ).float()

    # -- state (the rest in training.trainer) ---------------------------------------------------------

    def _extra_state(self) -> dict:
        return {
            "disc_a": {k: v.cpu() for k, v in self.disc["a"].heads_state_dict().items()},
            "disc_b": {k: v.cpu() for k, v in self.disc["b"].heads_state_dict().items()},
            "opt_d": self.opt_d.state_dict(),
            "sched_d": self.sched_d.state_dict(),
        }

    def _check_state(self, folder: Path, state: dict, saved_cfg: dict) -> None:
        saved = bool(saved_cfg.get("double_conv_updates", False))  # older runs updated them once
        if saved != self.cfg.double_conv_updates:
            flag = "--double-conv-updates" if saved else "--no-double-conv-updates"
            raise ResumeError(f"{folder}: saved with {flag}, which sets up another optimizer; resume with it")

    def _load_extra_state(self, folder: Path, state: dict) -> None:
        for d in DOMAINS:
            self.disc[d].load_heads_state_dict(state[f"disc_{d}"])
        self.opt_d.load_state_dict(state["opt_d"])
        self.sched_d.load_state_dict(state["sched_d"])

    # -- one step ----------------------------------------------------------------------------------

    def _inputs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        dev = self.rt.device
        return batch["pixel_values_src"].to(dev), batch["pixel_values_tgt"].to(dev)

    def _g(self, x: torch.Tensor, direction: str) -> torch.Tensor:
        return self.gen_ddp(x, self.emb[direction], model=MODEL, direction=direction)

    def _rec_loss(self, pred: torch.Tensor, target: torch.Tensor, l1: float, lp: float) -> torch.Tensor:
        # In fp32, outside autocast: under bf16 a small L1/LPIPS difference between near-identical
        # images (the start of training, when G is close to the identity) rounds away.
        with torch.autocast(self.rt.device.type, enabled=False):
            pred, target = pred.float(), target.float()
            loss = l1 * F.l1_loss(pred, target)
            if lp > 0:
                loss = loss + lp * self.lpips(pred, target).mean()
        return loss

    def _gen_update(self) -> None:
        self.rt.accelerator.clip_grad_norm_(self.clip_params, self.cfg.max_grad_norm)
        self.opt_g.step()
        self.sched_g.step()
        self.opt_g.zero_grad(set_to_none=True)

    def train_step(self, micro: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
        """One step (five optimizer updates, see module doc) over micro-batches of (a, b) images."""
        cfg, rt, acc, n = self.cfg, self.rt, self.rt.accelerator, len(micro)
        logs: dict[str, float] = {}

        def add(k, v):
            logs[k] = logs.get(k, 0.0) + float(v.detach()) / n

        # 1. cycle consistency
        for i, (a, b) in enumerate(micro):
            with rt.no_sync(self.gen_ddp, i == n - 1), rt.autocast():
                rec_a = self._g(self._g(a, "a2b"), "b2a")
                rec_b = self._g(self._g(b, "b2a"), "a2b")
                cyc_a = self._rec_loss(rec_a, a, cfg.lambda_cycle, cfg.lambda_cycle_lpips)
                cyc_b = self._rec_loss(rec_b, b, cfg.lambda_cycle, cfg.lambda_cycle_lpips)
            acc.backward((cyc_a + cyc_b) / n)
            add("cycle_a", cyc_a), add("cycle_b", cyc_b)
        self._gen_update()
        # 2. GAN, generator side: the discriminators' heads are frozen and take no gradient
        fakes = []
        for i, (a, b) in enumerate(micro):
            with rt.no_sync(self.gen_ddp, i == n - 1), rt.autocast():
                fake_b, fake_a = self._g(a, "a2b"), self._g(b, "b2a")
                with self.disc["a"].frozen_heads(), self.disc["b"].frozen_heads():
                    gan_b = self.disc["b"](fake_b.float(), for_G=True).mean() * cfg.lambda_gan
                    gan_a = self.disc["a"](fake_a.float(), for_G=True).mean() * cfg.lambda_gan
            acc.backward((gan_a + gan_b) / n)
            fakes.append((fake_a.detach().float(), fake_b.detach().float()))
            add("gan_a", gan_a), add("gan_b", gan_b)
        self._gen_update()
        # 3. identity: a generator given an image already in its target domain leaves it alone
        for i, (a, b) in enumerate(micro):
            with rt.no_sync(self.gen_ddp, i == n - 1), rt.autocast():
                idt_b = self._rec_loss(self._g(b, "a2b"), b, cfg.lambda_idt, cfg.lambda_idt_lpips)
                idt_a = self._rec_loss(self._g(a, "b2a"), a, cfg.lambda_idt, cfg.lambda_idt_lpips)
            acc.backward((idt_a + idt_b) / n)
            add("idt_a", idt_a), add("idt_b", idt_b)
        self._gen_update()
        # 4. discriminators: last GAN step's outputs (fake), then the real images
        heads = self.disc["a"].trainable_parameters() + self.disc["b"].trainable_parameters()
        images = {"fake": fakes, "real": [(a.float(), b.float()) for a, b in micro]}
        for what in ("fake", "real"):
            for i, (img_a, img_b) in enumerate(images[what]):
                sync = i == n - 1
                with (
                    rt.no_sync(self.disc_ddp["a"], sync),
                    rt.no_sync(self.disc_ddp["b"], sync),
                    rt.autocast(),
                ):
                    loss_a = self.disc_ddp["a"](img_a, for_real=what == "real").mean() * cfg.lambda_gan
                    loss_b = self.disc_ddp["b"](img_b, for_real=what == "real").mean() * cfg.lambda_gan
                acc.backward((loss_a + loss_b) * 0.5 / n)
                add("disc_a", loss_a), add("disc_b", loss_b)
            acc.clip_grad_norm_(heads, cfg.max_grad_norm)
            self.opt_d.step()
            self.sched_d.step()
            self.opt_d.zero_grad(set_to_none=True)
        return logs

    # -- validation --------------------------------------------------------------------------------

    def _build_evaluators(self) -> None:
        cfg = self.cfg
        if not self.validate_on_test:
            return
        fid, dino = build_metrics(not cfg.track_fid, not cfg.track_dino, cfg.dino_model, cfg.fid_weights,
                                  self.rt.device)  # fmt: skip
        self.evaluators = {
            d: Evaluator(cfg.dataset, d, cfg.test_image_prep, fid, dino, max(cfg.num_eval_samples, 0))
            for d in ("a2b", "b2a")
        }

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation on rank 0 (others wait): both directions' DINO structure and FID (if tracked),
        with `training.evaluate`; outputs under <output>/eval/step_<N>/, a grid in eval/step_<N>.png."""
        metrics: dict[str, float] = {}
        if self.rt.is_main and self.evaluators:
            folder = Path(self.cfg.output) / "eval" / f"step_{self.step:08d}"
            results: list[EvalResult] = []
            rows = []
            for d, ev in self.evaluators.items():
                r = ev.run(
                    partial(self.translate, direction=d), folder / d, self.cfg.eval_batch_size, progress=False
                )
                results.append(r)
                if r.dino_structure is not None:
                    metrics[f"val/dino_struct_{d}"] = r.dino_structure
                if r.fid is not None:
                    metrics[f"val/fid_{d}"] = r.fid
                for im in ev.inputs[: self.cfg.num_grid]:
                    x = to_model_input(im, "unpaired")
                    rows.append([x[0], self.translate(x, d)[0].cpu()])
            write_report(results, folder, f"{self.name} step {self.step}")
            if rows:
                save_grid(rows, Path(self.cfg.output) / "eval" / f"step_{self.step:08d}.png")
            self.rt.log(metrics, self.step)
        self.rt.barrier()
        return metrics


def train(cfg: UnpairedConfig, **kwargs) -> TrainResult:
    """Run unpaired training to cfg.max_steps (from a checkpoint with cfg.resume); see module doc."""
    return run_training(UnpairedTrainer, cfg, **kwargs)


def main(argv: list[str] | None = None) -> int:
    return cli_main(parse_config, train, argv)


if __name__ == "__main__":
    sys.exit(main())
