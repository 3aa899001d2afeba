"""The app's models folder: which checkpoint files in it can be offered, which are unusable and why.

A file is offered only once it is complete: temporary names (hidden files, `.part`, `.tmp`, ...)
are ignored, and a file must keep the same size and modification time for `settle_seconds` before
it is read (a copy in progress keeps changing). Each complete file is then read once per version
(size, mtime) with `turbo.formats.checkpoint.load_checkpoint`, so a broken file is listed as unusable with
the reason, and a changed file is read again.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from turbo.errors import TurboError
from turbo.formats import CheckpointError, file_version, load_checkpoint
from turbo.formats.checkpoint import Direction

logger = logging.getLogger(__name__)

SUFFIXES = (".safetensors", ".pkl")
# What downloaders, editors and our own writers use while a file is still being written.
TEMP_SUFFIXES = (".part", ".partial", ".tmp", ".temp", ".crdownload", ".download", ".incomplete", "~")
SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


class UploadError(TurboError):
    """An uploaded file that cannot go into the models folder."""


@dataclass
class FolderModel:
    """One checkpoint file of the models folder, as the app offers it.

    status: "ok" (offered), "unusable" (reason says why) or "pending" (still being written).
    prompts: direction -> default prompt/caption; directions: "a2b"/"b2a".
    """

    path: Path
    status: str
    reason: str = ""
    kind: str = ""
    stochastic: bool = False
    preprocess: str = ""
    directions: list[Direction] = field(default_factory=list)
    prompts: dict[Direction, str] = field(default_factory=dict)
    version: tuple[int, int] = (0, 0)  # (size, mtime_ns)

    @property
    def name(self) -> str:
        return self.path.name


def is_candidate(path: Path) -> bool:
    """A name the folder may offer: a .safetensors/.pkl file that is not a temporary or hidden file."""
    name = path.name
    if name.startswith(".") or name.endswith(TEMP_SUFFIXES):
        return False
    return path.suffix.lower() in SUFFIXES


class ModelsFolder:
    """Scans a folder for checkpoints; thread-safe (the app's timer and its buttons both scan).

    settle_seconds: how long a file must stay unchanged (size and mtime) before it is read; a file
    whose mtime is already that old when first seen is read at once (so existing files show up at
    start-up).
    """

    def __init__(self, folder: str | Path, settle_seconds: float = 2.0):
        self.folder = Path(folder).expanduser()
        self.settle_seconds = settle_seconds
        self._seen: dict[Path, tuple[tuple[int, int], float]] = {}  # path -> (version, first seen at)
        self._known: dict[Path, FolderModel] = {}  # read results, by path (for its version)
        self._lock = threading.Lock()

    def scan(self) -> list[FolderModel]:
        """Every checkpoint file in the folder (sorted by name), each ok, unusable or pending."""
        with self._lock:
            now = time.time()
            found: list[FolderModel] = []
            paths = sorted(p for p in self._list() if is_candidate(p))
            for path in paths:
                version = file_version(path)
                if version is None:
                    continue
                found.append(self._entry(path, version, now))
            for gone in set(self._seen) - set(paths):
                self._seen.pop(gone, None)
                self._known.pop(gone, None)
            return found

    def _list(self) -> list[Path]:
        try:
            return [p for p in self.folder.iterdir() if p.is_file()]
        except FileNotFoundError:
            return []
        except OSError as e:
            logger.warning("cannot list the models folder %s: %s", self.folder, e)
            return []

    def _entry(self, path: Path, version: tuple[int, int], now: float) -> FolderModel:
        known = self._known.get(path)
        if known is not None and known.version == version:
            return known
        seen = self._seen.get(path)
        if seen is None or seen[0] != version:
            self._seen[path] = (version, now)
            seen = self._seen[path]
        age = now - version[1] / 1e9
        if now - seen[1] < self.settle_seconds and age < self.settle_seconds:
            return FolderModel(path, "pending", "still being written", version=version)
        entry = read_entry(path, version)
        self._known[path] = entry
        return entry

    def offered(self) -> list[FolderModel]:
        """The usable checkpoints only."""
        return [m for m in self.scan() if m.status == "ok"]

    def mark_unusable(self, path: str | Path, reason: str) -> None:
        """Record that a file failed to load in the pipeline (until the file changes)."""
        path = Path(path)
        with self._lock:
            entry = self._known.get(path) or self._known.get(path.resolve())
            if entry is not None:
                entry.status, entry.reason = "unusable", reason

    def add_upload(
        self, source: str | Path, name: str | None = None, check: Callable[[Path], object] | None = None
    ) -> FolderModel:
        """Copy an uploaded checkpoint into the folder (validated first, written atomically, never
        over an existing file: a free name like `model-2.safetensors` is chosen instead).

        check: called with the copy's path, e.g. to load it onto the app's base; if it raises, the
        copy is removed, and a CheckpointError (a checkpoint made for another base) becomes an
        UploadError.
        """
        source = Path(source)
        name = SAFE_NAME.sub("_", Path(name or source.name).name).lstrip(".") or "model"
        if Path(name).suffix.lower() not in SUFFIXES:
            raise UploadError(f"{name}: a checkpoint must be a .safetensors or .pkl file")
        try:
            load_checkpoint(source)
        except CheckpointError as e:
            raise UploadError(
                f"{name} is not a usable checkpoint: {str(e).replace(str(source), name)}"
            ) from e
        self.folder.mkdir(parents=True, exist_ok=True)
        stem, suffix = Path(name).stem, Path(name).suffix
        dest, n = self.folder / name, 1
        while dest.exists():
            n += 1
            dest = self.folder / f"{stem}-{n}{suffix}"
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=self.folder)
        os.close(fd)
        try:
            shutil.copyfile(source, tmp)
            os.replace(tmp, dest)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        if check is not None:
            try:
                check(dest)
            except BaseException as e:
                dest.unlink(missing_ok=True)
                if not isinstance(e, CheckpointError):
                    raise
                reason = str(e).replace(str(dest.resolve()), name).replace(str(dest), name)
                raise UploadError(reason if reason.startswith(name) else f"{name}: {reason}") from e
        version = file_version(dest) or (0, 0)
        entry = read_entry(dest, version)
        with self._lock:
            self._known[dest] = entry
            self._seen[dest] = (version, 0.0)
        return entry


def read_entry(path: Path, version: tuple[int, int]) -> FolderModel:
    """Read a checkpoint file fully (so a broken one is found now, not when a user picks it)."""
    try:
        ckpt = load_checkpoint(path)
        # built inside the try: whatever a file holds must not stop the app from listing the others
        return FolderModel(
            path=path,
            status="ok",
            kind=ckpt.kind,
            stochastic=ckpt.stochastic,
            preprocess=ckpt.preprocess,
            directions=ckpt.directions,
            prompts=dict(ckpt.prompts),
            version=version,
        )
    except CheckpointError as e:
        reason = str(e).replace(f"{path}: ", "").replace(str(path), path.name)
        logger.warning("unusable checkpoint %s: %s", path, reason)
        return FolderModel(path, "unusable", reason, version=version)
    except Exception as e:  # a reader bug must not stop the app from listing the other files
        logger.exception("reading %s failed", path)
        return FolderModel(path, "unusable", f"{type(e).__name__}: {e}", version=version)
