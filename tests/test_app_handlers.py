"""The app's logic without a server: the models folder scanner and the handlers, on a tiny random base.

`checkpoint_files` and `sketch_image` are shared with tests/test_app_server.py and test_app_browser.py.
"""

from __future__ import annotations

import functools
import gc
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from turbo.app.handlers import GPU, KEEP_OUTPUTS, MAX_SEED, NO_STYLE, MissingInputError, TurboApp, parse_seed
from turbo.app.models_folder import ModelsFolder, UploadError, is_candidate

ROOT = Path(__file__).resolve().parents[1]


@functools.cache
def checkpoint_files(base_dir: str) -> dict[str, Path]:
    """Three small checkpoints made on the tiny base (once per process), in a folder of their own:
    "sketch" (paired, stochastic, sketch input, default prompt), "edges" (paired, canny, no prompt),
    "unpaired" (both directions, captions)."""
    from turbo.base import load_base
    from turbo.formats import save_checkpoint
    from turbo.generator import Generator

    out = Path(tempfile.mkdtemp(prefix="turbo-app-ckpts-"))
    g = Generator(load_base(base_dir, device="cpu"))
    specs = {
        "sketch": dict(kind="paired", stochastic=True, prompts={"a2b": "a cat"}, preprocess="sketch"),
        "edges": dict(kind="paired", stochastic=False, prompts={}, preprocess="canny"),
        "unpaired": dict(
            kind="unpaired", stochastic=False, prompts={"a2b": "night", "b2a": "day"}, preprocess="unpaired"
        ),
    }
    files = {}
    for i, (name, spec) in enumerate(specs.items()):
        g.new_model(name, kind=spec["kind"], stochastic=spec["stochastic"])
        torch.manual_seed(i)
        with torch.no_grad():
            for p in g.trainable_parameters(name):
                p.copy_(torch.randn_like(p) * 0.05)
        files[name] = save_checkpoint(
            g.export(name, prompts=spec["prompts"], preprocess=spec["preprocess"]),
            out / f"{name}.safetensors",
        )
    return files


def sketch_image(size: int = 64) -> Image.Image:
    """Black strokes on white, as the Sketchpad composite ("L")."""
    im = Image.new("L", (size, size), 255)
    d = ImageDraw.Draw(im)
    d.line([(6, 6), (size - 6, size - 10)], fill=0, width=3)
    d.ellipse([size // 4, size // 2, size // 2, size - 4], outline=0, width=2)
    return im


def photo(size: tuple[int, int] = (64, 48)) -> Image.Image:
    rng = np.random.default_rng(0)
    im = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    ImageDraw.Draw(im).rectangle([10, 10, 40, 30], fill=(255, 0, 0))
    return im


@pytest.fixture()
def models_dir(tiny_base_dir, tmp_path) -> Path:
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for path in checkpoint_files(str(tiny_base_dir)).values():
        shutil.copy(path, folder / path.name)
    old = time.time() - 60  # settled long ago
    for p in folder.iterdir():
        os.utime(p, (old, old))
    return folder


@pytest.fixture()
def app(tiny_base_dir, models_dir):
    warnings: list[str] = []
    a = TurboApp(
        (str(tiny_base_dir), "cpu", None), ModelsFolder(models_dir, 0.3), max_side=96, warn=warnings.append
    )
    a.warnings = warnings
    return a


# ---- the models folder ----


def test_folder_ignores_temp_names_and_waits_for_a_file_to_settle(models_dir, tiny_base_dir):
    folder = ModelsFolder(models_dir, settle_seconds=0.4)
    assert [m.name for m in folder.offered()] == [
        "edges.safetensors",
        "sketch.safetensors",
        "unpaired.safetensors",
    ]
    assert not is_candidate(Path(".x.safetensors.tmp")) and not is_candidate(Path("m.safetensors.part"))
    assert not is_candidate(Path("notes.txt")) and is_candidate(Path("m.pkl"))
    data = checkpoint_files(str(tiny_base_dir))["sketch"].read_bytes()
    (models_dir / "new.safetensors.part").write_bytes(data)  # a download in progress: never listed
    growing = models_dir / "growing.safetensors"
    growing.write_bytes(data[: len(data) // 2])  # half written under its final name
    entries = {m.name: m for m in folder.scan()}
    assert "new.safetensors.part" not in entries
    assert entries["growing.safetensors"].status == "pending"
    assert "growing.safetensors" not in [m.name for m in folder.offered()]
    growing.write_bytes(data)  # finished; offered once unchanged for settle_seconds
    assert folder.scan()[1].name == "growing.safetensors" and folder.scan()[1].status == "pending"
    time.sleep(0.5)
    assert "growing.safetensors" in [m.name for m in folder.offered()]


def test_folder_reports_broken_files_rereads_changed_ones_and_forgets_deleted(models_dir, tiny_base_dir):
    folder = ModelsFolder(models_dir, settle_seconds=0.0)
    (models_dir / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    (models_dir / "junk.pkl").write_bytes(b"this is not a checkpoint")
    entries = {m.name: m for m in folder.scan()}
    assert entries["broken.safetensors"].status == "unusable"
    assert "safetensors" in entries["broken.safetensors"].reason
    assert entries["junk.pkl"].status == "unusable" and entries["junk.pkl"].reason
    assert entries["sketch.safetensors"].stochastic and entries["sketch.safetensors"].preprocess == "sketch"
    assert entries["unpaired.safetensors"].directions == ["a2b", "b2a"]
    # a file replaced by another checkpoint is read again
    shutil.copy(checkpoint_files(str(tiny_base_dir))["edges"], models_dir / "sketch.safetensors")
    os.utime(models_dir / "sketch.safetensors", (time.time() - 10, time.time() - 10))
    changed = {m.name: m for m in folder.scan()}["sketch.safetensors"]
    assert changed.preprocess == "canny" and not changed.stochastic
    (models_dir / "sketch.safetensors").unlink()
    assert "sketch.safetensors" not in [m.name for m in folder.scan()]


def test_upload_copies_a_valid_checkpoint_without_overwriting_and_refuses_others(models_dir, tmp_path):
    folder = ModelsFolder(models_dir, settle_seconds=0.0)
    entry = folder.add_upload(models_dir / "edges.safetensors", "edges.safetensors")
    assert entry.name == "edges-2.safetensors" and entry.status == "ok"
    assert (models_dir / "edges-2.safetensors").read_bytes() == (
        models_dir / "edges.safetensors"
    ).read_bytes()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage")
    with pytest.raises(UploadError, match="not a usable checkpoint"):
        folder.add_upload(bad)
    with pytest.raises(UploadError, match=r"\.safetensors or \.pkl"):
        folder.add_upload(models_dir / "edges.safetensors", "model.exe")
    assert not (models_dir / "bad.safetensors").exists()
    assert not [p for p in models_dir.iterdir() if p.name.startswith(".")]


# ---- handlers ----


def test_choices_list_released_models_and_every_direction_of_the_files(app):
    assert app.labels[:6] == [
        "edge_to_image", "sketch_to_image_stochastic", "day_to_night", "night_to_day", "clear_to_rainy",
        "rainy_to_clear",
    ]  # fmt: skip
    assert app.labels[6:] == [
        "edges.safetensors", "sketch.safetensors", "unpaired.safetensors (a2b)", "unpaired.safetensors (b2a)",
    ]  # fmt: skip
    assert app.choice("unpaired.safetensors (b2a)").prompt == "day"
    assert "- `sketch.safetensors`: ready (paired, stochastic, input sketch)" in app.folder_markdown()


def test_model_change_adapts_the_controls(app):
    prompt, style, gamma, low, high, edges, tabs, text, source, _ = app.model_changed(
        "sketch.safetensors", ""
    )
    assert prompt["value"] == "a cat" and style["visible"] is True
    assert gamma["interactive"] is True and gamma["value"] == 0.4
    assert low["visible"] is False and edges["visible"] is False
    assert tabs.selected == "sketch" and source == "sketch" and "stochastic" in text
    prompt, style, gamma, low, high, edges, tabs, text, source, _ = app.model_changed(
        "edge_to_image", "a red barn"
    )
    assert prompt["value"] == "a red barn"  # the user's own text is kept
    assert gamma["interactive"] is False and "deterministic" in gamma["info"]
    assert low["visible"] is True and high["visible"] is True and edges["visible"] is True
    assert source == "upload" and "downloaded on first use" in text
    prompt, style, *_, source, _ = app.model_changed("unpaired.safetensors (a2b)", "a red barn")
    assert prompt["value"] == "night" and style["visible"] is False  # the model's caption
    prompt, *_ = app.model_changed("edge_to_image", "night")  # a pre-filled caption is replaced
    assert prompt["value"] == "a blue bird"
    # a sketch model with only an uploaded image (an example was clicked) stays on the upload
    example = "turbo/app/examples/sketch_house.png"
    *_, tabs, _, source, _ = app.model_changed("sketch.safetensors", "", None, example)
    assert source == "upload" and tabs.selected == "upload"
    *_, text, source, _ = app.model_changed("nonexistent", "")
    assert "no model called" in text


def test_sketch_translation_gamma_and_seed(app):
    sketch = {"background": None, "layers": [], "composite": sketch_image()}
    image, condition, path, status, source = app.run(
        "sketch", "sketch.safetensors", sketch, None, "a dog", "Anime"
    )
    assert image.size == (64, 64) and condition.size == (64, 64) and source == "sketch"
    assert "Done in" in status and "Gamma 0.40, seed 42" in status
    saved = Image.open(path)
    assert saved.format == "PNG" and np.array_equal(np.asarray(saved.convert("RGB")), np.asarray(image))
    again = app.run("sketch", "sketch.safetensors", sketch, None, "a dog", "Anime")[0]
    assert np.array_equal(np.asarray(again), np.asarray(image))  # same seed, same image
    other_seed = app.run("sketch", "sketch.safetensors", sketch, None, "a dog", "Anime", 0.4, 7)[0]
    other_gamma = app.run("sketch", "sketch.safetensors", sketch, None, "a dog", "Anime", 0.9, 42)[0]
    assert not np.array_equal(np.asarray(other_seed), np.asarray(image))
    assert not np.array_equal(np.asarray(other_gamma), np.asarray(image))
    assert app.warnings == []


def test_edges_and_unpaired_uploads_and_direction_switching(app, tmp_path):
    pic = tmp_path / "pic.png"
    photo().save(pic)
    image, condition, _, status, _ = app.run(
        "upload", "edges.safetensors", None, str(pic), "a barn", NO_STYLE
    )
    assert image.size == (64, 48) and "Done in" in status
    edges = np.asarray(condition)
    assert set(np.unique(edges)) <= {0, 255} and (edges == 0).any()  # dark edges on white
    base = app.pipeline.base
    a2b = app.run("upload", "unpaired.safetensors (a2b)", None, str(pic))[0]
    b2a = app.run("upload", "unpaired.safetensors (b2a)", None, str(pic))[0]
    assert a2b.size == (64, 48) and not np.array_equal(np.asarray(a2b), np.asarray(b2a))
    assert app.pipeline.base is base  # switching never reloads the base
    start = time.perf_counter()
    app.pipeline.load(str(app.choice("edges.safetensors").model))  # cached: no file read
    assert time.perf_counter() - start < 0.1
    assert app.warnings == []


def test_bad_inputs_become_messages(app, tmp_path, models_dir):
    blank = {"composite": Image.new("L", (64, 64), 255)}
    out = app.run("sketch", "sketch.safetensors", blank, None)
    assert out[:3] == (None, None, None) and "canvas is empty" in out[3]
    assert "no image yet" in app.run("upload", "edges.safetensors", None, None, "x")[3]
    assert app.warnings == []  # missing input is a hint, not a warning
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    assert "not an image file" in app.run("upload", "edges.safetensors", None, str(text), "x")[3]
    truncated = tmp_path / "cut.png"
    photo().save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    assert "corrupt or truncated" in app.run("upload", "edges.safetensors", None, str(truncated), "x")[3]
    big = tmp_path / "big.png"
    photo((300, 150)).save(big)
    image, _, _, status, _ = app.run("upload", "edges.safetensors", None, str(big), "")
    assert image is None and "needs a prompt" in status
    image, _, _, status, _ = app.run("upload", "edges.safetensors", None, str(big), "a barn")
    assert image.size == (96, 48) and "downscaled from 300x150 to 96x48" in status
    status = app.run("upload", "day_to_night", None, str(big))[3]
    assert "cannot download" in status and "offline" in status
    status = app.run("upload", "edges.safetensors", None, str(big), "x", NO_STYLE, 0.4, 42, 200, 100)[3]
    assert "Canny thresholds" in status
    assert "no model called" in app.run("upload", "gone.safetensors", None, str(big))[3]
    # a listed checkpoint that turns out broken when loaded: reported, listed as unusable, app goes on
    (models_dir / "unpaired.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00garbage!")
    os.utime(models_dir / "unpaired.safetensors", (time.time() - 10, time.time() - 10))
    status = app.run("upload", "unpaired.safetensors (a2b)", None, str(big))[3]
    assert "not a readable safetensors file" in status
    assert "- `unpaired.safetensors`: **unusable**" in app.refresh()[1]
    assert "unpaired.safetensors (a2b)" not in app.labels
    assert len(app.warnings) == 7 and all(app.warnings)
    assert app.run("upload", "edges.safetensors", None, str(big), "a barn")[0] is not None


def test_refresh_and_upload_handlers(app, models_dir, tmp_path):
    update, text = app.refresh("sketch.safetensors")
    assert update["choices"] == app.labels and "sketch.safetensors" in update["choices"]
    (models_dir / "sketch.safetensors").unlink()
    update, text = app.refresh("sketch.safetensors")
    assert "sketch.safetensors" not in update["choices"] and "no longer in the models folder" in text
    update, text, status = app.upload_checkpoint(str(models_dir / "edges.safetensors"))
    assert update["value"] == "edges-2.safetensors" and "edges-2.safetensors" in update["choices"]
    assert "Added" in status and "edges-2.safetensors" in text
    assert app.pipeline.file_key(models_dir / "edges-2.safetensors") in app.pipeline.models  # loaded at once
    # made for another base: it reads, but does not fit; refused now, not at the first translation
    from tiny import make_tiny_base

    from turbo.base import load_base
    from turbo.formats import save_checkpoint
    from turbo.generator import Generator

    g = Generator(load_base(make_tiny_base(tmp_path / "wide", seed=1, unet_channels=(24, 32)), device="cpu"))
    g.new_model("m", kind="paired")
    foreign = save_checkpoint(g.export("m", prompts={}, preprocess="canny"), tmp_path / "foreign.safetensors")
    update, text, status = app.upload_checkpoint(str(foreign))
    assert "foreign.safetensors does not fit the base model: " in status and str(tmp_path) not in status
    assert not (models_dir / "foreign.safetensors").exists() and "foreign" not in text
    assert update == {"__type__": "update"} and app.warnings[-1].startswith("foreign.safetensors does not")
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(b"nope")
    update, text, status = app.upload_checkpoint(str(bad))
    assert "not a usable checkpoint" in status and app.warnings and "bad.pkl" not in text
    seeds = {app.random_seed() for _ in range(5)}
    assert len(seeds) > 1 and all(0 <= s < 2**31 for s in seeds)


def test_a_symlinked_checkpoint_is_unloaded_when_the_link_goes(app, models_dir, tmp_path):
    target = tmp_path / "elsewhere.safetensors"
    shutil.copy2(models_dir / "edges.safetensors", target)
    (models_dir / "link.safetensors").symlink_to(target)
    app.refresh()
    image = app.run("upload", "link.safetensors", None, photo(), "a barn")[0]
    key = app.pipeline.file_key(models_dir / "link.safetensors")
    assert image is not None and key in app.pipeline.models
    (models_dir / "link.safetensors").unlink()
    update, _ = app.refresh()
    assert "link.safetensors" not in update["choices"] and key not in app.pipeline.models


def test_seed_range_is_checked_with_a_clear_message(app):
    sketch = {"composite": sketch_image()}
    for bad in (2**70, 2**32, -1, 1.5, float("nan"), float("inf")):
        image, *_, status, _ = app.run("sketch", "sketch.safetensors", sketch, None, "a", NO_STYLE, 0.4, bad)
        assert image is None and "the seed must be a whole number from 0 to 4294967295" in status, status
    assert len(app.warnings) == 6
    status = app.run("sketch", "sketch.safetensors", sketch, None, "a dog", NO_STYLE, 0.4, MAX_SEED)[3]
    assert "Done in" in status and "seed 4294967295." in status
    assert parse_seed(None) == 0 and parse_seed(7.0) == 7 and MAX_SEED == 2**32 - 1
    from turbo.app import page as app_module

    demo = app_module.build_demo(app_module.build_parser().parse_args([]), app)
    seed_box = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "seed")
    assert (seed_box.minimum, seed_box.maximum) == (0, MAX_SEED)


def test_downscale_note_gives_the_size_as_seen_and_a_too_narrow_image_says_why(app, tmp_path):
    pixels = photo((300, 150))
    exif = pixels.getexif()
    exif[274] = 6  # rotated 90 degrees: the user sees a 150x300 image
    pixels.save(tmp_path / "rotated.jpg", exif=exif)
    image, _, _, status, _ = app.run("upload", "edges.safetensors", None, str(tmp_path / "rotated.jpg"), "x")
    assert image.size == (48, 96) and "downscaled from 150x300 to 48x96" in status
    Image.new("RGB", (9, 300), "white").save(tmp_path / "thin.png")
    status = app.run("upload", "edges.safetensors", None, str(tmp_path / "thin.png"), "x")[3]
    assert "too narrow: 9x300 pixels; with its long side limited to 96 px its short side would be 3" in status


def test_app_arguments_are_checked(tiny_base_dir, capsys):
    from turbo.app import page as app_module

    parser = app_module.build_parser()
    for argv, message in (
        (["--max-models", "0"], "--max-models: must be at least 1, got 0"),
        (["--max-side", "0"], "--max-side: must be at least 64, got 0"),
        (["--max-side", "big"], "--max-side: invalid integer value: 'big'"),
        (["--canvas-size", "10"], "--canvas-size: must be at least 64, got 10"),
        (["--queue-size", "0"], "--queue-size: must be at least 1, got 0"),
        (["--rescan-seconds", "0"], "--rescan-seconds: must be at least 0.1, got 0"),
        (["--rescan-seconds", "nan"], "--rescan-seconds: must be at least 0.1, got nan"),
        (["--settle-seconds", "-1"], "--settle-seconds: must be at least 0.0, got -1"),
        (["--settle-seconds", "soon"], "--settle-seconds: invalid number value: 'soon'"),
    ):
        with pytest.raises(SystemExit):
            parser.parse_args(argv)
        assert message in capsys.readouterr().err
    assert parser.parse_args(["--max-models", "1", "--max-side", "64"]).max_side == 64
    assert parser.parse_args(["--rescan-seconds", "0.5", "--settle-seconds", "0"]).rescan_seconds == 0.5
    if not torch.backends.mps.is_available():  # fails before anything loads, one line, no traceback
        assert app_module.main(["--base", str(tiny_base_dir), "--device", "mps"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: device 'mps' was asked for but MPS") and "Traceback" not in err


def test_missing_input_error_is_an_image_error():
    from turbo.preprocess import ImageError

    assert issubclass(MissingInputError, ImageError)


# ---- the CLI and Spaces glue ----


def test_app_exits_with_a_clear_message_when_the_base_is_missing_and_uses_spaces_gpu(tmp_path):
    """One subprocess checks both: `python app.py` without the base weights offline exits at once
    with a clear message (no traceback), and a present `spaces` package wraps the GPU function."""
    from turbo.app import page as app_module

    fake = tmp_path / "fake" / "spaces.py"
    fake.parent.mkdir()
    fake.write_text(  # spaces.GPU(duration=...) as the real package takes it
        "def GPU(task=None, *, duration=None):\n"
        "    def wrap(fn):\n"
        "        print('spaces.GPU wraps', fn.__name__, 'for', duration, 's')\n"
        "        return fn\n"
        "    return wrap if task is None else wrap(task)\n"
    )
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"),
        "PYTHONPATH": str(fake.parent),
    }
    cmd = [sys.executable, str(ROOT / "app.py"), "--base", "stabilityai/sd-turbo", "--device", "cpu"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=150, cwd=tmp_path)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Run once with network access" in out.stderr and "--base" in out.stderr
    assert "Traceback" not in out.stderr
    assert "spaces.GPU wraps gpu_translate for 30 s" in out.stdout
    assert GPU(len) is len  # off ZeroGPU a no-op, whether `spaces` (requirements.txt) is installed or not
    assert app_module.main(["--base", str(tmp_path / "missing")]) == 2  # a folder that is not there


def test_restore_flag_reaches_the_pipeline(monkeypatch, tmp_path):
    from turbo.app import page as app_module

    assert app_module.build_parser().parse_args([]).restore == "auto"
    seen = {}

    def fake_get_pipeline(*key, **kw):
        seen.update(kw, key=key)
        raise KeyboardInterrupt  # stop before anything loads

    monkeypatch.setattr(app_module, "get_pipeline", fake_get_pipeline)
    args = app_module.build_parser().parse_args(["--base", str(tmp_path), "--restore", "copy"])
    with pytest.raises(KeyboardInterrupt):
        app_module.create_app(args)
    assert seen["restore"] == "copy" and seen["key"][0] == str(tmp_path)


def test_host_is_loopback_except_on_spaces(monkeypatch):
    from turbo.app import page as app_module

    monkeypatch.delenv("SPACE_ID", raising=False)
    assert app_module.default_host() == "127.0.0.1"
    monkeypatch.setenv("SPACE_ID", "someone/turbo")
    assert app_module.default_host() == "0.0.0.0"
    args = app_module.build_parser().parse_args([])
    assert args.models_dir == Path("checkpoints") and args.host is None


def test_a_big_sketch_is_limited_like_an_upload(app):
    big = sketch_image(300)  # app's max_side is 96
    image, condition, _, status, _ = app.run("sketch", "sketch.safetensors", {"composite": big}, None, "a")
    assert image.size == (96, 96) and condition.size == (96, 96)
    assert "downscaled from 300x300 to 96x96" in status and app.warnings == []
    # one thin stroke on a big canvas still counts as a drawing (checked before the downscale)
    thin = Image.new("L", (400, 400), 255)
    ImageDraw.Draw(thin).line([(10, 200), (390, 200)], fill=0, width=1)
    status = app.run("sketch", "sketch.safetensors", {"composite": thin}, None, "a")[3]
    assert "Done in" in status and "downscaled from 400x400" in status


def test_gamma_and_canny_values_of_any_kind_are_used_or_refused_clearly(app):
    sketch = {"composite": sketch_image()}

    def sketch_run(gamma):
        return app.run("sketch", "sketch.safetensors", sketch, None, "a", NO_STYLE, gamma, 42)

    def edges_run(low, high):
        return app.run("upload", "edges.safetensors", None, photo(), "a", NO_STYLE, 0.4, 42, low, high)

    want = np.asarray(sketch_run(0.5)[0])
    for same in (np.float32(0.5), np.float64(0.5), np.array(0.5), "0.5"):
        image, *_, status, _ = sketch_run(same)
        assert np.array_equal(np.asarray(image), want) and "Gamma 0.50" in status, (same, status)
    assert "Gamma 0.40" in sketch_run(None)[3]  # an emptied slider: the model's default
    for bad in (float("nan"), float("inf"), np.float32("nan"), "lots", [0.5], 1.5):
        image, *_, status, _ = sketch_run(bad)
        assert image is None and "gamma must be a number from 0 to 1, got" in status, (bad, status)
    assert "got nan" in sketch_run(np.float32("nan"))[3]  # shown as a number, not np.float32(nan)
    want = np.asarray(edges_run(100, 200)[1])
    for low, high in ((np.int64(100), np.float32(200)), (100.0, np.array(200)), ("100", 199.6)):
        condition = edges_run(low, high)[1]
        assert condition is not None and np.array_equal(np.asarray(condition), want), (low, high)
    warned = len(app.warnings)
    for low, high, message in (
        (None, 200, "the Canny low threshold must be a number from 0 to 255, got None"),
        (float("nan"), 200, "the Canny low threshold must be a number from 0 to 255, got nan"),
        (100, float("inf"), "the Canny high threshold must be a number from 0 to 255, got inf"),
        (100, "high", "the Canny high threshold must be a number from 0 to 255, got 'high'"),
        (np.int64(250), np.int64(200), "got low=250, high=200"),
    ):
        image, _, _, status, _ = edges_run(low, high)
        assert (
            image is None
            and status.startswith("**Error:** ")
            and message == app.warnings[-1][-len(message) :]
        )
    assert len(app.warnings) == warned + 5 and not any("translation failed" in w for w in app.warnings)
    # a model without that control ignores what the hidden sliders hold
    status = app.run("upload", "unpaired.safetensors (a2b)", None, photo(), None, NO_STYLE, None, 1, None)[3]
    assert "Done in" in status


def test_a_device_that_cannot_run_the_models_is_refused_before_loading(tmp_path, capsys):
    from turbo.app import page as app_module
    from turbo.base import BaseModelError

    args = app_module.build_parser().parse_args(["--base", str(tmp_path / "no_base"), "--device", "meta"])
    with pytest.raises(BaseModelError, match="device 'meta' cannot run the models: choose cpu, cuda"):
        app_module.create_app(args)
    assert app_module.main(["--base", str(tmp_path / "no_base"), "--device", "meta"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: device 'meta' cannot run") and len(err.strip().splitlines()) == 1


# ---- Hugging Face Hub models (a cache laid out as huggingface_hub's, offline) ----


def hub_models_cache(root: Path, base_dir: str) -> Path:
    """me/sketch, me/cycle, me/edges: the checkpoint_files models; me/docs: no checkpoint;
    me/notturbo: a safetensors file that is not a turbo model."""
    from hub_cache import add_to_hub_cache
    from safetensors.torch import save_file

    files = checkpoint_files(base_dir)
    add_to_hub_cache(root, "me/sketch", {"sketch.safetensors": files["sketch"], "README.md": b"# card"})
    add_to_hub_cache(root, "me/cycle", {"cycle.safetensors": files["unpaired"]}, ("main", "v1"))
    add_to_hub_cache(root, "me/edges", {"edges.safetensors": files["edges"]})
    add_to_hub_cache(root, "me/docs", {"README.md": b"# nothing here"})
    plain = root.parent / "lora.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    add_to_hub_cache(root, "me/notturbo", {"pytorch_lora_weights.safetensors": plain})
    return root


@pytest.fixture()
def hub_cache(tiny_base_dir, tmp_path, monkeypatch):
    root = hub_models_cache(tmp_path / "hub", str(tiny_base_dir))
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return root


def test_hub_models_are_listed_at_start_and_load_on_first_use(tiny_base_dir, models_dir, hub_cache):
    from turbo.app.handlers import Choice

    app = TurboApp(
        (str(tiny_base_dir), "cpu", None), ModelsFolder(models_dir, 0.3), max_side=96, warn=lambda t: None,
        hub_models=["me/sketch", "me/cycle@v1", "me/absent"],
    )  # fmt: skip
    assert {"me/sketch", "me/cycle@v1", "me/absent"} <= set(app.labels)
    assert app.choice("me/sketch").pending and "me/sketch" not in app.pipeline.models  # nothing read yet
    # picking it downloads and loads it; the controls then fit the model
    prompt, _, gamma, *_, text, tab, _ = app.model_changed("me/sketch", "")
    assert prompt["value"] == "a cat" and gamma["interactive"] is True and tab == "sketch"
    assert "from the Hugging Face Hub" in text and "stochastic" in text
    assert "me/sketch" in app.pipeline.models and not app.choice("me/sketch").pending
    sketch = {"composite": sketch_image()}
    hub = app.run("sketch", "me/sketch", sketch, None, "a cat", NO_STYLE, 0.4, 5)
    local = app.run("sketch", "sketch.safetensors", sketch, None, "a cat", NO_STYLE, 0.4, 5)
    assert hub[0] is not None and np.array_equal(np.asarray(hub[0]), np.asarray(local[0])), hub[3]
    # an unpaired one: its id is its default direction, the other gets its own entry
    out, _, _, status, _ = app.run("upload", "me/cycle@v1", None, photo(), None, NO_STYLE)
    assert out is not None, status
    assert app.choice("me/cycle@v1").direction == "a2b" and app.choice("me/cycle@v1 (b2a)").prompt == "day"
    b2a = app.run("upload", "me/cycle@v1 (b2a)", None, photo())[0]
    want = app.run("upload", "unpaired.safetensors (b2a)", None, photo())[0]
    assert np.array_equal(np.asarray(b2a), np.asarray(want))
    # one that cannot be had says why, and stays listed for a later try
    *_, status, _ = app.run("upload", "me/absent", None, photo())
    assert "me/absent is not in the Hugging Face cache" in status and app.choice("me/absent").pending
    assert isinstance(app.choice("me/absent"), Choice)


def test_add_from_hub_loads_a_model_or_says_why_not(app, tiny_base_dir, hub_cache, tmp_path):
    from hub_cache import add_to_hub_cache

    from turbo.base import load_base
    from turbo.formats import save_checkpoint
    from turbo.generator import Generator

    update, status = app.add_from_hub(" me/edges ")
    assert update["value"] == "me/edges" and "me/edges" in update["choices"]
    assert (
        status
        == "Added `me/edges` from the Hub: paired (pix2pix-turbo), translates Canny edges of your image."
    )
    assert "me/edges" in app.pipeline.models  # loaded onto the running base at once
    update, status = app.add_from_hub("me/cycle")
    assert update["value"] == "me/cycle" and "`me/cycle`, `me/cycle (b2a)`" in status
    # made for another base
    wide = make_tiny_base_cached(tmp_path / "wide")
    g = Generator(load_base(wide, device="cpu"))
    g.new_model("m", "paired")
    add_to_hub_cache(
        hub_cache, "me/wide", {"m.safetensors": save_checkpoint(g.export("m"), tmp_path / "m.safetensors")}
    )
    cases = {
        "": "not added: empty model name",
        "edge_to_image": "not added: edge_to_image is a released model, already in the list; this box "
        "takes a Hugging Face Hub id (owner/repo",
        "a/b/c/d": "(taken for a Hub id: it has 4 parts",
        "me/absent": "not added: me/absent is not in the Hugging Face cache",
        "me/docs": "not added: me/docs holds no turbo checkpoint",
        "me/notturbo": "not added: me/notturbo (pytorch_lora_weights.safetensors): a safetensors file, "
        "but not a turbo model",
        "me/wide": "not added: me/wide does not fit the base model",
    }
    for text, message in cases.items():
        before = list(app.labels)
        update, status = app.add_from_hub(text)
        assert update == {"__type__": "update"} and message in status, (text, status)
        assert app.labels == before and text not in app.pipeline.models
    assert len(app.warnings) == len(cases)


def make_tiny_base_cached(folder: Path) -> Path:
    from tiny import make_tiny_base

    return make_tiny_base(folder, seed=1, unet_channels=(24, 32))


def test_hub_models_flag_and_environment_are_checked_before_the_base_loads(tmp_path, monkeypatch, capsys):
    from turbo.app import page as app_module

    monkeypatch.setenv("TURBO_MODELS", " me/a, me/b@v1/m.safetensors ,,")
    args = app_module.build_parser().parse_args(["--model", "me/c"])
    assert app_module.hub_models(args) == ["me/a", "me/b@v1/m.safetensors", "me/c"]
    args = app_module.build_parser().parse_args(["--hub-models", "me/x"])  # the flag replaces the variable
    assert app_module.hub_models(args) == ["me/x"]
    missing = str(tmp_path / "missing_base")
    for flag, message in {
        "a/b/c/d": "error: --hub-models / TURBO_MODELS entry 'a/b/c/d': 'a/b/c/d' is no existing file and "
        "not a valid Hub id (taken for a Hub id: it has 4 parts",
        "edge_to_image": "error: --hub-models / TURBO_MODELS entry 'edge_to_image' is a released model, "
        "not a Hub id",
    }.items():
        assert app_module.main(["--base", missing, "--device", "cpu", "--hub-models", flag]) == 2
        err = capsys.readouterr().err
        assert err.startswith(message) and "missing_base" not in err, err


def test_app_model_flag_takes_a_hub_id(tiny_base_dir, models_dir, hub_cache):
    from turbo.app import page as app_module

    args = app_module.build_parser().parse_args(
        [
            "--base",
            str(tiny_base_dir),
            "--models-dir",
            str(models_dir),
            "--device",
            "cpu",
            "--model",
            "me/sketch",
        ]
    )
    app = app_module.create_app(args)
    assert app.choice("me/sketch").pending and app_module._first_model(args, app) == "me/sketch"
    args.model = "edges.safetensors"  # a label of the list stays a label
    assert app_module.hub_models(args) == [] and app_module._first_model(args, app) == "edges.safetensors"


def test_typed_prompt_and_edited_captions_survive_model_and_direction_switches(app):
    def switch(label, box, typed):
        prompt, *_, typed = app.model_changed(label, box, None, None, typed)
        return prompt, typed

    prompt, typed = switch("sketch.safetensors", "", {})
    assert prompt["value"] == "a cat"  # the model's own prompt
    prompt, typed = switch("edges.safetensors", "a dog", typed)  # the user typed "a dog"
    assert prompt["value"] == "a dog"
    prompt, typed = switch("unpaired.safetensors (a2b)", "a dog", typed)
    assert prompt["value"] == "night" and prompt["label"] == "Caption (the model's own; edit with care)"
    prompt, typed = switch("unpaired.safetensors (b2a)", "night, in the rain", typed)  # caption edited
    assert prompt["value"] == "day"
    prompt, typed = switch("unpaired.safetensors (a2b)", "day", typed)
    assert prompt["value"] == "night, in the rain"  # that direction's edit, back
    prompt, typed = switch("sketch.safetensors", "night, in the rain", typed)
    assert prompt["value"] == "a dog"  # the user's prompt, through the unpaired model
    prompt, typed = switch("edges.safetensors", "", typed)  # emptied: the next model's own
    assert prompt["value"] == ""
    prompt, typed = switch("sketch.safetensors", "", typed)
    assert prompt["value"] == "a cat"


def test_an_unpaired_model_without_captions_asks_for_one(app, models_dir, tiny_base_dir):
    from reference import RefUnpaired

    RefUnpaired(str(tiny_base_dir), rank_unet=4, seed=13).save_pkl(models_dir / "mine.pkl")
    os.utime(models_dir / "mine.pkl", (time.time() - 10, time.time() - 10))
    app.rescan()
    prompt, *_ = app.model_changed("mine.pkl (a2b)", "", None, None, {})
    assert prompt["value"] == "" and prompt["label"] == "Caption (this model has none: write one)"
    status = app.run("upload", "mine.pkl (a2b)", None, photo(), "")[3]
    assert status == (
        "**Error:** mine.pkl (a2b) has no caption of its own: write one in the Caption box (what the "
        "output should show)"
    )
    assert "Done in" in app.run("upload", "mine.pkl (a2b)", None, photo(), "driving at night")[3]


def test_a_released_file_in_the_models_folder_serves_the_released_name_once(
    tiny_base_dir, models_dir, tmp_path, monkeypatch
):
    from reference import RefPaired

    from turbo.registry import RELEASED

    monkeypatch.setenv("TURBO_CACHE", str(tmp_path / "empty_cache"))  # not downloaded: offline
    monkeypatch.setenv("TURBO_OFFLINE", "1")
    name = "sketch_to_image_stochastic"
    RefPaired(str(tiny_base_dir), twin=True, seed=12).save_pkl(models_dir / RELEASED[name].filename)
    os.utime(models_dir / RELEASED[name].filename, (time.time() - 10, time.time() - 10))
    app = TurboApp((str(tiny_base_dir), "cpu", None), ModelsFolder(models_dir, 0.3), warn=lambda t: None)
    assert app.labels.count(name) == 1 and RELEASED[name].filename not in app.labels
    assert len(app.labels) == 10  # six released names, three files (four entries)
    assert "- `sketch_to_image_stochastic_lora.pkl`: ready" in app.folder_markdown()
    assert "served as `sketch_to_image_stochastic`" in app.folder_markdown()
    *_, text, _, _ = app.model_changed(name, "", None, None, {})
    assert "file `sketch_to_image_stochastic_lora.pkl` of the models folder" in text
    image, *_, status, _ = app.run("sketch", name, {"composite": sketch_image()}, None, "a cat")
    assert image is not None and "Done in" in status and "Gamma 0.40" in status
    # the other released names still need their download
    assert "cannot download" in app.run("upload", "day_to_night", None, photo())[3]


def test_messages_name_the_users_file_and_say_no_internals(app, tmp_path):
    junk = tmp_path / "gradio" / "0123abcd" / "notes.png"  # where gradio keeps an upload
    junk.parent.mkdir(parents=True)
    junk.write_text("this is text")
    status = app.run("upload", "edges.safetensors", None, str(junk), "x")[3]
    assert status.startswith("**Error:** ") and "notes.png" in status and str(tmp_path) not in status
    *_, text, _, _ = app.model_changed("sketch.safetensors", "", None, None, {})
    assert "direction" not in text  # a paired model has one direction; naming it says nothing
    *_, text, _, _ = app.model_changed("unpaired.safetensors (b2a)", "", None, None, {})
    assert "direction b2a" in text
    assert app.run("upload", "edges.safetensors", None, None, "x")[3] == (
        "no image yet: upload one (or paste it from the clipboard)"
    )
    texts = [app.folder_markdown(), app.refresh("gone.safetensors")[1], status]
    assert all(ord(ch) < 0x2000 for t in texts for ch in t)  # no emoji icons (boxes without an emoji font)


def test_a_typed_gamma_is_checked_before_the_run(app):
    value, status, go, emptied = app.check_gamma(None)  # an emptied box: the default shown, no run
    assert value["value"] == 0.4 and not go and emptied and status == gr.update()
    assert app.check_gamma(0.7) == (gr.update(), gr.update(), True, False)
    value, status, go, emptied = app.check_gamma(5)
    assert value == gr.update() and not go and not emptied
    assert status == "**Error:** gamma must be a number from 0 to 1, got 5"
    assert app.warnings[-1] == "gamma must be a number from 0 to 1, got 5"
    # the browser puts 0 in a box left empty: a run told the box was emptied takes the default
    drawing = {"composite": sketch_image()}
    status = app.run("sketch", "sketch.safetensors", drawing, None, "a", NO_STYLE, 0, 1, 100, 200, True)[3]
    assert "Gamma 0.40" in status
    assert "Gamma 0.00" in app.run("sketch", "sketch.safetensors", drawing, None, "a", NO_STYLE, 0, 1)[3]
    assert app.filled_gamma(None) == gr.update(value=0.4) and app.filled_gamma(0.3) == gr.update()


def _held(app) -> dict:
    """What a long-running app holds that could grow: cached models, adapters left in the networks,
    prompt embeddings, result files, fast-path records, gradio-side temp outputs."""
    g, fast = app.pipeline.generator, app.pipeline.fast
    modules = [g.unet, g.vae]
    return {
        "models": len(app.pipeline.models),
        "generator models": len(g.models),
        "parameters": sum(p.numel() for m in modules for p in m.parameters()),
        "buffers": sum(b.numel() for m in modules for b in m.buffers()),
        "modules": sum(1 for m in modules for _ in m.modules()),
        "adapter configs": sum(len(getattr(m, "peft_config", {})) for m in modules),
        "prompts": len(app.pipeline._prompts),
        "result files": len(list(app.output_dir.iterdir())),
        "fast records": None
        if fast is None
        else (len(fast._unet_folds), len(fast._vae_folds), sum(map(len, fast._stripped.values()))),
        "logging handlers": len(logging.getLogger().handlers) + len(logging.getLogger("turbo").handlers),
    }


@pytest.mark.slow
def test_a_long_sequence_of_translations_and_switches_holds_no_more(tiny_base_dir, models_dir):
    """--max-models bounds what stays loaded: after two rounds, more rounds of translations with
    model, direction, gamma, prompt and size switches (a load and an eviction at every step) leave
    every count as it was and the Python heap flat (each load once left its adapters' configs
    behind on the networks)."""
    # a pipeline of its own ("fp32" names the default dtype): the shared one keeps 4 models
    app = TurboApp(
        (str(tiny_base_dir), "cpu", "fp32"), ModelsFolder(models_dir, 0.0), max_side=96, warn=lambda t: None,
        max_models=2,
    )  # fmt: skip
    labels = [
        "sketch.safetensors",
        "edges.safetensors",
        "unpaired.safetensors (a2b)",
        "unpaired.safetensors (b2a)",
    ]

    def round_(r: int) -> None:
        typed: dict = {}
        for i, label in enumerate(labels):
            *_, typed = app.model_changed(label, f"prompt {i % 5}", None, None, typed)
            size = (48 + 8 * (i % 2), 40 + 8 * (i % 2))  # every round sees the same shapes
            if label.startswith("sketch"):
                out = app.run(
                    "sketch", label, {"composite": sketch_image(56)}, None, "a", NO_STYLE, i / 12, i
                )
            else:
                out = app.run("upload", label, None, photo(size), f"prompt {i % 5}", NO_STYLE, 0.4, i)
            assert "Done in" in out[3], out[3]

    round_(0)
    # traced from a round before the one measured: memory taken before tracing and freed after it
    # would not count, but its reuse would
    tracemalloc.start()
    try:
        round_(1)  # every model evicted and loaded again once
        gc.collect()
        before = _held(app)
        heap = tracemalloc.get_traced_memory()[0]
        for r in range(2, 5):
            round_(r)  # 3 files, 2 kept: a load (and an eviction) at nearly every step
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - heap
    finally:
        tracemalloc.stop()
    after = _held(app)
    assert after.pop("result files") <= KEEP_OUTPUTS and before.pop("result files") <= KEEP_OUTPUTS
    assert after == before and before["models"] == 2
    assert grown < 1_000_000, f"the Python heap grew by {grown} bytes over 12 translations"
