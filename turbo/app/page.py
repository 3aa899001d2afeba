"""turbo's Gradio app: sketch or upload, pick a model, get the translation live.

python app.py [--base ID_OR_DIR] [--models-dir checkpoints] [--device cuda] [--dtype fp16] [--port 7860]
(or `turbo-app ...` once the package is installed)

The base model loads once per process; models (released ones and every checkpoint found in the
models folder, which is rescanned while the app runs) are cached by the pipeline. The logic lives in
handlers.py and models_folder.py beside this file; this one is the layout and the wiring.
"""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

try:  # Hugging Face ZeroGPU: `spaces` must be imported before anything touches CUDA
    import spaces  # noqa: F401
except ImportError:
    spaces = None

import argparse  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Literal, TypedDict  # noqa: E402

import gradio as gr  # noqa: E402

from turbo.app.handlers import MAX_SEED, NO_STYLE, STYLE_CHOICES, TurboApp  # noqa: E402
from turbo.app.inputs import TolerantImage, TolerantNumber, TolerantSlider  # noqa: E402
from turbo.app.models_folder import ModelsFolder  # noqa: E402
from turbo.base import DEFAULT_BASE, DTYPES  # noqa: E402
from turbo.cli import check_device  # noqa: E402
from turbo.errors import TurboError  # noqa: E402
from turbo.model_source import FORMS, ModelNameError, parse_model  # noqa: E402
from turbo.pipeline import DEFAULT_GAMMA, get_pipeline  # noqa: E402
from turbo.registry import DEFAULT_STYLE  # noqa: E402

ASSETS = Path(__file__).resolve().parent / "examples"
# (image, model, prompt, style): our own drawings, one per kind of model.
EXAMPLES = [
    ("sketch_house.png", "sketch_to_image_stochastic", "a cozy cottage with a garden", DEFAULT_STYLE),
    ("edges_scene.png", "edge_to_image", "a red barn in front of mountains at sunset", "Photographic"),
    ("day_street.png", "day_to_night", "driving in the night", NO_STYLE),
    ("day_street.png", "clear_to_rainy", "driving in heavy rain", NO_STYLE),
]
# tall enough for the queue position and the expected wait gradio shows over a waiting status
CSS = "#status {min-height: 4.5em}"
MIN_SIDE = 64  # smallest --max-side: the models (trained at 512 px) give nothing usable much below it


class _Queueing(TypedDict, total=False):
    """An event's queue settings (keyword arguments of gradio's event listeners)."""

    concurrency_limit: int
    concurrency_id: str
    trigger_mode: Literal["once", "multiple", "always_last"]


class _Private(TypedDict):
    """An endpoint kept out of the API (keyword arguments of gradio's event listeners)."""

    api_name: str
    api_visibility: Literal["public", "private", "undocumented"]


# What gradio makes of api_name=False (which it still takes, typed as str | None): hidden, and named
# "false" (then false_1, ...) rather than after its function, which would take a name that a public
# endpoint registered later wants (demo.load's app.refresh before the Rescan button's /refresh).
PRIVATE: _Private = {"api_name": "false", "api_visibility": "private"}


def _at_least(minimum: float, kind: type = int) -> Callable[[str], float]:
    """An argparse type: a number of `kind` (int or float) >= minimum."""

    def parse(text: str) -> float:
        value = kind(text)
        if not value >= minimum:  # also refuses nan
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {text}")
        return value

    parse.__name__ = "integer" if kind is int else "number"  # argparse: "invalid integer value: 'x'"
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="turbo's Gradio app (one-step image-to-image translation)")
    p.add_argument("--base", default=DEFAULT_BASE, help="base model: hub id or local diffusers folder")
    p.add_argument(
        "--models-dir", type=Path, default=Path("checkpoints"), help="folder watched for checkpoints"
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N, mps (default: the best available)")
    p.add_argument(
        "--dtype", choices=list(DTYPES), default=None, help="default: fp16 on cuda, fp32 elsewhere"
    )
    p.add_argument("--host", default=None, help="default 127.0.0.1 (0.0.0.0 on Hugging Face Spaces)")
    p.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    p.add_argument(
        "--model",
        default=None,
        help="model selected at start (default: the sketch model); a Hub id (owner/repo) is listed too",
    )
    p.add_argument(
        "--hub-models",
        type=hub_list,
        default=os.environ.get("TURBO_MODELS", ""),
        help="Hugging Face Hub models to list, comma-separated: owner/repo[@REV][/FILE],... (default: "
        "$TURBO_MODELS); each downloads and loads on first use",
    )
    p.add_argument(
        "--max-models", type=_at_least(1), default=4, help="models kept loaded, >= 1 (least recently used go)"
    )
    p.add_argument(
        "--max-side",
        type=_at_least(MIN_SIDE),
        default=1024,
        help=f"uploads are downscaled to this longer side (pixels, >= {MIN_SIDE})",
    )
    p.add_argument(
        "--rescan-seconds",
        type=_at_least(0.1, float),
        default=5.0,
        help="how often the models folder is rescanned (seconds, >= 0.1)",
    )
    p.add_argument(
        "--settle-seconds",
        type=_at_least(0.0, float),
        default=2.0,
        help="a new file must be unchanged this long (seconds, >= 0)",
    )
    p.add_argument(
        "--canvas-size", type=_at_least(64), default=512, help="sketch canvas side in pixels, >= 64"
    )
    p.add_argument(
        "--queue-size", type=_at_least(1), default=16, help="requests that may wait, >= 1 (more are refused)"
    )
    p.add_argument(
        "--restore", choices=["auto", "copy", "record"], default="auto",
        help="how a switch between models or gammas gives the base weights back: copy (a copy of the "
        "folded base weights in host memory, 3.5 GB in fp32; the fastest switches) or record (one byte "
        "per folded weight, a quarter of that in fp32; slower switches); auto: copy",
    )  # fmt: skip
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def hub_list(text: str) -> list[str]:
    """A comma-separated list of Hub ids, blanks dropped (checked later, by `hub_models`)."""
    return [item.strip() for item in text.split(",") if item.strip()]


def hub_models(args: argparse.Namespace) -> list[str]:
    """The Hub models to list: --hub-models (or $TURBO_MODELS) and a --model that is a Hub id, checked
    before the base loads (ModelNameError names the entry and what it was taken for)."""
    wanted = hub_list(args.hub_models) if isinstance(args.hub_models, str) else list(args.hub_models)
    ids = []
    for item in wanted:
        try:
            source = parse_model(item)
        except TurboError as e:
            raise ModelNameError(f"--hub-models / TURBO_MODELS entry {item!r}: {e}") from None
        if source.kind != "hub":
            raise ModelNameError(
                f"--hub-models / TURBO_MODELS entry {item!r} is a {source.kind} model, not a Hub id ({FORMS})"
            )
        ids.append(str(source.hub))
    if args.model and "/" in args.model:  # else a label of the list (a released name, a folder file)
        source = parse_model(args.model)
        if source.kind == "hub":
            ids.append(str(source.hub))
    return list(dict.fromkeys(ids))


def default_host() -> str:
    """Loopback, except on Hugging Face Spaces (SPACE_ID is set there), which needs every address."""
    return "0.0.0.0" if os.environ.get("SPACE_ID") else "127.0.0.1"


def create_app(args: argparse.Namespace) -> TurboApp:
    """Load the base (BaseModelError, a TurboError, if it cannot be, or if the device cannot run it),
    scan the models folder and list the Hub models (not downloaded yet)."""
    check_device(args.device)  # "meta" and the like would load, then fail at the first translation
    hub = hub_models(args)  # a bad Hub id fails before the base loads
    key = (args.base, args.device, args.dtype)
    get_pipeline(*key, max_models=args.max_models, restore=args.restore)
    folder = ModelsFolder(args.models_dir, settle_seconds=args.settle_seconds)
    return TurboApp(key, folder, max_side=args.max_side, max_models=args.max_models, hub_models=hub)


def _first_model(args: argparse.Namespace, app: TurboApp) -> str:
    """The model selected at start: --model (a label of the list, or a Hub id as listed), else the
    sketch model."""
    if args.model and args.model not in app.labels and "/" in args.model:
        source = parse_model(args.model)  # checked by create_app already
        if source.kind == "hub" and str(source.hub) in app.labels:
            return str(source.hub)
    return args.model if args.model in app.labels else "sketch_to_image_stochastic"


def build_demo(args: argparse.Namespace, app: TurboApp | None = None) -> gr.Blocks:
    """The page (not launched). `app` defaults to `create_app(args)`."""
    app = app or create_app(args)
    first = _first_model(args, app)
    tab = app.choice(first).tab
    with gr.Blocks(title="turbo: one-step image translation", delete_cache=(3600, 3600)) as demo:
        gr.Markdown(
            "# turbo: one-step image-to-image translation\n"
            "Draw or upload an image, pick a model: the result updates as you go."
        )
        source = gr.State(tab)  # which input the last translation used: "sketch" | "upload"
        typed = gr.State({})  # the user's prompt and edited captions (TurboApp.model_changed)
        with gr.Row():
            with gr.Column():
                with gr.Tabs(selected=tab) as tabs:
                    with gr.Tab("Sketch", id="sketch") as sketch_tab:
                        sketch = gr.Sketchpad(
                            type="pil", image_mode="L", canvas_size=(args.canvas_size,) * 2, layers=False,
                            transforms=(),
                            brush=gr.Brush(colors=["#000000"], color_mode="fixed", default_size=4),
                            eraser=gr.Eraser(default_size=16), label="Sketch (black on white)",
                            elem_id="sketch",
                        )  # fmt: skip
                    with gr.Tab("Upload", id="upload") as upload_tab:
                        upload = TolerantImage(
                            type="filepath", image_mode=None, sources=["upload", "clipboard"],
                            label="Image (upload, drop or paste)", elem_id="upload",
                        )  # fmt: skip
                with gr.Row():
                    model = gr.Dropdown(
                        app.labels,
                        value=first,
                        allow_custom_value=True,
                        label="Model",
                        elem_id="model",
                        scale=4,
                    )
                    refresh = gr.Button("Rescan", size="sm", scale=1, elem_id="refresh")
                prompt = gr.Textbox(
                    label="Prompt", lines=1, placeholder="describe the image you want", elem_id="prompt"
                )
                style = gr.Dropdown(STYLE_CHOICES, value=DEFAULT_STYLE, label="Style", elem_id="style")
                # an emptied box (None) or a value out of range reaches the handler (see inputs.py)
                gamma = TolerantSlider(0, 1, value=DEFAULT_GAMMA, step=0.05, label="Gamma", elem_id="gamma")
                with gr.Row():
                    seed = TolerantNumber(
                        value=42, precision=0, minimum=0, maximum=MAX_SEED, label="Seed", elem_id="seed",
                        scale=3,
                    )  # fmt: skip
                    randomize = gr.Button("Random seed", size="sm", scale=1, elem_id="random")
                with gr.Row():
                    canny_low = gr.Slider(0, 255, value=100, step=1, label="Canny low threshold")
                    canny_high = gr.Slider(0, 255, value=200, step=1, label="Canny high threshold")
                run = gr.Button("Translate", variant="primary", elem_id="run")
            with gr.Column():
                output = gr.Image(
                    label="Output", type="pil", format="png", interactive=False, elem_id="output",
                    buttons=["download", "fullscreen"],
                )  # fmt: skip
                download = gr.DownloadButton("Download PNG", elem_id="download")
                status = gr.Markdown(
                    "Draw on the canvas or upload an image.", label="Status", elem_id="status"
                )
                info = gr.Markdown(label="Model", elem_id="info")
                condition = gr.Image(label="Edge map (what the model sees)", type="pil", interactive=False)
        with gr.Accordion("Models folder", open=False):
            folder_text = gr.Markdown(app.folder_markdown(), label="Models folder", elem_id="folder")
            checkpoint = gr.File(
                label="Add a checkpoint (.safetensors or .pkl)",
                file_types=[".safetensors", ".pkl"],
                type="filepath",
            )
        with gr.Accordion("Add from the Hub", open=False):
            with gr.Row():
                hub_id = gr.Textbox(
                    label="Hugging Face Hub model", placeholder="owner/repo (or owner/repo/FILE.safetensors)",
                    elem_id="hub_id", scale=4,
                )  # fmt: skip
                hub_add = gr.Button("Add", size="sm", scale=1, elem_id="hub_add")
            hub_status = gr.Markdown(
                "A turbo model from the Hub: downloaded, checked against the base, added to the list.",
                elem_id="hub_status",
            )
        examples = gr.Examples(
            [[str(ASSETS / f), m, p, s] for f, m, p, s in EXAMPLES if (ASSETS / f).is_file()],
            inputs=[upload, model, prompt, style],
            label="Examples (our own drawings; the released models download on first use)",
        )
        timer = gr.Timer(args.rescan_seconds)

        # ---- wiring ----
        common = [model, sketch, upload, prompt, style, gamma, seed, canny_low, canny_high]
        results = [output, condition, download, status, source]
        gpu: _Queueing = {"concurrency_limit": 1, "concurrency_id": "gpu", "trigger_mode": "always_last"}
        # set by a gamma box left empty (see TurboApp.check_gamma); read by every translation
        emptied = gr.State(False)
        every = [*common, emptied]  # what a translation takes besides the source

        def from_sketch(*values):
            return app.run("sketch", *values)

        def from_upload(*values):
            return app.run("upload", *values)

        def run_if(go, source, *values):  # the last step of a chain that may have stopped
            return app.run(source, *values) if go else (*(gr.update(),) * 4, source)

        # One translation per user action. An image is translated on `upload` (a file picked, dropped
        # or pasted), not on `change`: replacing an image changes the value twice (two requests).
        sketch.change(from_sketch, every, results, api_name="translate_sketch", **gpu)
        upload.upload(from_upload, every, results, api_name="translate_upload", **gpu)
        # an emptied gamma box: the run takes the default, and the box shows it
        run.click(app.run, [source, *every], results, api_name="translate", **gpu).then(
            app.filled_gamma, gamma, gamma, queue=False, **PRIVATE
        )
        # a value typed in gamma's box is checked first: out of range or emptied, no run
        gamma_ok = gr.State(False)
        gamma.release(
            app.check_gamma, gamma, [gamma, status, gamma_ok, emptied], queue=False, **PRIVATE
        ).then(run_if, [gamma_ok, source, *every], results, **PRIVATE, **gpu)
        for event in (
            seed.change,
            prompt.submit,
            style.input,
            canny_low.release,
            canny_high.release,
        ):
            event(app.run, [source, *every], results, **PRIVATE, **gpu)

        controls = [prompt, style, gamma, canny_low, canny_high, condition, tabs, info, source, typed]
        switch_inputs = [model, prompt, sketch, upload, typed]
        # A model the user picks: `select` fires once (`input` fires twice: on the pick, then on the
        # blur that follows). A model the app sets (an example, an added checkpoint) chains the same
        # two steps itself; `change` would run them a second time.
        model.select(app.model_changed, switch_inputs, controls, api_name="set_model").then(
            app.run, [source, *every], results, **PRIVATE, **gpu
        )
        examples.load_input_event.then(app.model_changed, switch_inputs, controls, **PRIVATE).then(
            app.run, [source, *every], results, **PRIVATE, **gpu
        )
        demo.load(app.model_changed, switch_inputs, controls, **PRIVATE)
        # the list as it is now, not as it was when the app started
        demo.load(app.refresh, [model], [model, folder_text], show_progress="hidden", **PRIVATE)
        sketch_tab.select(lambda: "sketch", None, source, **PRIVATE)
        upload_tab.select(lambda: "upload", None, source, **PRIVATE)
        randomize.click(app.random_seed, None, seed, api_name="random_seed")

        refresh.click(app.refresh, [model], [model, folder_text], api_name="refresh")
        timer.tick(app.refresh, [model], [model, folder_text], show_progress="hidden", **PRIVATE)
        # an added checkpoint is selected and run (a refused one leaves the page as it was)
        added = gr.State(False)

        def add_checkpoint(file, label):
            update, text, message = app.upload_checkpoint(file, label)
            return update, text, message, "value" in update

        def switch_if_added(added, label, prompt, sketch, upload, typed, source):
            if not added:
                return (*(gr.update(),) * 8, source, typed)
            return app.model_changed(label, prompt, sketch, upload, typed)

        checkpoint.upload(
            add_checkpoint,
            [checkpoint, model],
            [model, folder_text, status, added],
            api_name="upload_checkpoint",
        ).then(
            switch_if_added, [added, model, prompt, sketch, upload, typed, source], controls, **PRIVATE
        ).then(run_if, [added, source, *every], results, **PRIVATE, **gpu)
        # a download runs beside the translations (its own queue); only loading the model onto the
        # base waits for the translation under way. An added model is selected and run, as a checkpoint.
        hub: _Queueing = {"concurrency_id": "hub", "concurrency_limit": 2}
        hub_added = gr.State(False)

        def add_from_hub(hub_id):
            update, text = app.add_from_hub(hub_id)
            return update, text, "value" in update

        def switch_and_run_after(adding):  # the Add button's event, or the Enter key's
            adding.then(
                switch_if_added, [hub_added, model, prompt, sketch, upload, typed, source], controls,
                **PRIVATE,
            ).then(run_if, [hub_added, source, *every], results, **PRIVATE, **gpu)  # fmt: skip

        hub_io = ([hub_id], [model, hub_status, hub_added])
        switch_and_run_after(hub_add.click(add_from_hub, *hub_io, api_name="add_from_hub", **hub))
        switch_and_run_after(hub_id.submit(add_from_hub, *hub_io, **PRIVATE, **hub))
    demo.queue(max_size=args.queue_size, default_concurrency_limit=1)
    return demo


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s: %(message)s"
    )
    try:
        app = create_app(args)
    except TurboError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    demo = build_demo(args, app)
    demo.launch(
        server_name=args.host or default_host(), server_port=args.port, share=False, show_error=True, css=CSS
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
