"""Tiny, randomly initialised SD-Turbo-shaped base models for tests (no downloads).

`make_tiny_base(folder)` writes a diffusers-layout folder (tokenizer, text_encoder, unet, vae,
scheduler) with the same structure as stabilityai/sd-turbo but a few thousand parameters per
network, so tests load it through the real loading path (`turbo.base.load_base`).
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

# SD-Turbo's scheduler config (shipped as EulerDiscreteScheduler); the one-step maths reads its betas.
SCHEDULER_CONFIG = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    prediction_type="epsilon",
    timestep_spacing="trailing",
    steps_offset=1,
    clip_sample=False,
    set_alpha_to_one=False,
)


def _write_tokenizer(folder: Path) -> None:
    """A CLIP BPE tokenizer with a character-level vocabulary (no merges)."""
    folder.mkdir(parents=True, exist_ok=True)
    tokens = ["!"]  # id 0: SD 2.x pads with "!"
    chars = string.ascii_lowercase + string.digits + ".,'-"
    tokens += list(chars) + [c + "</w>" for c in chars]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = CLIPTokenizer(vocab=vocab, merges=[], pad_token="!", model_max_length=77)
    tok.save_pretrained(str(folder))


def tiny_unet(seed: int = 0, channels: tuple[int, int] = (16, 32)) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=channels,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(2, 4),
        cross_attention_dim=32,
        use_linear_projection=True,
        norm_num_groups=8,
        flip_sin_to_cos=True,
        freq_shift=0,
    )


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=4,
        act_fn="silu",
        scaling_factor=0.18215,
        sample_size=64,
    )


def tiny_text_encoder(seed: int = 0) -> CLIPTextModel:
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        hidden_act="gelu",
        projection_dim=16,
        pad_token_id=0,
        bos_token_id=len(string.ascii_lowercase + string.digits + ".,'-") * 2 + 1,
        eos_token_id=len(string.ascii_lowercase + string.digits + ".,'-") * 2 + 2,
    )
    return CLIPTextModel(config)


def make_tiny_base(folder: Path, seed: int = 0, unet_channels: tuple[int, int] = (16, 32)) -> Path:
    """Write a tiny SD-Turbo-shaped base model in diffusers layout to `folder` and return it."""
    folder = Path(folder)
    _write_tokenizer(folder / "tokenizer")
    tiny_text_encoder(seed).save_pretrained(folder / "text_encoder")
    tiny_unet(seed, unet_channels).save_pretrained(folder / "unet")
    tiny_vae(seed).save_pretrained(folder / "vae")
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    config = {"_class_name": "EulerDiscreteScheduler", **SCHEDULER_CONFIG}
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(config, indent=1))
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return folder
