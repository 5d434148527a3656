"""Shards -> one rank's batches of images in [-1, 1], the same number of batches on every rank.

webdataset supplies the reading (``gopen`` for paths, ``pipe:`` and URLs, its tar
iterators, brace expansion, the shuffle buffer). The split of samples over ranks and
DataLoader workers is ours, because webdataset 1.0.2's shard-level split cannot promise
equal batch counts per rank (DDP then hangs), repeats the same order every epoch, and
keeps no position to resume from. The plan, identical
on every rank and computed from the per-shard counts alone:

* epoch e lays the shards out in a seeded random order and starts at a seeded random
  offset; read cyclically, that is one sequence of ``total`` sample positions;
* every rank runs ``steps_per_epoch = total // (world * batch)`` batches; rank r owns
  the positions ``[r * steps * B, (r + 1) * steps * B)``, so ranks never overlap and one
  shard may be shared by several ranks (fewer shards than ranks x workers is fine);
* within a rank, batch i belongs to worker slot ``i % W``; each slot owns a contiguous
  run of positions (``slot_span``), reads it (skipping into its first shard), shuffles it
  with a seeded buffer and decodes it to uint8. torch's DataLoader hands out batches from
  workers round-robin, so the rank sees batches 0, 1, 2, ... in order (checked on every
  batch), and augments each on the device with a generator seeded by (epoch, rank,
  batch) (``DeviceBatches``);
* each shard gives exactly its planned count of positions (dcgan/data/shardset.py says where
  counts come from). A shard that holds more samples is cut at its count; one that holds
  fewer leaves its last positions empty. Either way the reader reports the shard, the
  planned and the found count once, and the rest of the plan, including which samples
  every other rank and worker reads, is unchanged;
* a sample that fails to decode, and an empty position, is counted and replaced by the
  next sample after the slot's run (so a slot never comes up short); an unreadable shard
  is counted, logged and skipped. Only if no sample can be decoded at all does reading
  stop, with an error that names the shard.

Starting an epoch at batch k (resume) gives worker w the slot ``(k + w) % W`` and
skips what that slot already delivered, so the rest of the epoch is the same batches,
in the same order, as an uninterrupted run with the same world size and worker count.

Shards are read and samples decoded as dcgan/data/reading.py does for every reader;
decoding never unpickles.
"""

from __future__ import annotations

import itertools
import logging
from typing import Callable, Iterator, NamedTuple, Protocol

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dcgan.base.checks import ConfigError
from dcgan.config.sections import AugmentConfig, DataConfig
from dcgan.data.augment import augment
from dcgan.data.reading import (
    Corrupt,
    ReadCounts,
    decode_or_corrupt,
    read_shard,
)
from dcgan.data.shardset import ShardSet, shard_name
from dcgan.run.preemption import NO_STOP_SIGNALS, WorkerSignals

log = logging.getLogger(__name__)


class DataError(RuntimeError):
    """Reading cannot go on (nothing decodable); the message names the shard."""


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


def slot_span(rank: int, slot: int, steps: int, workers: int, batch_size: int) -> tuple[int, int]:
    """(first position, positions) of one worker slot's run of a rank's epoch: positions
    count from the epoch's start offset in its shard sequence (``epoch_layout``)."""
    before = sum(slot_batches(steps, workers, s) for s in range(slot))
    return batch_size * (rank * steps + before), batch_size * slot_batches(steps, workers, slot)


# --------------------------------------------------------------------------- decoding


def stack_images(images: list[np.ndarray], channels: int, image_size: int) -> torch.Tensor:
    """(S, S, C) pixels -> one uint8 (N, C, S, S) tensor, stored channels-last (no transpose)."""
    if not images:
        return torch.empty((0, channels, image_size, image_size), dtype=torch.uint8)
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)


# --------------------------------------------------------------------------- one rank's stream


class _Empty:
    """A planned position that its shard does not hold (the shard has fewer samples than planned)."""


EMPTY = _Empty()
MAX_LOGGED_CORRUPT = 5  # corrupt samples logged one by one per rank; the rest are counted


class Batch(NamedTuple):
    """What a worker hands the training process: one batch, and what reading it met."""

    images: torch.Tensor  # uint8 (B, C, S, S)
    labels: torch.Tensor  # int64 (B,), -1 where unlabelled
    index: int  # the batch's place in the rank's epoch
    corrupt: int  # samples that did not decode, replaced
    empty: int  # planned positions their shard did not hold, replaced
    unreadable_shards: int
    miscounted: tuple[tuple[int, int, int], ...]  # (shard index, planned, found): new findings


class ShardStream(IterableDataset):
    """One rank's epoch as ``Batch`` es.

    Set ``epoch`` and ``start_batch`` (and ``reported``: shards whose count was already
    reported) before iterating; DataLoader copies the object into its workers when an
    iterator is created, so each epoch sees its own values.
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
        self.reported: set[int] = set()
        self.corrupt_to_log = MAX_LOGGED_CORRUPT  # per worker this epoch; the rest are only counted

    def __iter__(self) -> Iterator[Batch]:
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
        slot_start, slot_positions = slot_span(self.rank, slot, self.steps, workers, B)
        order, offset = epoch_layout(self.shards.counts, self.seed, self.epoch)
        ended: list[tuple[int, ReadCounts]] = []  # shards read to their end (or error) since the last batch
        raw = self._read_from((offset + slot_start) % self.shards.total, order, ended)
        own = wds.filters.shuffle(
            self.cfg.shuffle_buffer, self.cfg.shuffle_buffer, seed=derive_seed(self.seed, self.epoch, self.rank, slot)
        )(itertools.islice(raw, slot_positions))
        # After its own run, a slot keeps reading the sequence: replacements for bad samples.
        samples = itertools.chain(own, raw)
        corrupt = empty = consecutive_bad = logged = 0
        for j in range(n_batches):
            images, labels = [], []
            while len(images) < B:
                sample = next(samples)
                if sample is EMPTY:
                    empty += 1
                    error = "the planned positions are empty (the shards hold fewer samples than planned)"
                else:
                    decoded = decode_or_corrupt(sample, self.channels, self.image_size)
                    if not isinstance(decoded, Corrupt):
                        images.append(decoded[0])
                        labels.append(decoded[1])
                        consecutive_bad = 0
                        continue
                    corrupt += 1
                    error = decoded.line
                    logged += 1
                    if logged <= self.corrupt_to_log:
                        more = " (further ones are only counted)" if logged == self.corrupt_to_log else ""
                        log.warning("skipping corrupt %s%s", error, more)
                consecutive_bad += 1
                if consecutive_bad > max(1000, self.shards.total):
                    raise DataError(f"no sample decodes: {consecutive_bad} in a row failed; the last, {error}")
            if j < first:
                continue  # delivered before the resume point: only its effect on the stream matters
            unreadable = sum(counts.error is not None for _, counts in ended)
            yield Batch(
                stack_images(images, self.channels, self.image_size), torch.tensor(labels), slot + j * workers, corrupt, empty, unreadable,
                self._new_miscounts(ended),
            )  # fmt: skip
            corrupt = empty = 0
            ended.clear()

    def _read_from(
        self, position: int, order: np.ndarray, ended: list[tuple[int, ReadCounts]]
    ) -> Iterator[dict | _Empty]:
        """The planned positions from ``position`` of the epoch's shard sequence on, cyclically,
        forever: each a sample, or EMPTY where a shard holds fewer samples than planned.
        Each shard's read, once over, is appended to ``ended``."""
        counts = np.asarray(self.shards.counts)[order]
        k = int(np.searchsorted(np.cumsum(counts), position, side="right"))
        skip = position - int(counts[:k].sum())
        laps_without_a_sample = 0
        while True:
            read_any = False
            for i in range(len(order)):
                for item in self._positions(int(order[(k + i) % len(order)]), skip, ended):
                    read_any = read_any or item is not EMPTY
                    yield item
                skip = 0
            laps_without_a_sample = 0 if read_any else laps_without_a_sample + 1
            if laps_without_a_sample >= 2:
                raise DataError(
                    f"none of the {len(order)} shards yields a sample with an image member "
                    f"(the first: {self.shards.urls[0]})"
                )

    def _positions(self, shard: int, skip: int, ended: list[tuple[int, ReadCounts]]) -> Iterator[dict | _Empty]:
        """Positions ``skip`` .. planned - 1 of one shard: its samples, cut at the planned
        count, then EMPTY for what it lacks. Before handing on its last planned sample, a
        reader looks for one more (``read_shard``), so whoever reads a shard to its planned
        end learns the true count, which is appended to ``ended`` with the shard."""
        url, planned = self.shards.urls[shard], self.shards.counts[shard]
        if planned == 0:
            return  # nothing planned (the index found the shard empty or unreadable): not opened
        # More than planned: the rest is counted once (a shard already reported is only looked past).
        read = ReadCounts(0)
        for item in read_shard(url, skip, planned, look_past=1 if shard in self.reported else None):
            if isinstance(item, ReadCounts):
                read = item
                if read.error is not None:
                    log.warning(
                        "skipping the rest of unreadable shard %s (after %d samples): %s", url, read.read, read.error
                    )
                ended.append((shard, read))
            else:
                yield item
        yield from itertools.repeat(EMPTY, planned - max(skip, read.read) if read.read < planned else 0)

    def _new_miscounts(self, ended: list[tuple[int, ReadCounts]]) -> tuple[tuple[int, int, int], ...]:
        """(shard, planned, found) of each shard in ``ended`` read whole to another count than
        planned, and not reported before (it is now)."""
        found = []
        for shard, read in ended:
            planned = self.shards.counts[shard]
            if read.error is None and read.read != planned and shard not in self.reported:
                self.reported.add(shard)
                found.append((shard, planned, read.read))
        return tuple(found)


# --------------------------------------------------------------------------- the loader


class BatchSource(Protocol):
    """What the loop reads a rank's data from: ``Loader`` (the shards, every epoch) or
    ``dcgan.data.cache.CachedLoader`` (the set held decoded on the device)."""

    reader: str  # "shards" or "cache"
    steps_per_epoch: int
    corrupt_samples: int  # the reading counters of this process, for the summary
    empty_positions: int
    unreadable_shards: int
    miscounted: dict[str, dict[str, int]]

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


class DeviceBatches:
    """uint8 batches on the device -> what the nets take: float in [-1, 1], augmented
    (dcgan/data/augment.py) with a generator seeded by the batch's place in the run (seed,
    epoch, rank, batch), in the nets' memory layout. Both loaders end with this."""

    def __init__(
        self, augment: AugmentConfig, seed: int, rank: int, device: torch.device, memory_format: torch.memory_format
    ):
        self.augment, self.seed, self.rank, self.memory_format = augment, seed, rank, memory_format
        self.generator = torch.Generator(device) if augment.hflip or augment.affine else None

    def __call__(self, images: torch.Tensor, epoch: int, batch: int) -> torch.Tensor:
        x = images.to(torch.float32, memory_format=self.memory_format)
        if self.generator is not None:
            self.generator.manual_seed(derive_seed(self.seed, epoch, self.rank, batch, _AUGMENT_STREAM))
            x = augment(x, self.augment, self.generator).contiguous(memory_format=self.memory_format)
        return x.div_(127.5).sub_(1.0)


_AUGMENT_STREAM = 0xA6  # seeds augmentation apart from every other use of train.seed


class Loader:
    """A rank's data: ``epoch(e, start_batch)`` yields ``(images, labels)`` on ``device``:
    float images in [-1, 1] of shape (B, C, S, S) and int64 labels (-1 where unlabelled).
    Batches travel as uint8 (a quarter of the bytes) from pinned memory when on CUDA, and
    are augmented and made float on the device (``DeviceBatches``)."""

    def __init__(
        self,
        stream: ShardStream,
        device: torch.device,
        worker_signals: WorkerSignals = NO_STOP_SIGNALS,
        memory_format: torch.memory_format = torch.contiguous_format,
        first_to_report: Callable[[str], bool] = lambda shard: True,
    ):
        self.stream = stream
        self.reader = "shards"  # saved with checkpoints: a resume that reads otherwise is not exact
        self.worker_signals = worker_signals  # the stop signals, which the workers leave to this process
        # Whether this process is the first of the run to find the count of a shard wrong
        # (the others record it for the summary without logging it again).
        self.first_to_report = first_to_report
        self.workers = stream.cfg.workers
        self.device = device
        self.batches = DeviceBatches(stream.cfg.augment, stream.seed, stream.rank, device, memory_format)
        self.steps_per_epoch = stream.steps
        # Totals over this process's life, for the log and the run's summary.
        self.corrupt_samples = 0
        self.empty_positions = 0
        self.unreadable_shards = 0
        self.miscounted: dict[str, dict[str, int]] = {}  # shard name -> {"planned", "found"}

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.stream.epoch, self.stream.start_batch = epoch, start_batch
        self.stream.corrupt_to_log = max(0, MAX_LOGGED_CORRUPT - self.corrupt_samples)
        loader = DataLoader(
            self.stream,
            batch_size=None,
            num_workers=self.workers,
            pin_memory=self.device.type == "cuda",
            prefetch_factor=4 if self.workers else None,
            worker_init_fn=self.worker_signals,
            # Its own generator: a new iterator draws a seed from it, and a draw from the
            # global RNG would shift the latents of a run resumed mid-epoch (our workers
            # seed themselves from (seed, epoch, rank, slot) and ignore it anyway).
            generator=torch.Generator().manual_seed(0),
        )
        batches = self.worker_signals.start(loader)
        try:
            for expected, batch in enumerate(batches, start_batch):
                if batch.index != expected:  # the round-robin order the plan relies on did not hold
                    raise RuntimeError(f"data order broken: got batch {batch.index}, expected {expected}")
                self._note(batch)
                images = batch.images.to(self.device, non_blocking=True)
                yield self.batches(images, epoch, batch.index), batch.labels.to(self.device, non_blocking=True)
        finally:
            # Workers go on every exit path, an exception included. Left to the iterator's
            # __del__, they would outlive a traceback that references it, and at exit
            # multiprocessing would join them forever (they ignore the stop signals).
            shut_down_workers(batches)

    def _note(self, batch: Batch) -> None:
        self.corrupt_samples += batch.corrupt
        self.empty_positions += batch.empty
        self.unreadable_shards += batch.unreadable_shards
        shards = self.stream.shards
        for shard, planned, found in batch.miscounted:
            self.stream.reported.add(shard)
            name = shard_name(shards.urls[shard])
            if name in self.miscounted:
                continue  # another worker reached the same shard's end
            self.miscounted[name] = {"planned": planned, "found": found}
            if not self.first_to_report(name):
                continue
            cost = (
                f"its last {planned - found} planned positions are filled with other samples of the epoch (repeats)"
                if found < planned
                else f"{found - planned} of its samples are never read"
            )
            log.warning(
                "shard %s holds %d samples, not the %d planned (%s): %s; %s",
                shards.urls[shard], found, planned, shards.counted_by, cost, shards.fix,
            )  # fmt: skip


def shut_down_workers(batches: Iterator) -> None:
    """End a DataLoader iterator's worker processes now (torch has no public call for it)."""
    shutdown = getattr(batches, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()


# --------------------------------------------------------------------------- whole sets


def read_images(
    shards: ShardSet, limit: int | None, channels: int, image_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``limit`` decodable samples (all when None), in manifest order, as
    ``(uint8 images (N, C, S, S), int64 labels (N,))``: the real sets that evaluation and
    ``dcgan.eval train-features`` use. Corrupt samples and unreadable shards are logged,
    counted and skipped; DataError when nothing at all decodes."""
    from dcgan.base.progress import progress

    images, labels, bad_samples, bad_shards = [], [], 0, 0
    total = shards.total if limit is None else min(limit, shards.total)
    bar = progress(range(total), total, desc=f"reading {total} real images", unit="img", log=log)
    for url in shards.urls:
        for sample in read_shard(url):
            if isinstance(sample, ReadCounts):
                if sample.error is not None:  # missing, truncated or not a tar
                    bad_shards += 1
                    log.warning("skipping unreadable shard %s: %s", url, sample.error)
                continue
            decoded = decode_or_corrupt(sample, channels, image_size)
            if isinstance(decoded, Corrupt):
                bad_samples += 1
                log.warning("skipping corrupt sample %s in %s: %s", sample["__key__"], url, decoded.error)
                continue
            images.append(decoded[0])
            labels.append(decoded[1])
            next(bar, None)
            if len(images) == total:
                break
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
    return stack_images(images, channels, image_size), torch.tensor(labels, dtype=torch.int64)
