"""A failure on any rank ends every process of the run within seconds, with one line that
says what failed and where.

* ``Where``: what a rank is doing (start-up, step N, checkpoint at step N, ...); the
  training loop keeps it current, and the failure line names it.
* ``report()``: the failing rank logs one line (``rank 1 failed (step 4): DataError:
  ...``); the traceback goes to ``train.log`` on rank 0 and after the line on
  the other ranks (they write no train.log). The line is posted to the job's store.
* ``PeerWatch``: a thread in every rank that checks the store once a second. When another
  rank posted a failure, or the store itself is gone (its host, rank 0 outside torchrun,
  has ended), it logs one line and ends this process, even while its main thread waits in
  a collective that will never complete (a rank that died is not there to enter it;
  NCCL would wait for the process group's timeout).
* ``end_children()``: kills what is left of this process's children (DataLoader workers
  ignore the stop signals, so Python's exit would otherwise join them forever), and
  ``die_with_parent()`` has a worker killed by the kernel when its rank dies.
* ``exit_deadline()``: a last guard; the process ends with its code within seconds even if
  something on the way out (atexit handlers, a process group teardown) blocks.
* ``tell_torchrun()``: under torchrun, the failure also goes into the worker's error file,
  so torchrun's closing report shows the root cause's traceback (see there).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import logging
import multiprocessing
import os
import re
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

from torch.distributed.elastic.multiprocessing.errors import get_error_handler

from dcgan.run.folder import RunFolder

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # linux/prctl.h
FAILURE_KEY = "dcgan/failure"  # in the store of this attempt (distributed.setup scopes it)
WATCH_INTERVAL_S = 1.0
PEER_GRACE_S = 10.0  # after a peer's failure, the time this rank has to end by itself
# Failed polls in a row that mean the store is gone (rank 0 hosts it outside torchrun).
STORE_LOST_POLLS = 3


class Where:
    """What this rank is doing, for the failure line: a phase and, in the loop, a step."""

    def __init__(self) -> None:
        self.phase, self.step = "start-up", 0

    def at(self, phase: str, step: int = 0) -> None:
        self.phase, self.step = phase, step

    def __str__(self) -> str:
        return f"{self.phase} {self.step}" if self.step else self.phase


def describe(error: BaseException) -> str:
    """One line for an exception. One re-raised from a DataLoader worker carries the
    worker's whole traceback as its message: its last line is the original error."""
    text = str(error).strip()
    first = text.splitlines()[0] if text else ""
    if "\nOriginal Traceback" in text:  # torch's ExceptionWrapper.reraise: "Caught X in DataLoader worker process N."
        # "dcgan.data.stream.DataError: ..." -> "DataError: ..."
        original = re.sub(r"^(?:\w+\.)+(?=\w+:)", "", text.splitlines()[-1].strip())
        return f"{original} ({first.removeprefix('Caught ').split(' in ', 1)[-1].rstrip('.')})"
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


def report(
    error: BaseException, where: Where, rank: int, run_dir: Path | None, store, peer_logged: str | None = None
) -> str:
    """Log the failure line, put the traceback where it belongs, and tell the other ranks
    through ``store`` (None: one process). Returns the line. When another rank posted a
    failure first, this rank's error is a consequence (a broken collective): the line
    names the peer's failure instead (``peer_logged``: the PeerWatch already logged it)."""
    peer = peer_logged or posted(store)
    if peer is not None:
        line = f"stopping rank {rank}: {peer}"
    else:
        line = f"rank {rank} failed ({where}): {describe(error)}"
        post(store, line)
    details = "".join(traceback.format_exception(error))
    tell_torchrun(line, error, consequence=peer is not None)
    train_log = RunFolder(run_dir).train_log if run_dir is not None else None
    to_file = rank == 0 and train_log is not None and train_log.exists()
    if peer_logged is None:
        log.error("%s%s", line, f" (traceback in {train_log})" if to_file else "")
    _flush_logs()
    if to_file:
        with open(train_log, "a") as f:  # the file only: the console keeps its one line
            f.write(details)
    else:
        sys.stderr.write(details)
    return line


def tell_torchrun(line: str, error: BaseException | None = None, consequence: bool = False) -> None:
    """Write this worker's error file for torchrun's failure report: the file named by
    TORCHELASTIC_ERROR_FILE, which torchrun sets for each worker (nothing happens without
    it). ``@record`` on ``dcgan.train.main`` writes it only for an exception that escapes,
    and ``run()`` catches every one to return its exit code, so a failure is written here.

    The failing rank's file holds the traceback of ``error``, written by torch's own
    ``ErrorHandler`` as ``@record`` would. A rank that stops because another failed
    (``consequence``) writes its one ``line``, dated a second later: torchrun calls the
    failure with the earliest whole-second time the root cause, the lowest rank among equal
    times, and a consequence must not win that tie. Without ``error`` (a config error)
    ``line`` is the whole story."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    try:
        if error is not None and not consequence and sys.exc_info()[1] is error:
            get_error_handler().record_exception(error)  # the traceback of the exception being handled
            return
        details = "".join(traceback.format_exception(error)) if error is not None and not consequence else line
        # ErrorHandler.record_exception's format, which torchrun reads
        extra = {"py_callstack": details, "timestamp": str(int(time.time()) + int(consequence))}
        data = {"message": {"message": line, "extraInfo": extra}}
        with open(path, "w") as f:
            json.dump(data, f)
    except Exception as e:  # the report is a courtesy: never fail the exit over it
        log.warning("could not write torchrun's error file %s (%s: %s)", path, type(e).__name__, e)


def posted(store) -> str | None:
    """The failure another rank posted in this attempt's store, if any."""
    if store is None:
        return None
    try:
        return store.get(FAILURE_KEY).decode() if store.check([FAILURE_KEY]) else None
    except Exception:  # the store is gone with the process that hosted it: nothing to read
        return None


def post(store, line: str) -> None:
    """Tell the other ranks' PeerWatch that this rank is ending (``line`` says why)."""
    if store is None:
        return
    try:
        store.set(FAILURE_KEY, line)
    except Exception as e:  # the store is gone too: the others learn it from their collectives
        log.warning("could not tell the other ranks (%s)", e)


class PeerWatch:
    """Ends this process when another rank posts a failure (see the module doc)."""

    def __init__(self, store, rank: int, interval_s: float = WATCH_INTERVAL_S, grace_s: float = PEER_GRACE_S):
        self.store, self.rank, self.interval_s, self.grace_s = store, rank, interval_s, grace_s
        self.peer_failure: str | None = None  # the peer's failure line, once seen (and logged)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="dcgan-peer-watch", daemon=True)
        if store is not None:
            self._thread.start()

    def _watch(self) -> None:
        unreachable = 0
        while not self._stop.wait(self.interval_s):
            try:
                peer = self.store.get(FAILURE_KEY).decode() if self.store.check([FAILURE_KEY]) else None
                unreachable = 0
            except Exception as e:  # the store went away with the process that hosted it
                unreachable += 1
                if unreachable < STORE_LOST_POLLS:
                    continue
                peer = f"the job's store is gone ({type(e).__name__}: {e}): the process that hosted it has ended"
            if peer is None or self._stop.is_set():
                continue
            self.peer_failure = peer
            log.error("stopping rank %d: %s", self.rank, peer)
            tell_torchrun(f"stopping rank {self.rank}: {peer}", consequence=True)
            # The main thread usually ends by itself: its collective with the failed rank
            # breaks (gloo) and it goes out through report(). One that waits on (NCCL waits
            # for the process group's timeout) is ended here.
            if not self._stop.wait(self.grace_s):
                _flush_logs()
                end_children()
                os._exit(1)
            return

    def stop(self) -> str | None:
        """Stop watching: this rank is about to report its own failure, or to exit normally
        (past the final barrier the store may go away with the rank that hosts it).
        Returns the peer failure this watch already logged, if any."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        return self.peer_failure


def end_children(timeout_s: float = 2.0) -> None:
    """Kill this process's remaining multiprocessing children (DataLoader workers) and reap them."""
    children = multiprocessing.active_children()
    for child in children:
        child.kill()
    for child in children:
        child.join(timeout_s)


def die_with_parent() -> None:
    """Have the kernel kill this process (a DataLoader worker) when the process that started
    it ends, even by SIGKILL: a worker never outlives its rank (Linux; elsewhere torch's
    own check ends it within seconds)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def exit_deadline(code: int, seconds: float) -> None:
    """End the process with ``code`` after ``seconds``, whatever it is doing then (a daemon
    timer: it keeps running while atexit handlers do)."""
    timer = threading.Timer(seconds, _hard_exit, (code,))
    timer.daemon = True
    timer.start()


def _hard_exit(code: int) -> None:
    log.error("the process did not end within its exit deadline; ending it now (exit code %d)", code)
    _flush_logs()
    end_children()
    os._exit(code)


def _flush_logs() -> None:
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stderr.flush()
