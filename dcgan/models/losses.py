"""The GAN losses and D's gradient penalties (``loss``), and their typed config.

A loss is three tensor expressions of D's raw outputs (logits): D's loss on real images,
D's loss on fakes, and G's loss on fakes. Every kind reads the same outputs, so the step
(dcgan/training/step.py) stays one function whatever the kind:

* ``bce``: the seeds' loss, binary cross-entropy on the logits (G's non-saturating form,
  -log D(G(z))); D's real target is 1 - ``optim.label_smoothing``;
* ``hinge``: max(0, 1 - D(x)) + max(0, 1 + D(G(z))) for D, -D(G(z)) for G (SNGAN, BigGAN);
* ``lsgan``: least squares to the targets 1 (real, or 1 - label smoothing) and 0 (fake),
  halved; G pulls its fakes' outputs to 1 (Mao et al. 2017);
* ``wgan``: D(G(z)) - D(x) for the critic, -D(G(z)) for G, with the gradient penalty of
  Gulrajani et al. 2017 (``gp_weight``) on random mixes of real and fake images, every step.

``r1_gamma`` adds R1 (Mescheder et al. 2018), gamma/2 times the squared norm of D's
gradient at real images, to any kind; lazily, every ``r1_every`` steps with its weight
multiplied by ``r1_every`` (StyleGAN2), since it costs a second backward pass.

The penalties themselves (a gradient of D's gradient) are dcgan/training/penalties.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from dcgan.base.checks import check_field

KINDS = ("bce", "hinge", "lsgan", "wgan")


@dataclass
class LossConfig:
    """What D and G minimise, and D's gradient penalties (dcgan/models/losses.py)."""

    # bce: the seeds' (cross-entropy, G non-saturating); hinge; lsgan (least squares);
    # wgan (Wasserstein with a gradient penalty). bench/README.md#losses compares them.
    kind: Literal["bce", "hinge", "lsgan", "wgan"] = "bce"
    # wgan's gradient penalty weight (lambda; 10 in WGAN-GP): (|grad D| - 1)^2 at random
    # mixes of a real and a fake image, every step. Only wgan uses it.
    gp_weight: float = 10.0
    # R1: gamma/2 * |grad D(real)|^2 added to D's loss, for any kind; 0: off. StyleGAN2
    # uses 10 at 1024x1024 and about 0.01-1 at 32-64 pixels.
    r1_gamma: float = 0.0
    r1_every: int = 16  # steps between R1 terms (lazy R1, each weighted by r1_every)

    def __post_init__(self) -> None:
        check_field(self.kind in KINDS, "kind", f"{self.kind!r} is not one of {', '.join(KINDS)}")
        check_field(0 <= self.gp_weight < math.inf, "gp_weight", f"must be >= 0 and finite, not {self.gp_weight!r}")
        check_field(0 <= self.r1_gamma < math.inf, "r1_gamma", f"must be >= 0 and finite, not {self.r1_gamma!r}")
        check_field(self.r1_every >= 1, "r1_every", "must be >= 1")

    @property
    def gradient_penalty(self) -> bool:
        return self.kind == "wgan" and self.gp_weight > 0

    @property
    def penalised(self) -> bool:
        """Whether some step adds a gradient penalty (and so runs D twice differentiably)."""
        return self.gradient_penalty or self.r1_gamma > 0

    def r1_due(self, step: int) -> bool:
        """Whether step ``step`` (counted from 1) adds the R1 term."""
        return self.r1_gamma > 0 and step % self.r1_every == 0

    def describe(self) -> str:
        """One start-up line."""
        parts = [f"loss.kind={self.kind}"]
        if self.gradient_penalty:
            parts.append(f"gradient penalty {self.gp_weight:g} every step")
        if self.r1_gamma > 0:
            parts.append(f"R1 gamma {self.r1_gamma:g} every {self.r1_every} steps")
        return ", ".join(parts)


def d_real_loss(kind: str, out: torch.Tensor, target: float) -> torch.Tensor:
    """D's loss on real images' logits ``out``; ``target``: 1 or 1 - label smoothing (bce, lsgan)."""
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(out, torch.full_like(out, target))
    if kind == "hinge":
        return F.relu(1 - out).mean()
    if kind == "lsgan":
        return 0.5 * (out - target).square().mean()
    return -out.mean()  # wgan


def d_fake_loss(kind: str, out: torch.Tensor) -> torch.Tensor:
    """D's loss on fakes' logits ``out``."""
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(out, torch.zeros_like(out))
    if kind == "hinge":
        return F.relu(1 + out).mean()
    if kind == "lsgan":
        return 0.5 * out.square().mean()
    return out.mean()  # wgan


def g_loss(kind: str, out: torch.Tensor) -> torch.Tensor:
    """G's loss on its fakes' logits ``out`` (as D judges them)."""
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(out, torch.ones_like(out))  # -log D(G(z))
    if kind == "lsgan":
        return 0.5 * (out - 1).square().mean()
    return -out.mean()  # hinge, wgan


def output_summary(kind: str, out: torch.Tensor) -> torch.Tensor:
    """What the log shows of D's outputs: the mean probability of "real" for bce, the mean
    raw output for the others (their outputs are scores, not logits of a probability)."""
    return out.sigmoid().mean() if kind == "bce" else out.mean()
