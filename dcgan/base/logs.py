"""Log lines of every entry point: timestamped, tagged with the rank; INFO from rank 0 only."""

from __future__ import annotations

import logging
import sys

LOG_DATE_FORMAT = "%Y-%m-%d %H:%M:%S"


def log_format(rank: int) -> str:
    return f"%(asctime)s [rank {rank}] %(levelname)s %(message)s"


def setup_logging(rank: int) -> None:
    """Lines on stderr; INFO from rank 0, only warnings from the others."""
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format=log_format(rank), datefmt=LOG_DATE_FORMAT, force=True)


class RunLogHandler(logging.FileHandler):
    """train.log in the run folder. When a write fails (a full disk), stderr gets one line
    instead of logging's traceback per record; the lines go on to the console."""

    def __init__(self, path) -> None:
        super().__init__(path)
        self.failed = False

    def handleError(self, record: logging.LogRecord) -> None:
        if not self.failed:
            self.failed = True
            print(f"cannot write {self.baseFilename} (the log goes on on the console only)", file=sys.stderr)
