"""Where a run's metrics and images go: log lines, ``metrics.jsonl`` and sample grids.

Rank 0 only: on other ranks a Tracker does nothing, and nothing here is a collective,
so no rank ever waits on it.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch
import torchvision.utils as vutils

log = logging.getLogger("dcgan.train")


class Tracker:
    def __init__(self, run_dir: Path, enabled: bool):
        self.run_dir = run_dir
        self.enabled = enabled
        self.samples_dir = run_dir / "samples"
        if enabled:
            self.samples_dir.mkdir(parents=True, exist_ok=True)

    def metrics(self, step: int, values: dict[str, float], line: str) -> None:
        """Log ``line`` and append ``{"step": step, **values}`` to metrics.jsonl."""
        if not self.enabled:
            return
        log.info(line)
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")

    def rewind(self, step: int) -> None:
        """On resume from ``step``: drop metrics the stopped run logged after it (those
        steps are about to be trained again), so metrics.jsonl has each step once."""
        path = self.run_dir / "metrics.jsonl"
        if not self.enabled or not path.exists():
            return
        lines = path.read_text().splitlines(keepends=True)
        kept = [line for line in lines if _step_of(line) <= step]  # a line cut by a kill goes too
        if len(kept) != len(lines):
            path.write_text("".join(kept))

    def grid(self, images: torch.Tensor, name: str, nrow: int = 8) -> Path | None:
        """Save images in [-1, 1] as one PNG grid ``samples/<name>.png``."""
        if not self.enabled:
            return None
        path = self.samples_dir / f"{name}.png"
        vutils.save_image(images.detach().float().cpu(), path, nrow=nrow, normalize=True, value_range=(-1, 1))
        return path


def _step_of(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf
