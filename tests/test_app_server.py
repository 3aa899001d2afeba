"""The launched app (tiny base, 127.0.0.1) driven through gradio_client: every endpoint, direction
switching, hot-loading of checkpoints dropped into the models folder, broken files reported."""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time

import numpy as np
import pytest
from gradio_client import Client, handle_file
from gradio_client.utils import Status
from PIL import Image
from test_app_handlers import checkpoint_files, photo, sketch_image

from turbo.app import handlers
from turbo.app import page as app_module


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_base_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("served") / "checkpoints"
    folder.mkdir()
    files = checkpoint_files(str(tiny_base_dir))
    for name in ("sketch", "unpaired"):
        shutil.copy(files[name], folder)
        os.utime(folder / files[name].name, (time.time() - 60, time.time() - 60))
    port = free_port()
    args = app_module.build_parser().parse_args(
        ["--base", str(tiny_base_dir), "--models-dir", str(folder), "--device", "cpu", "--port", str(port),
         "--model", "sketch.safetensors", "--settle-seconds", "0.5", "--rescan-seconds", "1",
         "--max-side", "128"]
    )  # fmt: skip
    demo = app_module.build_demo(args)
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    client = Client(f"http://127.0.0.1:{port}/", verbose=False)
    yield demo, client, folder
    client.close()
    demo.close()


def value(update):
    """gradio_client hands back component updates as dicts; their "value", else the plain value."""
    return update.get("value") if isinstance(update, dict) and update.get("__type__") == "update" else update


def editor(path) -> dict:
    return {"background": None, "layers": [], "composite": handle_file(str(path)), "id": None}


def test_server_binds_loopback_and_exposes_the_endpoints(server):
    demo, client, _ = server
    assert demo.server_name == "127.0.0.1"
    names = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    expected = {
        "/translate_sketch",
        "/translate_upload",
        "/translate",
        "/set_model",
        "/refresh",
        "/random_seed",
    }
    assert expected | {"/upload_checkpoint"} <= names


def test_sketch_upload_and_live_rerun_through_the_client(server, tmp_path):
    _, client, _ = server
    prompt, style, gamma, *_, text = client.predict(
        "sketch.safetensors", "", None, None, api_name="/set_model"
    )
    assert value(prompt) == "a cat" and value(gamma) == 0.4 and "stochastic" in text
    png = tmp_path / "sketch.png"
    sketch_image().save(png)
    out, condition, download, status = client.predict(
        "sketch.safetensors",
        editor(png),
        None,
        "a dog",
        "Anime",
        0.4,
        42,
        100,
        200,
        api_name="/translate_sketch",
    )
    first = np.asarray(Image.open(out).convert("RGB"))
    assert first.shape == (64, 64, 3) and "Done in" in status and "Gamma 0.40" in status
    assert np.array_equal(np.asarray(Image.open(download).convert("RGB")), first)
    # the seed and gamma re-runs (api "/translate") use the input the session last used
    seed = client.predict(api_name="/random_seed")
    assert isinstance(seed, int | float)
    out2, *_, status2 = client.predict(
        "sketch.safetensors", editor(png), None, "a dog", "Anime", 0.8, 7, 100, 200, api_name="/translate"
    )
    assert "Gamma 0.80, seed 7" in status2
    assert not np.array_equal(np.asarray(Image.open(out2).convert("RGB")), first)


def test_typed_gamma_and_seed_get_the_apps_own_messages(server, tmp_path):
    _, client, _ = server
    png = tmp_path / "sketch.png"
    sketch_image().save(png)

    def status(gamma, seed):
        return client.predict(
            "sketch.safetensors", editor(png), None, "a dog", "Anime", gamma, seed, 100, 200,
            api_name="/translate_sketch",
        )[3]  # fmt: skip

    assert "Gamma 0.40, seed 7" in status(None, 7)  # an emptied box: the model's default
    assert status(5, 7) == "**Error:** gamma must be a number from 0 to 1, got 5"
    assert status(0.5, 99999999999) == (
        "**Error:** the seed must be a whole number from 0 to 4294967295, got 99999999999"
    )


def test_direction_switching_and_bad_uploads(server, tmp_path):
    _, client, _ = server
    pic = tmp_path / "pic.png"
    photo().save(pic)
    results = {}
    for label in ("unpaired.safetensors (a2b)", "unpaired.safetensors (b2a)", "unpaired.safetensors (a2b)"):
        prompt = value(client.predict(label, "", None, None, api_name="/set_model")[0])
        out, _, _, status = client.predict(
            label,
            None,
            handle_file(str(pic)),
            prompt,
            "(no style)",
            0.4,
            42,
            100,
            200,
            api_name="/translate_upload",
        )
        assert "Done in" in status, status
        results.setdefault(label, []).append(np.asarray(Image.open(out).convert("RGB")))
    a2b, b2a = results["unpaired.safetensors (a2b)"], results["unpaired.safetensors (b2a)"]
    assert np.array_equal(a2b[0], a2b[1]) and not np.array_equal(a2b[0], b2a[0])
    junk = tmp_path / "notes.png"
    junk.write_text("this is text")
    out, _, _, status = client.predict(
        "unpaired.safetensors (a2b)", None, handle_file(str(junk)), "", "(no style)", 0.4, 42, 100, 200,
        api_name="/translate_upload",
    )  # fmt: skip
    assert out is None and "not an image file" in status
    big = tmp_path / "big.png"
    photo((400, 200)).save(big)
    out, _, _, status = client.predict(
        "unpaired.safetensors (b2a)", None, handle_file(str(big)), "", "(no style)", 0.4, 42, 100, 200,
        api_name="/translate_upload",
    )  # fmt: skip
    assert Image.open(out).size == (128, 64) and "downscaled from 400x200" in status
    *_, status = client.predict(
        "night_to_day",
        None,
        handle_file(str(pic)),
        "",
        "(no style)",
        0.4,
        42,
        100,
        200,
        api_name="/translate_upload",
    )
    assert "cannot download" in status


def test_hot_loading_a_dropped_checkpoint_and_a_broken_file(server, tiny_base_dir, tmp_path):
    demo, client, folder = server
    data = checkpoint_files(str(tiny_base_dir))["edges"].read_bytes()
    target = folder / "dropped.safetensors"
    with open(target, "wb") as f:  # copied slowly: half now, the rest later
        f.write(data[: len(data) // 2])
        f.flush()
        _, text = client.predict("sketch.safetensors", api_name="/refresh")
        assert "- `dropped.safetensors`: still being written" in text
        f.write(data[len(data) // 2 :])
    (folder / "broken.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00garbage!")
    deadline = time.time() + 20
    while time.time() < deadline:
        _, text = client.predict("sketch.safetensors", api_name="/refresh")
        if "`dropped.safetensors`: ready" in text and "`broken.safetensors`: **unusable**" in text:
            break
        time.sleep(0.3)
    assert "- `dropped.safetensors`: ready" in text, text
    assert "- `broken.safetensors`: **unusable**: not a readable safetensors file" in text
    pic = tmp_path / "pic.png"
    photo().save(pic)
    out, condition, _, status = client.predict(
        "dropped.safetensors", None, handle_file(str(pic)), "a barn", "Photographic", 0.4, 42, 100, 200,
        api_name="/translate_upload",
    )  # fmt: skip
    assert "Done in" in status and Image.open(out).size == (64, 48) and condition is not None
    *_, status = client.predict(
        "broken.safetensors", None, handle_file(str(pic)), "x", "(no style)", 0.4, 42, 100, 200,
        api_name="/translate_upload",
    )  # fmt: skip
    assert "no model called" in status
    target.unlink()
    _, text = client.predict("dropped.safetensors", api_name="/refresh")
    assert "dropped.safetensors" not in text.split("\n\n")[0] and "no longer in the models folder" in text


def test_uploading_a_checkpoint_through_the_ui(server, tiny_base_dir, tmp_path):
    _, client, folder = server
    src = tmp_path / "my model.safetensors"
    shutil.copy(checkpoint_files(str(tiny_base_dir))["edges"], src)
    model, text, status = client.predict(
        handle_file(str(src)), "sketch.safetensors", api_name="/upload_checkpoint"
    )
    assert value(model) == "my_model.safetensors" and (folder / "my_model.safetensors").is_file()
    assert "Added" in status and "- `my_model.safetensors`: ready" in text
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(b"not a checkpoint")
    _, text, status = client.predict(
        handle_file(str(bad)), "sketch.safetensors", api_name="/upload_checkpoint"
    )
    assert "not a usable checkpoint" in status and not (folder / "bad.pkl").exists()


@pytest.fixture(scope="module")
def hub_server(tiny_base_dir, tmp_path_factory):
    """The app with TURBO_MODELS=me/sketch,me/absent over an offline Hub cache, and the sketch model's
    local file in its models folder."""
    from test_app_handlers import hub_models_cache

    root = tmp_path_factory.mktemp("hub_app")
    cache = hub_models_cache(root / "hub", str(tiny_base_dir))
    folder = root / "checkpoints"
    folder.mkdir()
    shutil.copy(checkpoint_files(str(tiny_base_dir))["sketch"], folder / "local.safetensors")
    os.utime(folder / "local.safetensors", (time.time() - 60, time.time() - 60))
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "TURBO_MODELS": "me/sketch,me/absent"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    port = free_port()
    args = app_module.build_parser().parse_args(
        ["--base", str(tiny_base_dir), "--models-dir", str(folder), "--device", "cpu", "--port", str(port),
         "--max-side", "128"]
    )  # fmt: skip
    demo = app_module.build_demo(args)
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    client = Client(f"http://127.0.0.1:{port}/", verbose=False)
    yield demo, client
    client.close()
    demo.close()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def test_hub_models_from_turbo_models_and_the_add_box_through_the_client(hub_server, tmp_path):
    _, client = hub_server
    choices = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert "/add_from_hub" in choices
    png = tmp_path / "sketch.png"
    sketch_image().save(png)
    prompt, *_, text = client.predict("me/sketch", "", None, None, api_name="/set_model")
    assert value(prompt) == "a cat" and "from the Hugging Face Hub" in text
    images = []
    for label in ("me/sketch", "local.safetensors"):
        out, _, _, status = client.predict(
            label, editor(png), None, "a dog", "Anime", 0.4, 42, 100, 200, api_name="/translate_sketch"
        )
        assert "Done in" in status, status
        images.append(np.asarray(Image.open(out).convert("RGB")))
    assert np.array_equal(images[0], images[1])
    *_, status = client.predict(
        "me/absent", editor(png), None, "a dog", "Anime", 0.4, 42, 100, 200, api_name="/translate_sketch"
    )
    assert "me/absent is not in the Hugging Face cache" in status
    # the add box: checked, loaded, selected; a translation with it
    model, status = client.predict("me/cycle", api_name="/add_from_hub")
    assert value(model) == "me/cycle" and "Added `me/cycle`, `me/cycle (b2a)` from the Hub" in status
    pic = tmp_path / "pic.png"
    photo().save(pic)
    out, _, _, status = client.predict(
        "me/cycle (b2a)", None, handle_file(str(pic)), "day", "(no style)", 0.4, 42, 100, 200,
        api_name="/translate_upload",
    )  # fmt: skip
    assert "Done in" in status and Image.open(out).size == (64, 48)
    _, status = client.predict("me/docs", api_name="/add_from_hub")
    assert "not added: me/docs holds no turbo checkpoint" in status


def test_a_hub_download_never_holds_up_translations(hub_server, tmp_path, monkeypatch):
    """While the add box waits on a download that does not finish, another user's translation runs."""
    import threading

    from turbo import model_source

    _, client = hub_server
    started, release = threading.Event(), threading.Event()
    real = model_source.hub_file

    def slow(hub):
        started.set()
        assert release.wait(60)
        return real(hub)

    monkeypatch.setattr(model_source, "hub_file", slow)
    png = tmp_path / "sketch.png"
    sketch_image().save(png)
    pending = client.submit("me/edges", api_name="/add_from_hub")
    assert started.wait(30)
    try:
        other = Client(client.src, verbose=False)  # another user
        *_, status = other.predict(
            "local.safetensors", editor(png), None, "a dog", "Anime", 0.4, 42, 100, 200,
            api_name="/translate_sketch",
        )  # fmt: skip
        assert "Done in" in status and not pending.done()
    finally:
        release.set()
    model, status = pending.result(timeout=60)
    assert value(model) == "me/edges" and "Added `me/edges`" in status
    other.close()


def test_a_queued_request_is_told_its_place_and_the_expected_wait(server, tmp_path, monkeypatch):
    """What the page shows over a waiting request ("queue: 2/2 | 1.2/3.4s") comes from these
    estimation messages: one translation at a time, so the others wait, each told its place (rank,
    0 = next) and, once a request has run, the expected wait in seconds."""
    _, client, _ = server
    pic = tmp_path / "pic.png"
    photo().save(pic)
    gate = threading.Event()
    translate = handlers.gpu_translate

    def held(*args, **kwargs):
        gate.wait(60)
        return translate(*args, **kwargs)

    monkeypatch.setattr(handlers, "gpu_translate", held)

    def args(k: int) -> tuple:  # outputs that differ: gradio's file cache is keyed by content
        return ("unpaired.safetensors (a2b)", None, handle_file(str(pic)), f"night {k}", "(no style)", 0.4,
                42, 100, 200)  # fmt: skip

    def waiting(jobs, until):
        """The statuses of the jobs still queued, polled until `until` holds of them (or 60 s)."""
        deadline = time.time() + 60
        while time.time() < deadline:
            queued = [s for s in (job.status() for job in jobs) if s.code == Status.IN_QUEUE]
            if until(queued):
                return queued
            time.sleep(0.1)
        return queued

    for round_ in range(2):
        gate.clear()
        jobs = []
        try:
            jobs = [client.submit(*args(3 * round_ + k), api_name="/translate_upload") for k in range(3)]
            if round_ == 0:  # two wait behind the one running
                queued = waiting(jobs, lambda q: sorted(s.rank for s in q) == [0, 1])
                assert sorted(s.rank for s in queued) == [0, 1], queued
            else:  # the first round's times give an estimate
                queued = waiting(jobs, lambda q: any(s.eta is not None for s in q))
                assert any(s.eta is not None and s.eta >= 0 for s in queued), queued
        finally:
            gate.set()
        assert all("Done in" in job.result()[3] for job in jobs)
