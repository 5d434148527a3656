"""What a run's state is, and how it reaches the disk and comes back.

``TrainState`` is the one object holding everything a restart needs (nothing else holds
hidden state); ``capture_rng_state`` adds each rank's random generators. On disk a
checkpoint is two files in ``<run>/checkpoints/``:

* ``step_<step>.pt``: the state, written atomically (``fileio.write_atomic``: temp
  file in the same folder, fsync, rename, fsync of the folder), so a crash mid-write never leaves a half-written
  ``step_*.pt``; read back with ``weights_only=True`` (tensors, numbers, strings and
  containers only: nothing arbitrary is unpickled).
* ``step_<step>.pt.json``: its record (size in bytes and SHA-256), written after the
  ``.pt`` is in place. A checkpoint counts only when its record exists and matches, so a
  file truncated or damaged later (a full disk, a copy cut short, a bad block) is
  detected before anything is loaded from it.

``choose(cfg)`` applies ``train.resume`` to the run folder: the newest valid checkpoint,
a given one, or none.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
from torch import nn

from dcgan.config import ConfigError
from dcgan.fileio import write_atomic
from dcgan.shardset import ShardSet, describe_change

if TYPE_CHECKING:
    from dcgan.config import Config

log = logging.getLogger("dcgan.checkpoint")

FORMAT_VERSION = 2
_NAME = re.compile(r"^step_(\d{8,})\.pt$")
RECORD_SUFFIX = ".json"  # step_X.pt -> step_X.pt.json
CORRUPT_SUFFIX = ".corrupt"  # a rejected checkpoint is renamed aside, never deleted
BEST_NAME = "best.pt"  # the state with the lowest FID so far (eval.best_checkpoint)


@dataclass
class TrainState:
    generator: nn.Module  # bare modules (not DDP): their state dicts load into any world size
    discriminator: nn.Module
    generator_ema: nn.Module | None  # moving average of G's weights; None when model.ema_decay is 0
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    scaler_g: torch.amp.GradScaler
    scaler_d: torch.amp.GradScaler
    step: int = 0  # optimisation steps done
    epoch: int = 0  # data epoch in progress
    batch_in_epoch: int = 0  # batches of that epoch already consumed (per rank)
    samples_seen: int = 0  # real images consumed, all ranks together
    wandb_run_id: str | None = None  # set by tracking, so a restart continues the same W&B run
    train_seconds: float = 0.0  # wall time of the training loops so far, all attempts together
    best_fid: float | None = None  # lowest FID of the in-training evaluations so far
    best_fid_step: int = 0  # the step it was measured at (checkpoints/best.pt)

    def state_dict(
        self, config: dict[str, Any], rng: list[dict[str, Any]], world_size: int, data: dict[str, Any]
    ) -> dict[str, Any]:
        """Everything to restart from; ``rng`` holds one ``capture_rng_state()`` per rank,
        ``data`` the identity of the shards trained on (``ShardSet.identity()``)."""
        return {
            "format_version": FORMAT_VERSION,
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "samples_seen": self.samples_seen,
            "world_size": world_size,  # batch_in_epoch is a position in this world size's split
            "generator": self.generator.state_dict(),
            "discriminator": self.discriminator.state_dict(),
            "generator_ema": None if self.generator_ema is None else self.generator_ema.state_dict(),
            "opt_g": self.opt_g.state_dict(),
            "opt_d": self.opt_d.state_dict(),
            "scaler_g": self.scaler_g.state_dict(),
            "scaler_d": self.scaler_d.state_dict(),
            "rng": rng,
            "wandb_run_id": self.wandb_run_id,
            "train_seconds": self.train_seconds,
            "best_fid": self.best_fid,
            "best_fid_step": self.best_fid_step,
            "config": config,
            "data": data,  # also in the record, where the start-up checks read it without loading this file
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Restore nets, optimisers and counters (RNG states: ``restore_rng_state``)."""
        if sd.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"checkpoint format {sd.get('format_version')!r}, this code reads {FORMAT_VERSION}")
        self.generator.load_state_dict(sd["generator"])
        self.discriminator.load_state_dict(sd["discriminator"])
        if self.generator_ema is not None:
            # Turned on for a run whose checkpoint has none: start the average from G.
            self.generator_ema.load_state_dict(sd["generator_ema"] or sd["generator"])
        self.opt_g.load_state_dict(sd["opt_g"])
        self.opt_d.load_state_dict(sd["opt_d"])
        if sd["scaler_g"]:  # empty when saved with grad scaling off
            self.scaler_g.load_state_dict(sd["scaler_g"])
            self.scaler_d.load_state_dict(sd["scaler_d"])
        self.step, self.epoch = sd["step"], sd["epoch"]
        self.batch_in_epoch, self.samples_seen = sd["batch_in_epoch"], sd["samples_seen"]
        self.wandb_run_id = sd["wandb_run_id"]
        self.train_seconds = sd.get("train_seconds", 0.0)  # absent before issue 5's checkpoints
        self.best_fid, self.best_fid_step = sd.get("best_fid"), sd.get("best_fid_step", 0)  # absent before issue 6's


# --------------------------------------------------------------------------- RNG states


def capture_rng_state(device: torch.device) -> dict[str, Any]:
    """This process's generators (python, numpy, torch CPU and, on a GPU, CUDA) as plain
    containers and tensors, so ``weights_only=True`` loads them."""
    version, mt, gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    return {
        "python": [version, list(mt), gauss],
        "numpy": {
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }


def restore_rng_state(state: dict[str, Any], device: torch.device) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    n = state["numpy"]
    np.random.set_state({
        "bit_generator": "MT19937",
        "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
        "has_gauss": n["has_gauss"],
        "gauss": n["gauss"],
    })  # fmt: skip
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def seed_rng(seed: int) -> None:
    """Seed python, numpy and torch (CPU and every GPU) from one number."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------- files


def checkpoint_path(ckpt_dir: Path, step: int) -> Path:
    return ckpt_dir / f"step_{step:08d}.pt"


def record_path(path: Path) -> Path:
    return path.with_name(path.name + RECORD_SUFFIX)


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """``step_*.pt`` files in ``ckpt_dir``, oldest first (by step), valid or not."""
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def step_of(path: Path) -> int:
    """The step a ``step_<step>.pt`` file was written at."""
    m = _NAME.match(path.name)
    if m is None:
        raise ValueError(f"{path} is not named like a checkpoint (step_<step>.pt)")
    return int(m.group(1))


class Saved(NamedTuple):
    path: Path
    bytes: int
    seconds: float


class _HashingFile:
    """A write-only file that hashes what passes through it (one pass over the bytes), and
    keeps the first write error: torch.save reports it as "unexpected pos ..." otherwise."""

    def __init__(self, f):
        self.f, self.sha256, self.bytes = f, hashlib.sha256(), 0
        self.error: OSError | None = None

    def write(self, data) -> int:
        self.sha256.update(data)
        self.bytes += len(data)
        try:
            return self.f.write(data)
        except OSError as e:  # a full disk, a quota, an I/O error
            self.error = self.error or e
            raise

    def flush(self) -> None:
        self.f.flush()


def _save_hashed(state_dict: dict[str, Any], f) -> _HashingFile:
    hashed = _HashingFile(f)
    try:
        torch.save(state_dict, hashed)
    except RuntimeError:
        if hashed.error is not None:
            raise hashed.error from None
        raise
    return hashed


def save(state_dict: dict[str, Any], ckpt_dir: Path, step: int, keep: int) -> Saved:
    """Write ``step_<step>.pt`` and its record atomically, then drop all but the newest
    ``keep``. On any failure (full disk, I/O error) the temp file is removed and the
    exception propagates: older checkpoints are untouched."""
    t0 = time.perf_counter()
    path = checkpoint_path(ckpt_dir, step)
    size = _write_with_record(state_dict, path, step)
    for old in list_checkpoints(ckpt_dir)[:-keep]:
        old.unlink(missing_ok=True)
        record_path(old).unlink(missing_ok=True)
    return Saved(path, size, time.perf_counter() - t0)


def save_best(state_dict: dict[str, Any], ckpt_dir: Path, step: int) -> Saved:
    """Write ``best.pt`` (the state with the best evaluation so far) and its record, the
    same way: never pruned, never picked by train.resume=auto, loadable by path."""
    t0 = time.perf_counter()
    path = ckpt_dir / BEST_NAME
    size = _write_with_record(state_dict, path, step)
    return Saved(path, size, time.perf_counter() - t0)


def _write_with_record(state_dict: dict[str, Any], path: Path, step: int) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    record_path(path).unlink(missing_ok=True)  # a stale record must never vouch for new bytes
    written = write_atomic(path, lambda f: _save_hashed(state_dict, f))
    record = {
        "file": path.name, "step": step, "bytes": written.bytes, "sha256": written.sha256.hexdigest(),
        "data": state_dict.get("data"),
    }  # fmt: skip
    write_atomic(record_path(path), lambda f: f.write(json.dumps(record).encode()))
    return written.bytes


def verify(path: Path) -> str | None:
    """Why ``path`` cannot be trusted (no record, truncated, checksum mismatch), or None."""
    try:
        record = json.loads(record_path(path).read_text())
        expected_bytes, expected_sha = int(record["bytes"]), str(record["sha256"])
    except FileNotFoundError:
        return f"no size/checksum record {record_path(path).name} (the write was cut short?)"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable record {record_path(path).name}: {e}"
    try:
        size = path.stat().st_size
        if size != expected_bytes:
            return f"{size} bytes, its record says {expected_bytes} (truncated or overwritten)"
        sha = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                sha.update(chunk)
    except OSError as e:
        return f"unreadable: {e}"
    if sha.hexdigest() != expected_sha:
        return "SHA-256 differs from its record (the file is damaged)"
    return None


def latest_valid(ckpt_dir: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """(newest checkpoint that verifies, [(newer rejected ones, reason)])."""
    rejected = []
    for path in reversed(list_checkpoints(ckpt_dir)):
        reason = verify(path)
        if reason is None:
            return path, rejected
        rejected.append((path, reason))
    return None, rejected


def set_aside(path: Path) -> Path:
    """Rename a rejected checkpoint (and its record) out of the way: kept for a look,
    never loaded, never counted by ``list_checkpoints`` or pruned."""
    aside = path.with_name(path.name + CORRUPT_SUFFIX)
    path.replace(aside)
    if record_path(path).exists():
        record_path(path).replace(record_path(aside))
    return aside


def remove_temp_files(ckpt_dir: Path) -> list[Path]:
    """Delete temp files left by a save that was killed mid-write (call when no save runs)."""
    stale = list(ckpt_dir.glob(".step_*.tmp")) if ckpt_dir.is_dir() else []
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


# --------------------------------------------------------------------------- which one to resume from


# What train.overwrite leaves in a run folder: the log that records the wipe, and the
# launchers' folder (job scripts, pickles and logs of the job that is running now).
KEPT_ON_OVERWRITE = ("train.log", "slurm")


def check_resume_setting(cfg: Config, shards: ShardSet) -> None:
    """The parts of train.resume a user can get wrong, checked before any process starts:
    a setting that does not fit the run folder, and a resume on other data than the
    checkpoint's (read from its record; ``train()`` checks the checkpoint it loads again)."""
    existing = list_checkpoints(cfg.run_dir / "checkpoints")
    if cfg.train.resume == "never" and existing and not cfg.train.overwrite:
        raise ConfigError(
            f"train.resume: 'never', but {existing[0].parent} already holds {len(existing)} checkpoint(s); "
            "pick another train.name, or add train.overwrite=true to wipe that run folder"
        )
    if cfg.train.resume not in ("auto", "never") and not Path(cfg.train.resume).is_file():
        raise ConfigError(f"train.resume: {cfg.train.resume} is not a file")
    candidate = Path(cfg.train.resume) if cfg.train.resume not in ("auto", "never") else None
    if cfg.train.resume == "auto":
        candidate = next((p for p in reversed(existing) if record_path(p).exists()), None)
    if candidate is not None and record_path(candidate).exists():
        try:
            saved = json.loads(record_path(candidate).read_text()).get("data")
        except (OSError, ValueError, AttributeError):
            saved = None  # a damaged record: choose() sets that checkpoint aside, train() checks the one it loads
        check_same_data(saved, shards, candidate, cfg.train.data_changed)


def check_same_data(saved: dict[str, Any] | None, shards: ShardSet, path: Path, policy: str) -> str | None:
    """ConfigError when ``path`` was trained on other shards than ``shards`` and ``policy``
    (train.data_changed) is "refuse"; the change, in one line, when it is "continue";
    None when the data is the same or the checkpoint predates data identities."""
    change = describe_change(saved, shards.identity()) if saved else None
    if change is not None and policy == "refuse":
        raise ConfigError(
            f"data.shards: not the data {path} was trained on: {change}. To resume on this data anyway: "
            "train.data_changed=continue; for a new run: another train.name"
        )
    return change


def settle_restart(cfg: Config, restart: int) -> str | None:
    """A restarted attempt of the same job (torchrun --max-restarts, a Slurm requeue)
    must carry on from the run folder, whatever train.resume says: the first attempt
    already started fresh (never), wiped the folder (overwrite) or loaded a file (PATH).
    Adjusts ``cfg`` in place and returns a line saying what changed (None: nothing)."""
    t = cfg.train
    if restart == 0 or t.resume == "auto":
        return None
    if t.resume != "never" and not list_checkpoints(cfg.run_dir / "checkpoints"):
        return None  # PATH, and this job has saved nothing of its own yet: load PATH again
    was = f"train.resume={t.resume}" + (" train.overwrite=true" if t.overwrite else "")
    t.resume, t.overwrite = "auto", False
    return f"restart {restart} of this job: {was} applied to the first attempt only; now train.resume=auto"


def choose(cfg: Config) -> Path | None:
    """Rank 0 only: the checkpoint to resume from (None: start fresh). Rejected ones are
    reported and set aside; raises ResumeError when checkpoints exist but none is usable."""
    run_dir, ckpt_dir = cfg.run_dir, cfg.run_dir / "checkpoints"
    for tmp in remove_temp_files(ckpt_dir):
        log.warning("removed %s, left by a checkpoint write that was cut short", tmp)
    if cfg.train.resume == "never":
        if list_checkpoints(ckpt_dir):  # train.overwrite=true (checked before start)
            log.warning("train.overwrite: wiping %s to start afresh (train.log and slurm/ are kept)", run_dir)
            for child in run_dir.iterdir():
                if child.name not in KEPT_ON_OVERWRITE:
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
        return None
    if cfg.train.resume != "auto":
        path = Path(cfg.train.resume)
        reason = verify(path)
        if reason is not None and record_path(path).exists():
            raise ResumeError(f"train.resume: {path}: {reason}")
        if reason is not None:
            log.warning("%s has no size/checksum record beside it: loading it unverified", path)
        return path
    path, rejected = latest_valid(ckpt_dir)
    for bad, reason in rejected:
        aside = set_aside(bad)
        log.warning("checkpoint %s is unusable: %s; moved aside to %s, trying the one before", bad, reason, aside.name)
    if path is None and rejected:
        raise ResumeError(
            f"no usable checkpoint in {ckpt_dir} (all {len(rejected)} rejected, see above); "
            "to start again from scratch: train.resume=never train.overwrite=true"
        )
    return path


class CheckpointError(ValueError):
    """No usable checkpoint at the given path; the message names it."""


def resolve(path: Path) -> Path:
    """What a user's checkpoint path means (dcgan.eval, dcgan.generate): a checkpoint file,
    verified against its record when it has one, or a run folder's newest valid one."""
    if path.is_dir():
        ckpt_dir = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        newest, _ = latest_valid(ckpt_dir)
        if newest is None:
            raise CheckpointError(f"{path}: no valid checkpoint in {ckpt_dir}")
        return newest
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    if record_path(path).exists() and (reason := verify(path)) is not None:
        raise CheckpointError(f"{path}: {reason}")
    return path


class ResumeError(RuntimeError):
    """Checkpoints exist, but none can be resumed from."""


def load(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    return torch.load(path, map_location=map_location, weights_only=True)
