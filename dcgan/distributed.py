"""Who am I: rank, local rank, world size and device, from torchrun's environment.

``setup()`` reads RANK / WORLD_SIZE / LOCAL_RANK (set by torchrun; a plain
``python -m dcgan.train`` is rank 0 of 1), picks the device and initialises the process
group (env://: MASTER_ADDR / MASTER_PORT): NCCL on CUDA, gloo on the CPU.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

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

    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            init_method="env://",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=dev if use_cuda else None,
        )
    info = DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=dev)
    log.debug("process %d/%d (local %d) on %s", rank, world_size, local_rank, dev)
    return info


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
