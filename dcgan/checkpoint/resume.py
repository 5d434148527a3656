"""Resume policy: which checkpoint a run goes on from, and what it may have changed since.

``choose(cfg)`` applies ``train.resume`` to the run folder: the newest usable checkpoint
(dcgan/checkpoint/files.py), a given one, or none; an unusable one is set aside and the one
before is tried. Resuming from any other than the folder's newest starts a new timeline
(``place_on_timeline``; lineage and the settings that act once: ``dcgan/run/timelines.py``).
The checks made before any process starts (``check_resume_setting``, ``check_same_data``,
``check_model_unchanged``) refuse what cannot go on: another architecture, other data.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any, NamedTuple

from dcgan.base.checks import ConfigError
from dcgan.checkpoint.files import (
    list_checkpoints,
    read_record,
    record_path,
    remove_temp_files,
    set_aside,
    step_of,
    usable,
)
from dcgan.config.sections import Config
from dcgan.data.shardset import ShardSet, describe_change, say_once
from dcgan.run import timelines
from dcgan.run.folder import KEPT_ON_OVERWRITE, RunFolder

log = logging.getLogger(__name__)

# Model settings that shape the nets' tensors: a checkpoint cannot be loaded with others.
FIXED_ON_RESUME = ("arch", "image_size", "channels", "nz", "ngf", "ndf", "spectral_norm", "conditional", "num_classes")


def check_model_unchanged(saved_model: dict[str, Any] | None, cfg: Config, path: Path) -> None:
    """ConfigError when a FIXED_ON_RESUME setting differs from the one ``path`` was trained with."""
    if not saved_model:
        return
    changed = [
        f"model.{key} {saved_model[key]!r} -> {getattr(cfg.model, key)!r}"
        for key in FIXED_ON_RESUME
        if key in saved_model and saved_model[key] != getattr(cfg.model, key)
    ]
    if changed:
        raise ConfigError(
            f"{', '.join(changed)}: {path} holds nets of another shape, and these settings cannot change on "
            "resume; set them back, or start a new run (another train.name)"
        )


def check_resume_setting(cfg: Config, shards: ShardSet) -> None:
    """The parts of train.resume a user can get wrong, checked before any process starts:
    a setting that does not fit the run folder, and a resume on other data than the
    checkpoint's (read from its record; ``train()`` checks the checkpoint it loads again)."""
    existing = RunFolder.of(cfg).list_checkpoints()
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
    if candidate is None:
        return
    record = read_record(candidate)
    if cfg.train.resume != "auto":  # a file the user named: unusable is their mistake, not a fallback
        sd, reason = usable(candidate, unrecorded_ok=True)
        if reason is not None:
            raise ConfigError(f"train.resume: {candidate}: {reason}")
        record = {"data": sd.get("data"), "model": sd["config"]["model"]}
    check_model_unchanged(record.get("model"), cfg, candidate)
    check_same_data(record.get("data"), shards, candidate, cfg.train.data_changed)


def check_same_data(saved: dict[str, Any] | None, shards: ShardSet, path: Path, policy: str) -> str | None:
    """ConfigError when ``path`` was trained on other shards than ``shards`` and ``policy``
    (train.data_changed) is "refuse"; the change, in one line, when it is "continue";
    None when the data is the same or the checkpoint predates data identities. A
    checkpoint whose identity predates content (bytes and member digests of each shard)
    is compared by shard names and counts alone, and the log says so."""
    if saved and "content" not in saved:
        say_once(
            f"{path} records the names and counts of the shards it was trained on, not their content (it was written "
            "before checkpoints held it): the data is compared by names and counts only",
        )
    change = describe_change(saved, shards.identity()) if saved else None
    if change is not None and policy == "refuse":
        raise ConfigError(
            f"data.shards: not the data {path} was trained on: {change}. To resume on this data anyway: "
            "train.data_changed=continue; for a new run: another train.name"
        )
    return change


class Resume(NamedTuple):
    path: Path
    state_dict: dict[str, Any] | None  # loaded on the CPU (rank 0; None once loaded, and on other ranks)
    lineage: timelines.Lineage  # the lineage this attempt trains on
    continues: bool  # the folder's own timeline goes on (False: a new one starts after path's step)


def choose(cfg: Config) -> Resume | None:
    """Rank 0 only: the checkpoint to resume from, loaded (None: start fresh), and the
    timeline it goes on on. Unusable ones are reported and set aside; raises ResumeError
    when checkpoints exist but none is usable, ConfigError when the chosen one holds nets
    of another shape. Records the settings that act once (``timelines.record_start``)."""
    found = _choose_path(cfg)
    if found is None:
        timelines.record_start(cfg, 0)
        return None
    path, sd = found
    check_model_unchanged(sd["config"]["model"], cfg, path)
    resume = place_on_timeline(cfg.run_dir, path, sd)
    timelines.record_start(cfg, sd["step"])
    return resume


def _choose_path(cfg: Config) -> tuple[Path, dict[str, Any]] | None:
    folder = RunFolder.of(cfg)
    run_dir, ckpt_dir = folder.path, folder.checkpoints
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
        if not record_path(path).exists():
            log.warning("%s has no size/checksum record beside it: loading it unverified", path)
        sd, reason = usable(path, unrecorded_ok=True)
        if reason is not None:
            raise ResumeError(f"train.resume: {path}: {reason}")
        return path, sd
    candidates = list_checkpoints(ckpt_dir)
    for path in reversed(candidates):
        sd, reason = usable(path)
        if reason is None:
            return path, sd
        aside = set_aside(path)
        log.warning("checkpoint %s is unusable: %s; moved aside to %s, trying the one before", path, reason, aside.name)
    if candidates:
        raise ResumeError(
            f"no usable checkpoint in {ckpt_dir} (all {len(candidates)} rejected, see above); "
            "to start again from scratch: train.resume=never train.overwrite=true"
        )
    return None


def place_on_timeline(run_dir: Path, path: Path, sd: dict[str, Any]) -> Resume:
    """Resume from ``path`` (``sd``) in ``run_dir``: the folder's own timeline goes on when
    ``path`` is its newest checkpoint; otherwise a new timeline starts after ``path``'s
    step, and what the folder holds past the step where its lineage and ``path``'s part
    moves to ``timelines/`` (whatever its step number). Resumed from an old timeline of
    this folder, that timeline's metrics up to ``path``'s step come back, so metrics.jsonl
    holds the whole curve of the lineage trained on."""
    folder = RunFolder(run_dir)
    ckpt_dir, step, lineage = folder.checkpoints, sd["step"], sd.get("lineage")
    held = timelines.read_lineage(run_dir)
    if held is None:  # lineage.json lost: the newest checkpoint knows the folder's lineage
        newest = list_checkpoints(ckpt_dir)[-1:]
        held = read_record(newest[0]).get("lineage") if newest else None
    after = int(min(step, timelines.parting_step(held, lineage)))
    later = [p for p in list_checkpoints(ckpt_dir) if step_of(p) > after]
    best = folder.best
    if best.exists() and read_record(best).get("step", 0) > after:
        later.append(best)
    own = path.resolve().parent == ckpt_dir.resolve()
    if own and not later and after == step:
        return Resume(path, sd, lineage or timelines.fresh(), continues=True)
    timelines.move_aside(run_dir, after, later, step)
    old_timeline = path.resolve().parent.parent
    if old_timeline.parent == folder.timelines.resolve():
        timelines.bring_back_metrics(run_dir, RunFolder(old_timeline).metrics, lineage or [["", 0]], after, step)
    return Resume(path, sd, timelines.branch(lineage, step), continues=False)


class ResumeError(RuntimeError):
    """Checkpoints exist, but none can be resumed from."""
