"""Class-conditional nets (``model.conditional``): any architecture's G and D, told the class.

* G: z is multiplied element by element by the class's learnt embedding (nz numbers), as
  PyTorch-GAN's ACGAN does; the rest of the net is the arch's. Concatenating the embedding
  to z instead was measured on Fashion-MNIST: G learnt to ignore z and made one image per
  class (recall 0.000), even against an unconditional D.
* D: a projection discriminator (Miyato & Koyama 2018): D's features before its last
  layer, summed over the positions, are dotted with the class's embedding, and that is
  added to the arch's logit. D's layers are the arch's.

Both take ``(input, labels)``, labels int64 class indices in [0, num_classes); callers
pass the labels only to conditional nets (``net(x, *cond)`` with ``cond`` empty or
``(labels,)``), so unconditional nets stay the plain ``nn.Sequential`` lists.

Generation's classes (``G.sample(labels=...)``, ``dcgan.generate --class``): ``check_labels``
reads what a caller gives; when none is given they are drawn uniformly at random, from the
seed of the latents but never from the latents' own generator (``random_labels``,
``seed_labels``).
"""

from __future__ import annotations

import operator
from typing import Iterable, Sequence

import torch
from torch import nn

# Random classes for seed s come from a generator seeded with s + LABEL_SEED_OFFSET: above
# every latent seed (dcgan/models/latents.py's MAX_SEED is 2**63 - 1), so a class is never
# drawn from the generator of any image's latent.
LABEL_SEED_OFFSET = 2**63


class ConditionalGenerator(nn.Module):
    """G(z, labels) = net(z * embed(labels)): the class's learnt embedding scales z element by
    element, so the class reaches G only through z and G cannot learn to ignore z."""

    def __init__(self, net: nn.Module, num_classes: int, nz: int):
        super().__init__()
        self.embed = nn.Embedding(num_classes, nz)  # N(0, 1): z * embed keeps z's scale
        self.net = net

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.net(z * self.embed(labels).to(z.dtype).view(z.shape[0], -1, 1, 1))


class ProjectionDiscriminator(nn.Module):
    """D(x, labels) = head(h) + <embed(labels), sum of h over positions>, h = body(x): the
    arch's D split before its last layer (a conv or linear layer making the logit)."""

    def __init__(self, net: nn.Sequential, num_classes: int):
        super().__init__()
        *body, head = net
        self.body, self.head = nn.Sequential(*body), head
        width = head.in_channels if isinstance(head, nn.Conv2d) else head.in_features
        self.embed = nn.Embedding(num_classes, width)
        nn.init.normal_(self.embed.weight, 0.0, 0.02)  # the DCGAN init's scale: the projection starts small

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        pooled = h.sum(dim=(2, 3)) if h.dim() == 4 else h
        projection = (self.embed(labels).to(pooled.dtype) * pooled).sum(dim=1)
        return self.head(h).reshape(-1) + projection


def grid_labels(num_classes: int, num_samples: int) -> torch.Tensor:
    """A sample grid's classes: one row per class, ``num_samples // num_classes`` images a row (at least one)."""
    return torch.arange(num_classes).repeat_interleave(max(1, num_samples // num_classes))


def random_labels(n: int, num_classes: int, seed: int) -> torch.Tensor:
    """``n`` classes (int64) drawn uniformly from ``num_classes`` by a generator seeded with
    ``seed + LABEL_SEED_OFFSET``: ``G.sample(n, seed=seed)``'s classes when none are given."""
    return torch.randint(num_classes, (n,), generator=torch.Generator().manual_seed(seed + LABEL_SEED_OFFSET))


def seed_labels(seeds: Iterable[int], num_classes: int) -> torch.Tensor:
    """One random class per seed, seed s's from its own generator (``random_labels(1, ., s)``),
    whatever the other seeds: ``G.sample(seeds=...)``'s classes when none are given."""
    return torch.cat([random_labels(1, num_classes, s) for s in seeds])


def check_labels(labels: int | Sequence[int] | torch.Tensor, n: int, num_classes: int) -> torch.Tensor:
    """``labels`` as n int64 classes on the CPU: an int means all n of that class, else one
    per image (a sequence, array or integer tensor). ValueError in one line for another
    length, a non-integer, or a class outside 0..num_classes-1."""
    if isinstance(labels, torch.Tensor):
        if labels.dim() > 1 or labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise ValueError(
                f"labels must be class indices, got a {labels.dtype} tensor of shape {tuple(labels.shape)}"
            )
        labels = labels.tolist()  # an int, or a list of them
    single = not isinstance(labels, Iterable) or isinstance(labels, (str, bytes))
    classes = [_class_index(labels)] if single else [_class_index(k) for k in labels]
    if not single and len(classes) != n:
        raise ValueError(
            f"labels gives {len(classes)} classes for {n} images: give one class (an int) or one per image"
        )
    wrong = next((k for k in classes if not 0 <= k < num_classes), None)
    if wrong is not None:
        raise ValueError(
            f"class {wrong} is not one of this generator's {num_classes} classes: labels lie in 0..{num_classes - 1}"
        )
    return torch.full((n,), classes[0], dtype=torch.int64) if single else torch.tensor(classes, dtype=torch.int64)


def _class_index(k) -> int:
    """``k`` as an int (numpy's too; not a bool, float or string); ValueError otherwise."""
    try:
        if isinstance(k, bool):
            raise TypeError
        return operator.index(k)
    except TypeError:
        raise ValueError(f"labels must be class indices (ints), got {k!r}") from None
