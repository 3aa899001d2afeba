"""The app in a real browser: headless Debian Chromium (the system one; Playwright cannot download its
own here) draws a stroke, moves the gamma slider, empties its box, selects another model, uploads an
image and replaces it, counting the translation requests: one per user action.

Needs `apt-get install -y chromium` (CI installs it). Without the browser the test fails when CI=true
and is skipped otherwise. The screenshot goes to test-artifacts/app_browser.png (git-ignored).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
from test_app_handlers import checkpoint_files, photo
from test_app_server import free_port

from turbo.app import handlers
from turbo.app import page as app_module

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
FLAGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
]  # fmt: skip
TIMEOUT_MS = 120_000  # the canvas renders in software and the cpu is shared: wait for results, not sleeps

pytestmark = pytest.mark.slow


def require_browser() -> None:
    if Path(CHROMIUM).is_file():
        return
    message = f"no Chromium at {CHROMIUM}: install it with `apt-get install -y chromium` (or set CHROMIUM)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def served(tiny_base_dir, tmp_path_factory):
    """(page address, ids of the events that may run a translation, the translations run: a list
    that grows by one per call of the network)."""
    require_browser()
    runs: list[str] = []
    translate = handlers.gpu_translate

    def counted(key, image, model, **kw):
        runs.append(model)
        return translate(key, image, model, **kw)

    handlers.gpu_translate = counted
    folder = tmp_path_factory.mktemp("browser") / "checkpoints"
    folder.mkdir()
    for name in ("sketch", "edges"):
        path = shutil.copy(checkpoint_files(str(tiny_base_dir))[name], folder)
        os.utime(path, (time.time() - 60, time.time() - 60))
    port = free_port()
    args = app_module.build_parser().parse_args(
        ["--base", str(tiny_base_dir), "--models-dir", str(folder), "--device", "cpu", "--port", str(port),
         "--model", "sketch.safetensors", "--canvas-size", "128"]
    )  # fmt: skip
    demo = app_module.build_demo(args)
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    translating = {i for i, f in demo.fns.items() if getattr(f.fn, "__name__", "") in TRANSLATING_HANDLERS}
    yield f"http://127.0.0.1:{port}/", translating, runs
    demo.close()
    handlers.gpu_translate = translate


TRANSLATING_HANDLERS = {"run", "from_sketch", "from_upload", "run_if"}  # page.py's translation events


def test_each_user_action_runs_one_translation_in_chromium(served, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    url, translating, runs = served
    ARTIFACTS.mkdir(exist_ok=True)
    for i in range(2):
        photo((64 + 16 * i, 48)).save(tmp_path / f"photo{i}.png")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1400})
        requests: list[str] = []
        translations: list[int] = []

        def seen(request):
            requests.append(request.url)
            if "/queue/join" in request.url and json.loads(request.post_data)["fn_index"] in translating:
                translations.append(json.loads(request.post_data)["fn_index"])

        page.on("request", seen)

        def one_translation(action: str, text: str) -> None:
            """Exactly one translation since the last call, and the status shows text. Requests
            are counted too: one per action, but for a typed gamma, whose check sends a second one
            that runs nothing when the box was emptied."""
            deadline = time.time() + TIMEOUT_MS / 1000
            while not runs and time.time() < deadline:  # the page's events are handled while it waits
                page.wait_for_timeout(100)
            expect(status).to_contain_text(text, timeout=TIMEOUT_MS)
            page.wait_for_timeout(1500)  # a duplicate request would be sent at once, not later
            assert len(runs) == 1, (action, runs)
            assert 1 <= len(translations) <= (2 if "gamma" in action else 1), (action, translations)
            translations.clear()
            runs.clear()

        try:
            page.goto(url)
            page.wait_for_selector("#sketch canvas", timeout=TIMEOUT_MS)
            status = page.locator("#status")
            expect(page.locator("#info")).to_contain_text("sketch.safetensors", timeout=TIMEOUT_MS)
            assert translations == []  # opening the page translates nothing
            # the Brush tool must be selected before drawing
            page.locator("#sketch button[aria-label='Brush']").click()
            box = page.locator("#sketch canvas").first.bounding_box()
            x0, y0 = box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.3
            page.mouse.move(x0, y0)
            page.mouse.down()
            for i in range(1, 15):
                page.mouse.move(x0 + 8 * i, y0 + 6 * i)
            page.mouse.up()
            # a finished stroke runs the translation without a button press
            expect(page.locator("#output img")).to_be_visible(timeout=TIMEOUT_MS)
            one_translation("stroke", "Gamma 0.40")
            assert "sketch.safetensors" in status.inner_text()
            # moving the gamma slider re-runs it
            slider = page.locator("#gamma input[type=range]")
            r = slider.bounding_box()
            page.mouse.click(r["x"] + r["width"] * 0.8, r["y"] + r["height"] / 2)
            one_translation("gamma release", "Gamma 0.80")
            page.locator("#run").click()
            one_translation("Translate", "Gamma 0.80")
            # an emptied gamma box: the model's default, shown in the box, and no gradio error
            page.locator("#gamma input[type=number]").fill("")
            page.locator("#run").click()
            one_translation("emptied gamma, Translate", "Gamma 0.40")
            expect(page.locator("#gamma input[type=number]")).to_have_value("0.4")
            # selecting another model adapts the controls and re-runs on the current input
            page.locator("#model input").click()
            page.get_by_role("option", name="edges.safetensors").click()
            expect(page.locator("#info")).to_contain_text("Canny edges", timeout=TIMEOUT_MS)
            # this checkpoint has no default prompt: the UI says so, and Enter in the prompt box re-runs
            one_translation("model switch", "needs a prompt")
            page.locator("#prompt textarea").fill("a red barn")
            page.locator("#prompt textarea").press("Enter")
            one_translation("prompt submit", "with edges.safetensors")
            expect(slider).to_be_disabled()  # gamma does not apply to a deterministic model
            # an upload, then another one on top of it: one translation each
            page.get_by_role("tab", name="Upload").click()
            page.locator("#upload input[type=file]").set_input_files(str(tmp_path / "photo0.png"))
            one_translation("upload", "with edges.safetensors")
            page.locator("#upload input[type=file]").set_input_files(str(tmp_path / "photo1.png"))
            one_translation("replaced upload", "with edges.safetensors")
            assert page.locator("#output img").count() == 1
            # no emoji icons: they show as empty boxes where the browser has no emoji font
            shown = status.inner_text() + page.locator("#refresh").inner_text()
            assert all(ord(ch) < 0x2000 for ch in shown), shown
            page.screenshot(path=str(ARTIFACTS / "app_browser.png"), full_page=True)
        except Exception:
            page.screenshot(path=str(ARTIFACTS / "app_browser_failure.png"), full_page=True)
            raise
        finally:
            browser.close()
    assert (ARTIFACTS / "app_browser.png").stat().st_size > 10_000
    hosts = {u.split("/")[2] for u in requests if u.startswith("http")}
    assert hosts == {url.split("/")[2]}  # the page fetched nothing from elsewhere
