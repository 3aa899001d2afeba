"""What identifies the base model a run trains on; saved in every checkpoint and checked on resume.

Two bases of the same shapes (SD-Turbo and SD 2.1, or one VAE with another `scaling_factor`) load
into the same LoRA without complaint, so a resumed run compares:

- `source`: the --base hub id, or the absolute path of a local folder;
- `config`: the VAE config values that change what the latents mean (scaling and shift factors) and
  the one-step schedule read from the scheduler config (timestep, alpha_prod, prediction type);
- `weights`: a SHA-256 over a sample of every frozen tensor (name, shape, 64 evenly spaced values),
  in the dtype they were loaded in (`dtype`); weights loaded in another dtype are not compared.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path

import torch

from turbo.base import BaseModel

VAE_KEYS = ("scaling_factor", "shift_factor", "latent_channels")
SAMPLES_PER_TENSOR = 64


def describe_source(source: str) -> str:
    """A local folder's absolute path (so ./base and /abs/base compare equal), else the hub id."""
    path = Path(os.path.expanduser(source))
    return str(path.resolve()) if path.is_dir() else source


@torch.no_grad()
def _weights_digest(base: BaseModel) -> str:
    """The weights' SHA-256 (hex), or "" where they hold no data (meta or fake tensors: benchmarks)."""
    try:
        return _digest(base)
    except (RuntimeError, NotImplementedError, TypeError):
        return ""


def _digest(base: BaseModel) -> str:
    digest = hashlib.sha256()
    for part in ("text_encoder", "unet", "vae"):
        module = getattr(base, part, None)
        if module is None:
            continue
        for name, tensor in sorted(module.state_dict().items()):
            flat = tensor.detach().reshape(-1)
            step = max(1, flat.numel() // SAMPLES_PER_TENSOR)
            sample = flat[::step][:SAMPLES_PER_TENSOR].cpu().contiguous()
            digest.update(f"{part}.{name}:{tuple(tensor.shape)}:".encode())
            digest.update(sample.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def base_identity(base: BaseModel, source: str) -> dict[str, str]:
    """The identity of a freshly loaded base (before any adapter is added); values are strings."""
    vae = {k: base.vae.config.get(k) for k in VAE_KEYS}
    return {
        "source": describe_source(source),
        "config": json.dumps({"vae": vae, "schedule": asdict(base.schedule)}, sort_keys=True),
        "weights": _weights_digest(base),
        "dtype": str(base.dtype).removeprefix("torch."),
    }


def config_difference(saved: dict, current: dict) -> str | None:
    """The config values that differ between two identities, in words; None if none."""
    try:
        old, new = json.loads(saved["config"]), json.loads(current["config"])
    except (KeyError, TypeError, ValueError):
        return None
    diffs = []
    for part in ("vae", "schedule"):
        for key in sorted(set(old.get(part, {})) | set(new.get(part, {}))):
            a, b = old.get(part, {}).get(key), new.get(part, {}).get(key)
            if a != b:
                diffs.append(f"{part} {key} {a} vs {b}")
    return ", ".join(diffs) or None


def weights_differ(saved: dict, current: dict) -> bool | None:
    """Whether the sampled weights differ; None where they cannot be compared (other dtype, unsaved)."""
    if not saved.get("weights") or not current["weights"] or saved.get("dtype") != current["dtype"]:
        return None
    return saved["weights"] != current["weights"]
