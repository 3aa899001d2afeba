"""`python -m turbo`: translate and convert, and one clear line for every bad input."""

import os
import pickle
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from reference import RefPaired, RefUnpaired
from tiny import make_tiny_base

from turbo.cli import main, output_names
from turbo.formats import load_checkpoint
from turbo.pipeline import Pipeline
from turbo.preprocess import load_image


@pytest.fixture(scope="module")
def files(tiny_base_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    RefPaired(str(tiny_base_dir), twin=True, seed=5).save_pkl(tmp / "sketch.pkl")
    RefUnpaired(str(tiny_base_dir), rank_unet=4, seed=6).save_pkl(tmp / "cycle.pkl")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (61, 83, 3), dtype=np.uint8)).save(tmp / "photo.png")
    (tmp / "notes.txt").write_text("not an image")
    good = (tmp / "photo.png").read_bytes()
    (tmp / "broken.png").write_bytes(good[: len(good) // 2])
    return tmp


def run(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_translate_file_keeps_size_and_matches_pipeline(files, tiny_base_dir, capsys):
    out = files / "out.png"
    argv = ["translate", "--model", str(files / "sketch.pkl"), "--input", str(files / "photo.png")]
    argv += ["--output", str(out), "--base", str(tiny_base_dir), "--prompt", "a cat", "--gamma", "0.4"]
    code, stdout, _ = run(argv + ["--seed", "3"], capsys)
    assert code == 0 and "wrote" in stdout
    got = np.asarray(Image.open(out))
    assert got.shape == (61, 83, 3)
    pipe = Pipeline(str(tiny_base_dir), device="cpu")
    want = pipe.translate(Image.open(files / "photo.png"), files / "sketch.pkl", "a cat", gamma=0.4, seed=3)
    assert np.array_equal(got, np.asarray(want.image))
    run(argv + ["--seed", "4"], capsys)
    assert np.abs(np.asarray(Image.open(out)).astype(int) - got).mean() > 0.5  # the seed matters


def test_convert_then_translate_gives_same_image(files, tiny_base_dir, capsys):
    code, stdout, _ = run(["convert", str(files / "cycle.pkl"), str(files / "cycle.safetensors"),
                           "--caption-a", "a day", "--caption-b", "a night"], capsys)  # fmt: skip
    assert code == 0 and "unpaired" in stdout
    ckpt = load_checkpoint(files / "cycle.safetensors")
    assert ckpt.prompts == {"a2b": "a night", "b2a": "a day"}
    outs = []
    for model in ("cycle.pkl", "cycle.safetensors"):
        argv = ["translate", "--model", str(files / model), "--input", str(files / "photo.png")]
        argv += ["--output", str(files / f"{model}.png"), "--base", str(tiny_base_dir), "--direction", "b2a"]
        argv += ["--prompt", "a day"]
        assert run(argv, capsys)[0] == 0
        outs.append(np.asarray(Image.open(files / f"{model}.png")).astype(int))
    assert np.abs(outs[0] - outs[1]).max() <= 1


def test_convert_preprocess_and_its_old_name(files, tmp_path, capsys, caplog):
    """One name for the input preparation: --preprocess; --input-kind (its old name) still works."""
    new, old = tmp_path / "new.safetensors", tmp_path / "old.safetensors"
    assert run(["convert", str(files / "sketch.pkl"), str(new), "--preprocess", "canny"], capsys)[0] == 0
    assert not caplog.records
    assert run(["convert", str(files / "sketch.pkl"), str(old), "--input-kind", "canny"], capsys)[0] == 0
    assert load_checkpoint(new).preprocess == load_checkpoint(old).preprocess == "canny"
    warned = [r.getMessage() for r in caplog.records]
    assert warned == ["--input-kind is deprecated; it is now called --preprocess"]
    with pytest.raises(SystemExit) as e:
        main(["convert", str(files / "sketch.pkl"), str(tmp_path / "x.safetensors"), "--input-kind", "edges"])
    assert e.value.code == 2 and "invalid choice: 'edges'" in capsys.readouterr().err


def test_translate_folder(files, tiny_base_dir, capsys):
    folder = files / "inputs"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (40 + 8 * i, 48), (30 * i, 90, 200)).save(folder / f"img{i}.png")
    (folder / "broken.png").write_bytes((files / "broken.png").read_bytes())
    argv = ["translate", "--model", str(files / "cycle.pkl"), "--input", str(folder), "--output",
            str(files / "outdir"), "--base", str(tiny_base_dir), "--prompt", "night"]  # fmt: skip
    code, stdout, err = run(argv, capsys)
    assert code == 1  # one input was skipped
    assert sorted(p.name for p in (files / "outdir").iterdir()) == ["img0.png", "img1.png", "img2.png"]
    assert Image.open(files / "outdir" / "img2.png").size == (56, 48)
    assert "1 skipped" in stdout and "broken.png" in stdout + err


def _bad(files, tiny_base_dir, tmp_path):
    other = make_tiny_base(tmp_path / "other_base")  # same layout, different sizes below
    unet_cfg = other / "unet" / "config.json"
    unet_cfg.write_text(
        unet_cfg.read_text().replace("16,", "24,").replace('"norm_num_groups": 8', '"norm_num_groups": 8')
    )
    (tmp_path / "random.pkl").write_bytes(b"\x00" * 64)
    torch.save({"hello": torch.zeros(2)}, tmp_path / "other.pkl")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"x": Evil()}))
    photo, sketch = str(files / "photo.png"), str(files / "sketch.pkl")
    base = ["--base", str(tiny_base_dir), "--output", str(tmp_path / "o.png")]
    return {
        "missing image": (
            ["--model", sketch, "--input", str(tmp_path / "nope.png"), "--prompt", "x"],
            "no such input",
        ),
        "corrupt image": (
            ["--model", sketch, "--input", str(files / "broken.png"), "--prompt", "x"],
            "corrupt",
        ),
        "not an image": (
            ["--model", sketch, "--input", str(files / "notes.txt"), "--prompt", "x"],
            "not an image",
        ),
        "not a checkpoint": (
            ["--model", str(tmp_path / "random.pkl"), "--input", photo, "--prompt", "x"],
            "not a",
        ),
        "wrong keys": (
            ["--model", str(tmp_path / "other.pkl"), "--input", photo, "--prompt", "x"],
            "expected the keys",
        ),
        "unsafe pickle": (
            ["--model", str(tmp_path / "evil.pkl"), "--input", photo, "--prompt", "x"],
            "refused",
        ),
        "unknown model": (["--model", "edge_to_picasso", "--input", photo, "--prompt", "x"], "unknown model"),
        "missing prompt": (["--model", sketch, "--input", photo], "needs a prompt"),
        "gamma range": (["--model", sketch, "--input", photo, "--prompt", "x", "--gamma", "1.5"], "[0, 1]"),
        "offline download": (["--model", "edge_to_image", "--input", photo, "--prompt", "x"], "offline"),
    }, base


def test_every_bad_input_gives_one_clear_line(files, tiny_base_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TURBO_CACHE", str(tmp_path / "cache"))
    cases, base = _bad(files, tiny_base_dir, tmp_path)
    for what, (argv, message) in cases.items():
        code, _, err = run(["translate", *argv, *base], capsys)
        assert code == 2, what
        lines = [line for line in err.splitlines() if line.strip()]
        assert lines and lines[-1].startswith("error:") and message in lines[-1], (what, err)
        assert "Traceback" not in err and "pwned" not in err


def test_checkpoint_for_another_base_is_rejected(files, tmp_path, capsys):
    other = make_tiny_base(tmp_path / "wide", seed=1, unet_channels=(24, 32))
    argv = ["translate", "--model", str(files / "sketch.pkl"), "--input", str(files / "photo.png")]
    argv += ["--output", str(tmp_path / "o.png"), "--base", str(other), "--prompt", "x"]
    code, _, err = run(argv, capsys)
    assert code == 2 and "does not fit the base model" in err


def test_no_traceback_in_a_real_process(tmp_path):
    argv = ["translate", "--model", "nonexistent", "--input", "x.png", "--output", "y.png"]
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(__file__).parents[1]), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "turbo", *argv],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and proc.stderr.startswith("error:")


def test_folder_outputs_never_overwrite_each_other_or_the_inputs(files, tiny_base_dir, capsys):
    assert output_names([Path("a.png"), Path("a.jpg"), Path("a_png.gif"), Path("b.PNG"), Path("B.jpg")]) == {
        Path("a.png"): "a_png.png", Path("a.jpg"): "a_jpg.png", Path("a_png.gif"): "a_png-2.png",
        Path("b.PNG"): "b_png.png", Path("B.jpg"): "B_jpg.png",
    }  # fmt: skip
    folder = files / "same_stems"
    folder.mkdir()
    for i, name in enumerate(["a.png", "a.jpg", "b.png"]):
        Image.new("RGB", (40, 32), (80 * i, 90, 200)).save(folder / name)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    # refused before the model is even looked up (an unknown one would be named otherwise)
    argv = ["translate", "--model", "edge_to_picasso", "--input", str(folder), "--base", str(tiny_base_dir)]
    for same in (folder, folder / ".." / folder.name):
        code, _, err = run([*argv, "--output", str(same)], capsys)
        assert code == 2 and err.startswith("error:") and "is the input folder" in err, err
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    out = files / "same_stems_out"
    argv = ["translate", "--model", str(files / "cycle.pkl"), "--input", str(folder), "--output", str(out)]
    code, stdout, _ = run([*argv, "--base", str(tiny_base_dir), "--prompt", "night"], capsys)
    assert code == 0 and "wrote 3 images" in stdout
    assert sorted(p.name for p in out.iterdir()) == ["a_jpg.png", "a_png.png", "b.png"]
    # each output comes from its own input (the three inputs differ, so do the outputs)
    assert len({Image.open(p).tobytes() for p in out.iterdir()}) == 3


def test_bad_outputs_seeds_and_devices_give_one_line_before_any_work(files, tiny_base_dir, tmp_path, capsys):
    photo = files / "photo.png"
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "a_dir").mkdir()
    unknown = ["--model", "edge_to_picasso", "--base", str(tiny_base_dir)]  # would fail if looked up

    def to(output, source=photo):
        return [*unknown, "--input", str(source), "--output", str(output)]

    cases = {
        "no extension": (to(tmp_path / "out"), "needs an image extension: one of .bmp, .gif, .jpeg, .jpg"),
        "unknown extension": (to(tmp_path / "o.xyz"), "needs an image extension"),
        "parent is a file": (to(tmp_path / "a_file" / "o.png"), "a_file is a file, not a folder"),
        "output is a folder": (to(tmp_path / "a_dir"), "is a folder; give an image file"),
        "output is the input": (to(photo), "is the input file"),
        "folder output is a file": (
            to(tmp_path / "a_file", tmp_path / "a_dir"), "a folder of inputs needs an output folder"
        ),
    }  # fmt: skip
    if not torch.backends.mps.is_available():
        cases["mps missing"] = (
            ["--model", str(files / "sketch.pkl"), "--base", str(tiny_base_dir), "--device", "mps",
             "--input", str(photo), "--output", str(tmp_path / "m.png"), "--prompt", "x"],
            "MPS (Apple GPU) is not available",
        )  # fmt: skip
    if not torch.cuda.is_available():
        cases["cuda missing"] = (
            ["--model", str(files / "sketch.pkl"), "--base", str(tiny_base_dir), "--device", "cuda",
             "--input", str(photo), "--output", str(tmp_path / "c.png"), "--prompt", "x"],
            "CUDA is not available",
        )  # fmt: skip
    for what, (argv, message) in cases.items():
        code, _, err = run(["translate", *argv], capsys)
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and lines[-1].startswith("error:") and message in lines[-1], (what, err)
        assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_dir", "a_file"]  # nothing written
    assert (tmp_path / "a_file").read_text() == "x" and photo.read_bytes()[:4] == b"\x89PNG"
    for seed in ("-1", str(2**32), str(2**70)):
        with pytest.raises(SystemExit):
            main(["translate", "--model", "x", "--input", "x", "--output", "x.png", "--seed", seed])
        assert "--seed: must be in 0..4294967295" in capsys.readouterr().err


def test_a_huge_image_is_written_at_its_own_size(files, tiny_base_dir, tmp_path, capsys):
    rng = np.random.default_rng(1)
    tall = Image.fromarray(rng.integers(0, 255, (2100, 40, 3), dtype=np.uint8))
    exif = tall.getexif()
    exif[274] = 6  # rotate 90 degrees: the image as seen is 2100x40
    tall.save(tmp_path / "wide.png", exif=exif)
    argv = ["translate", "--model", str(files / "cycle.pkl"), "--input", str(tmp_path / "wide.png")]
    argv += ["--output", str(tmp_path / "out.png"), "--base", str(tiny_base_dir), "--prompt", "night"]
    code, stdout, _ = run(argv, capsys)
    assert code == 0 and "(2100x40, resized back from 2048x39;" in stdout
    got = Image.open(tmp_path / "out.png")
    assert got.size == (2100, 40)
    pipe = Pipeline(str(tiny_base_dir), device="cpu")
    small = load_image(tmp_path / "wide.png", max_side=2048)
    want = pipe.translate(small, files / "cycle.pkl", "night").image.resize((2100, 40), Image.LANCZOS)
    assert np.array_equal(np.asarray(got), np.asarray(want))


def _lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.strip()]


def _one_error_line(code: int, err: str, message: str) -> bool:
    lines = _lines(err)
    return code == 2 and len(lines) == 1 and lines[0].startswith("error:") and message in lines[0]


def test_convert_never_loses_a_file_and_writes_normal_permissions(files, tmp_path, capsys):
    original = tmp_path / "model.pkl"
    original.write_bytes((files / "sketch.pkl").read_bytes())
    before = original.read_bytes()
    (tmp_path / "link.safetensors").symlink_to(original)  # the input under another name
    (tmp_path / "folder").mkdir()
    (tmp_path / "a_file").write_text("x")
    taken = tmp_path / "taken.safetensors"
    taken.write_bytes(b"someone's model")
    cases = {
        "in place": (original, "is the input file"),
        "in place through a link": (tmp_path / "link.safetensors", "is the input file"),
        "a folder": (tmp_path / "folder", "is a folder; give a file name, e.g."),
        "another format": (tmp_path / "model.bin", "must end in .safetensors"),
        "no suffix": (tmp_path / "model", "must end in .safetensors"),
        "under a file": (tmp_path / "a_file" / "m.safetensors", "a_file is a file, not a folder"),
        "existing": (taken, "already exists; pass --overwrite to replace it"),
    }
    for what, (output, message) in cases.items():
        code, _, err = run(["convert", str(original), str(output)], capsys)
        lines = _lines(err)
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], (
            what,
            err,
        )
    assert original.read_bytes() == before and taken.read_bytes() == b"someone's model"
    assert not (tmp_path / "model.bin").exists() and list((tmp_path / "folder").iterdir()) == []
    assert (tmp_path / "link.safetensors").is_symlink()
    old_umask = os.umask(0o027)
    try:
        assert run(["convert", str(original), str(tmp_path / "new.safetensors")], capsys)[0] == 0
        os.umask(0o002)
        assert run(["convert", str(original), str(tmp_path / "new2.safetensors")], capsys)[0] == 0
        taken.chmod(0o604)  # an existing file keeps its permissions, as open() would leave them
        assert run(["convert", str(original), str(taken), "--overwrite"], capsys)[0] == 0
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE((tmp_path / "new.safetensors").stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "new2.safetensors").stat().st_mode) == 0o664
    assert stat.S_IMODE(taken.stat().st_mode) == 0o604
    assert load_checkpoint(taken).kind == "paired" and original.read_bytes() == before


def test_folder_translation_keeps_existing_outputs_unless_overwrite(files, tiny_base_dir, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (40, 32), (60 * i, 90, 200)).save(folder / f"img{i}.png")
    out = tmp_path / "out"
    out.mkdir()
    (out / "img1.png").write_bytes(b"mine")
    (tmp_path / "in_link").symlink_to(folder)
    argv = ["translate", "--model", str(files / "cycle.pkl"), "--input", str(folder), "--output", str(out)]
    argv += ["--base", str(tiny_base_dir), "--prompt", "night"]
    code, stdout, _ = run(argv, capsys)
    assert code == 1 and "wrote 2 images" in stdout and "(1 skipped)" in stdout
    assert "skipped 1 image whose output is already in" in stdout and "--overwrite replaces them" in stdout
    assert (out / "img1.png").read_bytes() == b"mine"
    assert Image.open(out / "img0.png").size == (40, 32) and Image.open(out / "img2.png").size == (40, 32)
    # a rerun has nothing left to do: it says so without loading the base (this one does not exist)
    rerun = [a if a != str(tiny_base_dir) else str(tmp_path / "no_base") for a in argv]
    code, stdout, err = run(rerun, capsys)
    assert code == 1 and "wrote 0 images" in stdout and "(3 skipped)" in stdout and "error" not in err
    assert (out / "img1.png").read_bytes() == b"mine"
    code, stdout, _ = run([*argv, "--overwrite"], capsys)
    assert code == 0 and "wrote 3 images" in stdout and "skipped" not in stdout
    assert Image.open(out / "img1.png").size == (40, 32)
    # the input folder as output, through a link: refused before anything is looked up
    code, _, err = run([*argv[:6], str(tmp_path / "in_link"), "--overwrite"], capsys)
    assert code == 2 and "is the input folder" in _lines(err)[-1]


def test_bad_thresholds_and_devices_give_one_line_before_any_work(files, tiny_base_dir, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (40, 32), (60 * i, 90, 200)).save(folder / f"img{i}.png")
    # an unknown model and a missing base: either would be named if the check came later
    argv = ["translate", "--model", "edge_to_picasso", "--base", str(tmp_path / "no_base")]
    argv += ["--input", str(folder), "--output", str(tmp_path / "out")]
    cases = {
        "low over high": (["--canny-low", "201"], "0 <= low <= high <= 255, got low=201, high=200"),
        "negative": (["--canny-low", "-1"], "0 <= low <= high <= 255, got low=-1"),
        "over 255": (["--canny-high", "256"], "got low=100, high=256"),
        "meta device": (["--device", "meta"], "device 'meta' cannot run the models: choose cpu, cuda"),
    }
    for what, (extra, message) in cases.items():
        code, stdout, err = run([*argv, *extra], capsys)
        lines = _lines(err)
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], (
            what,
            err,
        )
        assert "skipped" not in stdout
    assert not (tmp_path / "out").exists()


def test_argument_types_name_what_they_want(capsys):
    base = ["translate", "--model", "x", "--input", "x", "--output", "x.png"]
    for extra, message in (
        (["--seed", "1.5"], "--seed: must be a whole number in 0..4294967295 (2**32 - 1), got '1.5'"),
        (["--batch-size", "two"], "--batch-size: must be a whole number, at least 1, got 'two'"),
        (["--batch-size", "0"], "--batch-size: must be at least 1, got 0"),
        (["--canny-low", "1e2"], "--canny-low: must be a whole number in 0..255, got '1e2'"),
        (["--gamma", "half"], "--gamma: must be a number in [0, 1], got 'half'"),
    ):
        with pytest.raises(SystemExit):
            main([*base, *extra])
        err = capsys.readouterr().err
        assert message in err and "invalid" not in err, err


def test_translate_a_hub_model_from_the_cache_gives_the_local_files_image(
    files, tiny_base_dir, tmp_path, capsys, monkeypatch
):
    from hub_cache import add_to_hub_cache

    from turbo import model_source

    root = tmp_path / "hub"
    add_to_hub_cache(
        root, "me/sketch", {"sketch.pkl": files / "sketch.pkl", "README.md": b"# card"}, ("main", "v1")
    )
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(model_source, "_fetched", {})
    common = ["--input", str(files / "photo.png"), "--base", str(tiny_base_dir), "--prompt", "a cat"]
    images = {}
    for model in (str(files / "sketch.pkl"), "me/sketch", "me/sketch@v1/sketch.pkl"):
        out = tmp_path / f"{len(images)}.png"
        code, _, err = run(
            ["translate", "--model", model, "--output", str(out), *common, "--seed", "3"], capsys
        )
        assert code == 0, err
        images[model] = np.asarray(Image.open(out))
    first, *others = images.values()
    assert all(np.array_equal(first, other) for other in others)
    # a Hub id that is not cached, or not a valid id, is one line before the base loads (none here)
    no_base = ["--input", str(files / "photo.png"), "--base", str(tmp_path / "no_base"), "--prompt", "x"]
    for model, message in {
        "me/absent": "me/absent is not in the Hugging Face cache",
        "a/b/c/d": "taken for a Hub id: it has 4 parts",
    }.items():
        code, _, err = run(
            ["translate", "--model", model, "--output", str(tmp_path / "o.png"), *no_base], capsys
        )
        lines = _lines(err)
        assert code == 2 and len(lines) == 1 and message in lines[0], (model, err)
