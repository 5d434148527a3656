"""What a run's state is, and how it reaches the disk and comes back.

``TrainState`` is the one object holding everything a restart needs; ``save`` writes it
atomically (temp file in the same folder, fsync, rename, fsync of the folder), so a
crash mid-write never leaves a half-written ``step_*.pt``; ``load`` reads with
``weights_only=True`` (tensors, numbers, strings and containers only: no unpickling of
arbitrary objects).
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger("dcgan.checkpoint")

FORMAT_VERSION = 1
_NAME = re.compile(r"^step_(\d{8,})\.pt$")


@dataclass
class TrainState:
    generator: nn.Module  # bare modules (not DDP): their state dicts load into any world size
    discriminator: nn.Module
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    scaler_g: torch.amp.GradScaler
    scaler_d: torch.amp.GradScaler
    step: int = 0  # optimisation steps done
    epoch: int = 0  # data epoch in progress
    batch_in_epoch: int = 0  # batches of that epoch already consumed (per rank)
    samples_seen: int = 0  # real images consumed, all ranks together

    def state_dict(self, config: dict[str, Any]) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "samples_seen": self.samples_seen,
            "generator": self.generator.state_dict(),
            "discriminator": self.discriminator.state_dict(),
            "opt_g": self.opt_g.state_dict(),
            "opt_d": self.opt_d.state_dict(),
            "scaler_g": self.scaler_g.state_dict(),
            "scaler_d": self.scaler_d.state_dict(),
            "config": config,
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if sd.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"checkpoint format {sd.get('format_version')!r}, this code reads {FORMAT_VERSION}")
        self.generator.load_state_dict(sd["generator"])
        self.discriminator.load_state_dict(sd["discriminator"])
        self.opt_g.load_state_dict(sd["opt_g"])
        self.opt_d.load_state_dict(sd["opt_d"])
        if sd["scaler_g"]:  # empty when saved with grad scaling off
            self.scaler_g.load_state_dict(sd["scaler_g"])
            self.scaler_d.load_state_dict(sd["scaler_d"])
        self.step, self.epoch = sd["step"], sd["epoch"]
        self.batch_in_epoch, self.samples_seen = sd["batch_in_epoch"], sd["samples_seen"]


def checkpoint_path(ckpt_dir: Path, step: int) -> Path:
    return ckpt_dir / f"step_{step:08d}.pt"


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Checkpoints in ``ckpt_dir``, oldest first (by step)."""
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def save(state_dict: dict[str, Any], ckpt_dir: Path, step: int, keep: int) -> Path:
    """Write ``step_<step>.pt`` atomically, then drop all but the newest ``keep``."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = checkpoint_path(ckpt_dir, step)
    fd, tmp = tempfile.mkstemp(dir=ckpt_dir, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state_dict, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(ckpt_dir)
    for old in list_checkpoints(ckpt_dir)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def load(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    return torch.load(path, map_location=map_location, weights_only=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
