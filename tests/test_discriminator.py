"""The vision-aided CLIP discriminator on a tiny random CLIP tower (ViT-B/32 geometry: 224 px, 32 px
patches, 12 blocks, but 32 channels)."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from training_assets import make_tiny_clip
from transformers import CLIPModel, CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection

from training.discriminator import CLIPDiscriminator, DiscriminatorError, diff_augment, load_vision_tower


def tiny_config() -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=12,
        num_attention_heads=2,
        image_size=224,
        patch_size=32,
        projection_dim=24,
        hidden_act="quick_gelu",
    )


def make_disc(**kwargs) -> CLIPDiscriminator:
    torch.manual_seed(0)
    return CLIPDiscriminator.from_config(tiny_config(), **kwargs)


def images(batch: int = 2, size: int = 48, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=g) * 2 - 1


def hand_bce(logits: torch.Tensor, target: float) -> torch.Tensor:
    """-(t log sigmoid(z) + (1 - t) log(1 - sigmoid(z))), averaged over all but the batch dim."""
    p = torch.sigmoid(logits.double())
    loss = -(target * torch.log(p) + (1 - target) * torch.log(1 - p))
    return loss.reshape(loss.shape[0], -1).mean(dim=1)


def test_shapes_layers_and_feature_layout():
    disc = make_disc(diffaug=False)
    assert disc.feature_layers == (4, 8)
    x = images(batch=3)
    logits = disc.logits(x)
    assert [tuple(t.shape) for t in logits] == [(3, 3, 3), (3, 3, 3), (3, 1)]
    assert tuple(disc(x, for_real=True).shape) == (3, 1)
    # maps are the patch tokens after blocks 4 and 8 in row-major order; the vector is the projected CLS
    feats = disc.features(x)
    pixels = F.interpolate(x * 0.5 + 0.5, size=(224, 224), mode="area")
    pixels = (pixels - disc.mean) / disc.std
    out = disc.backbone(pixel_values=pixels, output_hidden_states=True)
    assert torch.allclose(feats[0][:, :, 1, 2], out.hidden_states[4][:, 1 + 1 * 7 + 2], atol=1e-6)
    assert torch.allclose(feats[1][:, :, 6, 0], out.hidden_states[8][:, 1 + 6 * 7 + 0], atol=1e-6)
    assert torch.allclose(feats[2], out.image_embeds, atol=1e-6)


@pytest.mark.parametrize(
    "loss_type,real_target", [("multilevel_sigmoid", 1.0), ("multilevel_sigmoid_s", 0.8)]
)
def test_loss_is_summed_per_level_bce(loss_type, real_target):
    disc = make_disc(diffaug=False, loss_type=loss_type).eval()  # eval: spectral norm stops iterating
    x = images()
    logits = disc.logits(x)
    for kwargs, target in (
        ({"for_real": True}, real_target),
        ({"for_real": False}, 0.0),
        ({"for_G": True}, real_target),
        ({"for_real": False, "for_G": True}, real_target),
    ):
        expected = sum(hand_bce(level, target) for level in logits)
        got = disc(x, **kwargs)
        assert got.shape == (2, 1)
        assert torch.allclose(got[:, 0].double(), expected, atol=1e-5), kwargs
    with pytest.raises(DiscriminatorError):
        disc(x)


def test_backbone_frozen_heads_trained():
    disc = make_disc()
    disc.requires_grad_(True)  # as the original trainer does; must not unfreeze the backbone
    disc.train()
    assert not disc.backbone.training and disc.heads.training
    assert all(not p.requires_grad for p in disc.backbone.parameters())
    head_params = disc.trainable_parameters()
    assert {id(p) for p in head_params} == {id(p) for p in disc.heads.parameters()}
    before_backbone = {k: v.clone() for k, v in disc.backbone.state_dict().items()}
    before_heads = [p.detach().clone() for p in head_params]
    opt = torch.optim.Adam(head_params, lr=1e-2)
    loss = disc(images(seed=2), for_real=True).mean() + disc(images(seed=3), for_real=False).mean()
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head_params)
    assert all(p.grad is None for p in disc.backbone.parameters())
    opt.step()
    after = disc.backbone.state_dict()
    assert all(torch.equal(before_backbone[k], after[k]) for k in before_backbone)
    assert all(not torch.equal(b, p) for b, p in zip(before_heads, head_params, strict=True))


def test_generator_step_with_frozen_heads_gives_image_gradient():
    disc = make_disc().train()
    x = images().requires_grad_(True)
    with disc.frozen_heads():
        assert all(not p.requires_grad for p in disc.heads.parameters())
        loss = disc(x, for_G=True).mean()
    loss.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in disc.parameters())
    assert all(p.requires_grad for p in disc.heads.parameters())
    disc.requires_grad_heads(False)
    assert disc.trainable_parameters() and not any(p.requires_grad for p in disc.trainable_parameters())
    disc.requires_grad_heads(True)
    assert all(p.requires_grad for p in disc.trainable_parameters())


def test_diffaugment_on_off():
    x = images()
    on = make_disc(diffaug=True).eval()
    off = make_disc(diffaug=False).eval()
    same_a = on.logits(x, generator=torch.Generator().manual_seed(5))
    same_b = on.logits(x, generator=torch.Generator().manual_seed(5))
    other = on.logits(x, generator=torch.Generator().manual_seed(6))
    assert all(torch.equal(a, b) for a, b in zip(same_a, same_b, strict=True))
    assert not torch.allclose(same_a[-1], other[-1])
    plain = off.logits(x, generator=torch.Generator().manual_seed(5))
    assert all(torch.equal(a, b) for a, b in zip(plain, off.logits(x), strict=True))
    assert not torch.allclose(plain[-1], same_a[-1])
    # the global RNG drives it by default, as in the package
    torch.manual_seed(9)
    first = on.logits(x)
    torch.manual_seed(9)
    assert torch.equal(first[0], on.logits(x)[0])


def test_diff_augment_pieces():
    ones = torch.ones(4, 3, 16, 16)
    g = torch.Generator().manual_seed(0)
    cut = diff_augment(ones, "cutout", g)
    for sample in cut:
        zeros = (sample[0] == 0).nonzero()
        assert 0 < len(zeros) <= 64 and torch.equal(sample[0], sample[1])
        rows, cols = zeros[:, 0], zeros[:, 1]
        # a single rectangle, clipped to the image
        assert len(zeros) == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    x = torch.arange(16.0).repeat(1, 3, 16, 1)  # column index as value
    shifted = diff_augment(x, "translation", torch.Generator().manual_seed(3))
    values = set(shifted.unique().tolist())
    assert values <= set(range(16))  # a shifted copy with a zero fill
    assert torch.equal(diff_augment(x, ""), x)
    with pytest.raises(DiscriminatorError):
        diff_augment(x, "rotate")


def test_heads_state_dict_round_trip_and_bad_input():
    disc = make_disc(diffaug=False).eval()
    other = make_disc(diffaug=False).eval()
    torch.nn.init.normal_(other.heads[-1][0].parametrizations.weight.original)
    other.load_heads_state_dict(disc.heads_state_dict())
    x = images()
    assert torch.allclose(disc(x, for_real=True), other(x, for_real=True))
    assert all(not k.startswith("backbone") for k in disc.heads_state_dict())
    with pytest.raises(DiscriminatorError):
        disc(torch.zeros(2, 1, 32, 32), for_real=True)
    with pytest.raises(DiscriminatorError):
        make_disc(loss_type="hinge")
    with pytest.raises(DiscriminatorError, match="^no logits to take a loss of$"):
        disc.loss_from_logits([], for_real=True)


def test_a_tower_with_non_square_sizes_is_refused_by_name():
    torch.manual_seed(0)
    tower = CLIPVisionModelWithProjection(tiny_config())
    tower.config.image_size = [224, 192]
    with pytest.raises(
        DiscriminatorError, match=r"square images .* got image_size \[224, 192\], patch_size 32$"
    ):
        CLIPDiscriminator(tower)


def test_tower_loads_from_a_full_clip_checkpoint_without_a_wall_of_warnings(tmp_path):
    folder = make_tiny_clip(tmp_path / "clip")
    full = CLIPModel.from_pretrained(folder)
    warned: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: warned.append(record.getMessage())
    report = logging.getLogger("transformers.modeling_utils")
    report.addHandler(handler)
    try:
        disc = CLIPDiscriminator.from_pretrained(str(folder))
        assert not any("LOAD REPORT" in w for w in warned)  # the text half's weights are expected unused
        tower = disc.backbone.vision_model.state_dict()
        assert tower.keys() == full.vision_model.state_dict().keys()
        assert all(torch.equal(tower[k], v) for k, v in full.vision_model.state_dict().items())
        assert torch.equal(disc.backbone.visual_projection.weight, full.visual_projection.weight)
        # a checkpoint without the projection is refused, and transformers' report is shown
        CLIPVisionModel(full.config.vision_config).save_pretrained(tmp_path / "vision")
        with pytest.raises(
            DiscriminatorError, match=r"1 tower weights are missing \(first: visual_projection"
        ):
            load_vision_tower(str(tmp_path / "vision"))
        assert any("LOAD REPORT" in w and "MISSING" in w for w in warned)
    finally:
        report.removeHandler(handler)
