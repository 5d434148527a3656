"""The evaluator: FID, KID and precision/recall of a generator, in training and in ``dcgan.eval``.

``Evaluator.evaluate`` is what training calls every ``eval.every`` steps too. It is a
collective that every rank enters: the latents of an evaluation are fixed by
``eval.seed`` and sample i always gets latent i, each rank generates a contiguous slice
of the samples and extracts their features, rank 0 gathers them in sample order and
scores them (dcgan/quality/scores.py), and the scores are broadcast back. So the figures do not
depend on the world size, and no rank runs a collective alone.

A FID you can trust or none: a features file whose classifier is not clearly better than
chance, or that was made for other images or classes, is refused before anything starts
(``choose_extractor``: ConfigError, exit 2); scores of degenerate samples (one image, flat
images) carry ``degenerate: 1`` and never become the best. Every score record carries its
``protocol``: extractor, weights file and its sha256, resize, generated and real counts,
and where the real images come from.

A class-conditional G is scored over the mix of its classes (``evaluation_labels``); the
intra-class FID (``intra_class_fid``, ``dcgan.eval``) scores each class's images against
that class's real images (``labelled_real``), with the same split over ranks.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dcgan.base.checks import ConfigError
from dcgan.base.images import to_uint8
from dcgan.config.sections import DataConfig, EvalConfig
from dcgan.data.shardset import MANIFEST, resolve_shards
from dcgan.data.stream import read_images
from dcgan.models.conditional import random_labels
from dcgan.models.networks import ModelConfig, sample_latent
from dcgan.quality.features import (
    RESIZE_TF1,
    FeaturesError,
    InceptionFeatures,
    file_sha256,
    load_classifier,
    read_classifier_file,
)
from dcgan.quality.scores import PixelStats, degenerate_reason, describe_protocol, fid_score, quality_scores
from dcgan.run import distributed
from dcgan.run.distributed import DistInfo

log = logging.getLogger(__name__)

DEFAULT_FEATURES_NAME = "features.pt"  # train-features writes it into the shards folder


# --------------------------------------------------------------------------- which extractor


@dataclass(frozen=True)
class ExtractorChoice:
    kind: str  # "classifier" | "inception"
    path: Path


def choose_extractor(ecfg: EvalConfig, shards: str, model: ModelConfig) -> ExtractorChoice:
    """eval.features, eval.inception, or <shards>/features.pt; ConfigError names the key
    when the file is missing or was made for other images than the model makes."""
    if ecfg.inception:
        if not Path(ecfg.inception).is_file():
            raise ConfigError(f"eval.inception: {ecfg.inception} is not a file")
        return ExtractorChoice("inception", Path(ecfg.inception))
    key = "eval.features"
    path = Path(ecfg.features) if ecfg.features else Path(shards) / DEFAULT_FEATURES_NAME
    if not path.is_file():
        hint = f"make it with `python -m dcgan.eval train-features --shards {shards} --out {path}`"
        if not ecfg.features:
            raise ConfigError(
                f"{key}: not set and {path} does not exist; {hint}, or set eval.inception to Inception weights"
            )
        raise ConfigError(f"{key}: {path} does not exist; {hint}")
    try:
        payload = read_classifier_file(path)  # FeaturesError: not clearly better than chance, too
    except FeaturesError as e:
        raise ConfigError(f"{key}: {e}") from None
    arch = payload["arch"]
    if (arch["channels"], arch["image_size"]) != (model.channels, model.image_size):
        raise ConfigError(
            f"{key}: {path} was trained on {arch['channels']}-channel {arch['image_size']}px images; "
            f"the model makes {model.channels}-channel {model.image_size}px ones"
        )
    listed = shard_classes(shards)
    if listed is not None and payload.get("classes") and listed[1] != payload["classes"]:
        raise ConfigError(
            f"{key}: {path} was trained on {payload['classes']} classes; {listed[0]} lists {listed[1]}: make one for "
            f"these shards with `python -m dcgan.eval train-features --shards {shards} --out {path}`"
        )
    return ExtractorChoice("classifier", path)


def shard_classes(shards: str) -> tuple[Path, int] | None:
    """(the manifest, how many classes it lists) for a folder of shards whose manifest.json
    names its classes; None when that is not known (no manifest, unlabelled, a pattern)."""
    manifest = Path(shards) if Path(shards).name == MANIFEST else Path(shards) / MANIFEST
    try:
        classes = json.loads(manifest.read_text()).get("classes")
    except (OSError, ValueError, AttributeError):
        return None
    return (manifest, len(classes)) if isinstance(classes, list) and classes else None


# --------------------------------------------------------------------------- the evaluator


def slice_of(n: int, dist: DistInfo) -> range:
    """This rank's contiguous share of n items (the same split every time)."""
    per = math.ceil(n / dist.world_size)
    return range(min(n, dist.rank * per), min(n, (dist.rank + 1) * per))


class Evaluator:
    """FID / KID / precision / recall of a generator against a fixed real set."""

    def __init__(
        self,
        extractor: nn.Module,
        real_features: torch.Tensor,
        ecfg: EvalConfig,
        dist: DistInfo,
        protocol: dict | None = None,
    ):
        self.extractor = extractor.to(dist.device).eval()
        self.real_features = real_features  # (N, D) on the CPU; only rank 0 scores with it
        self.real_labels: torch.Tensor | None = None  # their classes, on every rank, when read from the shards
        self.cfg, self.dist = ecfg, dist
        self.protocol = protocol  # what every score record says it was measured with (rank 0)

    @classmethod
    def build(cls, choice: ExtractorChoice, ecfg: EvalConfig, data: DataConfig, model: ModelConfig, dist: DistInfo):
        """Load the extractor and the real features. Collective (Inception: the ranks
        share the extraction of the real images). Draws nothing from the caller's RNG
        (building a module initialises its weights randomly before they are loaded)."""
        devices = [dist.device] if dist.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            return cls._build(choice, ecfg, data, model, dist)

    @classmethod
    def _build(cls, choice: ExtractorChoice, ecfg: EvalConfig, data: DataConfig, model: ModelConfig, dist: DistInfo):
        if choice.kind == "classifier":
            extractor, held, facts = load_classifier(choice.path)
            real = held[: ecfg.num_real]
            log.info(
                "eval features: classifier %s (held-out accuracy %.3f, chance %.3f), %d real images (the file holds %d)",
                choice.path, facts["accuracy"], facts["chance"], len(real), len(held),
            )  # fmt: skip
            split = f"features file: the first {len(real)} images of {facts['shards']}"
            protocol = score_protocol(choice, "none", ecfg.num_samples, len(real), split, dist)
            return cls(extractor, real, ecfg, dist, protocol)
        extractor = InceptionFeatures(choice.path)
        evaluator = cls(extractor, torch.empty(0), ecfg, dist)
        t0 = time.perf_counter()
        images, evaluator.real_labels = read_images(
            resolve_shards(data), ecfg.num_real, model.channels, model.image_size
        )
        mine = slice_of(len(images), dist)
        feats = evaluator._features(images[mine.start : mine.stop])
        evaluator.real_features = evaluator._gather(feats)
        log.info(
            "eval features: Inception %s, %d real images from %s in %.1fs",
            choice.path,
            len(images),
            data.shards,
            time.perf_counter() - t0,
        )
        split = f"the first {len(images)} images of {data.shards}"
        evaluator.protocol = score_protocol(choice, RESIZE_TF1, ecfg.num_samples, len(images), split, dist)
        return evaluator

    @torch.no_grad()
    def _features(self, images_uint8: torch.Tensor) -> torch.Tensor:
        bs = self.cfg.batch_size
        out = [
            self.extractor(images_uint8[i : i + bs].to(self.dist.device)).float().cpu()
            for i in range(0, len(images_uint8), bs)
        ]
        return torch.cat(out) if out else torch.empty(0, self.extractor.num_features)

    def _gather(self, features: torch.Tensor) -> torch.Tensor | None:
        """Every rank's features in rank (= sample) order on rank 0; None elsewhere."""
        parts = distributed.gather_objects(features, self.dist)
        return torch.cat(parts) if parts is not None else None

    @torch.no_grad()
    def evaluate(
        self, sample: Callable[..., torch.Tensor], nz: int, num_classes: int = 0, label: int | None = None
    ) -> dict[str, float]:
        """Scores of ``sample`` (latents (B, nz, 1, 1) on the device -> images in [-1, 1]).
        Every rank must call this; every rank gets the same dict. The caller's RNG state
        is left as it was (training resumes bit-exactly whether or not it evaluated).
        ``num_classes``: a conditional G's, called as ``sample(z, labels)`` with the classes
        drawn evenly at random (the same draw every evaluation), or all ``label``."""
        t0 = time.perf_counter()
        n = self.cfg.num_samples
        latents = sample_latent(n, nz, generator=torch.Generator().manual_seed(self.cfg.seed))
        labels = evaluation_labels(n, num_classes, self.cfg.seed, label)
        parts = distributed.gather_objects(self._generated(sample, latents, labels), self.dist)  # sample order

        def score() -> dict:
            fake = torch.cat([f for f, _ in parts])
            scores = quality_scores(self.real_features, fake, seed=self.cfg.seed)
            why = degenerate_reason(PixelStats.merge([p for _, p in parts]), self.real_features, fake)
            scores["degenerate"], scores["degenerate_reason"] = int(why is not None), why
            scores["eval_seconds"] = time.perf_counter() - t0
            if self.protocol is not None:
                scores["protocol"] = self.protocol
            return scores

        return on_rank_0(score, "evaluation", self.dist)

    def _generated(
        self, sample: Callable[..., torch.Tensor], latents: torch.Tensor, labels: torch.Tensor | None
    ) -> tuple[torch.Tensor, PixelStats]:
        """This rank's slice of the images of ``latents`` (and ``labels``, for a conditional
        G): their features on the CPU and their pixel sums. The caller's RNG is left alone."""
        n, bs = len(latents), self.cfg.batch_size
        mine = slice_of(n, self.dist)
        feats, pixels = [], PixelStats()
        devices = [self.dist.device] if self.dist.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            for i in range(mine.start, mine.stop, bs):
                z = latents[i : min(i + bs, mine.stop)].to(self.dist.device)
                cond = () if labels is None else (labels[i : min(i + bs, mine.stop)].to(self.dist.device),)
                images = to_uint8(sample(z, *cond))
                pixels.add(images)
                feats.append(self.extractor(images).float().cpu())
        return (torch.cat(feats) if feats else torch.empty(0, self.extractor.num_features)), pixels

    def labelled_real(self, data: DataConfig, model: ModelConfig) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Collective: the features (rank 0; None elsewhere) and classes (every rank) of the
        first eval.num_real real images of ``data``'s shards, for intra-class scores. With
        Inception those are the real set already extracted; a classifier features file holds
        no classes, so the images are read with their labels and their features extracted
        here, split across the ranks."""
        if self.real_labels is not None:
            return self.real_features, self.real_labels
        t0 = time.perf_counter()
        images, labels = read_images(resolve_shards(data), self.cfg.num_real, model.channels, model.image_size)
        mine = slice_of(len(images), self.dist)
        features = self._gather(self._features(images[mine.start : mine.stop]))
        log.info(
            "intra-class real features: %d images of %s in %.1fs", len(images), data.shards, time.perf_counter() - t0
        )
        return features, labels

    @torch.no_grad()
    def intra_class_fid(
        self,
        sample: Callable[..., torch.Tensor],
        nz: int,
        num_classes: int,
        per_class: int,
        real: tuple[torch.Tensor | None, torch.Tensor],
    ) -> dict:
        """Collective: a conditional G's intra-class FID. For each class k, ``per_class``
        images of class k (the same eval.seed latents for every class) are scored against
        the real images of class k in ``real`` (``labelled_real``); ``intra_fid`` is the mean
        of the classes' FIDs. A class with fewer than 2 real images is left out of the mean
        (its FID None, listed in ``skipped``). Every rank gets the same dict."""
        features, labels = real
        counts = torch.bincount(labels[labels >= 0], minlength=num_classes)[:num_classes].tolist()
        scored = [k for k in range(num_classes) if counts[k] >= 2]  # the same on every rank: labels are
        latents = sample_latent(per_class, nz, generator=torch.Generator().manual_seed(self.cfg.seed))
        mine = [self._generated(sample, latents, torch.full((per_class,), k))[0] for k in scored]
        parts = distributed.gather_objects(mine, self.dist)  # [rank][class] -> features

        def score() -> dict:
            fids: list[float | None] = [None] * num_classes
            for j, k in enumerate(scored):
                fids[k] = fid_score(features[labels == k], torch.cat([p[j] for p in parts]))
            mean = sum(fids[k] for k in scored) / len(scored) if scored else None
            skipped = [k for k in range(num_classes) if k not in scored]
            return {"intra_fid": mean, "fid": fids, "real": counts, "generated": per_class, "skipped": skipped}

        return on_rank_0(score, "intra-class FID", self.dist)

    def due(self, step: int, last_step: int) -> bool:
        """An evaluation every eval.every steps while training, and one at the last step."""
        return step % self.cfg.every == 0 or step == last_step

    def evaluate_at(
        self, step: int, sample: Callable[..., torch.Tensor], nz: int, state, num_classes: int = 0
    ) -> tuple[dict, bool]:
        """Collective, while training: the scores at ``step`` and whether they are the best
        FID so far, which ``state`` (the run's TrainState) then records. Degenerate samples
        are never the best, whatever their FID. A conditional G (``num_classes``) is scored
        over the mix of its classes."""
        scores = self.evaluate(sample, nz, num_classes)
        improved = not scores.get("degenerate") and (state.best_fid is None or scores["fid"] < state.best_fid)
        if improved:
            state.best_fid, state.best_fid_step = scores["fid"], step
        return scores, improved


def score_protocol(
    choice: ExtractorChoice, resize: str, generated: int, real: int, real_split: str, dist: DistInfo
) -> dict | None:
    """What the scores were measured with (rank 0; logged once here). The same extractor file,
    resize and counts make figures comparable; another of any of them does not."""
    if not dist.is_main:
        return None
    protocol = {
        "extractor": choice.kind,
        "weights": choice.path.name,
        "sha256": file_sha256(choice.path),
        "resize": resize,
        "generated": generated,
        "real": real,
        "real_split": real_split,
    }
    log.info("eval protocol: %s", describe_protocol(protocol))
    return protocol


def on_rank_0(compute: Callable[[], dict], what: str, dist: DistInfo) -> dict:
    """Collective: ``compute()`` on rank 0 and its result on every rank; its error, too, is
    raised on every rank (else the others would wait forever for a result)."""
    result: tuple[dict | None, str | None] = (None, None)
    if dist.is_main:
        try:
            result = (compute(), None)
        except Exception as e:
            result = (None, f"{type(e).__name__}: {e}")
    scores, error = distributed.broadcast_object(result, dist)
    if error is not None:
        raise RuntimeError(f"{what} failed on rank 0: {error}")
    return scores


def evaluation_labels(n: int, num_classes: int, seed: int, label: int | None = None) -> torch.Tensor | None:
    """The classes of an evaluation's ``n`` images for a conditional G: all ``label``, or
    drawn evenly at random as ``G.sample(n, seed=seed)`` draws them (``random_labels``);
    None for an unconditional G."""
    if not num_classes:
        return None
    if label is not None:
        return torch.full((n,), label, dtype=torch.int64)
    return random_labels(n, num_classes, seed)


def eval_mode_sampler(generator: nn.Module) -> Callable[..., torch.Tensor]:
    """G(z) (a conditional G: G(z, labels)) with running BN statistics, no grad: no batch
    dependence and no SyncBN collective, so one rank alone may call it (the sample grids)."""

    @torch.no_grad()
    def sample(z: torch.Tensor, *cond: torch.Tensor) -> torch.Tensor:
        was_training = generator.training
        generator.eval()
        try:
            return generator(z, *cond)
        finally:
            generator.train(was_training)

    return sample
