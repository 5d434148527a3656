"""Shards -> one rank's batches of images in [-1, 1], the same number of batches on every rank.

webdataset supplies the reading (``gopen`` for paths, ``pipe:`` and URLs, its tar
iterators, brace expansion, the shuffle buffer). The split of samples over ranks and
DataLoader workers is ours, because webdataset 1.0.2's shard-level split cannot promise
equal batch counts per rank (DDP then hangs), repeats the same order every epoch, and
keeps no position to resume from (shared/notes/pitfalls.md 1-2). The plan, identical
on every rank and computed from the manifest's per-shard counts alone:

* epoch e lays the shards out in a seeded random order and starts at a seeded random
  offset; read cyclically, that is one sequence of ``total`` sample positions;
* every rank runs ``steps_per_epoch = total // (world * batch)`` batches; rank r owns
  the positions ``[r * steps * B, (r + 1) * steps * B)``, so ranks never overlap and one
  shard may be shared by several ranks (fewer shards than ranks x workers is fine);
* within a rank, batch i belongs to worker slot ``i % W``; each slot owns a contiguous
  run of positions, reads it (skipping into its first shard), shuffles it with a seeded
  buffer, decodes it and augments each batch with a generator seeded by (epoch, rank,
  batch). torch's DataLoader hands out batches from workers round-robin, so the rank
  sees batches 0, 1, 2, ... in order (checked on every batch);
* a sample that fails to decode is counted, logged and replaced by the next sample after
  the slot's run (so a slot never comes up short); an unreadable shard is counted,
  logged and skipped. Only if no sample can be decoded at all does reading stop, with
  an error that names the shards.

Starting an epoch at batch k (resume) gives worker w the slot ``(k + w) % W`` and
skips what that slot already delivered, so the rest of the epoch is the same batches,
in the same order, as an uninterrupted run with the same world size and worker count.

Decoding never unpickles: PNG/JPEG/WebP through PIL and ``.npy`` with
``allow_pickle=False``; other members (``.pth``, ``.pickle``) are never decoded.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dcgan.config import AugmentConfig, ConfigError, DataConfig
from dcgan.shards import IMAGE_EXTENSIONS, MANIFEST

log = logging.getLogger("dcgan.data")


class DataError(RuntimeError):
    """Reading cannot go on (nothing decodable); the message names the shards."""


# --------------------------------------------------------------------------- shard sets


@dataclass(frozen=True)
class ShardSet:
    urls: tuple[str, ...]
    counts: tuple[int, ...]  # samples per shard (from the manifest, or data.samples_per_shard)
    image_size: int | None = None  # from the manifest, when it knows

    @property
    def total(self) -> int:
        return sum(self.counts)


def resolve_shards(cfg: DataConfig) -> ShardSet:
    """Turn ``data.shards`` into shard URLs and counts; ConfigError names what is wrong."""
    spec = cfg.shards.strip()
    if not spec:
        raise ConfigError("data.shards: not set (a folder made by `python -m dcgan.shards`, or a brace pattern)")
    is_local = not spec.startswith("pipe:") and "://" not in spec
    path = Path(spec)
    if is_local and "{" not in spec and not path.exists():
        raise ConfigError(f"data.shards: {spec} does not exist")
    if is_local and (path.is_dir() or path.name == MANIFEST):
        manifest_path = path / MANIFEST if path.is_dir() else path
        if not manifest_path.exists():
            raise ConfigError(
                f"data.shards: {manifest_path} not found (is {spec} a folder written by `python -m dcgan.shards`? "
                "an unfinished run of it leaves no manifest)"
            )
        manifest = _read_manifest(manifest_path)
        urls = [str(manifest_path.parent / name) for name in manifest["shards"]]
        shard_set = ShardSet(tuple(urls), tuple(manifest["shard_samples"]), manifest.get("image_size"))
    else:
        urls = wds.shardlists.expand_urls(spec)
        for url in urls if is_local else ():
            if not Path(url).exists():
                raise ConfigError(f"data.shards: shard {url} does not exist")
        counts = None
        if is_local:
            beside = Path(urls[0]).parent / MANIFEST
            if beside.exists():
                manifest = _read_manifest(beside)
                by_name = dict(zip(manifest["shards"], manifest["shard_samples"]))
                if all(Path(u).name in by_name for u in urls):
                    counts = [by_name[Path(u).name] for u in urls]
        if counts is None:
            if cfg.samples_per_shard <= 0:
                raise ConfigError(
                    f"data.shards: {spec!r} has no manifest.json beside it; set data.samples_per_shard "
                    "(samples in each shard) so every rank can plan the same number of steps"
                )
            counts = [cfg.samples_per_shard] * len(urls)
        shard_set = ShardSet(tuple(urls), tuple(counts))
    for url in shard_set.urls if is_local else ():
        if not Path(url).exists():
            raise ConfigError(f"data.shards: shard {url} (listed in the manifest) does not exist")
    if not shard_set.urls or shard_set.total == 0:
        raise ConfigError(f"data.shards: {spec} holds no samples")
    return shard_set


def _read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads(path.read_text())
        if len(manifest["shards"]) != len(manifest["shard_samples"]):
            raise ValueError("'shards' and 'shard_samples' differ in length")
        return manifest
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"data.shards: {path} is not a valid manifest: {e!r}") from None


# --------------------------------------------------------------------------- the plan


def steps_per_epoch(total: int, world_size: int, batch_size: int) -> int:
    """Batches per rank per epoch; ConfigError when the data cannot fill one."""
    steps = total // (world_size * batch_size)
    if steps == 0:
        raise ConfigError(
            f"train.batch_size: {total} samples cannot fill one batch of {batch_size} on each of "
            f"{world_size} processes (lower train.batch_size or use more data)"
        )
    return steps


def epoch_layout(counts: tuple[int, ...], seed: int, epoch: int) -> tuple[np.ndarray, int]:
    """(shard order, start offset) of epoch ``epoch``: the same on every rank and worker."""
    rng = np.random.default_rng([seed, epoch, 0x5EED])
    order = rng.permutation(len(counts))
    return order, int(rng.integers(sum(counts)))


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from non-negative ints, well mixed (numpy's SeedSequence)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1, np.uint64)[0] >> 1)


def slot_batches(steps: int, workers: int, slot: int) -> int:
    """Batches of a rank's epoch that belong to ``slot`` (batch i goes to slot i % workers)."""
    return len(range(slot, steps, workers))


# --------------------------------------------------------------------------- decoding


def decode_sample(sample: dict, channels: int, image_size: int) -> torch.Tensor:
    """uint8 (C, S, S) image from a webdataset sample dict; raises on anything unreadable."""
    ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
    if ext is None:
        members = sorted(k for k in sample if not k.startswith("__"))
        raise ValueError(f"no image member (has {members})")
    if ext == "npy":
        array = np.load(io.BytesIO(sample[ext]), allow_pickle=False)
        if array.dtype != np.uint8 or array.ndim not in (2, 3):
            raise ValueError(f"npy image must be uint8 (H,W) or (H,W,C), got {array.dtype} {array.shape}")
        image = Image.fromarray(array.squeeze(-1) if array.ndim == 3 and array.shape[-1] == 1 else array)
    else:
        image = Image.open(io.BytesIO(sample[ext]))
    with image:
        pixels = np.array(image.convert("L" if channels == 1 else "RGB"))
    tensor = torch.from_numpy(pixels).reshape(pixels.shape[0], pixels.shape[1], channels).permute(2, 0, 1)
    if tensor.shape[-2:] != (image_size, image_size):
        tensor = TF.center_crop(TF.resize(tensor, image_size, antialias=True), image_size)
    return tensor.contiguous()


def sample_label(sample: dict) -> int:
    try:
        return int(sample["cls"])
    except (KeyError, ValueError):
        return -1


def augment_batch(images: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    """The seeds' RandomHorizontalFlip + RandomAffine, per sample, drawn from ``gen`` only."""
    if cfg.hflip:
        flip = torch.rand(len(images), generator=gen) < 0.5
        images[flip] = images[flip].flip(-1)
    if cfg.affine:
        height, width = images.shape[-2:]

        def uniform(lo: float, hi: float) -> float:
            return lo + (hi - lo) * torch.rand(1, generator=gen).item()

        for i in range(len(images)):
            angle = uniform(-cfg.degrees, cfg.degrees)
            dx, dy = cfg.translate[0] * width, cfg.translate[1] * height
            translate = [round(uniform(-dx, dx)), round(uniform(-dy, dy))]
            scale = uniform(*cfg.scale)
            shear = [uniform(-cfg.shear, cfg.shear), 0.0]
            images[i] = TF.affine(images[i], angle=angle, translate=translate, scale=scale, shear=shear)
    return images


# --------------------------------------------------------------------------- one rank's stream


class ShardStream(IterableDataset):
    """One rank's epoch as ``(images uint8 (B,C,S,S), labels (B,), batch index, bad samples, bad shards)``.

    Set ``epoch`` and ``start_batch`` before iterating; DataLoader copies the object into
    its workers when an iterator is created, so each epoch sees its own values.
    """

    def __init__(
        self,
        shards: ShardSet,
        cfg: DataConfig,
        *,
        rank: int,
        world_size: int,
        batch_size: int,
        image_size: int,
        channels: int,
        seed: int,
    ):
        self.shards, self.cfg = shards, cfg
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.image_size, self.channels, self.seed = image_size, channels, seed
        self.slots = max(1, cfg.workers)
        self.steps = steps_per_epoch(shards.total, world_size, batch_size)
        self.epoch = 0
        self.start_batch = 0

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        if workers != self.slots:
            raise RuntimeError(f"ShardStream planned for {self.slots} workers, runs in {workers}")
        slot = (self.start_batch + worker) % workers
        first = len(range(slot, self.start_batch, workers))  # batches this slot already delivered
        n_batches = slot_batches(self.steps, workers, slot)
        if first >= n_batches:
            return
        B = self.batch_size
        slot_start = B * (self.rank * self.steps + sum(slot_batches(self.steps, workers, s) for s in range(slot)))
        order, offset = epoch_layout(self.shards.counts, self.seed, self.epoch)
        raw = self._read_from((offset + slot_start) % self.shards.total, order)
        own = wds.filters.shuffle(
            self.cfg.shuffle_buffer, self.cfg.shuffle_buffer, seed=derive_seed(self.seed, self.epoch, self.rank, slot)
        )(itertools.islice(raw, n_batches * B))
        # After its own run, a slot keeps reading the sequence: replacements for bad samples.
        samples = itertools.chain(own, raw)
        self.bad_shards = 0  # counted by _read_from, reported with the next batch
        bad_samples_at_start = consecutive_bad = 0
        for j in range(n_batches):
            images, labels, bad = [], [], 0
            while len(images) < B:
                sample = next(samples)
                try:
                    images.append(decode_sample(sample, self.channels, self.image_size))
                    labels.append(sample_label(sample))
                    consecutive_bad = 0
                except Exception as e:  # any decoder failure means: this sample is corrupt
                    bad += 1
                    consecutive_bad += 1
                    log.warning("skipping corrupt sample %s in %s: %s", sample.get("__key__"), sample.get("__url__"), e)
                    if consecutive_bad > max(1000, self.shards.total):
                        raise DataError(
                            f"no decodable sample in {consecutive_bad} tries; shards: {self.shards.urls[:3]}..."
                        ) from e
            if j < first:
                bad_samples_at_start += bad
                continue  # delivered before the resume point: only its effect on the stream matters
            gen = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch, self.rank, slot, j))
            batch = augment_batch(torch.stack(images), self.cfg.augment, gen)
            index = slot + j * workers
            bad_shards, self.bad_shards = self.bad_shards, 0
            yield batch, torch.tensor(labels), index, bad + bad_samples_at_start, bad_shards
            bad_samples_at_start = 0

    def _read_from(self, position: int, order: np.ndarray) -> Iterator[dict]:
        """Samples from ``position`` of the epoch's shard sequence onwards, cyclically, forever."""
        counts = np.asarray(self.shards.counts)[order]
        k = int(np.searchsorted(np.cumsum(counts), position, side="right"))
        skip = position - int(counts[:k].sum())
        empty_laps = 0
        while True:
            produced = False
            for i in range(len(order)):
                url = self.shards.urls[order[(k + i) % len(order)]]
                try:
                    for sample in _tar_samples(url):
                        if skip:
                            skip -= 1
                            continue
                        produced = True
                        yield sample
                except Exception as e:  # missing, truncated or not a tar: skip the rest of it
                    self.bad_shards += 1
                    log.warning("skipping unreadable shard %s: %s", url, e)
                skip = 0
            empty_laps = 0 if produced else empty_laps + 1
            if empty_laps >= 2:
                raise DataError(f"none of the {len(order)} shards yields a sample: {self.shards.urls[:3]}...")


def _tar_samples(url: str) -> Iterator[dict]:
    with contextlib.closing(wds.gopen(url)) as stream:
        files = wds.tariterators.tar_file_expander([{"url": url, "stream": stream}])
        yield from wds.tariterators.group_by_keys(files)


# --------------------------------------------------------------------------- the loader


class Loader:
    """A rank's data: ``epoch(e, start_batch)`` yields ``(images, labels)`` on ``device``:
    float images in [-1, 1] of shape (B, C, S, S) and int64 labels (-1 where unlabelled).
    Batches travel as uint8 (a quarter of the bytes) from pinned memory when on CUDA, and
    become float, in ``memory_format``, on the device."""

    def __init__(
        self,
        stream: ShardStream,
        device: torch.device,
        worker_init_fn: Callable[[int], None] | None = None,
        memory_format: torch.memory_format = torch.contiguous_format,
    ):
        self.stream = stream
        self.worker_init_fn = worker_init_fn  # runs first in each worker process (a picklable callable)
        self.workers = stream.cfg.workers
        self.device = device
        self.memory_format = memory_format
        self.steps_per_epoch = stream.steps
        self.corrupt_samples = 0  # totals over this process's life, for the log
        self.corrupt_shards = 0

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.stream.epoch, self.stream.start_batch = epoch, start_batch
        loader = DataLoader(
            self.stream,
            batch_size=None,
            num_workers=self.workers,
            pin_memory=self.device.type == "cuda",
            prefetch_factor=4 if self.workers else None,
            worker_init_fn=self.worker_init_fn,
            # Its own generator: a new iterator draws a seed from it, and a draw from the
            # global RNG would shift the latents of a run resumed mid-epoch (our workers
            # seed themselves from (seed, epoch, rank, slot) and ignore it anyway).
            generator=torch.Generator().manual_seed(0),
        )
        for expected, (images, labels, index, bad_samples, bad_shards) in enumerate(loader, start_batch):
            if index != expected:  # the round-robin order the plan relies on did not hold
                raise RuntimeError(f"data order broken: got batch {index}, expected {expected}")
            self.corrupt_samples += bad_samples
            self.corrupt_shards += bad_shards
            images = images.to(self.device, non_blocking=True)
            images = images.to(torch.float32, memory_format=self.memory_format).div_(127.5).sub_(1.0)
            yield images, labels.to(self.device, non_blocking=True)


# --------------------------------------------------------------------------- whole sets


def read_images(
    shards: ShardSet, limit: int | None, channels: int, image_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``limit`` decodable samples (all when None), in manifest order, as
    ``(uint8 images (N, C, S, S), int64 labels (N,))``: the real sets that evaluation and
    ``dcgan.eval train-features`` use. Corrupt samples and unreadable shards are logged,
    counted and skipped; DataError when nothing at all decodes."""
    from dcgan.progress import progress

    images, labels, bad_samples, bad_shards = [], [], 0, 0
    total = shards.total if limit is None else min(limit, shards.total)
    bar = progress(range(total), total, desc=f"reading {total} real images", unit="img", log=log)
    for url in shards.urls:
        try:
            for sample in _tar_samples(url):
                try:
                    images.append(decode_sample(sample, channels, image_size))
                    labels.append(sample_label(sample))
                except Exception as e:  # any decoder failure means: this sample is corrupt
                    bad_samples += 1
                    log.warning("skipping corrupt sample %s in %s: %s", sample.get("__key__"), url, e)
                    continue
                next(bar, None)
                if len(images) == total:
                    break
        except Exception as e:  # missing, truncated or not a tar
            bad_shards += 1
            log.warning("skipping unreadable shard %s: %s", url, e)
        if len(images) == total:
            break
    for _ in bar:  # finish the progress line (fewer decodable samples than planned)
        pass
    if not images:
        raise DataError(f"no decodable sample in {len(shards.urls)} shards: {shards.urls[:3]}...")
    if bad_samples or bad_shards:
        log.warning(
            "read %d images; skipped %d corrupt samples and %d unreadable shards", len(images), bad_samples, bad_shards
        )
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64)
