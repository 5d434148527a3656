"""python -m dcgan.train --config configs/celeba.yaml [a.b=value ...]

Alone, or under ``torchrun --nproc_per_node=N`` (DDP, one process per GPU or CPU slot).
The loop below is the whole algorithm, in the seeds' order: D on a real batch, D on a
fake batch (separate batches, so batch norm never mixes them), one D update, then a G
update through the frozen D. Run folder: ``<train.out_dir>/<train.name>/`` with
config.yaml, train.log, metrics.jsonl, samples/ and checkpoints/.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import inspect
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from dcgan import checkpoint, distributed, failure
from dcgan.checkpoint import TrainState
from dcgan.config import Config, ConfigError, load_config, save_config
from dcgan.data import Loader, ShardStream, derive_seed, steps_per_epoch
from dcgan.distributed import DistInfo
from dcgan.divergence import DivergenceGuard, finite_weights
from dcgan.eval import Evaluator, check_eval_config, choose_extractor, eval_mode_sampler, format_scores
from dcgan.failure import Where
from dcgan.fileio import write_atomic
from dcgan.logs import LOG_DATE_FORMAT, RunLogHandler, log_format, setup_logging
from dcgan.models import build_models, ema_copy, sample_latent, update_ema
from dcgan.preemption import EXIT_PREEMPTED, StoppedDuringStartUp, StopRequest, ignore_in_worker
from dcgan.runlock import RunFolderBusy, RunLock
from dcgan.shardset import ShardSet, first_image_size, resolve_shards
from dcgan.sync_batchnorm import convert_sync_batchnorm
from dcgan.tracking import Tracker

log = logging.getLogger("dcgan.train")

# torch 2.14 renamed DDP's broadcast_buffers; older releases know only the old name.
NO_FORWARD_BUFFER_SYNC = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(DDP).parameters
    else {"broadcast_buffers": False}
)
# Exit codes. EXIT_PREEMPTED (75): stopped on a signal with the state saved; run the same
# command again (launchers requeue on it). EXIT_FAILED: the final or stop checkpoint could
# not be written, or no checkpoint of the run folder is usable.
EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2
# After a failure the process ends within this many seconds, whatever blocks on the way out.
EXIT_DEADLINE_S = 10.0
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
# What gan_step measures each step (averaged over log.every steps): losses, D's mean
# output on real data and on fakes before (d_fake) and after (d_fake_after) the D update,
# and the gradient norms (unscaled under fp16).
STAT_NAMES = ("loss_d_real", "loss_d_fake", "loss_g", "d_real", "d_fake", "d_fake_after", "grad_norm_d", "grad_norm_g")


def build_training(cfg: Config, dist: DistInfo) -> tuple[TrainState, nn.Module, nn.Module]:
    """(state, G as trained, D as trained): the bare nets live in ``state``; the trained
    ones are their DDP wrappers when there are several processes."""
    torch.manual_seed(cfg.train.seed)  # the same init on every rank (DDP also broadcasts rank 0's)
    G, D = build_models(cfg)
    layout = memory_format(cfg)
    G_ema = ema_copy(G).to(dist.device, memory_format=layout) if cfg.model.ema_decay > 0 else None
    if dist.distributed and cfg.train.sync_bn:
        G = convert_sync_batchnorm(G, dist.device)
        D = convert_sync_batchnorm(D, dist.device)
    G, D = G.to(dist.device, memory_format=layout), D.to(dist.device, memory_format=layout)
    o = cfg.optim
    opt_g = torch.optim.Adam(G.parameters(), lr=o.g.lr, betas=o.g.betas, weight_decay=o.g.weight_decay, fused=o.fused)
    opt_d = torch.optim.Adam(D.parameters(), lr=o.d.lr, betas=o.d.betas, weight_decay=o.d.weight_decay, fused=o.fused)
    if cfg.train.compile:  # in place: state-dict keys stay those of the bare nets, DDP wraps the compiled call
        G.compile()
        D.compile()
    # One scaler per network: their gradients live on different scales (fp16 only).
    fp16 = cfg.train.precision == "fp16"
    state = TrainState(
        G,
        D,
        G_ema,
        opt_g,
        opt_d,
        torch.amp.GradScaler(dist.device.type, enabled=fp16),
        torch.amp.GradScaler(dist.device.type, enabled=fp16),
    )
    if not dist.distributed:
        return state, G, D
    # No buffer broadcast at each forward: BN statistics are SyncBN's business, and
    # rebroadcasting them between D's two forwards breaks autograd (pitfalls.md 3).
    return state, DDP(G, **NO_FORWARD_BUFFER_SYNC), DDP(D, **NO_FORWARD_BUFFER_SYNC)


def init_data_worker(stop_signals: tuple[str, ...], worker_id: int) -> None:
    """Each DataLoader worker leaves the stop signals to its rank, and dies with it."""
    ignore_in_worker(stop_signals)
    failure.die_with_parent()


def memory_format(cfg: Config) -> torch.memory_format:
    """The layout of the nets' 4-d weights and of the batches fed to them."""
    return torch.channels_last if cfg.train.channels_last else torch.contiguous_format


def gan_step(
    state: TrainState,
    g_train: nn.Module,
    d_train: nn.Module,
    real: torch.Tensor,
    nz: int,
    amp_dtype: torch.dtype | None,
    real_target: float = 1.0,
) -> torch.Tensor:
    """One D update and one G update; returns the STAT_NAMES values as a tensor on the
    device (no host sync here: the caller reads them only at log steps). ``real_target``:
    D's label for real images (below 1: one-sided label smoothing)."""
    D = state.discriminator
    amp = torch.autocast(real.device.type, dtype=amp_dtype, enabled=amp_dtype is not None)
    n = real.shape[0]
    ones = torch.ones(n, device=real.device)
    zeros = torch.zeros(n, device=real.device)

    # D on real, then on fake: two backward passes, one gradient all-reduce (the second).
    state.opt_d.zero_grad(set_to_none=True)
    with d_train.no_sync() if isinstance(d_train, DDP) else contextlib.nullcontext():
        with amp:
            out_real = d_train(real).view(-1).float()
        loss_d_real = F.binary_cross_entropy_with_logits(out_real, torch.full_like(out_real, real_target))
        state.scaler_d.scale(loss_d_real).backward()
    z = sample_latent(n, nz, real.device)
    with amp:
        fake = g_train(z)
        out_fake = d_train(fake.detach()).view(-1).float()
    loss_d_fake = F.binary_cross_entropy_with_logits(out_fake, zeros)
    state.scaler_d.scale(loss_d_fake).backward()
    grad_norm_d = gradient_norm(D, state.scaler_d, state.opt_d)
    state.scaler_d.step(state.opt_d)
    state.scaler_d.update()

    # G through the bare, frozen D: no D gradients, no D all-reduce (pitfalls.md 5).
    state.opt_g.zero_grad(set_to_none=True)
    D.requires_grad_(False)
    with amp:
        out_g = D(fake).view(-1).float()
    loss_g = F.binary_cross_entropy_with_logits(out_g, ones)
    state.scaler_g.scale(loss_g).backward()
    grad_norm_g = gradient_norm(state.generator, state.scaler_g, state.opt_g)
    state.scaler_g.step(state.opt_g)
    state.scaler_g.update()
    D.requires_grad_(True)

    with torch.no_grad():
        return torch.stack([
            loss_d_real, loss_d_fake, loss_g,
            out_real.sigmoid().mean(), out_fake.sigmoid().mean(), out_g.sigmoid().mean(),
            grad_norm_d, grad_norm_g,
        ])  # fmt: skip


def gradient_norm(net: nn.Module, scaler: torch.amp.GradScaler, opt: torch.optim.Optimizer) -> torch.Tensor:
    """L2 norm of ``net``'s gradients, on the device. Under fp16 the grads are unscaled
    first (``scaler.step`` then knows not to do it again); inf when the step overflowed."""
    scaler.unscale_(opt)
    return torch.nn.utils.get_total_norm([p.grad for p in net.parameters() if p.grad is not None])


def resume(
    path: Path, sd: dict | None, state: TrainState, cfg: Config, dist: DistInfo, shards: ShardSet, loader: Loader
) -> None:
    """Load ``path`` (``sd``: its state dict, already loaded on rank 0) into ``state``, apply
    the optimiser settings given now, and put each rank's RNG and data position where it
    left them. Exact with the world size, batch and data it was written with; otherwise the
    epoch goes on at the same fraction under the new plan, with per-rank RNG derived afresh.
    ConfigError when the data changed and train.data_changed says "refuse", or when the
    checkpoint's tensors do not fit the nets."""
    t_load = time.perf_counter()
    sd = sd if sd is not None else checkpoint.load(path)
    data_change = checkpoint.check_same_data(sd.get("data"), shards, path, cfg.train.data_changed)
    try:
        state.load_state_dict(sd)
    except (RuntimeError, KeyError, ValueError) as e:  # another architecture under the same settings
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"train.resume: {path} does not fit model.arch {cfg.model.arch!r} ({detail})") from None
    saved_world, saved_batch = sd["world_size"], sd["config"]["train"]["batch_size"]
    restarts = distributed.restart_count()
    log.info(
        "resumed from %s at step %d (epoch %d, batch %d), loaded in %.2fs%s",
        path, state.step, state.epoch, state.batch_in_epoch, time.perf_counter() - t_load,
        f"; restart {restarts} of this job" if restarts else "",
    )  # fmt: skip
    apply_resume_overrides(state, cfg, sd["config"], dist)
    if (saved_world, saved_batch) == (dist.world_size, cfg.train.batch_size) and data_change is None:
        checkpoint.restore_rng_state(sd["rng"][dist.rank], dist.device)
        return
    saved_total = sd["data"]["samples"] if sd.get("data") else shards.total
    saved_steps = steps_per_epoch(saved_total, saved_world, saved_batch)
    batch = round(state.batch_in_epoch * loader.steps_per_epoch / saved_steps)
    changes = [
        f"world size {saved_world} -> {dist.world_size}" if saved_world != dist.world_size else "",
        f"batch per process {saved_batch} -> {cfg.train.batch_size}" if saved_batch != cfg.train.batch_size else "",
        f"the data changed ({data_change}; train.data_changed=continue)" if data_change else "",
    ]
    log.warning(
        "%s: the data is split afresh; epoch %d goes on at batch %d of %d (was %d of %d) and each rank's RNG is "
        "derived from the seed again. Exact resume needs the same world size, batch and data.",
        ", ".join(filter(None, changes)), state.epoch, batch, loader.steps_per_epoch, state.batch_in_epoch, saved_steps,
    )  # fmt: skip
    state.batch_in_epoch = batch
    checkpoint.seed_rng(derive_seed(cfg.train.seed, dist.rank, state.step, 1))


def apply_resume_overrides(state: TrainState, cfg: Config, saved: dict, dist: DistInfo) -> None:
    """Optimiser settings given now win over the checkpoint's (its param groups hold the
    old lr, betas and weight decay); every setting that differs is logged."""
    for net, opt in (("g", state.opt_g), ("d", state.opt_d)):
        adam = getattr(cfg.optim, net)
        for group in opt.param_groups:
            group.update(lr=adam.lr, betas=adam.betas, weight_decay=adam.weight_decay)
    changed = config_changes(saved, cfg.to_dict())
    if dist.is_main and changed:
        optim = [c for c in changed if c.startswith("optim.")]
        other = [c for c in changed if not c.startswith("optim.")]
        if optim:
            log.warning("changed on resume, applied on top of the checkpoint's optimiser state: %s", "; ".join(optim))
        if other:
            log.info("settings that differ from the checkpoint's: %s", "; ".join(other))


def config_changes(saved: dict, now: dict, prefix: str = "") -> list[str]:
    """``key old -> new`` for every setting that differs between two config dicts."""
    changes = []
    for key, value in now.items():
        old = saved.get(key) if isinstance(saved, dict) else None
        if isinstance(value, dict):
            changes += config_changes(old or {}, value, f"{prefix}{key}.")
        elif old != value and f"{prefix}{key}" not in ("train.resume", "train.overwrite"):
            changes.append(f"{prefix}{key} {old!r} -> {value!r}")
    return changes


def save_checkpoint(state: TrainState, cfg: Config, dist: DistInfo, data: dict, best: bool = False) -> str:
    """Collective: every rank hands rank 0 its RNG state, rank 0 writes, all ranks wait
    for the outcome (so no rank exits, and no launcher kills rank 0, mid-write): "saved",
    "failed" (the write failed: reported, the previous checkpoints stay as they were) or
    "nonfinite" (the state holds NaN or infinite values: nothing is written).
    ``data``: the shards' identity. ``best``: write checkpoints/best.pt instead of step_<step>.pt."""
    rng = distributed.gather_objects(checkpoint.capture_rng_state(dist.device), dist)
    outcome = "saved"
    if dist.is_main:
        ckpt_dir = cfg.run_dir / "checkpoints"
        try:
            sd = state.state_dict(cfg.to_dict(), rng, dist.world_size, data)
            bad = checkpoint.nonfinite_tensors(sd)
            if bad:
                log.error("checkpoint at step %d not written: non-finite values in %s", state.step, ", ".join(bad))
                return distributed.broadcast_object("nonfinite", dist)
            if best:
                saved = checkpoint.save_best(sd, ckpt_dir, state.step)
            else:
                saved = checkpoint.save(sd, ckpt_dir, state.step, cfg.checkpoint.keep)
            log.info("checkpoint %s (%.1f MB in %.3fs)", saved.path, saved.bytes / 2**20, saved.seconds)
        except Exception as e:  # a full disk, an I/O error, a quota: keep the old ones, say so
            outcome = "failed"
            this = ckpt_dir / checkpoint.BEST_NAME if best else checkpoint.checkpoint_path(ckpt_dir, state.step)
            before = [p for p in checkpoint.list_checkpoints(ckpt_dir) if p != this]
            log.error(
                "checkpoint at step %d could not be written to %s (%s: %s); the resume point stays %s",
                state.step,
                ckpt_dir,
                type(e).__name__,
                e,
                before[-1].name if before else "the start of the run",
            )
    return distributed.broadcast_object(outcome, dist)


def log_values(
    cfg: Config, state: TrainState, stats: torch.Tensor, steps: int, seconds: float, data_wait: float,
    loader: Loader, dist: DistInfo,
) -> dict[str, float]:  # fmt: skip
    """The metrics of one log interval: ``stats`` (the sum of ``steps`` gan_step results,
    read here in the interval's one host sync) plus rates, learning rates and memory."""
    values = dict(zip(STAT_NAMES, (stats / steps).tolist()))
    global_rate = steps * cfg.train.batch_size * dist.world_size / seconds
    values.update(
        loss_d=values["loss_d_real"] + values["loss_d_fake"],
        lr_g=state.opt_g.param_groups[0]["lr"],
        lr_d=state.opt_d.param_groups[0]["lr"],
        img_per_s=global_rate,
        img_per_s_per_process=global_rate / dist.world_size,
        step_time_s=seconds / steps,
        data_wait=data_wait / seconds,
        epoch=state.epoch,
        corrupt_samples=loader.corrupt_samples,
    )
    if dist.device.type == "cuda":
        values["gpu_mem_peak_gb"] = torch.cuda.max_memory_allocated(dist.device) / 2**30
    if state.scaler_g.is_enabled():
        values.update(grad_scale_g=state.scaler_g.get_scale(), grad_scale_d=state.scaler_d.get_scale())
    return values


def train(cfg: Config, shards: ShardSet, dist: DistInfo, stop: StopRequest, where: Where) -> int:
    """Train until ``train.steps`` or an agreed ``stop``; returns the exit code (EXIT_*).
    ``where`` follows the phase and step, for the line a failure ends with (dcgan/failure.py)."""
    run_dir = cfg.run_dir
    if dist.is_main:
        handler = RunLogHandler(run_dir / "train.log")
        handler.setFormatter(logging.Formatter(log_format(dist.rank), LOG_DATE_FORMAT))
        logging.getLogger().addHandler(handler)
    # Rank 0 decides what to resume from and tells the others (one reader of the folder).
    chosen, error = None, None
    if dist.is_main:
        try:
            chosen = checkpoint.choose(cfg)
        except (checkpoint.ResumeError, ConfigError) as e:
            error = e
    where_from, error = distributed.broadcast_object((chosen and chosen._replace(state_dict=None), error), dist)
    if error is not None:
        raise error
    resume_from = chosen if dist.is_main else where_from  # only rank 0 holds the loaded state
    tracker = Tracker(cfg, enabled=dist.is_main)
    try:
        return train_loop(cfg, shards, dist, stop, where, tracker, resume_from)
    except ConfigError:
        raise  # refused before training (other data): the run folder's summary stays the last attempt's
    except Exception as e:
        peer = failure.posted(dist.store)  # another rank failed first: this error is its consequence
        tracker.finish(EXIT_FAILED, preempted=False, facts={
            "status": "failed", "exit_code": EXIT_FAILED, "error": peer or failure.describe(e), "where": str(where),
        })  # fmt: skip
        raise


def train_loop(
    cfg: Config, shards: ShardSet, dist: DistInfo, stop: StopRequest, where: Where, tracker: Tracker,
    resume_from: checkpoint.Resume | None,
) -> int:  # fmt: skip
    run_dir, t = cfg.run_dir, cfg.train
    amp_dtype = AMP_DTYPES[t.precision]
    real_target = 1.0 - cfg.optim.label_smoothing
    if dist.device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    state, g_train, d_train = build_training(cfg, dist)
    stream = ShardStream(
        shards, cfg.data, rank=dist.rank, world_size=dist.world_size, batch_size=t.batch_size,
        image_size=cfg.model.image_size, channels=cfg.model.channels, seed=t.seed,
    )  # fmt: skip
    loader = Loader(
        stream,
        dist.device,
        worker_init_fn=functools.partial(init_data_worker, tuple(t.stop_signals)),
        memory_format=memory_format(cfg),
        first_to_report=lambda shard: distributed.first_to_claim(f"miscounted/{shard}", dist),
    )
    data_identity = shards.identity()
    # Each rank draws its own latents; the fixed grid noise is the same everywhere.
    checkpoint.seed_rng(derive_seed(t.seed, dist.rank, 0, 1))
    if resume_from is not None:
        where.at("loading the checkpoint")
        resume(resume_from.path, resume_from.state_dict, state, cfg, dist, shards, loader)
        resume_from = resume_from._replace(state_dict=None)  # loaded: free it
    if dist.is_main:
        save_config(cfg, run_dir / "config.yaml")
    # The W&B run goes on only for a checkpoint of this run folder's timeline (resume=PATH
    # from another run, or a branch, starts a new one); rank 0 fills in the id that
    # checkpoints then carry.
    same_run = (
        resume_from is not None
        and resume_from.new_timeline is None
        and resume_from.path.parent.parent.resolve() == run_dir.resolve()
    )
    state.wandb_run_id = tracker.start(state.step, t.steps, state.wandb_run_id if same_run else None, cfg.to_dict())
    if state.batch_in_epoch >= loader.steps_per_epoch:
        state.epoch, state.batch_in_epoch = state.epoch + 1, 0
    fixed_noise = sample_latent(cfg.log.num_samples, cfg.model.nz, generator=torch.Generator().manual_seed(t.seed))
    fixed_noise = fixed_noise.to(dist.device)
    # Grids and evaluations: the EMA generator (G without one), in eval mode.
    sample = eval_mode_sampler(state.generator_ema if state.generator_ema is not None else state.generator)
    evaluator = None
    if cfg.eval.every:  # every rank takes part in each evaluation (dcgan/eval.py)
        where.at("building the evaluator")
        choice = choose_extractor(cfg.eval, cfg.data.shards, cfg.model)
        evaluator = Evaluator.build(choice, cfg.eval, cfg.data, cfg.model, dist)

    global_batch = t.batch_size * dist.world_size
    log.info(
        "training %s: arch %s, %d process(es) on %s, batch %d x %d, %s%s%s, %d steps "
        "(%d per epoch of %d samples in %d shards, counts from %s), G %.2fM params, D %.2fM params, EMA %s",
        t.name,
        cfg.model.arch,
        dist.world_size,
        dist.device.type,
        t.batch_size,
        dist.world_size,
        t.precision,
        ", channels_last" if t.channels_last else "",
        ", torch.compile" if t.compile else "",
        t.steps,
        loader.steps_per_epoch,
        shards.total,
        len(shards.urls),
        shards.counted_by,
        sum(p.numel() for p in state.generator.parameters()) / 1e6,
        sum(p.numel() for p in state.discriminator.parameters()) / 1e6,
        cfg.model.ema_decay or "off",
    )
    stats_sum = torch.zeros(len(STAT_NAMES), device=dist.device)
    stats_steps, data_wait = 0, 0.0
    guard = DivergenceGuard(STAT_NAMES, t.divergence_patience, fp16=t.precision == "fp16")
    nets = [state.generator, state.discriminator]
    diverged: str | None = None
    t_start = t_log = time.perf_counter()
    start_step, train_seconds_before = state.step, state.train_seconds
    exit_code = EXIT_OK

    stop.arm()
    while state.step < t.steps and exit_code == EXIT_OK:
        where.at("step", state.step + 1)
        t_fetch = time.perf_counter()
        # closing: an exception in the loop shuts the epoch's DataLoader workers down at once
        with contextlib.closing(loader.epoch(state.epoch, state.batch_in_epoch)) as batches:
            for real, _ in batches:
                data_wait += time.perf_counter() - t_fetch
                if state.step == 0:
                    tracker.real_grid(real[: cfg.log.num_samples])

                stats_sum += gan_step(state, g_train, d_train, real, cfg.model.nz, amp_dtype, real_target)
                stats_steps += 1
                state.step += 1
                state.batch_in_epoch += 1
                state.samples_seen += global_batch
                step = state.step
                if state.generator_ema is not None:
                    update_ema(state.generator_ema, state.generator, step, cfg.model.ema_decay)

                tracker.advance(step)
                if step % cfg.log.every == 0 or step == t.steps:
                    diverged = guard.check(stats_sum, nets, dist, (step - stats_steps + 1, step))
                    if dist.is_main:  # only rank 0 reports
                        elapsed = time.perf_counter() - t_log
                        values = log_values(cfg, state, stats_sum, stats_steps, elapsed, data_wait, loader, dist)
                        tracker.metrics(step, values, (
                            f"step {step}/{t.steps} | epoch {state.epoch} | "
                            f"loss_D {values['loss_d']:.3f} | loss_G {values['loss_g']:.3f} | "
                            f"D(x) {values['d_real']:.3f} | D(G(z)) {values['d_fake']:.3f} -> {values['d_fake_after']:.3f} | "
                            f"{values['img_per_s']:.0f} img/s | data wait {100 * values['data_wait']:.0f}%"
                        ))  # fmt: skip
                    stats_sum.zero_()
                    stats_steps, data_wait, t_log = 0, 0.0, time.perf_counter()
                    if diverged is not None:
                        break
                if dist.is_main and (step % cfg.log.samples_every == 0 or step == t.steps):
                    tracker.sample_grid(step, sample(fixed_noise))
                if evaluator is not None and (step % cfg.eval.every == 0 or step == t.steps):
                    if not finite_weights(nets):  # a NaN generator makes black images, and a finite FID
                        diverged = f"the weights hold NaN or infinite values at the evaluation of step {step}"
                        break
                    where.at("evaluation at step", step)
                    t_eval = time.perf_counter()
                    scores = evaluator.evaluate(sample, cfg.model.nz)
                    improved = state.best_fid is None or scores["fid"] < state.best_fid
                    if improved:
                        state.best_fid, state.best_fid_step = scores["fid"], step
                    tracker.metrics(step, {**scores, "best_fid": state.best_fid}, (
                        f"eval step {step}: {format_scores(scores)} | {scores['eval_seconds']:.1f}s"
                        + (" | best so far" if improved else f" | best {state.best_fid:.3f} at step {state.best_fid_step}")
                    ))  # fmt: skip
                    if improved and cfg.eval.best_checkpoint:
                        save_checkpoint(state, cfg, dist, data_identity, best=True)
                    t_log += time.perf_counter() - t_eval  # the next interval's img/s counts training only

                # Stop requests and checkpoints: the same decision on every rank, after the same step.
                signal_time = stop.agreed(dist) if step % t.stop_check_every == 0 else None
                stopping = signal_time is not None and step < t.steps
                if step % cfg.checkpoint.every == 0 or step == t.steps or stopping:
                    where.at("checkpoint at step", step)
                    state.train_seconds = train_seconds_before + time.perf_counter() - t_start
                    saved = save_checkpoint(state, cfg, dist, data_identity)
                    if saved == "nonfinite":
                        diverged = f"the state holds NaN or infinite values at the checkpoint of step {step}"
                        break
                    if saved == "failed" and (stopping or step == t.steps):
                        exit_code = EXIT_FAILED
                    elif stopping:
                        exit_code = EXIT_PREEMPTED
                        if dist.is_main:
                            log.warning(
                                "stopped on request after step %d/%d; checkpoint on disk %.2fs after the signal; "
                                "the same command carries on from here (exit code %d)",
                                step, t.steps, time.time() - signal_time, EXIT_PREEMPTED,
                            )  # fmt: skip
                if step >= t.steps or exit_code != EXIT_OK:
                    break
                where.at("step", step + 1)
                t_fetch = time.perf_counter()
        if diverged is not None:
            exit_code = EXIT_FAILED
        elif state.batch_in_epoch >= loader.steps_per_epoch:
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0
    stop.disarm()

    where.at("shutdown")
    wall = time.perf_counter() - t_start
    done = state.step - start_step
    status = (
        "diverged"
        if diverged
        else "failed"
        if exit_code == EXIT_FAILED
        else "done"
        if state.step >= t.steps
        else "stopped"
    )
    if diverged and dist.is_main:
        newest, _ = checkpoint.latest_valid(run_dir / "checkpoints")
        log.error(
            "diverged at step %d: %s; stopped without writing a checkpoint, the resume point stays %s. "
            "Lower the learning rates (optim.g.lr, optim.d.lr), or resume from an earlier checkpoint with other settings",
            state.step, diverged, newest or "the start of the run",
        )  # fmt: skip
    reading = reading_report(loader, shards, dist)
    tracker.finish(exit_code, preempted=exit_code == EXIT_PREEMPTED, facts={
        "status": status,
        "exit_code": exit_code,
        "step": state.step,
        "steps": t.steps,
        "epoch": state.epoch,
        "samples_seen": state.samples_seen,
        "world_size": dist.world_size,
        "resumed_from": str(resume_from.path) if resume_from else None,
        "diverged": diverged,
        "steps_this_attempt": done,
        "wall_time_s": round(wall, 3),
        "train_time_s": round(train_seconds_before + wall, 3),  # all attempts together
        "img_per_s": done * global_batch / max(wall, 1e-9),
        "data": {"fingerprint": data_identity["fingerprint"], "counted_by": shards.counted_by, **(reading or {})},
    })  # fmt: skip
    if reading is not None:
        log.info(
            "%s: %d steps in %.1fs (%.2f steps/s, %.0f img/s); all ranks: corrupt samples %d, empty positions %d, "
            "unreadable shards %d, shards with other counts than planned %d",
            status, done, wall, done / max(wall, 1e-9), done * global_batch / max(wall, 1e-9),
            reading["corrupt_samples"], reading["empty_positions"], reading["unreadable_shards"],
            len(reading["miscounted_shards"]),
        )  # fmt: skip
    return exit_code


def reading_report(loader: Loader, shards: ShardSet, dist: DistInfo) -> dict | None:
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


def check_config(
    config: str, overrides: list[str], world_size: int, on_this_machine: bool = True
) -> tuple[Config, ShardSet]:
    """Everything a user can get wrong, checked before any process group or model (and by
    the Slurm launchers before anything is submitted): raises ConfigError naming the key.
    ``on_this_machine``: also check what depends on where it runs (a CUDA device)."""
    cfg = load_config(config, overrides)
    shards = resolve_shards(cfg.data)
    steps_per_epoch(shards.total, world_size, cfg.train.batch_size)  # the data fills a batch per process
    check_eval_config(cfg)
    if on_this_machine and cfg.train.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: 'cuda', but torch sees no CUDA device here")
    size = first_image_size(shards)
    if size is not None and size != (cfg.model.image_size, cfg.model.image_size):
        log.warning(
            "the shards hold %dx%d images and model.image_size is %d: every image is resized and centre-cropped "
            "while training, which cuts the data pipeline's rate about 3x; resize them once instead "
            "(python -m dcgan.shards SOURCE OUT --size %d, or img2dataset --image_size %d)",
            *size, cfg.model.image_size, cfg.model.image_size, cfg.model.image_size,
        )  # fmt: skip
    return cfg, shards


def main(argv: list[str] | None = None, on_exit: Callable[[int], object] | None = None) -> int:
    """The exit code (EXIT_* above, or EXIT_PREEMPTED). Rank 0 hands it to ``on_exit``
    (default ``report_exit_code``) before any rank exits: a launcher that tears the job
    down when its first process ends (srun --kill-on-bad-exit) cannot cut that short."""
    parser = argparse.ArgumentParser(
        prog="python -m dcgan.train", description="Train a DCGAN (alone or under torchrun)."
    )
    parser.add_argument("--config", required=True, help="YAML config, e.g. configs/celeba.yaml")
    parser.add_argument("overrides", nargs="*", help="a.b=value settings applied after the file")
    args = parser.parse_args(argv)
    env = distributed.read_env()
    setup_logging(env.rank)
    return run(args.config, args.overrides, env, on_exit or report_exit_code)


def report_exit_code(code: int) -> None:
    """Write ``code`` to DCGAN_EXIT_CODE_FILE when that is set: torchrun exits 1 whatever
    its workers' codes, so slurm/train.sbatch learns "stopped, state saved" (75) here."""
    path = os.environ.get("DCGAN_EXIT_CODE_FILE")
    if path:
        write_atomic(Path(path), lambda f: f.write(f"{code}\n".encode()))


def run(config: str, overrides: list[str], env: distributed.EnvRanks, on_exit: Callable[[int], object]) -> int:
    try:
        cfg, shards = check_config(config, overrides, env.world_size)
        restart_note = checkpoint.settle_restart(cfg, distributed.restart_count())
        checkpoint.check_resume_setting(cfg, shards)
    except ConfigError as e:
        config_error(e, config)
        if env.rank == 0:
            on_exit(EXIT_CONFIG)
        return EXIT_CONFIG

    stop = StopRequest(cfg.train.stop_signals)  # before anything slow: from here on a signal means "stop"
    where, dist, watch, lock = Where(), None, None, RunLock(cfg.run_dir)
    try:
        dist = distributed.setup(cfg.train.device)
        watch = failure.PeerWatch(dist.store, dist.rank)
        claim_run_dir(cfg, dist, lock)
        if dist.is_main and restart_note:
            log.warning("%s", restart_note)
        code = train(cfg, shards, dist, stop, where)
    except (
        Exception,
        StoppedDuringStartUp,
    ) as e:  # every failure ends here: one line, every process gone within seconds
        peer_logged = watch.stop() if watch is not None else None
        store = dist.store if dist is not None else None
        if isinstance(e, StoppedDuringStartUp):
            code = EXIT_PREEMPTED
            failure.post(store, f"rank {env.rank} stopped by {e.signal_name} during start-up")
            log.warning(
                "stopped by %s during start-up, before training began; the same command resumes from the last "
                "checkpoint (exit code %d)", e.signal_name, EXIT_PREEMPTED,
            )  # fmt: skip
        elif isinstance(e, ConfigError):  # other data, another net shape, a busy or unwritable run folder
            code = EXIT_CONFIG
            config_error(e, config)
        else:
            code = EXIT_FAILED
            failure.report(e, where, env.rank, cfg.run_dir, store, peer_logged)
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
        raise RunFolderBusy(error)


def config_error(error: ConfigError, config: str) -> None:
    where = "" if str(error).startswith(str(config)) else f"{config}: "
    print(f"dcgan.train: config error: {where}{error}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
