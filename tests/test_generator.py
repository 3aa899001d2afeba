"""The generator matches the original computation for every checkpoint layout, and behaves."""

import pytest
import torch
from reference import RefPaired, RefUnpaired

from turbo import lora
from turbo.base import load_base
from turbo.formats import CheckpointError, load_checkpoint, save_checkpoint
from turbo.generator import Generator
from turbo.pipeline import noise_map

PIXEL = 1 / 255  # the tolerance, on images in [0, 1]; outputs here are in [-1, 1]


@pytest.fixture(scope="module")
def setup(tiny_base_dir, tmp_path_factory):
    folder = str(tiny_base_dir)
    base = load_base(folder, device="cpu")
    gen = Generator(base).eval()
    tmp = tmp_path_factory.mktemp("ckpts")
    refs = {
        "paired": RefPaired(folder, seed=1),
        "stochastic": RefPaired(folder, twin=True, seed=2),
        "unpaired": RefUnpaired(folder, rank_unet=4, seed=3),
    }
    paths = {}
    for name, ref in refs.items():
        paths[name] = tmp / f"{name}.pkl"
        ref.save_pkl(paths[name])
        gen.add_checkpoint(name, load_checkpoint(paths[name]))
    torch.manual_seed(0)
    x = torch.rand(2, 3, 64, 48)
    emb = base.encode_prompt(["a blue bird", "a red house"])
    return base, gen, refs, paths, x, emb


def max_pixel_diff(a, b):
    return ((a - b).abs() / 2).max().item()


@pytest.mark.parametrize("name", ["paired", "stochastic"])
@pytest.mark.parametrize("gamma", [0.0, 0.4, 1.0])
def test_paired_layouts_match_original(setup, name, gamma):
    _, gen, refs, _, x, emb = setup
    noise = torch.randn(2, 4, 8, 6)
    with torch.no_grad():
        ours = gen(x, emb, name, gamma=gamma, noise=noise)
        theirs = refs[name](x, emb, r=gamma, noise=noise, deterministic=False)
    assert ours.shape == (2, 3, 64, 48)
    assert max_pixel_diff(ours, theirs) < PIXEL
    assert theirs.std() > 0.1  # not a degenerate comparison


def test_paired_deterministic_matches_original(setup):
    _, gen, refs, _, x, emb = setup
    with torch.no_grad():
        assert max_pixel_diff(gen(x, emb, "paired"), refs["paired"](x, emb)) < PIXEL


@pytest.mark.parametrize("direction", ["a2b", "b2a"])
def test_unpaired_layout_matches_original(setup, direction):
    _, gen, refs, _, x, emb = setup
    with torch.no_grad():
        ours = gen(x * 2 - 1, emb, "unpaired", direction)
        theirs = refs["unpaired"](x * 2 - 1, emb, direction)
    assert max_pixel_diff(ours, theirs) < PIXEL


def test_directions_differ(setup):
    _, gen, _, _, x, emb = setup
    with torch.no_grad():
        a2b, b2a = gen(x, emb, "unpaired", "a2b"), gen(x, emb, "unpaired", "b2a")
    assert (a2b - b2a).abs().mean() > 1e-3


def test_safetensors_roundtrip_gives_same_output(setup, tmp_path):
    _, gen, _, paths, x, emb = setup
    for name in ("paired", "stochastic", "unpaired"):
        path = save_checkpoint(load_checkpoint(paths[name]), tmp_path / f"{name}.safetensors")
        gen.add_checkpoint(f"{name}-st", load_checkpoint(path))
        noise = torch.randn(2, 4, 8, 6)
        kw = {"gamma": 0.4, "noise": noise} if name != "unpaired" else {"direction": "b2a"}
        with torch.no_grad():
            torch.testing.assert_close(
                gen(x, emb, name, **kw), gen(x, emb, f"{name}-st", **kw), atol=1e-5, rtol=0
            )
        gen.remove_model(f"{name}-st")


def test_gamma_one_equals_deterministic(setup):
    _, gen, _, _, x, emb = setup
    with torch.no_grad():
        for name in ("paired", "stochastic"):
            det = gen(x, emb, name)
            sto = gen(x, emb, name, gamma=1.0, noise=torch.randn(2, 4, 8, 6))
            assert torch.equal(det, sto)


def test_gamma_changes_output_monotonically_towards_noise(setup):
    _, gen, _, _, x, emb = setup
    noise = torch.randn(2, 4, 8, 6)
    with torch.no_grad():
        det = gen(x, emb, "stochastic")
        d = [(gen(x, emb, "stochastic", gamma=g, noise=noise) - det).abs().mean().item() for g in (0.9, 0.4)]
    assert 0 < d[0] < d[1]


def test_no_state_carries_over(setup):
    _, gen, _, _, x, emb = setup
    with torch.no_grad():
        before = gen(x, emb, "stochastic")
        gen(x, emb, "stochastic", gamma=0.3, noise=torch.randn(2, 4, 8, 6))
        gen(x, emb, "unpaired", "b2a")
        after = gen(x, emb, "stochastic")
    assert torch.equal(before, after)


def test_seed_reproduces(setup):
    _, gen, _, _, x, emb = setup
    with torch.no_grad():
        a = gen(x[:1], emb[:1], "stochastic", gamma=0.4, noise=noise_map(7, 64, 48))
        b = gen(x[:1], emb[:1], "stochastic", gamma=0.4, noise=noise_map(7, 64, 48))
        c = gen(x[:1], emb[:1], "stochastic", gamma=0.4, noise=noise_map(8, 64, 48))
    assert torch.equal(a, b)
    assert (a - c).abs().mean() > 1e-3
    assert torch.equal(
        noise_map(7, 64, 48), torch.randn((1, 4, 8, 6), generator=torch.Generator().manual_seed(7))
    )


def test_gamma_below_one_needs_noise(setup):
    _, gen, _, _, x, emb = setup
    with pytest.raises(ValueError, match="noise map"):
        gen(x, emb, "stochastic", gamma=0.5)


def test_skip_and_lora_paths_each_change_the_output(setup):
    base, gen, _, paths, x, emb = setup
    ckpt = load_checkpoint(paths["paired"])
    no_skip = load_checkpoint(paths["paired"])
    for k in no_skip.vae["a2b"]:
        if k.startswith("decoder.skip_conv_"):
            no_skip.vae["a2b"][k] = torch.zeros_like(no_skip.vae["a2b"][k])
    no_lora = load_checkpoint(paths["paired"])
    for sd in (no_lora.unet, no_lora.vae["a2b"]):
        for k in sd:
            if ".lora_B." in k:
                sd[k] = torch.zeros_like(sd[k])
    gen.add_checkpoint("no_skip", no_skip)
    gen.add_checkpoint("no_lora", no_lora)
    try:
        with torch.no_grad():
            full = gen(x, emb, "paired")
            assert (full - gen(x, emb, "no_skip")).abs().mean() > 1e-3
            assert (full - gen(x, emb, "no_lora")).abs().mean() > 1e-3
    finally:
        gen.remove_model("no_skip")
        gen.remove_model("no_lora")
    assert ckpt.rank_unet == 8 and ckpt.alpha_unet == 8  # the original's peft default alpha


def test_removed_model_leaves_no_adapters(setup, tmp_path):
    _, gen, _, paths, x, emb = setup
    n_params = sum(p.numel() for p in gen.parameters())

    def configs() -> list[set]:  # peft records one per adapter on the network
        return [set(getattr(net, "peft_config", {})) for net in (gen.unet, gen.vae)]

    before = configs()
    gen.add_checkpoint("tmp", load_checkpoint(paths["unpaired"]))
    assert configs() != before
    gen.remove_model("tmp")
    assert sum(p.numel() for p in gen.parameters()) == n_params
    assert configs() == before  # nor their configs (kept, an app evicting models grew with each load)
    with pytest.raises(KeyError, match="not loaded"):
        gen(x, emb, "tmp")


@pytest.mark.parametrize("key", ["conv_in.weight", "down_blocks.0.attentions.0.proj_in.lora_A.weight"])
def test_a_checkpoint_that_does_not_fit_is_refused_and_leaves_nothing_behind(setup, key):
    _, gen, _, paths, x, emb = setup
    n_params = sum(p.numel() for p in gen.parameters())
    ckpt = load_checkpoint(paths["paired"])
    ckpt.source = "wide.pkl"
    matches = [k for k in ckpt.unet if k.startswith(key.rsplit(".weight")[0]) and k.endswith("weight")]
    assert matches, key
    shape = ckpt.unet[matches[0]].shape
    ckpt.unet[matches[0]] = torch.zeros(shape[0] + 8, *shape[1:])  # another base's width
    with pytest.raises(CheckpointError, match=r"^wide\.pkl does not fit the base model: [^w]"):
        gen.add_checkpoint("wide", ckpt)
    assert "wide" not in gen.models and sum(p.numel() for p in gen.parameters()) == n_params
    gen.add_checkpoint("wide", load_checkpoint(paths["paired"]))  # the name is free again
    gen.remove_model("wide")


def test_new_model_starts_as_identity_of_base_adapters(setup):
    base, gen, _, _, x, emb = setup
    gen.new_model("fresh", kind="paired")
    try:
        ckpt = gen.export("fresh", prompts={"a2b": "a cat"})
        assert all(v.abs().sum() == 0 for k, v in ckpt.unet.items() if ".lora_B." in k)
        skips = [
            v for k, v in ckpt.vae["a2b"].items() if k.startswith("decoder.skip_conv_") and ".lora_" not in k
        ]
        assert len(skips) == 4 and all(torch.all(v == 1e-5) for v in skips)
        params = gen.trainable_parameters("fresh")
        assert params and all(p.requires_grad for p in params)
        assert not any(p.requires_grad for p in base.text_encoder.parameters())
    finally:
        gen.remove_model("fresh")


@pytest.mark.parametrize("kind", ["paired", "unpaired"])
def test_trainable_parameters_are_the_originals(setup, kind):
    """LoRA and the first conv always; the skip convs' own weights only for paired models (the
    original's peft adapter freezes CycleGAN-Turbo's, which then learn through their LoRA alone)."""
    _, gen, _, _, _, _ = setup
    m = gen.new_model("fresh", kind=kind)
    try:
        params = {id(p) for p in gen.trainable_parameters("fresh")}
        for d in m.directions:
            skips = gen.vae.skips[m.vae_id(d)]
            bases = [skips.base(i).weight for i in range(len(skips.names))]
            assert len(bases) == 4
            assert all((id(w) in params) == (kind == "paired") == w.requires_grad for w in bases)
            lora_ids = {id(p) for p in lora.lora_parameters(gen.vae, m.vae_id(d))}
            skip_lora = [p for i in range(4) for n, p in skips[i].named_parameters() if "lora_" in n]
            assert skip_lora and {id(p) for p in skip_lora} <= lora_ids <= params
        assert {id(p) for p in gen.unet.conv_in.trained[m.id].parameters()} <= params
        assert len(params) == len(gen.trainable_parameters("fresh"))  # no duplicates
    finally:
        gen.remove_model("fresh")


def test_per_sample_gamma_equals_separate_calls(setup):
    _, gen, _, _, x, emb = setup
    noise = torch.randn(2, 4, 8, 6)
    gammas = torch.tensor([0.2, 0.9])
    with torch.no_grad():
        batched = gen(x, emb, "stochastic", gamma=gammas, noise=noise)
        for i, g in enumerate(gammas.tolist()):
            single = gen(x[i : i + 1], emb[i : i + 1], "stochastic", gamma=g, noise=noise[i : i + 1])
            assert torch.allclose(batched[i : i + 1], single, atol=1e-5)


def test_activating_one_direction_keeps_the_others_trainable(setup):
    """`lora.activate` goes through peft's set_adapter / set_scale but keeps every adapter's
    requires_grad: training both directions of an unpaired model runs one at a time."""
    _, gen, _, _, _, _ = setup
    m = gen.new_model("fresh", kind="unpaired")
    try:
        params = gen.trainable_parameters("fresh")
        gen.activate("fresh", "b2a", 0.5)
        assert all(p.requires_grad for p in params)
        layers = [layer for _, layer in lora.lora_layers(gen.vae) if m.vae_id("b2a") in layer.lora_A]
        assert layers and all(layer.active_adapters == [m.vae_id("b2a")] for layer in layers)
        vid = m.vae_id("b2a")
        assert all(layer.scaling[vid] == 0.5 * layer.lora_alpha[vid] / layer.r[vid] for layer in layers)
        lora.activate(gen.vae, None)
        assert all(layer.active_adapters == [] for _, layer in lora.lora_layers(gen.vae))
        assert all(p.requires_grad for p in params)
    finally:
        gen.remove_model("fresh")
