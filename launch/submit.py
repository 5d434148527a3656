"""python -m launch.submit --config configs/celeba.yaml --nodes 2 --gpus-per-node 8 \\
       --partition gpu --time 4:00:00 [a.b=value ...]

One training run as one Slurm job through submitit: a task per GPU (or
``--tasks-per-node`` on CPU partitions), each task one rank of ``dcgan.train``
(launch/job.py). The config is checked here, on the login node, before anything is
submitted. ``--cluster local`` runs the same job with submitit's local executor.

Exit codes (dcgan/base/exits.py): 0 submitted (with ``--wait``: the job finished); 2 a bad
config or option, caught before anything was submitted; 1 sbatch refused the job or could
not be run (no controller, an unknown partition, ...: one line with sbatch's error;
nothing submitted, nothing left in the job folder), or with ``--wait`` the job failed.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import submitit

from dcgan.base.checks import ConfigError
from dcgan.base.exits import EXIT_CONFIG, EXIT_FAILED, EXIT_OK
from dcgan.config.sections import Config
from dcgan.preflight import plan_run
from dcgan.run.folder import RunFolder
from launch.job import TrainingJob
from launch.options import SlurmOptions, SubmitError, add_arguments, from_arguments, make_executor, submission


class NothingToTrain(Exception):
    """The run has reached train.steps: a job would end at once. The message says how to go on."""


def submit_run(
    config: str, overrides: list[str], opts: SlurmOptions, executor: submitit.Executor | None = None
) -> tuple[submitit.Job, Config]:
    """Check, then submit one run; returns the job and the run's config. Raises ConfigError
    (the config or options), SubmitError (sbatch did not take it; its files are removed),
    NothingToTrain (the run has finished: nothing is submitted)."""
    plan = plan_run(config, overrides, opts.world_size, on_this_machine=False)
    if plan.finished:
        raise NothingToTrain(plan.finished)
    cfg = plan.cfg
    folder = Path(opts.folder) if opts.folder else RunFolder.of(cfg).slurm
    with submission(folder):
        executor = executor or make_executor(opts, folder, name=cfg.train.name)
        job = executor.submit(TrainingJob(str(config), list(overrides), os.getcwd(), opts.max_requeues))
    return job, cfg


def describe(job: submitit.Job, cfg: Config) -> str:
    """The lines a user needs after submitting: job id, where its logs and run folder are."""
    stdout = str(job.paths.stdout).replace("%t", "0")
    return "\n".join([
        f"submitted job {job.job_id} ({cfg.train.name})",
        f"  run folder : {cfg.run_dir.resolve()}",
        f"  task logs  : {stdout} (and .err; one pair per task)",
        f"  follow     : tail -f {RunFolder(cfg.run_dir.resolve()).train_log}",
    ])  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m launch.submit",
        description=__doc__.split("\n\n")[1].replace("``", "`"),
        epilog=__doc__.split("\n\n")[2].replace("``", "`"),
    )
    parser.add_argument("--config", required=True, help="YAML config, e.g. configs/celeba.yaml (required)")
    parser.add_argument("--wait", action="store_true", help="wait for the job to end; exit 0 if it finished")
    parser.add_argument("overrides", nargs="*", help="a.b=value settings applied after the file (default: none)")
    add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        opts = from_arguments(args)
        job, cfg = submit_run(args.config, args.overrides, opts)
    except ConfigError as e:
        print(f"launch.submit: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except SubmitError as e:
        print(f"launch.submit: {e}", file=sys.stderr)
        return EXIT_FAILED
    except NothingToTrain as e:
        print(f"launch.submit: nothing submitted: {e}", flush=True)
        return EXIT_OK
    print(describe(job, cfg), flush=True)
    if not args.wait:
        return EXIT_OK
    try:
        results = job.results()
    except Exception as e:  # the job's own error, as submitit reports it
        print(f"launch.submit: job {job.job_id} failed: {e}", file=sys.stderr)
        return EXIT_FAILED
    print(f"job {job.job_id} finished: {results[0]}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
