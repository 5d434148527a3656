"""Who am I: rank, local rank, world size and device, from torchrun's environment.

``setup()`` reads RANK / WORLD_SIZE / LOCAL_RANK (set by torchrun; a plain
``python -m dcgan.train`` is rank 0 of 1), picks the device and initialises the process
group (env://: MASTER_ADDR / MASTER_PORT): NCCL on CUDA, gloo on the CPU.

The small helpers below (``broadcast_object``, ``gather_objects``) are host-side
agreements the trainer needs: which checkpoint to resume from, every rank's RNG state.
They run on their own gloo group (``DistInfo.control_group``), even in NCCL runs, so
they never wait on the GPU stream; with one process they are no-ops.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    control_group: Any = None  # gloo group for host-side agreements (None with one process)
    store: Any = None  # this attempt's rendezvous key-value store (None with one process): failures are posted there

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


class EnvRanks(NamedTuple):
    rank: int
    local_rank: int
    world_size: int


def read_env() -> EnvRanks:
    """This process's place in the job, from torchrun's variables (rank 0 of 1 without them)."""

    def get(name: str, default: int) -> int:
        value = os.environ.get(name)
        return default if value in (None, "") else int(value)

    return EnvRanks(get("RANK", 0), get("LOCAL_RANK", 0), get("WORLD_SIZE", 1))


def local_processes() -> int:
    """Training processes on this machine (torchrun's LOCAL_WORLD_SIZE; 1 alone)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE") or 1)


def restart_count() -> int:
    """How many times this job was restarted: torchrun's --max-restarts attempts plus Slurm
    requeues (preemption, time limit, ``scontrol requeue``, node failure)."""
    return sum(int(os.environ.get(name) or 0) for name in ("TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT"))


def setup(device: str = "auto", timeout_s: float = 1800) -> DistInfo:
    """Join the process group (if launched with several processes) and pick the device."""
    rank, local_rank, world_size = read_env()

    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise RuntimeError("train.device=cuda but torch sees no CUDA device")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")

    store = None
    if world_size > 1 and not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        store, _, _ = next(dist.rendezvous("env://", rank=rank, world_size=world_size, timeout=timeout))
        # torchrun keeps one store across --max-restarts; without a per-attempt prefix a
        # restarted group can read the dead group's addresses and fail to connect.
        store = dist.PrefixStore(f"dcgan/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            store=store,
            rank=rank,
            world_size=world_size,
            timeout=timeout,
            device_id=dev if use_cuda else None,
        )
    # Small host-side agreements get their own gloo group: NCCL would need device tensors
    # (a sync with the GPU stream), and on the CPU they stay out of DDP's way.
    control = dist.new_group(backend="gloo") if world_size > 1 else None
    info = DistInfo(rank, local_rank, world_size, dev, control_group=control, store=store)
    log.debug("process %d/%d (local %d) on %s", rank, world_size, local_rank, dev)
    return info


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    """Every rank waits here for all the others (host-side)."""
    if info.distributed:
        dist.barrier(group=info.control_group)


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    """Rank 0's ``obj`` on every rank (picklable objects)."""
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=info.control_group)
    return box[0]


def first_to_claim(key: str, info: DistInfo) -> bool:
    """True on the one rank that claims ``key`` first (one counter in the store, not a
    collective: any rank may call it at any time). Always True with one process."""
    return info.store is None or info.store.add(f"dcgan/claimed/{key}", 1) == 1


def gather_objects(obj: Any, info: DistInfo) -> list[Any] | None:
    """Every rank's ``obj``, in rank order, on rank 0 (None elsewhere)."""
    if not info.distributed:
        return [obj]
    out = [None] * info.world_size if info.is_main else None
    dist.gather_object(obj, out, dst=0, group=info.control_group)
    return out


def all_gather_rows(rows: torch.Tensor, info: DistInfo) -> tuple[torch.Tensor, list[int]]:
    """Every rank's ``rows`` (CPU tensors with equal trailing shapes, any number of rows)
    on every rank, over the gloo control group: ``(buffer, counts)``, where rank r's rows
    are ``buffer[r * max(counts):][: counts[r]]`` (the rest is padding, not copied out)."""
    if not info.distributed:
        return rows, [len(rows)]
    counts = [None] * info.world_size
    dist.all_gather_object(counts, len(rows), group=info.control_group)
    longest = max(counts)
    if longest == 0:
        return rows, counts
    padded = torch.zeros((longest, *rows.shape[1:]), dtype=rows.dtype)
    padded[: len(rows)] = rows
    buffer = torch.empty((info.world_size * longest, *rows.shape[1:]), dtype=rows.dtype)
    dist.all_gather(list(buffer.split(longest)), padded, group=info.control_group)
    return buffer, counts
