"""Exit codes of every dcgan entry point (``dcgan.train``, ``dcgan.eval``, ``dcgan.generate``,
``dcgan.shards``, the launchers), and what a launcher should do on each."""

from dataclasses import dataclass

EXIT_OK = 0  # finished: stop
EXIT_FAILED = 1  # failed (a crash, a divergence, the final or stop checkpoint not written): look at the log
EXIT_CONFIG = 2  # bad input caught before anything started: fix it
# EX_TEMPFAIL from sysexits.h ("temporary failure, try again"): stopped on a signal with the
# state saved; run the same command again (the launchers requeue on it).
EXIT_PREEMPTED = 75
# What the stop lines promise (dcgan/preflight.py's settle_start keeps it).
SAME_COMMAND_CARRIES_ON = (
    "the same command carries on from the run folder's newest checkpoint, whatever train.resume and "
    "train.overwrite it gives: those act at the run folder's first attempt only"
)


@dataclass(frozen=True)
class Ending:
    """How an attempt of a training run ends: its status in summary.json, and why."""

    status: str  # "done" | "stopped" (on a signal, state saved) | "failed" | "diverged"
    reason: str = ""

    @property
    def exit_code(self) -> int:
        return {"done": EXIT_OK, "stopped": EXIT_PREEMPTED}.get(self.status, EXIT_FAILED)
