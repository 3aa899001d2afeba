"""Helpers (no tests here) for the training tests: synthetic datasets, tiny random networks, runs.

Paired shapes (`make_shapes_dataset`): outlines of random shapes -> the filled shape, coloured by kind.
Unpaired domains (`make_domains_dataset`): domain A, random shapes in warm colours on a light ground;
domain B, the same kind of random shapes in cool colours on a dark ground. A translation A -> B must
darken the ground and cool the shapes while keeping where the shapes are. Unpaired learning tests
give the tiny base SD's latent scale first (`set_unit_latent_scale`).

Test modules use the autouse `one_thread` fixture by importing it.
"""

from __future__ import annotations

import json
import os
import random
import string
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from tiny import _write_tokenizer
from transformers import CLIPConfig, CLIPModel, ViTConfig, ViTModel

from training import state as state_mod

REPO = Path(__file__).resolve().parents[1]
COLOURS = {"circle": (220, 40, 40), "square": (40, 60, 220), "triangle": (40, 180, 60)}
WARM = [(220, 60, 30), (240, 150, 20), (200, 30, 90)]
COOL = [(30, 90, 230), (20, 190, 200), (90, 60, 220)]
GROUND = {"a": (235, 230, 215), "b": (25, 30, 45)}
CAPTIONS = {"a": "warm shapes on light ground", "b": "cool shapes on dark ground"}


def draw_domain(domain: str, rng: random.Random, size: int = 32) -> Image.Image:
    """One image of `domain` ("a" or "b"): 1-3 random ellipses/rectangles."""
    img = Image.new("RGB", (size, size), GROUND[domain])
    draw = ImageDraw.Draw(img)
    colours = WARM if domain == "a" else COOL
    for _ in range(rng.randint(1, 3)):
        s = rng.randint(size // 4, size // 2)
        x, y = rng.randint(0, size - s), rng.randint(0, size - s)
        box = (x, y, x + s, y + s)
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=rng.choice(colours))
    return img


def make_domains_dataset(root: Path, n_train=(48, 40), n_test=(8, 8), size: int = 32, seed: int = 0) -> Path:
    """The unpaired layout (train_A/B, test_A/B, fixed_prompt_a/b.txt); A and B differ in count."""
    rng = random.Random(seed)
    for split, counts in (("train", n_train), ("test", n_test)):
        for domain, count in zip("ab", counts, strict=True):
            folder = root / f"{split}_{domain.upper()}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                draw_domain(domain, rng, size).save(folder / f"{domain}{i:03d}.png")
    for domain in "ab":
        (root / f"fixed_prompt_{domain}.txt").write_text(CAPTIONS[domain] + "\n")
    return root


def set_unit_latent_scale(base: Path, *image_folders: Path) -> float:
    """Set the VAE `scaling_factor` of the base model folder `base` to 1 / std of the VAE's posterior-mean
    latents of the images in `image_folders`, and return it.

    That is how SD's 0.18215 was chosen for its VAE: scaled latents of unit variance. The tiny random
    VAE's latents have a std near 0.27, not SD's ~5.5, so with 0.18215 its scaled latents are ~0.05
    and the one-step x0 is dominated by the random UNet's noise estimate: the decoder then gets
    inputs of std ~22 (about 4 with this scale; SD-Turbo decodes a unit-variance x0 as ~5.5). The skip
    convs that carry the input's layout into the decoder start at 1e-5 and are then swamped for far
    longer: in 30 training steps the layout was learned from a few seeds only.
    """
    from diffusers import AutoencoderKL

    from turbo.preprocess import to_model_input

    images = [Image.open(p) for folder in image_folders for p in sorted(Path(folder).iterdir())]
    x = torch.cat([to_model_input(im, "unpaired") for im in images])
    vae = AutoencoderKL.from_pretrained(base / "vae")
    with torch.no_grad():
        scale = 1.0 / vae.encode(x).latent_dist.mean.std().item()
    path = base / "vae" / "config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"scaling_factor": scale}, indent=1))
    return scale


def _draw(draw: ImageDraw.ImageDraw, kind: str, box, **style) -> None:
    x0, y0, x1, y1 = box
    if kind == "circle":
        draw.ellipse(box, **style)
    elif kind == "square":
        draw.rectangle(box, **style)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], **style)


def make_shapes_dataset(
    root: Path, n_train: int = 96, n_test: int = 8, size: int = 32, seed: int = 0
) -> Path:
    """Outlines of random shapes (white on black, as edge maps) -> the filled shape, coloured by kind."""
    rng = random.Random(seed)
    for split, count in (("train", n_train), ("test", n_test)):
        (root / f"{split}_A").mkdir(parents=True, exist_ok=True)
        (root / f"{split}_B").mkdir(parents=True, exist_ok=True)
        prompts = {}
        for i in range(count):
            kind = rng.choice(list(COLOURS))
            s = rng.randint(size * 3 // 8, size * 3 // 4)
            x, y = rng.randint(0, size - s), rng.randint(0, size - s)
            box = (x, y, x + s, y + s)
            a = Image.new("RGB", (size, size), "black")
            _draw(ImageDraw.Draw(a), kind, box, outline=(255, 255, 255))
            b = Image.new("RGB", (size, size), "white")
            _draw(ImageDraw.Draw(b), kind, box, fill=COLOURS[kind])
            a.save(root / f"{split}_A" / f"{i:03d}.png")
            b.save(root / f"{split}_B" / f"{i:03d}.png")
            prompts[f"{i:03d}.png"] = f"a {kind}"
        (root / f"{split}_prompts.json").write_text(json.dumps(prompts))
    return root


def make_tiny_clip(folder: Path, image_size: int = 32) -> Path:
    """A tiny random CLIPModel plus tokenizer, saved like a hub checkpoint (CLIP loss, discriminator)."""
    n = len(string.ascii_lowercase + string.digits + ".,'-")
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            max_position_embeddings=77, pad_token_id=0, bos_token_id=2 * n + 1, eos_token_id=2 * n + 2,
            projection_dim=16,
        ),
        vision_config=dict(
            image_size=image_size, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
            num_attention_heads=2, projection_dim=16,
        ),
        projection_dim=16,
    )  # fmt: skip
    CLIPModel(config).save_pretrained(folder)
    _write_tokenizer(folder)
    return folder


def make_tiny_dino(folder: Path) -> Path:
    """A tiny random ViT (patch 8) saved with save_pretrained, standing in for DINO ViT-B/8."""
    torch.manual_seed(0)
    config = ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=224,
        patch_size=8, layer_norm_eps=1e-6,
    )  # fmt: skip
    ViTModel(config, add_pooling_layer=False).save_pretrained(folder)
    return folder


def random_fid_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random FID Inception weights; conv kernels He-scaled so the features neither vanish nor explode."""
    from training.fid import fid_inception_v3

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, value in fid_inception_v3().state_dict().items():
        if name.endswith("conv.weight"):
            value = torch.randn(value.shape, generator=g) * (2.0 / value[0].numel()) ** 0.5
        state[name] = value
    return state


def random_fid_weights(path: Path, seed: int = 0) -> Path:
    """`random_fid_state_dict` written to `path` (what --fid-weights reads)."""
    torch.save(random_fid_state_dict(seed), path)
    return path


def as_array(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"), dtype=np.float64) / 255.0


def colour_stats(images: list[Image.Image]) -> np.ndarray:
    """(mean luminance, mean of blue - red) over a set of images, values in [0, 1] / [-1, 1]."""
    arrs = np.stack([as_array(im) for im in images])
    lum = arrs @ np.array([0.299, 0.587, 0.114])
    return np.array([lum.mean(), (arrs[..., 2] - arrs[..., 0]).mean()])


def edge_map(img: Image.Image) -> np.ndarray:
    """Gradient magnitude of the luminance (finite differences), shape (H-1, W-1)."""
    lum = as_array(img) @ np.array([0.299, 0.587, 0.114])
    return np.hypot(np.diff(lum, axis=0)[:, :-1], np.diff(lum, axis=1)[:-1, :])


def edge_correlation(a: Image.Image, b: Image.Image) -> float:
    """Pearson correlation of the two images' edge maps (1: same layout)."""
    return float(np.corrcoef(edge_map(a).ravel(), edge_map(b).ravel())[0, 1])


# ---------------------------------------------------------------- running and comparing


@pytest.fixture(autouse=True)
def one_thread():
    """Two cores shared with other jobs: one thread avoids OpenMP spinning (several times faster here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b)
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def flat(ckpt) -> dict[str, torch.Tensor]:
    """A TurboCheckpoint's UNet and VAE tensors in one dict."""
    return {f"unet.{k}": v for k, v in ckpt.unet.items()} | {
        f"vae.{d}.{k}": v for d, sd in ckpt.vae.items() for k, v in sd.items()
    }


def die_while_saving_state(monkeypatch) -> Callable:
    """From now on training.state dies (KeyboardInterrupt) half way through writing a state file, as a
    killed process would; returns the real save function."""
    real_save = state_mod._torch_save

    def killed(obj, path):
        if Path(path).name == state_mod.STATE_FILE:
            Path(path).write_bytes(b"half a file")
            raise KeyboardInterrupt  # the process dies mid-save
        real_save(obj, path)

    monkeypatch.setattr(state_mod, "_torch_save", killed)
    return real_save


def run_two_processes(worker: Path, cfg, port_base: int) -> tuple[dict, dict]:
    """Run `worker cfg-as-json` on 2 processes (torch.distributed.run, cpu); returns what each process
    saved to <cfg.output>/rank<N>.pt."""
    env = os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    port = str(port_base + os.getpid() % 1000)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port]
    proc = subprocess.run(
        [*cmd, str(worker), json.dumps(vars(cfg))],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = Path(cfg.output)
    return tuple(torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2))
