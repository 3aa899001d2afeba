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
from turbo.cli import main
from turbo.pipeline import Pipeline


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
