"""One trainer per run folder: rank 0 holds ``<run folder>/run.lock`` for the run's life.

A double submit, or a job requeued while its old self still runs, would otherwise have two
trainers write the same checkpoints, metrics and logs. The lock is ``fcntl.flock`` on an
open file: the kernel releases it when the holding process ends, however it ends (a crash,
SIGKILL, a node reboot), so a requeue after a crash needs no clean-up. The file also says
who holds it (host, pid, Slurm job id, since when), for the refusal line.

Caveat: flock works on local filesystems and on NFS (Linux emulates it with a POSIX lock
over the whole file), but Lustre mounted without ``-o flock`` and some FUSE filesystems
refuse it or grant it to every caller. There the refusal cannot be relied on; where
flock fails outright, the run says so in a warning and goes on unlocked.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

from dcgan.base.checks import ConfigError
from dcgan.run.folder import RunFolder

log = logging.getLogger(__name__)


class RunFolderBusy(ConfigError):
    """Another trainer holds the run folder; the message names it and its holder."""


class RunLock:
    """The lock on one run folder, held until ``release()`` or the end of the process."""

    def __init__(self, run_dir: Path):
        self.path = RunFolder(run_dir).lock
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise RunFolderBusy; OSError when the folder cannot be written."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by exec'd children
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EACCES):
                raise RunFolderBusy(
                    f"train.name: run folder {self.path.parent} is in use by another trainer ({self.holder()}); "
                    "wait for it to end, stop it, or pick another train.name"
                ) from None
            log.warning(
                "cannot lock %s (%s): this filesystem has no flock; nothing stops a second trainer", self.path, e
            )
            return
        self._fd = fd
        holder = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        if os.environ.get("SLURM_JOB_ID"):
            holder["slurm_job_id"] = os.environ["SLURM_JOB_ID"]
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)

    def holder(self) -> str:
        """Who holds the lock, as its file says."""
        try:
            info = json.loads(self.path.read_text())
            job = f", Slurm job {info['slurm_job_id']}" if info.get("slurm_job_id") else ""
            return f"pid {info['pid']} on {info['host']}{job}, since {info['since']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "holder unknown: it is still starting"

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor drops the flock
            self._fd = None


def held_on_this_host(run_dir: Path) -> bool | None:
    """Whether a process on this host holds ``run.lock`` (True/False), None when this host
    cannot tell; for ``launch.sweep status``. Read from /proc/locks, so the lock is never
    taken: a trainer starting at that very moment must not find it busy. Where /proc/locks
    is missing, a non-blocking shared flock, released at once, answers instead."""
    path = RunFolder(run_dir).lock
    try:
        st = path.stat()
    except OSError:
        return False
    key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        table = Path("/proc/locks").read_text()
    except OSError:
        return _flock_probe(path)
    for line in table.splitlines():
        parts = line.split()
        if "->" in parts:  # a process waiting for the lock, not holding it
            continue
        if len(parts) >= 6 and parts[5] == key:
            return True
    return False


def _flock_probe(path: Path) -> bool | None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as e:
        return True if e.errno in (errno.EWOULDBLOCK, errno.EACCES) else None
    finally:
        os.close(fd)  # drops the probe's lock, if it got one
    return False
