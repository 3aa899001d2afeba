"""The frozen SD-Turbo base: tokenizer, text encoder, UNet, VAE and the one-step noise schedule.

Adapters (LoRA, skip convs, trained first conv) are added on top of it by `turbo.generator.Generator`.
"""

from __future__ import annotations

import logging
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch

# from their own packages rather than diffusers' top level, whose lazy imports show type checkers
# placeholder classes
from diffusers.models import AutoencoderKL, UNet2DConditionModel
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler
from transformers import AutoTokenizer, CLIPTextModel, PreTrainedTokenizerBase

from turbo.errors import TurboError

logger = logging.getLogger(__name__)

DEFAULT_BASE = "stabilityai/sd-turbo"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class BaseModelError(TurboError):
    """The base model could not be loaded (missing files, no network, wrong layout)."""


@dataclass
class OneStepSchedule:
    """The one-step x0 prediction at a fixed timestep, read from the base's noise schedule.

    Matches `DDPMScheduler.step` with one inference step (its variance term is ~1e-10 and dropped).
    """

    timestep: int
    alpha_prod: float  # alphas_cumprod[timestep]
    prediction_type: str = "epsilon"
    clip_sample: bool = False
    clip_sample_range: float = 1.0

    @classmethod
    def from_scheduler(cls, scheduler: DDPMScheduler, timestep: int | None = None) -> OneStepSchedule:
        config = scheduler.config
        t = config["num_train_timesteps"] - 1 if timestep is None else timestep
        return cls(
            timestep=t,
            alpha_prod=float(scheduler.alphas_cumprod[t]),
            prediction_type=config["prediction_type"],
            clip_sample=bool(config["clip_sample"]),
            clip_sample_range=float(config["clip_sample_range"]),
        )

    def x0(self, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """Predicted clean latent from the UNet output at `self.timestep`; computed in fp32."""
        a = self.alpha_prod
        out, x = model_output.float(), sample.float()
        if self.prediction_type == "epsilon":
            x0 = (x - (1 - a) ** 0.5 * out) / a**0.5
        elif self.prediction_type == "v_prediction":
            x0 = a**0.5 * x - (1 - a) ** 0.5 * out
        elif self.prediction_type == "sample":
            x0 = out
        else:
            raise BaseModelError(
                f"unsupported prediction_type {self.prediction_type!r} in the scheduler config"
            )
        if self.clip_sample:
            x0 = x0.clamp(-self.clip_sample_range, self.clip_sample_range)
        return x0.to(model_output.dtype)


@dataclass
class BaseModel:
    """The frozen pieces of SD-Turbo, on one device and dtype."""

    source: str
    tokenizer: PreTrainedTokenizerBase
    text_encoder: CLIPTextModel
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    schedule: OneStepSchedule
    device: torch.device
    dtype: torch.dtype

    @torch.no_grad()
    def encode_prompt(self, prompts: str | list[str]) -> torch.Tensor:
        """Text embeddings (last hidden state), shape (B, 77, D), on the base's device and dtype."""
        if isinstance(prompts, str):
            prompts = [prompts]
        tokens = self.tokenizer(
            prompts,
            max_length=self.tokenizer.model_max_length,
            padding="max_length",
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)
        return self.text_encoder(tokens)[0].to(self.dtype)


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """`None`/"auto" -> cuda, then mps, then cpu; otherwise the named device.

    BaseModelError when the name is not a device or its backend is absent here (cuda without CUDA or
    with fewer GPUs than the index, mps without MPS).
    """
    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise BaseModelError(f"unknown device {device!r}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BaseModelError(f"device {device!r} was asked for but CUDA is not available on this machine")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise BaseModelError(
            f"device {device!r} was asked for but this machine has {torch.cuda.device_count()} CUDA device(s)"
        )
    if dev.type == "mps" and not _mps_available():
        raise BaseModelError(
            f"device {device!r} was asked for but MPS (Apple GPU) is not available on this machine"
        )
    return dev


def _mps_available() -> bool:
    # torch builds without MPS lack torch.backends.mps on some versions
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """`None` -> fp16 on cuda, fp32 elsewhere; else one of fp32/fp16/bf16 (or a torch dtype)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise BaseModelError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _hub_unreachable(timeout: float = 5.0) -> str | None:
    """Why the Hugging Face hub cannot be reached now, or None: one request, no retries.

    A base that is not cached would otherwise wait through the hub client's retries (about a minute
    with no network) before failing."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return None  # the hub client fails at once by itself
    request = urllib.request.Request(constants.ENDPOINT, method="HEAD")
    try:
        urllib.request.urlopen(request, timeout=timeout).close()
    except urllib.error.HTTPError:
        return None  # an answer, even an error status, means the hub is there
    except (OSError, ValueError) as e:  # URLError, timeouts, refused connections
        return str(getattr(e, "reason", e)) or type(e).__name__
    return None


def _cached(hub_id: str) -> bool:
    """Whether the hub cache holds a snapshot of `hub_id` (complete or not)."""
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(hub_id, local_files_only=True)
    except (OSError, ValueError):
        return False
    return True


def _load_parts(source: str, dtype: torch.dtype):
    is_dir = Path(source).is_dir()
    if not is_dir and Path(source).exists():
        raise BaseModelError(f"--base {source!r} is a file; give a hub id or a diffusers folder")
    # a hub id is "owner/name": anything else that names no folder was meant as a local path
    if not is_dir and (source.startswith((".", "/", "~")) or source.count("/") > 1 or "\\" in source):
        raise BaseModelError(f"base folder {source} does not exist (and it is not a hub id like owner/name)")
    if is_dir:
        missing = [
            p
            for p in ("tokenizer", "text_encoder", "unet", "vae", "scheduler")
            if not (Path(source) / p).is_dir()
        ]
        if missing:
            raise BaseModelError(
                f"base folder {source} lacks {', '.join(missing)}/ "
                "(expected the diffusers layout of SD-Turbo)"
            )
    elif not _cached(source) and (reason := _hub_unreachable()):
        raise BaseModelError(_not_loaded(source, f"the hub cannot be reached: {reason}"))
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, subfolder="tokenizer")
        text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", dtype=dtype)
        unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", torch_dtype=dtype)
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=dtype)
        scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler")
    except (OSError, ValueError) as e:
        if is_dir:
            raise BaseModelError(f"could not load the base model from {source}: {e}") from e
        raise BaseModelError(
            _not_loaded(source, str(e).splitlines()[0] if str(e) else type(e).__name__)
        ) from e
    return tokenizer, text_encoder, unet, vae, scheduler


def _not_loaded(hub_id: str, cause: str) -> str:
    return (
        f"could not load the base model {hub_id!r} (not in the local Hugging Face cache and the hub is "
        f"unreachable or offline). Run once with network access to download it, or pass --base with a "
        f"local diffusers folder (tokenizer/, text_encoder/, unet/, vae/, scheduler/). Cause: {cause}"
    )


def load_base(
    source: str | Path = DEFAULT_BASE,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> BaseModel:
    """Load SD-Turbo from a hub id or a local diffusers folder, frozen and in eval mode.

    Each call reads the weights again; `turbo.pipeline.get_pipeline` keeps one per process.
    """
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    source = str(source)
    logger.info("loading base model %s on %s (%s)", source, dev, dt)
    tokenizer, text_encoder, unet, vae, scheduler = _load_parts(source, dt)
    for net in (text_encoder, unet, vae):
        net.requires_grad_(False)
        net.eval()
        net.to(dev)
    return BaseModel(
        source=source,
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        unet=unet,
        vae=vae,
        schedule=OneStepSchedule.from_scheduler(scheduler),
        device=dev,
        dtype=dt,
    )
