"""Typed run configuration: one dataclass per section, each key declared with its meaning.

Validation happens on construction (``__post_init__``); loading YAML and overrides into
these classes is dcgan/config/loading.py. ``model`` is ``ModelConfig``, declared next to
the nets it shapes (dcgan/models/networks.py), and ``d_augment`` is ``DAugmentConfig``, next
to its transforms (dcgan/models/d_augment.py).
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from dcgan.base.checks import check_field
from dcgan.models.d_augment import DAugmentConfig
from dcgan.models.losses import LossConfig
from dcgan.models.networks import ModelConfig

_CATCHABLE_SIGNALS = {s.name for s in signal.Signals} - {"SIGKILL", "SIGSTOP"}
# Signals the trainer receives while it works as it should: a child (a DataLoader worker,
# W&B's service) ending, a terminal resized, a suspended job continued, a reader of its
# output gone, urgent socket data, a job in a terminal's background writing its log there
# (stty tostop) or touching the terminal. As stop signals they would stop every attempt,
# and a requeuing launcher would requeue it forever.
_SIGNALS_OF_NORMAL_WORK = {"SIGCHLD", "SIGCLD", "SIGWINCH", "SIGCONT", "SIGPIPE", "SIGURG", "SIGTTIN", "SIGTTOU"}
# Signals of a fault in the process itself: a handler cannot make the process go on.
_FAULT_SIGNALS = {"SIGSEGV", "SIGBUS", "SIGFPE", "SIGILL", "SIGABRT", "SIGIOT", "SIGSYS", "SIGTRAP"}
# A zoom outside this turns every image blank or into one flat pixel: below 0.01 a 64-pixel
# image shrinks under one pixel, above 100 one pixel fills it (and past float32's range
# the factor becomes 0 or inf, a NaN sampling grid).
SCALE_RANGE = (0.01, 100.0)
SEED_RANGE = (0, 2**63 - 1)  # torch.manual_seed takes any 64-bit value; the data order's derived seeds need 63 bits


def check_finite(value: float, key: str) -> None:
    check_field(math.isfinite(value), key, f"must be a finite number, not {value!r}")


def check_seed(value: int, key: str) -> None:
    check_field(SEED_RANGE[0] <= value <= SEED_RANGE[1], key, f"must lie in 0..2**63-1, not {value}")


def check_path(value: str, key: str) -> None:
    """A setting that names a file or folder: the OS takes no path with a NUL in it."""
    check_field("\0" not in value, key, f"{value!r} is not a path: it holds a NUL character")


def check_run_name(name: str, key: str = "name") -> None:
    """A run name is one folder inside train.out_dir: "." or ".." would make the run folder
    out_dir itself or its parent, and train.overwrite would wipe every run there."""
    check_field(
        name not in (".", ".."), key, f"{name!r} is not a folder name (the run folder would be out_dir or above)"
    )
    bad = sorted(c for c in {"/", os.sep, os.altsep or "/", "\0"} if c in name)
    check_field(not bad, key, f"{name!r} must be one folder name, without {' or '.join(map(repr, bad))}")
    size = len(os.fsencode(name))  # as the OS gets it: a command line's undecodable bytes count as themselves
    check_field(size <= 255, key, f"must fit a file name: at most 255 bytes, not {size}")


# --------------------------------------------------------------------------- sections


@dataclass
class AugmentConfig:
    """Per-sample augmentation, drawn per batch on the training device (dcgan/data/augment.py)."""

    hflip: bool = False  # random horizontal flip with probability 0.5
    degrees: float = 0.0  # affine rotation drawn from [-degrees, degrees]
    translate: tuple[float, float] = (0.0, 0.0)  # max shift as a fraction of width, height
    scale: tuple[float, float] = (1.0, 1.0)  # zoom factor drawn from [lo, hi], both within [0.01, 100]
    shear: float = 0.0  # x shear in degrees drawn from [-shear, shear]

    def __post_init__(self) -> None:
        # Beyond these every image turns black or degenerate: a shear of 90 degrees is an
        # infinite slope, an infinite zoom or angle a NaN sampling grid.
        check_field(0 <= self.degrees <= 180, "degrees", f"must lie in [0, 180], not {self.degrees!r}")
        check_field(all(0 <= t < 1 for t in self.translate), "translate", "fractions must lie in [0, 1)")
        check_field(all(map(math.isfinite, self.scale)), "scale", f"must be finite numbers, not {list(self.scale)}")
        check_field(0 < self.scale[0] <= self.scale[1], "scale", "needs 0 < lo <= hi")
        lo, hi = SCALE_RANGE
        check_field(
            all(lo <= s <= hi for s in self.scale),
            "scale",
            f"each bound must lie in [{lo}, {hi:g}], not {list(self.scale)}",
        )
        check_field(0 <= self.shear < 90, "shear", f"must lie in [0, 90), not {self.shear!r}")

    @property
    def affine(self) -> bool:
        return (self.degrees, self.translate, self.scale, self.shear) != (0.0, (0.0, 0.0), (1.0, 1.0), 0.0)


@dataclass
class DataConfig:
    """Where the training images come from and how they are read."""

    # A folder of .tar shards (written by `python -m dcgan.shards`, img2dataset or any
    # webdataset writer), a brace pattern such as "data/x/shard-{000000..000009}.tar", or
    # "pipe:" URLs. Per-shard counts: dcgan/data/shardset.py.
    shards: str = ""
    # Samples in each shard, for shards with no manifest.json and no writer's records
    # (pipe: URLs); the reader reports every shard that holds another count.
    samples_per_shard: int = 0
    workers: int = 2  # DataLoader worker processes per rank (0: read in the training process)
    shuffle_buffer: int = 1000  # samples held by each worker's shuffle buffer
    # Hold the whole set decoded, as uint8, on the training device (GPU memory under CUDA,
    # RAM on the CPU, one copy per process) and draw every batch from it: no decoding
    # after the first pass, no worker processes (dcgan/data/cache.py). auto: when it fits
    # cache_max_gb and the machine (the device, the RAM the build gathers in, /dev/shm for
    # the decoding workers); on: always (exit 2 when it cannot fit); off: read the shards every epoch.
    cache: Literal["auto", "on", "off"] = "auto"
    # auto's limit: GB of uint8 pixels (CelebA at 64x64 is 2.5), or auto: half the free
    # memory of the process's GPU under CUDA, what the RAM holds on the CPU.
    cache_max_gb: float | Literal["auto"] = "auto"
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        check_path(self.shards, "shards")
        check_field(self.samples_per_shard >= 0, "samples_per_shard", "must be >= 0")
        check_field(self.workers >= 0, "workers", "must be >= 0")
        check_field(self.shuffle_buffer >= 1, "shuffle_buffer", "must be >= 1")
        check_field(
            self.cache_max_gb == "auto" or 0 <= self.cache_max_gb < math.inf,
            "cache_max_gb",
            "must be >= 0 and finite, or auto",
        )


@dataclass
class AdamConfig:
    """Adam settings of one network."""

    lr: float = 2e-4  # learning rate
    betas: tuple[float, float] = (0.5, 0.999)  # Adam's (beta1, beta2); DCGAN's beta1 is 0.5
    weight_decay: float = 0.0  # L2 penalty added to the gradients (Adam's, not AdamW's)

    def __post_init__(self) -> None:
        check_field(0 < self.lr < math.inf, "lr", f"must be > 0 and finite, not {self.lr!r}")
        check_field(all(0 <= b < 1 for b in self.betas), "betas", "must lie in [0, 1)")
        check_field(0 <= self.weight_decay < math.inf, "weight_decay", "must be >= 0 and finite")


@dataclass
class OptimConfig:
    g: AdamConfig = field(default_factory=AdamConfig)  # Adam settings of the generator
    d: AdamConfig = field(default_factory=AdamConfig)  # Adam settings of the discriminator
    # One-sided label smoothing (Salimans et al. 2016): D's target for real images is
    # 1 - label_smoothing; fakes stay at 0 and G's target stays 1.
    label_smoothing: float = 0.0
    # Adam's fused kernel: one kernel per step for all of a net's parameters, and under
    # fp16 no host sync for the overflow check. false: torch's default implementation
    # (foreach on CUDA, a per-parameter loop on the CPU). bench/throughput.py --ablate.
    fused: bool = True
    # D updates per G update, each on a batch of its own (WGAN-GP used 5): a step reads
    # d_steps batches, and an epoch's last batches that cannot fill a step are skipped.
    d_steps: int = 1

    def __post_init__(self) -> None:
        check_field(0 <= self.label_smoothing < 0.5, "label_smoothing", "must lie in [0, 0.5)")
        check_field(self.d_steps >= 1, "d_steps", f"must be >= 1 (D updates per G update), not {self.d_steps}")


@dataclass
class TrainConfig:
    name: str = ""  # run name; default: the config file's stem. Run folder: out_dir/name
    out_dir: str = "runs"  # the folder that holds the run folders
    steps: int = 1000  # optimisation steps (one D update + one G update each)
    batch_size: int = 128  # per process; the global batch is batch_size x world size
    precision: Literal["bf16", "fp16", "fp32"] = "fp32"  # autocast dtype; fp16 adds grad scaling
    # TensorFloat-32 on GPUs, for what stays float32 (all of fp32, BN and the loss under
    # bf16): default: torch's (convolutions in TF32, matrix products in full float32);
    # on: both TF32; off: both full float32. The start-up log says which.
    tf32: Literal["default", "on", "off"] = "default"
    # NHWC memory layout for the conv nets' weights, activations and input batches: the
    # layout oneDNN (CPU) and tensor cores (GPU) run fastest; the maths is unchanged.
    channels_last: bool = True
    # torch.compile G and D (compiled on the first steps; D once more for its frozen G-step
    # pass; the log counts the graphs). On GPUs it needs channels_last=false and measured
    # slower than train.cuda_graph alone (bench/README.md#gpus).
    compile: bool = False
    # Capture the whole step (both D passes and updates, G's step, the EMA update, the
    # statistics) as one CUDA graph after a few eager steps and replay it: one launch instead
    # of hundreds (dcgan/training/step.py). auto: on CUDA under bf16 or fp32 without
    # train.compile; on: with train.compile too. fp16 and the CPU always run eagerly.
    cuda_graph: Literal["auto", "on", "off"] = "auto"
    seed: int = 0  # seeds init, latents, augmentation and the data order (each rank derives its own)
    sync_bn: bool = True  # SyncBatchNorm when world size > 1
    # auto: cuda when available. A process takes cuda:LOCAL_RANK when it sees all of the
    # node's GPUs, cuda:0 when it sees one (one GPU per task); other counts exit 2.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # A process group (DDP, SyncBN; NCCL on GPUs): auto: with several processes;
    # always: with one too, so a one-GPU machine runs the multi-GPU code path.
    distributed: Literal["auto", "always"] = "auto"
    # "auto": continue from the newest valid checkpoint in the run folder if there is one;
    # "never": start fresh; anything else: a checkpoint file to start from.
    resume: str = "auto"
    # With resume "never": wipe a run folder that already holds checkpoints (otherwise refused).
    overwrite: bool = False
    # Resuming a checkpoint trained on other shards (other names or counts): "refuse"
    # (exit 2, saying what changed) or "continue" (the epoch in progress goes on at the
    # same fraction under the new data's plan, with a warning).
    data_changed: Literal["refuse", "continue"] = "refuse"
    # Signals that mean "checkpoint and stop" (Slurm sends SIGTERM at the time limit and
    # the signal of --signal=... before it; SIGINT is Ctrl-C, and a second Ctrl-C while the
    # checkpoint is written ends the process at once). Exit code then:
    # dcgan.base.exits.EXIT_PREEMPTED, also when the signal comes during start-up.
    stop_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2"])
    # Ranks compare stop requests every N steps (one tiny host-side all-reduce); a signal
    # is acted on at most N steps late.
    stop_check_every: int = 1
    # Divergence: log intervals in a row whose losses or gradient norms are not finite
    # before the run stops (exit 1, status "diverged"). Non-finite weights stop it at once,
    # and no checkpoint holding a non-finite tensor is ever written. Under fp16 only the
    # weights count: the grad scaler skips overflowing steps by design.
    divergence_patience: int = 1

    def __post_init__(self) -> None:
        check_field(self.steps >= 1, "steps", "must be >= 1")
        check_field(self.batch_size >= 1, "batch_size", "must be >= 1")
        if self.name:  # "" until load_config names the run after the config file
            check_run_name(self.name)
        check_path(self.out_dir, "out_dir")
        check_path(self.resume, "resume")
        check_seed(self.seed, "seed")
        check_field(self.stop_check_every >= 1, "stop_check_every", "must be >= 1")
        check_field(self.divergence_patience >= 1, "divergence_patience", "must be >= 1")
        for name in self.stop_signals:
            check_field(
                name in _CATCHABLE_SIGNALS,
                "stop_signals",
                f"{name!r} is not a signal name a process can catch (e.g. SIGTERM, SIGUSR1, SIGUSR2)",
            )
            check_field(
                name not in _SIGNALS_OF_NORMAL_WORK,
                "stop_signals",
                f"{name} reaches the trainer while it works as it should (child processes, terminals, pipes): "
                "every attempt would stop",
            )
            check_field(name not in _FAULT_SIGNALS, "stop_signals", f"{name} means the process itself failed")


@dataclass
class LogConfig:
    every: int = 50  # a metrics line every N steps
    samples_every: int = 500  # a grid of G(fixed noise) every N steps (and at the end)
    num_samples: int = 64  # images in that grid

    def __post_init__(self) -> None:
        for name in ("every", "samples_every", "num_samples"):
            check_field(getattr(self, name) >= 1, name, "must be >= 1")


# Characters W&B refuses in project names, and its longest project name.
_WANDB_PROJECT_FORBIDDEN = set("/\\#?%:")
_WANDB_PROJECT_MAX = 128


@dataclass
class WandbConfig:
    """Weights & Biases (rank 0 only). The run folder gets metrics, grids, a loss plot and a
    summary whatever the mode; W&B's own files go to <run folder>/wandb/."""

    # "auto": $WANDB_MODE when set (and not empty), else the mode in wandb's settings file
    # (`wandb offline`), else online wherever wandb finds a login ($WANDB_API_KEY,
    # $WANDB_IDENTITY_TOKEN_FILE, a netrc entry for the W&B host, an api_key setting),
    # else offline. An online run that cannot reach the server within init_timeout goes on offline.
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    project: str = ""  # W&B project (at most 128 characters, none of / \ # ? % :); "": $WANDB_PROJECT, else "dcgan"
    entity: str = ""  # team or user; "": $WANDB_ENTITY, else the login's default entity
    group: str = ""  # groups related runs in the UI (launch.sweep sets the sweep's name); "": $WANDB_RUN_GROUP
    name: str = ""  # display name; "": $WANDB_NAME, else train.name
    tags: list[str] = field(default_factory=list)  # labels on the run (1 to 64 characters each); []: $WANDB_TAGS
    notes: str = ""  # free text shown with the run in the UI; "": $WANDB_NOTES
    init_timeout: float = 90.0  # seconds to wait for the W&B server when online

    def __post_init__(self) -> None:
        bad = sorted(_WANDB_PROJECT_FORBIDDEN & set(self.project))
        check_field(not bad, "project", f"W&B project names cannot contain {' '.join(bad)}")
        check_field(
            len(self.project) <= _WANDB_PROJECT_MAX,
            "project",
            f"W&B project names have at most {_WANDB_PROJECT_MAX} characters, not {len(self.project)}",
        )
        check_field(all(0 < len(t) <= 64 for t in self.tags), "tags", "each tag needs 1 to 64 characters")
        check_field(0 < self.init_timeout < math.inf, "init_timeout", "must be > 0 and finite")


@dataclass
class CheckpointConfig:
    every: int = 1000  # a checkpoint every N steps (and at the end)
    keep: int = 3  # newest checkpoints kept in the run folder

    def __post_init__(self) -> None:
        check_field(self.every >= 1, "every", "must be >= 1")
        check_field(self.keep >= 1, "keep", "must be >= 1")


@dataclass
class EvalConfig:
    """Sample quality (FID, KID, precision/recall) measured while training, on all ranks,
    on the EMA generator in eval mode (G when model.ema_decay is 0). See dcgan/eval.py."""

    every: int = 0  # evaluate every N steps and at the end; 0: never
    # The feature extractor: a classifier features file made by `python -m dcgan.eval
    # train-features` (it holds the real-set features). This and eval.inception both
    # empty: <data.shards>/features.pt, when it exists.
    features: str = ""
    # Or Inception-v3 FID weights (TorchScript or state dict; real features are then read
    # from data.shards). Set eval.features or eval.inception, not both.
    inception: str = ""
    num_samples: int = 5000  # generated images per evaluation, split over the ranks
    num_real: int = 10000  # real images compared against (at most those the features file holds)
    batch_size: int = 250  # images per forward pass of G and of the extractor, per rank
    seed: int = 0  # the latents of an evaluation: the same images at every evaluation
    best_checkpoint: bool = True  # keep checkpoints/best.pt: the state with the lowest FID so far

    def __post_init__(self) -> None:
        check_field(self.every >= 0, "every", "must be >= 0 (0: no evaluation while training)")
        check_seed(self.seed, "seed")
        check_path(self.features, "features")
        check_path(self.inception, "inception")
        for name in ("num_samples", "num_real", "batch_size"):
            check_field(getattr(self, name) >= 2, name, "must be >= 2")
        check_field(
            not (self.features and self.inception), "inception", "set eval.features or eval.inception, not both"
        )


class ConfigSource(typing.NamedTuple):
    """Where ``load_config`` took a config from: the file (None: the defaults) and the
    ``a.b=value`` overrides applied after it, in order."""

    file: str | None
    overrides: tuple[str, ...]


@dataclass
class Config:
    """A run's settings. Every field of every section needs its meaning as a comment beside
    it (or just above): ``describe_keys`` turns them into ``python -m dcgan.train --help``,
    and tests/e2e/test_cli.py fails for a key without one."""

    # Not a setting (a class attribute: not in to_dict() nor config.yaml): load_config sets
    # it on the config it returns; dcgan/tracking/provenance.py records it.
    source: typing.ClassVar[ConfigSource] = ConfigSource(None, ())

    data: DataConfig = field(default_factory=DataConfig)  # Where the training images come from and how they are read
    model: ModelConfig = field(
        default_factory=ModelConfig
    )  # Which reference net (dcgan/models/networks.py), at which widths and image size
    optim: OptimConfig = field(default_factory=OptimConfig)  # The optimisers
    loss: LossConfig = field(default_factory=LossConfig)  # What D and G minimise, and D's gradient penalties
    d_augment: DAugmentConfig = field(
        default_factory=DAugmentConfig
    )  # Augmentation of every image D sees (DiffAugment, ADA), for small data sets
    train: TrainConfig = field(default_factory=TrainConfig)  # The run: its folder, length, batch, precision, resume
    log: LogConfig = field(default_factory=LogConfig)  # Metrics lines and sample grids
    wandb: WandbConfig = field(default_factory=WandbConfig)  # Weights & Biases, from rank 0
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)  # Checkpoints in <run folder>/checkpoints/
    eval: EvalConfig = field(default_factory=EvalConfig)  # Sample quality (FID, KID, precision/recall) while training

    def __post_init__(self) -> None:
        """Checks that span sections."""
        check_field(
            self.optim.label_smoothing == 0 or self.loss.kind in ("bce", "lsgan"),
            "optim.label_smoothing",
            f"{self.optim.label_smoothing:g} smooths the real target of bce and lsgan; loss.kind={self.loss.kind} has "
            "no target to smooth (set optim.label_smoothing=0)",
        )

    @property
    def run_dir(self) -> Path:
        return Path(self.train.out_dir) / self.train.name

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (lists for tuples): goes into YAML files and checkpoints."""
        return plain(dataclasses.asdict(self))


def plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    return obj


def type_name(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return "|".join(map(str, args))
    if origin is list:
        return f"list[{type_name(args[0])}]"
    if origin is tuple:
        return "[" + ", ".join(map(type_name, args)) + "]"
    if origin in (typing.Union, types.UnionType):
        return "|".join("null" if a is type(None) else type_name(a) for a in args)
    return hint.__name__
