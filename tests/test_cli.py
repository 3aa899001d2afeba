"""`python -m turbo`: translate and convert, and one clear line for every bad input."""

import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from reference import RefPaired, RefUnpaired
from tiny import make_tiny_base

from turbo.checkpoint import load_checkpoint
from turbo.cli import main, output_names
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
