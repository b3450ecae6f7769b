"""Scratch files the app hands to the browser (exported conversations, runs CSV): one private folder per process,
a fresh subfolder per file so sessions never overwrite each other's, and anything older than an hour removed."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

MAX_AGE_S = 3600.0


def scratch_root() -> Path:
    root = Path(tempfile.gettempdir()) / f"qdemo-scratch-{os.getpid()}"
    root.mkdir(mode=0o700, exist_ok=True)
    return root


def prune(max_age_s: float = MAX_AGE_S) -> int:
    """Remove scratch folders older than `max_age_s`; returns how many went."""
    now, removed = time.time(), 0
    for folder in scratch_root().iterdir():
        try:
            if now - folder.stat().st_mtime > max_age_s:
                shutil.rmtree(folder, ignore_errors=True)
                removed += 1
        except OSError:
            continue
    return removed


def scratch_dir() -> Path:
    prune()
    return Path(tempfile.mkdtemp(dir=scratch_root()))


def scratch_file(name: str) -> Path:
    return scratch_dir() / name
