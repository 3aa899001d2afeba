"""Import of the original research code's `.pkl` checkpoints (GaParmar/img2img-turbo).

Three layouts exist:
- paired (pix2pix_turbo.save_model): `unet_lora_target_modules`, `vae_lora_target_modules`,
  `rank_unet`, `rank_vae`, `state_dict_unet` (LoRA + conv_in), `state_dict_vae` (LoRA + skip convs);
  LoRA alpha is peft's default (8).
- stochastic sketch model: the same, with a twin first conv (`conv_in.conv_in_pretrained.*`,
  `conv_in.conv_in_curr.*`).
- unpaired (train_cyclegan_turbo): UNet LoRA in three groups (`sd_encoder`, `sd_decoder`,
  `sd_other`, alpha = rank), and `sd_vae_enc` / `sd_vae_dec` holding both direction VAEs whole
  (`vae.*` is a2b, `vae_b2a.*` is b2a; VAE LoRA alpha 8). Its first conv keeps the base weights
  plus a LoRA (the trained base weights were never saved).
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch

from turbo.errors import first_line
from turbo.formats.checkpoint import CheckpointError, Direction, TurboCheckpoint, is_torch_save

PEFT_DEFAULT_ALPHA = 8  # LoraConfig's default lora_alpha, which the paired models were trained with
PAIRED_KEYS = {"rank_unet", "rank_vae", "state_dict_unet", "state_dict_vae"}
UNPAIRED_KEYS = {"rank_unet", "rank_vae", "sd_encoder", "sd_decoder", "sd_other", "sd_vae_enc", "sd_vae_dec"}

_ADAPTER = re.compile(r"\.(lora_[AB])\.[^.]+\.weight$")  # ".lora_A.<adapter>.weight"


def _strip_adapter(key: str) -> str:
    """ "m.lora_A.vae_skip.weight" -> "m.lora_A.weight"; "m.base_layer.weight" -> "m.weight"."""
    key = _ADAPTER.sub(r".\1.weight", key)
    return key.replace(".base_layer.", ".")


def _read(path: Path) -> dict:
    with open(path, "rb") as f:
        head = f.read(2)
    if not is_torch_save(head):
        raise CheckpointError(f"{path}: not a readable checkpoint (neither a torch zip archive nor a pickle)")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refused: the file holds objects other than tensors and plain data "
            f"(turbo never unpickles arbitrary code). {first_line(e)}"
        ) from e
    except Exception as e:  # garbage makes the unpickler fail in many ways (IndexError, KeyError, ...)
        raise CheckpointError(f"{path}: not a readable checkpoint ({first_line(e)})") from e
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(sd).__name__}")
    return sd


def _paired(sd: dict, path: Path) -> TurboCheckpoint:
    unet, twin = {}, False
    for k, v in sd["state_dict_unet"].items():
        if k.startswith("conv_in.conv_in_pretrained."):
            unet["conv_in_pretrained." + k.rsplit(".", 1)[1]] = v
            twin = True
        elif k.startswith("conv_in.conv_in_curr."):
            unet["conv_in." + k.rsplit(".", 1)[1]] = v
        elif ".lora_" in k or k.startswith("conv_in."):
            unet[_strip_adapter(k)] = v
    vae = {_strip_adapter(k): v for k, v in sd["state_dict_vae"].items() if ".lora_" in k or "skip_conv" in k}
    return TurboCheckpoint(
        kind="paired",
        stochastic=twin,
        rank_unet=int(sd["rank_unet"]),
        alpha_unet=PEFT_DEFAULT_ALPHA,
        rank_vae=int(sd["rank_vae"]),
        alpha_vae=PEFT_DEFAULT_ALPHA,
        unet=unet,
        vae={"a2b": vae},
        preprocess="none",  # the original CLI feeds a custom paired model the image as given
        source=str(path),
    )


def _unpaired(sd: dict, path: Path) -> TurboCheckpoint:
    unet = {}
    for group in ("sd_encoder", "sd_decoder", "sd_other"):
        for k, v in sd[group].items():
            unet[_strip_adapter(k)] = v
    # Both state dicts hold the same modules; the original loads enc then dec, so dec wins.
    whole = {**sd["sd_vae_enc"], **sd["sd_vae_dec"]}
    vae: dict[Direction, dict[str, torch.Tensor]] = {"a2b": {}, "b2a": {}}
    directions: dict[str, Direction] = {"vae": "a2b", "vae_b2a": "b2a"}
    for k, v in whole.items():
        prefix, _, rest = k.partition(".")
        direction = directions.get(prefix)
        if direction is None:
            raise CheckpointError(f"{path}: unexpected VAE key {k!r} in an unpaired checkpoint")
        if ".lora_" in rest or "skip_conv" in rest:
            vae[direction][_strip_adapter(rest)] = v
    rank_unet = int(sd["rank_unet"])
    return TurboCheckpoint(
        kind="unpaired",
        stochastic=False,
        rank_unet=rank_unet,
        alpha_unet=rank_unet,
        rank_vae=int(sd["rank_vae"]),
        alpha_vae=PEFT_DEFAULT_ALPHA,
        unet=unet,
        vae=vae,
        preprocess="unpaired",
        image_prep="resize_512x512",  # the default of the original's unpaired CLI
        source=str(path),
    )


def load_original_pkl(path: str | Path) -> TurboCheckpoint:
    """Read one of the original `.pkl` layouts with `torch.load(weights_only=True)`.

    A paired file gets the image as given and an unpaired one a 512x512 resize, as the original's
    CLI does for a custom `--model_path`; `turbo.formats.load_checkpoint` then gives a released file
    (by its released name) what the original hard-codes for it.
    """
    path = Path(path)
    sd = _read(path)
    keys = set(sd)
    if not (UNPAIRED_KEYS <= keys or PAIRED_KEYS <= keys):
        raise CheckpointError(
            f"{path}: not an img2img-turbo checkpoint: expected the keys of a paired model "
            f"({', '.join(sorted(PAIRED_KEYS))}) or of an unpaired one; "
            f"found {', '.join(sorted(map(str, keys))[:8])}"
        )
    layout = "unpaired" if UNPAIRED_KEYS <= keys else "paired"
    try:
        ckpt = _unpaired(sd, path) if layout == "unpaired" else _paired(sd, path)
    except CheckpointError:
        raise
    except (AttributeError, TypeError, ValueError, KeyError) as e:  # the right keys, holding the wrong things
        raise CheckpointError(f"{path}: a damaged {layout} img2img-turbo checkpoint ({first_line(e)})") from e
    ckpt.validate()
    return ckpt
