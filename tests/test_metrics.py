"""FID (clean-fid "clean" protocol), DINO structure distance and PSNR, with tiny random networks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import linalg
from torchvision import transforms
from training_assets import random_fid_state_dict
from transformers import ViTConfig, ViTModel
from transformers.models.vit.modeling_vit import ViTEmbeddings

from training import fid as fid_module
from training.dino_structure import (
    DinoStructureDistance,
    DinoStructureInputError,
    DinoViTEmbeddings,
    dino_preprocess,
)
from training.fid import (
    FID_WEIGHTS_URL,
    FIDExtractor,
    FIDInputError,
    cached_stats,
    clean_resize,
    fid_between,
    frechet_distance,
    list_image_files,
    load_stats,
    save_stats,
    stats_from_features,
)
from training.metrics import PSNRInputError, mean_psnr, psnr

# ---------------------------------------------------------------- helpers


def smooth_image(seed: int, size: tuple[int, int] = (40, 32)) -> Image.Image:
    """A random blob image (W, H) = size: low-res noise upsampled, so it has structure."""
    rng = np.random.default_rng(seed)
    low = (rng.random((4, 4, 3)) * 255).astype(np.uint8)
    return Image.fromarray(low).resize(size, Image.Resampling.BICUBIC)


def colour_shift(img: Image.Image, shift: tuple[int, int, int]) -> Image.Image:
    arr = np.asarray(img).astype(np.int16) + np.array(shift, dtype=np.int16)
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def extractor() -> FIDExtractor:
    return FIDExtractor(state_dict=random_fid_state_dict(), batch_size=4, progress=False)


def tiny_vit(seed: int = 0) -> ViTModel:
    torch.manual_seed(seed)
    config = ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=224,
        patch_size=8,
        layer_norm_eps=1e-6,
    )
    return ViTModel(config, add_pooling_layer=False)


@pytest.fixture(scope="module")
def dino() -> DinoStructureDistance:
    return DinoStructureDistance(model=tiny_vit(), device="cpu")


# ---------------------------------------------------------------- FID


def test_clean_resize_is_per_channel_float_bicubic_without_quantisation():
    img = np.asarray(smooth_image(1, (37, 23)))
    out = clean_resize(img)
    assert out.shape == (299, 299, 3) and out.dtype == np.float32
    green = Image.fromarray(img[:, :, 1].astype(np.float32)).resize((299, 299), Image.Resampling.BICUBIC)
    np.testing.assert_array_equal(out[:, :, 1], np.asarray(green).clip(0, 255))
    assert not np.allclose(out, np.round(out))  # float resize: not quantised to uint8 levels
    assert out.min() >= 0 and out.max() <= 255
    const = clean_resize(np.full((10, 20, 3), 77, dtype=np.uint8))
    np.testing.assert_allclose(const, 77, atol=1e-4)


def test_folder_listing_is_recursive_sorted_and_filters_extensions(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ["b.png", "a.jpg", "sub/c.PNG", "notes.txt", "d.gif"]:
        (tmp_path / name).write_bytes(b"")
    files = list_image_files(tmp_path)
    assert files == sorted(str(tmp_path / n) for n in ["a.jpg", "b.png", "sub/c.PNG"])
    with pytest.raises(FIDInputError):
        list_image_files(tmp_path / "missing")


def test_fid_identical_sets_zero_and_colour_shift_larger(tmp_path, extractor):
    images = [smooth_image(s) for s in range(8)]
    folder = tmp_path / "ref"
    folder.mkdir()
    for i, img in enumerate(images):
        img.save(folder / f"{i}.png")

    feats_folder = extractor.features(folder)
    feats_list = extractor.features(images)
    assert feats_folder.shape == (8, 2048) and feats_folder.dtype == np.float32
    np.testing.assert_array_equal(feats_folder, feats_list)  # PNG round trip is lossless
    feats_shift = extractor.features([colour_shift(img, (60, -40, 30)) for img in images])

    # scipy's sqrtm of a 2048 x 2048 matrix takes ~30 s on 2 cores, so the distance runs on the first
    # 64 feature dimensions; with 8 images the covariances are singular, as in real use (N < 2048).
    dims = 64
    mu, sigma = stats_from_features(feats_folder[:, :dims])
    mu_s, sigma_s = stats_from_features(feats_shift[:, :dims])
    scale = float(np.trace(sigma))
    assert scale > 0
    same = frechet_distance(mu, sigma, mu, sigma)
    assert abs(same) < 1e-3 * scale
    shifted = frechet_distance(mu, sigma, mu_s, sigma_s)
    assert shifted > 0.1 * scale
    assert shifted > 100 * abs(same)


def test_transform_applies_before_the_clean_resize(tmp_path, extractor):
    """clean-fid's custom_image_tranform: what the original's pix2pix FID resizes with."""
    images = [smooth_image(i, (48, 32)) for i in range(3)]
    for i, img in enumerate(images):
        img.save(tmp_path / f"{i}.png")

    def flip_and_shrink(a):
        return np.ascontiguousarray(a[::-1, :, :][::2, ::2])

    got = extractor.features(tmp_path, transform=flip_and_shrink)
    want = extractor.features([flip_and_shrink(np.asarray(img)) for img in images])
    np.testing.assert_array_equal(got, want)
    assert np.abs(got - extractor.features(tmp_path)).max() > 1e-3


def test_fid_between_uses_both_sources_stats():
    class FixedStats:
        def compute_stats(self, source):
            return (np.zeros(2), np.eye(2)) if source == "a" else (np.array([3.0, 4.0]), np.eye(2))

    assert fid_between("a", "b", FixedStats()) == pytest.approx(25.0)
    assert fid_between("a", "a", FixedStats()) == pytest.approx(0.0, abs=1e-12)


def test_extractor_without_state_dict_downloads_real_weights(monkeypatch, tmp_path):
    calls = []

    def fake_download(url, **kwargs):
        calls.append((url, kwargs))
        return random_fid_state_dict(1)

    monkeypatch.setattr(fid_module.torch.hub, "load_state_dict_from_url", fake_download)
    ext = FIDExtractor(cache_dir=tmp_path, progress=False)
    assert calls[0][0] == FID_WEIGHTS_URL
    assert calls[0][1]["check_hash"] is True and calls[0][1]["weights_only"] is True
    assert calls[0][1]["model_dir"] == str(tmp_path)
    assert isinstance(ext.model.fc, torch.nn.Identity)
    with pytest.raises(FIDInputError):
        ext.features([])


def test_frechet_distance_matches_hand_computation_and_is_symmetric():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(4, 4)), rng.normal(size=(4, 4))
    s1, s2 = a @ a.T + 0.1 * np.eye(4), b @ b.T + 0.1 * np.eye(4)
    mu1, mu2 = rng.normal(size=4), rng.normal(size=4)
    # Tr sqrt(s1 s2) = Tr sqrt(s1^1/2 s2 s1^1/2), a symmetric PSD matrix: sum of sqrt eigenvalues.
    w, v = np.linalg.eigh(s1)
    root1 = v @ np.diag(np.sqrt(w)) @ v.T
    tr_covmean = np.sqrt(np.linalg.eigvalsh(root1 @ s2 @ root1)).sum()
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_covmean
    got = frechet_distance(mu1, s1, mu2, s2)
    assert isinstance(got, float)
    assert got == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(got, rel=1e-9)
    # Commuting (diagonal) covariances: sum of (sqrt(a) - sqrt(b))^2 on the diagonal.
    d1, d2 = np.array([1.0, 4.0, 9.0, 0.25]), np.array([4.0, 1.0, 1.0, 1.0])
    expected_diag = ((np.sqrt(d1) - np.sqrt(d2)) ** 2).sum() + 1.0
    got_diag = frechet_distance(np.zeros(4), np.diag(d1), np.eye(4)[0], np.diag(d2))
    assert got_diag == pytest.approx(expected_diag, rel=1e-12)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(FIDInputError):
        frechet_distance(mu1, s1, mu2[:3], s2[:3, :3])


def test_frechet_distance_singular_product_gets_diagonal_offset(monkeypatch):
    rng = np.random.default_rng(1)
    s = np.cov(rng.normal(size=(3, 6)), rowvar=False)  # rank 2 of 6, as with few samples
    assert abs(frechet_distance(np.zeros(6), s, np.zeros(6), s)) < 1e-6 * np.trace(s)

    # method sqrtm: when sqrtm is not finite, clean-fid retries with eps added to both diagonals.
    real_sqrtm, seen = linalg.sqrtm, []

    def flaky_sqrtm(m):
        seen.append(m)
        return np.full_like(m, np.nan) if len(seen) == 1 else real_sqrtm(m)

    monkeypatch.setattr(fid_module.linalg, "sqrtm", flaky_sqrtm)
    got = frechet_distance(np.zeros(6), s, np.zeros(6), s, eps=1e-3, method="sqrtm")
    offset = s + 1e-3 * np.eye(6)
    np.testing.assert_allclose(seen[1], offset @ offset)
    expected = 2 * np.trace(s) - 2 * np.trace(real_sqrtm(offset @ offset)).real
    assert got == pytest.approx(expected, rel=1e-6, abs=1e-9)


def test_stats_npz_round_trip_and_cache(tmp_path):
    mu, sigma = np.arange(3, dtype=np.float32), np.eye(3)
    path = tmp_path / "stats" / "ref_stats"  # no .npz suffix on purpose
    save_stats(path, mu, sigma)
    mu2, sigma2 = load_stats(path)
    np.testing.assert_array_equal(mu2, mu)
    np.testing.assert_array_equal(sigma2, sigma)

    class CountingExtractor:
        calls = 0

        def compute_stats(self, source, transform=None):
            CountingExtractor.calls += 1
            return mu + 1, sigma * 2

    cache = tmp_path / "cache.npz"
    first = cached_stats(["x"], CountingExtractor(), cache)
    second = cached_stats(["x"], CountingExtractor(), cache)
    assert CountingExtractor.calls == 1
    np.testing.assert_array_equal(first[0], mu + 1)
    np.testing.assert_array_equal(second[1], sigma * 2)
    with pytest.raises(FIDInputError):
        stats_from_features(np.zeros((1, 5), dtype=np.float32))


# ---------------------------------------------------------------- DINO structure


def test_preprocess_matches_torchvision_resize_224():
    img = smooth_image(3, (100, 60))
    ours = dino_preprocess()(img)
    ref = transforms.Compose(
        [
            transforms.Resize(224),
            transforms.ToTensor(),
            transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ]
    )(img)
    assert ours.shape == (3, 224, int(224 * 100 / 60))
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)


def test_keys_equal_hand_computed_concatenated_heads(dino):
    pixels = dino_preprocess()(smooth_image(4, (48, 40))).unsqueeze(0)  # 268 x 224 after resize
    layer = dino.model.layers[-1]
    captured = {}
    handle = layer.register_forward_pre_hook(lambda _m, args: captured.setdefault("h", args[0]))
    keys = dino.keys(pixels)
    handle.remove()
    tokens = 1 + (pixels.shape[2] // 8) * (pixels.shape[3] // 8)
    assert keys.shape == (1, tokens, 32)

    normed = F.layer_norm(
        captured["h"], (32,), layer.layernorm_before.weight, layer.layernorm_before.bias, eps=1e-6
    )
    w, b = layer.attention.k_proj.weight, layer.attention.k_proj.bias
    head_dim = 8
    per_head = [
        normed @ w[h * head_dim : (h + 1) * head_dim].T + b[h * head_dim : (h + 1) * head_dim]
        for h in range(4)
    ]
    torch.testing.assert_close(keys, torch.cat(per_head, dim=-1), rtol=1e-5, atol=1e-5)


def test_distance_zero_for_itself_and_matches_hand_value(dino):
    img = smooth_image(5)
    other = smooth_image(6)
    assert dino.distance(img, img) == 0.0

    pixels = torch.stack([dino_preprocess()(img), dino_preprocess()(other)])
    with torch.no_grad():
        k = dino.keys(pixels)
    unit = F.normalize(k, dim=-1)
    sim = unit @ unit.transpose(1, 2)
    expected = ((sim[0] - sim[1]) ** 2).mean().item()
    got = dino.distance(img, other)
    assert got > 0
    assert got == pytest.approx(expected, rel=1e-4)


def test_distance_structure_change_exceeds_brightness_change(dino):
    img = smooth_image(7)
    brighter = colour_shift(img, (12, 12, 12))
    flipped = img.transpose(Image.Transpose.FLIP_TOP_BOTTOM).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    d_bright = dino.distance(img, brighter)
    d_struct = dino.distance(img, flipped)
    assert 0 < d_bright < d_struct


def test_mean_distance_and_size_mismatch(dino):
    a = [smooth_image(8), smooth_image(9)]
    b = [smooth_image(10), smooth_image(9)]
    expected = (dino.distance(a[0], b[0]) + 0.0) / 2
    assert dino.mean_distance(a, b, progress=False) == pytest.approx(expected, rel=1e-6)
    with pytest.raises(DinoStructureInputError):
        dino.distance(smooth_image(1, (40, 32)), smooth_image(1, (32, 40)))
    with pytest.raises(DinoStructureInputError):
        dino.mean_distance(a, b[:1], progress=False)


def test_loading_path_sets_dino_layer_norm_eps(tmp_path):
    tiny = tiny_vit(2)
    tiny.config.layer_norm_eps = 1e-12  # what the hub's DINO configs say
    tiny.save_pretrained(tmp_path / "dino")
    dino = DinoStructureDistance(hub_id=str(tmp_path / "dino"))
    assert dino.model.config.layer_norm_eps == 1e-6
    assert dino.model.layers[-1].layernorm_before.eps == 1e-6
    torch.testing.assert_close(
        dino.model.layers[-1].attention.k_proj.weight, tiny.layers[-1].attention.k_proj.weight
    )
    assert isinstance(dino.model.embeddings, DinoViTEmbeddings)


def test_position_interpolation_is_dinos():
    model = tiny_vit(1)
    hf_embeddings = model.embeddings
    dino = DinoStructureDistance(model=model)
    emb = dino.model.embeddings
    assert isinstance(emb, DinoViTEmbeddings) and not isinstance(hf_embeddings, DinoViTEmbeddings)
    torch.testing.assert_close(emb.position_embeddings, hf_embeddings.position_embeddings)

    # Square 224 input: the stored table, untouched.
    tokens_224 = torch.zeros(1, 1 + 28 * 28, 32)
    assert emb.interpolate_pos_encoding(tokens_224, 224, 224) is emb.position_embeddings

    # 224 x 272 (28 x 34 patches): DINO's scale-factor interpolation with the +0.1 offset.
    tokens = torch.zeros(1, 1 + 28 * 34, 32)
    got = emb.interpolate_pos_encoding(tokens, 224, 272)
    grid = emb.position_embeddings[:, 1:].reshape(1, 28, 28, 32).permute(0, 3, 1, 2)
    by_hand = F.interpolate(grid, scale_factor=(28.1 / 28, 34.1 / 28), mode="bicubic")
    by_hand = torch.cat(
        [emb.position_embeddings[:, :1], by_hand.permute(0, 2, 3, 1).reshape(1, -1, 32)], dim=1
    )
    torch.testing.assert_close(got, by_hand)
    # ... which is not what transformers' size-based interpolation gives.
    hf = hf_embeddings.interpolate_pos_encoding(tokens, 224, 272)
    assert hf.shape == got.shape and (hf - got).abs().max() > 1e-3


# ---------------------------------------------------------------- PSNR


def test_psnr_formula_identity_and_ranges():
    a = torch.zeros(2, 3, 8, 8)
    b = a.clone()
    b[0] += 0.1
    b[1, :, :4] -= 0.2  # half the pixels off by 0.2 -> MSE 0.02
    values = psnr(a, b)
    expected = torch.tensor([10 * math.log10(4 / 0.01), 10 * math.log10(4 / 0.02)], dtype=torch.float64)
    torch.testing.assert_close(values, expected)
    assert mean_psnr(a, b) == pytest.approx(expected.mean().item())
    assert psnr(a[0], b[0], data_range=1.0).item() == pytest.approx(20.0)
    assert math.isinf(mean_psnr(a, a)) and mean_psnr(a, a) > 0
    with pytest.raises(PSNRInputError):
        psnr(a, b[:, :2])


def test_transformers_embeddings_base_class():
    # DinoViTEmbeddings must keep the parameter layout of the class it replaces.
    cfg = tiny_vit().config
    assert set(DinoViTEmbeddings(cfg).state_dict()) == set(ViTEmbeddings(cfg).state_dict())
