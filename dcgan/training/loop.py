"""One training run, start to end, on each rank.

The data flows one way: config -> preflight (``dcgan/preflight.py``) -> distributed ->
data -> models and step (``dcgan/training/setup.py``, ``step.py``) -> the loop below ->
checkpointer and tracker. ``train_loop()`` is the whole algorithm: fetch a batch, one GAN
step (D on a real batch, D on a fake batch, one D update, then a G update through the
frozen D), then ask each component whether it is due. Run folder: ``<train.out_dir>/<train.name>/``
with config.yaml, train.log, metrics.jsonl, samples/ and checkpoints/.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from dcgan.base.checks import ConfigError
from dcgan.base.exits import EXIT_FAILED, Ending
from dcgan.base.logs import LOG_DATE_FORMAT, RunLogHandler, log_format
from dcgan.checkpoint import files, resume
from dcgan.checkpoint.checkpointer import Checkpointer, restore
from dcgan.checkpoint.state import TrainState
from dcgan.config.loading import save_config
from dcgan.config.sections import Config
from dcgan.data.cache import CachedLoader, agree_on_cache
from dcgan.data.shardset import ShardSet
from dcgan.data.stream import BatchSource, Loader, ShardStream, derive_seed
from dcgan.models.conditional import grid_labels
from dcgan.models.networks import sample_latent
from dcgan.preflight import RunPlan
from dcgan.quality.evaluator import Evaluator, eval_mode_sampler
from dcgan.run import distributed, failure, timelines
from dcgan.run.distributed import DistInfo
from dcgan.run.failure import Where
from dcgan.run.folder import RunFolder
from dcgan.run.preemption import StopRequest, WorkerSignals
from dcgan.tracking.tracker import Tracker
from dcgan.training import step as train_step
from dcgan.training.divergence import DivergenceGuard, finite_weights
from dcgan.training.setup import build_training, compiled_graphs, memory_format, set_tf32
from dcgan.training.step import TrainStep, choose_graph

log = logging.getLogger(__name__)

# After a failure the process ends within this many seconds, whatever blocks on the way out.
EXIT_DEADLINE_S = 10.0


@dataclass
class TrainingRun:
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
    fixed_labels: torch.Tensor | None  # a conditional model's grid classes: one row per class
    resumed_from: resume.Resume | None

    @property
    def nets(self) -> list[nn.Module]:
        return [self.state.generator, self.state.discriminator]


def train(plan: RunPlan, dist: DistInfo, stop: StopRequest, where: Where) -> int:
    """Train until ``train.steps`` or an agreed ``stop``; returns the exit code (dcgan/base/exits.py).
    ``where`` follows the phase and step, for the line a failure ends with (dcgan/run/failure.py)."""
    cfg = plan.cfg
    if dist.is_main:
        handler = RunLogHandler(RunFolder.of(cfg).train_log)
        handler.setFormatter(logging.Formatter(log_format(dist.rank), LOG_DATE_FORMAT))
        logging.getLogger().addHandler(handler)
    resume_from = agree_on_resume(cfg, dist)
    tracker = Tracker(cfg, enabled=dist.is_main, stat_names=train_step.stat_names(cfg), device=dist.device)
    try:
        return train_loop(build_run(plan, dist, tracker, resume_from, where), stop, where)
    except Exception as e:  # said and turned into the exit code by dcgan/train.py (ended_by)
        # A ConfigError is a refusal before training (other data): the run folder's summary
        # stays the last attempt's.
        if not isinstance(e, ConfigError):
            peer = failure.posted(dist.store)  # another rank failed first: this error is its consequence
            tracker.finish(EXIT_FAILED, preempted=False, facts={
                "status": "failed", "exit_code": EXIT_FAILED, "error": peer or failure.describe(e),
                "where": str(where),
            })  # fmt: skip
        raise


def agree_on_resume(cfg: Config, dist: DistInfo) -> resume.Resume | None:
    """Rank 0 chooses (and loads) what to resume from and tells the others where it is;
    one reader of the folder. Every rank raises the same error when nothing is usable."""
    chosen, error = None, None
    if dist.is_main:
        try:
            chosen = resume.choose(cfg)
        except (resume.ResumeError, ConfigError) as e:
            error = e
    where_from, error = distributed.broadcast_object((chosen and chosen._replace(state_dict=None), error), dist)
    if error is not None:
        raise error
    return chosen if dist.is_main else where_from  # only rank 0 holds the loaded state


def train_loop(run: TrainingRun, stop: StopRequest, where: Where) -> int:
    cfg, state, dist, tracker = run.cfg, run.state, run.dist, run.tracker
    guard = DivergenceGuard(train_step.stat_names(cfg), cfg.train.divergence_patience, cfg.train.precision == "fp16")
    started = (state.step, time.perf_counter(), state.train_seconds)
    graphs_logged = 0  # torch.compile's graphs so far, as last logged
    ending = None if state.step < cfg.train.steps else Ending("done")  # resumed at or past train.steps
    stop.arm()
    while ending is None:
        where.at("step", state.step + 1)
        # closing: an exception in the loop shuts the epoch's DataLoader workers down at once
        with contextlib.closing(run.loader.epoch(state.epoch, state.batch_in_epoch)) as batches:
            batches_left = run.loader.steps_per_epoch - state.batch_in_epoch
            for reals, labels in batches_of_steps(tracker.interval.timed(batches), cfg.optim.d_steps, batches_left):
                if state.step == 0:
                    tracker.real_grid(reals[0][: cfg.log.num_samples])
                run.train_step(reals, labels)  # D's updates, G's, the EMA's; the statistics summed on the device
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
                tracker.sample_grid_if_due(step, run.sample, run.fixed_noise, run.fixed_labels)
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
        if (ending is None or ending.status != "diverged") and epoch_over(state, run.loader, cfg):
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0
    stop.disarm()
    where.at("shutdown")
    return finish_attempt(run, ending, started)


def batches_of_steps(batches: Iterator, d_steps: int, batches_left: int) -> Iterator[tuple[list, list]]:
    """The real batches of each step and their labels: ``d_steps`` at a time (one per D
    update), as many steps as the epoch's ``batches_left`` fill; the rest of the epoch is not read."""
    for _ in range(batches_left // d_steps):
        images, labels = zip(*(next(batches) for _ in range(d_steps)))
        yield list(images), list(labels)


def epoch_over(state: TrainState, loader: BatchSource, cfg: Config) -> bool:
    """Whether the epoch has no batches left for another step."""
    return state.batch_in_epoch + cfg.optim.d_steps > loader.steps_per_epoch


def advance(state: TrainState, cfg: Config, dist: DistInfo) -> int:
    """Count a step done: step, position in the epoch, samples."""
    state.step += 1
    state.batch_in_epoch += cfg.optim.d_steps
    state.samples_seen += images_per_step(cfg, dist)
    return state.step


def images_per_step(cfg: Config, dist: DistInfo) -> int:
    """Real images one step reads, all ranks together: a batch per process per D update."""
    return cfg.train.batch_size * dist.world_size * cfg.optim.d_steps


def evaluate(run: TrainingRun, step: int, where: Where) -> Ending | None:
    """Collective: score the EMA generator, log it, keep best.pt; a NaN generator is divergence
    (it makes black images, and a finite FID)."""
    if not finite_weights(run.nets):
        return Ending("diverged", f"the weights hold NaN or infinite values at the evaluation of step {step}")
    where.at("evaluation at step", step)
    t_eval = time.perf_counter()
    m = run.cfg.model
    scores, improved = run.evaluator.evaluate_at(step, run.sample, m.nz, run.state, m.num_classes)
    run.tracker.scores(step, scores, run.state, improved)
    if improved and run.cfg.eval.best_checkpoint:
        run.checkpointer.save_best(run.state)
    run.tracker.interval.exclude(time.perf_counter() - t_eval)  # the interval's img/s counts training only
    return None


def build_run(
    plan: RunPlan, dist: DistInfo, tracker: Tracker, resume_from: resume.Resume | None, where: Where
) -> TrainingRun:
    """Nets, optimisers, data, checkpointer and evaluator of this attempt; the checkpoint
    loaded into them; the tracker started at the step it resumes from."""
    cfg, shards, t = plan.cfg, plan.shards, plan.cfg.train
    graph = choose_graph(cfg, dist.device)
    settings = [
        graph.why,
        *([cfg.d_augment.describe()] if cfg.d_augment.on else []),
        cfg.loss.describe() + (f", {cfg.optim.d_steps} D updates per G update" if cfg.optim.d_steps > 1 else ""),
    ]  # how the step runs (start-up lines)
    if dist.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        settings.append(set_tf32(t.tf32))
    state, g_train, d_train = build_training(cfg, dist, graphed=graph.on)
    loader = build_loader(plan, dist, where)
    # Each rank draws its own latents; the fixed grid noise is the same everywhere.
    files.seed_rng(derive_seed(t.seed, dist.rank, 0, 1))
    if resume_from is not None:
        where.at("loading the checkpoint")
        restore(resume_from.path, resume_from.state_dict, state, cfg, dist, shards, loader)
        resume_from = resume_from._replace(state_dict=None)  # loaded: free it
    state.lineage = resume_from.lineage if resume_from is not None else timelines.fresh()
    if dist.is_main:
        save_config(cfg, RunFolder.of(cfg).config)
        timelines.write_lineage(cfg.run_dir, state.lineage)
    # The W&B run goes on only when the folder's own timeline does (a resume=PATH from
    # another run, or a branch, starts a new one); rank 0 fills in the id that checkpoints
    # then carry.
    same_run = resume_from is not None and resume_from.continues
    state.wandb_run_id = tracker.start(
        state.step, t.steps, state.wandb_run_id if same_run else None, cfg.to_dict(), state.lineage[-1][0]
    )
    if epoch_over(state, loader, cfg):
        state.epoch, state.batch_in_epoch = state.epoch + 1, 0
    fixed_labels = grid_labels(cfg.model.num_classes, cfg.log.num_samples) if cfg.model.conditional else None
    grid_size = cfg.log.num_samples if fixed_labels is None else len(fixed_labels)
    fixed_noise = sample_latent(grid_size, cfg.model.nz, generator=torch.Generator().manual_seed(t.seed))
    evaluator = None
    if plan.extractor is not None:  # every rank takes part in each evaluation (dcgan/eval.py)
        where.at("building the evaluator")
        evaluator = Evaluator.build(plan.extractor, cfg.eval, cfg.data, cfg.model, dist)
    checkpointer = Checkpointer(cfg, dist, {**shards.identity(), "reader": loader.reader})
    train_step = TrainStep(state, g_train, d_train, cfg, dist, tracker.interval.stats, graphed=graph.on)
    run = TrainingRun(
        cfg, dist, shards, state, train_step, loader, tracker, checkpointer, evaluator,
        eval_mode_sampler(state.generator_ema if state.generator_ema is not None else state.generator),
        fixed_noise.to(dist.device), fixed_labels if fixed_labels is None else fixed_labels.to(dist.device), resume_from,
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


def log_start(run: TrainingRun, plan: RunPlan, settings: list[str]) -> None:
    """The start-up lines (rank 0): what trains, on what, and how the step runs (``settings``)."""
    cfg, t, dist, shards = run.cfg, run.cfg.train, run.dist, plan.shards
    if not dist.is_main:
        return
    for line in settings:
        log.info("%s", line)
    process_group = ""
    if dist.distributed:  # gradients: DDP's all-reduce, or the graph's own (dcgan/training/step.py)
        process_group = " (process group: one all-reduce per net in the graph)" if run.train_step.graphed else " (DDP)"
    log.info(
        "training %s: arch %s, %d process(es) on %s%s, batch %d x %d, %s%s%s, %d steps "
        "(%d per epoch of %d samples in %d shards, counts from %s), G %.2fM params, D %.2fM params, EMA %s",
        t.name, cfg.model.arch, dist.world_size, dist.device.type, process_group,
        t.batch_size, dist.world_size, t.precision,
        ", channels_last" if t.channels_last else "", ", torch.compile" if t.compile else "", t.steps,
        run.loader.steps_per_epoch // cfg.optim.d_steps, shards.total, len(shards.urls), shards.counted_by,
        sum(p.numel() for p in run.state.generator.parameters()) / 1e6,
        sum(p.numel() for p in run.state.discriminator.parameters()) / 1e6,
        cfg.model.ema_decay or "off",
    )  # fmt: skip


def finish_attempt(run: TrainingRun, ending: Ending, started: tuple[int, float, float]) -> int:
    """summary.json, the W&B summary and the closing lines; returns the exit code. Collective.
    ``started``: the step, clock and train seconds at the start of the loop."""
    cfg, state, dist = run.cfg, run.state, run.dist
    wall, done = time.perf_counter() - started[1], state.step - started[0]
    global_batch = images_per_step(cfg, dist)
    if ending.status == "diverged" and dist.is_main:
        newest, _ = files.latest_valid(RunFolder.of(cfg).checkpoints)
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
    mine = (loader.corrupt_samples, loader.empty_positions, loader.unreadable_shards, loader.miscounted)
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
