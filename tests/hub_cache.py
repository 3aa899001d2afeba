"""A Hugging Face Hub cache folder laid out as huggingface_hub lays it out, filled by tests.

models--OWNER--NAME/blobs/<sha256> (the files' bytes), snapshots/<commit>/<file> (relative links to
the blobs) and refs/<branch or tag> (the commit, no newline). Point HF_HUB_CACHE at the root and set
HF_HUB_OFFLINE=1: hf_hub_download and snapshot_download then read it without any request.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path


def add_to_hub_cache(
    root: Path,
    repo_id: str,
    files: dict[str, Path | bytes],
    refs: tuple[str, ...] = ("main",),
    commit: str = "",
) -> Path:
    """Store `files` (name in the repo -> a file to copy, or bytes) as one commit of `repo_id` under
    the cache `root`, named by each of `refs`; returns the snapshot folder."""
    repo = Path(root) / f"models--{repo_id.replace('/', '--')}"
    commit = commit or hashlib.sha1(repr((repo_id, sorted(files), refs)).encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        data = content if isinstance(content, bytes) else Path(content).read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return snapshot


def remove_from_hub_cache(root: Path, repo_id: str) -> None:
    shutil.rmtree(Path(root) / f"models--{repo_id.replace('/', '--')}", ignore_errors=True)
