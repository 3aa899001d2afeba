"""Unpaired evaluation (training.evaluate): FID and DINO structure on cases with known answers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import make_tiny_base
from training_assets import make_domains_dataset, make_tiny_dino, one_thread, random_fid_weights  # noqa: F401

from training.dino_structure import DinoStructureDistance
from training.evaluate import EvaluationError, Evaluator, load_fid_weights, main
from training.fid import FIDExtractor, frechet_distance, trace_sqrt_product
from turbo.base import load_base
from turbo.formats import save_checkpoint
from turbo.generator import Generator


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("evaluate_assets")
    data = make_domains_dataset(root / "data", n_train=(2, 2), n_test=(3, 3))
    # test_B holds the same images as test_A: translating by the identity must give FID ~0
    same = root / "same"
    shutil.copytree(data, same)
    shutil.rmtree(same / "test_B")
    shutil.copytree(same / "test_A", same / "test_B")
    return {
        "data": data,
        "same": same,
        "base": make_tiny_base(root / "base"),
        "dino": make_tiny_dino(root / "dino"),
        "fid": random_fid_weights(root / "fid.pt"),
    }


def random_stats(rng: np.random.Generator, n: int, d: int, shift: float = 0.0):
    f = np.abs(rng.normal(size=(n, 8)) @ rng.normal(size=(8, d)) + rng.normal(size=(n, d)) * 0.1 + shift)
    return f.mean(0), np.cov(f, rowvar=False)


@pytest.mark.parametrize(("n1", "n2", "d"), [(40, 30, 64), (300, 200, 64), (50, 50, 256)])
def test_eigenvalue_frechet_distance_equals_scipys(n1, n2, d):
    rng = np.random.default_rng(n1 + d)
    mu1, s1 = random_stats(rng, n1, d)
    mu2, s2 = random_stats(rng, n2, d, shift=0.3)
    reference = frechet_distance(mu1, s1, mu2, s2, method="sqrtm")
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(reference, rel=1e-6)
    # identical statistics: distance 0, and Tr(sqrt(s s)) = Tr(s)
    assert abs(frechet_distance(mu1, s1, mu1, s1)) < 1e-9 * np.trace(s1)
    assert trace_sqrt_product(s1, s1) == pytest.approx(np.trace(s1), rel=1e-9)


@pytest.fixture(scope="module")
def metrics(assets):
    torch.manual_seed(0)
    fid = FIDExtractor(state_dict=load_fid_weights(str(assets["fid"])), batch_size=3, progress=False)
    dino = DinoStructureDistance(model=None, hub_id=str(assets["dino"]))
    return fid, dino


def test_identity_scores_zero_and_a_colour_shift_scores_more(assets, metrics, tmp_path):
    fid, dino = metrics
    ev = Evaluator(assets["same"], "a2b", "no_resize", fid, dino)
    assert len(ev.inputs) == 3 and ev.inputs[0].size == (32, 32)
    assert dino.distance(ev.inputs[0], ev.inputs[0]) == 0.0  # structure distance of an image with itself
    same = ev.run(lambda x: x, tmp_path / "identity", batch_size=2, progress=False)
    assert same.num_images == 3 and sorted(p.name for p in Path(same.samples).iterdir())[0] == "00000.png"
    # the output PNG truncates to 8 bits as the original's ToPILImage does: not quite the input
    assert same.dino_structure < 1e-4
    assert abs(same.fid) < 1e-3  # identical sets, up to the PNG's 8 bits
    shifted = ev.run(lambda x: (x * 0.5 - 0.4).clamp(-1, 1), tmp_path / "shifted", progress=False)
    assert shifted.dino_structure > 10 * same.dino_structure
    assert shifted.fid > 1.0 + 100 * abs(same.fid)
    # a random crop or flip would make two evaluations of the same model differ
    with pytest.raises(
        EvaluationError, match="'resize_286_randomcrop_256x256_hflip' is not one of .*deterministic"
    ):
        Evaluator(assets["same"], "a2b", "resize_286_randomcrop_256x256_hflip", fid, dino)


def test_cli_evaluates_a_checkpoint_and_writes_json_and_markdown(assets, tmp_path, capsys):
    base = load_base(assets["base"], device="cpu")
    g = Generator(base)
    g.new_model("m", "unpaired", rank_unet=4)
    ckpt = g.export("m", prompts={"a2b": "cool", "b2a": "warm"}, image_prep="no_resize")
    path = save_checkpoint(ckpt, tmp_path / "model.safetensors")
    out = tmp_path / "eval"
    argv = ["--model", str(path), "--dataset", str(assets["data"]), "--direction", "b2a",
            "--output", str(out), "--base", str(assets["base"]), "--device", "cpu",
            "--dino-model", str(assets["dino"]),
            "--fid-weights", str(assets["fid"]), "--num-images", "2", "--batch-size", "2"]  # fmt: skip
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["results"][0] == printed
    assert printed["direction"] == "b2a" and printed["num_images"] == 2
    assert printed["fid"] > 0 and printed["dino_structure"] > 0
    table = (out / "metrics.md").read_text()
    assert "| b2a | 2 |" in table and f"{printed['dino_structure'] * 100:.4f}" in table
    assert len(list((out / "samples").glob("*.png"))) == 2
    # --no-fid skips the slow part; a missing split is reported in one line
    assert main([*argv[:-4], "--no-fid", "--output", str(tmp_path / "e2")]) == 0
    assert json.loads((tmp_path / "e2" / "metrics.json").read_text())["results"][0]["fid"] is None
    broken = shutil.copytree(assets["data"], tmp_path / "broken")
    shutil.rmtree(broken / "test_A")
    argv[argv.index("--dataset") + 1] = str(broken)
    assert main([*argv, "--no-fid"]) == 2
    assert "test_A is missing" in capsys.readouterr().err
    argv[argv.index("--model") + 1] = "day_to_night"  # a released model, offline
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TURBO_CACHE", str(tmp_path / "cache"))
        mp.setenv("TURBO_OFFLINE", "1")
        assert main([*argv, "--no-fid"]) == 2
    assert "offline mode" in capsys.readouterr().err


def test_cli_evaluates_a_hub_model_as_the_same_local_file(assets, tmp_path, capsys, monkeypatch):
    from hub_cache import add_to_hub_cache

    from turbo import model_source

    g = Generator(load_base(assets["base"], device="cpu"))
    g.new_model("m", "unpaired", rank_unet=4)
    ckpt = g.export("m", prompts={"a2b": "cool", "b2a": "warm"}, image_prep="no_resize")
    path = save_checkpoint(ckpt, tmp_path / "model.safetensors")
    add_to_hub_cache(tmp_path / "hub", "me/cycle", {"model.safetensors": path, "README.md": b"# card"})
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(model_source, "_fetched", {})
    common = ["--dataset", str(assets["data"]), "--direction", "a2b", "--base", str(assets["base"]),
              "--device", "cpu", "--dino-model", str(assets["dino"]), "--no-fid",
              "--num-images", "2"]  # fmt: skip
    results = {}
    for name, model in (("local", str(path)), ("hub", "me/cycle")):
        assert main(["--model", model, "--output", str(tmp_path / name), *common]) == 0
        results[name] = json.loads((tmp_path / name / "metrics.json").read_text())
        results[name]["results"][0].pop("samples")  # the output folder
    assert results["hub"]["model"] == "me/cycle"
    assert results["hub"]["results"] == results["local"]["results"]
    assert results["hub"]["results"][0]["dino_structure"] > 0
    for sample in sorted((tmp_path / "local" / "samples").glob("*.png")):
        local, hub = (
            np.asarray(Image.open(tmp_path / n / "samples" / sample.name)) for n in ("local", "hub")
        )
        assert np.array_equal(local, hub)
    capsys.readouterr()
    assert main(["--model", "me/absent", "--output", str(tmp_path / "x"), *common]) == 2
    assert capsys.readouterr().err.startswith("error: me/absent is not in the Hugging Face cache")
    assert not (tmp_path / "x").exists()
