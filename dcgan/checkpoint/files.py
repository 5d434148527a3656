"""Checkpoint files: how a run's state reaches the disk and comes back.

A checkpoint is ``TrainState.state_dict()`` (``dcgan/checkpoint/state.py``) plus each rank's
random generators (``capture_rng_state``). On disk it is two files in ``<run>/checkpoints/``:

* ``step_<step>.pt``: the state, written atomically (``fileio.write_atomic``: temp
  file in the same folder, fsync, rename, fsync of the folder), so a crash mid-write never leaves a half-written
  ``step_*.pt``; read back with ``weights_only=True`` (tensors, numbers, strings and
  containers only: nothing arbitrary is unpickled).
* ``step_<step>.pt.json``: its record (size in bytes and SHA-256), written after the
  ``.pt`` is in place. A checkpoint counts only when its record exists and matches, so a
  file truncated or damaged later (a full disk, a copy cut short, a bad block) is
  detected before anything is loaded from it.

Usable (``usable``): it verifies against its record, ``weights_only=True`` loads it, and
every tensor in it is finite (a diverged run's last checkpoints must never be resumed
from). Which one a run resumes from is ``dcgan/checkpoint/resume.py``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import random
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from dcgan.base.fileio import read_json, write_atomic, write_json
from dcgan.checkpoint.state import FORMAT_VERSION
from dcgan.models.networks import ModelConfig, build_models
from dcgan.run.folder import (  # how checkpoints are named: the run folder's convention
    BEST_NAME,
    CHECKPOINTS_DIR,
    RECORD_SUFFIX,
    checkpoint_path,
    list_checkpoints,
    record_path,
)
from dcgan.run.folder import (
    step_of as step_of,  # for callers of files.step_of
)

log = logging.getLogger(__name__)

CORRUPT_SUFFIX = ".corrupt"  # a rejected checkpoint is renamed aside, never deleted


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
    """Put back what ``capture_rng_state`` took. Across device types, what both sides have:
    a GPU's state resumed on the CPU skips its CUDA part; a CPU's state resumed on a GPU
    has none, and the CUDA generator keeps the state it was seeded with."""
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
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def trained_on(sd: dict[str, Any]) -> str:
    """The device type ("cpu", "cuda") the run that wrote ``sd`` trained on. Checkpoints
    older than its "device" key hold a CUDA RNG state exactly when written on a GPU."""
    return sd.get("device") or ("cuda" if sd["rng"][0].get("cuda") is not None else "cpu")


def seed_rng(seed: int) -> None:
    """Seed python, numpy and torch (CPU and every GPU) from one number."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------- files


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
        "data": state_dict.get("data"), "model": state_dict.get("config", {}).get("model"),
        "lineage": state_dict.get("lineage"),
    }  # fmt: skip
    write_json(record_path(path), record)
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


def nonfinite_tensors(state_dict: dict[str, Any], limit: int = 3) -> list[str]:
    """Names of up to ``limit`` floating-point tensors anywhere in ``state_dict`` (nets,
    EMA, optimiser states: whatever parts ``TrainState`` declares) holding a NaN or an
    infinity; one host sync per device."""
    flags: dict[torch.device, list[tuple[str, torch.Tensor]]] = {}

    def walk(obj: Any, name: str) -> None:
        if isinstance(obj, torch.Tensor):
            if obj.is_floating_point():
                flags.setdefault(obj.device, []).append((name, torch.isfinite(obj).all()))
        elif isinstance(obj, dict):
            for key, value in obj.items():
                walk(value, f"{name}.{key}" if name else str(key))
        elif isinstance(obj, (list, tuple)):
            for i, value in enumerate(obj):
                walk(value, f"{name}.{i}")

    walk(state_dict, "")
    bad = []
    for found in flags.values():
        finite = torch.stack([flag for _, flag in found]).tolist()
        bad += [name for (name, _), ok in zip(found, finite) if not ok]
    return bad[:limit]


def usable(path: Path, unrecorded_ok: bool = False) -> tuple[dict[str, Any] | None, str | None]:
    """(state dict, None) when ``path`` verifies against its record (or has none and
    ``unrecorded_ok``), loads with weights_only=True and every tensor in it is finite;
    (None, why not) otherwise."""
    if not (unrecorded_ok and not record_path(path).exists()):
        reason = verify(path)
        if reason is not None:
            return None, reason
    try:
        sd = load(path)
    except CheckpointError as e:
        return None, str(e).removeprefix(f"{path}: ")
    if not isinstance(sd, dict) or "generator" not in sd:
        return None, "not a dcgan.train checkpoint (no generator state)"
    if sd.get("format_version") != FORMAT_VERSION:
        return None, f"checkpoint format {sd.get('format_version')!r}, this code reads {FORMAT_VERSION}"
    bad = nonfinite_tensors(sd)
    if bad:
        return None, f"non-finite values in {', '.join(bad)} (written by a run that diverged)"
    return sd, None


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


def read_record(path: Path) -> dict[str, Any]:
    """The record beside ``path`` ({} when missing or damaged: choose() sets that checkpoint aside)."""
    return read_json(record_path(path)) or {}


def generator_from_state(sd: dict, model: ModelConfig, weights: str, path: Path) -> nn.Module:
    """The generator of checkpoint state ``sd`` (read from ``path``): its EMA generator
    (``weights="ema"``, falling back to G when the run had none) or G itself (``"raw"``), on
    the CPU in eval mode; ``dcgan.load_generator`` is the public loader, from a path.
    CheckpointError when its tensors do not fit the net its own model section describes (a
    checkpoint edited or written by other code)."""
    if weights not in ("ema", "raw"):  # dcgan/checkpoint/inference.py's WEIGHTS
        raise ValueError(f"weights must be 'ema' or 'raw', got {weights!r}")
    generator, _ = build_models(model)
    state = sd["generator_ema"] if weights == "ema" and sd.get("generator_ema") is not None else sd["generator"]
    if weights == "ema" and sd.get("generator_ema") is None:
        log.warning("%s has no EMA generator (model.ema_decay was 0): using G", path)
    try:
        generator.load_state_dict(state)
    except (RuntimeError, KeyError, TypeError) as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        first = lines[1] if len(lines) > 1 else (lines or [type(e).__name__])[0]
        raise CheckpointError(
            f"{path}: its generator does not fit its own model settings (arch {model.arch}, ngf {model.ngf}, "
            f"nz {model.nz}, channels {model.channels}): {first}"
        ) from None
    return generator.eval()


class CheckpointError(ValueError):
    """No usable checkpoint at the given path; the message names it."""


def resolve(path: Path, prefer_best: bool = False) -> Path:
    """What a user's checkpoint path means (dcgan.eval, dcgan.generate, dcgan.load_generator):
    a checkpoint file, verified against its record when it has one, or a run folder's newest
    valid one; with ``prefer_best``, the folder's ``best.pt`` (best FID) when it verifies."""
    if path.is_dir():
        ckpt_dir = path / CHECKPOINTS_DIR if (path / CHECKPOINTS_DIR).is_dir() else path
        best = ckpt_dir / BEST_NAME
        if prefer_best and best.is_file():
            reason = verify(best)
            if reason is None:
                return best
            log.warning("%s: %s; using the newest valid checkpoint instead", best, reason)
        newest, _ = latest_valid(ckpt_dir)
        if newest is None:
            raise CheckpointError(f"{path}: no valid checkpoint in {ckpt_dir}")
        return newest
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    if record_path(path).exists() and (reason := verify(path)) is not None:
        raise CheckpointError(f"{path}: {reason}")
    return path


def load(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A checkpoint's state dict; nothing arbitrary is unpickled (CheckpointError when
    ``weights_only=True`` refuses the file or it is no torch file: it was not written by
    dcgan.train)."""
    if path.name.endswith(".pt" + RECORD_SUFFIX):
        raise CheckpointError(
            f"{path}: a checkpoint's size/SHA-256 record, not a checkpoint; load {path.with_suffix('')}"
        )
    try:
        sd = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # refused, truncated, no torch file (torch raises KeyError, RuntimeError...), unreadable
        raise CheckpointError(f"{path}: {_why_not_loaded(path, e)}") from None
    return sd


def _why_not_loaded(path: Path, error: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` failed on ``path``, in words. torch's own text
    is empty for an empty file, and for a file torch.save did not write it names the first
    byte as an unpickling opcode ("Unsupported operand 123" for JSON)."""
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)  # a whole record: a few hundred bytes
    except OSError as e:
        return f"unreadable: {e}"
    if not head:
        return "cannot be read as a checkpoint: the file is empty"
    if not head.startswith((b"PK\x03\x04", b"\x80")):  # torch.save writes a zip archive (a pickle before torch 1.6)
        try:
            record = json.loads(head)
        except ValueError:
            record = None
        if isinstance(record, dict) and "sha256" in record:  # under another name than step_X.pt.json: set aside
            return f"the size/SHA-256 record of {record.get('file')}, not a checkpoint"
        return f"cannot be read as a checkpoint: not a file torch.save wrote (it starts with {head[:16]!r})"
    if isinstance(error, pickle.UnpicklingError):
        # torch's text starts with how to load it unsafely; its own reason follows "WeightsUnpickler error:"
        after = str(error).partition("WeightsUnpickler error:")[2]
        reason = next((line.strip() for line in after.splitlines() if line.strip()), type(error).__name__)
        return f"refused by torch.load(weights_only=True) ({reason}), not loaded"
    detail = (str(error).strip().splitlines() or [""])[0][:200]
    return f"cannot be read as a checkpoint ({type(error).__name__}{': ' + detail if detail else ''})"
