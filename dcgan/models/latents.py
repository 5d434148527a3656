"""Latents for generation: a batch from one seed, one latent per seed, and truncation.

Two ways to seed (``dcgan.generate`` and ``G.sample`` take both):

- one seed for a batch (``-n N --seed S``, ``G.sample(n, seed=S)``): ``draw(n, ...)`` from one
  ``torch.Generator`` seeded with S. Image i depends on S and on n.
- a seed per image (``--seeds 0-99``, ``G.sample(seeds=range(100))``): seed s's latent is
  ``draw(1, ...)`` from its own ``torch.Generator().manual_seed(s)``, so it depends on s alone,
  not on the other seeds asked for or their order; it is also ``G.sample(1, seed=s)``'s.

Truncation (BigGAN's truncation trick, Brock et al. 2019, sec. 3.1): each coordinate of z
is N(0, 1) truncated to [-psi, psi]. The normal draw is made as without truncation and
only the coordinates outside [-psi, psi] are drawn again, from the same generator, until
all fit: a coordinate already inside keeps its value, and a psi above every |z| gives the
untruncated latents. psi is the threshold itself (as in the paper), not a scale on a fixed
[-2, 2] truncation (pytorch-pretrained-BigGAN's ``truncated_noise_sample``). Smaller psi:
less variety, more typical images. The redraws are exact samples of the truncated normal:
normal draws kept when inside for psi >= sqrt(pi/2), else uniform proposals on [-psi, psi]
kept with probability exp(-x^2 / 2) (fewer draws for a small psi). Latents are drawn on the
CPU, so they are the same on every machine.
"""

from __future__ import annotations

import math
import numbers
import operator
import re
from typing import Iterable

import torch

from dcgan.models.networks import sample_latent

MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes more, but the configs' seeds stop here
# Above it a rejected coordinate is drawn again from N(0, 1), below it from a uniform
# proposal: the bound where both accept as often (erf(psi/sqrt2) vs sqrt(2pi) erf(psi/sqrt2) / 2psi).
_NORMAL_PROPOSAL_FROM = math.sqrt(math.pi / 2)
_SEED_ITEM = re.compile(r"(\d+)(?:-(\d+))?")


def parse_seeds(text: str) -> list[int]:
    """Seeds from a list like ``0-99``, ``3,7,11`` or ``0-9,20-29`` (inclusive ranges and
    single seeds, comma-separated, spaces allowed), in the order written; a seed written
    twice is kept twice. ValueError in one line for anything else: an empty list or item,
    a backwards range (``5-2``), a negative seed, a seed above MAX_SEED, or not a number."""
    if not text.strip():
        raise ValueError("no seeds given: write them like 0-99, 3,7,11 or 0-9,20-29")
    seeds: list[int] = []
    for item in text.split(","):
        item = item.strip()
        found = _SEED_ITEM.fullmatch(item)
        if not found and re.fullmatch(r"-\d+(-\d+)?", item):
            raise ValueError(f"{item} in seed list {text!r}: seeds are 0 or more")
        if not found:
            what = "an empty item" if not item else f"{item!r}"
            raise ValueError(
                f"{what} in seed list {text!r}: seeds are whole numbers 0..{MAX_SEED} or ranges A-B, "
                "comma-separated (0-99, 3,7,11, 0-9,20-29)"
            )
        first = int(found.group(1))
        last = int(found.group(2)) if found.group(2) is not None else first
        if last < first:
            raise ValueError(f"seed range {item} runs backwards: write {last}-{first}")
        if last > MAX_SEED:
            raise ValueError(f"seed {last} in {text!r} is above the largest seed, {MAX_SEED}")
        seeds.extend(range(first, last + 1))
    return seeds


def check_seeds(seeds: Iterable[int] | str) -> list[int]:
    """``seeds`` as a list of ints: a string goes through parse_seeds; ValueError when
    empty or when a seed is not an int in 0..MAX_SEED."""
    if isinstance(seeds, str):
        return parse_seeds(seeds)
    checked = []
    for s in seeds:
        try:
            seed = operator.index(s)  # an int, numpy's too; not a float or a string
        except TypeError:
            seed = -1
        if isinstance(s, bool) or not 0 <= seed <= MAX_SEED:
            raise ValueError(f"seeds must be ints in 0..{MAX_SEED}, got {s!r}")
        checked.append(seed)
    if not checked:
        raise ValueError("seeds is empty")
    return checked


def check_truncation(psi: float | None) -> float | None:
    """``psi`` as a float; None stays None (no truncation). ValueError unless finite and > 0."""
    if psi is None:
        return None
    if isinstance(psi, bool) or not isinstance(psi, numbers.Real) or not math.isfinite(psi) or psi <= 0:
        raise ValueError(f"truncation must be a finite number > 0 (like 0.5 .. 2), got {psi!r}")
    return float(psi)


def draw(n: int, nz: int, generator: torch.Generator, truncation: float | None = None) -> torch.Tensor:
    """``n`` latents (n, nz, 1, 1) on the CPU from ``generator``: ``sample_latent``'s N(0, 1)
    draw, then, with ``truncation`` psi, every coordinate outside [-psi, psi] drawn again
    (module docstring). Without truncation the draw is ``sample_latent``'s, value for value."""
    z = sample_latent(n, nz, generator=generator)
    psi = check_truncation(truncation)
    if psi is None:
        return z
    flat = z.view(-1)
    outside = torch.nonzero(flat.abs() > psi).squeeze(1)
    while outside.numel():
        flat[outside] = _proposals(outside.numel(), psi, generator)
        outside = outside[flat[outside].abs() > psi]
    return z


def _proposals(k: int, psi: float, generator: torch.Generator) -> torch.Tensor:
    """``k`` draws that are N(0, 1) truncated to [-psi, psi] where they fall inside it; the
    caller draws again where they do not (a value outside marks a rejected one)."""
    if psi >= _NORMAL_PROPOSAL_FROM:
        return torch.randn(k, generator=generator)
    x = (torch.rand(k, generator=generator) * 2 - 1) * psi
    keep = torch.rand(k, generator=generator) < torch.exp(-0.5 * x * x)
    return torch.where(keep, x, torch.full_like(x, math.inf))


def seed_latents(seeds: Iterable[int], nz: int, truncation: float | None = None) -> torch.Tensor:
    """One latent per seed, (len(seeds), nz, 1, 1): seed s's is ``draw(1, nz, ...)`` from its
    own ``torch.Generator().manual_seed(s)``, whatever the other seeds."""
    return torch.cat([draw(1, nz, torch.Generator().manual_seed(s), truncation) for s in seeds])
