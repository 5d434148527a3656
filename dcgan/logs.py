"""Log lines of every entry point: timestamped, tagged with the rank; INFO from rank 0 only."""

from __future__ import annotations

import logging

LOG_DATE_FORMAT = "%Y-%m-%d %H:%M:%S"


def log_format(rank: int) -> str:
    return f"%(asctime)s [rank {rank}] %(levelname)s %(message)s"


def setup_logging(rank: int) -> None:
    """Lines on stderr; INFO from rank 0, only warnings from the others."""
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format=log_format(rank), datefmt=LOG_DATE_FORMAT, force=True)
