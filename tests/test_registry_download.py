import os
import socket
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import turbo.download as download_module
from turbo.download import DownloadError, default_cache_dir, download
from turbo.registry import (
    DEFAULT_STYLE,
    RELEASED,
    STYLES,
    UnknownModelError,
    checkpoint_path,
    get_released,
    styled_prompt,
)

PAYLOAD = bytes(range(256)) * 9000  # about 2.3 MB: several read chunks


class _Handler(BaseHTTPRequestHandler):
    hits: list[str] = []

    def do_GET(self):  # noqa: N802 - the name http.server calls
        self.hits.append(self.path)
        if self.path == "/model.pkl":
            self.send_response(200)
            self.send_header("Content-Length", str(len(PAYLOAD)))
            self.end_headers()
            self.wfile.write(PAYLOAD)
        elif self.path == "/short.pkl":
            # Announces the whole payload, sends a part, closes the connection.
            self.send_response(200)
            self.send_header("Content-Length", str(len(PAYLOAD)))
            self.end_headers()
            self.wfile.write(PAYLOAD[:1000])
            self.wfile.flush()
            self.close_connection = True
        elif self.path == "/slow.pkl":
            time.sleep(1.5)
            self.send_response(200)
            self.end_headers()
        else:
            self.send_error(404, "Not Found")

    def log_message(self, *args):
        pass


@pytest.fixture
def server(monkeypatch):
    # Loopback only, and no proxy may intercept it.
    monkeypatch.setenv("no_proxy", "*")
    monkeypatch.setenv("NO_PROXY", "*")
    for name in ("TURBO_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    _Handler.hits = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the network was touched")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)


def test_download_is_atomic_and_complete(server, tmp_path, monkeypatch):
    renames = []
    real_replace = os.replace

    def record(src, dst):
        renames.append((Path(src), Path(dst), Path(dst).exists()))
        real_replace(src, dst)

    monkeypatch.setattr(download_module.os, "replace", record)
    dest = tmp_path / "cache" / "model.pkl"
    assert download(f"{server}/model.pkl", dest, progress=False) == dest
    assert dest.read_bytes() == PAYLOAD
    assert len(renames) == 1
    src, dst, existed = renames[0]
    assert src.parent == dest.parent and src.name.endswith(".part") and dst == dest and not existed
    assert sorted(p.name for p in dest.parent.iterdir()) == ["model.pkl"]


def test_existing_file_is_not_downloaded_again(server, tmp_path):
    dest = tmp_path / "model.pkl"
    dest.write_bytes(b"already here")
    assert download(f"{server}/model.pkl", dest, progress=False) == dest
    assert dest.read_bytes() == b"already here"
    assert _Handler.hits == []


def test_short_download_leaves_nothing(server, tmp_path):
    dest = tmp_path / "model.pkl"
    with pytest.raises(DownloadError, match="incomplete") as info:
        download(f"{server}/short.pkl", dest, progress=False)
    assert "short.pkl" in str(info.value) and str(dest) in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_http_error_leaves_nothing(server, tmp_path):
    dest = tmp_path / "model.pkl"
    with pytest.raises(DownloadError, match="HTTP 404"):
        download(f"{server}/missing.pkl", dest, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_timeout_and_refused_connection(server, tmp_path):
    dest = tmp_path / "model.pkl"
    with pytest.raises(DownloadError, match="slow.pkl"):
        download(f"{server}/slow.pkl", dest, progress=False, timeout=0.3)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(DownloadError, match="check the network"):
        download(f"http://127.0.0.1:{port}/model.pkl", dest, progress=False, timeout=2)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("variable", ["TURBO_OFFLINE", "HF_HUB_OFFLINE"])
def test_offline_fails_before_any_network(variable, tmp_path, monkeypatch, no_network):
    monkeypatch.delenv("TURBO_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv(variable, "1")
    url = "https://www.cs.cmu.edu/~img2img-turbo/models/day2night.pkl"
    dest = tmp_path / "sub" / "day2night.pkl"
    with pytest.raises(DownloadError) as info:
        download(url, dest, progress=False)
    message = str(info.value)
    assert url in message and variable in message and str(dest) in message
    assert list(tmp_path.iterdir()) == []


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("TURBO_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("TURBO_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / ".cache" / "turbo"


def test_released_models_match_the_original():
    base = "https://www.cs.cmu.edu/~img2img-turbo/models/"
    expected = {
        "edge_to_image": ("edge_to_image_loras.pkl", "paired", None, None, "canny", False),
        "sketch_to_image_stochastic": (
            "sketch_to_image_stochastic_lora.pkl",
            "paired",
            None,
            None,
            "sketch",
            True,
        ),
        "day_to_night": ("day2night.pkl", "unpaired", "a2b", "driving in the night", "unpaired", False),
        "night_to_day": ("night2day.pkl", "unpaired", "b2a", "driving in the day", "unpaired", False),
        "clear_to_rainy": ("clear2rainy.pkl", "unpaired", "a2b", "driving in heavy rain", "unpaired", False),
        "rainy_to_clear": ("rainy2clear.pkl", "unpaired", "b2a", "driving in the day", "unpaired", False),
    }
    assert list(RELEASED) == list(expected)
    for name, (filename, kind, direction, caption, preprocess, stochastic) in expected.items():
        model = get_released(name)
        assert model.name == name
        assert (model.filename, model.url) == (filename, base + filename)
        assert (model.kind, model.direction, model.caption) == (kind, direction, caption)
        assert (model.preprocess, model.stochastic) == (preprocess, stochastic)
        if kind == "unpaired":
            assert model.image_prep == "resize_512x512" and model.example_prompt is None
        else:
            assert model.image_prep is None and model.example_prompt
    assert get_released("sketch_to_image_stochastic").default_gamma == 0.4
    assert get_released("edge_to_image").example_prompt == "a blue bird"
    with pytest.raises(AttributeError):
        get_released("edge_to_image").url = "elsewhere"


def test_unknown_model_lists_the_names():
    with pytest.raises(UnknownModelError, match="day_to_night") as info:
        get_released("day2night")
    assert isinstance(info.value, ValueError) and "day2night" in str(info.value)


def test_styles():
    assert DEFAULT_STYLE == "Fantasy art" and len(STYLES) == 9
    assert all("{prompt}" in template for template in STYLES.values())
    assert styled_prompt("an asteroid").startswith(
        "ethereal fantasy concept art of  an asteroid . magnificent"
    )
    assert (
        styled_prompt("a cat", "Manga")
        == "manga style a cat . vibrant, high-energy, detailed, iconic, Japanese comic style"
    )
    with pytest.raises(ValueError, match="Fantasy art"):
        styled_prompt("a cat", "Baroque")


def test_checkpoint_path(tmp_path, monkeypatch, no_network):
    existing = tmp_path / "night2day.pkl"
    existing.write_bytes(b"weights")
    assert checkpoint_path("night_to_day", cache_dir=tmp_path) == existing
    monkeypatch.setenv("TURBO_CACHE", str(tmp_path))
    assert checkpoint_path("night_to_day") == existing

    monkeypatch.setenv("TURBO_OFFLINE", "1")
    with pytest.raises(DownloadError, match="clear2rainy.pkl") as info:
        checkpoint_path("clear_to_rainy", cache_dir=tmp_path / "empty")
    assert str(tmp_path / "empty" / "clear2rainy.pkl") in str(info.value)
    with pytest.raises(UnknownModelError):
        checkpoint_path("nope", cache_dir=tmp_path)


def test_write_failure_is_not_blamed_on_the_network(server, tmp_path, monkeypatch):
    real_fdopen = os.fdopen

    class FullDisk:
        def __init__(self, handle, mode):
            self.file = real_fdopen(handle, mode)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def write(self, data):
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(download_module.os, "fdopen", FullDisk)
    with pytest.raises(DownloadError, match="No space left") as info:
        download(f"{server}/model.pkl", tmp_path / "model.pkl", progress=False)
    assert "network" not in str(info.value)
    assert list(tmp_path.iterdir()) == []
