"""What a model string names (local file > released name > Hub id), and Hub files read from a cache
laid out as huggingface_hub lays it out, offline; every bad id and Hub error gives one clear line."""

from __future__ import annotations

import httpx2
import pytest
import torch
from hub_cache import add_to_hub_cache
from huggingface_hub import errors
from reference import RefPaired
from test_app_handlers import checkpoint_files

from turbo import model_source
from turbo.formats import load_checkpoint
from turbo.model_source import HubModel, HubModelError, ModelNameError, model_file, parse_model
from turbo.pipeline import Pipeline


@pytest.fixture(scope="module")
def ckpts(tiny_base_dir, tmp_path_factory):
    files = checkpoint_files(str(tiny_base_dir))
    pkl = tmp_path_factory.mktemp("pkl") / "my_sketch.pkl"
    RefPaired(str(tiny_base_dir), twin=True, seed=5).save_pkl(pkl)
    return {**files, "pkl": pkl}


@pytest.fixture
def hub(tmp_path, monkeypatch, ckpts):
    """An offline Hub cache: me/sketch (one checkpoint, tag v1), me/several (two), me/docs (none),
    me/orig (an original .pkl)."""
    root = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(model_source, "_fetched", {})
    snaps = {
        "sketch": add_to_hub_cache(
            root,
            "me/sketch",
            {"model.safetensors": ckpts["sketch"], "README.md": b"# a card"},
            ("main", "v1"),
        ),
        "several": add_to_hub_cache(
            root, "me/several", {"a.safetensors": ckpts["sketch"], "b.safetensors": ckpts["unpaired"]}
        ),
        "docs": add_to_hub_cache(root, "me/docs", {"README.md": b"# nothing", "model_index.json": b"{}"}),
        "orig": add_to_hub_cache(root, "me/orig", {"my_sketch.pkl": ckpts["pkl"]}),
    }
    return root, snaps


def same_tensors(a, b) -> bool:
    flat = [
        {"unet." + k: v for k, v in c.unet.items()}
        | {f"vae.{d}.{k}": v for d, sd in c.vae.items() for k, v in sd.items()}
        for c in (a, b)
    ]
    sa, sb = flat
    return len(sa) > 0 and sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---- what a string names ----
def test_resolution_order_local_file_then_released_then_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert parse_model("edge_to_image").kind == "released"
    (tmp_path / "edge_to_image").write_bytes(b"x")  # a local file wins over a released name
    source = parse_model("edge_to_image")
    assert source.kind == "file" and source.key == str(tmp_path / "edge_to_image")
    assert parse_model("owner/repo").hub == HubModel("owner/repo")
    (tmp_path / "owner").mkdir()
    (tmp_path / "owner" / "repo").write_bytes(b"x")  # ... and over a Hub id
    assert parse_model("owner/repo").kind == "file"
    assert parse_model("owner/repo2").kind == "hub"


def test_hub_id_forms():
    cases = {
        "me/x": HubModel("me/x"),
        "me/x/model.safetensors": HubModel("me/x", "model.safetensors"),
        "me/x/edge_to_image_loras.pkl": HubModel("me/x", "edge_to_image_loras.pkl"),
        "me/x@v1": HubModel("me/x", None, "v1"),
        "Me-2/x.y_z@0123abc/m.safetensors": HubModel("Me-2/x.y_z", "m.safetensors", "0123abc"),
    }
    for text, want in cases.items():
        source = parse_model(text)
        assert source.kind == "hub" and source.hub == want, text
        assert source.key == text  # HubModel writes the id back as given
    assert HubModel("me/x").url == "https://huggingface.co/me/x"


def test_every_bad_name_says_what_it_was_taken_for(tmp_path):
    (tmp_path / "folder").mkdir()
    hub = "Hub ids read owner/repo, owner/repo/FILE.safetensors (or .pkl), owner/repo@REVISION"
    cases = {
        "": "empty model name: give a released model (edge_to_image, ",
        "   ": "empty model name",
        "edge_to_picasso": "unknown model 'edge_to_picasso' (taken for a released name): released models are "
        "edge_to_image, sketch_to_image_stochastic, day_to_night",
        "edge to image": "unknown model 'edge to image' (taken for a released name)",
        "missing.pkl": "no such checkpoint file: missing.pkl (taken for a local file, as it ends in a "
        "checkpoint suffix)",
        "runs/model.safetensors": "no such checkpoint file: runs/model.safetensors (taken for a local file",
        str(tmp_path / "nope.safetensors"): f"no such checkpoint file: {tmp_path / 'nope.safetensors'} "
        "(taken for a local file, as it starts like a path)",
        "./x/y/z": "(taken for a local file, as it starts like a path)",
        str(tmp_path / "folder"): f"{tmp_path / 'folder'} is a folder: give the checkpoint file in it",
        "a/b/c/d": f"'a/b/c/d' is no existing file and not a valid Hub id (taken for a Hub id: it has 4 "
        f"parts, at most 3 (owner/repo/FILE)); {hub}",
        "me/my repo": "(taken for a Hub id: it contains spaces)",
        "me/-x": "(taken for a Hub id: repo name '-x' must be 1-96 letters",
        "me/a--b": "repo name 'a--b' must be",
        "/x": "taken for a local file",
        "me/": "(taken for a Hub id: repo name '' must be",
        "me/x/notes.txt": "(taken for a Hub id: the file 'notes.txt' must end in .safetensors or .pkl)",
        "me/x@": "(taken for a Hub id: revision '' after @ must be a branch, tag or commit)",
    }
    for text, message in cases.items():
        with pytest.raises(ModelNameError) as info:
            parse_model(text)
        assert message in str(info.value), (text, str(info.value))
        assert "\n" not in str(info.value)
    with pytest.raises(ModelNameError, match="unknown model"):  # the pipeline checks the same way
        Pipeline.resolve("edge_to_picasso")


# ---- offline, from the cache ----
def test_hub_files_come_from_the_cache_with_the_same_tensors(hub, ckpts):
    _, snaps = hub
    local = load_checkpoint(ckpts["sketch"])
    for text in (
        "me/sketch",
        "me/sketch@v1",
        "me/sketch/model.safetensors",
        f"me/sketch@{snaps['sketch'].name}",
    ):
        path = model_file(text)
        assert path == snaps["sketch"] / "model.safetensors", text
        assert same_tensors(load_checkpoint(path), local)
    several = model_file("me/several/b.safetensors")
    assert same_tensors(load_checkpoint(several), load_checkpoint(ckpts["unpaired"]))
    # an original .pkl in a repo loads (weights_only) like the same local file
    assert same_tensors(load_checkpoint(model_file("me/orig")), load_checkpoint(ckpts["pkl"]))


def test_hub_errors_offline(hub):
    cases = {
        "me/several": "me/several holds several checkpoints (a.safetensors, b.safetensors): name one, e.g. "
        "me/several/a.safetensors",
        "me/several@main": "name one, e.g. me/several@main/a.safetensors",
        "me/docs": "me/docs holds no turbo checkpoint (a .safetensors or .pkl file at its top level) (a "
        "diffusers model, not a turbo one); it has README.md, model_index.json",
        "me/absent": "me/absent is not in the Hugging Face cache (",
        "me/sketch@v2": "me/sketch@v2 is not in the Hugging Face cache",
        "me/sketch/other.safetensors": "me/sketch/other.safetensors is not in the Hugging Face cache",
    }
    for text, message in cases.items():
        with pytest.raises(HubModelError) as info:
            model_file(text)
        assert message in str(info.value), (text, str(info.value))
        assert "\n" not in str(info.value)
    with pytest.raises(HubModelError) as info:
        model_file("me/absent")
    root, _ = hub
    assert str(info.value) == (
        f"me/absent is not in the Hugging Face cache ({root}) and HF_HUB_OFFLINE is set: download it once "
        "with network (`hf download me/absent`), or unset HF_HUB_OFFLINE"
    )


def test_a_hub_id_is_fetched_once_per_process(hub, monkeypatch):
    calls = []
    real = model_source.hub_file
    monkeypatch.setattr(model_source, "hub_file", lambda h: calls.append(h) or real(h))
    assert model_file("me/sketch") == model_file("me/sketch")
    assert calls == [HubModel("me/sketch")]


# ---- online errors, from a recorder standing in for the Hub ----
def _response(status: int) -> httpx2.Response:
    return httpx2.Response(status, request=httpx2.Request("GET", "https://huggingface.co/api/models/me/x"))


@pytest.fixture
def online(hub, monkeypatch):
    """huggingface_hub's network calls replaced: `answers` says what each raises or returns."""
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TURBO_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(model_source.hh, "get_token", lambda: None)
    answers, calls = {}, []

    def answer(name, *args, **kw):
        calls.append((name, args, kw))
        result = answers[name]
        if isinstance(result, Exception):
            raise result
        return result

    monkeypatch.setattr(
        model_source.hh.HfApi, "list_repo_files", lambda self, *a, **k: answer("list", *a, **k)
    )
    monkeypatch.setattr(model_source.hh, "hf_hub_download", lambda *a, **k: answer("download", *a, **k))
    return answers, calls


def test_hub_errors_online(online, tmp_path, monkeypatch):
    answers, calls = online
    cases = [
        (
            {"list": errors.RepositoryNotFoundError("404", response=_response(404))},
            "me/x",
            "Hub repo me/x not found: check the name; if it is private, set HF_TOKEN (or run "
            "`hf auth login`)",
        ),
        (
            {"list": ["m.safetensors"], "download": errors.GatedRepoError("403", response=_response(403))},
            "me/x",
            "me/x is a gated repo: accept its conditions at https://huggingface.co/me/x with your account "
            "and set HF_TOKEN (or run `hf auth login`)",
        ),
        (
            {"list": errors.RevisionNotFoundError("404", response=_response(404))},
            "me/x@v9",
            "me/x has no revision 'v9' (a branch, tag or commit)",
        ),
        (
            {
                "list": ["a.safetensors", "b.pkl", "README.md"],
                "download": errors.RemoteEntryNotFoundError("404", response=_response(404)),
            },  # fmt: skip
            "me/x/c.safetensors",
            "me/x has no file 'c.safetensors': its checkpoints are a.safetensors, b.pkl",
        ),
        (
            {"download": errors.RepositoryNotFoundError("404", response=_response(404))},
            "me/x/c.safetensors",
            "Hub repo me/x not found (or a local file: none exists at that path): check the name",
        ),
        (
            {"list": httpx2.ConnectError("no route")},  # then the cache is read: me/x is not in it
            "me/x",
            "cannot reach the Hugging Face Hub for me/x and it is not in the cache (",
        ),
        (
            {"list": ["m.safetensors"], "download": errors.LocalEntryNotFoundError("connection")},
            "me/x",
            "cannot reach the Hugging Face Hub for me/x/m.safetensors and it is not in the cache (",
        ),
        (
            {
                "list": ["m.safetensors"],
                "download": errors.HfHubHTTPError("500 Server Error", response=_response(500)),
            },
            "me/x",
            "cannot get me/x/m.safetensors from the Hugging Face Hub: HfHubHTTPError: 500 Server Error",
        ),
        (
            {"list": [f"m{i}.pkl" for i in range(10)]},
            "me/x",
            "me/x holds several checkpoints (m0.pkl, m1.pkl, m2.pkl, m3.pkl, m4.pkl, m5.pkl, m6.pkl, m7.pkl, "
            "... (2 more)): name one",
        ),
    ]
    for answer, text, message in cases:
        answers.clear()
        answers.update(answer)
        with pytest.raises(HubModelError) as info:
            model_file(text)
        assert message in str(info.value), (text, str(info.value))
        assert "\n" not in str(info.value)
    # a bug is not passed off as a Hub problem: it keeps its traceback
    answers.update(list=["m.safetensors"], download=TypeError("a bug"))
    with pytest.raises(TypeError, match="a bug"):
        model_file("me/x")
    # with a token, a private repo's message says so instead; a gated one, that the token lacks access
    monkeypatch.setattr(model_source.hh, "get_token", lambda: "hf_x")
    answers.update(list=errors.RepositoryNotFoundError("401", response=_response(401)))
    with pytest.raises(HubModelError, match="not found: check the name; or your token cannot read it"):
        model_file("me/x")
    answers.update(list=["m.safetensors"], download=errors.GatedRepoError("403", response=_response(403)))
    with pytest.raises(HubModelError, match="; your token has no access to it yet"):
        model_file("me/x")


def test_online_download_goes_through_hf_hub_download(online, ckpts):
    answers, calls = online
    answers.update(list=["README.md", "model.safetensors", "sub/x.safetensors"], download=str(ckpts["edges"]))
    assert model_file("me/x@v1") == ckpts["edges"]
    (_, list_args, list_kw), (_, args, kw) = calls
    assert list_args == ("me/x",) and list_kw == {"revision": "v1"}
    assert args == ("me/x", "model.safetensors")
    assert kw["revision"] == "v1" and kw["local_files_only"] is False and kw["cache_dir"].endswith("hub")
