"""Everything a run needs decided before any process group exists, in one place.

``plan_run()`` reads the config and its overrides, resolves the shards and their counts,
checks that the data fills a batch on every rank, decides whether the set is held
decoded on the device (``data.cache``), picks the evaluation's feature
extractor, settles what a later attempt resumes from and checks that choice
against the run folder. It returns a ``RunPlan`` and changes nothing on disk or in its
arguments. ``dcgan.train`` runs it on every rank; ``launch.submit`` and ``launch.sweep``
run it on the login node before anything is submitted. Every mistake a user can make
raises ConfigError naming the key, and the entry points exit 2. ``RunPlan.describe()``
is what ``python -m dcgan.train --dry-run`` prints.
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from dcgan.base.checks import ConfigError
from dcgan.checkpoint.files import latest_valid, list_checkpoints, read_record, step_of
from dcgan.checkpoint.resume import check_resume_setting
from dcgan.config.loading import load_config
from dcgan.config.sections import Config
from dcgan.data.cache import UNMEASURED, CacheChoice, choose_cache, measure_room
from dcgan.data.shardset import ShardSet, first_image_size, resolve_shards
from dcgan.data.stream import steps_per_epoch
from dcgan.models.networks import checkpoint_bytes
from dcgan.quality.evaluator import ExtractorChoice, choose_extractor
from dcgan.run import distributed, timelines
from dcgan.run.folder import RunFolder
from dcgan.tracking.wandb_run import check_environment as check_wandb_environment

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunPlan:
    cfg: Config  # as this attempt runs it (the settings that act once settled: settle_start)
    shards: ShardSet  # the shards with their per-shard counts
    cache: CacheChoice  # whether the set is held decoded on the device, and why
    extractor: ExtractorChoice | None  # the evaluation's feature extractor (None: eval.every is 0)
    world_size: int
    start_note: str | None  # what settle_start changed, for the log (None: nothing)
    on_this_machine: bool = True  # planned for this machine (False: the launchers plan for the job's)
    device: torch.device | None = None  # the device this process takes (None: planned for another machine)
    finished: str | None = None  # why there is nothing to train (the run reached train.steps), else None

    def describe(self) -> str:
        """The plan for a person, one fact a line: what ``--dry-run`` prints."""
        cfg, t, shards, world = self.cfg, self.cfg.train, self.shards, self.world_size
        d_steps = cfg.optim.d_steps
        per_epoch = steps_per_epoch(shards.total, world, t.batch_size) // d_steps
        folder = cfg.run_dir.resolve()
        if folder.is_dir():
            held = len(RunFolder(folder).list_checkpoints())
            state = f"exists, {held} checkpoint(s)"
        else:
            state = "not there yet: created when the run starts"
        size = f" ({shards.image_size}x{shards.image_size})" if shards.image_size else ""
        if self.extractor is None:
            evaluation = "off (eval.every=0)"
        else:
            evaluation = f"every {cfg.eval.every} steps, {self.extractor.kind} features from {self.extractor.path}"
        rows = [
            ("run folder", f"{folder} ({state})"),
            ("processes", f"{world} (world size{world_size_source() if self.on_this_machine else ''})"),
            ("device", describe_device(t.device, self.device) + f", precision {t.precision}"),
            ("batch", f"{t.batch_size} per process, {t.batch_size * world} global"),
            ("data", f"{shards.total} samples{size} in {len(shards.urls)} shard(s) from {cfg.data.shards}"),
            ("counts from", shards.counted_by),
            (
                "steps",
                f"{per_epoch} per epoch; train.steps={t.steps} takes {t.steps / per_epoch:.2f} epoch(s)"
                + (f" ({d_steps} batches a step: optim.d_steps)" if d_steps > 1 else ""),
            ),
            ("loss", cfg.loss.describe()),
            ("data reader", self.cache.why),
            ("nets", describe_sizes(cfg)),
            ("resumes from", describe_resume(cfg)),
            ("evaluation", evaluation),
        ]
        if self.start_note:
            rows.append(("carries on", self.start_note))
        width = max(len(name) for name, _ in rows)
        return "\n".join([f"plan of run {t.name}:"] + [f"  {name:<{width}} : {value}" for name, value in rows])


def check_d_steps(cfg: Config, batches_per_epoch: int) -> None:
    """Each step reads optim.d_steps batches: an epoch must hold that many per process."""
    if cfg.optim.d_steps > batches_per_epoch:
        raise ConfigError(
            f"optim.d_steps: {cfg.optim.d_steps} batches a step (one per D update), but an epoch holds only "
            f"{batches_per_epoch} per process; lower optim.d_steps or train.batch_size"
        )


def settle_classes(cfg: Config, shards: ShardSet) -> Config:
    """A conditional model's class count from the shards' manifest (a copy of ``cfg`` with
    model.num_classes set); ConfigError when the shards carry no classes, or more than it was given."""
    m = cfg.model
    if not m.conditional:
        return cfg
    if not shards.classes:
        raise ConfigError(
            f"model.conditional: the shards of data.shards={cfg.data.shards} carry no classes ({shards.counted_by} "
            "lists none); write them with `python -m dcgan.shards` from class folders or labelled IDX files, or set "
            "model.conditional=false"
        )
    if m.num_classes and m.num_classes < len(shards.classes):
        raise ConfigError(
            f"model.num_classes: {m.num_classes}, but the shards hold {len(shards.classes)} classes "
            f"({', '.join(shards.classes[:5])}{', ...' if len(shards.classes) > 5 else ''}); set it to 0 (as many as the shards)"
        )
    if m.num_classes:
        return cfg
    settled = copy.deepcopy(cfg)
    settled.model.num_classes = len(shards.classes)
    return settled


def plan_run(
    config: str, overrides: list[str], world_size: int, restart: int = 0, on_this_machine: bool = True
) -> RunPlan:
    """The plan of one attempt of a run. ``restart``: how many times this job was restarted
    (``distributed.restart_count()``). ``on_this_machine``: also check what depends on where
    it runs (a CUDA device); the launchers plan for another machine."""
    cfg = load_config(config, overrides)
    check_wandb_environment(cfg.wandb)
    shards = resolve_shards(cfg.data)
    check_d_steps(cfg, steps_per_epoch(shards.total, world_size, cfg.train.batch_size))  # and a batch per process
    cfg = settle_classes(cfg, shards)
    extractor = choose_extractor(cfg.eval, cfg.data.shards, cfg.model) if cfg.eval.every else None
    room, device = UNMEASURED, None
    if on_this_machine:  # the device this process would take (DeviceError: no GPU fits), and its memory
        device = distributed.choose_device(cfg.train.device, distributed.read_env().local_rank)
        check_compile_layout(cfg, device)
        room = measure_room(device)
    cache = choose_cache(cfg.data, shards.counts, cfg.model.channels, cfg.model.image_size, world_size, room)
    warn_if_resized(shards, cfg.model.image_size)
    cfg, note = settle_start(cfg, restart)
    check_resume_setting(cfg, shards)
    finished = nothing_to_train(cfg)
    return RunPlan(cfg, shards, cache, extractor, world_size, note, on_this_machine, device, finished)


def nothing_to_train(cfg: Config) -> str | None:
    """Why this attempt would train nothing (what it resumes from is at train.steps or
    past it), and how to train further; None when there are steps left. The trainer then
    exits 0 before building anything, and the run folder stays as the run left it."""
    t = cfg.train
    if t.resume == "never":
        return None
    if t.resume == "auto":
        newest, _ = latest_valid(RunFolder.of(cfg).checkpoints)
        if newest is None:
            return None
        path, step = newest, step_of(newest)
    else:
        path = Path(t.resume)
        try:
            step = step_of(path)
        except ValueError:
            step = read_record(path).get("step")
        if not isinstance(step, int):
            return None
    if step < t.steps:
        return None
    return (
        f"run {t.name} has nothing to train: {path} is at step {step} and train.steps={t.steps}; {cfg.run_dir} "
        f"is left as it is. To train further, give the same command with train.steps=N (N > {step})"
    )


def check_compile_layout(cfg: Config, device: torch.device) -> None:
    """ConfigError for train.compile with channels_last on a GPU: inductor predicts NCHW
    strides for ConvTranspose2d's backward where cuDNN returns NHWC ones, and the first step
    dies on a stride assertion (pytorch#171622; seen with torch 2.11 on an H200,
    bench/README.md#gpus). NCHW compiles and runs there."""
    if cfg.train.compile and cfg.train.channels_last and device.type == "cuda":
        raise ConfigError(
            "train.compile: with train.channels_last=true on a GPU the first step fails (torch.compile mispredicts "
            "the layout of ConvTranspose2d's backward, pytorch#171622); add train.channels_last=false, or leave "
            "train.compile off: the CUDA graph without it is faster (bench/README.md#gpus)"
        )


def world_size_source() -> str:
    return ", from WORLD_SIZE" if os.environ.get("WORLD_SIZE") else ": WORLD_SIZE is not set"


def describe_sizes(cfg: Config) -> str:
    """Parameter counts, and the disk the run's checkpoints take (checkpoint.keep, best.pt)."""
    g_params, d_params, each = checkpoint_bytes(cfg)
    files = cfg.checkpoint.keep + (1 if cfg.eval.every and cfg.eval.best_checkpoint else 0)
    kept = f"checkpoint.keep={cfg.checkpoint.keep}" + (" + best.pt" if files > cfg.checkpoint.keep else "")
    return (
        f"G {g_params / 1e6:.2f}M and D {d_params / 1e6:.2f}M parameters; a checkpoint takes about "
        f"{file_size(each)}, {files} of them ({kept}) about {file_size(files * each)}"
    )


def file_size(n: float) -> str:
    return f"{n / 1e9:.3g} GB" if n >= 1e9 else f"{n / 1e6:.3g} MB"


def describe_device(setting: str, device: torch.device | None) -> str:
    """train.device as this process resolved it (``distributed.choose_device``), or None:
    decided on the job's machines."""
    if device is None:
        return f"train.device={setting} (decided on the job's machines)"
    return f"{device.type} (train.device={setting})"


def describe_resume(cfg: Config) -> str:
    """What an attempt would resume from, read from the run folder without loading any
    checkpoint: ``checkpoint.choose`` decides on rank 0 at start-up, and also sets aside
    one that verifies but does not load or holds non-finite values."""
    t, ckpt_dir = cfg.train, RunFolder.of(cfg).checkpoints
    existing = list_checkpoints(ckpt_dir)
    if t.resume == "never":
        if existing:  # with train.overwrite=true (check_resume_setting refuses it otherwise)
            return f"starts fresh: train.overwrite=true first wipes {cfg.run_dir} ({len(existing)} checkpoint(s))"
        return "starts fresh (train.resume=never)"
    if t.resume != "auto":
        path = Path(t.resume)
        try:
            step = step_of(path)
        except ValueError:
            step = read_record(path).get("step", "?")
        return f"{path} (step {step}; train.resume names it)" + left_to_train(step, t.steps)
    newest, rejected = latest_valid(ckpt_dir)
    skipped = ""
    if rejected:
        skipped = f"; set aside at start: {', '.join(f'{p.name} ({why})' for p, why in rejected)}"
    if newest is None:
        if existing:
            return (
                f"nothing: none of the {len(existing)} checkpoint(s) in {ckpt_dir} verifies against its record, "
                "the run would fail (train.resume=never train.overwrite=true starts again)"
            )
        return f"starts fresh (no checkpoint in {ckpt_dir})"
    return f"{newest} (step {step_of(newest)}; train.resume=auto){skipped}" + left_to_train(step_of(newest), t.steps)


def left_to_train(step: object, steps: int) -> str:
    if isinstance(step, int) and step >= steps:
        return f"; already at train.steps={steps}: nothing left to train"
    return ""


def warn_if_resized(shards: ShardSet, image_size: int) -> None:
    if shards.image_sizes and len(shards.image_sizes) > 1:  # the manifest counts several sizes
        log.warning(
            "the shards hold images of %d sizes (%s): each is resized and centre-cropped to %dx%d while training, "
            "which cuts the data pipeline's rate about 3x; resize them once instead "
            "(python -m dcgan.shards SOURCE OUT --size %d)",
            len(shards.image_sizes), ", ".join(f"{k}: {v}" for k, v in list(shards.image_sizes.items())[:4]),
            image_size, image_size, image_size,
        )  # fmt: skip
        return
    size = first_image_size(shards)
    if size is not None and size != (image_size, image_size):
        log.warning(
            "the shards hold %dx%d images and model.image_size is %d: every image is resized and centre-cropped "
            "while training, which cuts the data pipeline's rate about 3x; resize them once instead "
            "(python -m dcgan.shards SOURCE OUT --size %d, or img2dataset --image_size %d)",
            *size, image_size, image_size, image_size,
        )  # fmt: skip


def settle_start(cfg: Config, restart: int) -> tuple[Config, str | None]:
    """train.resume=never|PATH and train.overwrite act once per run folder: an attempt
    after the one that applied them (the same command after a stop, a torchrun restart,
    a Slurm requeue, a double submit) carries on from the run folder instead. The trainer
    knows from ``<run>/started_with.json`` (``dcgan/run/timelines.py``), and from the job's
    restart count should that record be missing. Returns the config to run (a copy when
    it changes) and a line saying what changed."""
    t = cfg.train
    if t.resume == "auto":
        return cfg, None
    recorded = timelines.applied_before(cfg)
    if not (recorded or restart):
        return cfg, None
    if t.resume != "never" and not RunFolder.of(cfg).list_checkpoints():
        return cfg, None  # PATH, and the run folder has saved nothing of its own yet: load PATH again
    was = f"train.resume={t.resume}" + (" train.overwrite=true" if t.overwrite and t.resume == "never" else "")
    why = f"{RunFolder.of(cfg).started_with} records it" if recorded else f"restart {restart} of this job"
    settled = copy.deepcopy(cfg)
    settled.train.resume, settled.train.overwrite = "auto", False
    return settled, (
        f"{was} acts once per run folder and was applied by an earlier attempt ({why}): this attempt carries on "
        "from the run folder's newest checkpoint (train.resume=auto)"
    )
