"""A run folder, ``<train.out_dir>/<train.name>/``: the one place that knows its layout.

What it holds (the writers are named; none of them spells a path of its own)::

    config.yaml          the resolved config (dcgan/training/loop.py)
    train.log            rank 0's log (dcgan/base/logs.py); tracebacks (dcgan/run/failure.py)
    run.lock             JSON of the trainer holding the folder (dcgan/run/lock.py)
    metrics.jsonl        one object per log step (dcgan/tracking/tracker.py)
    samples/             step_<step>.png sample grids, real.png (a grid of training images)
    losses.png           the loss curves, redrawn with every grid
    summary.json         the end of each attempt: status, exit code, final and best values
    provenance.json      what ran, each attempt (dcgan/tracking/provenance.py)
    started_with.json    the settings that act once, as applied (dcgan/run/timelines.py)
    lineage.json         the lineage the folder holds
    timelines/           what a branch moved aside, each a folder of this same layout
    checkpoints/         step_<step>.pt + step_<step>.pt.json (size/SHA-256 record), best.pt
    slurm/               the launchers' job files (launch/)

Besides paths, the conventions a reader of the folder relies on (``launch.sweep status``):
summary.json's and run.lock's contents, the " ERROR " / " WARNING " of train.log's lines,
and which checkpoints have a record.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dcgan.base.fileio import read_json, write_json

if TYPE_CHECKING:
    from dcgan.config.sections import Config

CONFIG = "config.yaml"
TRAIN_LOG = "train.log"
LOCK = "run.lock"
METRICS = "metrics.jsonl"
SAMPLES_DIR = "samples"
REAL_GRID = "real.png"  # in samples/
LOSSES_PLOT = "losses.png"
SUMMARY = "summary.json"
PROVENANCE = "provenance.json"
STARTED_WITH = "started_with.json"  # the settings that act once, as the run folder applied them
LINEAGE = "lineage.json"  # the lineage the run folder holds
TIMELINES_DIR = "timelines"  # <run>/timelines/<when>-after-step_<S>/: what a branch moved aside
CHECKPOINTS_DIR = "checkpoints"
SLURM_DIR = "slurm"

# Checkpoints, in checkpoints/ (dcgan/checkpoint/files.py writes and checks them).
CHECKPOINT_NAME = re.compile(r"^step_(\d{8,})\.pt$")
RECORD_SUFFIX = ".json"  # step_X.pt -> step_X.pt.json
BEST_NAME = "best.pt"  # the state with the lowest FID so far (eval.best_checkpoint)
SAMPLE_NAME = re.compile(r"^step_(\d{8,})\.png$")

# What train.overwrite leaves in a run folder: the log that records the wipe, the lock of
# the trainer that wipes it (dcgan/run/lock.py) and the launchers' folder (job scripts,
# pickles and logs of the job that is running now).
KEPT_ON_OVERWRITE = (TRAIN_LOG, LOCK, SLURM_DIR)

_PROBLEM_MARKS = (" ERROR ", " WARNING ")  # how a train.log line says its level (dcgan/base/logs.py)


def checkpoint_path(ckpt_dir: Path, step: int) -> Path:
    return ckpt_dir / f"step_{step:08d}.pt"


def record_path(path: Path) -> Path:
    """The size/SHA-256 record beside checkpoint ``path``."""
    return path.with_name(path.name + RECORD_SUFFIX)


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """``step_*.pt`` files in ``ckpt_dir``, oldest first (by step), valid or not."""
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := CHECKPOINT_NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def step_of(path: Path) -> int:
    """The step a ``step_<step>.pt`` file was written at."""
    m = CHECKPOINT_NAME.match(path.name)
    if m is None:
        raise ValueError(f"{path} is not named like a checkpoint (step_<step>.pt)")
    return int(m.group(1))


def sample_step(path: Path) -> int:
    """The step of a sample grid ``step_<step>.png`` (-1: not a step's grid, e.g. real.png)."""
    m = SAMPLE_NAME.match(path.name)
    return int(m.group(1)) if m else -1


def metrics_records(lines: list[str]) -> Iterator[tuple[str, dict[str, Any], int]]:
    """(line, record, step) of each readable metrics.jsonl line; a line that is not a JSON
    object with an integer step (one cut by a kill) is skipped."""
    for line in lines:
        try:
            record = json.loads(line)
            step = int(record["step"])
        except (ValueError, KeyError, TypeError):
            continue
        yield line, record, step


@dataclass(frozen=True)
class RunFolder:
    """The run folder at ``path`` (it need not exist yet)."""

    path: Path

    @classmethod
    def of(cls, cfg: Config) -> RunFolder:
        """The folder of the run ``cfg`` describes (``cfg.run_dir``)."""
        return cls(cfg.run_dir)

    # ------------------------------------------------------------------ paths

    @property
    def config(self) -> Path:
        return self.path / CONFIG

    @property
    def train_log(self) -> Path:
        return self.path / TRAIN_LOG

    @property
    def lock(self) -> Path:
        return self.path / LOCK

    @property
    def metrics(self) -> Path:
        return self.path / METRICS

    @property
    def samples(self) -> Path:
        return self.path / SAMPLES_DIR

    def sample(self, step: int) -> Path:
        """The sample grid of ``step``."""
        return self.samples / f"step_{step:08d}.png"

    @property
    def real_grid(self) -> Path:
        return self.samples / REAL_GRID

    @property
    def losses_plot(self) -> Path:
        return self.path / LOSSES_PLOT

    @property
    def summary(self) -> Path:
        return self.path / SUMMARY

    @property
    def provenance(self) -> Path:
        return self.path / PROVENANCE

    @property
    def started_with(self) -> Path:
        return self.path / STARTED_WITH

    @property
    def lineage(self) -> Path:
        return self.path / LINEAGE

    @property
    def timelines(self) -> Path:
        return self.path / TIMELINES_DIR

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS_DIR

    def checkpoint(self, step: int) -> Path:
        """``checkpoints/step_<step>.pt``."""
        return checkpoint_path(self.checkpoints, step)

    @property
    def best(self) -> Path:
        return self.checkpoints / BEST_NAME

    @property
    def slurm(self) -> Path:
        return self.path / SLURM_DIR

    # ------------------------------------------------------------------ what it holds

    def list_checkpoints(self) -> list[Path]:
        """Its ``step_*.pt`` files, oldest first, valid or not."""
        return list_checkpoints(self.checkpoints)

    def newest_recorded_step(self) -> int | None:
        """The step of the newest checkpoint with a record (not verified: that reads the file)."""
        for path in reversed(self.list_checkpoints()):
            if record_path(path).exists():
                return step_of(path)
        return None

    def read_summary(self) -> dict[str, Any] | None:
        """summary.json (None: none, or unreadable): ``status`` ("done", "stopped", "failed",
        "diverged"), ``exit_code``, ``step``, ``error`` / ``diverged``, ``final``, ``best``
        ({metric: {"value", "step"}}) ..."""
        return read_json(self.summary)

    def write_summary(self, summary: dict[str, Any]) -> None:
        write_json(self.summary, summary, indent=2)

    def lock_holder(self) -> dict[str, Any] | None:
        """run.lock's JSON: ``host``, ``pid``, ``since`` (and ``slurm_job_id``) of the trainer
        that last took it (None: no lock file, or one still being written)."""
        return read_json(self.lock)

    def attempt_after_summary(self) -> bool:
        """Whether a trainer took run.lock after the last summary.json was written: an
        attempt started since, which has not written its own summary."""
        try:
            return self.lock.stat().st_mtime > self.summary.stat().st_mtime
        except OSError:
            return False

    def last_log_problem(self, tail_bytes: int = 16384) -> str:
        """The message of train.log's last error or warning line (in its last ``tail_bytes``),
        "" when there is none or no log."""
        try:
            with open(self.train_log, "rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - tail_bytes))
                lines = f.read().decode(errors="replace").splitlines()
        except OSError:
            return ""
        found = [line for line in lines if any(mark in line for mark in _PROBLEM_MARKS)]
        if not found:
            return ""
        message = found[-1]
        for mark in _PROBLEM_MARKS:
            message = message.split(mark, 1)[-1]
        return message
