"""The fast path (LoRA folded into the base) gives the plain path's images and restores the base exactly."""

from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from reference import RefPaired, RefUnpaired

from turbo.base import load_base
from turbo.fast import exact_fold
from turbo.fast.bench import add_random_models
from turbo.fast.path import FastOptions, FastPath, FastPathError
from turbo.formats import load_checkpoint
from turbo.generator import Generator
from turbo.pipeline import Pipeline

PIXEL = 1 / 255  # the tolerance on images in [0, 1]; outputs here are in [-1, 1]
CASES = [("paired", "a2b", 1.0), ("stochastic", "a2b", 0.4), ("stochastic", "a2b", 0.7),
         ("stochastic", "a2b", 1.0), ("unpaired", "a2b", 1.0), ("unpaired", "b2a", 1.0)]  # fmt: skip


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module", params=["cpu", pytest.param("cuda", marks=CUDA)])
def setup(request, tiny_base_dir, tmp_path_factory):
    """(generator with one model of each kind, x, noise, text embeddings), on the cpu and on CUDA
    (fp32 without TF32 there, so that 1/255 means the same)."""
    device = request.param
    if device == "cuda":
        tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        request.addfinalizer(lambda: _set_tf32(*tf32))
    folder = str(tiny_base_dir)
    base = load_base(folder, device=device, dtype="fp32")  # CUDA's default would be fp16
    gen = Generator(base).eval()
    tmp = tmp_path_factory.mktemp("fast_ckpts")
    refs = {
        "paired": RefPaired(folder, seed=11),
        "stochastic": RefPaired(folder, twin=True, seed=12),
        "unpaired": RefUnpaired(folder, rank_unet=4, seed=13),
    }
    for name, ref in refs.items():
        ref.save_pkl(tmp / f"{name}.pkl")
        gen.add_checkpoint(name, load_checkpoint(tmp / f"{name}.pkl"))
    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 48).to(device)
    noise = torch.randn(2, 4, 4, 6).to(device)
    emb = base.encode_prompt(["a blue bird", "a red house"])
    return gen, x, noise, emb


@pytest.fixture(autouse=True)
def split_every_group_norm(monkeypatch):
    """The tiny models' activations are below the size from which the split GroupNorm takes over."""
    monkeypatch.setattr("turbo.fast.group_norm.SPLIT_FROM", 0)


def _set_tf32(cudnn: bool, matmul: bool) -> None:
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = cudnn, matmul


def plain(gen, x, emb, name, direction, gamma, noise):
    with torch.no_grad():
        return gen(x, emb, name, direction, gamma, noise if gamma < 1 else None)


def base_weights(gen):
    """Every tensor of the shared networks (peft's names: so wrappers must be back in place)."""
    return {k: v.clone() for k, v in {**gen.unet.state_dict(), **gen.vae.state_dict()}.items()}


def max_pixel_diff(a, b):
    return ((a - b).abs() / 2).max().item()


RESTORES = ["record", "copy"]


@pytest.mark.parametrize("restore", RESTORES)
def test_fast_equals_plain_for_every_kind_gamma_and_switch(setup, restore):
    gen, x, noise, emb = setup
    expected = {case: plain(gen, x, emb, *case, noise) for case in CASES}
    distinct = [expected[c] for c in CASES if c[2] < 1 or c[0] != "stochastic"]
    for i in range(len(distinct)):  # the cases really differ, so the comparison means something
        assert distinct[i].std() > 0.1
        assert all(max_pixel_diff(distinct[i], distinct[j]) > 10 * PIXEL for j in range(i))
    fast = FastPath(gen, FastOptions(restore=restore))
    # every case, then back to earlier ones after switching model, direction and gamma
    for case in CASES + [CASES[1], CASES[0], CASES[4]]:
        out = fast(x, emb, *case, noise if case[2] < 1 else None)
        assert out.shape == x.shape
        assert max_pixel_diff(out, expected[case]) < PIXEL, case
    gen.unfold()


@pytest.mark.parametrize("restore", RESTORES)
def test_unfold_restores_the_base_bit_for_bit(setup, restore):
    gen, x, noise, emb = setup
    # channels_last happens here; compare after it
    fast = FastPath(gen, FastOptions(restore=restore, split_group_norm=True))
    before = base_weights(gen)
    norms = {n: m for n, m in gen.vae.named_modules() if isinstance(m, torch.nn.GroupNorm)}
    assert norms
    upsampler_types = {type(b.upsamplers[0]).__name__ for b in gen.vae.decoder.up_blocks if b.upsamplers}
    assert upsampler_types == {"Upsample2D"}
    for _ in range(2):
        for case in CASES:
            fast.fold(*case)
            assert fast.folded
            assert fast.restore_bytes() > 0
            assert all(type(b.upsamplers[0]).__name__ == "SubpixelUpsample" for b, _, _ in fast.upsamplers)
            assert all(type(gen.vae.get_submodule(n)).__name__ == "SplitGroupNorm" for n in norms)
    assert fast.upsamplers
    gen.unfold()
    assert not fast.folded
    after = base_weights(gen)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    # the plain path still gives the same images (peft wrappers, conv_in and the upsamplers are back)
    assert type(gen.unet.conv_in).__name__ == "SwitchableConvIn"
    assert {type(b.upsamplers[0]).__name__ for b, _, _ in fast.upsamplers} == upsampler_types
    assert all(gen.vae.get_submodule(n) is norm for n, norm in norms.items())


@pytest.mark.parametrize("restore", RESTORES)
def test_folding_changes_the_base_then_a_switch_restores_it(setup, restore):
    gen, x, noise, emb = setup
    gen.unfold()
    fast = FastPath(gen, FastOptions(restore=restore))
    before = base_weights(gen)
    fast.fold("paired")
    some = next(n for n, _ in gen.unet.named_modules() if n.endswith("attn1.to_q"))
    w = gen.unet.get_submodule(some).weight
    assert not torch.equal(w, before[f"{some}.base_layer.weight"])  # really folded in place
    fast.fold("unpaired", "b2a")
    fast.fold("paired")
    gen.unfold()
    assert torch.equal(gen.unet.get_submodule(some).base_layer.weight, before[f"{some}.base_layer.weight"])


def test_restore_by_copy_takes_each_copy_once(setup, monkeypatch):
    """Copies are taken at a weight's first fold only: retaking them on every switch (a device-to-host
    copy and a sync per layer on a GPU) would cost more than the switch itself."""
    gen, x, noise, emb = setup
    gen.unfold()
    taken = []
    real = exact_fold.host_copy
    monkeypatch.setattr(exact_fold, "host_copy", lambda w: taken.append(w) or real(w))
    fast = FastPath(gen, FastOptions(restore="copy"))
    for case in CASES:
        fast.fold(*case)
    first = len(taken)
    assert first == len({id(w) for w in taken}) > 0  # one copy per folded weight, no more
    kept = fast.restore_bytes()
    for case in CASES + CASES[::-1]:
        fast.fold(*case)
    assert len(taken) == first
    assert fast.restore_bytes() == kept
    gen.unfold()


def test_a_switch_by_copy_never_waits_for_the_gpu(setup):
    """On CUDA a steady-state switch (copies taken) only queues work: a host sync per layer (a
    blocking copy, a `.item()`) would put the launch time and the GPU time end to end."""
    gen, x, noise, emb = setup
    if not x.is_cuda:
        pytest.skip("host syncs are a CUDA matter")
    gen.unfold()
    fast = FastPath(gen, FastOptions(restore="copy"))
    for case in CASES:
        fast.fold(*case)
    assert all(kept.copy.is_pinned() for kept in fast._copies.values())  # else copies are synchronous
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for case in CASES[::-1] + CASES:
            fast.fold(*case)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    gen.unfold()


def test_restore_by_copy_follows_edits_of_the_base(setup):
    """A base weight edited in place between folds (a new dtype, a loaded state) must not come back
    from a stale copy."""
    gen, x, noise, emb = setup
    gen.unfold()
    fast = FastPath(gen, FastOptions(restore="copy"))
    name = next(n for n, _ in gen.unet.named_modules() if n.endswith("attn1.to_q"))
    weight = gen.unet.get_submodule(name).base_layer.weight
    fast.fold("paired")
    kept = fast.restore_bytes()
    assert kept > 0
    gen.unfold()
    with torch.no_grad():
        weight.mul_(0.5)  # the user's edit, while unfolded
    edited = weight.clone()
    fast.fold("paired")
    assert not torch.equal(weight, edited)
    gen.unfold()
    assert torch.equal(weight, edited)
    assert fast.restore_bytes() == kept  # the stale copy was replaced, not added
    with torch.no_grad():
        weight.mul_(2.0)  # undo, for the other tests (exact: a power of two)


def test_restore_mode_is_checked():
    assert FastOptions().restore_mode(torch.device("cpu")) == "copy"
    assert FastOptions().restore_mode(torch.device("cuda")) == "copy"
    assert FastOptions(restore="record").restore_mode(torch.device("cpu")) == "record"
    assert FastOptions(restore="none").restore_mode(torch.device("cpu")) == "none"
    with pytest.raises(ValueError, match="restore must be"):
        FastOptions(restore="backup").restore_mode(torch.device("cpu"))


def test_folding_for_good_keeps_nothing_and_refuses_to_switch(tiny_base_dir):
    """restore="none" (the CLI: one model for the whole process) folds the same bits as a
    restorable fold, keeps nothing, and refuses whatever would need the base back."""
    base = load_base(str(tiny_base_dir), device="cpu", dtype="fp32")
    gen = Generator(base).eval()  # its own: this one cannot be given back to other tests
    add_random_models(gen, unpaired_rank=4)
    torch.manual_seed(0)
    x, noise, emb = torch.rand(1, 3, 32, 32), torch.randn(1, 4, 4, 4), base.encode_prompt(["a house"])
    expected = FastPath(gen, FastOptions(restore="copy"))(x, emb, "stochastic", "a2b", 0.4, noise)
    folded = {k: v.clone() for k, v in {**gen.unet.state_dict(), **gen.vae.state_dict()}.items()}
    gen.unfold()
    fast = FastPath(gen, FastOptions(restore="none"))
    assert torch.equal(fast(x, emb, "stochastic", "a2b", 0.4, noise), expected)
    now = {**gen.unet.state_dict(), **gen.vae.state_dict()}
    assert now.keys() == folded.keys() and all(torch.equal(v, folded[k]) for k, v in now.items())
    assert fast.restore_bytes() == 0
    assert torch.equal(fast(x, emb, "stochastic", "a2b", 0.4, noise), expected)  # the same call again
    message = "folded its model into the base for good"
    with pytest.raises(FastPathError, match=message):
        fast(x, emb, "stochastic", "a2b", 0.6, noise)
    with pytest.raises(FastPathError, match=message):
        gen.remove_model("paired")
    assert torch.equal(fast(x, emb, "stochastic", "a2b", 0.4, noise), expected)  # still in place


def test_plain_and_training_paths_unfold_first(setup):
    gen, x, noise, emb = setup
    expected = plain(gen, x, emb, "paired", "a2b", 1.0, None)
    fast = FastPath(gen)
    fast(x, emb, "paired")
    assert fast.folded
    assert max_pixel_diff(plain(gen, x, emb, "paired", "a2b", 1.0, None), expected) < 1e-6
    assert not fast.folded
    fast(x, emb, "paired")
    params = gen.trainable_parameters("paired")
    assert not fast.folded and all(p.requires_grad for p in params)
    for p in params:
        p.requires_grad_(False)


def test_each_option_alone_matches_plain(setup):
    gen, x, noise, emb = setup
    expected = plain(gen, x, emb, "stochastic", "a2b", 0.4, noise)
    for opts in (
        FastOptions(fold=False, channels_last=False),
        FastOptions(fold=True, channels_last=False, inference_mode=False, subpixel=False),
        FastOptions(fold=True, channels_last=False, inference_mode=False, subpixel=True),
        FastOptions(fold=False, channels_last=True),
        FastOptions(
            fold=True, channels_last=False, inference_mode=False, subpixel=False, split_group_norm=True
        ),
        FastOptions(split_group_norm=True),  # channels_last too: the norm keeps the layout
    ):
        out = FastPath(gen, opts)(x, emb, "stochastic", gamma=0.4, noise=noise)
        assert max_pixel_diff(out, expected) < PIXEL, opts
    gen.unfold()


def test_cuda_graphs_replay_what_eager_computes(setup):
    """One graph per input shape serves every model, direction and gamma; an unfold (here: the
    plain path) drops the graphs, and the next call captures again."""
    gen, x, noise, emb = setup
    if x.device.type != "cuda":
        pytest.skip("CUDA graphs are for CUDA")
    gen.unfold()
    eager = FastPath(gen, FastOptions(cuda_graph=False))
    expected = {case: eager(x, emb, *case, noise if case[2] < 1 else None) for case in CASES}
    gen.unfold()
    fast = FastPath(gen)
    for case in CASES + [CASES[0], CASES[2], CASES[5]]:
        out = fast(x, emb, *case, noise if case[2] < 1 else None)
        assert max_pixel_diff(out, expected[case]) < PIXEL, case
    assert len(fast._graphs.graphs) == 2  # with and without the noise input
    small = fast(x[:1, :, :, :32], emb[:1], "paired")
    assert small.shape == (1, 3, 32, 32)
    assert len(fast._graphs.graphs) == 3
    plain(gen, x, emb, "paired", "a2b", 1.0, None)  # unfolds
    assert len(fast._graphs.graphs) == 3  # cleared on the next fold, not before
    out = fast(x, emb, *CASES[1], noise)
    assert len(fast._graphs.graphs) == 1
    assert max_pixel_diff(out, expected[CASES[1]]) < PIXEL
    gen.unfold()


def test_fast_path_rejects_per_sample_gamma_and_missing_noise(setup):
    gen, x, noise, emb = setup
    fast = FastPath(gen)
    with pytest.raises(FastPathError, match="per-sample"):
        fast(x, emb, "stochastic", gamma=torch.tensor([0.3, 0.5]), noise=noise)
    with pytest.raises(FastPathError, match="noise"):
        fast(x, emb, "stochastic", gamma=0.5)
    with pytest.raises(KeyError):
        fast(x, emb, "nope")
    gen.unfold()


def test_removing_the_folded_model_restores_the_base(setup):
    gen, x, noise, emb = setup
    gen.unfold()
    FastPath(gen)
    before = base_weights(gen)
    ckpt = gen.export("paired")
    gen.add_checkpoint("copy", ckpt)
    fast = FastPath(gen)
    fast(x, emb, "copy")
    gen.remove_model("copy")
    assert not fast.folded
    after = base_weights(gen)
    assert all(torch.equal(after[k], before[k]) for k in before)


@pytest.fixture(scope="module")
def pipes(tiny_base_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fast_pipe")
    RefPaired(str(tiny_base_dir), twin=True, seed=21).save_pkl(tmp / "sketch.pkl")
    RefUnpaired(str(tiny_base_dir), rank_unet=4, seed=22).save_pkl(tmp / "unpaired.pkl")
    fast = Pipeline(tiny_base_dir, device="cpu")
    slow = Pipeline(tiny_base_dir, device="cpu", fast=False)
    return fast, slow, tmp


def _images():
    g = torch.Generator().manual_seed(3)
    sizes = [(64, 48), (40, 32), (64, 48), (64, 48), (40, 32)]
    return [
        Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()) for w, h in sizes
    ]


def _diff(a: Image.Image, b: Image.Image) -> int:
    ta, tb = (torch.tensor(list(i.getdata()), dtype=torch.int32) for i in (a, b))
    return int((ta - tb).abs().max())


@pytest.mark.parametrize(
    ("model", "kw"), [("sketch.pkl", {"gamma": 0.5}), ("unpaired.pkl", {"direction": "b2a"})]
)
def test_pipeline_batch_equals_one_by_one_and_plain(pipes, model, kw):
    fast, slow, tmp = pipes
    images = _images()
    batch = fast.translate_batch(images, tmp / model, prompt="a cat", batch_size=2, **kw)
    assert [r.image.size for r in batch] == [im.size for im in images]
    for image, result in zip(images, batch, strict=True):
        single = fast.translate(image, tmp / model, prompt="a cat", **kw)
        reference = slow.translate(image, tmp / model, prompt="a cat", **kw)
        assert _diff(single.image, result.image) <= 1
        assert _diff(reference.image, result.image) <= 1
        assert result.gamma == single.gamma


def test_pipeline_restore_by_copy_gives_the_same_images(pipes, tiny_base_dir):
    fast, _, tmp = pipes
    copying = Pipeline(tiny_base_dir, device="cpu", restore="copy")
    assert copying.fast.options.restore_mode(torch.device("cpu")) == "copy"
    image = _images()[0]
    for model, kw in [("sketch.pkl", {"gamma": 0.5}), ("unpaired.pkl", {"direction": "b2a"}),
                      ("sketch.pkl", {"gamma": 0.3})]:  # fmt: skip
        a = copying.translate(image, tmp / model, prompt="a cat", **kw)
        b = fast.translate(image, tmp / model, prompt="a cat", **kw)
        assert _diff(a.image, b.image) <= 1
    assert copying.fast.restore_bytes() > 0
    with pytest.raises(ValueError, match="restore must be"):
        Pipeline(tiny_base_dir, device="cpu", restore="backup")


def test_pipeline_batch_size_must_be_positive(pipes):
    fast, _, tmp = pipes
    with pytest.raises(ValueError, match="batch_size"):
        fast.translate_batch(_images()[:1], tmp / "sketch.pkl", prompt="a cat", batch_size=0)


def test_benchmark_variants_start_from_contiguous_weights(setup):
    """A variant without channels_last must not inherit the layout a previous variant left."""
    from turbo.fast.bench import Variant, _runner

    gen, x, noise, emb = setup
    base = SimpleNamespace(encode_prompt=lambda prompt: emb[:1])
    convs = [p for p in gen.unet.parameters() if p.dim() == 4]
    _runner(gen, base, Variant("cl", FastOptions(channels_last=True), False), "paired", 1.0)(x, None)
    assert not all(p.is_contiguous() for p in convs)  # converted at the first fold
    plain_layout = FastOptions(channels_last=False, subpixel=False)
    _runner(gen, base, Variant("no cl", plain_layout, False), "paired", 1.0)
    assert all(p.is_contiguous() for p in convs)
    _runner(gen, base, Variant("cl", FastOptions(channels_last=True), False), "paired", 1.0)(x, None)
    _runner(gen, base, Variant("plain", None, False), "paired", 1.0)
    assert all(p.is_contiguous() for p in convs)
    gen.unfold()


def test_benchmark_runs_and_reports_the_ratio(tiny_base_dir, capsys, tmp_path):
    from turbo.fast.bench import main

    argv = ["--base", str(tiny_base_dir), "--sizes", "32", "--repeats", "1", "--warmup", "0",
            "--only", "fast", "--switch-repeats", "1", "--unpaired-rank", "4"]  # fmt: skip
    profiles = [
        "--profile-switch",
        str(tmp_path / "switch.txt"),
        "--profile-forward",
        str(tmp_path / "fwd.txt"),
    ]
    assert main(argv + profiles) == 0
    out = capsys.readouterr().out
    plain_row = next(line for line in out.splitlines() if line.startswith("| plain"))
    fast_row = next(line for line in out.splitlines() if line.startswith("| fast (default)"))
    assert plain_row.split("|")[3].strip() == "1.00"
    assert float(fast_row.split("|")[3]) > 0
    assert float(fast_row.split("|")[5]) < 1  # same image as the plain path, within 1/255
    assert "unpaired a2b -> b2a (VAE only)" in out
    assert "aten::mm" in (tmp_path / "switch.txt").read_text()  # the deltas B @ A
    assert "convolution" in (tmp_path / "fwd.txt").read_text()  # aten::convolution, or cudnn_ on CUDA
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="needs a CUDA device"):
            main(argv + ["--cudnn-benchmark"])
