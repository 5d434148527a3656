"""Typed run configuration: one dataclass per section, YAML (safe loader) + ``a.b=value``.

``load_config(path, overrides)`` is the only way a run gets its settings, so every key a
user can set is declared below with its meaning. Validation happens on construction
(``__post_init__``) and the loader turns every mistake into a ``ConfigError`` that names
the key and the file; ``dcgan.train`` prints it and exits with code 2 before any work.

Why not OmegaConf / pydantic: the coercion we need (YAML scalars and ``a.b=value``
strings into the annotated types, unknown keys rejected) is ~80 lines here, and owning it
keeps the error text in one format: ``<file>: <key>: <problem>``.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import math
import os
import re
import signal
import textwrap
import tokenize
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from dcgan.checks import ConfigError, FieldError, check_field
from dcgan.models import ModelConfig


class Scalar(typing.NamedTuple):
    """A plain YAML scalar that YAML reads as something other than a string (``1.10``,
    ``0755``, ``12:30``, ``yes``): its value and the text it was written as. A setting
    typed ``str`` takes the text, so ``train.name=1.10`` names the run ``1.10``."""

    value: Any
    text: str


class _TextKeepingLoader(yaml.SafeLoader):
    """yaml.SafeLoader, except that plain scalars read as numbers, booleans or dates come
    back as ``Scalar`` (value and source text)."""

    def construct_object(self, node, deep=False):
        value = super().construct_object(node, deep)
        plain = isinstance(node, yaml.ScalarNode) and node.style is None
        if plain and value is not None and not isinstance(value, str):
            return Scalar(value, node.value)
        return value


def read_yaml(text: str) -> Any:
    """Parse YAML (safe: no arbitrary objects) keeping the text of non-string scalars (``Scalar``)."""
    return yaml.load(text, Loader=_TextKeepingLoader)


def yaml_problem(error: yaml.YAMLError, text: str, locate: bool = True) -> str:
    """What YAML refused in ``text``, as one line (``locate``: with its line and column).
    PyYAML's own message spans lines (the offending line copied, a caret under the column)."""
    if isinstance(error, yaml.reader.ReaderError):
        code = ord(error.character) if isinstance(error.character, str) else error.character
        # Python keeps a command line's undecodable bytes as lone surrogates U+DC80..U+DCFF
        undecodable = 0xDC80 <= code <= 0xDCFF
        what = f"byte 0x{code - 0xDC00:02x} is not UTF-8" if undecodable else f"character U+{code:04X} is not allowed"
        return f"line {text[: error.position].count(chr(10)) + 1}: {what}" if locate else what
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    context = getattr(error, "context", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if locate and mark is not None else ""
    return where + problem + (f" ({context})" if context else "")


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
    """Per-sample augmentation, drawn per batch on the training device (dcgan/augment.py)."""

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
    # "pipe:" URLs. Per-shard counts: dcgan/shardset.py.
    shards: str = ""
    # Samples in each shard, for shards with no manifest.json and no writer's records
    # (pipe: URLs); the reader reports every shard that holds another count.
    samples_per_shard: int = 0
    workers: int = 2  # DataLoader worker processes per rank (0: read in the training process)
    shuffle_buffer: int = 1000  # samples held by each worker's shuffle buffer
    # Hold the whole set decoded, as uint8, on the training device (GPU memory under CUDA,
    # RAM on the CPU, one copy per process) and draw every batch from it: no decoding
    # after the first pass, no worker processes (dcgan/cache.py). auto: when it fits
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

    def __post_init__(self) -> None:
        check_field(0 <= self.label_smoothing < 0.5, "label_smoothing", "must lie in [0, 0.5)")


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
    # of hundreds (dcgan/train_step.py). auto: on CUDA under bf16 or fp32 without
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
    # dcgan.exits.EXIT_PREEMPTED, also when the signal comes during start-up.
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
    and tests/test_cli.py fails for a key without one."""

    # Not a setting (a class attribute: not in to_dict() nor config.yaml): load_config sets
    # it on the config it returns; dcgan/provenance.py records it.
    source: typing.ClassVar[ConfigSource] = ConfigSource(None, ())

    data: DataConfig = field(default_factory=DataConfig)  # Where the training images come from and how they are read
    model: ModelConfig = field(default_factory=ModelConfig)  # Which reference net (dcgan/models.py), at which widths
    optim: OptimConfig = field(default_factory=OptimConfig)  # The optimisers and the loss
    train: TrainConfig = field(default_factory=TrainConfig)  # The run: its folder, length, batch, precision, resume
    log: LogConfig = field(default_factory=LogConfig)  # Metrics lines and sample grids
    wandb: WandbConfig = field(default_factory=WandbConfig)  # Weights & Biases, from rank 0
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)  # Checkpoints in <run folder>/checkpoints/
    eval: EvalConfig = field(default_factory=EvalConfig)  # Sample quality (FID, KID, precision/recall) while training

    @property
    def run_dir(self) -> Path:
        return Path(self.train.out_dir) / self.train.name

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (lists for tuples): goes into YAML files and checkpoints."""
        return _plain(dataclasses.asdict(self))


# --------------------------------------------------------------------------- loading


OVERRIDE = "override"  # how errors in an a.b=value override begin: they name it, not the config file


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config, apply ``a.b=value`` overrides, validate; raise ConfigError."""
    raw: dict[str, Any] = {}
    where = "<defaults>"
    if path is not None:
        where = str(path)
        text = read_utf8(Path(path), "config")
        try:
            raw = read_yaml(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{where}: not valid YAML: {yaml_problem(e, text)}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: top level must be a mapping of sections")
    overridden = {}  # dotted key -> the override that set it: errors on that key name the override, not the file
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{OVERRIDE} {item!r} is not of the form a.b=value")
        try:
            parsed = read_yaml(value) if value.strip() else ""
        except yaml.YAMLError as e:
            problem = yaml_problem(e, value, locate=False)
            raise ConfigError(f"{OVERRIDE} {item!r}: not a valid YAML value ({problem})") from None
        _set_dotted(raw, key.strip(), parsed, f"{OVERRIDE} {item!r}")
        overridden[key.strip()] = item
    try:
        cfg = _build(Config, raw, "")
    except ConfigError as e:
        blamed = next((item for key, item in overridden.items() if str(e).startswith(f"{key}:")), None)
        raise ConfigError(f"{OVERRIDE} {blamed!r}: {e}" if blamed else f"{where}: {e}") from None
    if not cfg.train.name:
        cfg.train.name = Path(path).stem if path is not None else "run"
        try:
            check_run_name(cfg.train.name, "train.name")
        except ConfigError as e:
            raise ConfigError(f"{where}: {e} (the config file's name; set train.name)") from None
    cfg.source = ConfigSource(None if path is None else str(path), tuple(overrides))
    return cfg


def read_utf8(path: Path, what: str) -> str:
    """A settings file's text; ConfigError naming the file when it cannot be read or is not
    UTF-8 (with the first bad byte and its line)."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read {what}: {e.strerror}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ConfigError(
            f"{path}: not UTF-8 text (byte 0x{data[e.start]:02x} on line {line}); save it as UTF-8"
        ) from None


def build_section(cls: type, raw: Any, where: str, prefix: str = "") -> Any:
    """A config dataclass from a mapping with the same coercion and checks as the run
    config (the launchers' options use it); errors read ``<where>: <prefix><key>: ...``."""
    try:
        return _build(cls, raw, prefix)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def config_yaml(cfg: Config) -> str:
    """The resolved config as YAML: what the run folder's config.yaml holds, and what
    ``load_config`` reads back to the same config."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def save_config(cfg: Config, path: Path) -> None:
    path.write_text(config_yaml(cfg))


def _set_dotted(raw: dict, key: str, value: Any, where: str) -> None:
    node = raw
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{where}: {'.'.join(parts[: i + 1])}: is a value, not a section")
        node = child
    node[parts[-1]] = value


def _build(cls: type, raw: Any, prefix: str) -> Any:
    """Build dataclass ``cls`` from a mapping, coercing each field to its annotation."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or '<top>'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            known = ", ".join(sorted(names))
            raise ConfigError(f"{prefix}{key}: unknown key (known here: {known})")
    kwargs = {}
    for name in names:
        if name in raw:
            kwargs[name] = _coerce(raw[name], hints[name], f"{prefix}{name}")
    try:
        return cls(**kwargs)
    except FieldError as e:
        raise ConfigError(f"{prefix}{e.key}: {e.problem}") from None


def _coerce(value: Any, hint: Any, key: str) -> Any:
    raw, text = value, None
    if isinstance(value, Scalar):
        value, text = value
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value if value is not None else {}, key + ".")
    if origin is Literal:
        choices = typing.get_args(hint)
        if text in choices:  # as written: YAML 1.1 reads `cache: on` as true
            return text
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, choices))}")
        return value
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(raw, hint, key)
    if origin is list:
        (arg,) = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, arg, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if hint is str:
        if text is not None:  # as written: "1.10", not 1.1
            return text
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise TypeError(f"unsupported config annotation {hint!r} for {key}")  # a bug here, not user input


def _coerce_union(raw: Any, hint: Any, key: str) -> Any:
    """The first member of a union that takes the value (``float | Literal["auto"]``: a
    number, else auto), given as written (``Scalar``), so each member reads it its way."""
    for member in typing.get_args(hint):
        if member is type(None):
            if raw is None:
                return None
            continue
        try:
            return _coerce(raw, member, key)
        except ConfigError:
            pass
    value = raw.value if isinstance(raw, Scalar) else raw
    raise ConfigError(f"{key}: expected {_type_name(hint)}, got {value!r}")


# --------------------------------------------------------------------------- the keys, for --help


class KeyHelp(typing.NamedTuple):
    """One setting as ``--help`` lists it."""

    key: str  # dotted, e.g. "train.batch_size"
    section: str  # e.g. "data.augment"
    type: str  # as written in YAML: int, float, bool, str, [float, float], list[str], auto|on|off, float|auto
    default: str  # the default as YAML (flow style)
    meaning: str  # the comment beside the field ("": none, which tests/test_cli.py rejects)


def describe_keys(cls: type | None = None, prefix: str = "") -> list[KeyHelp]:
    """Every key of the run config (of ``cls``, under ``prefix``), in the YAML file's
    order, a section's own keys before its subsections'. The meanings are the comments
    beside the fields in the source, so the help cannot drift from the code."""
    cls = cls or Config
    hints, comments = typing.get_type_hints(cls), field_comments(cls)
    defaults = _plain(dataclasses.asdict(cls()))
    keys, subsections = [], []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            subsections.append(f.name)
            continue
        keys.append(
            KeyHelp(prefix + f.name, prefix.rstrip("."), _type_name(hints[f.name]), _yaml_flow(defaults[f.name]),
                    comments.get(f.name, ""))
        )  # fmt: skip
    for name in subsections:
        keys += describe_keys(hints[name], f"{prefix}{name}.")
    return keys


def describe_sections(cls: type | None = None, prefix: str = "") -> dict[str, str]:
    """Every section ("data", "data.augment", ...) and its heading: the comment beside the
    field that holds it, else the first line of its class's docstring."""
    cls = cls or Config
    hints, comments = typing.get_type_hints(cls), field_comments(cls)
    found = {}
    for f in dataclasses.fields(cls):
        sub = hints[f.name]
        if dataclasses.is_dataclass(sub):
            doc = (sub.__doc__ or "").strip()
            doc = "" if doc.startswith(sub.__name__ + "(") else doc  # dataclass's generated signature
            found[prefix + f.name] = comments.get(f.name) or " ".join(doc.split("\n\n")[0].split())
            found.update(describe_sections(sub, f"{prefix}{f.name}."))
    return found


def format_keys(keys: list[KeyHelp], sections: dict[str, str], width: int = 100) -> str:
    """The keys as a reference, one block per section: ``  key  type  default  meaning``
    (the meaning wrapped under its column; below the row when the row is long)."""
    blocks = []
    for section, heading in sections.items():
        rows = [k for k in keys if k.section == section]
        if not rows:
            continue
        kw = max(len(k.key) for k in rows)
        tw = max((len(k.type) for k in rows if len(k.type) <= 16), default=0)
        dw = max((len(k.default) for k in rows if len(k.default) <= 12), default=0)
        column = 2 + kw + 2 + tw + 2 + dw + 2
        lines = [f"{section}.  {heading}"]
        for k in rows:
            fits = len(k.type) <= tw and len(k.default) <= dw and column <= width - 30
            head = f"  {k.key:<{kw}}  {k.type:<{tw}}  {k.default:<{dw}}"
            if not fits:
                head = f"  {k.key}  {k.type}  {k.default}"
            indent = column if fits else min(column, 8)
            wrapped = textwrap.wrap(k.meaning or "(no meaning: document it in dcgan/config.py)", width - indent)
            if fits:
                lines.append(f"{head}  {wrapped[0]}")
                wrapped = wrapped[1:]
            else:
                lines.append(head)
            lines += [" " * indent + text for text in wrapped]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def keys_help(width: int = 100) -> str:
    """Every key of the run config, by section: the reference ``dcgan.train --help`` ends with."""
    return format_keys(describe_keys(), describe_sections(), width)


_PRAGMA = re.compile(r"#\s*(fmt|noqa|type|pragma)\b")


@functools.cache
def field_comments(cls: type) -> dict[str, str]:
    """The meaning of each field of dataclass ``cls``, from its source: the comment lines
    just above the field, then the comment on its own line(s), as one line of text
    ({} where the source is not installed: the help then lacks meanings, nothing else)."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    lines = source.splitlines()
    comments = {
        tok.start[0]: tok.string
        for tok in tokenize.generate_tokens(io.StringIO(source).readline)
        if tok.type == tokenize.COMMENT and not _PRAGMA.match(tok.string)
    }
    (node,) = ast.parse(source).body
    found = {}
    for item in node.body:
        if not (isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)):
            continue
        above, n = [], item.lineno - 1
        while n >= 1 and lines[n - 1].lstrip().startswith("#"):
            above.insert(0, comments.get(n, ""))
            n -= 1
        beside = [comments[i] for i in range(item.lineno, item.end_lineno + 1) if i in comments]
        text = " ".join(c.lstrip("#").strip() for c in above + beside)
        found[item.target.id] = " ".join(text.split())
    return found


def _type_name(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return "|".join(map(str, args))
    if origin is list:
        return f"list[{_type_name(args[0])}]"
    if origin is tuple:
        return "[" + ", ".join(map(_type_name, args)) + "]"
    if origin in (typing.Union, types.UnionType):
        return "|".join("null" if a is type(None) else _type_name(a) for a in args)
    return hint.__name__


def _yaml_flow(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 16).strip()
    return text.removesuffix("...").strip()  # a lone scalar ends the document with "..."


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj
