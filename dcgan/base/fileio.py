"""Files that appear whole or not at all (checkpoints, their records, shard manifests), and
the JSON files a run folder holds: written whole (``write_json``), read tolerantly (``read_json``)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, TypeVar

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


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``; None when the file is missing, unreadable, torn (a
    write cut short by a kill, by code that does not write atomically) or not an object."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def write_json(path: Path, value: Any, indent: int | None = None) -> None:
    """``value`` as JSON in ``path``, atomically (``write_atomic``)."""
    write_atomic(path, lambda f: f.write(json.dumps(value, indent=indent).encode()))
