"""Paired training end to end on a tiny random base, tiny random CLIP and a synthetic shapes dataset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import make_tiny_base
from training_assets import (
    die_while_saving_state,
    flat,
    make_domains_dataset,
    make_shapes_dataset,
    make_tiny_clip,
    max_diff,
    one_thread,  # noqa: F401 (autouse fixture)
    random_fid_state_dict,
    run_two_processes,
)

from training.config import ConfigError
from training.data import DatasetError
from training.paired import PairedConfig, PairedTrainer, fid_resize, main, train
from training.state import CheckpointWriter, ResumeError, load_state, resolve_checkpoint
from turbo.base import load_base
from turbo.formats import load_checkpoint
from turbo.generator import Generator


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("paired_assets")
    return {
        "base": make_tiny_base(root / "base"),
        "clip": make_tiny_clip(root / "clip"),
        "data": make_shapes_dataset(root / "shapes"),
    }


def config(assets, output: Path, **overrides) -> PairedConfig:
    fields = dict(
        dataset=str(assets["data"]), output=str(output), base=str(assets["base"]),
        clip_model=str(assets["clip"]),
        disc_backbone=str(assets["clip"]), lpips_pretrained=False, train_image_prep="no_resize",
        test_image_prep="no_resize", batch_size=2, max_steps=2, lr=1e-3, eval_every=0, checkpoint_every=0,
        cpu=True, report_to="none", num_eval_samples=4,
    )  # fmt: skip
    fields.update(overrides)
    return PairedConfig(**fields)


def argv(cfg: PairedConfig) -> list[str]:
    out = []
    for k, v in vars(cfg).items():
        flag = "--" + k.replace("_", "-")
        if v is None or v is False:
            if k == "lpips_pretrained":
                out.append("--no-lpips-pretrained")
            continue
        out += [flag] if v is True else [flag, str(v)]
    return out


@pytest.mark.slow
def test_training_learns_the_shapes_task(assets, tmp_path):
    # GAN and CLIP off (random tiny CLIP says nothing), LPIPS with a random trunk kept small.
    cfg = config(
        assets, tmp_path / "run", max_steps=200, batch_size=4, lambda_gan=0, lambda_clipsim=0, lambda_lpips=0,
        eval_every=200, num_eval_samples=8, eval_batch_size=8,
    )  # fmt: skip
    result = train(cfg)
    before, after = result.first_metrics, result.metrics
    print("learning:", before, after)
    assert before["val/l2"] > 0.8  # the untrained model's output is far from the targets
    assert after["val/l2"] < 0.5 * before["val/l2"]
    assert after["val/psnr"] > before["val/psnr"] + 3.0
    grid = Image.open(tmp_path / "run" / "eval" / "step_00000200.png")
    assert grid.size == (3 * 32, 4 * 32)  # input | output | target, num_grid rows


def test_fid_validation_scores_this_steps_images_resized_as_the_original(assets, tmp_path, monkeypatch):
    """The original resizes targets and outputs to short side 512 before clean-fid; images an
    interrupted run left in the step's folder must not be scored."""
    from training import fid

    extractor = fid.FIDExtractor(state_dict=random_fid_state_dict(), batch_size=4, progress=False)
    seen, compute = [], extractor.compute_stats

    def spy(source, transform=None):
        seen.append((Path(source).name, sorted(f.name for f in Path(source).iterdir()), transform))
        return compute(source, transform)

    extractor.compute_stats = spy
    monkeypatch.setattr("training.evaluate.fid_extractor", lambda weights, device: extractor)
    stale = tmp_path / "run" / "eval" / "fid_00000000"
    stale.mkdir(parents=True)
    Image.new("RGB", (32, 32)).save(stale / "val_00099.png")
    cfg = config(assets, tmp_path / "run", max_steps=1, eval_every=1, track_fid=True, num_eval_samples=-1)
    result = train(cfg)
    names = [f"val_{i:05d}.png" for i in range(8)]  # -1: every test image
    assert [s[:2] for s in seen[1:]] == [("fid_00000000", names), ("fid_00000001", names)]
    assert seen[0][0] == "test_B" and all(s[2] is fid_resize for s in seen)
    assert np.isfinite(result.first_metrics["val/fid"]) and np.isfinite(result.metrics["val/fid"])
    assert fid_resize(np.zeros((32, 48, 3), np.uint8)).shape == (512, 768, 3)


def test_resume_matches_an_uninterrupted_run(assets, tmp_path):
    # Full objective (L2, LPIPS, CLIP, GAN) in stochastic mode, so the RNG (gamma, z, DiffAugment) matters.
    common = dict(stochastic=True, checkpoint_every=2, max_steps=4)
    straight = train(config(assets, tmp_path / "straight", **common))
    half = train(config(assets, tmp_path / "resumed", **(common | {"max_steps": 2})))
    assert half.step == 2
    resumed = train(config(assets, tmp_path / "resumed", **common, resume="latest"))
    assert resumed.step == 4
    assert max_diff(flat(straight.checkpoint), flat(half.checkpoint)) > 0  # steps 3-4 changed the weights
    assert max_diff(flat(straight.checkpoint), flat(resumed.checkpoint)) == 0.0
    s_state, _ = load_state(resolve_checkpoint("latest", tmp_path / "straight"))
    r_state, _ = load_state(resolve_checkpoint("latest", tmp_path / "resumed"))
    assert max_diff(s_state["discriminator"], r_state["discriminator"]) == 0.0
    assert (s_state["step"], s_state["epoch"], s_state["batch"]) == (
        r_state["step"],
        r_state["epoch"],
        r_state["batch"],
    )


def test_two_processes_end_with_identical_weights(assets, tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(
        "import json, sys, torch\n"
        "torch.set_num_threads(1)\n"
        "from training.paired import PairedConfig, PairedTrainer\n"
        "cfg = PairedConfig(**json.loads(sys.argv[1]))\n"
        "t = PairedTrainer(cfg)\n"
        "t.run()\n"
        "gen = {n: p.detach().clone() for n, p in t._named_trainable().items()}\n"
        "torch.save({'gen': gen, 'disc': t.disc.heads_state_dict(), 'world': t.rt.world},\n"
        "           f'{cfg.output}/rank{t.rt.rank}.pt')\n"
    )
    cfg = config(assets, tmp_path / "ddp", max_steps=2, gradient_accumulation_steps=2, checkpoint_every=1)
    r0, r1 = run_two_processes(worker, cfg, port_base=29500)
    assert r0["world"] == r1["world"] == 2
    assert max_diff(r0["gen"], r1["gen"]) == 0.0
    assert max_diff(r0["disc"], r1["disc"]) == 0.0
    lora_b = [v for k, v in r0["gen"].items() if "lora_B" in k]
    assert lora_b and all(v.abs().max() > 0 for v in lora_b)  # it trained (LoRA B starts at 0)
    step_dir = tmp_path / "ddp" / "checkpoints" / "step_00000002"
    assert sorted(p.name for p in step_dir.iterdir()) == [
        "model.safetensors",
        "rng_0.pt",
        "rng_1.pt",
        "state.pt",
    ]


def test_stochastic_from_an_existing_model_publishes_a_gamma_model(assets, tmp_path):
    first = train(config(assets, tmp_path / "plain", max_steps=1, lambda_gan=0, lambda_clipsim=0))
    assert not first.checkpoint.stochastic and first.checkpoint.preprocess == "canny"
    publish = tmp_path / "app_models"
    cfg = config(
        assets, tmp_path / "gamma", stochastic=True, init_from=str(tmp_path / "plain" / "model.safetensors"),
        publish_to=str(publish), name="shapes", max_steps=2, checkpoint_every=1, default_prompt="a shape",
    )  # fmt: skip
    assert main(argv(cfg)) == 0
    published = load_checkpoint(publish / "shapes.safetensors")
    assert published.stochastic and published.preprocess == "sketch"
    assert published.prompts == {"a2b": "a shape"}
    assert not [p for p in publish.iterdir() if p.name != "shapes.safetensors"]  # no temp files left
    # the twin conv is the base's first conv; the trained one started from the earlier model
    base = load_base(assets["base"], device="cpu")
    assert torch.equal(published.unet["conv_in_pretrained.weight"], base.unet.conv_in.weight)
    # the app's gamma slider: different gammas give different outputs
    g = Generator(base)
    g.add_checkpoint("m", published)
    x, emb = torch.rand(1, 3, 32, 32), base.encode_prompt(["a shape"])
    z = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out_lo, out_hi = g(x, emb, model="m", gamma=0.2, noise=z), g(x, emb, model="m", gamma=1.0, noise=z)
    assert out_lo.shape == (1, 3, 32, 32) and (out_lo - out_hi).abs().max() > 1e-4


def test_bf16_autocast_with_checkpointing_keeps_fp32_trainable_weights(assets, tmp_path):
    cfg = config(assets, tmp_path / "bf16", mixed_precision="bf16", gradient_checkpointing=True, max_steps=1)
    trainer = PairedTrainer(cfg)
    try:
        assert trainer.base.unet.conv_in.pretrained.weight.dtype == torch.bfloat16  # frozen: auto -> bf16
        assert all(p.dtype == torch.float32 for p in trainer.params)
        result = trainer.run()
    finally:
        trainer.rt.close()
    assert result.step == 1
    assert all(torch.isfinite(v).all() for v in flat(result.checkpoint).values())
    assert all(v.dtype == torch.float32 for v in flat(result.checkpoint).values())


def test_logs_grids_and_metrics_are_written(assets, tmp_path):
    cfg = config(
        assets, tmp_path / "logs", report_to="tensorboard", eval_every=1, log_every=1, num_grid=2, max_steps=1
    )
    result = train(cfg)
    run = tmp_path / "logs"
    assert list((run / "logs").glob("events.out.tfevents.*"))
    assert Image.open(run / "eval" / "step_00000001.png").size == (96, 64)
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_keys = {k for line in lines for k in line if k.startswith("train/")}
    assert {
        "train/loss_l2",
        "train/loss_lpips",
        "train/loss_clipsim",
        "train/lossG",
        "train/lossD",
    } <= train_keys
    assert set(result.metrics) == {"val/l2", "val/lpips", "val/psnr", "val/clipsim"}
    assert load_checkpoint(run / "model.safetensors").prompts["a2b"].startswith("a ")


def _broken_dataset(root: Path, problem: str) -> Path:
    make_shapes_dataset(root, n_train=4, n_test=2)
    if problem == "missing prompts":
        (root / "train_prompts.json").unlink()
    elif problem == "unpaired image":
        (root / "train_B" / "001.png").unlink()
    elif problem == "bad json":
        (root / "train_prompts.json").write_text("{not json")
    elif problem == "unreadable image":
        (root / "train_A" / "002.png").write_bytes(b"not a png")
    elif problem == "mixed sizes":  # no_resize keeps them, and a batch of 2 cannot stack them
        for side in "AB":
            Image.new("RGB", (40, 32)).save(root / f"train_{side}" / "001.png")
    return root


@pytest.mark.parametrize(
    ("problem", "message"),
    [
        ("missing prompts", "train_prompts.json"),
        ("unpaired image", "without a partner"),
        ("bad json", "invalid JSON"),
        ("unreadable image", "002.png"),
        ("mixed sizes", "40x32: 1 image(s), e.g."),
    ],
)
def test_dataset_problems_are_reported(assets, tmp_path, capsys, problem, message):
    cfg = config(assets, tmp_path / "out")
    cfg.dataset = str(_broken_dataset(tmp_path / "data", problem))
    assert main(argv(cfg)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err


def test_bad_options_are_reported(assets, tmp_path, capsys, monkeypatch):
    cfg = config(assets, tmp_path / "out", eval_gamma=0.5)
    with pytest.raises(ConfigError, match="--stochastic"):
        cfg.validate()
    assert main([*argv(config(assets, tmp_path / "out")), "--batch-size", "0"]) == 2
    assert "--batch-size must be at least 1" in capsys.readouterr().err
    cfg = config(assets, tmp_path / "out", batch_size=200)  # more than the 96 training images
    assert main(argv(cfg)) == 2
    assert "lower --batch-size" in capsys.readouterr().err
    # a base or a released model that cannot be had: one line too, not a traceback
    monkeypatch.setenv("TURBO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TURBO_OFFLINE", "1")
    for extra, message in (
        (["--base", str(tmp_path / "nowhere")], "nowhere"),
        (["--init-from", "edge_to_image"], "offline mode"),
    ):
        assert main([*argv(config(assets, tmp_path / "out")), *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_an_interrupted_save_leaves_the_last_checkpoint_loadable(assets, tmp_path, monkeypatch):
    train(config(assets, tmp_path / "run", max_steps=1, checkpoint_every=1, lambda_gan=0, lambda_clipsim=0))
    trainer = PairedTrainer(
        config(assets, tmp_path / "run", max_steps=2, resume="latest", lambda_gan=0, lambda_clipsim=0)
    )
    real_save = die_while_saving_state(monkeypatch)
    try:
        trainer.step = 2
        with pytest.raises(KeyboardInterrupt):
            trainer.save(trainer.sampler.position)
    finally:
        trainer.rt.close()
    root = tmp_path / "run" / "checkpoints"
    assert (root / ".step_00000002.partial").is_dir() and not (root / "step_00000002").exists()
    folder = resolve_checkpoint("latest", tmp_path / "run")
    assert folder.name == "step_00000001"
    state, rng = load_state(folder)
    assert state["step"] == 1 and rng is not None
    assert load_checkpoint(folder / "model.safetensors").kind == "paired"
    # the next save sweeps the stale partial folder and moves `latest`
    monkeypatch.setattr("training.state._torch_save", real_save)
    writer = CheckpointWriter(tmp_path / "run", keep_last=1)
    writer.save(3, load_checkpoint(folder / "model.safetensors"), state | {"step": 3})
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000003"]
    assert resolve_checkpoint("latest", tmp_path / "run").name == "step_00000003"


def test_a_failing_validation_keeps_its_steps_checkpoint_and_resume_guards(assets, tmp_path, capsys):
    run = tmp_path / "run"
    light = dict(lambda_gan=0, lambda_clipsim=0, max_steps=1, checkpoint_every=1)
    trainer = PairedTrainer(config(assets, run, eval_every=1, **light))

    def evaluate():  # validation breaks at step 1 (a test image gone bad, say)
        if trainer.step >= 1:
            raise DatasetError("cannot load test image: broken")
        return {}

    trainer.evaluate = evaluate
    try:
        with pytest.raises(DatasetError, match="test image"):
            trainer.run()
    finally:
        trainer.rt.close()
    assert resolve_checkpoint("latest", run).name == "step_00000001"  # saved before validating
    # a fresh run in the same folder is refused, before anything loads
    capsys.readouterr()
    assert main(argv(config(assets, run, **light))) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "already holds checkpoints" in err and "--resume latest" in err
    # resuming with another model type or the other trainer is refused with the reason
    with pytest.raises(ResumeError, match="saved without --stochastic, which makes a different model"):
        train(config(assets, run, stochastic=True, resume="latest", **(light | {"max_steps": 2})))
    # a state whose parts do not load into this run's optimizer: named, with the library's reason
    state_file = resolve_checkpoint("latest", run) / "state.pt"
    state = torch.load(state_file, weights_only=True)
    torch.save(state | {"opt_g": {"state": {}, "param_groups": []}}, state_file)
    with pytest.raises(ResumeError, match=r"state\.pt: does not fit this run \(ValueError: .+\)"):
        train(config(assets, run, resume="latest", **(light | {"max_steps": 2})))
    torch.save(state, state_file)
    from training.unpaired import UnpairedConfig
    from training.unpaired import train as train_unpaired

    unpaired = UnpairedConfig(
        dataset=str(make_domains_dataset(tmp_path / "domains", n_train=(2, 2), n_test=(1, 1))),
        output=str(run), base=str(assets["base"]), disc_backbone=str(assets["clip"]), lpips_pretrained=False,
        train_image_prep="no_resize", batch_size=1, max_steps=2, rank_unet=8, eval_every=0, cpu=True,
        report_to="none", lambda_cycle_lpips=0, lambda_idt_lpips=0, resume="latest",
    )  # fmt: skip
    with pytest.raises(ResumeError, match="a paired training checkpoint, and this is unpaired training"):
        train_unpaired(unpaired)


def test_init_from_a_hub_id_starts_from_the_same_weights_as_the_local_file(
    assets, tmp_path, capsys, monkeypatch
):
    from hub_cache import add_to_hub_cache

    from turbo import model_source
    from turbo.formats import save_checkpoint

    g = Generator(load_base(assets["base"], device="cpu"))
    g.new_model("m", "paired")
    torch.manual_seed(3)
    with torch.no_grad():
        for p in g.trainable_parameters("m"):
            p.copy_(torch.randn_like(p) * 0.05)
    local = save_checkpoint(
        g.export("m", prompts={"a2b": "a shape"}, preprocess="canny"), tmp_path / "m.safetensors"
    )
    add_to_hub_cache(tmp_path / "hub", "me/shapes", {"m.safetensors": local})
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(model_source, "_fetched", {})
    exported = [PairedTrainer(config(assets, tmp_path / n, init_from=m)).export() for n, m in
                (("a", str(local)), ("b", "me/shapes"))]  # fmt: skip
    assert exported[0].unet.keys() == exported[1].unet.keys()
    assert all(torch.equal(exported[0].unet[k], exported[1].unet[k]) for k in exported[0].unet)
    assert torch.equal(exported[1].unet["conv_in.weight"], load_checkpoint(local).unet["conv_in.weight"])
    assert main([*argv(config(assets, tmp_path / "c")), "--init-from", "me/absent"]) == 2
    err = capsys.readouterr().err
    assert "\nerror: me/absent is not in the Hugging Face cache" in "\n" + err and "Traceback" not in err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--max-grad-norm", "-1"], "--max-grad-norm must be positive, got -1.0"),
        (["--max-grad-norm", "0"], "--max-grad-norm must be positive, got 0.0"),
        (["--lr", "nan"], "--lr must be a finite number, got nan"),
        (["--lr", "-1e-3"], "--lr must be positive, got -0.001"),
        (["--lr-power", "-inf"], "--lr-power must be a finite number, got -inf"),
        (["--rank-unet", "0"], "--rank-unet (a LoRA rank) must be at least 1, got 0"),
        (["--rank-vae", "-2"], "--rank-vae (a LoRA rank) must be at least 1, got -2"),
        (["--lambda-gan", "-1e-2"], "--lambda-gan must be 0 or more, got -0.01"),
        (["--adam-beta2", "1"], "--adam-beta2 must lie in [0, 1), got 1.0"),
        (["--adam-epsilon", "0"], "--adam-epsilon must be positive, got 0.0"),
        (["--weight-decay", "-1e-2"], "--weight-decay must be 0 or more, got -0.01"),
        (["--seed", "-1"], "--seed must lie in [0, 2**31), got -1"),
        (["--lr-warmup-steps", "-5"], "--lr-warmup-steps must be 0 or more, got -5"),
    ],
)
def test_every_numeric_flag_is_checked_alike_in_both_trainers_before_anything_loads(tmp_path, flags, message):
    from training.paired import parse_config as parse_paired
    from training.unpaired import parse_config as parse_unpaired

    required = ["--dataset", str(tmp_path / "no_data"), "--output", str(tmp_path / "out")]
    for parse in (parse_paired, parse_unpaired):
        with pytest.raises(ConfigError) as e:
            parse([*required, *flags])
        assert str(e.value) == message
    # a negative value right after its flag is a value, not another flag; `=` works as before
    assert parse_paired([*required, "--num-eval-samples", "-1", "--lambda-l2=2"]).lambda_l2 == 2.0
    assert parse_unpaired([*required, "--adam-beta1", "0.5"]).adam_beta1 == 0.5


def test_preprocess_flag_and_its_old_name(tmp_path, caplog):
    from training.paired import parse_config as parse_paired

    required = ["--dataset", str(tmp_path / "no_data"), "--output", str(tmp_path / "out")]
    assert parse_paired(required).preprocess == "auto"
    assert parse_paired([*required, "--preprocess", "sketch"]).preprocess == "sketch"
    assert not caplog.records
    assert parse_paired([*required, "--input", "none"]).preprocess == "none"
    warned = [r.getMessage() for r in caplog.records]
    assert warned == ["--input is deprecated; it is now called --preprocess"]


def test_network_flags_given_as_paths_must_exist(assets, tmp_path, capsys):
    for flag, value in (("--clip-model", tmp_path / "no_clip"), ("--disc-backbone", "./nowhere/clip")):
        assert main([*argv(config(assets, tmp_path / "out")), flag, str(value)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {flag} {value}: the folder does not exist (pass a folder saved")
    assert not (tmp_path / "out" / "checkpoints").exists()


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_sigkill_at_a_checkpoint_write_resumes_bit_equal_and_redoes_the_lost_validation(assets, tmp_path):
    """A real SIGKILL of a training process: step 2's checkpoint folder is in place, `latest` not yet
    written, its validation not done. Resuming redoes that validation, sweeps the temp files a kill
    leaves, and ends where an uninterrupted run ends, bit for bit (weights, discriminator, metrics)."""
    import os
    import subprocess
    import sys

    from training_assets import REPO

    from training.state import KILL_AT_CHECKPOINT_ENV

    common = dict(stochastic=True, checkpoint_every=2, max_steps=4, eval_every=2, log_every=1)
    straight = train(config(assets, tmp_path / "straight", **common, publish_to=str(tmp_path / "pub0")))
    run, pub = tmp_path / "killed", tmp_path / "pub"
    cfg = config(assets, run, **common, publish_to=str(pub), name="m")
    env = os.environ | {KILL_AT_CHECKPOINT_ENV: "2", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "training.paired", *argv(cfg)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == -9, proc.stderr[-2000:]  # killed, not exited
    root = run / "checkpoints"
    assert (root / "step_00000002").is_dir() and not (root / "latest").exists()
    assert [r["step"] for r in _rows(run) if "val/l2" in r] == [0]  # step 2's validation never ran
    stale = [root / ".latest.4242.tmp", run / ".model.safetensors.abc123.tmp", pub / ".m.safetensors.x1.tmp"]
    pub.mkdir()
    for path in stale:
        path.write_bytes(b"")
    resumed = train(config(assets, run, **common, publish_to=str(pub), name="m", resume="latest"))
    assert not any(p.exists() for p in stale)
    assert max_diff(flat(straight.checkpoint), flat(resumed.checkpoint)) == 0.0
    s_state, _ = load_state(resolve_checkpoint("latest", tmp_path / "straight"))
    r_state, _ = load_state(resolve_checkpoint("latest", run))
    assert max_diff(s_state["discriminator"], r_state["discriminator"]) == 0.0
    assert _rows(run) == _rows(tmp_path / "straight")  # step 2's validation redone, no duplicate rows
    assert (run / "eval" / "step_00000002.png").is_file() and resumed.metrics == straight.metrics


def test_resuming_an_earlier_checkpoint_replaces_the_later_metrics_rows(assets, tmp_path):
    light = dict(lambda_gan=0, lambda_clipsim=0, lambda_lpips=0, checkpoint_every=1, max_steps=3,
                 eval_every=2, log_every=1)  # fmt: skip
    train(config(assets, tmp_path / "straight", **light))
    run = tmp_path / "run"
    train(config(assets, run, **light))
    train(config(assets, run, **light, resume=str(run / "checkpoints" / "step_00000001")))
    steps = [(r["step"], "val/l2" in r) for r in _rows(run)]
    assert steps == [(0, True), (1, False), (2, False), (2, True), (3, False), (3, True)]
    assert _rows(run) == _rows(tmp_path / "straight")


def test_resume_errors_known_from_the_files_come_before_anything_loads(assets, tmp_path, monkeypatch):
    light = dict(lambda_gan=0, lambda_clipsim=0, checkpoint_every=1, max_steps=1)
    run = tmp_path / "run"
    train(config(assets, run, **light))

    def no_load(*args, **kwargs):
        raise AssertionError("the base was loaded")

    monkeypatch.setattr("training.trainer.load_base", no_load)
    for resume, message in (
        (str(tmp_path / "nowhere"), "nowhere: no such folder"),
        (str(tmp_path), "no complete checkpoint in"),
    ):
        with pytest.raises(ResumeError, match=message):
            PairedTrainer(config(assets, run, resume=resume, **(light | {"max_steps": 2})))
    with pytest.raises(ResumeError, match="saved without --stochastic"):
        PairedTrainer(config(assets, run, resume="latest", stochastic=True, **(light | {"max_steps": 2})))
    other = make_tiny_base(tmp_path / "other_base", seed=1)
    with pytest.raises(ResumeError) as e:
        PairedTrainer(config(assets, run, resume="latest", base=str(other), **(light | {"max_steps": 2})))
    folder = run / "checkpoints" / "step_00000001"
    assert str(e.value) == (
        f"{folder}: trained on the base {assets['base'].resolve()}, and --base is {other.resolve()}; "
        "resume with that base, or add --allow-other-base to continue on this one"
    )


def test_resume_refuses_a_base_with_other_config_or_weights_unless_allowed(assets, tmp_path):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(assets["base"], base)
    light = dict(lambda_gan=0, lambda_clipsim=0, checkpoint_every=1, max_steps=1, base=str(base))
    run = tmp_path / "run"
    train(config(assets, run, **light))
    vae_config = base / "vae" / "config.json"
    original = vae_config.read_text()
    vae_config.write_text(json.dumps(json.loads(original) | {"scaling_factor": 0.5}))
    again = light | {"max_steps": 2, "resume": "latest"}
    with pytest.raises(
        ResumeError, match=r"config: vae scaling_factor 0\.18215 vs 0\.5; resume with that base"
    ):
        train(config(assets, run, **again))
    vae_config.write_text(original)
    # same folder, same config, other weights (another seed's VAE of the same shapes)
    shutil.rmtree(base / "vae")
    shutil.copytree(make_tiny_base(tmp_path / "seed1", seed=1) / "vae", base / "vae")
    with pytest.raises(ResumeError, match="other weights; resume with that base, or add --allow-other-base"):
        train(config(assets, run, **again))
    assert train(config(assets, run, **again, allow_other_base=True)).step == 2


def test_resume_with_other_ranks_or_a_gan_is_refused_before_anything_loads(assets, tmp_path, monkeypatch):
    light = dict(lambda_gan=0, lambda_clipsim=0, checkpoint_every=1, max_steps=1)
    run = tmp_path / "run"
    train(config(assets, run, **light))
    monkeypatch.setattr("training.trainer.load_base", lambda *a, **k: pytest.fail("the base was loaded"))
    again = light | {"max_steps": 2, "resume": "latest"}
    with pytest.raises(ResumeError, match="saved with --rank-unet 8, and this run has --rank-unet 4; resume"):
        PairedTrainer(config(assets, run, **again, rank_unet=4))
    with pytest.raises(ResumeError, match=r"saved without a discriminator \(--lambda-gan 0\); keep it at 0"):
        PairedTrainer(config(assets, run, **(again | {"lambda_gan": 0.5})))


def test_a_lost_final_validation_is_redone_on_resume(assets, tmp_path):
    light = dict(lambda_gan=0, lambda_clipsim=0, lambda_lpips=0, checkpoint_every=0, max_steps=3,
                 eval_every=2, log_every=1)  # fmt: skip
    run = tmp_path / "run"
    done = train(config(assets, run, **light))
    rows = _rows(run)
    assert [r["step"] for r in rows if "val/l2" in r] == [0, 2, 3]  # 3: the final validation
    # as a kill after the final checkpoint, before its validation, leaves the run
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:-1]))
    (run / "eval" / "step_00000003.png").unlink()
    again = train(config(assets, run, **light, resume="latest"))
    assert again.step == 3 and again.metrics == done.metrics
    assert _rows(run) == rows and (run / "eval" / "step_00000003.png").is_file()
    train(config(assets, run, **light, resume="latest"))  # nothing due: no validation, no new row
    assert _rows(run) == rows
