"""The trainer's checkpointer: when to save, what a save that fails or finds NaN means for
the run, and how a loaded checkpoint is put back into the training state.

``Checkpointer.at_step()`` is asked after every step. It saves every
``checkpoint.every`` steps, at the last step and when the ranks agreed to stop, keeps
the newest ``checkpoint.keep`` (``dcgan/checkpoint/files.py`` writes the files) and says how
the run ends, if it does: a failed periodic save is reported and training goes on; a
failed final or stop save fails the run; a state holding NaN is never written and ends
the run as diverged. ``save_best()`` writes ``best.pt`` after an evaluation improved.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from dcgan.base.checks import ConfigError
from dcgan.base.exits import EXIT_PREEMPTED, SAME_COMMAND_CARRIES_ON, Ending
from dcgan.checkpoint import files, resume
from dcgan.checkpoint.state import TrainState
from dcgan.config.sections import Config
from dcgan.data.shardset import ShardSet
from dcgan.data.stream import BatchSource, derive_seed, steps_per_epoch
from dcgan.run import distributed
from dcgan.run.distributed import DistInfo
from dcgan.run.failure import Where
from dcgan.run.folder import RunFolder

log = logging.getLogger(__name__)


class Checkpointer:
    def __init__(self, cfg: Config, dist: DistInfo, data: dict):
        self.cfg, self.dist = cfg, dist
        self.data = data  # the shards' identity, saved with every checkpoint
        self.ckpt_dir = RunFolder.of(cfg).checkpoints

    def at_step(self, state: TrainState, signal_time: float | None, where: Where) -> Ending | None:
        """Collective, after every step (``signal_time``: when the ranks agreed to stop,
        None if they did not): save when due, and how the run ends (None: it goes on)."""
        step, last = state.step, self.cfg.train.steps
        stopping = signal_time is not None and step < last
        if not (step % self.cfg.checkpoint.every == 0 or step == last or stopping):
            return None
        where.at("checkpoint at step", step)
        outcome = self.save(state)
        if outcome == "nonfinite":
            return Ending("diverged", f"the state holds NaN or infinite values at the checkpoint of step {step}")
        if outcome == "failed" and (stopping or step == last):
            return Ending("failed", f"the {'stop' if stopping else 'final'} checkpoint could not be written")
        if stopping:
            if self.dist.is_main:
                log.warning(
                    "stopped on request after step %d/%d; checkpoint on disk %.2fs after the signal; %s (exit code %d)",
                    step, last, time.time() - signal_time, SAME_COMMAND_CARRIES_ON, EXIT_PREEMPTED,
                )  # fmt: skip
            return Ending("stopped")
        return Ending("done") if step == last else None

    def save_best(self, state: TrainState) -> None:
        """Collective: checkpoints/best.pt, after an evaluation found the lowest FID so far."""
        self.save(state, best=True)

    def save(self, state: TrainState, best: bool = False) -> str:
        """Collective: every rank hands rank 0 its RNG state, rank 0 writes, all ranks wait
        for the outcome (so no rank exits, and no launcher kills rank 0, mid-write): "saved",
        "failed" (the write failed: reported, the previous checkpoints stay as they were) or
        "nonfinite" (the state holds NaN or infinite values: nothing is written).
        ``best``: write checkpoints/best.pt instead of step_<step>.pt."""
        rng = distributed.gather_objects(files.capture_rng_state(self.dist.device), self.dist)
        ada_signs = None if state.ada_signs is None else distributed.sum_over_ranks(state.ada_signs, self.dist)
        outcome = "saved"
        if self.dist.is_main:
            ckpt_dir = self.ckpt_dir
            try:
                sd = state.state_dict(self.cfg.to_dict(), rng, self.dist.world_size, self.data, ada_signs)
                bad = files.nonfinite_tensors(sd)
                if bad:
                    log.error("checkpoint at step %d not written: non-finite values in %s", state.step, ", ".join(bad))
                    return distributed.broadcast_object("nonfinite", self.dist)
                if best:
                    saved = files.save_best(sd, ckpt_dir, state.step)
                else:
                    saved = files.save(sd, ckpt_dir, state.step, self.cfg.checkpoint.keep)
                log.info("checkpoint %s (%.1f MB in %.3fs)", saved.path, saved.bytes / 2**20, saved.seconds)
            except Exception as e:  # a full disk, an I/O error, a quota: keep the old ones, say so
                outcome = "failed"
                this = ckpt_dir / files.BEST_NAME if best else files.checkpoint_path(ckpt_dir, state.step)
                before = [p for p in files.list_checkpoints(ckpt_dir) if p != this]
                log.error(
                    "checkpoint at step %d could not be written to %s (%s: %s); the resume point stays %s",
                    state.step,
                    ckpt_dir,
                    type(e).__name__,
                    e,
                    before[-1].name if before else "the start of the run",
                )
        return distributed.broadcast_object(outcome, self.dist)


def restore(
    path: Path, sd: dict | None, state: TrainState, cfg: Config, dist: DistInfo, shards: ShardSet, loader: BatchSource
) -> None:
    """Load ``path`` (``sd``: its state dict, already loaded on rank 0) into ``state``, apply
    the optimiser settings given now, and put each rank's RNG and data position where it
    left them. Exact with the world size, batch and data it was written with; otherwise the
    epoch goes on at the same fraction under the new plan, with per-rank RNG derived afresh
    (also when the data is now read another way: from the cache, or from the shards). On
    another device type alone (CPU <-> GPU) the RNG states and position are restored, but
    the latents and augmentation come from another generator: not bitwise, and it says so.
    ConfigError when the data changed and train.data_changed says "refuse", or when the
    checkpoint's tensors do not fit the nets."""
    t_load = time.perf_counter()
    sd = sd if sd is not None else files.load(path)
    data_change = resume.check_same_data(sd.get("data"), shards, path, cfg.train.data_changed)
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
    saved_reader = (sd.get("data") or {}).get("reader", "shards")
    same_reader = saved_reader == loader.reader
    saved_device = files.trained_on(sd)
    device_change = f"device {saved_device} -> {dist.device.type}" if saved_device != dist.device.type else ""
    if (saved_world, saved_batch) == (dist.world_size, cfg.train.batch_size) and data_change is None and same_reader:
        # Another device type alone needs no new split: the data goes on where it stopped.
        if device_change and dist.is_main:
            log.warning(
                "%s: training goes on from the checkpoint's RNG states and data position, but is not bitwise "
                "exact: the latents and augmentation are drawn from the %s generator, not the %s one that wrote it",
                device_change, dist.device.type, saved_device,
            )  # fmt: skip
        files.restore_rng_state(sd["rng"][dist.rank], dist.device)
        return
    saved_total = sd["data"]["samples"] if sd.get("data") else shards.total
    saved_steps = steps_per_epoch(saved_total, saved_world, saved_batch)
    batch = round(state.batch_in_epoch * loader.steps_per_epoch / saved_steps)
    changes = [
        f"world size {saved_world} -> {dist.world_size}" if saved_world != dist.world_size else "",
        f"batch per process {saved_batch} -> {cfg.train.batch_size}" if saved_batch != cfg.train.batch_size else "",
        f"the data changed ({data_change}; train.data_changed=continue)" if data_change else "",
        ""
        if same_reader
        else f"the data is read from the {loader.reader} now, from the {saved_reader} then (data.cache)",
        device_change,
    ]
    log.warning(
        "%s: the data is split afresh; epoch %d goes on at batch %d of %d (was %d of %d) and each rank's RNG is "
        "derived from the seed again. Exact resume needs the same world size, batch, data and device type.",
        ", ".join(filter(None, changes)), state.epoch, batch, loader.steps_per_epoch, state.batch_in_epoch, saved_steps,
    )  # fmt: skip
    state.batch_in_epoch = batch
    files.seed_rng(derive_seed(cfg.train.seed, dist.rank, state.step, 1))


def apply_resume_overrides(state: TrainState, cfg: Config, saved: dict, dist: DistInfo) -> None:
    """Optimiser settings given now win over the checkpoint's (its param groups hold the
    old lr, betas and weight decay), and so does a fixed d_augment.p (ADA's goes on from
    the checkpoint's); every setting that differs is logged."""
    if state.ada_signs is not None and dist.rank != 0:
        state.ada_signs.zero_()  # the checkpoint holds every rank's signs summed: rank 0 takes them back
    if state.aug_p is not None and not cfg.d_augment.adaptive:
        state.aug_p.fill_(cfg.d_augment.p)
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
