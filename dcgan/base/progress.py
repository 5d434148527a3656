"""Progress for long loops: a tqdm bar on a terminal, plain log lines otherwise (Slurm logs)."""

from __future__ import annotations

import logging
import sys
import time
from typing import Iterable, Iterator, TypeVar

from tqdm import tqdm

T = TypeVar("T")


def progress(
    items: Iterable[T],
    total: int | None,
    desc: str,
    unit: str = "it",
    log: logging.Logger | None = None,
    every_s: float = 30.0,
) -> Iterator[T]:
    """Yield ``items``; show a bar when stderr is a terminal, else log a line every ``every_s``."""
    if sys.stderr.isatty():
        yield from tqdm(items, total=total, desc=desc, unit=unit, dynamic_ncols=True)
        return
    log = log or logging.getLogger("dcgan")
    start = last = time.monotonic()
    n = 0
    for n, item in enumerate(items, 1):
        yield item
        now = time.monotonic()
        if now - last >= every_s:
            last = now
            rate = n / (now - start)
            of = f"/{total} ({100 * n / total:.0f}%, {duration((total - n) / rate)} left)" if total else ""
            log.info("%s: %d%s %s, %.1f %s/s", desc, n, of, unit, rate, unit)
    log.info("%s: done, %d %s in %.1fs", desc, n, unit, time.monotonic() - start)


def duration(seconds: float) -> str:
    """1h02m03s / 2m03s / 3s."""
    h, rest = divmod(round(seconds), 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class StepProgress:
    """Training steps on rank 0: a tqdm bar with ETA when stderr is a terminal, and the
    metric lines, which carry the ETA themselves for plain logs (Slurm). Log records go
    through tqdm while the bar is up, so lines print above it instead of through it."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.total, self.initial = total, initial
        self.start = time.monotonic()
        self.step = initial
        self.bar = None
        self._redirect = None
        if enabled and sys.stderr.isatty():
            from tqdm.contrib.logging import logging_redirect_tqdm

            self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)
            self._redirect = logging_redirect_tqdm()
            self._redirect.__enter__()

    def update(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(step - self.step)
        self.step = step

    def postfix(self, **values: float | None) -> None:
        if self.bar is not None:
            self.bar.set_postfix({k: f"{v:.3f}" for k, v in values.items() if v is not None}, refresh=False)

    def eta(self) -> str:
        """Time left at this attempt's mean step rate, as 1h02m03s / 2m03s / 3s."""
        done = self.step - self.initial
        if done <= 0:
            return "?"
        return duration((self.total - self.step) * (time.monotonic() - self.start) / done)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self._redirect.__exit__(None, None, None)
            self.bar = self._redirect = None
