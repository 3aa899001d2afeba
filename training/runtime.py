"""What every trainer needs around its objective: processes and devices (Hugging Face Accelerate),
precision, seeding, the progress bar, TensorBoard/wandb logging and validation image grids.

`Runtime(cfg)` works alike under `python -m ...`, `accelerate launch` and `torchrun`; only rank 0
writes logs and images.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from PIL import Image
from tqdm.auto import tqdm

from training.config import CommonConfig, ConfigError
from turbo.preprocess import to_pil

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter  # imported when asked for: it needs tensorboard

logger = logging.getLogger(__name__)

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class Runtime:
    """The accelerator, this process's place in the run, and the run folder's logs."""

    def __init__(self, cfg: CommonConfig) -> None:
        if cfg.mixed_precision == "fp16" and (cfg.cpu or not torch.cuda.is_available()):
            raise ConfigError("--mixed-precision fp16 needs a GPU; use bf16 on the cpu")
        self.cfg = cfg
        self.accelerator = Accelerator(cpu=cfg.cpu, mixed_precision=cfg.mixed_precision)
        self.device = self.accelerator.device
        self.rank = self.accelerator.process_index
        self.world = self.accelerator.num_processes
        self.is_main = self.accelerator.is_main_process
        self.output = Path(cfg.output)
        if cfg.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self._writer: SummaryWriter | None = None
        self._wandb: Any = None  # a wandb run (wandb ships no types)
        if self.is_main:
            self.output.mkdir(parents=True, exist_ok=True)
            self._open_tracker()
        self.barrier()

    # -- precision ---------------------------------------------------------------------------------

    @property
    def frozen_dtype(self) -> torch.dtype:
        """dtype for frozen weights: --frozen-dtype, or the mixed-precision dtype when "auto"."""
        if self.cfg.frozen_dtype != "auto":
            return _DTYPES[self.cfg.frozen_dtype]
        return {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[self.cfg.mixed_precision]

    def autocast(self):
        """Autocast context for the mixed-precision dtype (a no-op without mixed precision)."""
        return self.accelerator.autocast()

    # -- processes ---------------------------------------------------------------------------------

    def seed(self, seed: int, per_process: bool) -> None:
        """Seed python/numpy/torch; per_process adds the rank (own noise and augmentation per process)."""
        set_seed(seed + (self.rank if per_process else 0))

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    def no_sync(self, model: torch.nn.Module, sync: bool):
        """Context that skips DDP's gradient all-reduce unless `sync` (for gradient accumulation)."""
        return contextlib.nullcontext() if sync else self.accelerator.no_sync(model)

    # -- logging -----------------------------------------------------------------------------------

    def _open_tracker(self) -> None:
        if self.cfg.report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.output / "logs"))
        elif self.cfg.report_to == "wandb":
            try:
                import wandb
            except ImportError as e:
                raise ConfigError("--report-to wandb needs the wandb package (pip install wandb)") from e
            self._wandb = wandb.init(
                project=self.cfg.tracker_project, dir=str(self.output), config=vars(self.cfg)
            )

    def log(self, values: dict[str, float], step: int) -> None:
        """Scalars to the tracker and to `<output>/metrics.jsonl` (rank 0 only)."""
        if not self.is_main:
            return
        values = {k: float(v) for k, v in values.items()}
        if self._writer is not None:
            for k, v in values.items():
                self._writer.add_scalar(k, v, step)
            self._writer.flush()
        if self._wandb is not None:
            self._wandb.log(values, step=step)
        with open(self.output / "metrics.jsonl", "a") as f:
            f.write(
                json.dumps(
                    {"step": step, **{k: (v if math.isfinite(v) else None) for k, v in values.items()}}
                )
            )
            f.write("\n")

    def rewind_logs(self, step: int) -> None:
        """Forget what was logged after `step` (a run resumed from that step logs those steps again):
        `metrics.jsonl` keeps its rows up to `step`, TensorBoard purges its later events (rank 0)."""
        if not self.is_main:
            return
        path = self.output / "metrics.jsonl"
        if path.is_file():
            kept, dropped = [], 0
            for line in path.read_text().splitlines():
                try:
                    row_step = json.loads(line)["step"]
                except (ValueError, KeyError, TypeError):
                    dropped += 1  # half a line, cut off by a kill
                    continue
                if row_step <= step:
                    kept.append(line)
                else:
                    dropped += 1
            if dropped:
                tmp = path.with_name(f".{path.name}.tmp")
                tmp.write_text("".join(f"{line}\n" for line in kept))
                tmp.replace(path)
                logger.info("%s: dropped %d row(s) after step %d (logged again now)", path, dropped, step)
        if self._writer is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer.close()
            self._writer = SummaryWriter(str(self.output / "logs"), purge_step=step + 1)

    def logged_validation(self, step: int) -> bool:
        """Whether `metrics.jsonl` holds a validation row ("val/..." values) of `step`."""
        path = self.output / "metrics.jsonl"
        if not path.is_file():
            return False
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and row.get("step") == step and any(k.startswith("val/") for k in row):
                return True
        return False

    def progress(self, total: int, initial: int) -> tqdm:
        return tqdm(total=total, initial=initial, desc="steps", disable=not self.is_main, dynamic_ncols=True)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._wandb is not None:
            self._wandb.finish()
        self.accelerator.end_training()
        # Accelerate keeps its settings in a process-wide singleton; drop them so a later run in the
        # same process (tests, notebooks) may choose another precision.
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=False)


def save_grid(rows: list[list[torch.Tensor]], path: str | Path) -> Path:
    """Save a PNG with one row per sample and one column per image (e.g. input | output | target).

    Each image is a tensor in [-1, 1], shape (3, H, W); a row's images must share H. The file is
    written to a temp name and renamed, so a reader never sees half an image.
    """
    images = [[to_pil(t) for t in row] for row in rows]
    width = max(sum(im.width for im in row) for row in images)
    height = sum(row[0].height for row in images)
    grid = Image.new("RGB", (width, height), "white")
    y = 0
    for row in images:
        x = 0
        for im in row:
            grid.paste(im, (x, y))
            x += im.width
        y += row[0].height
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    grid.save(tmp, format="PNG")
    tmp.replace(path)
    return path
