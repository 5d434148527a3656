"""A run's training parts built from its config: the nets and optimisers in a ``TrainState``
(``build_training``), DDP or not, compiled or not, and the numeric settings (TF32, memory
format). ``dcgan/training/loop.py`` runs them; ``bench/`` and the tests call them directly.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from dcgan.checkpoint.state import TrainState
from dcgan.config.sections import Config
from dcgan.models.networks import build_models, ema_copy
from dcgan.run.distributed import DistInfo
from dcgan.training import ada
from dcgan.training.sync_batchnorm import convert_sync_batchnorm

# torch 2.14 renamed DDP's broadcast_buffers; older releases know only the old name.
NO_FORWARD_BUFFER_SYNC = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(DDP).parameters
    else {"broadcast_buffers": False}
)


def build_training(cfg: Config, dist: DistInfo, graphed: bool = False) -> tuple[TrainState, nn.Module, nn.Module]:
    """(state, G as trained, D as trained): the bare nets live in ``state``; the trained
    ones are compiled (``train.compile``) and wrapped in DDP when a process group runs.
    ``graphed``: built for a CUDA graph (dcgan/training/step.py): Adam keeps its step on the
    device (``capturable``) and there is no DDP (the step averages gradients itself)."""
    torch.manual_seed(cfg.train.seed)  # the same init on every rank (DDP also broadcasts rank 0's)
    G, D = build_models(cfg)
    layout = memory_format(cfg)
    G_ema = ema_copy(G).to(dist.device, memory_format=layout) if cfg.model.ema_decay > 0 else None
    if dist.distributed and cfg.train.sync_bn:
        G = convert_sync_batchnorm(G, dist.device)
        D = convert_sync_batchnorm(D, dist.device)
    G, D = G.to(dist.device, memory_format=layout), D.to(dist.device, memory_format=layout)
    o = cfg.optim
    opt_g, opt_d = (
        torch.optim.Adam(net.parameters(), lr=adam.lr, betas=adam.betas, weight_decay=adam.weight_decay,
                         fused=o.fused, capturable=graphed)
        for net, adam in ((G, o.g), (D, o.d))
    )  # fmt: skip
    # One scaler per network: their gradients live on different scales (fp16 only).
    fp16 = cfg.train.precision == "fp16"
    state = TrainState(
        G,
        D,
        G_ema,
        opt_g,
        opt_d,
        torch.amp.GradScaler(dist.device.type, enabled=fp16),
        torch.amp.GradScaler(dist.device.type, enabled=fp16),
    )
    ada.initial_state(cfg.d_augment, state, dist.device)
    # torch.compile(net) wraps each net and leaves the bare ones (state-dict keys, the EMA
    # copy, evaluation) uncompiled. Their calls still share dynamo's cache of Module.__call__
    # (G, D and D frozen take 3 of its 8 entries), so the loop logs the graphs made
    # (compiled_graphs). dynamic=False: the batch never changes, and static kernels are faster.
    g_train, d_train = (
        (torch.compile(G, dynamic=False), torch.compile(D, dynamic=False)) if cfg.train.compile else (G, D)
    )
    if not dist.distributed or graphed:
        return state, g_train, d_train
    # No buffer broadcast at each forward: BN statistics are SyncBN's business, and
    # rebroadcasting them between D's two forwards breaks autograd (in-place buffer update).
    return state, DDP(g_train, **NO_FORWARD_BUFFER_SYNC), DDP(d_train, **NO_FORWARD_BUFFER_SYNC)


def compiled_graphs() -> int:
    """Graphs torch.compile has made in this process: G, D and D frozen (the G step) make 3;
    each one more is a recompile."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def set_tf32(setting: str) -> str:
    """Apply ``train.tf32`` (this process) and say what float32 means now, for the log."""
    if setting != "default":
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = setting == "on"
    conv, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    return f"train.tf32={setting}: float32 convolutions in {'TF32' if conv else 'full float32'}, matrix products in {'TF32' if matmul else 'full float32'}"


def memory_format(cfg: Config) -> torch.memory_format:
    """The layout of the nets' 4-d weights and of the batches fed to them."""
    return torch.channels_last if cfg.train.channels_last else torch.contiguous_format
