"""python -m dcgan.train --config configs/celeba.yaml [a.b=value ...]

Alone, or under ``torchrun --nproc_per_node=N`` (DDP, one process per GPU or CPU slot).
The data flows one way: config -> preflight (``dcgan/preflight.py``) -> distributed ->
data -> models and step (``dcgan/training.py``) -> the loop below -> checkpointer and
tracker. ``train_loop()`` is the whole algorithm: fetch a batch, one GAN step (D on a
real batch, D on a fake batch, one D update, then a G update through the frozen D),
then ask each component whether it is due. Run folder: ``<train.out_dir>/<train.name>/``
with config.yaml, train.log, metrics.jsonl, samples/ and checkpoints/.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.distributed.elastic.multiprocessing.errors import record

from dcgan import checkpoint, distributed, failure, timelines, training
from dcgan.cache import CachedLoader, agree_on_cache
from dcgan.checkpointer import Checkpointer, restore
from dcgan.config import OVERRIDE, Config, ConfigError, config_yaml, keys_help, load_config, save_config
from dcgan.data import BatchSource, Loader, ShardStream, derive_seed
from dcgan.distributed import DistInfo
from dcgan.divergence import DivergenceGuard, finite_weights
from dcgan.eval import Evaluator, eval_mode_sampler
from dcgan.exits import EXIT_CONFIG, EXIT_FAILED, EXIT_OK, EXIT_PREEMPTED, SAME_COMMAND_CARRIES_ON, Ending
from dcgan.failure import Where
from dcgan.fileio import write_atomic
from dcgan.logs import LOG_DATE_FORMAT, RunLogHandler, log_format, setup_logging
from dcgan.models import sample_latent
from dcgan.preemption import StoppedDuringStartUp, StopRequest, WorkerSignals
from dcgan.preflight import RunPlan, plan_run
from dcgan.runlock import RunFolderBusy, RunLock
from dcgan.shardset import ShardSet
from dcgan.tracking import Tracker
from dcgan.train_step import TrainStep, choose_graph
from dcgan.training import TrainState, build_training, compiled_graphs, memory_format, set_tf32

log = logging.getLogger("dcgan.train")

# After a failure the process ends within this many seconds, whatever blocks on the way out.
EXIT_DEADLINE_S = 10.0


@dataclass
class Run:
    """Everything the loop works with, built once per attempt by ``build_run``."""

    cfg: Config
    dist: DistInfo
    shards: ShardSet
    state: TrainState
    train_step: TrainStep  # one step on a batch: eager, or a CUDA graph replayed
    loader: BatchSource
    tracker: Tracker
    checkpointer: Checkpointer
    evaluator: Evaluator | None
    sample: Callable[[torch.Tensor], torch.Tensor]  # the EMA generator (G without one), in eval mode
    fixed_noise: torch.Tensor  # the latents of every sample grid
    resumed_from: checkpoint.Resume | None

    @property
    def nets(self) -> list[nn.Module]:
        return [self.state.generator, self.state.discriminator]


def train(plan: RunPlan, dist: DistInfo, stop: StopRequest, where: Where) -> int:
    """Train until ``train.steps`` or an agreed ``stop``; returns the exit code (dcgan/exits.py).
    ``where`` follows the phase and step, for the line a failure ends with (dcgan/failure.py)."""
    cfg = plan.cfg
    if dist.is_main:
        handler = RunLogHandler(cfg.run_dir / "train.log")
        handler.setFormatter(logging.Formatter(log_format(dist.rank), LOG_DATE_FORMAT))
        logging.getLogger().addHandler(handler)
    resume_from = agree_on_resume(cfg, dist)
    tracker = Tracker(cfg, enabled=dist.is_main, device=dist.device)
    try:
        return train_loop(build_run(plan, dist, tracker, resume_from, where), stop, where)
    except ConfigError:
        raise  # refused before training (other data): the run folder's summary stays the last attempt's
    except Exception as e:
        peer = failure.posted(dist.store)  # another rank failed first: this error is its consequence
        tracker.finish(EXIT_FAILED, preempted=False, facts={
            "status": "failed", "exit_code": EXIT_FAILED, "error": peer or failure.describe(e), "where": str(where),
        })  # fmt: skip
        raise


def agree_on_resume(cfg: Config, dist: DistInfo) -> checkpoint.Resume | None:
    """Rank 0 chooses (and loads) what to resume from and tells the others where it is;
    one reader of the folder. Every rank raises the same error when nothing is usable."""
    chosen, error = None, None
    if dist.is_main:
        try:
            chosen = checkpoint.choose(cfg)
        except (checkpoint.ResumeError, ConfigError) as e:
            error = e
    where_from, error = distributed.broadcast_object((chosen and chosen._replace(state_dict=None), error), dist)
    if error is not None:
        raise error
    return chosen if dist.is_main else where_from  # only rank 0 holds the loaded state


def train_loop(run: Run, stop: StopRequest, where: Where) -> int:
    cfg, state, dist, tracker = run.cfg, run.state, run.dist, run.tracker
    guard = DivergenceGuard(training.STAT_NAMES, cfg.train.divergence_patience, cfg.train.precision == "fp16")
    started = (state.step, time.perf_counter(), state.train_seconds)
    graphs_logged = 0  # torch.compile's graphs so far, as last logged
    ending = None if state.step < cfg.train.steps else Ending("done")  # resumed at or past train.steps
    stop.arm()
    while ending is None:
        where.at("step", state.step + 1)
        # closing: an exception in the loop shuts the epoch's DataLoader workers down at once
        with contextlib.closing(run.loader.epoch(state.epoch, state.batch_in_epoch)) as batches:
            for real, _ in tracker.interval.timed(batches):
                if state.step == 0:
                    tracker.real_grid(real[: cfg.log.num_samples])
                run.train_step(real)  # D's update, G's, the EMA's; the statistics summed on the device
                step = advance(state, cfg, dist)
                tracker.advance(step)

                if tracker.log_due(step):
                    diverged = guard.check(
                        tracker.interval.stats, run.nets, dist, (step - tracker.interval.steps + 1, step)
                    )
                    tracker.log_interval(step, state, run.loader.corrupt_samples, dist)
                    if cfg.train.compile and dist.is_main and compiled_graphs() != graphs_logged:
                        graphs_logged = compiled_graphs()
                        log.info("torch.compile: %d graphs so far (G, D and D frozen make 3; more are recompiles)",
                                 graphs_logged)  # fmt: skip
                    if diverged is not None:
                        ending = Ending("diverged", diverged)
                        break
                tracker.sample_grid_if_due(step, run.sample, run.fixed_noise)
                if run.evaluator is not None and run.evaluator.due(step, cfg.train.steps):
                    ending = evaluate(run, step, where)
                    if ending is not None:
                        break
                # Stop requests and checkpoints: the same decision on every rank, after the same step.
                signal_time = stop.agreed(dist) if step % cfg.train.stop_check_every == 0 else None
                state.train_seconds = started[2] + time.perf_counter() - started[1]
                ending = run.checkpointer.at_step(state, signal_time, where)
                if ending is not None:
                    break
                where.at("step", step + 1)
        if (ending is None or ending.status != "diverged") and state.batch_in_epoch >= run.loader.steps_per_epoch:
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0
    stop.disarm()
    where.at("shutdown")
    return finish_attempt(run, ending, started)


def advance(state: TrainState, cfg: Config, dist: DistInfo) -> int:
    """Count a step done: step, position in the epoch, samples."""
    state.step += 1
    state.batch_in_epoch += 1
    state.samples_seen += cfg.train.batch_size * dist.world_size
    return state.step


def evaluate(run: Run, step: int, where: Where) -> Ending | None:
    """Collective: score the EMA generator, log it, keep best.pt; a NaN generator is divergence
    (it makes black images, and a finite FID)."""
    if not finite_weights(run.nets):
        return Ending("diverged", f"the weights hold NaN or infinite values at the evaluation of step {step}")
    where.at("evaluation at step", step)
    t_eval = time.perf_counter()
    scores, improved = run.evaluator.evaluate_at(step, run.sample, run.cfg.model.nz, run.state)
    run.tracker.scores(step, scores, run.state, improved)
    if improved and run.cfg.eval.best_checkpoint:
        run.checkpointer.save_best(run.state)
    run.tracker.interval.exclude(time.perf_counter() - t_eval)  # the interval's img/s counts training only
    return None


def build_run(
    plan: RunPlan, dist: DistInfo, tracker: Tracker, resume_from: checkpoint.Resume | None, where: Where
) -> Run:
    """Nets, optimisers, data, checkpointer and evaluator of this attempt; the checkpoint
    loaded into them; the tracker started at the step it resumes from."""
    cfg, shards, t = plan.cfg, plan.shards, plan.cfg.train
    graph = choose_graph(cfg, dist.device)
    settings = [graph.why]  # how the step runs, for the start-up lines
    if dist.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        settings.append(set_tf32(t.tf32))
    state, g_train, d_train = build_training(cfg, dist, graphed=graph.on)
    loader = build_loader(plan, dist, where)
    # Each rank draws its own latents; the fixed grid noise is the same everywhere.
    checkpoint.seed_rng(derive_seed(t.seed, dist.rank, 0, 1))
    if resume_from is not None:
        where.at("loading the checkpoint")
        restore(resume_from.path, resume_from.state_dict, state, cfg, dist, shards, loader)
        resume_from = resume_from._replace(state_dict=None)  # loaded: free it
    state.lineage = resume_from.lineage if resume_from is not None else timelines.fresh()
    if dist.is_main:
        save_config(cfg, cfg.run_dir / "config.yaml")
        timelines.write_lineage(cfg.run_dir, state.lineage)
    # The W&B run goes on only when the folder's own timeline does (a resume=PATH from
    # another run, or a branch, starts a new one); rank 0 fills in the id that checkpoints
    # then carry.
    same_run = resume_from is not None and resume_from.continues
    state.wandb_run_id = tracker.start(
        state.step, t.steps, state.wandb_run_id if same_run else None, cfg.to_dict(), state.lineage[-1][0]
    )
    if state.batch_in_epoch >= loader.steps_per_epoch:
        state.epoch, state.batch_in_epoch = state.epoch + 1, 0
    fixed_noise = sample_latent(cfg.log.num_samples, cfg.model.nz, generator=torch.Generator().manual_seed(t.seed))
    evaluator = None
    if plan.extractor is not None:  # every rank takes part in each evaluation (dcgan/eval.py)
        where.at("building the evaluator")
        evaluator = Evaluator.build(plan.extractor, cfg.eval, cfg.data, cfg.model, dist)
    checkpointer = Checkpointer(cfg, dist, {**shards.identity(), "reader": loader.reader})
    train_step = TrainStep(state, g_train, d_train, cfg, dist, tracker.interval.stats, graphed=graph.on)
    run = Run(
        cfg, dist, shards, state, train_step, loader, tracker, checkpointer, evaluator,
        eval_mode_sampler(state.generator_ema if state.generator_ema is not None else state.generator),
        fixed_noise.to(dist.device), resume_from,
    )  # fmt: skip
    log_start(run, plan, settings)
    return run


def build_loader(plan: RunPlan, dist: DistInfo, where: Where) -> BatchSource:
    """The rank's data: the set cached on the device (``data.cache``), or the shards read each epoch."""
    cfg, t = plan.cfg, plan.cfg.train
    worker_signals = WorkerSignals(tuple(t.stop_signals))
    cache = agree_on_cache(plan.cache, dist)
    if dist.is_main:
        log.info("%s", cache.why)
    if cache.on:
        where.at("caching the data")
        return CachedLoader(
            plan.shards, cfg.data, dist, batch_size=t.batch_size, image_size=cfg.model.image_size,
            channels=cfg.model.channels, seed=t.seed, memory_format=memory_format(cfg), worker_signals=worker_signals,
        )  # fmt: skip
    stream = ShardStream(
        plan.shards, cfg.data, rank=dist.rank, world_size=dist.world_size, batch_size=t.batch_size,
        image_size=cfg.model.image_size, channels=cfg.model.channels, seed=t.seed,
    )  # fmt: skip
    return Loader(
        stream,
        dist.device,
        worker_signals=worker_signals,
        memory_format=memory_format(cfg),
        first_to_report=lambda shard: distributed.first_to_claim(f"miscounted/{shard}", dist),
    )


def log_start(run: Run, plan: RunPlan, settings: list[str]) -> None:
    """The start-up lines (rank 0): what trains, on what, and how the step runs (``settings``)."""
    cfg, t, dist, shards = run.cfg, run.cfg.train, run.dist, plan.shards
    if not dist.is_main:
        return
    for line in settings:
        log.info("%s", line)
    process_group = ""
    if dist.distributed:  # gradients: DDP's all-reduce, or the graph's own (dcgan/train_step.py)
        process_group = " (process group: one all-reduce per net in the graph)" if run.train_step.graphed else " (DDP)"
    log.info(
        "training %s: arch %s, %d process(es) on %s%s, batch %d x %d, %s%s%s, %d steps "
        "(%d per epoch of %d samples in %d shards, counts from %s), G %.2fM params, D %.2fM params, EMA %s",
        t.name, cfg.model.arch, dist.world_size, dist.device.type, process_group,
        t.batch_size, dist.world_size, t.precision,
        ", channels_last" if t.channels_last else "", ", torch.compile" if t.compile else "", t.steps,
        run.loader.steps_per_epoch, shards.total, len(shards.urls), shards.counted_by,
        sum(p.numel() for p in run.state.generator.parameters()) / 1e6,
        sum(p.numel() for p in run.state.discriminator.parameters()) / 1e6,
        cfg.model.ema_decay or "off",
    )  # fmt: skip


def finish_attempt(run: Run, ending: Ending, started: tuple[int, float, float]) -> int:
    """summary.json, the W&B summary and the closing lines; returns the exit code. Collective.
    ``started``: the step, clock and train seconds at the start of the loop."""
    cfg, state, dist = run.cfg, run.state, run.dist
    wall, done = time.perf_counter() - started[1], state.step - started[0]
    global_batch = cfg.train.batch_size * dist.world_size
    if ending.status == "diverged" and dist.is_main:
        newest, _ = checkpoint.latest_valid(cfg.run_dir / "checkpoints")
        log.error(
            "diverged at step %d: %s; stopped without writing a checkpoint, the resume point stays %s. "
            "Lower the learning rates (optim.g.lr, optim.d.lr), or resume from an earlier checkpoint with other settings",
            state.step, ending.reason, newest or "the start of the run",
        )  # fmt: skip
    reading = reading_report(run.loader, run.shards, dist)
    run.tracker.finish(ending.exit_code, preempted=ending.status == "stopped", facts={
        "status": ending.status,
        "exit_code": ending.exit_code,
        "step": state.step,
        "steps": cfg.train.steps,
        "epoch": state.epoch,
        "samples_seen": state.samples_seen,
        "world_size": dist.world_size,
        "resumed_from": str(run.resumed_from.path) if run.resumed_from else None,
        "diverged": ending.reason if ending.status == "diverged" else None,
        "steps_this_attempt": done,
        "wall_time_s": round(wall, 3),
        "train_time_s": round(started[2] + wall, 3),  # all attempts together
        "img_per_s": done * global_batch / max(wall, 1e-9),
        "data": {"fingerprint": run.checkpointer.data["fingerprint"], "counted_by": run.shards.counted_by,
                 **(reading or {})},
    })  # fmt: skip
    if reading is not None:
        log.info(
            "%s: %d steps in %.1fs (%.2f steps/s, %.0f img/s); all ranks: corrupt samples %d, empty positions %d, "
            "unreadable shards %d, shards with other counts than planned %d",
            ending.status, done, wall, done / max(wall, 1e-9), done * global_batch / max(wall, 1e-9),
            reading["corrupt_samples"], reading["empty_positions"], reading["unreadable_shards"],
            len(reading["miscounted_shards"]),
        )  # fmt: skip
    return ending.exit_code


def reading_report(loader: BatchSource, shards: ShardSet, dist: DistInfo) -> dict | None:
    """What reading met on every rank this attempt, merged on rank 0 (None elsewhere).
    Collective. Shards whose true count differs from the plan are listed once."""
    mine = (loader.corrupt_samples, loader.empty_positions, loader.corrupt_shards, loader.miscounted)
    reports = distributed.gather_objects(mine, dist)
    if reports is None:
        return None
    miscounted = {name: counts for *_, found in reports for name, counts in found.items()}
    if miscounted:
        log.warning(
            "%d shard(s) hold other counts than planned (%s): %s",
            len(miscounted), ", ".join(f"{n} {c['planned']} -> {c['found']}" for n, c in list(miscounted.items())[:5]),
            shards.fix,
        )  # fmt: skip
    return {
        "corrupt_samples": sum(r[0] for r in reports),
        "empty_positions": sum(r[1] for r in reports),
        "unreadable_shards": sum(r[2] for r in reports),
        "miscounted_shards": [{"shard": n, **c} for n, c in sorted(miscounted.items())],
    }


def build_parser() -> argparse.ArgumentParser:
    """The command line; its epilog lists every config key (``describe_keys``), so the
    help cannot drift from dcgan/config.py."""
    width = min(max(shutil.get_terminal_size((100, 24)).columns, 80), 120)
    parser = argparse.ArgumentParser(
        prog="python -m dcgan.train",
        description="Train a DCGAN (alone or under torchrun). Settings: the YAML file, then a.b=value overrides.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join([
            textwrap.fill(
                "exit codes: 0 done, 1 failed, 2 bad config or data (nothing started), "
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
    """The exit code (EXIT_* above, or EXIT_PREEMPTED). Rank 0 hands it to ``on_exit``
    (default ``report_exit_code``) before any rank exits: a launcher that tears the job
    down when its first process ends (srun --kill-on-bad-exit) cannot cut that short."""
    args = build_parser().parse_args(argv)
    try:
        env = distributed.read_env()
    except ConfigError as e:  # WORLD_SIZE, RANK or LOCAL_RANK set by hand to something no job has
        print(f"dcgan.train: {e}", file=sys.stderr)
        return EXIT_CONFIG
    setup_logging(env.rank)
    if args.print_config:
        return print_config(args.config, args.overrides)
    if args.dry_run:
        return dry_run(args.config, args.overrides, env)
    return run(args.config, args.overrides, env, on_exit or report_exit_code)


def print_config(config: str, overrides: list[str]) -> int:
    """--print-config: the config as the run folder's config.yaml would hold it (the data is
    not checked: --dry-run does that)."""
    try:
        cfg = load_config(config, overrides)
    except ConfigError as e:
        config_error(e, config)
        return EXIT_CONFIG
    sys.stdout.write(config_yaml(cfg))
    return EXIT_OK


def dry_run(config: str, overrides: list[str], env: distributed.EnvRanks) -> int:
    """--dry-run: the whole preflight for this environment's world size (WORLD_SIZE, or
    torchrun's), and the plan it makes; no run folder, no process group."""
    try:
        plan = plan_run(config, overrides, env.world_size, distributed.restart_count())
    except ConfigError as e:
        config_error(e, config)
        return EXIT_CONFIG
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
    try:
        plan = plan_run(config, overrides, env.world_size, distributed.restart_count())
    except ConfigError as e:
        config_error(e, config)
        if env.rank == 0:
            on_exit(EXIT_CONFIG)
        return EXIT_CONFIG
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
    """Rank 0 creates the run folder and locks it for this run's life (dcgan/runlock.py);
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


def config_error(error: ConfigError, config: str) -> None:
    where = "" if str(error).startswith((str(config), OVERRIDE)) else f"{config}: "
    line = f"dcgan.train: config error: {where}{error}"
    print(line, file=sys.stderr)
    failure.tell_torchrun(line)


if __name__ == "__main__":
    sys.exit(main())
