"""Checkpoint files: damaged ones give one clear CheckpointError; released files keep their conventions."""

import pytest
import torch
from reference import RefPaired, RefUnpaired

from turbo.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from turbo.registry import RELEASED


@pytest.fixture(scope="module")
def originals(tiny_base_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("originals")
    RefPaired(str(tiny_base_dir), seed=1).save_pkl(folder / "paired.pkl")
    RefUnpaired(str(tiny_base_dir), rank_unet=4, seed=2).save_pkl(folder / "unpaired.pkl")
    return folder


def _damaged(originals, tmp_path, name, **changes):
    sd = torch.load(originals / name, weights_only=True)
    sd.update(changes)
    path = tmp_path / f"damaged_{name}"
    torch.save(sd, path)
    return path


def test_damaged_files_give_a_checkpoint_error_naming_the_file(originals, tmp_path):
    (tmp_path / "empty.pkl").write_bytes(b"")
    (tmp_path / "text.pkl").write_bytes(b"these are not the weights you are looking for")
    cases = {
        tmp_path / "empty.pkl": "not a readable checkpoint",
        tmp_path / "text.pkl": "not a readable checkpoint",  # not mistaken for a safetensors file
        _damaged(originals, tmp_path, "paired.pkl", state_dict_unet=[1, 2]): "damaged paired",
        _damaged(originals, tmp_path, "paired.pkl", rank_unet="abc"): "damaged paired",
        _damaged(originals, tmp_path, "unpaired.pkl", sd_vae_enc=None): "damaged unpaired",
    }
    for path, message in cases.items():
        with pytest.raises(CheckpointError, match=message) as err:
            load_checkpoint(path)
        assert str(path) in str(err.value)


def test_image_prep_must_be_a_known_deterministic_one(originals, tmp_path):
    ckpt = load_checkpoint(originals / "unpaired.pkl")
    assert ckpt.image_prep == "resize_512x512"  # the original unpaired CLI's default
    for bad in ("bogus", "resize_286_randomcrop_256x256_hflip"):
        ckpt.image_prep = bad
        with pytest.raises(CheckpointError, match="image_prep must be one of"):
            save_checkpoint(ckpt, tmp_path / "bad.safetensors")
    assert not (tmp_path / "bad.safetensors").exists()


@pytest.mark.parametrize("name", list(RELEASED))
def test_released_files_get_what_the_original_hard_codes_for_them(originals, tmp_path, name):
    released = RELEASED[name]
    source = originals / ("paired.pkl" if released.kind == "paired" else "unpaired.pkl")
    (tmp_path / released.filename).write_bytes(source.read_bytes())
    ckpt = load_checkpoint(tmp_path / released.filename)
    plain = load_checkpoint(source)
    assert (ckpt.input, ckpt.image_prep) == (released.preprocess, released.image_prep)
    if released.kind == "paired":
        assert plain.input == "none" and ckpt.prompts == {}
    else:
        assert ckpt.prompts == {released.direction: released.caption} and plain.prompts == {}
