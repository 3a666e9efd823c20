"""Writes that survive a crash or a power cut: a file is on disk only once it and the directory that
names it are fsynced. Owned here so that every writer of a replace-by-rename (the model registry, the
committee file) does it the same way."""
from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(path: Path | str) -> None:
    """The directory's entries on disk: a rename inside it survives a power cut."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path | str) -> None:
    """Every file under `root`, then every directory, deepest first: all of it on disk."""
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(folder)
