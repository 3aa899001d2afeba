"""Checkpoint files: damaged ones give one clear CheckpointError; released files keep their conventions."""

import pytest
import torch
from reference import RefPaired, RefUnpaired
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from turbo.app.models_folder import read_entry
from turbo.formats import CheckpointError, load_checkpoint, save_checkpoint
from turbo.registry import RELEASED


@pytest.fixture(scope="module")
def originals(tiny_base_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("originals")
    RefPaired(str(tiny_base_dir), seed=1).save_pkl(folder / "paired.pkl")
    RefUnpaired(str(tiny_base_dir), rank_unet=4, seed=2).save_pkl(folder / "unpaired.pkl")
    RefPaired(str(tiny_base_dir), twin=True, seed=3).save_pkl(folder / "stochastic.pkl")
    for name in ("paired", "stochastic"):
        save_checkpoint(load_checkpoint(folder / f"{name}.pkl"), folder / f"{name}.safetensors")
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


def _rewritten(source, tmp_path, **changes):
    """A copy of the safetensors file `source` with its metadata changed (None: the field removed)."""
    with safe_open(str(source), framework="pt") as f:
        meta = f.metadata()
    meta.update(changes)
    path = tmp_path / f"changed_{source.name}"
    save_file(load_file(str(source)), str(path), metadata={k: v for k, v in meta.items() if v is not None})
    return path


BAD_METADATA = [
    ("prompts", '"a cat"', "prompts"),
    ("prompts", '["a cat"]', "prompts"),
    ("prompts", "null", "prompts"),
    ("prompts", '{"a2b": 1}', "prompts"),
    ("prompts", '{"a2b": null}', "prompts"),
    ("prompts", '{"sideways": "a cat"}', "prompts"),
    ("prompts", "{not json", "prompts"),
    ("prompts", "[" * 100_000, "prompts"),  # deep enough to overflow the JSON parser's stack
    ("format_version", "abc", "format_version"),
    ("format_version", " 1", "format_version"),
    ("format_version", "0", "format_version"),
    ("format_version", "2", "newer than this turbo"),
    ("format_version", None, "format_version"),
    ("stochastic", "TRUE", "stochastic"),
    ("stochastic", "1", "stochastic"),
    ("stochastic", None, "stochastic"),
    ("rank_unet", "abc", "rank_unet"),
    ("rank_unet", "8.0", "rank_unet"),
    ("rank_unet", "-8", "rank_unet"),
    ("rank_unet", "0", "rank_unet"),
    ("rank_unet", "9" * 5000, "rank_unet"),  # past int()'s digit limit
    ("rank_vae", "abc", "rank_vae"),
    ("alpha_unet", "abc", "alpha_unet"),
    ("alpha_unet", "nan", "alpha_unet"),
    ("alpha_vae", "-8.0", "alpha_vae"),
    ("alpha_vae", "inf", "alpha_vae"),
    ("kind", "PAIRED", "kind"),
    ("kind", None, "kind"),
    ("preprocess", "edges", "preprocess"),
    ("image_prep", "bogus", "image_prep"),
]


@pytest.mark.parametrize(("field", "value", "message"), BAD_METADATA)
def test_metadata_the_writer_never_writes_is_a_checkpoint_error_naming_file_and_field(
    originals, tmp_path, field, value, message
):
    path = _rewritten(originals / "paired.safetensors", tmp_path, **{field: value})
    with pytest.raises(CheckpointError, match=message) as err:
        load_checkpoint(path)
    assert str(err.value).startswith(f"{path}: ") and len(str(err.value)) < 300


def test_a_file_from_before_the_rename_reads_its_input_key_as_preprocess(originals, tmp_path):
    """Files written before one name per concept call the input preparation "input"."""
    path = _rewritten(originals / "paired.safetensors", tmp_path, preprocess=None, input="sketch")
    assert load_checkpoint(path).preprocess == "sketch"
    with safe_open(str(originals / "paired.safetensors"), framework="pt") as f:
        assert "preprocess" in f.metadata() and "input" not in f.metadata()


def test_what_the_writer_writes_reads_back(originals):
    ckpt = load_checkpoint(originals / "stochastic.safetensors")
    assert (ckpt.kind, ckpt.stochastic, ckpt.rank_unet, ckpt.rank_vae) == ("paired", True, 8, 4)
    assert (ckpt.alpha_unet, ckpt.alpha_vae, ckpt.prompts) == (8.0, 8.0, {})


def test_a_twin_first_conv_in_a_model_marked_deterministic_is_refused(originals, tmp_path):
    path = _rewritten(originals / "stochastic.safetensors", tmp_path, stochastic="false")
    with pytest.raises(CheckpointError, match="not stochastic"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    ("field", "value"), [("rank_vae", "100000000"), ("rank_unet", "100000000"), ("rank_vae", "5")]
)
def test_ranks_must_match_the_lora_tensors_before_anything_is_built(originals, tmp_path, field, value):
    """A huge stated rank would have peft allocate layers of that rank (GBs) before the weight copy
    found the mismatch: the reader compares it with the tensors' shapes."""
    path = _rewritten(originals / "paired.safetensors", tmp_path, **{field: value})
    with pytest.raises(CheckpointError, match=f"does not fit {field} = {value}"):
        load_checkpoint(path)
    pkl = _damaged(originals, tmp_path, "paired.pkl", **{field: int(value)})
    with pytest.raises(CheckpointError, match=f"does not fit {field} = {value}"):
        load_checkpoint(pkl)


def test_the_models_folder_lists_a_file_with_bad_prompts_as_unusable(originals, tmp_path):
    for prompts in ('"a cat"', '["a cat"]', '{"a2b": 1}'):
        path = _rewritten(originals / "paired.safetensors", tmp_path, prompts=prompts)
        entry = read_entry(path, (1, 2))
        assert (entry.status, entry.version) == ("unusable", (1, 2))
        assert entry.reason.startswith("metadata prompts must be a JSON object"), entry.reason
    good = read_entry(originals / "paired.safetensors", (1, 2))
    assert (good.status, good.prompts, good.directions) == ("ok", {}, ["a2b"])


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
    assert (ckpt.preprocess, ckpt.image_prep) == (released.preprocess, released.image_prep)
    if released.kind == "paired":
        assert plain.preprocess == "none" and ckpt.prompts == {}
    else:
        assert ckpt.prompts == {released.direction: released.caption} and plain.prompts == {}


def test_saved_files_get_the_permissions_of_a_plain_write(originals, tmp_path):
    """Not mkstemp's private 0o600: a training checkpoint or a model published to an app's folder
    must be readable as any file the user writes (0o666 less the umask; a replaced file keeps its own)."""
    import os
    import stat

    ckpt = load_checkpoint(originals / "paired.safetensors")
    old_umask = os.umask(0o022)
    try:
        fresh = save_checkpoint(ckpt, tmp_path / "fresh.safetensors")
        kept = save_checkpoint(ckpt, tmp_path / "kept.safetensors")
        kept.chmod(0o640)
        save_checkpoint(ckpt, kept)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o644
    assert stat.S_IMODE(kept.stat().st_mode) == 0o640
    assert load_checkpoint(kept).kind == "paired"


def test_the_checked_label_tuples_are_the_literal_types_values():
    """One source: the tuples validate() checks against are read off the Literal types."""
    from typing import get_args

    from turbo.formats import DIRECTIONS, KINDS, PREPROCESSES
    from turbo.formats.checkpoint import Direction, Kind, Preprocess, is_direction
    from turbo.preprocess import PREPROCESSES as IN_PREPROCESS

    assert KINDS == get_args(Kind) == ("paired", "unpaired")
    assert DIRECTIONS == get_args(Direction) == ("a2b", "b2a")
    assert PREPROCESSES is IN_PREPROCESS
    assert PREPROCESSES == get_args(Preprocess) == ("canny", "sketch", "none", "unpaired")
    assert [is_direction(d) for d in ("a2b", "b2a", "A2B", None)] == [True, True, False, False]
