"""Subcommands of the `retinanet` CLI (see retinanet/cli.py)."""

from __future__ import annotations

import os
from pathlib import Path


def check_output_path(path, flag: str, folder: bool = False) -> None:
    """Refuse, before any work, an output that cannot be written: a path under a file, in a folder
    that is not writable, or (for a file) an existing folder / (for a folder) an existing file.
    Folders on the way that do not exist yet are made when writing."""
    p = Path(path)
    if p.exists() and p.is_dir() != folder:
        raise ValueError(f"{flag} {p} is a {'file' if folder else 'folder'}; give "
                         f"{'a folder' if folder else 'a file name'}")
    parent = next(a for a in p.absolute().parents if a.exists())  # the nearest existing folder above it
    if not parent.is_dir():
        raise ValueError(f"{flag} {p}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {p}: the folder {parent} is not writable")
