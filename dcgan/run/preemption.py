"""Stop on request: a signal reaching any rank makes every rank stop after the same step.

Slurm announces the end of a job (preemption, ``--signal=USR2@120``, the time limit) with
a signal to some or all processes; torchrun forwards the ones it handles to its workers.
The handler only notes the time. At the steps the trainer checks, ``StopRequest.agreed()``
starts a small all-reduce of the earliest such time over all ranks and returns the
result of the previous check's: it completed in the background during the step, so
checking costs no wait (a blocking all-reduce per step cost 14% of the 2-rank CPU demo's
speed). Every rank reads the same result at the same step, so all stop after the same
step (one check later than they could), checkpoint together and exit with
``EXIT_PREEMPTED``: "stopped early, state saved; run the same command again to go on".
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from dcgan.run import failure
from dcgan.run.distributed import DistInfo

log = logging.getLogger(__name__)


# A second SIGINT this long after the first is a second Ctrl-C; sooner, it is the same one
# delivered twice (the terminal signals the whole process group, and torchrun forwards
# the SIGINT it got to its workers).
REPEATED_SIGINT_S = 1.0


class StoppedDuringStartUp(BaseException):
    """A stop signal before training began: nothing new to save, the run ends with
    EXIT_PREEMPTED and the same command resumes from the last checkpoint. A BaseException,
    so that a library's ``except Exception`` (W&B's start-up) cannot swallow it."""

    def __init__(self, signal_name: str):
        super().__init__(f"{signal_name} during start-up")
        self.signal_name = signal_name


class StopRequest:
    """Handles ``signals`` for the rest of the process's life, by phase:

    * before ``arm()`` (start-up, resume): raises ``StoppedDuringStartUp`` in the main
      thread (the trainer reports EXIT_PREEMPTED; a rank blocked in C code, joining a
      group, is ended by its launcher as before);
    * armed (the training loop): noted, acted on at the next agreed check; a second
      Ctrl-C (SIGINT) while that check or the checkpoint runs ends the process at once;
    * after ``disarm()`` (state saved, shutting down): ignored (SIG_IGN, which unlike a
      Python handler survives interpreter shutdown), so the exit code stays ours when
      torchrun sends SIGTERM to ranks still finishing after one has exited.
    """

    def __init__(self, signals: Iterable[str]):
        self.signal_name: str | None = None
        self.signal_time: float | None = None  # wall clock (time.time): comparable across hosts
        self._armed = False
        self._raised = False
        self._reported = False
        self._in_flight: tuple | None = None  # (work, tensor) of the last check's all-reduce
        self._signals = [signal.Signals[name] for name in signals]
        for sig in self._signals:
            signal.signal(sig, self._on_signal)

    def arm(self) -> None:
        self._armed = True

    def disarm(self) -> None:
        for sig in self._signals:
            signal.signal(sig, signal.SIG_IGN)
        if self._in_flight is not None:  # finish it before the process group goes away
            self._in_flight[0].wait()
            self._in_flight = None

    def _on_signal(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.signal_time is None:
            # Only note it: a handler runs between two bytecodes of the loop, where logging
            # (locks) or a collective is not safe. Noted before start-up too, in case the
            # exception below is swallowed: the loop then stops at its first check.
            self.signal_time, self.signal_name = time.time(), name
        elif signum == signal.SIGINT and time.time() - self.signal_time > REPEATED_SIGINT_S:
            os.write(2, b"dcgan.train: second Ctrl-C: exiting now, without waiting for the checkpoint\n")
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        if not self._armed and not self._raised:
            self._raised = True
            raise StoppedDuringStartUp(name)

    def agreed(self, info: DistInfo) -> float | None:
        """Collective, at the same steps on every rank: the earliest signal time over all
        ranks as of the previous call (as of now with one process), None if none."""
        if self.signal_time is not None and not self._reported:
            self._reported = True
            log.warning("received %s: stopping after the step all ranks agree on", self.signal_name)
        mine = torch.tensor([math.inf if self.signal_time is None else self.signal_time], dtype=torch.float64)
        if not info.distributed:
            result = mine
        else:
            previous = self._in_flight
            work = dist.all_reduce(mine, op=dist.ReduceOp.MIN, group=info.control_group, async_op=True)
            self._in_flight = (work, mine)
            if previous is None:
                return None
            previous[0].wait()
            result = previous[1]
        t = result.item()
        return None if math.isinf(t) else t


@dataclass(frozen=True)
class WorkerSignals:
    """The stop signals as a rank's DataLoader workers treat them: left to the rank, which
    shuts its workers down (a worker killed by SIGTERM would crash the loader).

    Slurm signals every process of a step, workers included. Each worker ignores the stop
    signals from its first call (``__call__``, the loader's ``worker_init_fn``), but in
    the milliseconds before it, torch's own SIGTERM handler ends a worker on a signal its
    parent did not send. So the rank starts its workers through ``start()``: the stop
    signals are blocked across the fork, a worker inherits them blocked and drops one that
    came meanwhile when it ignores them, and the rank handles its own when ``start()``
    returns. Picklable, as a worker_init_fn must be."""

    names: tuple[str, ...]

    @property
    def signals(self) -> set[signal.Signals]:
        return {signal.Signals[name] for name in self.names}

    def start(self, loader: DataLoader) -> Iterator:
        """``iter(loader)``, which forks the workers, with the stop signals held meanwhile."""
        held = signal.pthread_sigmask(signal.SIG_BLOCK, self.signals)
        try:
            return iter(loader)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)

    def __call__(self, worker_id: int) -> None:
        for sig in self.signals:
            signal.signal(sig, signal.SIG_IGN)  # discards one already pending
        signal.pthread_sigmask(signal.SIG_UNBLOCK, self.signals)
        failure.die_with_parent()


NO_STOP_SIGNALS = WorkerSignals(())  # outside training (tests, benchmarks): workers only die with their parent
