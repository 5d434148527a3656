"""The training step as a library: the state a run carries (``TrainState``), the nets and
optimisers built for a config (``build_training``) and one GAN step (``gan_step``).
``dcgan/train.py`` runs them in a loop; ``bench/`` and the tests call them directly.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from dcgan.checkpoint import FORMAT_VERSION
from dcgan.config import Config
from dcgan.distributed import DistInfo
from dcgan.models import build_models, ema_copy, sample_latent
from dcgan.sync_batchnorm import convert_sync_batchnorm

# torch 2.14 renamed DDP's broadcast_buffers; older releases know only the old name.
NO_FORWARD_BUFFER_SYNC = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(DDP).parameters
    else {"broadcast_buffers": False}
)


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
# What gan_step measures each step (averaged over log.every steps): losses, D's mean
# output on real data and on fakes before (d_fake) and after (d_fake_after) the D update,
# the gradient norms (unscaled under fp16), and whether the step's update was skipped
# because a gradient was not finite (fp16's grad scaler does that by design; averaged:
# the fraction of steps skipped).
STAT_NAMES = (
    "loss_d_real", "loss_d_fake", "loss_g", "d_real", "d_fake", "d_fake_after", "grad_norm_d", "grad_norm_g",
    "skipped_d", "skipped_g",
)  # fmt: skip


@dataclass
class TrainState:
    generator: nn.Module  # bare modules (not DDP): their state dicts load into any world size
    discriminator: nn.Module
    generator_ema: nn.Module | None  # moving average of G's weights; None when model.ema_decay is 0
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    scaler_g: torch.amp.GradScaler
    scaler_d: torch.amp.GradScaler
    step: int = 0  # optimisation steps done
    epoch: int = 0  # data epoch in progress
    batch_in_epoch: int = 0  # batches of that epoch already consumed (per rank)
    samples_seen: int = 0  # real images consumed, all ranks together
    wandb_run_id: str | None = None  # set by tracking, so a restart continues the same W&B run
    train_seconds: float = 0.0  # wall time of the training loops so far, all attempts together
    best_fid: float | None = None  # lowest FID of the in-training evaluations so far
    best_fid_step: int = 0  # the step it was measured at (checkpoints/best.pt)
    lineage: list = field(default_factory=list)  # [[timeline id, start step], ...]: dcgan/timelines.py

    def state_dict(
        self, config: dict[str, Any], rng: list[dict[str, Any]], world_size: int, data: dict[str, Any]
    ) -> dict[str, Any]:
        """Everything to restart from; ``rng`` holds one ``capture_rng_state()`` per rank,
        ``data`` the identity of the shards trained on (``ShardSet.identity()``)."""
        return {
            "format_version": FORMAT_VERSION,
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "samples_seen": self.samples_seen,
            "world_size": world_size,  # batch_in_epoch is a position in this world size's split
            # Resumed on another device type, the run goes on but not bitwise (checkpointer.restore).
            "device": next(self.generator.parameters()).device.type,
            "generator": self.generator.state_dict(),
            "discriminator": self.discriminator.state_dict(),
            "generator_ema": None if self.generator_ema is None else self.generator_ema.state_dict(),
            "opt_g": self.opt_g.state_dict(),
            "opt_d": self.opt_d.state_dict(),
            "scaler_g": self.scaler_g.state_dict(),
            "scaler_d": self.scaler_d.state_dict(),
            "rng": rng,
            "wandb_run_id": self.wandb_run_id,
            "train_seconds": self.train_seconds,
            "best_fid": self.best_fid,
            "best_fid_step": self.best_fid_step,
            "lineage": self.lineage,  # also in the record: branching reads it there
            "config": config,
            "data": data,  # also in the record, where the start-up checks read it without loading this file
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Restore nets, optimisers and counters (RNG states: ``restore_rng_state``)."""
        if sd.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"checkpoint format {sd.get('format_version')!r}, this code reads {FORMAT_VERSION}")
        self.generator.load_state_dict(sd["generator"])
        self.discriminator.load_state_dict(sd["discriminator"])
        if self.generator_ema is not None:
            # Turned on for a run whose checkpoint has none: start the average from G.
            self.generator_ema.load_state_dict(sd["generator_ema"] or sd["generator"])
        # Here rather than in checkpointer.restore: every caller that loads a TrainState
        # (the trainer, bench/, the tests) then gets an optimiser state this run can step.
        load_optimizer(self.opt_g, sd["opt_g"])
        load_optimizer(self.opt_d, sd["opt_d"])
        if sd["scaler_g"]:  # empty when saved with grad scaling off
            self.scaler_g.load_state_dict(sd["scaler_g"])
            self.scaler_d.load_state_dict(sd["scaler_d"])
        self.step, self.epoch = sd["step"], sd["epoch"]
        self.batch_in_epoch, self.samples_seen = sd["batch_in_epoch"], sd["samples_seen"]
        self.wandb_run_id = sd["wandb_run_id"]
        self.train_seconds = sd.get("train_seconds", 0.0)  # absent from older checkpoints
        self.best_fid, self.best_fid_step = (
            sd.get("best_fid"),
            sd.get("best_fid_step", 0),
        )  # absent from older checkpoints
        self.lineage = sd.get("lineage") or []  # the trainer then sets the one it goes on on


# How an optimiser runs, not what it learnt: this attempt's settings (train.cuda_graph,
# optim.fused) win over those a checkpoint's param groups hold.
IMPLEMENTATION_FLAGS = ("fused", "foreach", "capturable", "differentiable")


def load_optimizer(opt: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """Load ``saved`` into ``opt`` but keep ``opt``'s IMPLEMENTATION_FLAGS, in the layout of
    this run's parameters. The second load puts Adam's step counters where those flags want
    them (on the device for fused or capturable, else on the CPU): torch placed them by the
    saved flags."""
    flags = [{k: group[k] for k in IMPLEMENTATION_FLAGS if k in group} for group in opt.param_groups]
    opt.load_state_dict(saved)
    for group, kept in zip(opt.param_groups, flags):
        group.update(kept)
    opt.load_state_dict(opt.state_dict())
    match_parameter_layout(opt)


def match_parameter_layout(opt: torch.optim.Optimizer) -> None:
    """Give each optimiser state tensor shaped like its parameter (Adam's moments) that
    parameter's strides. ``Optimizer.load_state_dict`` keeps the layout they were saved in,
    so a checkpoint of a channels_last run resumed without it (or the reverse) would pair
    NCHW weights with NHWC moments, which CUDA's fused Adam refuses. Scalars (``step``) stay."""
    for group in opt.param_groups:
        for param in group["params"]:
            state = opt.state.get(param, {})
            for name, value in state.items():
                if torch.is_tensor(value) and value.shape == param.shape and value.stride() != param.stride():
                    state[name] = torch.empty_like(param, dtype=value.dtype).copy_(value)  # dense: param's strides


def build_training(cfg: Config, dist: DistInfo, graphed: bool = False) -> tuple[TrainState, nn.Module, nn.Module]:
    """(state, G as trained, D as trained): the bare nets live in ``state``; the trained
    ones are compiled (``train.compile``) and wrapped in DDP when a process group runs.
    ``graphed``: built for a CUDA graph (dcgan/train_step.py): Adam keeps its step on the
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


def gan_step(
    state: TrainState,
    g_train: nn.Module,
    d_train: nn.Module,
    real: torch.Tensor,
    nz: int,
    amp_dtype: torch.dtype | None,
    real_target: float = 1.0,
    average_grads: Callable[[nn.Module], None] | None = None,
) -> torch.Tensor:
    """One D update and one G update; returns the STAT_NAMES values as a tensor on the
    device. No host sync anywhere (the caller reads the statistics only at log steps), so
    the whole step can be captured as a CUDA graph (dcgan/train_step.py). ``real_target``:
    D's label for real images (below 1: one-sided label smoothing). ``average_grads``: what
    averages a net's gradients over the ranks after its backward, where DDP does not."""
    D = state.discriminator
    # G's pass goes through D without DDP (D is frozen there: nothing to all-reduce), compiled when D is.
    d_frozen = d_train.module if isinstance(d_train, DDP) else d_train
    # No autocast weight cache: a cast cached while a CUDA graph is captured would be freed with it.
    amp = torch.autocast(real.device.type, dtype=amp_dtype, enabled=amp_dtype is not None, cache_enabled=False)
    n = real.shape[0]
    ones = torch.ones(n, device=real.device)
    zeros = torch.zeros(n, device=real.device)

    # D on real, then on fake: two backward passes, one gradient all-reduce (the second).
    state.opt_d.zero_grad(set_to_none=True)
    with d_train.no_sync() if isinstance(d_train, DDP) else contextlib.nullcontext():
        with amp:
            out_real = d_train(real).view(-1).float()
        loss_d_real = F.binary_cross_entropy_with_logits(out_real, torch.full_like(out_real, real_target))
        state.scaler_d.scale(loss_d_real).backward()
    z = sample_latent(n, nz, real.device)
    with amp:
        fake = g_train(z)
        out_fake = d_train(fake.detach()).view(-1).float()
    loss_d_fake = F.binary_cross_entropy_with_logits(out_fake, zeros)
    state.scaler_d.scale(loss_d_fake).backward()
    if average_grads is not None:
        average_grads(D)
    grad_norm_d = gradient_norm(D, state.scaler_d, state.opt_d)
    state.scaler_d.step(state.opt_d)
    state.scaler_d.update()

    # G through the frozen D: no D gradients, no D all-reduce (and no stale-gradient mix-up in the next D step).
    state.opt_g.zero_grad(set_to_none=True)
    D.requires_grad_(False)
    with amp:
        out_g = d_frozen(fake).view(-1).float()
    loss_g = F.binary_cross_entropy_with_logits(out_g, ones)
    state.scaler_g.scale(loss_g).backward()
    if average_grads is not None:
        average_grads(state.generator)
    grad_norm_g = gradient_norm(state.generator, state.scaler_g, state.opt_g)
    state.scaler_g.step(state.opt_g)
    state.scaler_g.update()
    D.requires_grad_(True)

    with torch.no_grad():
        return torch.stack([
            loss_d_real, loss_d_fake, loss_g,
            out_real.sigmoid().mean(), out_fake.sigmoid().mean(), out_g.sigmoid().mean(),
            grad_norm_d, grad_norm_g,
            (~torch.isfinite(grad_norm_d)).float(), (~torch.isfinite(grad_norm_g)).float(),
        ])  # fmt: skip


def gradient_norm(net: nn.Module, scaler: torch.amp.GradScaler, opt: torch.optim.Optimizer) -> torch.Tensor:
    """L2 norm of ``net``'s gradients, on the device. Under fp16 the grads are unscaled
    first (``scaler.step`` then knows not to do it again); inf when the step overflowed."""
    scaler.unscale_(opt)
    return torch.nn.utils.get_total_norm([p.grad for p in net.parameters() if p.grad is not None])
