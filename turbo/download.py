"""Downloading checkpoints into a local cache, atomically.

A download streams into a temporary `.part` file next to its destination and is renamed into place
only once complete (size checked against Content-Length, data fsynced), so an interrupted download
never leaves a file that looks like a finished checkpoint.
"""

from __future__ import annotations

import http.client
import logging
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO

from tqdm import tqdm

from turbo.errors import TurboError

logger = logging.getLogger(__name__)

OFFLINE_VARIABLES = ("TURBO_OFFLINE", "HF_HUB_OFFLINE")
CHUNK_BYTES = 1 << 20
USER_AGENT = "turbo-downloader/0.1"


class DownloadError(TurboError):
    """A file could not be downloaded; the message says how to place it by hand."""


def default_cache_dir() -> Path:
    """The checkpoint cache: $TURBO_CACHE if set, else ~/.cache/turbo."""
    configured = os.environ.get("TURBO_CACHE")
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "turbo"


def offline_variable() -> str | None:
    """The name of the environment variable that forbids network access, or None."""
    for name in OFFLINE_VARIABLES:
        if os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on"):
            return name
    return None


def download(url: str, dest: Path, progress: bool = True, timeout: float = 30.0) -> Path:
    """Download url to dest unless dest already exists; returns dest.

    timeout: seconds to wait for the connection and for each read. Raises DownloadError when
    offline mode is set (before any network access), on network or HTTP errors, and when the
    server sends fewer bytes than it announced; no partial file is left behind.
    """
    dest = Path(dest)
    if dest.is_file():
        logger.info("using existing file %s", dest)
        return dest
    manual = f"download it elsewhere and place it at {dest}"
    variable = offline_variable()
    if variable is not None:
        raise DownloadError(f"cannot download {url}: offline mode ({variable} is set); {manual}")

    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        # A unique name, so two processes fetching the same file do not write into each other's data.
        handle, part_name = tempfile.mkstemp(dir=dest.parent, prefix=f"{dest.name}.", suffix=".part")
    except OSError as exc:
        raise DownloadError(f"cannot write into {dest.parent}: {exc}") from exc
    part = Path(part_name)
    try:
        with os.fdopen(handle, "wb") as out:
            _fetch(url, out, progress, timeout, dest, manual)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(part, 0o644)  # mkstemp makes it private; a cache is usually shared
        os.replace(part, dest)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    fsync_directory(dest.parent)
    logger.info("downloaded %s to %s", url, dest)
    return dest


def _fetch(url: str, out: IO[bytes], progress: bool, timeout: float, dest: Path, manual: str) -> None:
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    logger.info("downloading %s to %s", url, dest)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            header = response.headers.get("Content-Length")
            expected = int(header) if header and header.strip().isdigit() else None
            received = 0
            with tqdm(
                total=expected,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=dest.name,
                disable=not progress,
            ) as bar:
                while chunk := response.read(CHUNK_BYTES):
                    _write(out, chunk, dest)
                    received += len(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as exc:
        raise DownloadError(f"cannot download {url}: HTTP {exc.code} {exc.reason}; {manual}") from exc
    except urllib.error.URLError as exc:
        raise DownloadError(f"cannot download {url}: {exc.reason}; check the network, or {manual}") from exc
    except http.client.IncompleteRead as exc:
        raise DownloadError(
            f"download of {url} is incomplete: the connection closed early "
            f"({len(exc.partial)} bytes in the last read); {manual}"
        ) from exc
    except (OSError, http.client.HTTPException) as exc:  # timeouts, resets, malformed responses
        raise DownloadError(f"cannot download {url}: {exc}; check the network, or {manual}") from exc
    if expected is not None and received != expected:
        raise DownloadError(f"download of {url} is incomplete: got {received} of {expected} bytes; {manual}")


def _write(out: IO[bytes], chunk: bytes, dest: Path) -> None:
    # A full disk is not a network problem: say so, outside _fetch's network handlers.
    try:
        out.write(chunk)
    except OSError as exc:
        raise DownloadError(f"cannot write the download for {dest}: {exc}") from exc


def fsync_directory(directory: Path) -> None:
    """Make a rename inside `directory` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
