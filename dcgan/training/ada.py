"""``d_augment`` at work in the training step: D's inputs augmented with probability p
(the transforms: dcgan/models/d_augment.py), and, with ``d_augment.p=ada``, p tuned as ADA
tunes it (Karras et al. 2020).

* **Seeding.** The transforms draw from a generator of their own on the device, seeded
  before each step from (train.seed, rank, step): never the global RNG, and a resumed
  run draws what the uninterrupted run drew at the same step.
* **ADA.** Each step adds sign(D(real logits)) and the image count into this rank's
  ``state.ada_signs``. Every ``ada_interval`` steps one all-reduce of those two numbers
  gives r_t, the mean sign over all ranks; p moves by sign(r_t - ada_target) x (images
  of the interval, all ranks) / (ada_kimg x 1000), clipped to [0, 1]. Everything stays on
  the device: the interval is counted by the host's step number, and p is a tensor the
  transforms read, so no rank waits for a value and every rank applies the same p.
* **Checkpoints** hold p and the signs summed over the ranks (checkpointer.save); on
  resume rank 0 takes the sum back and the others start from zero, so the next
  adjustment sees the same whole numbers as the uninterrupted run.
"""

from __future__ import annotations

import torch

from dcgan.checkpoint.state import TrainState
from dcgan.data.stream import derive_seed
from dcgan.models.d_augment import DAugmentConfig, augment
from dcgan.run.distributed import DistInfo, sum_over_ranks

_D_AUGMENT_STREAM = 3  # the derive_seed stream of these draws (1: latents after a re-split, 2: data augmentation)
# What the step's statistics gain with d_augment on (dcgan/training/step.py): p as applied,
# and r_t, the mean sign of D's logits on real images over all ranks at the last adjustment.
STAT_NAMES = ("aug_p", "d_real_sign")


def initial_state(cfg: DAugmentConfig, state: TrainState, device: torch.device) -> None:
    """Give ``state`` its d_augment tensors (a checkpoint loaded later overwrites them)."""
    if cfg.on:
        state.aug_p = torch.tensor(0.0 if cfg.adaptive else float(cfg.p), device=device)
        state.ada_signs = torch.zeros(2, device=device)
        state.d_real_sign = torch.zeros((), device=device)


class DAugment:
    """The step's handle on d_augment: ``begin(step)``, then ``augment(images)`` for every
    batch D sees and ``observe(real_logits)``, then ``end(step)``; ``stats()`` for the log."""

    def __init__(self, cfg: DAugmentConfig, state: TrainState, seed: int, dist: DistInfo, batch_size: int):
        self.cfg, self.state, self.seed, self.dist = cfg, state, seed, dist
        self.generator = torch.Generator(dist.device)
        # How far p may move at one adjustment: the interval's images, all ranks, over ada_kimg thousand.
        self.adjustment = batch_size * dist.world_size * cfg.ada_interval / (cfg.ada_kimg * 1000)
        self.p_applied = torch.zeros((), device=dist.device)

    def begin(self, step: int) -> None:
        """Seed this step's draws (``step``: the step about to run, counted from 1)."""
        self.generator.manual_seed(derive_seed(self.seed, self.dist.rank, step, _D_AUGMENT_STREAM))
        self.p_applied.copy_(self.state.aug_p)

    def augment(self, images: torch.Tensor) -> torch.Tensor:
        return augment(images, self.cfg.transforms, self.state.aug_p, self.generator)

    def observe(self, real_logits: torch.Tensor) -> None:
        with torch.no_grad():  # the count as a Python number: no host-to-device copy
            self.state.ada_signs[0].add_(real_logits.sign().sum())
            self.state.ada_signs[1].add_(real_logits.numel())

    def end(self, step: int) -> None:
        """After ``step``: every ``ada_interval`` steps, r_t over all ranks (collective) and, for ADA, p adjusted."""
        if step % self.cfg.ada_interval:
            return
        signs, images = sum_over_ranks(self.state.ada_signs, self.dist)
        self.state.d_real_sign.copy_(signs / images.clamp(min=1))
        if self.cfg.adaptive:
            move = torch.sign(self.state.d_real_sign - self.cfg.ada_target) * self.adjustment
            self.state.aug_p.add_(move).clamp_(0.0, 1.0)
        self.state.ada_signs.zero_()

    def stats(self) -> torch.Tensor:
        """STAT_NAMES' values for this step, on the device."""
        return torch.stack([self.p_applied, self.state.d_real_sign])
