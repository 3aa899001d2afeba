"""What a model name refers to, and getting its file: a local checkpoint, a released model, or a
model on the Hugging Face Hub.

A name is read in this order (the first that fits wins):

1. an existing local path (a `.safetensors` or original `.pkl` file);
2. a released name (`turbo.registry.RELEASED`, e.g. `edge_to_image`);
3. a Hub id: `owner/repo` (the repo's one checkpoint), `owner/repo/FILE.safetensors` (or `.pkl`; a
   file of a repo holding several), with a revision (branch, tag or commit) as `owner/repo@REV` or
   `owner/repo@REV/FILE.safetensors`, as huggingface_hub's `hf://` paths write it.

Anything else is refused by `parse_model` with one line saying which of the three it was taken for.
Hub files come through huggingface_hub (its cache, resumed downloads, `HF_TOKEN`, `HF_HUB_CACHE`);
with `HF_HUB_OFFLINE` (or `TURBO_OFFLINE`) set only the cache is read, and no request is made.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub as hh
from huggingface_hub import constants, errors

from turbo.download import offline_variable
from turbo.errors import TurboError, first_line
from turbo.registry import RELEASED, UnknownModelError, checkpoint_path

logger = logging.getLogger(__name__)

CHECKPOINT_SUFFIXES = (".safetensors", ".pkl")
FORMS = "owner/repo, owner/repo/FILE.safetensors (or .pkl), owner/repo@REVISION"
# huggingface_hub's rule for each half of a repo id (validate_repo_id): letters, digits, - _ .,
# at most 96, no "--" or "..", not starting or ending with - or .
_NAME = re.compile(r"(?!.*(--|\.\.))[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?")
_REVISION = re.compile(r"[A-Za-z0-9_.\-]{1,200}")
SHOWN = 8  # files named in a message at most


class ModelNameError(UnknownModelError):
    """A model string that is none of a local file, a released name and a Hub id."""


class HubModelError(TurboError):
    """A Hub model that cannot be had: not found, gated, private, no checkpoint, offline and not cached."""


@dataclass(frozen=True)
class HubModel:
    """A model on the Hub. filename: a top-level `.safetensors`/`.pkl` of the repo, or None (the
    repo's only one); revision: a branch, tag or commit, or None (main)."""

    repo_id: str
    filename: str | None = None
    revision: str | None = None

    def __str__(self) -> str:
        at = f"@{self.revision}" if self.revision else ""
        return f"{self.repo_id}{at}" + (f"/{self.filename}" if self.filename else "")

    @property
    def url(self) -> str:
        return f"https://huggingface.co/{self.repo_id}"


@dataclass(frozen=True)
class ModelSource:
    """What a model string names. kind: "file" (path set), "released" (a RELEASED name) or "hub"
    (hub set)."""

    text: str
    kind: str
    path: Path | None = None
    hub: HubModel | None = None

    @property
    def key(self) -> str:
        """The pipeline's cache key: a file's absolute path (symbolic links not followed: a deleted
        link can still be named, a link pointed elsewhere is another version), the released name, or
        the Hub id as `HubModel` writes it."""
        if self.path is not None:  # kind "file"
            return os.path.abspath(self.path)
        return self.text if self.hub is None else str(self.hub)


def parse_model(text: str | Path) -> ModelSource:
    """What `text` names (see the module doc); ModelNameError when it is none of the three. Reads
    only the local file system: no download, no request."""
    if isinstance(text, Path):
        text = str(text)
    if not text.strip():
        raise ModelNameError(
            f"empty model name: give a released model ({', '.join(RELEASED)}), a checkpoint file, "
            f"or a Hub id ({FORMS})"
        )
    path = Path(text).expanduser()
    if path.is_file():
        return ModelSource(text, "file", path=path)
    if path.is_dir():
        raise ModelNameError(f"{text} is a folder: give the checkpoint file in it (.safetensors or .pkl)")
    if text in RELEASED:
        return ModelSource(text, "released")
    taken = _taken_for(text)
    if taken == "hub":
        return ModelSource(text, "hub", hub=_parse_hub(text))
    if taken == "file":
        why = _why_file(text)
        raise ModelNameError(f"no such checkpoint file: {text} (taken for a local file, as it {why})")
    raise ModelNameError(
        f"unknown model {text!r} (taken for a released name): released models are "
        f"{', '.join(RELEASED)}; no file of that name exists, and a Hub id reads {FORMS}"
    )


def _taken_for(text: str) -> str:
    """Which of the three a string that is no existing file nor released name is read as."""
    if text.startswith(("/", "./", "../", "~")) or "\\" in text or re.match(r"[A-Za-z]:", text):
        return "file"
    parts = text.split("/")
    if len(parts) == 1:
        return "file" if text.lower().endswith(CHECKPOINT_SUFFIXES) else "released"
    # "runs/model.safetensors" is a folder and a file, not a repo called "model.safetensors"
    if len(parts) == 2 and parts[1].lower().endswith(CHECKPOINT_SUFFIXES):
        return "file"
    return "hub"


def _why_file(text: str) -> str:
    if text.startswith(("/", "./", "../", "~")) or "\\" in text or re.match(r"[A-Za-z]:", text):
        return "starts like a path"
    return "ends in a checkpoint suffix"


def _parse_hub(text: str) -> HubModel:
    """`text` (slashes, not a file) as a Hub id, or ModelNameError saying what is wrong with it."""

    def bad(reason: str) -> ModelNameError:
        return ModelNameError(
            f"{text!r} is no existing file and not a valid Hub id (taken for a Hub id: {reason}); "
            f"Hub ids read {FORMS}"
        )

    if any(c.isspace() for c in text):
        raise bad("it contains spaces")
    parts = text.split("/")
    if len(parts) > 3:
        raise bad(f"it has {len(parts)} parts, at most 3 (owner/repo/FILE)")
    owner, repo = parts[0], parts[1]
    repo, sep, revision = repo.partition("@")
    if sep and not _REVISION.fullmatch(revision):
        raise bad(f"revision {revision!r} after @ must be a branch, tag or commit")
    for what, name in (("owner", owner), ("repo name", repo)):
        if not _NAME.fullmatch(name):
            raise bad(
                f"{what} {name!r} must be 1-96 letters, digits, '-', '_' or '.', "
                "not starting or ending with '-' or '.', without '--' or '..'"
            )
    filename = parts[2] if len(parts) == 3 else None
    if filename is not None and not filename.lower().endswith(CHECKPOINT_SUFFIXES):
        raise bad(f"the file {filename!r} must end in .safetensors or .pkl")
    return HubModel(f"{owner}/{repo}", filename, revision or None)


# ---- getting the file ----
def _hub_errors() -> tuple[type[BaseException], ...]:
    """What huggingface_hub raises for a repo, a file or the network: its HTTP errors and missing
    entries are OSErrors (or EntryNotFoundError), a bad id is HFValidationError; a connection may fail
    with its HTTP client's own error (httpx2 in huggingface_hub 2, httpx before)."""
    found: list[type[BaseException]] = [OSError, errors.EntryNotFoundError, errors.HFValidationError]
    for client in ("httpx2", "httpx"):
        try:
            found.append(importlib.import_module(client).HTTPError)
        except (ImportError, AttributeError):
            pass
    return tuple(found)


HUB_ERRORS = _hub_errors()

_fetched: dict[tuple[str | None, HubModel], Path] = {}  # (HF_HUB_CACHE, id) -> file
_fetched_lock = threading.Lock()


def model_file(
    source: ModelSource | str | Path, cache_dir: Path | None = None, progress: bool = True
) -> Path:
    """The local checkpoint file of a model: the file itself, the released file (downloaded into
    cache_dir, default `turbo.download.default_cache_dir()`), or the Hub file (through
    huggingface_hub's cache). A Hub id is resolved once per process: later calls (the pipeline
    reloading an evicted model) make no request. Raises ModelNameError, HubModelError or
    turbo.download.DownloadError."""
    if not isinstance(source, ModelSource):
        source = parse_model(source)
    if source.path is not None:  # kind "file"
        return source.path
    if source.hub is None:  # kind "released"
        return checkpoint_path(source.text, cache_dir, progress=progress)
    memo = (hub_cache_dir(), source.hub)
    with _fetched_lock:
        known = _fetched.get(memo)
    if known is not None and known.is_file():
        return known
    path = hub_file(source.hub)
    with _fetched_lock:
        _fetched[memo] = path
    return path


def _offline() -> str | None:
    """The variable that keeps us off the network, HF_HUB_OFFLINE named first (the Hub's own)."""
    variable = offline_variable()
    hub_flag = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    return "HF_HUB_OFFLINE" if variable and hub_flag else variable


def hub_cache_dir() -> str | None:
    """HF_HUB_CACHE as set now (huggingface_hub reads it once, at import), else None (its default)."""
    return os.environ.get("HF_HUB_CACHE") or None


def hub_file(hub: HubModel) -> Path:
    """Download (or find in the cache) the checkpoint `hub` names; HubModelError otherwise."""
    filename = hub.filename or _only_checkpoint(hub)
    try:
        path = hh.hf_hub_download(
            hub.repo_id,
            filename,
            revision=hub.revision,
            cache_dir=hub_cache_dir(),
            local_files_only=_offline() is not None,
        )
    except HUB_ERRORS as e:  # said in one line with what to do; anything else is a bug
        raise _hub_error(hub, e, filename) from e
    logger.info("%s is %s", hub, path)
    return Path(path)


def _only_checkpoint(hub: HubModel) -> str:
    """The repo's one top-level `.safetensors`/`.pkl` file; HubModelError for none or several."""
    files = repo_files(hub)
    found = [f for f in files if "/" not in f and f.lower().endswith(CHECKPOINT_SUFFIXES)]
    if not found:
        listed = _listed([f for f in files if not f.startswith(".")]) or "nothing"
        diffusers = " (a diffusers model, not a turbo one)" if "model_index.json" in files else ""
        raise HubModelError(
            f"{hub} holds no turbo checkpoint (a .safetensors or .pkl file at its top level){diffusers}; "
            f"it has {listed}"
        )
    if len(found) > 1:
        at = f"@{hub.revision}" if hub.revision else ""
        raise HubModelError(
            f"{hub} holds several checkpoints ({_listed(found)}): name one, e.g. {hub.repo_id}{at}/{found[0]}"
        )
    return found[0]


def repo_files(hub: HubModel) -> list[str]:
    """The repo's files (at hub.revision): asked of the Hub, or read from the cache offline and
    when the Hub cannot be reached."""
    if _offline() is None:
        try:
            return hh.HfApi().list_repo_files(hub.repo_id, revision=hub.revision)
        except (errors.RepositoryNotFoundError, errors.RevisionNotFoundError) as e:
            raise _hub_error(hub, e) from e
        except HUB_ERRORS as e:  # no connection, the Hub down: perhaps it is cached
            logger.warning("cannot list %s on the Hub (%s); looking in the cache", hub, first_line(e))
    try:
        folder = hh.snapshot_download(
            hub.repo_id,
            revision=hub.revision,
            cache_dir=hub_cache_dir(),
            local_files_only=True,
            allow_patterns=[f"*{s}" for s in CHECKPOINT_SUFFIXES],
        )
    except HUB_ERRORS as e:
        raise _hub_error(hub, e) from e
    return sorted(p.name for p in Path(folder).iterdir() if p.is_file())


def _listed(names: list[str]) -> str:
    more = f", ... ({len(names) - SHOWN} more)" if len(names) > SHOWN else ""
    return ", ".join(names[:SHOWN]) + more


def _hub_error(hub: HubModel, e: BaseException, filename: str | None = None) -> TurboError:
    """The one line a user reads for a huggingface_hub error about `hub`."""
    what = f"{hub.repo_id}/{filename}" if filename and not hub.filename else str(hub)
    login = "set HF_TOKEN (or run `hf auth login`)"
    if isinstance(e, errors.GatedRepoError):
        return HubModelError(
            f"{hub.repo_id} is a gated repo: accept its conditions at {hub.url} with your account and "
            f"{login}" + ("" if hh.get_token() is None else "; your token has no access to it yet")
        )
    if isinstance(e, errors.RepositoryNotFoundError):
        token = "if it is private, " + login if hh.get_token() is None else "or your token cannot read it"
        hint = " (or a local file: none exists at that path)" if hub.filename else ""
        return HubModelError(f"Hub repo {hub.repo_id} not found{hint}: check the name; {token}")
    if isinstance(e, errors.RevisionNotFoundError):
        return HubModelError(f"{hub.repo_id} has no revision {hub.revision!r} (a branch, tag or commit)")
    if isinstance(e, errors.LocalEntryNotFoundError):
        variable = _offline()
        cache = hub_cache_dir() or constants.HF_HUB_CACHE
        if variable is not None:
            return HubModelError(
                f"{what} is not in the Hugging Face cache ({cache}) and {variable} is set: download it "
                f"once with network (`hf download {hub.repo_id}`{' ' + filename if filename else ''}), "
                f"or unset {variable}"
            )
        return HubModelError(
            f"cannot reach the Hugging Face Hub for {what} and it is not in the cache ({cache}): "
            "check the network, or download it elsewhere into that cache"
        )
    if isinstance(e, errors.EntryNotFoundError):
        return HubModelError(f"{hub.repo_id} has no file {filename!r}{_at(hub)}: {_files_hint(hub)}")
    if isinstance(e, OSError) and not isinstance(e, errors.HfHubHTTPError):
        return HubModelError(f"cannot store {what} in the Hugging Face cache: {first_line(e)}")
    return HubModelError(f"cannot get {what} from the Hugging Face Hub: {first_line(e)}")


def _at(hub: HubModel) -> str:
    return f" at revision {hub.revision}" if hub.revision else ""


def _files_hint(hub: HubModel) -> str:
    try:
        files = repo_files(HubModel(hub.repo_id, None, hub.revision))
    except TurboError:
        return "check the name"
    found = [f for f in files if "/" not in f and f.lower().endswith(CHECKPOINT_SUFFIXES)]
    return f"its checkpoints are {_listed(found)}" if found else "it holds no .safetensors or .pkl file"
