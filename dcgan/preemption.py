"""Stop on request: a signal reaching any rank makes every rank stop after the same step.

Slurm announces the end of a job (preemption, ``--signal=USR2@120``, the time limit) with
a signal to some or all processes; torchrun forwards the ones it handles to its workers.
The handler only notes the time. At the steps the trainer checks, ``StopRequest.agreed()``
takes the earliest such time over all ranks (one small host-side all-reduce), so all ranks
see the same answer after the same step, checkpoint together and exit with
``EXIT_PREEMPTED``: "stopped early, state saved; run the same command again to go on".
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from collections.abc import Iterable

from dcgan import distributed
from dcgan.distributed import DistInfo

log = logging.getLogger("dcgan.train")

# EX_TEMPFAIL from sysexits.h ("temporary failure, try again"): a launcher requeues on it.
EXIT_PREEMPTED = 75


class StopRequest:
    """Handles ``signals`` for the rest of the process's life, by phase:

    * before ``arm()`` (start-up, resume): the default action, the process ends at once
      (nothing new to save; a rank stuck joining a group must stay killable);
    * armed (the training loop): noted, acted on at the next agreed check;
    * after ``disarm()`` (state saved, shutting down): ignored (SIG_IGN, which unlike a
      Python handler survives interpreter shutdown), so the exit code stays ours when
      torchrun sends SIGTERM to ranks still finishing after one has exited.
    """

    def __init__(self, signals: Iterable[str]):
        self.signal_name: str | None = None
        self.signal_time: float | None = None  # wall clock (time.time): comparable across hosts
        self._armed = False
        self._reported = False
        self._signals = [signal.Signals[name] for name in signals]
        for sig in self._signals:
            signal.signal(sig, self._on_signal)

    def arm(self) -> None:
        self._armed = True

    def disarm(self) -> None:
        for sig in self._signals:
            signal.signal(sig, signal.SIG_IGN)

    def _on_signal(self, signum: int, frame) -> None:
        if not self._armed:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        elif self.signal_time is None:
            # Only note it: a handler runs between two bytecodes of the loop, where logging
            # (locks) or a collective is not safe.
            self.signal_time, self.signal_name = time.time(), signal.Signals(signum).name

    def agreed(self, info: DistInfo) -> float | None:
        """Collective: the earliest signal time over all ranks, None if no rank got one."""
        if self.signal_time is not None and not self._reported:
            self._reported = True
            log.warning("received %s: stopping after the step all ranks agree on", self.signal_name)
        t = distributed.min_over_ranks(math.inf if self.signal_time is None else self.signal_time, info)
        return None if math.isinf(t) else t


def ignore_in_worker(signals: Iterable[str], worker_id: int = 0) -> None:
    """A DataLoader ``worker_init_fn`` (with ``functools.partial``): leave stop signals to
    the training process, which shuts its workers down (a worker killed by SIGTERM would
    crash the loader)."""
    for name in signals:
        signal.signal(signal.Signals[name], signal.SIG_IGN)
