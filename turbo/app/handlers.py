"""What the Gradio app does, without the layout: model choices, input handling, translation, messages.

`TurboApp` holds the process-wide pipeline key and the models folder. Its handlers take and return
plain values (PIL images, strings, `gr.update` dicts) so tests call them directly; every user error
(bad image, missing prompt, broken or missing checkpoint) becomes a visible message, never an
exception. The translation itself runs in one module-level function, `gpu_translate`, wrapped with
`spaces.GPU` when the `spaces` package is installed (Hugging Face ZeroGPU) and left as is elsewhere.
"""

from __future__ import annotations

import html
import logging
import math
import random
import tempfile
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import numpy as np
from PIL import Image

from turbo.app.models_folder import FolderModel, ModelsFolder
from turbo.errors import TurboError
from turbo.formats import CheckpointError
from turbo.model_source import FORMS, ModelNameError, model_file, parse_model
from turbo.pipeline import (
    DEFAULT_GAMMA,
    MAX_SEED,
    GammaError,
    ModelInfo,
    Pipeline,
    PromptError,
    SeedError,
    Translation,
    get_pipeline,
)
from turbo.preprocess import (
    ImageError,
    ThresholdError,
    check_canny_thresholds,
    limit_size,
    load_image,
    load_image_limited,
)
from turbo.registry import RELEASED, STYLES, ReleasedModel, UnknownModelError, released_file, styled_prompt

logger = logging.getLogger(__name__)

# Seconds a ZeroGPU call may hold the GPU: one translation (a fraction of a second on a ZeroGPU card)
# or one model load (a file read and the fold into the base, a few seconds), with room to spare;
# asking for less than the default 60 puts the app's calls earlier in ZeroGPU's queue.
GPU_SECONDS = 30

try:  # on ZeroGPU, app.py imports `spaces` before torch touches CUDA; here it is only looked up
    import spaces

    GPU: Callable = spaces.GPU(duration=GPU_SECONDS)  # off ZeroGPU it returns the function as is
except ImportError:  # anywhere else: no-op

    def GPU(fn: Callable) -> Callable:  # noqa: N802 (mirrors spaces.GPU)
        return fn


NO_STYLE = "(no style)"
STYLE_CHOICES = [NO_STYLE, *STYLES]
INPUT_WORDS = {
    "canny": "Canny edges of your image",
    "sketch": "your sketch (dark strokes on white)",
    "none": "your image as given",
    "unpaired": "your photo",
}
KEEP_OUTPUTS = 32  # result files kept for the download button


class MissingInputError(ImageError):
    """Nothing to translate yet: an empty canvas or no upload."""


def parse_seed(value: float | str | None) -> int:
    """The seed box's value as an int in 0..MAX_SEED (empty: 0); SeedError otherwise."""
    if value is None or value == "":
        return 0
    try:
        seed = int(value)
        whole = float(seed) == float(value)
    except (TypeError, ValueError, OverflowError):  # text, NaN, infinity
        whole = False
    if not whole or not 0 <= seed <= MAX_SEED:
        raise SeedError(f"the seed must be a whole number from 0 to {MAX_SEED}, got {value}")
    return seed


def _number(value: object) -> float | None:
    """value as a finite float (Python and numpy numbers, 0-d arrays, numeric text), else None."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        # value may be any object (hence the ignore): numpy scalars and 0-d arrays convert; None,
        # lists and words raise, caught below
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        return None
    return number if math.isfinite(number) else None


def _shown(value: object) -> str:
    """A slider value for a message: text quoted, numbers (numpy ones too) as plain numbers."""
    return repr(value) if isinstance(value, str) else str(value)


def parse_gamma(value: object) -> float | None:
    """The gamma slider's value as a float in [0, 1]; empty (None or "") gives None, the model's
    default. GammaError otherwise (NaN, infinity, text, out of range)."""
    if value is None or value == "":
        return None
    gamma = _number(value)
    if gamma is None or not 0.0 <= gamma <= 1.0:
        raise GammaError(f"gamma must be a number from 0 to 1, got {_shown(value)}")
    return gamma


def parse_canny(low: object, high: object) -> tuple[int, int]:
    """The Canny sliders' values as whole numbers (rounded) with 0 <= low <= high <= 255;
    ThresholdError for empty, NaN, text or out-of-range values."""
    values = []
    for name, value in (("low", low), ("high", high)):
        number = _number(value)
        if number is None:
            raise ThresholdError(
                f"the Canny {name} threshold must be a number from 0 to 255, got {_shown(value)}"
            )
        values.append(round(number))
    check_canny_thresholds(*values)
    return values[0], values[1]


@dataclass(frozen=True)
class Choice:
    """One entry of the model dropdown: a released model or one direction of a checkpoint file.

    model: released name, checkpoint path or Hub id (what `Pipeline.load` takes); preprocess: canny
    | sketch | none | unpaired; prompt: the caption (unpaired) or the file's default prompt (paired),
    if any; released: one of the released models (its file possibly found in the models folder: then
    model is that file's path).
    """

    label: str
    model: str
    direction: str | None
    kind: str
    stochastic: bool
    preprocess: str
    prompt: str | None = None
    example_prompt: str | None = None
    released: bool = False
    hub: bool = False  # a Hugging Face Hub model; model is its id
    pending: bool = False  # a Hub model not downloaded yet: kind, input and directions unknown

    @property
    def is_file(self) -> bool:
        """Served from a file of the models folder (not fetched by released name or Hub id)."""
        return not self.hub and self.model not in RELEASED

    @property
    def tab(self) -> str:
        """Which input the model needs first: the sketch canvas or the image upload."""
        return "sketch" if self.preprocess == "sketch" else "upload"

    @property
    def translates(self) -> str:
        """What the model takes, in words ("Canny edges of your image", ...)."""
        return INPUT_WORDS.get(self.preprocess, self.preprocess)


def released_choice(m: ReleasedModel, model: str) -> Choice:
    """The entry of released model `m`, served from `model` (its name, or its file's path)."""
    return Choice(
        label=m.name, model=model, direction=m.direction, kind=m.kind, stochastic=m.stochastic,
        preprocess=m.preprocess, prompt=m.caption, example_prompt=m.example_prompt, released=True,
    )  # fmt: skip


def released_choices() -> list[Choice]:
    return [released_choice(m, m.name) for m in RELEASED.values()]


def folder_choices(entry: FolderModel) -> list[Choice]:
    """A paired checkpoint gives one choice (its file name); an unpaired one, one per direction.
    A released model's own file (same name, e.g. `sketch_to_image_stochastic_lora.pkl`) gives the
    released name instead, served from this file, so the list has it once and it works offline."""
    released = [m for m in RELEASED.values() if m.filename == entry.name]
    if released and all(m.direction in (None, *entry.directions) for m in released):
        return [released_choice(m, str(entry.path)) for m in released]
    out = []
    for d in entry.directions:
        label = entry.name if len(entry.directions) == 1 else f"{entry.name} ({d})"
        out.append(
            Choice(
                label=label,
                model=str(entry.path),
                direction=d,
                kind=entry.kind,
                stochastic=entry.stochastic,
                preprocess=entry.preprocess,
                prompt=entry.prompts.get(d) or None,
            )  # fmt: skip
        )
    return out


def hub_pending(hub_id: str) -> Choice:
    """A Hub model listed before its first use (TURBO_MODELS): what it is is known once loaded."""
    return Choice(hub_id, hub_id, None, "paired", False, "none", hub=True, pending=True)


def hub_choices(hub_id: str, info: ModelInfo) -> list[Choice]:
    """A loaded Hub model's entries: its id for its default direction, `id (b2a)` for another one."""
    ordered = [info.default_direction, *(d for d in info.directions if d != info.default_direction)]
    return [
        Choice(
            label=hub_id if d == info.default_direction else f"{hub_id} ({d})",
            model=hub_id,
            direction=d,
            kind=info.kind,
            stochastic=info.stochastic,
            preprocess=info.preprocess,
            prompt=info.prompts.get(d) or None,
            hub=True,
        )
        for d in ordered
    ]


@GPU
def gpu_translate(pipeline_key: tuple, image: Image.Image, model: str, **kw) -> Translation:
    """The one place the app runs the network (see `Pipeline.translate` for the arguments)."""
    return get_pipeline(*pipeline_key).translate(image, model, **kw)


@GPU
def gpu_load(pipeline_key: tuple, model: str) -> ModelInfo:
    """Load a model into the pipeline's cache (`Pipeline.load`); on ZeroGPU weights move only
    inside a GPU call."""
    return get_pipeline(*pipeline_key).load(model)


def _message(text: str) -> str:
    # plain markup: emoji icons render as empty boxes where the browser has no emoji font
    return f"**Error:** {html.escape(text)}"


def _hint(text: str) -> str:
    return html.escape(text)


class TurboApp:
    """The app's state and handlers.

    pipeline_key: (base, device, dtype) of the process-wide pipeline (`get_pipeline`), which must
    already be loaded; max_side: uploads with a longer side are downscaled to it (pixels);
    warn: how errors are shown besides the status text (gr.Warning in the app).
    """

    def __init__(
        self,
        pipeline_key: tuple,
        folder: ModelsFolder,
        max_side: int = 1024,
        warn: Callable[[str], None] | None = None,
        max_models: int = 4,
        hub_models: Sequence[str] = (),
    ):
        self.pipeline_key = pipeline_key
        self.pipeline: Pipeline = get_pipeline(*pipeline_key, max_models=max_models)
        self.folder = folder
        self.max_side = max_side
        self.warn = warn if warn is not None else (lambda text: gr.Warning(html.escape(text)))
        self.output_dir = Path(tempfile.mkdtemp(prefix="turbo-app-"))
        self._outputs: deque[Path] = deque()
        self._choices: dict[str, Choice] = {}
        self._entries: list[FolderModel] = []
        self._hub: dict[str, Choice] = {}
        self._hub_locks: dict[str, threading.Lock] = {}
        self._hub_lock = threading.Lock()
        for hub_id in hub_models:
            self._hub.setdefault(hub_id, hub_pending(hub_id))
        self.rescan()

    # ---- models ----
    def rescan(self) -> dict[str, Choice]:
        """Scan the models folder; forget (unload) checkpoint files that disappeared."""
        entries = self.folder.scan()
        choices = {c.label: c for c in released_choices()} | self._hub
        for entry in entries:
            if entry.status == "ok":
                choices.update({c.label: c for c in folder_choices(entry)})
        old_files = {c.model for c in self._choices.values() if c.is_file}
        new_files = {c.model for c in choices.values() if c.is_file}
        for gone in old_files - new_files:
            key = Pipeline.file_key(gone)
            if key in self.pipeline.models:
                logger.info("checkpoint %s is gone; unloading it", gone)
                self.pipeline.unload(key)
        self._choices, self._entries = choices, entries
        return choices

    @property
    def labels(self) -> list[str]:
        return list(self._choices)

    def choice(self, label: str | None) -> Choice:
        """The dropdown entry called label (rescanning once if unknown); UnknownModelError if none."""
        if label in self._choices:
            return self._choices[label]
        if label and label in self.rescan():
            return self._choices[label]
        raise UnknownModelError(f"no model called {label!r}: pick one from the list")

    def folder_markdown(self) -> str:
        """The models folder's files, unusable and pending ones with the reason."""
        lines = [f"Models folder: `{self.folder.folder}`"]
        if not self._entries:
            lines.append("- (no checkpoints yet: drop a `.safetensors` or `.pkl` file here, or upload one)")
        for e in self._entries:
            if e.status == "ok":
                served = released_file(e.name)
                as_name = f", served as `{served.name}`" if served is not None else ""
                lines.append(
                    f"- `{e.name}`: ready ({e.kind}{', stochastic' if e.stochastic else ''}, input "
                    f"{e.preprocess}{as_name})"
                )
            elif e.status == "pending":
                lines.append(f"- `{e.name}`: still being written")
            else:
                lines.append(f"- `{e.name}`: **unusable**: {html.escape(e.reason)}")
        return "\n".join(lines)

    def refresh(self, label: str | None = None) -> tuple[dict, str]:
        """Handler of the refresh button and the periodic rescan: (dropdown update, folder text)."""
        self.rescan()
        text = self.folder_markdown()
        if label and label not in self._choices:
            text += f"\n\n**Note:** `{html.escape(label)}` is no longer in the models folder."
        return gr.update(choices=self.labels), text

    def upload_checkpoint(self, file: str | None, label: str | None = None) -> tuple[dict, str, str]:
        """Handler of the checkpoint upload: copy it into the models folder and select it.
        Returns (dropdown update, folder text, status text)."""
        if not file:
            return gr.update(), self.folder_markdown(), ""
        try:
            # loaded now, so a checkpoint made for another base is refused at once
            entry = self.folder.add_upload(
                file, Path(file).name, check=lambda p: gpu_load(self.pipeline_key, str(p))
            )
        except TurboError as e:
            self.warn(str(e))
            return gr.update(), self.folder_markdown(), _message(str(e))
        self.rescan()
        new = folder_choices(entry)[0].label
        return (
            gr.update(choices=self.labels, value=new),
            self.folder_markdown(),
            f"Added `{entry.name}` to the models folder.",
        )

    # ---- Hugging Face Hub models ----
    def ready_choice(self, label: str | None) -> Choice:
        """`choice(label)`, a pending Hub model downloaded and loaded first (TurboError if it cannot
        be); its entries then replace the pending one."""
        c = self.choice(label)
        if c.pending:
            self._load_hub(c.model)
            c = self.choice(label)
        return c

    def _load_hub(self, hub_id: str) -> list[Choice]:
        """Download `hub_id` (outside the GPU function and the pipeline's lock: translations go on),
        load it onto the running base, and list it; one download per model at a time."""
        with self._hub_lock:
            lock = self._hub_locks.setdefault(hub_id, threading.Lock())
        with lock:
            done = [c for c in self._hub.values() if c.model == hub_id and not c.pending]
            if done:  # listed already (if evicted since, the next translation reloads it)
                return done
            model_file(hub_id)  # the download; HubModelError says why it cannot be had
            # the short step, under the pipeline's lock: read, check against the base, fold in;
            # CheckpointError: not a turbo model, or one made for another base
            choices = hub_choices(hub_id, gpu_load(self.pipeline_key, hub_id))
            listed = {k: c for k, c in self._hub.items() if k != hub_id}
            self._hub = listed | {c.label: c for c in choices}  # one assignment: readers see either
            self.rescan()
            return choices

    def add_from_hub(self, text: str | None) -> tuple[dict, str]:
        """Handler of *Add from the Hub*: check the id, download, load onto the running base, select
        it. Returns (dropdown update, status text); a refusal says why and changes nothing."""
        text = (text or "").strip()
        try:
            source = parse_model(text)
            if source.kind != "hub":
                released = source.kind == "released"
                what = "a released model, already in the list" if released else "a local file"
                raise ModelNameError(
                    f"{text} is {what}; this box takes a Hugging Face Hub id ({FORMS})"
                    + ("; put files in the models folder" if source.kind == "file" else "")
                )
            hub_id = str(source.hub)
            choices = self._load_hub(hub_id)
        except TurboError as e:
            self.warn(str(e))
            return gr.update(), _message(f"not added: {e}")
        c = choices[0]
        what = "paired (pix2pix-turbo)" if c.kind == "paired" else "unpaired (CycleGAN-Turbo)"
        entries = ", ".join(f"`{html.escape(x.label)}`" for x in choices)
        return (
            gr.update(choices=self.labels, value=c.label),
            f"Added {entries} from the Hub: {what}, translates {c.translates}.",
        )

    # ---- controls ----
    def model_changed(
        self, label: str | None, prompt: str | None, sketch=None, upload=None, typed: dict | None = None
    ) -> tuple:
        """Handler of the model dropdown: adapt the controls to the model.

        typed: what the user wrote, kept per session (a gr.State; None or {} at first): "label", the
        model the prompt box belonged to; "prompt", the user's own prompt for paired models (None:
        the model's default); "captions", label -> edited caption of an unpaired direction.

        Returns updates for (prompt, style, gamma, canny_low, canny_high, condition image, input
        tabs, model description), the input source ("sketch" | "upload") to use: the one the model
        needs, unless only the other one holds an image (e.g. an example was just loaded), and the
        new `typed`.
        """
        typed = dict(typed or {})
        try:
            c = self.ready_choice(label)
        except TurboError as e:
            nothing = (gr.update(),) * 7
            return (*nothing, _message(str(e)), gr.update(), typed)
        self._remember(typed, (prompt or "").strip())
        typed["label"] = c.label
        captions = typed.get("captions", {})
        if c.kind == "unpaired":
            if c.prompt:
                new_prompt = gr.update(
                    value=captions.get(c.label) or c.prompt,
                    label="Caption (the model's own; edit with care)",
                    placeholder="the caption the model was trained with",
                )
            else:
                new_prompt = gr.update(
                    value=captions.get(c.label, ""),
                    label="Caption (this model has none: write one)",
                    placeholder="what the output should show, e.g. driving in the night",
                )
            style = gr.update(visible=False)
        else:
            value = typed.get("prompt") or c.prompt or c.example_prompt or ""
            new_prompt = gr.update(
                value=value,
                label="Prompt (describe the image you want)",
                placeholder="describe the image you want",
            )
            style = gr.update(visible=True)
        if c.stochastic:
            gamma = gr.update(
                interactive=True,
                value=DEFAULT_GAMMA,
                info="Sketch guidance: higher follows your input more closely, lower gives more varied "
                "results (the seed picks the variation).",
            )
        else:
            gamma = gr.update(
                interactive=False,
                value=DEFAULT_GAMMA,
                info="Gamma applies to stochastic (sketch) models only; this model is deterministic.",
            )
        edges = c.preprocess == "canny"
        canny = gr.update(visible=edges)
        what = "paired (pix2pix-turbo)" if c.kind == "paired" else "unpaired (CycleGAN-Turbo)"
        if c.hub:
            where = "from the Hugging Face Hub"
        elif not c.is_file:
            where = "released; downloaded on first use"
        elif c.released:
            where = f"released; file `{Path(c.model).name}` of the models folder"
        else:
            where = f"file `{Path(c.model).name}`"
        direction = f", direction {c.direction}" if c.kind == "unpaired" and not c.released else ""
        text = (
            f"**{html.escape(c.label)}**: {what}{direction}, translates {c.translates}"
            f"{'; stochastic' if c.stochastic else ''} ({where})."
        )
        tab = c.tab
        filled = {"sketch": _has_sketch(sketch), "upload": bool(upload)}
        if not filled[tab] and any(filled.values()):
            tab = "upload" if tab == "sketch" else "sketch"
        shown = gr.update(visible=edges)
        return new_prompt, style, gamma, canny, canny, shown, gr.Tabs(selected=tab), text, tab, typed

    def _remember(self, typed: dict, text: str) -> None:
        """Record in `typed` what the prompt box held for the model it belonged to (see
        `model_changed`): an edited caption per unpaired direction, the user's own paired prompt."""
        label = typed.get("label")  # absent before the first switch
        previous = self._choices.get(label) if label is not None else None
        if previous is None:  # no record (first call, an API client): only text no model pre-fills
            prefilled = {x.prompt for x in self._choices.values()} | {
                x.example_prompt for x in self._choices.values()
            }
            if text and text not in prefilled:
                typed["prompt"] = text
        elif previous.kind == "unpaired":
            captions = dict(typed.get("captions", {}))
            if text != (previous.prompt or ""):
                captions[previous.label] = text
            else:
                captions.pop(previous.label, None)
            typed["captions"] = captions
        else:
            own = text and text not in (previous.prompt, previous.example_prompt)
            typed["prompt"] = text if own else None

    def check_gamma(self, gamma: object) -> tuple[dict, str | dict, bool, bool]:
        """Handler of a gamma change typed or dragged (the raw value: see turbo/app/inputs.py).

        Returns (gamma update, status update, whether to run, whether the box was emptied): a value
        in range runs; one out of range gets the app's message and no run; an emptied box gets the
        default back and no run of its own (the box is being edited; the Translate press that
        usually follows runs it). "Emptied" goes to `run` as gamma_emptied: on leaving an emptied
        box the browser puts 0 in it, which the next run would otherwise take.
        """
        try:
            value = parse_gamma(gamma)
        except GammaError as e:
            self.warn(str(e))
            return gr.update(), _message(str(e)), False, False
        if value is None:
            return gr.update(value=DEFAULT_GAMMA), gr.update(), False, True
        return gr.update(), gr.update(), True, False

    @staticmethod
    def filled_gamma(gamma: object) -> dict:
        """After a run: an emptied gamma box shows the default the run took (else it would show 0,
        which the next run would take)."""
        return gr.update(value=DEFAULT_GAMMA) if gamma is None or gamma == "" else gr.update()

    @staticmethod
    def random_seed() -> int:
        return random.randint(0, 2**31 - 1)

    # ---- translation ----
    def input_image(self, source: str, sketch: dict | Image.Image | None, upload) -> tuple[Image.Image, str]:
        """The image to translate, RGB, and a note for the status line (MissingInputError if there is
        none yet, ImageError if it is unusable).

        sketch: the Sketchpad's value (dict with "composite"); upload: a file path or a PIL image.
        """
        if source == "sketch":
            composite = sketch.get("composite") if isinstance(sketch, dict) else sketch
            if composite is None:
                raise MissingInputError("the canvas is empty: draw something with the brush")
            image = load_image(composite)
            # looked at full size: a thin stroke can fade under the threshold when downscaled
            if np.asarray(image.convert("L")).min() >= 128:
                raise MissingInputError("the canvas is empty: draw something with the brush (dark strokes)")
            # a big canvas (or an API client) costs as much as a big upload: same limit
            image, size = limit_size(image, self.max_side)
        else:
            if upload is None or (isinstance(upload, str) and not upload):
                raise MissingInputError("no image yet: upload one (or paste it from the clipboard)")
            try:  # size as the user sees it (EXIF rotated)
                image, size = load_image_limited(upload, self.max_side)
            except ImageError as e:
                if not isinstance(upload, str | Path):
                    raise
                # gradio keeps the user's file name under a temp folder the user never saw
                raise ImageError(str(e).replace(str(upload), Path(upload).name)) from e
        if image.size != size:
            return image, f" (downscaled from {size[0]}x{size[1]} to {image.width}x{image.height})"
        return image, ""

    def run(
        self,
        source: str,
        label: str | None,
        sketch,
        upload,
        prompt: str | None = None,
        style: str | None = None,
        gamma: float | None = DEFAULT_GAMMA,
        seed: float | None = 42,
        canny_low: float = 100,
        canny_high: float = 200,
        gamma_emptied: bool = False,
    ) -> tuple:
        """Translate the current input. source: "sketch" | "upload"; seed: 0..MAX_SEED (empty: 0);
        gamma: 0..1 (empty: the model's default; used by stochastic models only); canny_low, canny_high:
        0..255, low <= high (used by edge models only). Python or numpy numbers. gamma_emptied: the
        user emptied the gamma box since it last held a value (`check_gamma`): the model's default.

        Returns (output image or None, condition image or None, result file path or None, status
        text, source). Errors come back as a status message (and a warning); nothing is raised.
        """
        try:
            c = self.ready_choice(label)
            seed = parse_seed(seed)
            # checked only where used: a model without that control ignores a stale or empty value
            gamma = parse_gamma(None if gamma_emptied else gamma) if c.stochastic else None
            edges = c.preprocess == "canny"
            canny_low, canny_high = parse_canny(canny_low, canny_high) if edges else (100, 200)
            image, note = self.input_image(source, sketch, upload)
            text = (prompt or "").strip()
            if c.kind == "unpaired" and not text and not c.prompt:
                raise PromptError(
                    f"{c.label} has no caption of its own: write one in the Caption box (what the output "
                    "should show)"
                )
        except MissingInputError as e:  # a hint, not a fault: live events would pop it up repeatedly
            return None, None, None, _hint(str(e)), source
        except TurboError as e:
            self.warn(str(e))
            return None, None, None, _message(str(e)), source
        try:
            if c.kind == "paired" and text and style and style != NO_STYLE:
                text = styled_prompt(text, style)
            self.pipeline.load(c.model)  # downloads and file reads happen outside the GPU function
            result = gpu_translate(
                self.pipeline_key, image, c.model, prompt=text or None, direction=c.direction,
                gamma=gamma, seed=seed, canny_low=canny_low, canny_high=canny_high,
            )  # fmt: skip
        except TurboError as e:
            if isinstance(e, CheckpointError) and c.is_file:
                self.folder.mark_unusable(c.model, str(e))
            self.warn(str(e))
            return None, None, None, _message(str(e)), source
        except Exception as e:  # keep serving whatever happens; the log has the traceback
            logger.exception("translation failed")
            self.warn(f"translation failed: {type(e).__name__}: {e}")
            return None, None, None, _message(f"translation failed: {type(e).__name__}: {e}"), source
        path = self._save(result.image, c)
        status = f"Done in **{result.seconds:.2f} s** with `{html.escape(c.label)}`{note}."
        if c.stochastic:
            status += f" Gamma {result.gamma:.2f}, seed {seed}."
        return result.image, result.condition, str(path), status, source

    def _save(self, image: Image.Image, c: Choice) -> Path:
        stem = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in Path(c.label).stem)
        fd, name = tempfile.mkstemp(prefix=f"turbo_{stem}_", suffix=".png", dir=self.output_dir)
        with open(fd, "wb") as f:
            image.save(f, format="PNG")
        self._outputs.append(Path(name))
        while len(self._outputs) > KEEP_OUTPUTS:
            self._outputs.popleft().unlink(missing_ok=True)
        return Path(name)


def _has_sketch(sketch) -> bool:
    composite = sketch.get("composite") if isinstance(sketch, dict) else sketch
    if not isinstance(composite, Image.Image):
        return False
    return bool(np.asarray(composite.convert("L")).min() < 128)
