"""Small state files the relay keeps beside its spool, each replaced whole and durably.

`revocations.json`, `rotations.json`, the drain order and the MTA-STS policy cache are written
the same way: a temporary file beside the target, readable by the relay's user only (they hold
password hashes or say where mail goes), synced, renamed over the target, and the directory
synced, so a crash leaves the old file or the new one, whole, and never a file another user can
read.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def sync_dir(directory: Path) -> None:
    """fsync a directory, so a rename in it survives a power cut."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_durably(path: Path, data: bytes, *, fsync: bool = True) -> None:
    """Replace `path` with `data` (blocking): mode 0600 whatever the umask; with `fsync`, the
    data and the rename are on disk when this returns. A temporary file a failure left behind
    is removed."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with open(fd, "wb") as f:
            os.fchmod(fd, 0o600)  # a temporary file left by a crash keeps its old mode otherwise
            f.write(data)
            f.flush()
            if fsync:
                os.fsync(fd)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    if fsync:
        sync_dir(path.parent)
