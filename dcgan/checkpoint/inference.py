"""A trained generator from Python: ``from dcgan import load_generator``.

    from dcgan import load_generator
    G = load_generator("runs/fashion-mnist")        # best.pt if the run has one, else its newest checkpoint
    images = G.sample(16, seed=0)                    # uint8 (16, C, H, W), the same for the same seed
    images = G.sample(seeds="0-99", truncation=0.7)  # one image per seed (dcgan.generate --seeds's PNGs)
    images = G.sample(16, seed=0, labels=3)          # a conditional model's: all of class 3 (G.num_classes)
    G.config.model, G.step                           # how it was trained, and when it was saved

The checkpoint is read with ``torch.load(weights_only=True)`` onto the CPU, whatever
device wrote it; ``device`` moves the generator afterwards. ``dcgan.generate`` loads
through here too.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from pathlib import Path
from typing import Iterable, Sequence

import torch
from torch import nn

from dcgan.base.checks import ConfigError
from dcgan.base.images import to_uint8
from dcgan.checkpoint import files
from dcgan.config.loading import build_section
from dcgan.config.sections import Config
from dcgan.models.conditional import ConditionalGenerator, check_labels, random_labels, seed_labels
from dcgan.models.latents import check_seeds, check_truncation, draw, seed_latents
from dcgan.models.networks import ModelConfig

log = logging.getLogger(__name__)

WEIGHTS = ("ema", "raw")  # the moving average of G, or G itself
# Spellings of WEIGHTS the command lines (dcgan.generate, dcgan.eval --weights) still take, with a warning.
OLD_WEIGHTS = {"g": "raw"}


def weights_option(value: str, option: str = "--weights") -> str:
    """A command line's ``--weights`` value in WEIGHTS' spelling; an old one (OLD_WEIGHTS)
    is taken with a one-line warning."""
    if value in OLD_WEIGHTS:
        log.warning("%s %s is deprecated: use %s %s", option, value, option, OLD_WEIGHTS[value])
        return OLD_WEIGHTS[value]
    return value


class Generator(nn.Sequential):
    """A trained generator: the run's layer list (``G(z)`` maps latents (B, nz, 1, 1) to
    images in [-1, 1], and ``G.state_dict()`` has the checkpoint's keys), in eval mode,
    with where it came from. A class-conditional one (``model.conditional``) holds its
    ``embed`` and ``net`` instead, and is called ``G(z, labels)``, labels int64 classes
    (B,) in 0..num_classes-1 (dcgan/models/conditional.py).

    Attributes: ``config`` (the run's ``Config``; a ``ModelConfig`` alone when the
    checkpoint's config no longer builds with this code), ``model_config`` (its
    ``ModelConfig`` either way), ``step`` (the step it was saved at), ``path`` (the
    checkpoint file), ``weights`` ("ema" or "raw": what was loaded, after any fallback),
    ``last_seed`` (the seed of the latest ``sample()`` or ``latents()``; None after one
    with ``seeds=``), ``conditional`` and ``num_classes`` (0 for an unconditional one).
    Classes are indices: the names are the shards manifest's ``classes``, in that order,
    which the checkpoint does not hold."""

    def __init__(self, net: nn.Module, config: Config | ModelConfig, step: int, path: Path, weights: str):
        if isinstance(net, ConditionalGenerator):
            super().__init__(OrderedDict(net.named_children()))  # "embed" and "net": the checkpoint's keys
        else:
            super().__init__(*net)  # the same layers under the same names: "0.weight", ...
        self.config, self.step, self.path, self.weights = config, step, path, weights
        self.last_seed: int | None = None

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if not self.conditional:
            if labels is not None:
                raise ValueError(f"{self.path}: an unconditional generator takes no labels")
            return super().forward(z)
        if labels is None:
            raise ValueError(f"{self.path}: a class-conditional generator: call it G(z, labels)")
        return ConditionalGenerator.forward(self, z, labels)  # its embed and net, under the same names

    def __getitem__(self, idx):  # a slice is a plain nn.Sequential of those layers
        if isinstance(idx, slice):
            return nn.Sequential(OrderedDict(list(self._modules.items())[idx]))
        return super().__getitem__(idx)

    @property
    def model_config(self) -> ModelConfig:
        return self.config if isinstance(self.config, ModelConfig) else self.config.model

    @property
    def nz(self) -> int:
        return self.model_config.nz

    @property
    def conditional(self) -> bool:
        return self.model_config.conditional

    @property
    def num_classes(self) -> int:
        """The classes of a conditional generator (labels 0..num_classes-1); 0 for an unconditional one."""
        return self.model_config.num_classes if self.conditional else 0

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def latents(
        self,
        n: int | None = None,
        seed: int | None = None,
        *,
        seeds: Iterable[int] | str | None = None,
        truncation: float | None = None,
    ) -> torch.Tensor:
        """Latents (n, nz, 1, 1) on the CPU, as ``dcgan.generate`` draws them, from local
        ``torch.Generator``s: the global RNG is never drawn from.

        ``n`` and ``seed``: n latents from one generator seeded with ``seed`` (None: a fresh
        seed from the OS, kept in ``last_seed``), ``dcgan.generate -n N --seed S``'s.
        ``seeds`` instead (ints, or a string like "0-99", "3,7,11", "0-9,20-29"): one latent
        per seed, in that order, each from its own generator, so seed s's latent is the same
        whatever the other seeds (and is ``latents(1, seed=s)``'s); ``dcgan.generate --seeds``'s.
        ``last_seed`` becomes None. ``truncation`` psi: each coordinate N(0, 1) truncated to
        [-psi, psi], out-of-range ones drawn again (BigGAN's truncation trick;
        ``dcgan/models/latents.py``); None (default): the untruncated latents, as before.
        ValueError for a bad n, seeds or truncation, or for seeds given with n or seed."""
        psi = check_truncation(truncation)
        if seeds is not None:
            if n is not None or seed is not None:
                raise ValueError("give seeds, or n (and seed), not both")
            seeds = check_seeds(seeds)
            self.last_seed = None
            return seed_latents(seeds, self.nz, psi)
        self.last_seed = seed = _seed_for(n, seed)
        return draw(n, self.nz, torch.Generator().manual_seed(seed), psi)

    def labels(
        self,
        n: int | None = None,
        seed: int | None = None,
        *,
        seeds: Iterable[int] | str | None = None,
        labels: int | Sequence[int] | torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """The classes, int64 (n,) on the CPU, that ``sample()`` given the same arguments
        makes its images of; None for an unconditional generator.

        ``labels``: an int (every image of that class) or one class per image (a sequence,
        array or tensor of n ints), each in 0..num_classes-1. None: drawn uniformly at
        random from the seed, not from the latents' generator (a generator seeded with
        ``seed + 2**63``; ``dcgan/models/conditional.py``): with ``n`` and ``seed``, n
        classes from one generator, ``dcgan.generate -n N --seed S``'s; with ``seeds``, one
        per seed from its own, so seed s's class, like its latent, does not depend on the
        other seeds, and is ``labels(1, seed=s)``'s. ``seed`` None: a fresh one, kept in
        ``last_seed``. The latents never depend on the classes: ``sample(8, seed=0,
        labels=3)`` and ``labels=4`` draw the same z. ValueError for labels given to an
        unconditional generator (in one line), a class out of range or a bad length, and for
        a bad n, seed or seeds as ``latents()`` says."""
        if not self.conditional:
            if labels is not None:
                raise ValueError(
                    f"labels: {self.path} holds an unconditional generator (model.conditional=false): it takes no classes"
                )
            return None
        if seeds is not None:
            if n is not None or seed is not None:
                raise ValueError("give seeds, or n (and seed), not both")
            seeds = check_seeds(seeds)
            self.last_seed = None
            if labels is None:
                return seed_labels(seeds, self.num_classes)
            return check_labels(labels, len(seeds), self.num_classes)
        self.last_seed = seed = _seed_for(n, seed)
        if labels is None:
            return random_labels(n, self.num_classes, seed)
        return check_labels(labels, n, self.num_classes)

    @torch.no_grad()
    def sample(
        self,
        n: int | None = None,
        seed: int | None = None,
        device: torch.device | str | None = None,
        batch_size: int = 256,
        *,
        seeds: Iterable[int] | str | None = None,
        truncation: float | None = None,
        labels: int | Sequence[int] | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Images as uint8 (n, C, H, W) in [0, 255], quantised as a saved PNG would be: those
        of ``latents(n, seed, seeds=..., truncation=...)``, which say how each is seeded, and,
        for a conditional generator, of the classes ``labels(n, seed, seeds=..., labels=...)``
        gives: ``labels=3`` all of class 3, ``labels=[0, 1, ...]`` one class per image, None
        (default) classes at random from the seed. ``labels`` for an unconditional
        generator: ValueError.

        ``G.sample(16, seed=0)``: 16 images from seed 0 (None draws a fresh seed,
        ``last_seed`` says which). ``G.sample(seeds="0-99", truncation=0.7)``: one image per
        seed, each the same whatever the other seeds; the PNGs of ``dcgan.generate --seeds
        0-99 --truncation 0.7``. ``device``: where to run (the generator moves there, in
        place); None: where it is. The images are returned on that device. Runs in eval
        mode (batch norm uses its running statistics, so an image does not depend on the
        others in its batch, but for float rounding, ~1e-7), ``batch_size`` latents at a time.
        ``dcgan.generate`` with the same arguments (``--class K`` for ``labels=K``) writes
        these images as PNGs."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        z = self.latents(n, seed, seeds=seeds, truncation=truncation)
        y = self.labels(None if seeds is not None else len(z), self.last_seed, seeds=seeds, labels=labels)
        if device is not None:
            self.to(device)
        self.eval()
        where = self.device
        batches = [slice(i, i + batch_size) for i in range(0, len(z), batch_size)]
        return torch.cat([to_uint8(self(z[b].to(where), None if y is None else y[b].to(where))) for b in batches])


def _seed_for(n: int | None, seed: int | None) -> int:
    """The seed of n latents (or classes): ``seed``, or a fresh one from the OS when None
    (never from torch's global generator); ValueError when n is not >= 1."""
    if n is None or n < 1:
        raise ValueError(f"n must be >= 1 (or give seeds), got {n}")
    return int.from_bytes(os.urandom(8), "little") >> 1 if seed is None else seed


def load_generator(
    path: str | os.PathLike, weights: str = "ema", device: torch.device | str = "cpu", best: bool = True
) -> Generator:
    """A trained generator from a checkpoint file or a run folder, in eval mode.

    ``path``: a ``step_*.pt`` or ``best.pt`` (checked against its size/SHA-256 record when
    it has one), or a run folder: its ``checkpoints/best.pt`` (the best FID) when there is
    one and ``best`` is true, else its newest valid checkpoint (``files.resolve``).
    ``weights``: "ema" (default), the moving average of G that sample grids and evaluation
    use; when the run kept none (``model.ema_decay=0``) G is loaded instead, with a warning,
    and ``G.weights`` says "raw". "raw": G itself. Loaded with ``weights_only=True`` onto
    the CPU, whatever device wrote it, then moved to ``device`` (default "cpu").

    Raises ``files.CheckpointError`` (a ValueError) naming the path when there is no
    usable checkpoint there; ValueError for an unknown ``weights``."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
    file = files.resolve(Path(path), prefer_best=best)
    sd = load_trained_state(file)
    config = _config_of(sd["config"], file)
    model = config if isinstance(config, ModelConfig) else config.model
    used = "ema" if weights == "ema" and sd.get("generator_ema") is not None else "raw"
    net = files.generator_from_state(sd, model, weights, file)
    generator = Generator(net, config, int(sd.get("step", 0)), file, used)
    return generator.to(device).eval()


def load_trained_state(file: Path) -> dict:
    """The state dict a dcgan.train checkpoint holds, on the CPU; CheckpointError naming
    ``file`` when it holds anything else (a torch file of other tensors, say)."""
    sd = files.load(file, map_location="cpu")
    if not isinstance(sd, dict) or "generator" not in sd or "config" not in sd:
        raise files.CheckpointError(f"{file}: not a dcgan.train checkpoint (no generator state)")
    return sd


def _config_of(saved: dict, path: Path) -> Config | ModelConfig:
    """The run's Config as the checkpoint saved it; its ModelConfig alone when other
    sections no longer build with this code (a checkpoint from another version)."""
    try:
        return build_section(Config, saved, str(path))
    except ConfigError as e:
        log.warning("%s: its run config does not build here (%s); keeping its model section only", path, e)
    try:
        return build_section(ModelConfig, saved.get("model"), str(path), "model.")
    except ConfigError as e:
        raise files.CheckpointError(str(e)) from None
