"""Durable writes: what atomic renames need so that a crash leaves either the old file or the complete new one."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

# `.partial-NAME-PID-XXXX`: mkdtemp's random suffix never holds a dash, so the last number between dashes is the PID.
STAGING_OWNER = re.compile(r"-(\d+)-[^-]+$")


def fsync_path(path: Path) -> None:
    """Flush a file's or a directory's contents (a directory's: its entries) to the disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fsync_tree(directory: Path) -> None:
    """Flush every file and folder below `directory`, deepest first, then the directory itself."""
    for path in sorted(directory.rglob("*"), reverse=True):
        fsync_path(path)
    fsync_path(directory)


def staging_directory(parent: Path, name: str) -> Path:
    """A new hidden `.partial-NAME-PID-XXXX` folder in `parent` to build `name` in before renaming it into place.
    Folders that processes killed mid-build left there are removed first; a live process's (a parallel rank's) stay."""
    parent.mkdir(parents=True, exist_ok=True)
    for path in parent.glob(".partial-*"):
        owner = STAGING_OWNER.search(path.name)
        if owner and not process_is_alive(int(owner.group(1))):
            shutil.rmtree(path, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f".partial-{name}-{os.getpid()}-", dir=parent))


def process_is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, and someone else's
        return True
    return True
