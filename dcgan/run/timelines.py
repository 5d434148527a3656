"""A run folder's history: the start settings it has already applied, and the timeline
each checkpoint, metrics line and sample grid belongs to.

**Settings that act once.** ``train.resume=never``, ``train.resume=PATH`` and
``train.overwrite=true`` say how a run folder starts, not how each attempt does. The
attempt that applies them records them in ``<run>/started_with.json``; a later attempt
given the same ones (the same command after a stop, a crash, a requeue or a double
submit) carries on from the folder's newest usable checkpoint instead (``settle`` turns
them into ``train.resume=auto``). Once the run has finished (``summary.json`` says
``done``) they act again: the same command then starts the run again, as asked.

**Lineage.** Every attempt trains on a timeline: an id and the step it started after.
A lineage is the list of ``[timeline id, start step]`` from the run's first step to the
timeline trained now: the state of step S on a lineage came from the timeline whose
start is the last one below S. Checkpoints carry their lineage (in the file and its
record), metrics lines the id of their timeline, and ``<run>/lineage.json`` the lineage
the folder holds now. A run folder only ever holds one lineage: resuming from a
checkpoint that is not the newest of the folder's own (an earlier step, ``best.pt``, a
file of an old timeline or of another run) starts a new timeline, and everything in the
folder past the step where the two lineages part moves to
``<run>/timelines/<when>-after-step_<S>/`` (never deleted), whatever its step number.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dcgan.base.fileio import read_json, write_atomic, write_json
from dcgan.run.folder import LINEAGE as LINEAGE  # the files' names are the run folder's: also timelines.X
from dcgan.run.folder import STARTED_WITH as STARTED_WITH
from dcgan.run.folder import RunFolder, record_path, sample_step

if TYPE_CHECKING:
    from dcgan.config.sections import Config

log = logging.getLogger(__name__)


Lineage = list  # [[timeline id, start step], ...], oldest first


# --------------------------------------------------------------------------- settings that act once


def start_settings(cfg: Config) -> dict[str, Any] | None:
    """The settings of ``cfg`` that act once per run folder (None: ``train.resume=auto``)."""
    t = cfg.train
    if t.resume == "auto":
        return None
    resume = t.resume if t.resume == "never" else str(Path(t.resume).resolve())
    return {"resume": resume, "overwrite": bool(t.overwrite and t.resume == "never")}


def applied_before(cfg: Config) -> bool:
    """Whether an earlier attempt in ``cfg.run_dir`` applied the same start settings, and
    the run has not finished since."""
    wanted = start_settings(cfg)
    if wanted is None:
        return False
    folder = RunFolder.of(cfg)
    recorded = read_json(folder.started_with) or {}
    if {k: recorded.get(k) for k in wanted} != wanted:
        return False
    return (folder.read_summary() or {}).get("status") != "done"


def record_start(cfg: Config, step: int) -> None:
    """Rank 0, right after applying the start settings: the record later attempts read."""
    settings = start_settings(cfg)
    if settings is None:
        return
    record = {**settings, "step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    try:
        write_json(RunFolder.of(cfg).started_with, record)
    except OSError as e:  # a requeue still carries on (restart count); a manual rerun would apply them again
        log.error("could not write %s (%s): the same command would apply %s again", STARTED_WITH, e, settings)


# --------------------------------------------------------------------------- lineage


def fresh() -> Lineage:
    """The lineage of a run that starts at step 0."""
    return [[_new_id(), 0]]


def branch(parent: Lineage | None, step: int) -> Lineage:
    """A new timeline after ``step`` of ``parent`` (None: a checkpoint written before
    lineages were recorded)."""
    return [*(parent or [["", 0]]), [_new_id(), step]]


def timeline_at(lineage: Lineage, step: int) -> str:
    """The id of the timeline that trained ``step`` on ``lineage``."""
    found = lineage[0][0]
    for timeline, start in lineage:
        if start < step:
            found = timeline
    return found


def parting_step(a: Lineage | None, b: Lineage | None) -> float:
    """The last step ``a`` and ``b`` share (inf: they never part, or one is unknown)."""
    if not a or not b:
        return float("inf")
    for (id_a, start_a), (id_b, start_b) in zip(a, b):
        if id_a != id_b:
            return min(start_a, start_b)
    if len(a) == len(b):
        return float("inf")
    return (a if len(a) > len(b) else b)[min(len(a), len(b))][1]


def read_lineage(run_dir: Path) -> Lineage | None:
    found = (read_json(RunFolder(run_dir).lineage) or {}).get("lineage")
    return found if isinstance(found, list) and found else None


def write_lineage(run_dir: Path, lineage: Lineage) -> None:
    """Rank 0, at the start of each attempt. A failed write is logged: the next branch
    then falls back on the newest checkpoint's lineage."""
    try:
        write_json(RunFolder(run_dir).lineage, {"lineage": lineage})
    except OSError as e:
        log.error("could not write %s: %s", RunFolder(run_dir).lineage, e)


def move_aside(run_dir: Path, after: int, later: list[Path], resumed_step: int) -> Path | None:
    """Move what the run folder holds past step ``after`` (``later``: its checkpoints
    there, best.pt among them when it is past) to a new timeline folder, with the sample
    grids and metrics lines past ``after``, and copies of metrics.jsonl and summary.json as
    they were. Returns that folder (None: nothing was past ``after``)."""
    folder = RunFolder(run_dir)
    samples, metrics = folder.samples, folder.metrics
    grids = [p for p in (samples.iterdir() if samples.is_dir() else ()) if sample_step(p) > after]
    lines = metrics.read_text().splitlines(keepends=True) if metrics.exists() else []
    kept = [line for line in lines if _step_of_line(line) is not None and _step_of_line(line) <= after]
    if not (later or grids or len(kept) < len(lines)):
        return None
    aside = RunFolder(_unused(folder.timelines / f"{time.strftime('%Y%m%d-%H%M%S')}-after-step_{after:08d}"))
    aside.checkpoints.mkdir(parents=True)
    for source, copy in ((folder.lineage, aside.lineage), (folder.summary, aside.summary)):
        if source.exists():
            shutil.copy2(source, copy)
    if metrics.exists():
        shutil.copy2(metrics, aside.metrics)  # the old timeline's whole curve
        write_atomic(metrics, lambda f: f.write("".join(kept).encode()))
    for path in later:
        path.replace(aside.checkpoints / path.name)
        record = record_path(path)
        if record.exists():
            record.replace(aside.checkpoints / record.name)
    if grids:
        aside.samples.mkdir()
        for path in grids:
            path.replace(aside.samples / path.name)
    log.warning(
        "resuming at step %d on a new timeline: what the run folder held past step %d (%d checkpoint(s), %d sample "
        "grid(s), %d metrics line(s)) moved to %s",
        resumed_step, after, len(later), len(grids), len(lines) - len(kept), aside.path,
    )  # fmt: skip
    return aside.path


def bring_back_metrics(run_dir: Path, source: Path, lineage: Lineage, after: int, upto: int) -> int:
    """Append to the run folder's metrics.jsonl the lines of ``source`` (an old timeline's
    metrics.jsonl) of steps ``after``+1..``upto`` on ``lineage``: the curve of the timeline
    resumed from, up to its checkpoint. Returns how many."""
    if not source.is_file():
        return 0
    found = []
    for line in source.read_text().splitlines(keepends=True):
        step = _step_of_line(line)
        if step is None or not after < step <= upto:
            continue
        timeline = json.loads(line).get("timeline")
        if timeline is None or timeline == timeline_at(lineage, step):
            found.append(line if line.endswith("\n") else line + "\n")
    if found:
        metrics = RunFolder(run_dir).metrics
        before = metrics.read_text() if metrics.exists() else ""
        write_atomic(metrics, lambda f: f.write((before + "".join(found)).encode()))
    return len(found)


# --------------------------------------------------------------------------- helpers


def _new_id() -> str:
    return uuid.uuid4().hex[:12]


def _unused(path: Path) -> Path:
    n, candidate = 1, path
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return candidate


def _step_of_line(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None
