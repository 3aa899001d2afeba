"""The six models released with img2img-turbo: where they live and how to feed them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from turbo.download import default_cache_dir, download
from turbo.errors import TurboError

if TYPE_CHECKING:
    from turbo.formats import TurboCheckpoint
    from turbo.formats.checkpoint import Direction, Kind
    from turbo.preprocess import Preprocess

BASE_URL = "https://www.cs.cmu.edu/~img2img-turbo/models/"

# Prompt templates of the original sketch demo; "{prompt}" is replaced by the user's text.
STYLES: dict[str, str] = {
    "Cinematic": "cinematic still {prompt} . emotional, harmonious, vignette, highly detailed, high budget, "
    "bokeh, cinemascope, moody, epic, gorgeous, film grain, grainy",
    "3D Model": "professional 3d model {prompt} . octane render, highly detailed, volumetric, "
    "dramatic lighting",
    "Anime": "anime artwork {prompt} . anime style, key visual, vibrant, studio anime,  highly detailed",
    "Digital Art": "concept art {prompt} . digital artwork, illustrative, painterly, matte painting, "
    "highly detailed",
    "Photographic": "cinematic photo {prompt} . 35mm photograph, film, bokeh, professional, 4k, "
    "highly detailed",
    "Pixel art": "pixel-art {prompt} . low-res, blocky, pixel art style, 8-bit graphics",
    "Fantasy art": "ethereal fantasy concept art of  {prompt} . magnificent, celestial, ethereal, painterly, "
    "epic, majestic, magical, fantasy art, cover art, dreamy",
    "Neonpunk": "neonpunk style {prompt} . cyberpunk, vaporwave, neon, vibes, vibrant, stunningly beautiful, "
    "crisp, detailed, sleek, ultramodern, magenta highlights, dark purple shadows, high contrast, cinematic, "
    "ultra detailed, intricate, professional",
    "Manga": "manga style {prompt} . vibrant, high-energy, detailed, iconic, Japanese comic style",
}
DEFAULT_STYLE = "Fantasy art"


class UnknownModelError(TurboError):
    """A model name that is not one of the released models."""


class UnknownStyleError(TurboError):
    """A style name that is not in STYLES."""


@dataclass(frozen=True)
class ReleasedModel:
    """A released checkpoint and the conventions it was trained with.

    kind: "paired" (pix2pix-turbo, prompt given by the user) or "unpaired" (CycleGAN-Turbo, fixed
    caption). preprocess: "canny" (edges of the input), "sketch" (dark strokes = 1) or "unpaired"
    (input in [-1, 1]). direction: "a2b"/"b2a" for unpaired models, else None. image_prep: the
    unpaired CLI's default preparation (paired models resize to a multiple of 8 instead).
    default_gamma: the stochastic model's default interpolation between input and noise, in [0, 1].
    """

    name: str
    url: str
    filename: str
    kind: Kind
    stochastic: bool
    preprocess: Preprocess
    direction: Direction | None = None
    caption: str | None = None
    example_prompt: str | None = None
    image_prep: str | None = None
    default_gamma: float | None = None


def _paired(name: str, filename: str, **fields) -> ReleasedModel:
    return ReleasedModel(name=name, url=BASE_URL + filename, filename=filename, kind="paired", **fields)


def _unpaired(name: str, filename: str, direction: Direction, caption: str) -> ReleasedModel:
    return ReleasedModel(
        name=name,
        url=BASE_URL + filename,
        filename=filename,
        kind="unpaired",
        stochastic=False,
        preprocess="unpaired",
        direction=direction,
        caption=caption,
        image_prep="resize_512x512",
    )


# day2night.pkl and night2day.pkl (and clear2rainy/rainy2clear) each hold both directions; the
# original picks the direction per released name.
RELEASED: dict[str, ReleasedModel] = {
    model.name: model
    for model in (
        _paired(
            "edge_to_image",
            "edge_to_image_loras.pkl",
            stochastic=False,
            preprocess="canny",
            example_prompt="a blue bird",
        ),
        _paired(
            "sketch_to_image_stochastic",
            "sketch_to_image_stochastic_lora.pkl",
            stochastic=True,
            preprocess="sketch",
            example_prompt="an asteroid",
            default_gamma=0.4,
        ),
        _unpaired("day_to_night", "day2night.pkl", "a2b", "driving in the night"),
        _unpaired("night_to_day", "night2day.pkl", "b2a", "driving in the day"),
        _unpaired("clear_to_rainy", "clear2rainy.pkl", "a2b", "driving in heavy rain"),
        _unpaired("rainy_to_clear", "rainy2clear.pkl", "b2a", "driving in the day"),
    )
}


def get_released(name: str) -> ReleasedModel:
    """The released model called name; UnknownModelError lists the valid names."""
    try:
        return RELEASED[name]
    except KeyError:
        raise UnknownModelError(f"unknown model {name!r}; released models: {', '.join(RELEASED)}") from None


def styled_prompt(prompt: str, style: str = DEFAULT_STYLE) -> str:
    """prompt placed in a STYLES template, as the original sketch demo does."""
    if style not in STYLES:
        raise UnknownStyleError(f"unknown style {style!r}; styles: {', '.join(STYLES)}")
    return STYLES[style].replace("{prompt}", prompt)


def checkpoint_path(name: str, cache_dir: Path | None = None, progress: bool = True) -> Path:
    """Local path of a released checkpoint, downloaded into cache_dir (default_cache_dir()) if missing.

    Raises UnknownModelError for a bad name and turbo.download.DownloadError when it cannot be fetched.
    """
    model = get_released(name)
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return download(model.url, directory / model.filename, progress=progress)


def released_file(filename: str) -> ReleasedModel | None:
    """The first released model whose file is called `filename` (two names share each unpaired file)."""
    return next((m for m in RELEASED.values() if m.filename == filename), None)


def apply_released_conventions(ckpt: TurboCheckpoint, filename: str) -> bool:
    """Give an original `.pkl` read from a file called `filename` what the original code hard-codes
    per released model and is not in the file: its input (Canny edges, sketch), image preparation
    and, for unpaired models, the caption of the direction it runs. False for any other name."""
    released = released_file(filename)
    if released is None:
        return False
    ckpt.preprocess, ckpt.image_prep = released.preprocess, released.image_prep
    if released.caption:
        assert released.direction is not None, "a caption belongs to an unpaired model's direction"
        ckpt.prompts[released.direction] = released.caption
    return True
