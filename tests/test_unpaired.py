"""Unpaired (CycleGAN-Turbo) training end to end on a tiny random base and two synthetic colour domains."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import make_tiny_base
from training_assets import (
    as_array,
    colour_stats,
    die_while_saving_state,
    edge_correlation,
    flat,
    make_domains_dataset,
    make_tiny_clip,
    make_tiny_dino,
    max_diff,
    one_thread,  # noqa: F401 (autouse fixture)
    run_two_processes,
    set_unit_latent_scale,
)

from training.config import ConfigError
from training.evaluate import Evaluator
from training.state import ResumeError, load_state, resolve_checkpoint
from training.unpaired import UnpairedConfig, UnpairedTrainer, main, train
from turbo.formats import load_checkpoint
from turbo.pipeline import Pipeline


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("unpaired_assets")
    data = make_domains_dataset(root / "domains")
    base = make_tiny_base(root / "base")
    set_unit_latent_scale(base, data / "train_A", data / "train_B")  # SD's latent scale, see its doc
    return {
        "base": base,
        "clip": make_tiny_clip(root / "clip"),
        "dino": make_tiny_dino(root / "dino"),
        "data": data,
    }


def config(assets, output: Path, **overrides) -> UnpairedConfig:
    # LPIPS off where a test does not need it: the random VGG trunk is the slowest piece here.
    fields = dict(
        dataset=str(assets["data"]), output=str(output), base=str(assets["base"]),
        disc_backbone=str(assets["clip"]), dino_model=str(assets["dino"]), lpips_pretrained=False,
        train_image_prep="no_resize", test_image_prep="no_resize", batch_size=2, max_steps=2, lr=1e-3,
        rank_unet=8, eval_every=0, checkpoint_every=0, cpu=True, report_to="none", num_eval_samples=4,
        lambda_cycle_lpips=0, lambda_idt_lpips=0,
    )  # fmt: skip
    fields.update(overrides)
    return UnpairedConfig(**fields)


# The learning runs. LPIPS is off (a random VGG trunk measures nothing perceptual), so its weight moves to
# L1; lr 5e-3 (500x the original's) and a fifth of the original's GAN weight learn the tiny model's
# translation, colours and layout in 60 steps from seed 0 to 5 but 4 (docs/training.md has the figures).
# The layout reaches the decoder through the skip convs' LoRA alone (their own weights stay at 1e-5, as
# in the original), which the GAN holds back at higher weights.
LEARNING = dict(max_steps=60, batch_size=2, lr=5e-3, lambda_cycle=10, lambda_idt=5, lambda_gan=0.1)
# Seeds (the trainer's and the synthetic dataset's) of the learning tests; one by default to keep the
# file short (2 min here), more on demand (about 45 s per fp32 run, 40 s per bf16 run on 2 cores):
# TURBO_LEARNING_SEEDS=0,1,2 pytest -s -k "moves or bf16_translates" tests/test_unpaired.py
SEEDS = [int(s) for s in os.environ.get("TURBO_LEARNING_SEEDS", "0").split(",")]


def learning_run(assets, tmp_path: Path, seed: int, **overrides) -> dict[str, float]:
    """Train LEARNING from `seed`; measure the a2b outputs of test_A before and after training."""
    data = assets["data"] if seed == 0 else make_domains_dataset(tmp_path / "data", seed=seed)
    cfg = config(assets, tmp_path / "run", **(LEARNING | {"dataset": str(data), "seed": seed} | overrides))
    trainer = UnpairedTrainer(cfg)
    ev = Evaluator(cfg.dataset, "a2b", "no_resize")
    try:

        def outputs():
            return ev.translate_all(lambda x: trainer.translate(x, "a2b"), batch_size=8, progress=False)

        before = outputs()
        trainer.run()
        after = outputs()
    finally:
        trainer.rt.close()
    b_images = Evaluator(cfg.dataset, "b2a", "no_resize").inputs
    # colour statistics: (mean luminance, mean blue - red) of domain B, and their distances to it
    stats_b = colour_stats(b_images)
    pairs = list(zip(ev.inputs, before, after, strict=True))
    figures = {
        "to_b_from_a": float(np.linalg.norm(colour_stats(ev.inputs) - stats_b)),
        "to_b_before": float(np.linalg.norm(colour_stats(before) - stats_b)),
        "to_b_after": float(np.linalg.norm(colour_stats(after) - stats_b)),
        "edges_before": float(np.mean([edge_correlation(x, y) for x, y, _ in pairs])),
        "edges_after": float(np.mean([edge_correlation(x, z) for x, _, z in pairs])),
        "change": float(np.mean([np.abs(as_array(x) - as_array(z)).mean() for x, _, z in pairs])),
    }
    print(f"seed {seed} {overrides}: " + ", ".join(f"{k} {v:.3f}" for k, v in figures.items()))
    return figures


def assert_translates(f: dict[str, float]) -> None:
    # most of the way to domain B's colours (darker ground, cooler shapes), closer than the random start
    assert f["to_b_after"] < 0.25 * f["to_b_from_a"] and f["to_b_after"] < 0.6 * f["to_b_before"]
    # the shapes stay where they were: edge maps correlate (the random start's do not)
    assert f["edges_before"] < 0.15 and f["edges_after"] > 0.3
    assert f["change"] > 0.25  # not a copy of the input


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_a2b_moves_to_domain_b_colours_and_keeps_the_layout(assets, tmp_path, seed):
    assert_translates(learning_run(assets, tmp_path, seed))


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_bf16_translates_as_fp32_does(assets, tmp_path, seed):
    # bf16 autocast with the frozen base in bf16 too (--frozen-dtype auto), the smallest-memory setting.
    # 50 steps, not 60: bf16 convolutions take a slow path on this cpu (docs/training.md has the figures).
    assert_translates(learning_run(assets, tmp_path, seed, mixed_precision="bf16", max_steps=50))


def test_resume_matches_an_uninterrupted_run_and_survives_an_interrupted_save(assets, tmp_path, monkeypatch):
    common = dict(checkpoint_every=1, max_steps=2)
    straight = train(config(assets, tmp_path / "straight", **common))
    half = train(config(assets, tmp_path / "resumed", **(common | {"max_steps": 1})))
    resumed = train(config(assets, tmp_path / "resumed", **common, resume="latest"))
    assert (half.step, resumed.step) == (1, 2)
    assert max_diff(flat(straight.checkpoint), flat(half.checkpoint)) > 0  # step 2 changed the weights
    assert max_diff(flat(straight.checkpoint), flat(resumed.checkpoint)) == 0.0
    s_state, _ = load_state(resolve_checkpoint("latest", tmp_path / "straight"))
    r_state, _ = load_state(resolve_checkpoint("latest", tmp_path / "resumed"))
    for key in ("disc_a", "disc_b"):
        assert max_diff(s_state[key], r_state[key]) == 0.0
    assert (s_state["step"], s_state["epoch"], s_state["batch"]) == (2, r_state["epoch"], r_state["batch"])
    # the original's step structure: 3 generator and 2 discriminator schedule steps per training step
    assert s_state["sched_g"]["last_epoch"] == 6 and s_state["sched_d"]["last_epoch"] == 4
    # a process killed while writing checkpoint 3 leaves checkpoint 2 loadable
    trainer = UnpairedTrainer(config(assets, tmp_path / "resumed", **common, resume="latest"))
    die_while_saving_state(monkeypatch)
    try:
        trainer.step = 3
        with pytest.raises(KeyboardInterrupt):
            trainer.save(trainer.sampler.position)
    finally:
        trainer.rt.close()
    root = tmp_path / "resumed" / "checkpoints"
    assert (root / ".step_00000003.partial").is_dir() and not (root / "step_00000003").exists()
    folder = resolve_checkpoint("latest", tmp_path / "resumed")
    assert folder.name == "step_00000002"
    state, rng = load_state(folder)
    assert state["step"] == 2 and rng is not None and "disc_b" in state
    assert load_checkpoint(folder / "model.safetensors").directions == ["a2b", "b2a"]


def test_two_processes_end_with_identical_weights(assets, tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(
        "import json, sys, torch\n"
        "torch.set_num_threads(1)\n"
        "from training.unpaired import UnpairedConfig, UnpairedTrainer\n"
        "cfg = UnpairedConfig(**json.loads(sys.argv[1]))\n"
        "t = UnpairedTrainer(cfg)\n"
        "t.run()\n"
        "gen = {n: p.detach().clone() for n, p in t._named_trainable().items()}\n"
        "disc = {f'{d}.{k}': v for d in 'ab' for k, v in t.disc[d].heads_state_dict().items()}\n"
        "torch.save({'gen': gen, 'disc': disc, 'world': t.rt.world}, f'{cfg.output}/rank{t.rt.rank}.pt')\n"
    )
    cfg = config(assets, tmp_path / "ddp", batch_size=1, max_steps=1, gradient_accumulation_steps=2)
    r0, r1 = run_two_processes(worker, cfg, port_base=30500)
    assert r0["world"] == r1["world"] == 2
    assert max_diff(r0["gen"], r1["gen"]) == 0.0
    assert max_diff(r0["disc"], r1["disc"]) == 0.0
    lora_b = [v for k, v in r0["gen"].items() if "lora_B" in k]
    assert lora_b and all(v.abs().max() > 0 for v in lora_b)  # it trained (LoRA B starts at 0)
    step_dir = tmp_path / "ddp" / "checkpoints" / "step_00000001"
    assert sorted(p.name for p in step_dir.iterdir()) == [
        "model.safetensors",
        "rng_0.pt",
        "rng_1.pt",
        "state.pt",
    ]


def test_cli_validates_publishes_and_the_app_loads_both_directions(assets, tmp_path, capsys):
    publish = tmp_path / "app_models"
    argv = ["--dataset", str(assets["data"]), "--output", str(tmp_path / "run"),
            "--base", str(assets["base"]), "--disc-backbone", str(assets["clip"]),
            "--dino-model", str(assets["dino"]), "--no-lpips-pretrained",
            "--train-image-prep", "no_resize", "--rank-unet", "4", "--max-steps", "1", "--eval-every", "1",
            "--num-eval-samples", "3", "--num-grid", "2", "--log-every", "1", "--cpu", "--report-to", "none",
            "--publish-to", str(publish), "--name", "warm2cool"]  # fmt: skip
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["step"] == 1 and set(printed) >= {"val/dino_struct_a2b", "val/dino_struct_b2a"}
    run = tmp_path / "run"
    report = json.loads((run / "eval" / "step_00000001" / "metrics.json").read_text())
    assert [r["direction"] for r in report["results"]] == ["a2b", "b2a"]
    assert report["results"][0]["dino_structure"] == pytest.approx(printed["val/dino_struct_a2b"])
    from PIL import Image

    assert Image.open(run / "eval" / "step_00000001.png").size == (64, 4 * 32)  # input | output, 2 x 2 rows
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    keys = {k for line in lines for k in line}
    assert {"train/cycle_a", "train/gan_b", "train/idt_a", "train/disc_b", "val/dino_struct_b2a"} <= keys
    # the published model: two directions, each with its target domain's caption, run by the app's pipeline
    ckpt = load_checkpoint(publish / "warm2cool.safetensors")
    assert ckpt.kind == "unpaired" and ckpt.directions == ["a2b", "b2a"]
    assert ckpt.prompts == {"a2b": "cool shapes on dark ground", "b2a": "warm shapes on light ground"}
    pipe = Pipeline(assets["base"], device="cpu")
    info = pipe.load(publish / "warm2cool.safetensors")
    assert info.directions == ["a2b", "b2a"]
    image = Image.open(next((assets["data"] / "test_A").iterdir()))
    outs = [pipe.translate(image, publish / "warm2cool.safetensors", direction=d) for d in ("a2b", "b2a")]
    assert [o.prompt for o in outs] == [ckpt.prompts["a2b"], ckpt.prompts["b2a"]]
    assert outs[0].image.size == image.size and outs[0].image.tobytes() != outs[1].image.tobytes()


def test_bf16_keeps_fp32_weights_and_discriminators_take_no_generator_gradient(assets, tmp_path):
    trainer = UnpairedTrainer(
        config(assets, tmp_path / "bf16", mixed_precision="bf16", gradient_checkpointing=True, max_steps=1)
    )
    seen = []
    real_update = trainer._gen_update

    def checked_update():
        seen.append([p.grad is None for d in "ab" for p in trainer.disc[d].trainable_parameters()])
        real_update()

    trainer._gen_update = checked_update
    try:
        assert trainer.base.text_encoder is None  # captions encoded once, text encoder freed
        assert trainer.base.unet.conv_in.pretrained.weight.dtype == torch.bfloat16
        assert all(p.dtype == torch.float32 for p in trainer.params)
        result = trainer.run()
    finally:
        trainer.rt.close()
    assert len(seen) == 3 and all(all(s) for s in seen)  # 3 generator updates per step, no head gradient
    values = flat(result.checkpoint).values()
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in values)
    lora_b = [v for k, v in flat(result.checkpoint).items() if "lora_B" in k]
    assert all(v.abs().max() > 0 for v in lora_b)  # every LoRA moved off its zero start under bf16
    # the skip convs' own weights are frozen in unpaired models (as in the original): still at 1e-5,
    # as the frozen bf16 base stores it
    start = torch.tensor(1e-5, dtype=torch.bfloat16).float()
    skips = [v for k, v in flat(result.checkpoint).items() if "skip_conv" in k and ".lora_" not in k]
    assert len(skips) == 8 and all(torch.all(v == start) for v in skips)


@pytest.mark.parametrize(
    ("problem", "message"),
    [
        ("fixed_prompt_b.txt", "missing caption files"),
        ("train_B", "train_B"),
        ("bad image", "unreadable images"),
    ],
)
def test_dataset_problems_are_reported(assets, tmp_path, capsys, problem, message):
    data = make_domains_dataset(tmp_path / "data", n_train=(2, 2), n_test=(1, 1))
    if problem == "fixed_prompt_b.txt":
        (data / problem).unlink()
    elif problem == "train_B":
        for p in (data / "train_B").iterdir():
            p.unlink()
    else:
        (data / "train_A" / "a000.png").write_bytes(b"not a png")
    cfg = config(assets, tmp_path / "out")
    argv = [
        "--dataset",
        str(data),
        "--output",
        cfg.output,
        "--base",
        cfg.base,
        "--cpu",
        "--report-to",
        "none",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err


def test_cli_defaults_are_the_originals_validation_and_recipe():
    from training.paired import parse_config as parse_paired
    from training.unpaired import parse_config as parse_unpaired

    required = ["--dataset", "d", "--output", "o"]
    unpaired, paired = parse_unpaired(required), parse_paired(required)
    assert (unpaired.max_steps, unpaired.eval_every, unpaired.num_eval_samples) == (25_000, 500, -1)
    assert (paired.max_steps, paired.eval_every, paired.num_eval_samples) == (10_000, 100, 100)
    assert (unpaired.lr, unpaired.batch_size, unpaired.test_image_prep) == (1e-5, 1, "no_resize")
    with pytest.raises(ConfigError, match="--num-eval-samples must be -1"):
        parse_unpaired([*required, "--num-eval-samples", "-2"])
    with pytest.raises(ConfigError, match="--test-image-prep must be deterministic"):
        parse_unpaired([*required, "--test-image-prep", "resize_286_randomcrop_256x256_hflip"])


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--dino-model", "{tmp}/no_dino"], "--dino-model {tmp}/no_dino: the folder does not exist"),
        (["--disc-backbone", "{tmp}/no_clip"], "--disc-backbone {tmp}/no_clip: the folder does not exist"),
        (["--lpips-vgg", "{tmp}/vgg16.pth"], "--lpips-vgg {tmp}/vgg16.pth: no such file (a torchvision"),
        (["--lpips-vgg", "{tmp}/garbage.pt"], "LPIPS VGG trunk from --lpips-vgg {tmp}/garbage.pt"),
        (["--lpips-vgg", "{tmp}/other.pt"], "not a VGG-16 state dict: 26 of the 26 trunk tensors are"),
        (["--track-fid", "--fid-weights", "{tmp}/other.pt"], "not the FID Inception weights ("),
        (["--track-fid", "--fid-weights", "{tmp}/garbage.pt"], "garbage.pt: cannot read it ("),
    ],
)
def test_wrong_metric_networks_are_one_line(assets, tmp_path, capsys, flags, message):
    torch.save({"conv.weight": torch.zeros(3)}, tmp_path / "other.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a torch file")
    cfg = config(assets, tmp_path / "run", eval_every=1, max_steps=1)
    argv = ["--dataset", cfg.dataset, "--output", cfg.output, "--base", cfg.base, "--disc-backbone",
            cfg.disc_backbone, "--dino-model", cfg.dino_model, "--no-lpips-pretrained", "--train-image-prep",
            "no_resize", "--rank-unet", "4", "--max-steps", "1", "--eval-every", "1", "--cpu",
            "--report-to", "none"]  # fmt: skip
    assert main(argv + [f.format(tmp=tmp_path) for f in flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and message.format(tmp=tmp_path) in err
    assert not (tmp_path / "run" / "checkpoints").exists()  # it stopped before training


def test_first_and_skip_conv_lora_get_two_adamw_updates_as_in_the_originals_optimizer(assets, tmp_path):
    """The original lists these LoRA weights twice; torch's for-loop AdamW given that list is the
    reference for one step."""
    import warnings

    from turbo import lora

    cfg = config(assets, tmp_path / "run", weight_decay=0.1)
    trainer = UnpairedTrainer(cfg)
    try:
        gen, m = trainer.gen, trainer.gen.models["train"]
        names = {id(p): n for n, p in gen.named_parameters()}
        twice = trainer.listed_twice()
        assert len(twice) == 2 + 2 * 4 * 2  # conv_in's LoRA A/B; per direction four skip convs' A/B
        assert all(("conv_in" in names[id(p)] or "skip_conv" in names[id(p)]) and "lora_" in names[id(p)]
                   for p in twice)  # fmt: skip
        # the original's list: every LoRA weight, then conv_in's and the skip convs' own parameters
        original = lora.lora_parameters(gen.unet, m.id) + list(gen.unet.conv_in.trained[m.id].parameters())
        for d in m.directions:
            skips = gen.vae.skips[m.vae_id(d)]
            original += lora.lora_parameters(gen.vae, m.vae_id(d))
            original += [p for i in range(len(skips.names)) for p in skips[i].parameters()]
        copies = {id(p): torch.nn.Parameter(p.detach().clone()) for p in original}
        g = torch.Generator().manual_seed(0)
        for p in trainer.params:
            p.grad = torch.randn(p.shape, generator=g)
            copies[id(p)].grad = p.grad.clone()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about the duplicates, which is the point
            reference = torch.optim.AdamW(
                [copies[id(p)] for p in original], lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                weight_decay=cfg.weight_decay, eps=cfg.adam_epsilon, foreach=False,
            )  # fmt: skip
        before = {id(p): p.detach().clone() for p in trainer.params}
        for _ in range(2):
            trainer.opt_g.step()
            reference.step()
        for p in trainer.params:
            assert torch.equal(p.detach(), copies[id(p)].detach()), names[id(p)]
        moved = {id(p): (p.detach() - before[id(p)]).abs().max().item() for p in trainer.params}
        once = [moved[id(p)] for p in trainer.params if all(p is not q for q in twice)]
        assert min(moved[id(p)] for p in twice) > 1.5 * max(once)  # two updates against one
    finally:
        trainer.rt.close()
    assert UnpairedConfig("d", "o").double_conv_updates  # the original's optimizer by default
    train(config(assets, tmp_path / "run2", checkpoint_every=1, max_steps=1))
    with pytest.raises(ResumeError, match="saved with --double-conv-updates, which sets up another"):
        train(config(assets, tmp_path / "run2", max_steps=2, resume="latest", double_conv_updates=False))


def test_every_split_is_checked_before_the_base_loads_and_every_problem_listed(assets, tmp_path, capsys):
    data = make_domains_dataset(tmp_path / "data", n_train=(2, 2), n_test=(1, 10))
    (data / "train_B" / "b000.png").write_bytes(b"not a png")
    (data / "test_A" / "a000.png").write_bytes(b"\x89PNG broken")
    (data / "test_B" / "b009.png").unlink()
    (data / "test_B" / "b009.jpg").write_text("a text file named like an image")
    argv = ["--dataset", str(data), "--output", str(tmp_path / "out"), "--base", str(tmp_path / "no_base"),
            "--cpu", "--report-to", "none", "--disc-backbone", str(assets["clip"])]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    # the base does not exist either, and is reported first: it is an option
    assert "--base" in err and "the folder does not exist" in err
    assert main([*argv[:5], str(assets["base"]), *argv[6:]]) == 2
    err = capsys.readouterr().err
    assert f"unpaired dataset {data}, split 'train': 1 problem(s)" in err
    assert f"unpaired dataset {data}, split 'test': 2 problem(s)" in err
    for name in ("train_B/b000.png", "test_A/a000.png", "test_B/b009.jpg"):
        assert name in err
    assert not (tmp_path / "out" / "checkpoints").exists()
