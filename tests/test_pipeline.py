"""The cached pipeline: released names from the cache folder, preprocessing per model, LRU, reloads."""

import os

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from reference import RefPaired, RefUnpaired
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from turbo import pipeline as pipeline_module
from turbo import preprocess as pp
from turbo.base import BaseModelError
from turbo.formats import CheckpointError, load_checkpoint, save_checkpoint
from turbo.pipeline import MAX_SEED, GammaError, Pipeline, PromptError
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
    assert info.preprocess == "canny" and info.kind == "paired"
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


@pytest.mark.parametrize("name", ["edge_to_image", "sketch_to_image_stochastic", "night_to_day"])
def test_released_file_given_by_path_is_fed_as_its_released_name(pipe, cache, name):
    """The original hard-codes each released model's input and caption by name; a user who
    downloaded the .pkl and passes its path must get the same image."""
    by_name, by_path = pipe.load(name), pipe.load(cache / RELEASED[name].filename)
    assert by_path.key != by_name.key
    for field in ("kind", "stochastic", "preprocess", "image_prep", "default_direction", "default_gamma"):
        assert getattr(by_path, field) == getattr(by_name, field), field
    if name == "night_to_day":
        assert by_path.prompts == {"b2a": "driving in the day"} and by_path.image_prep == "resize_512x512"
    prompt = None if name == "night_to_day" else "a cat"
    want = pipe.translate(drawing(), name, prompt, seed=2)
    got = pipe.translate(drawing(), cache / RELEASED[name].filename, prompt, seed=2)
    assert (got.prompt, got.direction, got.gamma) == (want.prompt, want.direction, want.gamma)
    assert np.abs(np.asarray(got.image).astype(int) - np.asarray(want.image)).max() <= 1


def test_custom_unpaired_pkl_is_resized_to_512_as_the_original_cli_does(pipe, cache, tmp_path):
    path = tmp_path / "mine_unpaired.pkl"
    path.write_bytes((cache / RELEASED["night_to_day"].filename).read_bytes())
    info = pipe.load(path)
    assert info.image_prep == "resize_512x512" and info.prompts == {} and info.default_direction == "a2b"
    x, _ = pipe.prepare(drawing((100, 60)), info)
    assert x.shape == (1, 3, 512, 512)
    result = pipe.translate(drawing((100, 60)), path, "driving at night")
    assert result.image.size == (100, 60)


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


def test_a_replaced_file_with_the_same_mtime_is_reloaded(pipe, tiny_base_dir, tmp_path):
    """File systems with coarse timestamps can give two writes the same mtime; the size tells."""
    path = tmp_path / "same_tick.pkl"
    RefPaired(str(tiny_base_dir), seed=31).save_pkl(path)
    first = pipe.translate(drawing(), path, "a cat")
    stamp = path.stat().st_mtime_ns
    RefPaired(str(tiny_base_dir), rank_unet=4, seed=32).save_pkl(path)
    os.utime(path, ns=(stamp, stamp))
    second = pipe.translate(drawing(), path, "a cat")
    assert np.abs(np.asarray(first.image).astype(int) - np.asarray(second.image)).mean() > 0.5
    assert pipe.models[str(path.resolve())].version == (path.stat().st_size, stamp)


def test_missing_prompt_for_paired_model(pipe):
    with pytest.raises(PromptError, match="needs a prompt"):
        pipe.translate(drawing(), "edge_to_image", "  ")


def test_gamma_is_refused_for_deterministic_models(pipe):
    for model, prompt in (("edge_to_image", "a cat"), ("night_to_day", None)):
        with pytest.raises(GammaError, match="translates deterministically"):
            pipe.translate(drawing(), model, prompt, gamma=0.5)
    assert pipe.translate(drawing(), "edge_to_image", "a cat", gamma=1.0).gamma == 1.0


@pytest.mark.parametrize(("option", "value"), [("max_models", 0), ("max_side", 0)])
def test_pipeline_refuses_limits_that_would_refuse_everything(tiny_base_dir, option, value):
    with pytest.raises(ValueError, match=f"{option} must be at least"):
        Pipeline(str(tiny_base_dir), device="cpu", **{option: value})


def test_a_bad_base_says_what_is_wrong_with_it(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "partial" / "unet").mkdir(parents=True)
    cases = {
        str(tmp_path / "missing"): "does not exist",
        "./sd-turbo": "does not exist",
        str(tmp_path / "file"): "is a file",
        str(tmp_path / "partial"): "lacks tokenizer, text_encoder, vae, scheduler",
    }
    for base, message in cases.items():
        with pytest.raises(BaseModelError, match=message):
            Pipeline(base, device="cpu")


def test_an_uncached_base_fails_at_once_when_the_hub_is_unreachable(monkeypatch):
    """No waiting through the hub client's retries: one quick request decides."""
    import turbo.base as base_module

    monkeypatch.setattr(base_module, "_hub_unreachable", lambda: "[Errno -2] Name or service not known")
    loads = []
    monkeypatch.setattr(base_module.AutoTokenizer, "from_pretrained", lambda *a, **k: loads.append(a))
    with pytest.raises(BaseModelError, match="not in the local Hugging Face cache.*hub cannot be reached: "):
        base_module.load_base("turbo-tests/never-cached", device="cpu")
    assert not loads


def test_hub_reachability_is_one_request(monkeypatch):
    import urllib.error
    import urllib.request

    from huggingface_hub import constants

    import turbo.base as base_module

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    requests = []

    def unreachable(request, timeout):
        requests.append((request.get_method(), request.full_url, timeout))
        raise urllib.error.URLError(OSError(-2, "Name or service not known"))

    monkeypatch.setattr(urllib.request, "urlopen", unreachable)
    assert "Name or service not known" in base_module._hub_unreachable()
    assert requests == [("HEAD", constants.ENDPOINT, 5.0)]

    def answers(request, timeout):  # an error status is still an answer: the hub is there
        raise urllib.error.HTTPError(request.full_url, 403, "Forbidden", {}, None)

    monkeypatch.setattr(urllib.request, "urlopen", answers)
    assert base_module._hub_unreachable() is None
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # offline: the hub client fails fast itself
    monkeypatch.setattr(urllib.request, "urlopen", unreachable)
    assert base_module._hub_unreachable() is None
    assert len(requests) == 1


def test_prompt_embeddings_are_cached(pipe):
    a = pipe.prompt_embedding("a red house")
    assert pipe.prompt_embedding("a red house") is a


def _with_prompts(path, prompts):
    """Rewrite the safetensors file `path` in place with metadata prompts = `prompts`, a newer mtime."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    save_file(load_file(str(path)), str(path), metadata={**meta, "prompts": prompts})
    os.utime(path, (path.stat().st_atime, path.stat().st_mtime + 5))


def test_bad_prompts_are_refused_whole_and_the_fixed_file_then_loads(pipe, cache, tmp_path):
    path = tmp_path / "mine.safetensors"
    save_checkpoint(load_checkpoint(cache / RELEASED["edge_to_image"].filename), path)
    key = Pipeline.file_key(path)
    _with_prompts(path, '"a cat"')
    for _ in range(2):  # a retry gets the same error, not "already loaded"
        with pytest.raises(CheckpointError, match="prompts must be a JSON object") as err:
            pipe.load(path)
        assert str(path) in str(err.value)
        assert key not in pipe.models and key not in pipe.generator.models
    _with_prompts(path, '{"a2b": "a cat"}')
    assert pipe.load(path).prompts == {"a2b": "a cat"}
    assert pipe.translate(drawing(), path).prompt == "a cat"


def test_a_failed_load_leaves_nothing_half_loaded(pipe, tiny_base_dir, tmp_path, monkeypatch):
    path = tmp_path / "half.pkl"
    RefPaired(str(tiny_base_dir), seed=41).save_pkl(path)
    key = Pipeline.file_key(path)

    def broken(*args):
        raise RuntimeError("broken")

    monkeypatch.setattr(pipeline_module, "_info_for", broken)
    with pytest.raises(RuntimeError, match="broken"):
        pipe.load(path)
    assert key not in pipe.models and key not in pipe.generator.models
    monkeypatch.undo()
    assert pipe.load(path).key == key and key in pipe.generator.models


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("preprocess", "edges"),
        ("preprocess", "unpaired"),  # an unpaired model's preparation, not an override for paired ones
        ("preprocess", ""),
        ("seed", -1),
        ("seed", MAX_SEED + 1),
        ("seed", True),
        ("seed", 1.5),
        ("seed", "3"),
        ("seed", None),
    ],
)
def test_translate_refuses_preprocess_and_seed_values_it_does_not_know(pipe, option, value):
    for call in (pipe.translate, lambda *a, **kw: pipe.translate_batch([a[0]], *a[1:], **kw)):
        with pytest.raises(ValueError, match=f"^{option} must be"):
            call(drawing(), "edge_to_image", "a cat", **{option: value})


def test_translate_takes_every_known_preprocess_and_numpy_integer_seeds(pipe):
    for preprocess in ("canny", "sketch", "none", None):
        result = pipe.translate(drawing(), "edge_to_image", "a cat", preprocess=preprocess)
        assert result.image.size == (72, 56)
    want = pipe.translate(drawing(), "sketch_to_image_stochastic", "a cat", seed=MAX_SEED)
    got = pipe.translate(drawing(), "sketch_to_image_stochastic", "a cat", seed=np.uint32(MAX_SEED))
    assert np.array_equal(np.asarray(want.image), np.asarray(got.image))
