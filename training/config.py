"""Options every trainer shares (paths, optimisation, precision, checkpoints, logging), as a dataclass.

Trainers subclass `CommonConfig` with their objective's fields, call `add_common_arguments` on their
parser and build their config with `config_from_args`. Flag names are the field names with dashes.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, TypeVar

from turbo.base import DEFAULT_BASE
from turbo.errors import TurboError
from turbo.model_card import DEFAULT_LICENSE
from turbo.preprocess import EVAL_IMAGE_PREPS, IMAGE_PREPS
from turbo.push import check_dataset_id, check_repo_id

DEFAULT_CLIP = "openai/clip-vit-base-patch32"
MIXED_PRECISION = ("no", "fp16", "bf16")
FROZEN_DTYPES = ("auto", "fp32", "fp16", "bf16")
REPORT_TO = ("tensorboard", "wandb", "none")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


class ConfigError(TurboError):
    """An option value, or a combination of them, that cannot be trained with."""


@dataclass
class CommonConfig:
    """Shared training options. Paths are strings; steps count optimizer updates of the generator."""

    dataset: str
    output: str
    base: str = DEFAULT_BASE
    # frozen helper networks: hub ids or local folders (tests pass tiny random ones)
    clip_model: str = DEFAULT_CLIP
    disc_backbone: str = DEFAULT_CLIP
    lpips_pretrained: bool = True
    lpips_vgg: str | None = None  # a torchvision VGG-16 state dict file: LPIPS's trunk without a download
    allow_other_base: bool = False  # resume on a base other than the checkpoint's
    train_image_prep: str = "resized_crop_512"
    test_image_prep: str = "resized_crop_512"
    batch_size: int = 4
    num_workers: int = 0
    max_steps: int = 10_000
    seed: int = 0
    lr: float = 5e-6
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 500
    lr_num_cycles: int = 1
    lr_power: float = 1.0
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = False
    mixed_precision: str = "no"
    frozen_dtype: str = "auto"
    allow_tf32: bool = False
    cpu: bool = False
    checkpoint_every: int = 500
    keep_last: int = 3
    resume: str | None = None
    publish_to: str | None = None
    name: str | None = None
    eval_every: int = 100
    num_eval_samples: int = 100  # -1: every test input (as the original's unpaired validation)
    eval_batch_size: int = 4
    num_grid: int = 4
    track_fid: bool = False
    fid_weights: str | None = None  # a FID Inception state dict file: no download
    log_every: int = 10
    report_to: str = "tensorboard"
    tracker_project: str = "turbo"
    # the Hub (training.hub_push): owner/name to upload the model to at the end of the run
    push_to_hub: str | None = None
    push_every_checkpoint: bool = False
    push_private: bool = False
    push_license: str = DEFAULT_LICENSE
    push_dataset: str | None = None

    # fields that name a local file or folder when they are not a hub id (see `check_network_source`)
    network_fields: ClassVar[tuple[str, ...]] = ("base", "disc_backbone")

    def validate(self) -> None:
        """Raise ConfigError on the first bad value; nothing is loaded.

        Checks every trainer's fields alike: every float is finite, every `lambda_*` >= 0, every
        `rank_*` >= 1, and every network flag given as a path names something that exists.
        """
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{_flag(f.name)} must be a finite number, got {value}")
            if f.name.startswith("lambda_") and value < 0:
                raise ConfigError(f"{_flag(f.name)} must be 0 or more, got {value}")
            if f.name.startswith("rank_") and value < 1:
                raise ConfigError(f"{_flag(f.name)} (a LoRA rank) must be at least 1, got {value}")
        positive = ("batch_size", "max_steps", "gradient_accumulation_steps", "eval_batch_size", "log_every",
                    "lr_num_cycles")  # fmt: skip
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{_flag(name)} must be at least 1, got {getattr(self, name)}")
        for name in ("checkpoint_every", "keep_last", "eval_every", "num_grid", "num_workers",
                     "lr_warmup_steps", "weight_decay"):  # fmt: skip
            if getattr(self, name) < 0:
                raise ConfigError(f"{_flag(name)} must be 0 or more, got {getattr(self, name)}")
        if self.num_eval_samples < -1:
            raise ConfigError(
                f"--num-eval-samples must be -1 (all), 0 (none) or more, got {self.num_eval_samples}"
            )
        if not 0 <= self.seed < 2**31:  # numpy seeds must fit 32 bits; each process adds its rank
            raise ConfigError(f"--seed must lie in [0, 2**31), got {self.seed}")
        # The original clips unconditionally; 0 or a negative norm would zero or reverse every update.
        for name in ("lr", "max_grad_norm", "adam_epsilon", "lr_power"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{_flag(name)} must be positive, got {getattr(self, name)}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{_flag(name)} must lie in [0, 1), got {getattr(self, name)}")
        for name, valid in (
            ("mixed_precision", MIXED_PRECISION),
            ("frozen_dtype", FROZEN_DTYPES),
            ("report_to", REPORT_TO),
            ("lr_scheduler", LR_SCHEDULERS),
            ("train_image_prep", IMAGE_PREPS),
            ("test_image_prep", IMAGE_PREPS),
        ):
            if getattr(self, name) not in valid:
                raise ConfigError(f"{_flag(name)} {getattr(self, name)!r} is not one of {', '.join(valid)}")
        self._validate_push()
        if self.test_image_prep not in EVAL_IMAGE_PREPS:  # it is also the published model's preparation
            raise ConfigError(
                f"--test-image-prep must be deterministic ({', '.join(EVAL_IMAGE_PREPS)}), "
                f"got {self.test_image_prep!r}"
            )
        if self.frozen_dtype not in ("auto", "fp32") and self.mixed_precision == "no":
            raise ConfigError(
                "--frozen-dtype fp16/bf16 needs --mixed-precision (trainable weights stay fp32)"
            )
        for name in self.network_fields:
            check_network_source(_flag(name), getattr(self, name))
        if self.fid_weights is not None and not os.path.isfile(os.path.expanduser(self.fid_weights)):
            raise ConfigError(f"--fid-weights {self.fid_weights}: no such file")
        if self.lpips_vgg is not None and not os.path.isfile(os.path.expanduser(self.lpips_vgg)):
            raise ConfigError(
                f"--lpips-vgg {self.lpips_vgg}: no such file (a torchvision VGG-16 state dict, see "
                'docs/training.md, "Training offline")'
            )

    def _validate_push(self) -> None:
        """The Hub options' syntax, before anything loads (the token is checked by training.hub_push)."""
        if self.push_to_hub is not None:
            check_repo_id(self.push_to_hub, "--push-to-hub")
        if self.push_dataset is not None:
            check_dataset_id(self.push_dataset, "--push-dataset")
        if (self.push_every_checkpoint or self.push_private) and not self.push_to_hub:
            flag = "--push-every-checkpoint" if self.push_every_checkpoint else "--push-private"
            raise ConfigError(f"{flag} needs --push-to-hub owner/name")


def _flag(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def looks_like_path(name: str) -> bool:
    """Whether `name` cannot be a hub id ("name" or "owner/name") and so names a local file or folder."""
    return os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1


def check_network_source(flag: str, source: str | None) -> None:
    """Raise ConfigError if `source` (the value of `flag`) can only be a local path and does not exist."""
    if source is None or os.path.exists(os.path.expanduser(source)):
        return
    if looks_like_path(source):
        raise ConfigError(
            f"{flag} {source}: the folder does not exist (pass a folder saved with save_pretrained, or a "
            'hub id; offline, see docs/training.md, "Training offline")'
        )


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Add a flag for every CommonConfig field (defaults from the dataclass)."""
    d = CommonConfig("", "")
    g = parser.add_argument_group("data and paths")
    g.add_argument(
        "--dataset", required=True, help="dataset folder (train_A, train_B, ... see docs/training.md)"
    )
    g.add_argument(
        "--output", required=True, help="run folder: checkpoints/, logs/, eval/, model.safetensors"
    )
    g.add_argument("--base", default=d.base, help="SD-Turbo hub id or local diffusers folder")
    g.add_argument(
        "--clip-model",
        default=d.clip_model,
        help="CLIP for the paired text-image loss (hub id or folder; unpaired: unused)",
    )
    g.add_argument(
        "--disc-backbone",
        default=d.disc_backbone,
        help="CLIP vision tower of the discriminator (hub id or folder)",
    )
    g.add_argument(
        "--lpips-pretrained",
        action=argparse.BooleanOptionalAction,
        default=d.lpips_pretrained,
        help="ImageNet VGG trunk for LPIPS (--no-lpips-pretrained: random trunk, for tests)",
    )
    g.add_argument(
        "--lpips-vgg",
        default=None,
        help="LPIPS's ImageNet VGG-16 trunk from this torchvision state dict file instead of a download",
    )
    g.add_argument("--train-image-prep", default=d.train_image_prep, choices=IMAGE_PREPS)
    g.add_argument("--test-image-prep", default=d.test_image_prep, choices=IMAGE_PREPS)
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="per process")
    g.add_argument("--num-workers", type=int, default=d.num_workers, help="data loader workers")
    g = parser.add_argument_group("optimisation")
    g.add_argument("--max-steps", type=int, default=d.max_steps)
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--lr", type=float, default=d.lr)
    g.add_argument("--adam-beta1", type=float, default=d.adam_beta1)
    g.add_argument("--adam-beta2", type=float, default=d.adam_beta2)
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--adam-epsilon", type=float, default=d.adam_epsilon)
    g.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm)
    g.add_argument("--lr-scheduler", default=d.lr_scheduler, choices=LR_SCHEDULERS)
    g.add_argument("--lr-warmup-steps", type=int, default=d.lr_warmup_steps)
    g.add_argument("--lr-num-cycles", type=int, default=d.lr_num_cycles)
    g.add_argument("--lr-power", type=float, default=d.lr_power)
    g.add_argument("--gradient-accumulation-steps", type=int, default=d.gradient_accumulation_steps)
    g = parser.add_argument_group("hardware and precision")
    g.add_argument("--gradient-checkpointing", action="store_true")
    g.add_argument("--mixed-precision", default=d.mixed_precision, choices=MIXED_PRECISION)
    g.add_argument(
        "--frozen-dtype",
        default=d.frozen_dtype,
        choices=FROZEN_DTYPES,
        help="dtype of the frozen base weights; auto: the mixed-precision dtype (trainable stay fp32)",
    )
    g.add_argument("--allow-tf32", action="store_true")
    g.add_argument("--cpu", action="store_true", help="train on the cpu even if a GPU is present")
    g = parser.add_argument_group("checkpoints")
    g.add_argument(
        "--checkpoint-every", type=int, default=d.checkpoint_every, help="steps; 0: only at the end"
    )
    g.add_argument("--keep-last", type=int, default=d.keep_last, help="checkpoints kept; 0: all")
    g.add_argument("--resume", default=None, help="'latest' or a checkpoint folder")
    g.add_argument(
        "--allow-other-base",
        action="store_true",
        help="resume on a --base other than the checkpoint's (other id, weights or VAE/scheduler config)",
    )
    g.add_argument("--publish-to", default=None, help="also place each model here (the app's model folder)")
    g.add_argument(
        "--name", default=None, help="model name for published files (default: output folder name)"
    )
    g = parser.add_argument_group("validation and logging")
    g.add_argument("--eval-every", type=int, default=d.eval_every, help="steps; 0: no validation")
    g.add_argument(
        "--num-eval-samples", type=int, default=d.num_eval_samples, help="test inputs; -1: all, 0: none"
    )
    g.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size)
    g.add_argument(
        "--num-grid",
        type=int,
        default=d.num_grid,
        help="rows per grid (paired: input | output | target; unpaired: input | output)",
    )
    g.add_argument(
        "--track-fid",
        action="store_true",
        help="FID of the outputs against the target domain's test images (unpaired: both directions)",
    )
    g.add_argument(
        "--fid-weights", default=None, help="FID Inception state dict file (default: downloaded once)"
    )
    g.add_argument("--log-every", type=int, default=d.log_every)
    g.add_argument("--report-to", default=d.report_to, choices=REPORT_TO)
    g.add_argument("--tracker-project", default=d.tracker_project, help="wandb project")
    g = parser.add_argument_group("the Hugging Face Hub (token: hf auth login, or HF_TOKEN)")
    g.add_argument(
        "--push-to-hub",
        default=None,
        metavar="OWNER/NAME",
        help="upload the model, its card, the last validation grid and the options at the end",
    )
    g.add_argument(
        "--push-every-checkpoint",
        action="store_true",
        help="also push at each checkpoint (uploads in the background)",
    )
    g.add_argument("--push-private", action="store_true", help="create the repo private")
    g.add_argument("--push-license", default=d.push_license, help="license id in the card (default: other)")
    g.add_argument("--push-dataset", default=None, help="Hub dataset id listed in the card")


C = TypeVar("C", bound=CommonConfig)


def config_from_args(cls: type[C], args: argparse.Namespace) -> C:
    """Build `cls` from parsed arguments (one attribute per field), then validate it."""
    cfg = cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)})
    cfg.validate()
    return cfg


def parse_config(cls: type[C], parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> C:
    """Parse `argv` (None: the command line) with `parser` into a validated `cls`.

    argparse reads a word starting with "-" as a negative number only if it matches `-\\d+` or
    `-\\d*.\\d+` (and the parser has no flag that looks like one): `--lr -1e-3` or `--lr -inf` would be
    read as a second flag and fail with "expected one argument". A number after one of the config's
    numeric flags is therefore joined to it (`--lr=-1e-3`), so that validation can name the problem.
    """
    numeric = {_flag(f.name) for f in dataclasses.fields(cls) if f.type in ("int", "float", int, float)}
    words = list(sys.argv[1:] if argv is None else argv)
    out: list[str] = []
    i = 0
    while i < len(words):
        word = words[i]
        if word == "--":
            out += words[i:]
            break
        if word in numeric and i + 1 < len(words) and _is_number(words[i + 1]):
            out.append(f"{word}={words[i + 1]}")
            i += 2
            continue
        out.append(word)
        i += 1
    return config_from_args(cls, parser.parse_args(out))


def _is_number(word: str) -> bool:
    try:
        float(word)
    except ValueError:
        return False
    return True
