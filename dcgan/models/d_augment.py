"""Differentiable augmentation of every image the discriminator sees (``d_augment``), and
its typed config.

On a few thousand images D memorises the training set and G's samples collapse or copy.
Augmenting only the real images (``data.augment``) teaches G to make augmented images.
DiffAugment (Zhao et al. 2020) applies the same random transform T to real and fake
images, in the D step and in the G step, and differentiably, so G's gradient flows
through T; ADA (Karras et al. 2020) applies each transform with a probability p tuned
while training (dcgan/training/ada.py). Here:

* ``color``: brightness (add U(-0.5, 0.5)), saturation (scale each pixel's distance from
  its channel mean by U(0, 2)) and contrast (scale the distance from the image mean by
  U(0.5, 1.5)), each chosen per image with probability p;
* ``translation``: a shift by whole pixels, up to 1/8 of the size each way, zeros
  shifted in;
* ``cutout``: a square of half the size set to zero, centred anywhere in the image.

Every draw comes from the caller's generator, the same number of draws whatever p is
(an image not chosen still draws, and keeps its pixels through ``torch.where``), so a
generator state gives one batch bit for bit and p=0 is exactly the identity. No host
sync (no ``.item()``, no data-dependent shapes), any dtype (bf16 under autocast stays
bf16) and the input's memory format (channels_last stays channels_last).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from dcgan.base.checks import check_field

POLICIES = ("color", "translation", "cutout")
TRANSLATION_FRACTION = 1 / 8  # the largest shift, as a fraction of the size (DiffAugment's)
CUTOUT_FRACTION = 1 / 2  # the cut square's side, as a fraction of the size (DiffAugment's)


@dataclass
class DAugmentConfig:
    """Augmentation of every image D sees, real and fake, in the D and the G step (dcgan/models/d_augment.py)."""

    # A comma list of color, translation, cutout (the transforms, applied in this order);
    # empty: off. color,translation,cutout is DiffAugment's policy; translation measured
    # best on 1,000 grey images (bench/README.md#small-data-d_augment).
    policy: str = ""
    # The probability that a transform is applied to an image (each transform drawn on its
    # own), or ada: tuned while training from D's outputs on real images, starting at 0
    # (measured better than p=1 on small sets, and p stays near 0 on large ones).
    p: float | Literal["ada"] = "ada"
    # ADA's target for the mean sign of D's logits on real images (0: D cannot tell, 1: it
    # is sure of every real image): p rises while the mean is above it, falls below.
    ada_target: float = 0.6
    ada_interval: int = 4  # steps between ADA's adjustments (each one all-reduce of two numbers)
    # Thousands of images (all ranks together) over which p may move by 1: the speed of ADA.
    ada_kimg: float = 100.0

    def __post_init__(self) -> None:
        words = self.transforms
        for word in words:
            check_field(word in POLICIES, "policy", f"{word!r} is not one of {', '.join(POLICIES)} (a comma list)")
        check_field(len(set(words)) == len(words), "policy", f"names a transform twice: {self.policy!r}")
        if self.p != "ada":
            check_field(
                isinstance(self.p, (int, float)) and 0 <= self.p <= 1,
                "p",
                f"must lie in [0, 1] or be ada, not {self.p!r}",
            )
        check_field(0 < self.ada_target < 1, "ada_target", f"must lie in (0, 1), not {self.ada_target!r}")
        check_field(self.ada_interval >= 1, "ada_interval", f"must be >= 1, not {self.ada_interval}")
        check_field(0 < self.ada_kimg < math.inf, "ada_kimg", f"must be > 0 and finite, not {self.ada_kimg!r}")

    @property
    def transforms(self) -> tuple[str, ...]:
        return tuple(w.strip() for w in self.policy.split(",")) if self.policy.strip() else ()

    @property
    def on(self) -> bool:
        return bool(self.transforms)

    @property
    def adaptive(self) -> bool:
        return self.p == "ada"

    def describe(self) -> str:
        """One line for the start-up log."""
        if not self.on:
            return "d_augment off"
        if self.adaptive:
            return (
                f"d_augment {','.join(self.transforms)} on D's real and fake inputs, p adaptive (ADA: target "
                f"{self.ada_target}, adjusted every {self.ada_interval} steps, by at most 1 per {self.ada_kimg:g}k images)"
            )
        return f"d_augment {','.join(self.transforms)} on D's real and fake inputs, p={self.p:g}"


def augment(images: torch.Tensor, transforms: tuple[str, ...], p: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """``images`` (N, C, H, W) in [-1, 1] with each of ``transforms`` applied, in order, to
    each image with probability ``p`` (a 0-dim tensor on the images' device)."""
    for name in transforms:
        images = TRANSFORMS[name](images, p, gen)
    return images


def _uniform(n: int, images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """(n, 1, 1, 1) draws from U(0, 1) in the images' dtype."""
    return torch.rand(n, 1, 1, 1, generator=gen, device=images.device).to(images.dtype)


def _chosen(n: int, p: torch.Tensor, images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """(n, 1, 1, 1) bool: which images a transform applies to."""
    return torch.rand(n, 1, 1, 1, generator=gen, device=images.device) < p


def color(images: torch.Tensor, p: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    n = images.shape[0]
    brightness = _uniform(n, images, gen) - 0.5
    images = torch.where(_chosen(n, p, images, gen), images + brightness, images)
    pixel_mean = images.mean(dim=1, keepdim=True)
    saturation = _uniform(n, images, gen) * 2
    images = torch.where(_chosen(n, p, images, gen), (images - pixel_mean) * saturation + pixel_mean, images)
    image_mean = images.mean(dim=(1, 2, 3), keepdim=True)
    contrast = _uniform(n, images, gen) + 0.5
    return torch.where(_chosen(n, p, images, gen), (images - image_mean) * contrast + image_mean, images)


def translation(images: torch.Tensor, p: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    n, _, h, w = images.shape
    device = images.device
    reach_y, reach_x = int(h * TRANSLATION_FRACTION + 0.5), int(w * TRANSLATION_FRACTION + 0.5)
    shift_y = torch.randint(-reach_y, reach_y + 1, (n,), generator=gen, device=device)
    shift_x = torch.randint(-reach_x, reach_x + 1, (n,), generator=gen, device=device)
    chosen = _chosen(n, p, images, gen).view(n)
    shift_y, shift_x = shift_y * chosen, shift_x * chosen  # not chosen: no shift
    # Output pixel (y, x) reads input pixel (y - dy, x - dx); indices outside the image
    # read the zero border of a padded copy (index 0 or size + 1).
    rows = (torch.arange(h, device=device) - shift_y[:, None] + 1).clamp(0, h + 1)  # (n, h)
    cols = (torch.arange(w, device=device) - shift_x[:, None] + 1).clamp(0, w + 1)  # (n, w)
    padded = F.pad(images, (1, 1, 1, 1))
    batch = torch.arange(n, device=device)[:, None, None]
    moved = padded[batch, :, rows[:, :, None], cols[:, None, :]]  # (n, h, w, c): the indexed dims come first
    return moved.permute(0, 3, 1, 2).contiguous(memory_format=_memory_format(images))


def cutout(images: torch.Tensor, p: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    n, _, h, w = images.shape
    device = images.device
    size_y, size_x = int(h * CUTOUT_FRACTION + 0.5), int(w * CUTOUT_FRACTION + 0.5)
    # The square's first row and column: any position whose square overlaps the image by
    # at least half its side (its centre lies in the image).
    top = torch.randint(0, h, (n, 1, 1), generator=gen, device=device) - size_y // 2
    left = torch.randint(0, w, (n, 1, 1), generator=gen, device=device) - size_x // 2
    rows = torch.arange(h, device=device)[None, :, None]
    cols = torch.arange(w, device=device)[None, None, :]
    inside = (rows >= top) & (rows < top + size_y) & (cols >= left) & (cols < left + size_x)  # (n, h, w)
    cut = inside[:, None] & _chosen(n, p, images, gen)
    return torch.where(cut, torch.zeros((), dtype=images.dtype, device=device), images)


def _memory_format(images: torch.Tensor) -> torch.memory_format:
    if images.dim() == 4 and images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


TRANSFORMS = {"color": color, "translation": translation, "cutout": cutout}
