"""What the paired and unpaired trainers share: the step loop, checkpoints, resuming, the CLI shell.

A trainer (`training.paired.PairedTrainer`, `training.unpaired.UnpairedTrainer`) subclasses `Trainer`
and keeps its objective in its own module. `Trainer.__init__` checks everything that can be checked
without loading a network (options, the checkpoint to resume, every dataset split), then calls the
subclass's `_build` (its model, networks and optimizers, with the helpers `_load_base`,
`_prepare_trainable`, `_adamw`, `_schedule`, `_setup_data`) and finally resumes. A subclass supplies
`_datasets`, `_build`, `export`, `_inputs`, `train_step`, `evaluate` and its part of the state.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Sized
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from diffusers.optimization import get_scheduler

from training.base_identity import base_identity, config_difference, describe_source, weights_differ
from training.config import CommonConfig, ConfigError
from training.hub_push import HubPush
from training.optimizer import RepeatedAdamW
from training.runtime import Runtime
from training.sampler import Position, ResumableBatchSampler, batches
from training.state import (
    CHECKPOINTS,
    MODEL_FILE,
    STATE_FILE,
    CheckpointWriter,
    ResumeError,
    complete_checkpoints,
    load_state,
    resolve_checkpoint,
    set_rng_state,
)
from turbo.base import BaseModel, load_base
from turbo.errors import TurboError, first_line
from turbo.formats import TurboCheckpoint, save_checkpoint
from turbo.generator import Generator

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a finished run returns (on every process)."""

    step: int
    checkpoint: TurboCheckpoint
    metrics: dict[str, float] = field(default_factory=dict)  # the last validation's
    first_metrics: dict[str, float] = field(default_factory=dict)  # validation before training (fresh runs)


def as_fp32(ckpt: TurboCheckpoint) -> TurboCheckpoint:
    """The checkpoint with its UNet and VAE tensors made fp32 (in place; returns it)."""
    ckpt.unet = {k: v.float() for k, v in ckpt.unet.items()}
    ckpt.vae = {d: {k: v.float() for k, v in sd.items()} for d, sd in ckpt.vae.items()}
    return ckpt


class Trainer:
    """One training run's shared machinery; see the module doc for what a subclass supplies."""

    kind: str  # "paired" or "unpaired": saved in the state, checked on resume
    cfg: CommonConfig
    rt: Runtime
    gen: Generator
    params: list[torch.nn.Parameter]
    opt_g: torch.optim.Optimizer
    sched_g: Any
    # the end of the error when a checkpoint's generator does not match this run's model
    mismatch_hint = "other LoRA ranks?"

    def __init__(
        self,
        cfg: CommonConfig,
        rt: Runtime | None = None,
        base: BaseModel | None = None,
        networks: dict[str, torch.nn.Module] | None = None,
    ) -> None:
        """Check, build, resume. base / networks: already built ones to use instead of loading them
        from cfg (benchmarks build random full-size networks in memory; see the subclass for names)."""
        cfg.validate()
        check_output(cfg)
        self.cfg = cfg
        self.rt = rt or Runtime(cfg)
        self.hub = HubPush(cfg, self.rt.is_main)  # checks the Hub token before the base loads
        # Same seed everywhere while building, so every process starts from identical weights.
        self.rt.seed(cfg.seed, per_process=False)
        # Everything the files can tell is checked before the base and the networks load.
        self._resume_from = self._read_checkpoint(cfg.resume) if cfg.resume else None
        self._datasets()
        self.base_identity: dict[str, str] = {}
        self._build(base, networks or {})
        self._start()

    # -- what a subclass supplies -----------------------------------------------------------------

    def _datasets(self) -> None:
        """Build the training set (`self.train_set`) and check every other split the run will read,
        raising one DatasetError that lists every problem of every split (see `check_splits`)."""
        raise NotImplementedError

    def _build(self, base: BaseModel | None, networks: dict[str, torch.nn.Module]) -> None:
        """Load the base (`_load_base`), build the model, networks, optimizers and `_setup_data`."""
        raise NotImplementedError

    def export(self) -> TurboCheckpoint:
        raise NotImplementedError

    def _inputs(self, batch: dict) -> Any:
        """One loader batch -> one micro-batch for `train_step`."""
        raise NotImplementedError

    def train_step(self, micro: list) -> dict[str, float]:
        raise NotImplementedError

    def evaluate(self) -> dict[str, float]:
        raise NotImplementedError

    def _extra_state(self) -> dict:
        """The subclass's part of the training state (discriminators and their optimizers)."""
        return {}

    def _check_state(self, folder: Path, state: dict, saved_cfg: dict) -> None:
        """Raise ResumeError before anything loads if `state` (saved with the options `saved_cfg`)
        cannot continue as this run."""

    def _load_extra_state(self, folder: Path, state: dict) -> None:
        """Load what `_extra_state` saved."""

    # -- building ---------------------------------------------------------------------------------

    def _load_base(self, base: BaseModel | None) -> BaseModel:
        """The base (loaded from cfg.base unless given), identified and checked against the checkpoint
        being resumed before anything else loads."""
        cfg = self.cfg
        base = base or load_base(cfg.base, device=self.rt.device, dtype=self.rt.frozen_dtype)
        self.base_identity = base_identity(base, cfg.base)
        if self._resume_from is not None:
            self._check_base(self._resume_from[0], self._resume_from[1].get("base"))
        return base

    def _prepare_trainable(self) -> None:
        for p in self.params:
            p.data = p.data.float()  # trainable weights stay fp32 whatever the frozen dtype
        if self.cfg.gradient_checkpointing:
            self.gen.unet.enable_gradient_checkpointing()
            self.gen.vae.gradient_checkpointing = True

    def _adamw(self, params) -> torch.optim.AdamW:
        """AdamW with the run's options over params (tensors, or groups; see RepeatedAdamW)."""
        cfg = self.cfg
        return RepeatedAdamW(
            params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay,
            eps=cfg.adam_epsilon,
        )  # fmt: skip

    def _schedule(self, opt: torch.optim.Optimizer, updates: int = 1):
        """The LR schedule of an optimizer stepped `updates` times per training step."""
        cfg = self.cfg
        return get_scheduler(
            cfg.lr_scheduler, optimizer=opt, num_warmup_steps=cfg.lr_warmup_steps * updates,
            num_training_steps=cfg.max_steps * updates, num_cycles=cfg.lr_num_cycles, power=cfg.lr_power,
        )  # fmt: skip

    def _setup_data(self, train_set: torch.utils.data.Dataset) -> None:
        cfg, rt = self.cfg, self.rt
        assert isinstance(train_set, Sized)  # the sampler draws from a map-style set of known length
        self.sampler = ResumableBatchSampler(len(train_set), cfg.batch_size, rt.rank, rt.world, cfg.seed)
        # The loader draws a worker base seed each epoch; its own generator keeps that draw out of the
        # global RNG stream, which a resumed run must replay exactly.
        self.loader = torch.utils.data.DataLoader(
            train_set, batch_sampler=self.sampler, num_workers=cfg.num_workers,
            pin_memory=rt.device.type == "cuda", generator=torch.Generator().manual_seed(cfg.seed),
        )  # fmt: skip
        self.writer = CheckpointWriter(cfg.output, cfg.keep_last, rt.rank, rt.world, rt.barrier)
        self.step = 0
        self.name = cfg.name or Path(cfg.output).resolve().name

    def _start(self) -> None:
        """Sweep stale temp files, resume if asked, then seed: from here on each process draws its own
        noise and augmentations."""
        if self.rt.is_main:
            self._remove_stale_temp_files()
        self.validation_due = False
        rng = None
        if self.cfg.resume:
            rng = self._resume()
            self._resume_from = None  # the state's tensors are in the model and optimizers now
            self.rt.rewind_logs(self.step)
            # A kill between a checkpoint and its validation (or the final one) lost that validation.
            cfg = self.cfg
            due = cfg.eval_every > 0 and (self.step % cfg.eval_every == 0 or self.step >= cfg.max_steps)
            self.validation_due = due and not self.rt.logged_validation(self.step)
        self.rt.seed(self.cfg.seed + 1, per_process=True)
        if rng is not None:
            set_rng_state(rng)

    def _remove_stale_temp_files(self) -> None:
        """Temp files a killed run left (a checkpoint pointer, the final model, a published model, a
        validation grid): every write goes through one and renames it, so none is ever needed again."""
        out = Path(self.cfg.output)
        patterns = [(out / CHECKPOINTS, ".latest.*.tmp"), (out, ".model.safetensors.*.tmp"),
                    (out, ".metrics.jsonl.tmp"), (out / "eval", ".step_*.png.tmp")]  # fmt: skip
        if self.cfg.publish_to:
            patterns.append((Path(self.cfg.publish_to), f".{self.name}.safetensors.*.tmp"))
        for folder, pattern in patterns:
            if not folder.is_dir():
                continue
            for path in folder.glob(pattern):
                if path.is_file():
                    logger.info("removing %s, left by an interrupted write", path)
                    path.unlink(missing_ok=True)

    # -- state ------------------------------------------------------------------------------------

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
            "kind": self.kind,
            "base": dict(self.base_identity),
        }
        state.update(self._extra_state())
        scaler = self.rt.accelerator.scaler
        if scaler is not None:
            state["scaler"] = scaler.state_dict()
        return state

    def _read_checkpoint(self, resume: str) -> tuple[Path, dict, dict | None, dict]:
        """(folder, state, this rank's RNG state, saved options) of `resume` (--resume), checked as far
        as the files allow: it exists and is complete, it is this trainer's kind, its options fit this
        run and its base is --base (or --allow-other-base). Raises ResumeError."""
        cfg = self.cfg
        folder = resolve_checkpoint(resume, cfg.output)
        state, rng = load_state(folder, self.rt.rank)
        # Checkpoints saved before "kind" was stored: only unpaired states have disc_a.
        kind = state.get("kind") or ("unpaired" if "disc_a" in state else "paired")
        if kind != self.kind:
            raise ResumeError(
                f"{folder}: a {kind} training checkpoint, and this is {self.kind} training "
                f"(resume it with python -m training.{kind})"
            )
        try:
            saved_cfg = json.loads(state.get("config", "{}"))
        except (TypeError, ValueError):
            saved_cfg = {}
        saved_cfg = saved_cfg if isinstance(saved_cfg, dict) else {}
        if getattr(cfg, "init_from", None) is None:  # with --init-from the model file sets the ranks
            for f in ("rank_unet", "rank_vae"):
                saved = saved_cfg.get(f)
                if saved is not None and hasattr(cfg, f) and saved != getattr(cfg, f):
                    flag = "--" + f.replace("_", "-")
                    raise ResumeError(
                        f"{folder}: saved with {flag} {saved}, and this run has {flag} {getattr(cfg, f)}; "
                        "resume with the checkpoint's LoRA ranks"
                    )
        self._check_state(folder, state, saved_cfg)
        saved_base = state.get("base")
        if isinstance(saved_base, dict) and "source" in saved_base:
            source = describe_source(cfg.base)
            if saved_base["source"] != source and not cfg.allow_other_base:
                raise ResumeError(
                    f"{folder}: trained on the base {saved_base['source']}, and --base is {source}; resume "
                    "with that base, or add --allow-other-base to continue on this one"
                )
        else:
            logger.warning("%s: saved without its base's identity; the base is not checked", folder)
        return folder, state, rng, saved_cfg

    def _check_base(self, folder: Path, saved: dict | None) -> None:
        """Refuse (unless --allow-other-base) a base whose config or weights differ from the saved one."""
        if not isinstance(saved, dict):
            return
        current = self.base_identity
        problems = []
        if (diff := config_difference(saved, current)) is not None:
            problems.append(f"config: {diff}")
        differ = weights_differ(saved, current)
        if differ:
            problems.append("other weights")
        elif differ is None and "weights" in saved:
            logger.warning("%s: base weights saved in %s and loaded in %s now: not compared", folder,
                           saved.get("dtype"), current["dtype"])  # fmt: skip
        if not problems:
            return
        what = (
            f"the base {current['source']} is not the one {folder} was trained on "
            f"({saved.get('source')}): {'; '.join(problems)}"
        )
        if not self.cfg.allow_other_base:
            raise ResumeError(f"{what}; resume with that base, or add --allow-other-base")
        logger.warning("%s (continuing: --allow-other-base)", what)

    def _resume(self) -> dict | None:
        assert self._resume_from is not None  # read in __init__ whenever --resume is given
        folder, state, rng, _ = self._resume_from
        named, saved = self._named_trainable(), state["generator"]
        if not isinstance(saved, dict) or set(saved) != set(named):
            hint = self.mismatch_hint
            raise ResumeError(f"{folder}: its generator does not match this run's model ({hint})")
        try:
            self._load_state(folder, state, named)
        except ResumeError:
            raise
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:
            raise ResumeError(f"{folder / STATE_FILE}: does not fit this run ({first_line(e, 300)})") from e
        if int(state.get("world_size", 1)) != self.rt.world:
            logger.warning("resuming on %d process(es), saved with %d: data order and RNG streams differ",
                           self.rt.world, state.get("world_size", 1))  # fmt: skip
            rng = None
        root = Path(self.cfg.output) / CHECKPOINTS
        later = [f.name for s, f in complete_checkpoints(root) if s > self.step]
        if later:
            logger.warning(
                "resuming at step %d while %s holds later checkpoints (%s): this run replaces them as it "
                "saves those steps again, and `latest` follows this run", self.step, root, ", ".join(later),
            )  # fmt: skip
        logger.info("resumed from %s at step %d", folder, self.step)
        return rng

    def _load_state(self, folder: Path, state: dict, named: dict[str, torch.nn.Parameter]) -> None:
        saved = state["generator"]
        with torch.no_grad():
            for n, p in named.items():
                if saved[n].shape != p.shape:
                    raise ResumeError(
                        f"{folder}: {n} has shape {tuple(saved[n].shape)}, this run needs {tuple(p.shape)}"
                    )
                p.copy_(saved[n])
        self.opt_g.load_state_dict(state["opt_g"])
        self.sched_g.load_state_dict(state["sched_g"])
        self._load_extra_state(folder, state)
        if "scaler" in state and self.rt.accelerator.scaler is not None:
            self.rt.accelerator.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.sampler.position = Position(int(state["epoch"]), int(state["batch"]))

    def save(self, position: Position) -> None:
        """Write a training checkpoint (and, on rank 0, publish the model if cfg.publish_to)."""
        model = self.export() if self.rt.is_main else None
        folder = self.writer.save(self.step, model, self.state_dict(position))
        self.hub.checkpoint(self.step, model, folder / MODEL_FILE)  # --push-every-checkpoint
        if model is not None and self.cfg.publish_to:  # the model is exported on rank 0 only
            save_checkpoint(model, Path(self.cfg.publish_to) / f"{self.name}.safetensors")

    # -- the loop ---------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        cfg, rt = self.cfg, self.rt
        first, last = {}, {}
        # the step whose validation is done: a resumed run's validation was done unless it is due
        validated_at = self.step if cfg.resume and not self.validation_due else -1
        if cfg.eval_every and (self.step == 0 or self.validation_due):
            last = self.evaluate()
            first = dict(last) if self.step == 0 else {}
            validated_at = self.step
        bar = rt.progress(cfg.max_steps, self.step)
        stream = batches(self.loader, self.sampler)
        position = self.sampler.position
        saved_at = -1  # a run resumed at its last step saves (and publishes) it once more
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
            # the checkpoint first: a validation that fails must not cost this step's checkpoint
            if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                self.save(position)
                saved_at = self.step
            if cfg.eval_every and self.step % cfg.eval_every == 0:
                last = self.evaluate() or last
                validated_at = self.step
        bar.close()
        if saved_at != self.step:
            self.save(position)  # the last step is always saved, and published with it
        if cfg.eval_every and validated_at != self.step:
            last = self.evaluate() or last
        ckpt = self.export()
        if rt.is_main:
            save_checkpoint(ckpt, Path(cfg.output) / "model.safetensors")
        rt.barrier()
        self.hub.finish(self.step, ckpt, Path(cfg.output) / "model.safetensors")  # --push-to-hub
        return TrainResult(self.step, ckpt, last, first)


def check_output(cfg: CommonConfig) -> None:
    """Refuse a fresh run (no --resume) in a run folder that already holds checkpoints: its saves would
    mix with the old run's and a later --resume could pick either."""
    if cfg.resume:
        return
    found = complete_checkpoints(Path(cfg.output) / CHECKPOINTS)
    if found:
        raise ConfigError(
            f"{Path(cfg.output) / CHECKPOINTS} already holds checkpoints of a run (the newest: "
            f"{found[-1][1].name}); pass --resume latest to continue it, or choose another --output"
        )


def run_training(trainer: Callable[..., Trainer], cfg: CommonConfig, **kwargs) -> TrainResult:
    """Build `trainer(cfg, rt, **kwargs)` with a fresh Runtime, run it, close the Runtime."""
    cfg.validate()
    rt = Runtime(cfg)
    try:
        return trainer(cfg, rt, **kwargs).run()
    finally:
        rt.close()


ConfigT = TypeVar("ConfigT", bound=CommonConfig)


def cli_main(
    parse_config: Callable[[list[str] | None], ConfigT],
    train: Callable[[ConfigT], TrainResult],
    argv: list[str] | None,
) -> int:
    """A trainer's `main`: parse, train, print the result as one JSON line; exit status 2 on errors."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg: ConfigT | None = None
    try:
        cfg = parse_config(argv)
        result = train(cfg)
    except TurboError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        logger.warning("training stopped (interrupted); %s", _last_checkpoint(cfg))
        return 130
    print(json.dumps({"step": result.step, "output": cfg.output, **result.metrics}))
    return 0


def _last_checkpoint(cfg: CommonConfig | None) -> str:
    """Where an interrupted run can continue from, in words."""
    if cfg is None:
        return "nothing was saved"
    try:
        folder = resolve_checkpoint("latest", cfg.output)
    except ResumeError:
        return f"no checkpoint was saved in {Path(cfg.output) / CHECKPOINTS}"
    return f"the last checkpoint is {folder}; continue with the same flags and --resume latest"
