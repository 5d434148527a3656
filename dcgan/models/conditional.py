"""Class-conditional nets (``model.conditional``): any architecture's G and D, told the class.

* G: the class's embedding (a vector of nz numbers, learnt) joins z as nz more input
  channels of G's first layer (conditional GANs, Mirza & Osindero 2014); the rest of the
  net is the arch's.
* D: a projection discriminator (Miyato & Koyama 2018): D's features before its last
  layer, summed over the positions, are dotted with the class's embedding, and that is
  added to the arch's logit. D's layers are the arch's.

Both take ``(input, labels)``, labels int64 class indices in [0, num_classes); callers
pass the labels only to conditional nets (``net(x, *cond)`` with ``cond`` empty or
``(labels,)``), so unconditional nets stay the plain ``nn.Sequential`` lists.
"""

from __future__ import annotations

import torch
from torch import nn


class ConditionalGenerator(nn.Module):
    """G(z, labels) = net([z, embed(labels)]); ``net`` takes 2 x nz input channels."""

    def __init__(self, net: nn.Module, num_classes: int, nz: int):
        super().__init__()
        self.embed = nn.Embedding(num_classes, nz)  # N(0, 1), on the scale of z
        self.net = net

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        code = self.embed(labels).to(z.dtype).view(z.shape[0], -1, 1, 1)
        return self.net(torch.cat([z, code], dim=1))


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
