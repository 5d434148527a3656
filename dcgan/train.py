"""python -m dcgan.train --config configs/celeba.yaml [a.b=value ...]

Alone, or under ``torchrun --nproc_per_node=N`` (DDP, one process per GPU or CPU slot).
The command: its arguments, ``--print-config``, ``--dry-run``, the run lock and the exit
code. What a run does, start to end, is dcgan/training/loop.py.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

from torch.distributed.elastic.multiprocessing.errors import record

from dcgan.base.checks import ConfigError
from dcgan.base.exits import EXIT_CONFIG, EXIT_FAILED, EXIT_OK, EXIT_PREEMPTED, SAME_COMMAND_CARRIES_ON
from dcgan.base.fileio import write_atomic
from dcgan.base.logs import setup_logging
from dcgan.config.keys import keys_help
from dcgan.config.loading import OVERRIDE, config_yaml, load_config
from dcgan.config.sections import Config
from dcgan.preflight import plan_run
from dcgan.run import distributed, failure
from dcgan.run.distributed import DistInfo
from dcgan.run.failure import Where
from dcgan.run.lock import RunFolderBusy, RunLock
from dcgan.run.preemption import StoppedDuringStartUp, StopRequest
from dcgan.training.loop import EXIT_DEADLINE_S, log, train


def build_parser() -> argparse.ArgumentParser:
    """The command line; its epilog lists every config key (``describe_keys``), so the
    help cannot drift from dcgan/config/sections.py."""
    width = min(max(shutil.get_terminal_size((100, 24)).columns, 80), 120)
    parser = argparse.ArgumentParser(
        prog="python -m dcgan.train",
        description="Train a DCGAN (alone or under torchrun). Settings: the YAML file, then a.b=value overrides.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join([
            textwrap.fill(
                f"exit codes: {EXIT_OK} done, {EXIT_FAILED} failed, {EXIT_CONFIG} bad config or data (nothing started), "
                f"{EXIT_PREEMPTED} stopped on a signal with the state saved (run the same command again)", width
            ),
            textwrap.fill("config keys, set in the YAML file or as a.b=value (key, type, default, meaning):", width),
            keys_help(width),
        ]),
    )  # fmt: skip
    parser.add_argument("--config", required=True, help="YAML config, e.g. configs/celeba.yaml")
    parser.add_argument("overrides", nargs="*", help="a.b=value settings applied after the file")
    what = parser.add_mutually_exclusive_group()
    what.add_argument(
        "--print-config", action="store_true", help="print the resolved config (file + overrides) as YAML and exit"
    )
    what.add_argument(
        "--dry-run",
        action="store_true",
        help="check everything a run checks before it starts (config, shards, resume point), print the plan "
        "and exit; starts nothing, writes nothing",
    )
    return parser


@record  # torchrun's report shows the traceback of an exception that escapes (failure.tell_torchrun: of one caught)
def main(argv: list[str] | None = None, on_exit: Callable[[int], object] | None = None) -> int:
    """The exit code (dcgan/base/exits.py). Rank 0 hands it to ``on_exit`` (default
    ``report_exit_code``) before any rank exits: a launcher that tears the job down when its
    first process ends (srun --kill-on-bad-exit) cannot cut that short.

    A ConfigError raised before anything started (the environment, the config, the data,
    the resume point) ends here, as its one line and EXIT_CONFIG; one raised once the process
    group is up ends in ``run``'s failure path (``ended_by``), which must also let every
    process go. Both say it with ``config_error``."""
    args = build_parser().parse_args(argv)
    on_exit = on_exit or report_exit_code
    env = None
    try:
        env = distributed.read_env()
        setup_logging(env.rank)
        if args.print_config:
            return print_config(args.config, args.overrides)
        if args.dry_run:
            return dry_run(args.config, args.overrides, env)
        return run(args.config, args.overrides, env, on_exit)
    except ConfigError as e:
        # Without env the error is WORLD_SIZE, RANK or LOCAL_RANK set by hand to something no job has.
        config_error(e, args.config if env is not None else None)
        if env is not None and env.rank == 0:
            on_exit(EXIT_CONFIG)
        return EXIT_CONFIG


def print_config(config: str, overrides: list[str]) -> int:
    """--print-config: the config as the run folder's config.yaml would hold it (the data is
    not checked: --dry-run does that). Raises ConfigError."""
    sys.stdout.write(config_yaml(load_config(config, overrides)))
    return EXIT_OK


def dry_run(config: str, overrides: list[str], env: distributed.EnvRanks) -> int:
    """--dry-run: the whole preflight for this environment's world size (WORLD_SIZE, or
    torchrun's), and the plan it makes; no run folder, no process group. Raises ConfigError."""
    plan = plan_run(config, overrides, env.world_size, distributed.restart_count())
    if env.rank == 0:
        print(plan.describe(), flush=True)
    return EXIT_OK


def report_exit_code(code: int) -> None:
    """Write ``code`` to DCGAN_EXIT_CODE_FILE when that is set: torchrun exits 1 whatever
    its workers' codes, so slurm/train.sbatch learns "stopped, state saved" (75) here."""
    path = os.environ.get("DCGAN_EXIT_CODE_FILE")
    if path:
        write_atomic(Path(path), lambda f: f.write(f"{code}\n".encode()))


def run(config: str, overrides: list[str], env: distributed.EnvRanks, on_exit: Callable[[int], object]) -> int:
    """One attempt of the run; the exit code. Raises ConfigError when the plan is refused
    (nothing started: ``main`` says so)."""
    plan = plan_run(config, overrides, env.world_size, distributed.restart_count())
    if plan.finished:  # before the run folder, its lock, W&B or a process group: nothing there changes
        if env.rank == 0:
            log.info("%s", plan.finished)
            on_exit(EXIT_OK)
        return EXIT_OK

    cfg = plan.cfg
    stop = StopRequest(cfg.train.stop_signals)  # before anything slow: from here on a signal means "stop"
    where, dist, watch, lock = Where(), None, None, RunLock(cfg.run_dir)
    try:
        dist = distributed.setup(cfg.train.device, always=cfg.train.distributed == "always")
        watch = failure.PeerWatch(dist.store, dist.rank)
        claim_run_dir(cfg, dist, lock)
        if dist.is_main and plan.start_note:
            log.warning("%s", plan.start_note)
        code = train(plan, dist, stop, where)
    except (
        Exception,
        StoppedDuringStartUp,
    ) as e:  # every failure ends here: one line, every process gone within seconds
        code = ended_by(e, config, cfg, env, dist, watch, where)
        if env.rank == 0:
            with contextlib.suppress(Exception):
                on_exit(code)
        failure.end_children()
        failure.exit_deadline(code, EXIT_DEADLINE_S)
        distributed.teardown()
        return code
    if dist.is_main:
        on_exit(code)
    watch.stop()  # past the barrier the store may go away with the rank that hosts it
    distributed.barrier(dist)  # no rank exits before rank 0 has handed on its exit code
    distributed.teardown()
    lock.release()
    return code


def ended_by(
    e: BaseException, config: str, cfg: Config, env: distributed.EnvRanks, dist: DistInfo | None,
    watch: failure.PeerWatch | None, where: Where,
) -> int:  # fmt: skip
    """Say why the run ends early (one line), tell the other ranks; returns the exit code."""
    peer_logged = watch.stop() if watch is not None else None
    store = dist.store if dist is not None else None
    if isinstance(e, StoppedDuringStartUp):
        failure.post(store, f"rank {env.rank} stopped by {e.signal_name} during start-up")
        log.warning(
            "stopped by %s during start-up, before training began; %s (exit code %d)",
            e.signal_name, SAME_COMMAND_CARRIES_ON, EXIT_PREEMPTED,
        )  # fmt: skip
        return EXIT_PREEMPTED
    if isinstance(e, ConfigError):  # other data, another net shape, a busy or unwritable run folder
        config_error(e, config)
        return EXIT_CONFIG
    failure.report(e, where, env.rank, cfg.run_dir, store, peer_logged)
    return EXIT_FAILED


def claim_run_dir(cfg: Config, dist: DistInfo, lock: RunLock) -> None:
    """Rank 0 creates the run folder and locks it for this run's life (dcgan/run/lock.py);
    every rank raises the same ConfigError when it is in use or cannot be written."""
    error = None
    if dist.is_main:
        try:
            cfg.run_dir.mkdir(parents=True, exist_ok=True)
            lock.acquire()
        except RunFolderBusy as e:
            error = str(e)
        except OSError as e:  # a read-only filesystem, no permission, a full disk
            error = f"train.out_dir: cannot write the run folder {cfg.run_dir} ({e.strerror or e})"
    error = distributed.broadcast_object(error, dist)
    if error is not None:
        raise ConfigError(error)


def config_error(error: ConfigError, config: str | None) -> None:
    """The one line of a ConfigError, to stderr and torchrun's report. ``config`` None: the
    error is in the environment (WORLD_SIZE, RANK, ...), before any config was read."""
    if config is None:
        line = f"dcgan.train: {error}"
    else:
        where = "" if str(error).startswith((str(config), OVERRIDE)) else f"{config}: "
        line = f"dcgan.train: config error: {where}{error}"
    print(line, file=sys.stderr)
    failure.tell_torchrun(line)


if __name__ == "__main__":
    sys.exit(main())
