"""What produced a run, attempt by attempt: the command line and the overrides, the code's
git commit, the versions that matter to the numbers, the host and the device.

Rank 0's tracker records it when an attempt starts (``dcgan/tracking/tracker.py``): appended to
``<run folder>/provenance.json`` (a list, oldest attempt first, so a run resumed under
other code shows it) and put into the W&B config under ``provenance``. Gathering it never
fails an attempt: what cannot be found is recorded as null.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import logging
import platform
import socket
import subprocess
from pathlib import Path
from typing import Any

import torch

from dcgan.base.fileio import write_json

log = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent
GIT_TIMEOUT_S = 5.0


def collect(
    argv: list[str], overrides: list[str], device: torch.device | str, config_file: str | None = None
) -> dict[str, Any]:
    """This process's provenance. ``argv``: its command line; ``overrides``: the ``a.b=value``
    settings applied over ``config_file``; ``device``: the training device."""
    device = torch.device(device)
    return {
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": list(argv),
        "config_file": config_file,
        "overrides": list(overrides),
        "git": git_state(PACKAGE_DIR),
        "versions": versions(),
        "host": socket.gethostname(),
        "device": str(device),
        "device_name": device_name(device),
    }


def git_state(folder: Path) -> dict[str, Any] | None:
    """{"commit", "dirty"} of the git checkout that tracks the package in ``folder`` (its
    ``__init__.py``); None when none does (an installed package, even one inside another
    repository's tree), or git is missing or too slow. ``dirty``: tracked files differ
    from the commit (None when that check fails)."""

    def git(*args: str) -> subprocess.CompletedProcess | None:
        try:
            return subprocess.run(
                ["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=GIT_TIMEOUT_S
            )
        except (OSError, subprocess.SubprocessError):
            return None

    tracked = git("ls-files", "--error-unmatch", "--", "__init__.py")
    head = git("rev-parse", "HEAD") if tracked is not None and tracked.returncode == 0 else None
    if head is None or head.returncode != 0:
        return None
    status = git("status", "--porcelain", "--untracked-files=no")
    dirty = None if status is None or status.returncode != 0 else bool(status.stdout.strip())
    return {"commit": head.stdout.strip(), "dirty": dirty}


def versions() -> dict[str, str | None]:
    """python, torch, CUDA and NCCL (as torch was built with them; NCCL only where CUDA is
    available), webdataset and wandb (installed; None when not)."""
    nccl = None
    if torch.cuda.is_available():
        try:
            nccl = ".".join(map(str, torch.cuda.nccl.version()))
        except Exception:  # noqa: BLE001 - a build without NCCL
            nccl = None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "nccl": nccl,
        "webdataset": _installed("webdataset"),
        "wandb": _installed("wandb"),  # not imported: a run with W&B disabled does not pay for it
    }


def _installed(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def device_name(device: torch.device) -> str | None:
    """The GPU's name for a CUDA device, else the CPU model (/proc/cpuinfo, else platform)."""
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or None


def record(path: Path, attempt: dict[str, Any]) -> list[dict[str, Any]]:
    """Append ``attempt`` to the list in ``path`` (created when missing; a file that does
    not hold a list is set aside as ``<path>.unreadable``) and write it atomically.
    Returns the list written. OSError propagates."""
    attempts: list[dict[str, Any]] = []
    if path.exists():
        try:
            attempts = json.loads(path.read_text())
            if not isinstance(attempts, list):
                raise ValueError("not a list")
        except ValueError as e:
            log.warning("%s is not a list of attempts (%s); kept as %s.unreadable, starting a new one", path, e, path)
            path.replace(path.with_name(path.name + ".unreadable"))
            attempts = []
    attempts.append(attempt)
    write_json(path, attempts, indent=2)
    return attempts
