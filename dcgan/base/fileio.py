"""Files that appear whole or not at all (checkpoints, their records, shard manifests)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, TypeVar

T = TypeVar("T")


def write_atomic(path: Path, write: Callable[[BinaryIO], T], mode: int = 0o644) -> T:
    """Call ``write(f)`` on a temp file beside ``path``, fsync it, rename it to ``path``
    and fsync the folder: a reader, or a crash, sees the old file or the new one, never
    half of one. On failure the temp file (``.<name>.*.tmp``) is removed and the
    exception propagates. Returns what ``write`` returned."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            result = write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # mkstemp makes it private; run folders and shards are shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return result


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
