"""What a Slurm job asks for, as one typed, validated record (``SlurmOptions``), and the
submitit executor made from it. ``launch.submit`` fills it from its command line,
``launch.sweep`` from the ``slurm:`` section of a sweep file (then the command line).

One task per GPU: each task is one training process (one rank), so ``tasks_per_node``
defaults to ``gpus_per_node``. On CPU-only partitions set ``gpus_per_node: 0`` and
``tasks_per_node`` to the processes wanted per node.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import submitit
from submitit.core.utils import FailedJobError, JobPaths

from dcgan.base.checks import check_field
from dcgan.config.keys import field_comments
from dcgan.config.loading import build_section, read_yaml


@dataclass
class SlurmOptions:
    """A job's resources and requeue policy (every field: a ``--flag`` of launch.submit)."""

    cluster: Literal["slurm", "local"] = "slurm"  # slurm, or local: submitit's local executor (the same job, no Slurm)
    nodes: int = 1  # nodes of the job (the same processes on each)
    gpus_per_node: int = 0  # GPUs per node; 0: a CPU-only partition
    tasks_per_node: int = 0  # training processes per node; 0: one per GPU (1 without GPUs)
    cpus_per_task: int = 0  # CPUs per task (per training process); 0: the partition's default
    mem_gb: float = 0  # memory per node; 0: the partition's default
    time: str = "4:00:00"  # time limit: minutes, H:MM:SS, or D-HH:MM:SS
    partition: str = ""  # Slurm partition; "": the cluster's default
    account: str = ""  # account charged; "": yours by default
    qos: str = ""  # quality of service; "": the default
    constraint: str = ""  # node features required (sbatch --constraint)
    # Any other sbatch option as "key=value" (e.g. "exclusive=true", "reservation=x");
    # a bare "key" is a flag.
    sbatch: list[str] = field(default_factory=list)
    # Slurm sends USR2 this long before the time limit: enough for two training steps
    # plus one checkpoint write (README "Running on Slurm").
    signal_delay_s: int = 120
    max_requeues: int = 20  # preemptions / time limits / outside requeues before the job gives up
    array_parallelism: int = 0  # sweeps: array tasks running at once (0: no limit)
    folder: str = ""  # submitit's scripts, pickles and task logs; "": <run folder>/slurm

    def __post_init__(self) -> None:
        check_field(self.nodes >= 1, "nodes", "must be >= 1")
        for name in ("gpus_per_node", "tasks_per_node", "cpus_per_task", "array_parallelism", "max_requeues"):
            check_field(getattr(self, name) >= 0, name, "must be >= 0")
        check_field(self.mem_gb >= 0, "mem_gb", "must be >= 0")
        check_field(self.signal_delay_s >= 10, "signal_delay_s", "must be >= 10 (a step and a checkpoint must fit)")
        try:
            minutes = time_minutes(self.time)
        except ValueError:
            minutes = 0
        check_field(minutes >= 1, "time", f"{self.time!r} is not a time limit (minutes, H:MM:SS or D-HH:MM:SS)")
        check_field(
            minutes * 60 > self.signal_delay_s,
            "signal_delay_s",
            f"{self.signal_delay_s} s is longer than the time limit {self.time}",
        )
        for item in self.sbatch:
            check_field(bool(re.fullmatch(r"[a-z][a-z0-9-]*(=.*)?", item)), "sbatch", f"{item!r} is not key=value")
        if self.cluster == "local":
            check_field(self.nodes == 1, "nodes", "the local executor runs one node")

    @property
    def tasks(self) -> int:
        """Training processes per node."""
        return self.tasks_per_node or self.gpus_per_node or 1

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks

    @property
    def timeout_min(self) -> int:
        return time_minutes(self.time)


def time_minutes(text: str) -> int:
    """Slurm's time formats (minutes, M:S, H:M:S, D-H, D-H:M, D-H:M:S) in whole minutes."""
    days, _, rest = text.strip().rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if days:
        parts += [0] * (3 - len(parts))  # D-H, D-H:M
        h, m, s = parts
        total = int(days) * 1440 + h * 60 + m + s / 60
    elif len(parts) == 1:
        total = parts[0]
    elif len(parts) == 2:
        total = parts[0] + parts[1] / 60
    elif len(parts) == 3:
        total = parts[0] * 60 + parts[1] + parts[2] / 60
    else:
        raise ValueError(text)
    if min(parts) < 0:
        raise ValueError(text)
    return int(-(-total // 1))  # round up: never ask for less than was written


def add_arguments(parser: argparse.ArgumentParser, description: str | None = None) -> None:
    """One ``--flag`` per SlurmOptions field, left unset (None) when not given, so that a
    sweep file's ``slurm:`` value stands unless the flag is given. Each flag's help is the
    comment beside its field (dcgan.config.keys.field_comments) and the field's default."""
    group = parser.add_argument_group("Slurm job (launch/options.py)", description)
    meanings, defaults = field_comments(SlurmOptions), SlurmOptions()
    for f in fields(SlurmOptions):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        shown = {"": '""', "[]": "none"}.get(str(default), default)
        repeat = "repeatable; " if f.name == "sbatch" else ""
        text = f"{meanings.get(f.name, '')} ({repeat}default: {shown})".strip().replace("%", "%%")
        if f.name == "sbatch":
            group.add_argument(flag, action="append", metavar="KEY=VALUE", help=text)
        else:
            group.add_argument(flag, default=None, metavar=f.name.upper(), help=text)


def from_arguments(args: argparse.Namespace, base: dict[str, Any] | None = None, where: str = "") -> SlurmOptions:
    """SlurmOptions from ``base`` (a sweep file's ``slurm:`` section) updated by the flags
    given on the command line; raises ConfigError naming the key."""
    raw = dict(base or {})
    for f in fields(SlurmOptions):
        value = getattr(args, f.name, None)
        if value is not None:
            # Flags arrive as text: numbers and booleans are read as YAML would, and text
            # settings keep their text (YAML 1.1 reads the time limit 4:00:00 as base 60).
            raw[f.name] = value if f.name == "sbatch" else read_yaml(value)
    return build_section(SlurmOptions, raw, where or "launch options", prefix="slurm.")


def make_executor(opts: SlurmOptions, folder: Path, name: str) -> submitit.AutoExecutor:
    """A submitit executor for ``opts``: the job script gets one task per training process
    and ``--signal=USR2@signal_delay_s``; the trainer handles that signal itself. Raises
    SubmitError where Slurm's client is missing (submitit's own error is a traceback)."""
    missing = [tool for tool in ("sbatch", "srun") if opts.cluster == "slurm" and not shutil.which(tool)]
    if missing:
        raise SubmitError(
            f"no Slurm client here ({' and '.join(missing)} not on PATH): submit from a login node "
            "of the cluster, or run the job on this machine with --cluster local"
        )
    executor = submitit.AutoExecutor(folder=folder, cluster=opts.cluster, slurm_max_num_timeout=opts.max_requeues)
    params: dict[str, Any] = dict(
        name=name,
        nodes=opts.nodes,
        tasks_per_node=opts.tasks,
        timeout_min=opts.timeout_min,
    )
    if opts.gpus_per_node:
        params["gpus_per_node"] = opts.gpus_per_node
    if opts.cpus_per_task:
        params["cpus_per_task"] = opts.cpus_per_task
    if opts.mem_gb:
        params["mem_gb"] = opts.mem_gb
    if opts.cluster == "slurm":
        extra: dict[str, Any] = {}
        for item in opts.sbatch:
            key, sep, value = item.partition("=")
            extra[key.replace("-", "_")] = value if sep else True
        params.update(
            slurm_signal_delay_s=opts.signal_delay_s,
            slurm_additional_parameters=extra,
            **{
                f"slurm_{k}": getattr(opts, k)
                for k in ("partition", "account", "qos", "constraint")
                if getattr(opts, k)
            },
        )
        if opts.array_parallelism:
            params["slurm_array_parallelism"] = opts.array_parallelism
    executor.update_parameters(**params)
    return executor


class SubmitError(Exception):
    """sbatch did not take the job (or could not be run): one line for the user. Nothing
    was submitted, and what the attempt wrote into the job folder is gone."""


# What a submitit submission writes before sbatch answers (the job's pickle(s) and its
# sbatch script), named by a fresh uuid: only files so named, and new, are this attempt's.
_SUBMISSION_FILES = re.compile(r"(\.submission_file_)?[0-9a-f]{32}\.(pkl|sh)")


@contextlib.contextmanager
def submission(folder: Path, what: str = "the job") -> Iterator[None]:
    """Around making an executor for ``folder`` and submitting through it: when sbatch
    refuses (no controller, a bad partition, ...) or cannot be run, raise SubmitError with
    sbatch's first meaningful line instead of submitit's traceback, after removing the
    files this attempt wrote into the folder and the folders it made (a job folder of
    earlier submissions keeps their files: logs, results, and one of another attempt).
    submitit prints sbatch's whole stderr itself before raising: that is held back and
    shown only if the submission goes through."""
    top = JobPaths.get_first_id_independent_folder(folder)
    made = [p for p in (top, *top.parents) if not p.exists()]  # the folders submitting would make
    before = set(top.iterdir()) if top.is_dir() else set()
    held = io.StringIO()
    try:
        with contextlib.redirect_stderr(held):
            yield
    except (FailedJobError, OSError) as e:
        _remove_attempt(top, before, made)
        raise SubmitError(_reason(e, what)) from None
    except Exception:  # not on Ctrl-C: sbatch may have taken the job, which needs its pickle
        _remove_attempt(top, before, made)
        raise
    if held.getvalue():
        sys.stderr.write(held.getvalue())


def _remove_attempt(top: Path, before: set[Path], made: list[Path]) -> None:
    if top.is_dir():
        for path in set(top.iterdir()) - before:
            if _SUBMISSION_FILES.fullmatch(path.name) and path.is_file():
                path.unlink(missing_ok=True)
    for path in made:  # deepest first; one that holds anything else stays
        try:
            path.rmdir()
        except OSError:
            break


def _reason(error: Exception, what: str) -> str:
    """One line: sbatch's first error line (its first line when none says error)."""
    if isinstance(error, OSError):
        where = f" ({error.filename})" if error.filename else ""
        if Path(str(error.filename)).name == "sbatch":
            return f"cannot run sbatch to submit {what}: {error.strerror or error}{where}"
        return f"cannot write {what}'s files: {error.strerror or error}{where}"
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    line = next((line for line in lines if "error" in line.lower()), lines[0] if lines else "")
    line = re.sub(r"^sbatch: (error: )?", "", line)
    code = getattr(error.__cause__, "returncode", None)
    if not line:
        line = f"it exited with status {code} and printed nothing" if code is not None else "no reason given"
    return f"sbatch refused {what}: {line}"
