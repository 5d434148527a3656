"""Who am I: rank, local rank, world size and device, from torchrun's environment.

``setup()`` reads RANK / WORLD_SIZE / LOCAL_RANK (set by torchrun; a plain
``python -m dcgan.train`` is rank 0 of 1), picks the device (``cuda_index``: the rule
clusters bind GPUs by) and initialises the process group (env://: MASTER_ADDR /
MASTER_PORT): NCCL on CUDA, gloo on the CPU. With one process there is none, unless
``train.distributed=always`` asks for it (DDP, SyncBN and NCCL then run at world size 1).

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

from dcgan.base.checks import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    control_group: Any = None  # gloo group for host-side agreements (None without a process group)
    store: Any = None  # this attempt's rendezvous key-value store (None with one process): failures are posted there

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether a process group runs (DDP, SyncBN): several processes, or train.distributed=always."""
        return self.control_group is not None


class EnvRanks(NamedTuple):
    rank: int
    local_rank: int
    world_size: int


def _env_count(name: str, default: int) -> int:
    """A whole number from the launcher's variable ``name`` (``default`` when unset or
    empty); ConfigError naming the variable when it holds anything else."""
    value = os.environ.get(name, "").strip()
    try:
        return default if not value else int(value)
    except ValueError:
        raise ConfigError(f"${name}: {value!r} is not a whole number") from None


def read_env() -> EnvRanks:
    """This process's place in the job, from torchrun's variables (rank 0 of 1 without
    them). ConfigError naming the variable when one set by hand makes no sense; the others
    the trainer reads later (LOCAL_WORLD_SIZE, the restart counts) are checked here too, so
    they fail before the start and not in the middle of it."""
    env = EnvRanks(_env_count("RANK", 0), _env_count("LOCAL_RANK", 0), _env_count("WORLD_SIZE", 1))
    if env.world_size < 1:
        raise ConfigError(f"$WORLD_SIZE: {env.world_size} processes; a job has at least 1")
    if not 0 <= env.rank < env.world_size:
        raise ConfigError(
            f"$RANK: {env.rank} is not a rank of a job of $WORLD_SIZE={env.world_size} (0..{env.world_size - 1})"
        )
    if env.local_rank < 0:
        raise ConfigError(f"$LOCAL_RANK: {env.local_rank} is below 0")
    local = local_processes()
    if local < 1:
        raise ConfigError(f"$LOCAL_WORLD_SIZE: {local} processes on this machine; a machine runs at least 1")
    # Only when set: a process started by hand (one task of a submitit job) may give its
    # LOCAL_RANK alone
    if os.environ.get("LOCAL_WORLD_SIZE", "").strip() and env.local_rank >= local:
        raise ConfigError(
            f"$LOCAL_RANK: {env.local_rank} is not a rank of this machine's $LOCAL_WORLD_SIZE={local} processes "
            f"(0..{local - 1})"
        )
    for name in RESTART_COUNTS:
        if _env_count(name, 0) < 0:
            raise ConfigError(f"${name}: {os.environ[name].strip()} restarts; a count is at least 0")
    return env


def local_processes() -> int:
    """Training processes on this machine (torchrun's LOCAL_WORLD_SIZE; 1 alone)."""
    return _env_count("LOCAL_WORLD_SIZE", 1)


# torchrun's --max-restarts attempts, and Slurm's requeues (preemption, time limit,
# ``scontrol requeue``, node failure)
RESTART_COUNTS = ("TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT")


def restart_count() -> int:
    """How many times this job was restarted (``RESTART_COUNTS``)."""
    return sum(_env_count(name, 0) for name in RESTART_COUNTS)


class DeviceError(ConfigError):
    """No CUDA device fits this process (exit 2); the message says why."""


def cuda_index(local_rank: int, local_processes: int, visible: int) -> int:
    """The CUDA device a process takes, by the two ways clusters hand out GPUs:

    * every process of the node sees all of its GPUs (torchrun alone, ``srun
      --gpus-per-node``): local rank r takes ``cuda:r``;
    * each process sees its own GPU only (Slurm's ``--gpus-per-task=1``, ``--gpu-bind``,
      a site's cgroups): it is ``cuda:0`` in every process.

    ``visible``: ``torch.cuda.device_count()``. DeviceError for any other count."""
    if visible >= max(local_processes, local_rank + 1):
        return local_rank
    if visible == 1:
        return 0
    setting = os.environ.get("CUDA_VISIBLE_DEVICES")
    raise DeviceError(
        f"train.device: LOCAL_RANK={local_rank} of {local_processes} process(es) on this machine, but this process sees "
        f"{visible} CUDA device(s) (CUDA_VISIBLE_DEVICES={setting if setting is not None else 'unset'}): "
        "give every process all of the node's GPUs, or exactly one each (srun --gpus-per-task=1)"
    )


def choose_device(device: str, local_rank: int = 0, asked: str = "train.device: 'cuda'") -> torch.device:
    """The device of a setting ("auto", "cpu" or "cuda": train.device, the commands'
    --device) for the process of local rank ``local_rank``: ``cuda:cuda_index(...)`` when
    asked for or, with "auto", when there is one, else the CPU. DeviceError when a CUDA
    device is asked for and none fits; ``asked`` says how it was asked for."""
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceError(f"{asked}, but torch sees no CUDA device here")
    return torch.device("cuda", cuda_index(local_rank, local_processes(), torch.cuda.device_count()))


def setup(device: str = "auto", timeout_s: float = 1800, always: bool = False) -> DistInfo:
    """Join the process group (several processes, or ``always``) and pick the device."""
    rank, local_rank, world_size = read_env()
    dev = choose_device(device, local_rank)
    use_cuda = dev.type == "cuda"
    if use_cuda:
        torch.cuda.set_device(dev)
        log.info(
            "rank %d (local %d) takes cuda:%d, %s (CUDA_VISIBLE_DEVICES=%s)", rank, local_rank, dev.index,
            torch.cuda.get_device_name(dev), os.environ.get("CUDA_VISIBLE_DEVICES", "unset"),
        )  # fmt: skip

    store = None
    if (world_size > 1 or always) and not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        if world_size == 1 and "MASTER_ADDR" not in os.environ:
            store = dist.HashStore()  # one process without torchrun: nobody to meet
        else:
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
    control = dist.new_group(backend="gloo") if dist.is_initialized() else None
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


def sum_over_ranks(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """A copy of ``tensor`` summed over every rank, on its device (the default group: NCCL
    on GPUs, so no host sync)."""
    total = tensor.clone()
    if info.distributed:
        dist.all_reduce(total)
    return total


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
