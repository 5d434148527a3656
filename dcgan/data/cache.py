"""``data.cache``: the whole set decoded once and held as uint8 on the training device.

The datasets DCGANs train on are small next to a GPU's memory (CelebA at 64x64 is 2.5 GB
as uint8), while decoding PNGs in worker processes tops out at a few thousand images per
second per worker. So, when the set fits the device and the machine that builds it
(``choose_cache``), each run decodes it once:

* the shards are cut into pieces of consecutive samples; each rank decodes a contiguous
  run of pieces, holding about a 1/world share of the samples, with its own worker
  processes, and the ranks exchange what they decoded over the gloo control group, so
  every rank holds the same rows in the set's order;
* corrupt samples are counted and skipped, unreadable shards counted and logged, and a
  shard that holds another count than planned is reported, as the shard reader does;
* epoch e is one seeded permutation of the set, the same on every rank; rank r takes
  ``steps * batch`` consecutive entries of it (``rank_share``), so ranks are disjoint,
  every rank runs the same number of steps, each epoch has a new order, and batch k of
  an epoch depends on (seed, epoch, rank, k) alone: resume at any batch is exact;
* a batch is gathered by index on the device: no host work per step beyond the loop.

The pixels live in GPU memory under CUDA and in RAM on the CPU (one copy per process).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from typing import Iterator, NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset

from dcgan.base.checks import ConfigError
from dcgan.base.progress import progress
from dcgan.config.sections import DataConfig
from dcgan.data.reading import Corrupt, ReadCounts, decode_or_corrupt, read_shard
from dcgan.data.shardset import ShardSet, shard_name
from dcgan.data.stream import (
    MAX_LOGGED_CORRUPT,
    DataError,
    DeviceBatches,
    derive_seed,
    shut_down_workers,
    stack_images,
    steps_per_epoch,
)
from dcgan.run import distributed
from dcgan.run.distributed import DistInfo
from dcgan.run.preemption import NO_STOP_SIGNALS, WorkerSignals

log = logging.getLogger(__name__)

GB = 1e9
MIN_PIECE = 256  # samples: below this, a piece's start-up (opening the shard, skipping in) dominates
PIECES_PER_WORKER = 4  # a rank's share is cut into about this many pieces per decoding worker
PREFETCH_PIECES = 2  # pieces each decoding worker keeps ready (the DataLoader's prefetch_factor)
# auto under CUDA caches in at most this fraction of the free memory of the process's GPU:
# the rest is for the nets, their optimiser states, activations, cuDNN's workspaces and the
# evaluation's extractor, which grow with the batch and the widths (a few GB at most for DCGANs).
GPU_AUTO_FRACTION = 0.5
GPU_MARGIN_GB = 2.0  # of the GPU's free memory, kept for training by data.cache=on too
RAM_USABLE = 0.8  # of MemAvailable the build may take: the rest is for the trainer, page cache, other tenants
_ORDER_STREAM = 0xCAC4E  # seeds the epoch permutations apart from every other use of train.seed


# --------------------------------------------------------------------------- the choice


@dataclass(frozen=True)
class CacheChoice:
    on: bool
    why: str  # one line for the log


def agree_on_cache(choice: CacheChoice, dist: DistInfo) -> CacheChoice:
    """The cache only where every rank chose it: each rank chose from its own GPU's free
    memory, and ranks reading differently would not take the same steps. Otherwise the
    first refusing rank's reason, on every rank. Collective (host-side)."""
    choices = distributed.gather_objects(choice, dist)
    if choices is not None:  # rank 0
        rank, first = next(((r, c) for r, c in enumerate(choices) if not c.on), (0, choice))
        choice = first if rank == 0 else CacheChoice(False, f"rank {rank}: {first.why}; every rank reads the shards")
    return distributed.broadcast_object(choice, dist)


class Room(NamedTuple):
    """What a process's machine has for the cache, in GB (None: not known)."""

    on_cpu: bool  # the cache would live in RAM (the run trains on the CPU)
    gpu_free_gb: float | None  # free memory of the GPU the process takes (None: on the CPU, or not known)
    ram_gb: float | None  # MemAvailable: the build gathers the set there
    shm_gb: float | None  # free space of /dev/shm, through which decoding workers hand their pieces
    cpus: int  # CPUs the process may use (Slurm restricts them per task)
    processes: int  # training processes on the machine, each building its own copy at the same time


# The launchers plan on a login node for the job's machines: each process chooses again at start.
UNMEASURED = Room(on_cpu=False, gpu_free_gb=None, ram_gb=None, shm_gb=None, cpus=1, processes=1)


def measure_room(device: torch.device) -> Room:
    """What this machine has for the cache of a process that trains on ``device``."""
    gpu = torch.cuda.mem_get_info(device)[0] / GB if device.type == "cuda" else None
    return Room(
        device.type == "cpu", gpu, available_ram_gb(), free_shm_gb(), usable_cpus(), distributed.local_processes()
    )


class Needs(NamedTuple):
    """What building and holding the cache takes, per process, in GB."""

    pixels: float  # the decoded set: what data.cache_max_gb limits
    device: float  # on the device: every rank's rows, padded to the longest share
    host_peak: float  # RAM at the height of the build
    shm: float  # /dev/shm for the pieces in flight from the decoding workers (0: none)


def cache_needs(counts: tuple[int, ...], channels: int, image_size: int, world_size: int, workers: int) -> Needs:
    """The sizes of the build as ``CachedLoader`` runs it. A process holds its rows, then,
    with several, also their padded copy and the buffer that gathers every rank's padded
    rows (``distributed.all_gather_rows``). Its workers have at most PREFETCH_PIECES pieces
    each in /dev/shm, and one more is being copied out. Labels and the index (16 bytes a
    sample) are left to the margins."""
    row = channels * image_size**2 / GB
    pieces = cut_into_pieces(counts, world_size, workers)
    shares = [0] * world_size
    for piece, rank in zip(pieces, piece_ranks(pieces, world_size)):
        shares[rank] += piece.stop - piece.start
    longest = max(shares)
    gathered = world_size * longest * row
    peak = gathered + (2 * longest * row if world_size > 1 else 0)
    largest_piece = max((p.stop - p.start for p in pieces), default=0)
    shm = (PREFETCH_PIECES * workers + 1) * largest_piece * row if workers else 0.0
    return Needs(sum(counts) * row, gathered, peak, shm)


def choose_cache(
    cfg: DataConfig, counts: tuple[int, ...], channels: int, image_size: int, world_size: int, room: Room
) -> CacheChoice:
    """Whether this run caches the set of shards holding ``counts`` samples, and why.
    ConfigError when ``data.cache=on`` cannot fit ``room`` (``measure_room``)."""
    if cfg.cache == "off":
        return CacheChoice(False, "data.cache=off: reading the shards every epoch")
    workers = decoding_workers(cfg.workers, room.cpus, room.processes)
    needs = cache_needs(counts, channels, image_size, world_size, workers)
    held = f"the {sum(counts)} decoded images take {needs.pixels:.2f} GB"
    short = shortfall(needs, room, workers)
    if short is not None:
        problem, remedy = short
        if cfg.cache == "on":
            fix = f"{remedy}, or set data.cache=off" if remedy else "set data.cache=off"
            raise ConfigError(f"data.cache: on, but {held}, and {problem}; {fix}")
        then = f" ({remedy} to cache them)" if remedy else ""
        return CacheChoice(False, f"data.cache=auto: off, {held}, and {problem}; reading the shards every epoch{then}")
    if cfg.cache == "on":
        return CacheChoice(True, f"data.cache=on: {held}")
    return auto_choice(cfg.cache_max_gb, needs, room, held)


def shortfall(needs: Needs, room: Room, workers: int) -> tuple[str, str] | None:
    """What the machine lacks for the cache, and what would make it fit ("" when only
    another machine would), for one line (None: it fits as far as is known)."""
    gpu = room.gpu_free_gb
    if gpu is not None and needs.device > gpu - GPU_MARGIN_GB:
        return (
            f"{needs.device:.2f} GB of them on the GPU (each rank's share padded to the longest) exceed its "
            f"{gpu:.2f} GB free less {GPU_MARGIN_GB:g} GB kept for training",
            "",
        )
    ram, processes = room.ram_gb, room.processes
    if ram is not None and needs.host_peak * processes > RAM_USABLE * ram:
        return (
            f"building the cache takes up to {needs.host_peak:.2f} GB of RAM per process x {processes} process(es), "
            f"more than {RAM_USABLE:g} of the {ram:.2f} GB this machine has available",
            "",
        )
    shm = room.shm_gb
    if shm is not None and needs.shm * processes > shm:
        return (
            f"{workers} decoding worker(s) per process x {processes} process(es) hand up to "
            f"{needs.shm * processes:.2f} GB through /dev/shm, which has {shm:.2f} GB free",
            "give /dev/shm more room (docker run --shm-size=...) or set data.workers=0 to decode in the training process",
        )
    return None


def auto_choice(max_gb: float | str, needs: Needs, room: Room, held: str) -> CacheChoice:
    """data.cache=auto on a machine that fits the cache: on within data.cache_max_gb (a
    number: GB of pixels; auto: GPU_AUTO_FRACTION of the GPU's free memory under CUDA, no
    limit beyond the RAM on the CPU)."""
    if max_gb != "auto":
        if needs.pixels <= max_gb:
            return CacheChoice(True, f"data.cache=auto: on, {held} <= data.cache_max_gb={max_gb:g}")
        return CacheChoice(
            False,
            f"data.cache=auto: off, {held} > data.cache_max_gb={max_gb:g}; reading the shards every epoch "
            "(data.cache=on, or a larger data.cache_max_gb, holds them if the device has the memory)",
        )
    if room.on_cpu:
        if room.ram_gb is None:
            return CacheChoice(
                False, "data.cache=auto: off, this machine's available RAM is unknown (data.cache_max_gb=GB caches)"
            )
        return CacheChoice(True, f"data.cache=auto: on, {held}, which fit this machine's RAM")
    gpu = room.gpu_free_gb
    if gpu is None:
        return CacheChoice(False, "data.cache=auto: chosen by each process at start, from its GPU's free memory")
    limit = f"{GPU_AUTO_FRACTION:g} of the GPU's {gpu:.2f} GB free"
    if needs.device <= GPU_AUTO_FRACTION * gpu:
        return CacheChoice(True, f"data.cache=auto: on, {held}, {needs.device:.2f} GB on the GPU <= {limit}")
    return CacheChoice(
        False,
        f"data.cache=auto: off, {held}, {needs.device:.2f} GB on the GPU > {limit}; reading the shards every epoch "
        f"(data.cache=on holds them if they fit the free memory less {GPU_MARGIN_GB:g} GB)",
    )


def available_ram_gb() -> float | None:
    """MemAvailable of /proc/meminfo in GB (None where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 / GB
    except OSError:
        pass
    return None


def free_shm_gb() -> float | None:
    """Free space of /dev/shm in GB (None where there is none)."""
    try:
        return shutil.disk_usage("/dev/shm").free / GB
    except OSError:
        return None


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity, which Slurm and taskset restrict
    (all of the machine's where the platform has no affinity)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def decoding_workers(data_workers: int, cpus: int, processes: int) -> int:
    """Worker processes a rank decodes its share with: its part of the usable CPUs, at
    least data.workers; none (decoding in the training process) with data.workers=0."""
    return 0 if data_workers == 0 else max(data_workers, cpus // processes)


# --------------------------------------------------------------------------- the plan


def epoch_permutation(samples: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of epoch ``epoch``: the same on every rank (drawn on the CPU)."""
    gen = torch.Generator().manual_seed(derive_seed(seed, epoch, _ORDER_STREAM))
    return torch.randperm(samples, generator=gen)


def rank_share(order: torch.Tensor, rank: int, steps: int, batch_size: int) -> torch.Tensor:
    """Rank ``rank``'s batches of an epoch: (steps, batch_size) positions of the set."""
    per_rank = steps * batch_size
    return order[rank * per_rank : (rank + 1) * per_rank].view(steps, batch_size)


class Piece(NamedTuple):
    shard: int
    start: int  # first sample (position in the shard)
    stop: int  # one past the last; the shard's planned count for its last piece


def cut_into_pieces(counts: tuple[int, ...], world_size: int, workers: int) -> list[Piece]:
    """The shards as pieces, in order: about PIECES_PER_WORKER per decoding worker of each
    rank (``decoding_workers``), never below MIN_PIECE samples."""
    parts = PIECES_PER_WORKER * world_size * max(1, workers)
    size = max(MIN_PIECE, math.ceil(sum(counts) / parts))
    return [Piece(i, a, min(a + size, n)) for i, n in enumerate(counts) for a in range(0, n, size)]


def piece_ranks(pieces: list[Piece], world_size: int) -> list[int]:
    """The rank that decodes each piece: the one whose 1/world share of the samples holds
    its first sample, so each rank takes a contiguous run of pieces."""
    total = sum(p.stop - p.start for p in pieces)
    ranks, before = [], 0
    for piece in pieces:
        ranks.append(before * world_size // max(total, 1))
        before += piece.stop - piece.start
    return ranks


def rank_pieces(pieces: list[Piece], rank: int, world_size: int) -> list[Piece]:
    """Rank ``rank``'s run of pieces."""
    return [piece for piece, r in zip(pieces, piece_ranks(pieces, world_size)) if r == rank]


# --------------------------------------------------------------------------- decoding


class Decoded(NamedTuple):
    """One piece, decoded in a worker."""

    images: torch.Tensor  # uint8 (n, C, S, S)
    labels: torch.Tensor  # int64 (n,)
    corrupt: list[str]  # what failed, one line per corrupt sample
    unreadable: str | None  # why the shard could not be read to the piece's end
    found: int | None  # the shard's true count, when this piece reached its planned end and it differs


class PieceReader(Dataset):
    def __init__(self, shards: ShardSet, pieces: list[Piece], channels: int, image_size: int):
        self.shards, self.pieces, self.channels, self.image_size = shards, pieces, channels, image_size

    def __len__(self) -> int:
        return len(self.pieces)

    def __getitem__(self, i: int) -> Decoded:
        shard, start, stop = self.pieces[i]
        url, planned = self.shards.urls[shard], self.shards.counts[shard]
        images, labels, corrupt, read = [], [], [], ReadCounts(0)
        # Only the last piece of a shard reads past the plan, to count the rest.
        for sample in read_shard(url, start, stop, look_past=None if stop == planned else 0):
            if isinstance(sample, ReadCounts):
                read = sample
                continue
            decoded = decode_or_corrupt(sample, self.channels, self.image_size)
            if isinstance(decoded, Corrupt):
                corrupt.append(decoded.line)
            else:
                images.append(decoded[0])
                labels.append(decoded[1])
        error = read.error
        unreadable = None if error is None else f"{url} (after {read.read} samples): {type(error).__name__}: {error}"
        ended = unreadable is None and stop == planned
        return Decoded(
            stack_images(images, self.channels, self.image_size),
            torch.tensor(labels, dtype=torch.int64),
            corrupt,
            unreadable,
            read.read if ended and read.read != planned else None,
        )


# --------------------------------------------------------------------------- the loader


class CachedLoader:
    """A rank's data from the cache, with ``data.Loader``'s interface: ``epoch(e, start_batch)``
    yields ``(images, labels)`` on the device, and the reading counters for the summary."""

    def __init__(
        self,
        shards: ShardSet,
        cfg: DataConfig,
        dist: DistInfo,
        *,
        batch_size: int,
        image_size: int,
        channels: int,
        seed: int,
        memory_format: torch.memory_format = torch.contiguous_format,
        worker_signals: WorkerSignals = NO_STOP_SIGNALS,
    ):
        self.dist, self.batch_size, self.seed = dist, batch_size, seed
        self.reader = "cache"  # saved with checkpoints: a resume that reads otherwise is not exact
        self.corrupt_samples = self.empty_positions = self.unreadable_shards = 0
        self.miscounted: dict[str, dict[str, int]] = {}  # shard name -> {"planned", "found"}
        self.workers = 0  # no worker processes while training
        t_build = time.perf_counter()
        rows, labels = self._decode_my_share(shards, cfg, image_size, channels, worker_signals)
        pixels, counts = distributed.all_gather_rows(rows, dist)
        all_labels, _ = distributed.all_gather_rows(labels, dist)
        self.samples = sum(counts)
        if self.samples == 0:
            raise DataError(f"no decodable sample in {len(shards.urls)} shards: {shards.urls[:3]}...")
        longest = max(counts)
        # Row of each sample of the set, in order: each rank's rows, without the padding.
        index = torch.cat([torch.arange(r * longest, r * longest + n) for r, n in enumerate(counts)])
        self.pixels, self.labels, self.index = (t.to(dist.device) for t in (pixels, all_labels, index))
        self.steps_per_epoch = steps_per_epoch(self.samples, dist.world_size, batch_size)
        self.build_seconds = time.perf_counter() - t_build
        self.batches = DeviceBatches(cfg.augment, seed, dist.rank, dist.device, memory_format)
        if dist.is_main:
            log.info(
                "cached %d images (%.2f GB of uint8) on %s in %.1fs, %d process(es) decoding%s",
                self.samples, self.pixels[:1].numel() * self.samples / GB, dist.device, self.build_seconds,
                dist.world_size, "" if self.samples == shards.total else f"; {shards.total} planned",
            )  # fmt: skip

    def _decode_my_share(
        self, shards: ShardSet, cfg: DataConfig, image_size: int, channels: int, worker_signals: WorkerSignals
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's share of the set, decoded by its worker processes (uint8 rows, labels)."""
        workers = decoding_workers(cfg.workers, usable_cpus(), distributed.local_processes())
        pieces = cut_into_pieces(shards.counts, self.dist.world_size, workers)
        mine = rank_pieces(pieces, self.dist.rank, self.dist.world_size)
        workers = min(workers, len(mine))
        loader = DataLoader(
            PieceReader(shards, mine, channels, image_size),
            batch_size=None,
            num_workers=workers,
            prefetch_factor=PREFETCH_PIECES if workers else None,
            worker_init_fn=worker_signals,
        )
        todo = sum(p.stop - p.start for p in mine)
        rows = torch.empty((todo, channels, image_size, image_size), dtype=torch.uint8)
        labels = torch.empty(todo, dtype=torch.int64)
        filled = logged = 0
        pieces_done = worker_signals.start(loader)
        desc = f"decoding {todo} images into the cache (rank {self.dist.rank})"
        try:
            for i, found in enumerate(progress(pieces_done, len(mine), desc, "piece", log)):
                # Copied out at once: a piece from a worker lives in /dev/shm for as long as it is held.
                n = len(found.labels)
                rows[filled : filled + n] = found.images
                labels[filled : filled + n] = found.labels
                filled += n
                self.corrupt_samples += len(found.corrupt)
                for line in found.corrupt[: max(0, MAX_LOGGED_CORRUPT - logged)]:
                    log.warning("skipping corrupt %s", line)
                logged += len(found.corrupt)
                if found.unreadable is not None:
                    self.unreadable_shards += 1
                    log.warning("skipping the rest of unreadable shard %s", found.unreadable)
                if found.found is not None:
                    self._report_count(shards, mine[i].shard, found.found)
        finally:
            shut_down_workers(pieces_done)  # also on an exception: no worker outlives the build
        return rows[:filled], labels[:filled]

    def _report_count(self, shards: ShardSet, shard: int, found: int) -> None:
        planned = shards.counts[shard]
        self.miscounted[shard_name(shards.urls[shard])] = {"planned": planned, "found": found}
        what = "its extra samples are not cached" if found > planned else "the cache holds what it has"
        log.warning(
            "shard %s holds %d samples, not the %d planned (%s): %s; %s",
            shards.urls[shard], found, planned, shards.counted_by, what, shards.fix,
        )  # fmt: skip

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = epoch_permutation(self.samples, self.seed, epoch)
        share = rank_share(order, self.dist.rank, self.steps_per_epoch, self.batch_size).to(self.dist.device)
        rows = self.index[share]
        for k in range(start_batch, self.steps_per_epoch):
            images = self.pixels.index_select(0, rows[k])
            yield self.batches(images, epoch, k), self.labels.index_select(0, rows[k])
