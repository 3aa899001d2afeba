"""LPIPS (random VGG trunk, nothing downloaded) and the CLIP similarity loss on a tiny random CLIP."""

from __future__ import annotations

import math
import string

import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

from training.losses import CLIP_MEAN, CLIP_STD, CLIPSimilarityLoss, LossInputError, LPIPSLoss

CHARS = string.ascii_lowercase + string.digits + ".,'-"


def tiny_tokenizer() -> CLIPTokenizer:
    tokens = ["!"] + list(CHARS) + [c + "</w>" for c in CHARS] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=[], pad_token="!", model_max_length=77)


def tiny_clip() -> CLIPModel:
    torch.manual_seed(0)
    tok = tiny_tokenizer()
    config = CLIPConfig(
        text_config=dict(
            vocab_size=100,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            pad_token_id=0,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
            hidden_act="quick_gelu",
        ),
        projection_dim=16,
        logit_scale_init_value=math.log(100.0),  # OpenAI's trained value: exp() = 100
    )
    return CLIPModel(config)


def images(batch: int, size: int = 48, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture(scope="module")
def lpips_loss() -> LPIPSLoss:
    torch.manual_seed(0)
    return LPIPSLoss(pretrained_trunk=False)


def test_lpips_zero_for_identical_positive_for_different(lpips_loss):
    x, y = images(2, 32, seed=1), images(2, 32, seed=2)
    same = lpips_loss(x, x.clone())
    assert same.shape == (2,) and torch.all(same.abs() < 1e-6)
    diff = lpips_loss(x, y)
    assert torch.all(diff > 1e-4)
    assert torch.allclose(diff, lpips_loss.net(x, y).flatten())


def test_lpips_frozen_gradient_to_image(lpips_loss):
    lpips_loss.train()
    assert not lpips_loss.net.training  # its dropout stays off
    x = images(1, 32, seed=3).requires_grad_(True)
    lpips_loss(x, images(1, 32, seed=4)).mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in lpips_loss.parameters())
    with pytest.raises(LossInputError):
        lpips_loss(images(1, 32), images(1, 16))


def _hand_cosines(model: CLIPModel, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    pixels = F.interpolate(((x * 0.5 + 0.5) - mean) / std, (32, 32), mode="bilinear", align_corners=False)
    img = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
    txt = model.text_projection(model.text_model(input_ids=ids).pooler_output)
    img, txt = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
    return img @ txt.T


def test_clip_similarity_matches_hand_computation():
    model = tiny_clip()
    loss_fn = CLIPSimilarityLoss(model, tiny_tokenizer())
    captions = ["a red car", "a house by the lake"]
    x = images(2)
    ids = loss_fn.tokenize(captions)
    assert ids.shape == (2, 77)
    with torch.no_grad():
        cos = _hand_cosines(model, x, ids)
        loss = loss_fn(x, captions)
        diag = CLIPSimilarityLoss(model, tiny_tokenizer(), matched_pairs_only=True)(x, captions)
    # the original: 1 - mean(logits_per_image) / 100 over the whole image x caption matrix
    assert torch.allclose(loss, 1 - (100 * cos).mean() / 100, atol=1e-5)
    assert torch.allclose(diag, 1 - (100 * cos.diagonal()).mean() / 100, atol=1e-5)
    assert torch.allclose(loss_fn(x, input_ids=ids), loss, atol=1e-6)


def test_clip_similarity_truncates_frozen_and_differentiable():
    model = tiny_clip()
    tok = tiny_tokenizer()
    loss_fn = CLIPSimilarityLoss(model, tok)
    long_caption = " ".join(["abcdefgh"] * 40)
    ids = loss_fn.tokenize([long_caption])
    assert ids.shape == (1, 77) and ids[0, 0] == tok.bos_token_id and ids[0, -1] == tok.eos_token_id
    x = images(1).requires_grad_(True)
    loss_fn.train()
    assert not loss_fn.model.training
    loss_fn(x, [long_caption]).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in model.parameters())
    with pytest.raises(LossInputError):
        CLIPSimilarityLoss(model)(x.detach(), ["no tokenizer"])


def test_lpips_trunk_from_a_torchvision_vgg16_state_dict_file(tmp_path):
    """--lpips-vgg: the offline way to LPIPS's ImageNet trunk; a whole-model or features-only dict."""
    import torchvision

    from training.frozen import FrozenNetworkError, build_lpips

    torch.manual_seed(0)
    features = torchvision.models.vgg16().features.state_dict()
    torch.save({f"features.{k}": v for k, v in features.items()}, tmp_path / "vgg16.pth")
    loss = build_lpips(False, torch.device("cpu"), str(tmp_path / "vgg16.pth"))
    assert torch.equal(loss.net.net.slice4.get_submodule("21").weight, features["21.weight"])
    torch.save(features, tmp_path / "features.pth")
    again = build_lpips(False, torch.device("cpu"), str(tmp_path / "features.pth"))
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(loss(x, y), again(x, y)) and (loss(x, y) > 0).all()
    torch.save({k: v for k, v in features.items() if not k.startswith("28.")}, tmp_path / "short.pth")
    with pytest.raises(FrozenNetworkError, match=r"--lpips-vgg .*short\.pth .*2 of the 26 trunk tensors"):
        build_lpips(False, torch.device("cpu"), str(tmp_path / "short.pth"))
