"""What a checkpoint holds: ``TrainState``, the nets, optimisers, grad scalers and counters a
run carries from step to step. Its ``state_dict``/``load_state_dict`` are the one list of a
checkpoint's parts, and ``FORMAT_VERSION`` below says which list a file was written with:
adding a part means editing this file alone (and the version, when old files cannot load).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

# Raise it when a change to the parts makes older checkpoints unloadable: files.usable
# then sets them aside with a line naming both versions instead of failing mid-load.
FORMAT_VERSION = 2


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
    lineage: list = field(default_factory=list)  # [[timeline id, start step], ...]: dcgan/run/timelines.py
    # d_augment's probability (a 0-dim tensor on the device; None: d_augment off), this
    # rank's [sum of sign(D(real)), images] since ADA's last adjustment, and the mean sign
    # over all ranks at that adjustment (dcgan/training/ada.py).
    aug_p: torch.Tensor | None = None
    ada_signs: torch.Tensor | None = None
    d_real_sign: torch.Tensor | None = None

    def state_dict(
        self,
        config: dict[str, Any],
        rng: list[dict[str, Any]],
        world_size: int,
        data: dict[str, Any],
        ada_signs: torch.Tensor | None = None,
    ) -> dict[str, Any]:
        """Everything to restart from; ``rng`` holds one ``capture_rng_state()`` per rank,
        ``data`` the identity of the shards trained on (``ShardSet.identity()``), ``ada_signs``
        ``self.ada_signs`` summed over the ranks (one rank takes it all back on resume)."""
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
            "d_augment": None
            if self.aug_p is None
            else {
                "p": self.aug_p.detach().cpu(),
                "signs": (self.ada_signs if ada_signs is None else ada_signs).detach().cpu(),
                "d_real_sign": self.d_real_sign.detach().cpu(),
            },
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
        saved_augment = sd.get("d_augment")  # absent from older checkpoints, None with d_augment off
        if self.aug_p is not None and saved_augment is not None:
            self.aug_p.copy_(saved_augment["p"])
            self.ada_signs.copy_(saved_augment["signs"])
            self.d_real_sign.copy_(saved_augment["d_real_sign"])


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
