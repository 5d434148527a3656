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
            of = f"/{total} ({100 * n / total:.0f}%)" if total else ""
            log.info("%s: %d%s %s, %.1f %s/s", desc, n, of, unit, rate, unit)
    log.info("%s: done, %d %s in %.1fs", desc, n, unit, time.monotonic() - start)
