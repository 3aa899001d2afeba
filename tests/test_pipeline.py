"""The cached pipeline: released names from the cache folder, preprocessing per model, LRU, reloads."""

import os

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from reference import RefPaired, RefUnpaired

from turbo import preprocess as pp
from turbo.pipeline import Pipeline, PromptError
from turbo.registry import RELEASED


@pytest.fixture(scope="module")
def cache(tiny_base_dir, tmp_path_factory):
    """A model cache holding tiny stand-ins under the released file names."""
    folder = tmp_path_factory.mktemp("turbo_cache")
    RefPaired(str(tiny_base_dir), seed=11).save_pkl(folder / RELEASED["edge_to_image"].filename)
    RefPaired(str(tiny_base_dir), twin=True, seed=12).save_pkl(
        folder / RELEASED["sketch_to_image_stochastic"].filename
    )
    RefUnpaired(str(tiny_base_dir), rank_unet=4, seed=13).save_pkl(folder / RELEASED["night_to_day"].filename)
    return folder


@pytest.fixture(scope="module")
def pipe(tiny_base_dir, cache):
    return Pipeline(str(tiny_base_dir), device="cpu", max_models=2, cache_dir=cache)


def drawing(size=(72, 56)):
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    d.rectangle([10, 10, 40, 40], outline="black", width=3)
    d.ellipse([30, 20, 60, 50], fill=(200, 60, 30))
    return img


def test_released_edge_model_uses_canny_of_the_resized_input(pipe):
    img = drawing()
    result = pipe.translate(img, "edge_to_image", "a house", canny_low=50, canny_high=150)
    info = pipe.models["edge_to_image"]
    assert info.input == "canny" and info.kind == "paired"
    edges = pp.canny_edges(pp.resize_to_multiple_of_8(img), 50, 150)
    assert np.array_equal(np.asarray(result.condition), 255 - np.asarray(edges))
    x, _ = pipe.prepare(img, info, 50, 150)
    with torch.inference_mode():
        out = pipe.generator(x, pipe.prompt_embedding("a house"), "edge_to_image")
    want = pp.restore_size(pp.to_pil(out[0]), img.size)
    assert result.image.size == img.size
    # the pipeline runs the fast (folded) path; the plain forward agrees within 1/255
    assert np.abs(np.asarray(result.image).astype(int) - np.asarray(want)).max() <= 1


def test_stochastic_model_defaults_to_gamma_04_and_sketch_input(pipe):
    result = pipe.translate(drawing(), "sketch_to_image_stochastic", "a cat", seed=1)
    assert result.gamma == pytest.approx(0.4)
    x, _ = pipe.prepare(drawing(), pipe.models["sketch_to_image_stochastic"])
    gray = np.asarray(pp.resize_to_multiple_of_8(drawing())).astype(float) / 255
    assert torch.equal(x[0], torch.from_numpy(gray < 0.5).permute(2, 0, 1).float())
    again = pipe.translate(drawing(), "sketch_to_image_stochastic", "a cat", seed=1)
    assert np.array_equal(np.asarray(result.image), np.asarray(again.image))


def test_unpaired_released_model_uses_its_caption_and_direction(pipe):
    result = pipe.translate(drawing(), "night_to_day")
    assert result.prompt == "driving in the day" and result.direction == "b2a"
    assert result.image.size == (72, 56)


def test_lru_keeps_at_most_max_models(pipe):
    for name in ("edge_to_image", "sketch_to_image_stochastic", "night_to_day"):
        pipe.load(name)
    assert list(pipe.models) == ["sketch_to_image_stochastic", "night_to_day"]
    assert set(pipe.generator.models) == set(pipe.models)


def test_changed_file_is_reloaded(pipe, tiny_base_dir, tmp_path):
    path = tmp_path / "mine.pkl"
    RefPaired(str(tiny_base_dir), seed=21).save_pkl(path)
    first = pipe.translate(drawing(), path, "a cat")
    RefPaired(str(tiny_base_dir), seed=22).save_pkl(path)
    os.utime(path, (path.stat().st_atime, path.stat().st_mtime + 5))
    second = pipe.translate(drawing(), path, "a cat")
    assert np.abs(np.asarray(first.image).astype(int) - np.asarray(second.image)).mean() > 0.5


def test_missing_prompt_for_paired_model(pipe):
    with pytest.raises(PromptError, match="needs a prompt"):
        pipe.translate(drawing(), "edge_to_image", "  ")


def test_prompt_embeddings_are_cached(pipe):
    a = pipe.prompt_embedding("a red house")
    assert pipe.prompt_embedding("a red house") is a
