"""python -m launch.sweep configs/sweeps/celeba-lr.yaml --nodes 1 --gpus-per-node 8 [--dry-run]

A hyper-parameter sweep as one Slurm job array: every run is one array task (a
multi-task job of its own: nodes x tasks) with its own run folder (``--dry-run``
lists them), and all runs share one W&B group (``wandb.group``: the sweep's name).

A sweep file::

    base: configs/celeba.yaml          # the config every run starts from (path from the working directory)
    name: celeba-lr                    # default: the sweep file's name; runs go to <out_dir>/<name>/
    set: {train.steps: 20000}          # overrides shared by every run
    grid:                              # every combination of these values ...
      optim.g.lr: [1.0e-4, 2.0e-4]
      optim.d.lr: [1.0e-4, 2.0e-4]
    random:                            # ... times `samples` draws of these (seeded: the same table every time)
      samples: 3
      seed: 0
      params:
        optim.g.betas: {choice: [[0.5, 0.999], [0.0, 0.99]]}
        optim.d.lr: {log_uniform: [1.0e-5, 1.0e-3]}     # also: uniform, int_uniform
    slurm: {nodes: 1, gpus_per_node: 8, time: "4:00:00", array_parallelism: 4}   # launch/options.py

A run is named ``r<index>-<hash of its settings>`` (what its base config and overrides
set), so a run maps to the same folder when the sweep is submitted again, also after a
code update: runs that already reached ``train.steps`` are skipped, the others resume
from their checkpoints. A run folder named by an earlier version of launch.sweep is taken
up when its config.yaml holds the run's settings. Every run's config is checked before
anything is submitted. ``sweep.json`` in the sweep folder maps runs to job ids and names
the sweep file that owns the folder.

``python -m launch.sweep status SWEEP.yaml`` prints where every run stands (state, step,
best FID, last losses, img/s), best FID first (``launch/status.py``); it writes files only
when asked: ``--csv PATH`` (the table as CSV), ``--plot PATH`` (FID against step, PNG).

Exit codes (dcgan/base/exits.py): 0 submitted (or printed); 2 a bad sweep file, config or
option, caught before anything was submitted; 1 sbatch refused the job array or could not
be run (one line with sbatch's error; nothing submitted, sweep.json and the job folder as
they were).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dcgan.base.checks import ConfigError
from dcgan.base.exits import EXIT_CONFIG, EXIT_FAILED, EXIT_OK
from dcgan.base.fileio import write_json
from dcgan.checkpoint import files as checkpoint
from dcgan.config.sections import Config
from dcgan.preflight import plan_run
from dcgan.run.folder import RunFolder
from launch import status
from launch.job import TrainingJob
from launch.options import SlurmOptions, SubmitError, add_arguments, from_arguments, make_executor, submission
from launch.sweep_file import (  # the sweep file's reading, shared with launch.sweep status
    SWEEP_JSON,
    check_owner,
    mapping_at,
    placed_runs,
    read_sweep_file,
    run_error,
    sweep_name,
)


@dataclass
class SweepRun:
    """One run of a sweep: its place in the sweep, its overrides and config, and its job."""

    index: int
    overrides: list[str]  # the sweep's own: set + grid point + random draw, then name/out_dir/group
    cfg: Config
    finished: bool = False
    job_id: str = ""

    @property
    def name(self) -> str:
        return self.cfg.train.name


@dataclass
class Sweep:
    path: Path
    base: str
    name: str
    runs: list[SweepRun] = field(default_factory=list)

    @property
    def folder(self) -> Path:
        return self.runs[0].cfg.run_dir.parent


def load_sweep(path: Path, world_size: int | None = None) -> Sweep:
    """Read a sweep file, expand it into runs and check every run's config (ConfigError
    names the file and the key at fault). ``world_size``: check the data against it."""
    return expand(path, read_sweep_file(path), world_size)


def expand(path: Path, spec: dict[str, Any], world_size: int | None = None) -> Sweep:
    """The runs of a read sweep file, each with its config built and checked."""
    sweep = Sweep(path, str(spec["base"]), sweep_name(path, spec))
    for index, own, placed in placed_runs(path, spec):
        try:
            cfg = plan_run(sweep.base, placed, world_size or 1, on_this_machine=False).cfg
        except ConfigError as e:
            raise run_error(path, index, own, e) from None
        sweep.runs.append(SweepRun(index, placed, cfg, finished=is_finished(cfg)))
    return sweep


def is_finished(cfg: Config) -> bool:
    """The run folder holds a valid checkpoint at train.steps (or later)."""
    newest, _ = checkpoint.latest_valid(RunFolder.of(cfg).checkpoints)
    return newest is not None and checkpoint.step_of(newest) >= cfg.train.steps


def table(sweep: Sweep) -> str:
    """One line per run: what --dry-run prints."""
    lines = [f"sweep {sweep.name}: {len(sweep.runs)} run(s) from {sweep.base}, folder {sweep.folder}"]
    for run in sweep.runs:
        state = "finished, skipped" if run.finished else (f"job {run.job_id}" if run.job_id else "to submit")
        own = [o for o in run.overrides if not o.startswith(("train.name=", "train.out_dir=", "wandb.group="))]
        lines.append(f"  {run.name:<14} {state:<18} {' '.join(own) or '(base config)'}")
    return "\n".join(lines)


def write_summary(sweep: Sweep) -> Path:
    """sweep.json: every run's name, folder, overrides and job id (kept from earlier
    submissions for runs skipped this time)."""
    path = sweep.folder / SWEEP_JSON
    earlier = {}
    if path.exists():
        earlier = {r["name"]: r for r in json.loads(path.read_text()).get("runs", [])}
    runs = []
    for run in sweep.runs:
        jobs = list(earlier.get(run.name, {}).get("job_ids", []))
        if run.job_id:
            jobs.append(run.job_id)
        runs.append({
            "name": run.name, "run_dir": str(run.cfg.run_dir), "overrides": run.overrides,
            "job_ids": jobs, "finished_before_submit": run.finished,
        })  # fmt: skip
    summary = {
        "sweep": sweep.name,
        "base": sweep.base,
        "file": str(sweep.path),
        "sweep_file": str(sweep.path.resolve()),  # the folder's owner (check_owner)
        "submitted_at": time.time(),
        "runs": runs,
    }
    sweep.folder.mkdir(parents=True, exist_ok=True)
    write_json(path, summary, indent=1)
    return path


def submit_sweep(sweep: Sweep, opts: SlurmOptions) -> list:
    """Submit the runs not yet finished as one job array; returns their jobs. Raises
    SubmitError when sbatch does not take it (its files are removed)."""
    todo = [run for run in sweep.runs if not run.finished]
    if not todo:
        return []
    folder = Path(opts.folder) if opts.folder else sweep.folder / "slurm"
    with submission(folder, "the job array"):
        executor = make_executor(opts, folder, name=sweep.name)
        with executor.batch():  # one sbatch --array=0-N%parallelism, when the block ends
            jobs = [
                executor.submit(TrainingJob(sweep.base, run.overrides, os.getcwd(), opts.max_requeues)) for run in todo
            ]
    for run, job in zip(todo, jobs):
        run.job_id = job.job_id
    return jobs


def build_parser() -> argparse.ArgumentParser:
    """The command line; its epilog is this module's doc from the sweep file's format on."""
    status_usage = status.build_parser().format_usage().removeprefix("usage: ").strip()
    parser = argparse.ArgumentParser(
        prog="python -m launch.sweep",
        usage=f"python -m launch.sweep [-h] [--dry-run] [Slurm flags] sweep\n       {status_usage}",
        description=__doc__.split("\n\n")[1].replace("``", "`"),
        epilog="\n\n".join(__doc__.split("\n\n")[2:]).replace("``", "`").replace("::", ":"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("sweep", type=Path, help="sweep file, e.g. configs/sweeps/celeba-lr.yaml")
    parser.add_argument("--dry-run", action="store_true", help="print the table of runs; submit nothing")
    add_arguments(
        parser, "A flag overrides the sweep file's slurm: section; a setting neither gives takes its default."
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        spec = read_sweep_file(args.sweep)
        # The slurm: section first: its world size is needed to check each run's data split.
        opts = from_arguments(args, base=mapping_at(spec.get("slurm"), str(args.sweep), "slurm"), where=str(args.sweep))
        sweep = expand(args.sweep, spec, opts.world_size)
        check_owner(args.sweep, sweep.folder, [run.name for run in sweep.runs])
    except ConfigError as e:
        print(f"launch.sweep: {e}", file=sys.stderr)
        return EXIT_CONFIG
    if args.dry_run:
        print(table(sweep))
        return EXIT_OK
    try:
        jobs = submit_sweep(sweep, opts)
    except SubmitError as e:  # nothing submitted: sweep.json stays as it was
        print(f"launch.sweep: {e}", file=sys.stderr)
        return EXIT_FAILED
    summary = write_summary(sweep)
    print(table(sweep))
    if jobs:
        print(f"submitted {len(jobs)} run(s) as job array {jobs[0].job_id.split('_')[0]}; summary {summary}")
    else:
        print(f"every run has finished; nothing submitted; summary {summary}")
    return EXIT_OK


def cli(argv: list[str] | None = None) -> int:
    """``status SWEEP.yaml`` (launch/status.py), else submission (``main``)."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        try:
            if argv[:1] == ["status"]:
                code = status.main(argv[1:])
            else:
                code = main(argv)
        except SystemExit:  # --help or a usage error: argparse's text waits in the same buffer
            sys.stdout.flush()
            raise
        # A short table is still in stdout's buffer (a pipe is block-buffered): flushed here, a
        # reader that has gone is caught below, not in Python's own flush at exit, which
        # prints "Exception ignored ... BrokenPipeError" and exits 120.
        sys.stdout.flush()
        return code
    except BrokenPipeError:  # `... | head`: the reader has gone; end as quietly as Unix tools do
        # Python would report the pipe again when it flushes stdout at exit (docs.python.org, "Note on SIGPIPE").
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED  # its output could not all be written


if __name__ == "__main__":
    sys.exit(cli())
