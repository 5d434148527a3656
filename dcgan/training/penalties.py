"""D's gradient penalties in the training step: wgan's gradient penalty and lazy R1
(``loss.gp_weight``, ``loss.r1_gamma``; dcgan/models/losses.py says what each one is).

A penalty is a function of D's gradient, so its own gradient is a second derivative and
D's forward must be twice differentiable. SyncBN is not (torch's CUDA kernels and the CPU
one in dcgan/training/sync_batchnorm.py have hand-written first derivatives only), so the
penalty's pass runs D with each training-mode batch norm written out in autograd
operations (``twice_differentiable``): SyncBN layers sum their statistics over the ranks
with an all-reduce whose backward all-reduces in turn (_SumOverRanks), so the
penalty under DDP is the penalty of the global batch; plain batch norm keeps this rank's
batch. That pass updates no running statistics.

The pass runs on the bare D, outside DDP (nothing is reduced by it), and its gradients
are left in D's ``.grad`` for the last backward of the D update, whose all-reduce averages
them with the loss's over the ranks (dcgan/training/step.py). It runs in float32, outside
autocast: a gradient of a gradient loses too much in 16 bits, and it is due rarely (lazy
R1) or on a mix of images (wgan).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from dcgan.models.losses import LossConfig
from dcgan.training.sync_batchnorm import CPUSyncBatchNorm

_SYNCED = (CPUSyncBatchNorm, nn.SyncBatchNorm)


class _SumOverRanks(torch.autograd.Function):
    """The sum of a tensor over the ranks, differentiable any number of times: the gradient
    of each rank's input is the sum of the gradients over the ranks, itself this function
    (torch.distributed.nn's all_reduce does the same, and is deprecated)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        total = x.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return _SumOverRanks.apply(grad)


def penalty(
    D: nn.Module,
    real: torch.Tensor,
    fake: torch.Tensor,
    loss: LossConfig,
    r1_due: bool,
    augment: Callable[[torch.Tensor], torch.Tensor],
    cond: tuple[torch.Tensor, ...] = (),
) -> torch.Tensor:
    """The gradient penalties due in this D update, as one term of D's loss (a 0 with no
    graph when none is). ``augment``: what D's inputs go through (d_augment), differentiably;
    ``cond``: a conditional D's (labels,), else ()."""
    total = torch.zeros((), device=real.device)
    if not (loss.gradient_penalty or r1_due):
        return total
    with twice_differentiable(D) as d_twice:

        def d_forward(x: torch.Tensor) -> torch.Tensor:
            return d_twice(augment(x), *cond).view(-1).float()

        if loss.gradient_penalty:
            total = total + loss.gp_weight * wgan_gradient_penalty(d_forward, real, fake)
        if r1_due:  # lazy: weighted by the steps it stands for
            total = total + loss.r1_gamma / 2 * loss.r1_every * r1_penalty(d_forward, real)
    return total


def r1_penalty(d_forward: Callable[[torch.Tensor], torch.Tensor], real: torch.Tensor) -> torch.Tensor:
    """The batch mean of |grad_x D(x)|^2 at the real images."""
    x = real.detach().float().requires_grad_(True)
    (grad,) = torch.autograd.grad(d_forward(x).sum(), x, create_graph=True)
    return grad.square().sum(dim=(1, 2, 3)).mean()


def mixing_weights(n: int, like: torch.Tensor) -> torch.Tensor:
    """wgan's mixing weights e ~ U(0, 1), one per image, from the global generator (as the latents are)."""
    return torch.rand(n, 1, 1, 1, device=like.device)


def wgan_gradient_penalty(
    d_forward: Callable[[torch.Tensor], torch.Tensor], real: torch.Tensor, fake: torch.Tensor
) -> torch.Tensor:
    """The batch mean of (|grad D(x_mix)| - 1)^2 at x_mix = e * real + (1 - e) * fake (Gulrajani et al. 2017)."""
    e = mixing_weights(real.shape[0], real)
    x = torch.lerp(fake.detach().float(), real.detach().float(), e).requires_grad_(True)
    (grad,) = torch.autograd.grad(d_forward(x).sum(), x, create_graph=True)
    norm = grad.square().sum(dim=(1, 2, 3)).add(1e-12).sqrt()  # 1e-12: a finite gradient at a zero norm
    return (norm - 1).square().mean()


def _batch_norm_twice_differentiable(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """Training-mode batch norm in autograd operations; a SyncBN layer's statistics cover all ranks."""
    xf = x.float()
    sums = torch.cat([xf.sum(dim=(0, 2, 3)), xf.square().sum(dim=(0, 2, 3))])
    count = x.numel() // x.shape[1]
    if isinstance(bn, _SYNCED) and dist.is_initialized() and dist.get_world_size() > 1:
        sums = _SumOverRanks.apply(sums)
        count *= dist.get_world_size()
    mean, mean_sq = (sums / count).chunk(2)
    var = (mean_sq - mean.square()).clamp(min=0)
    shape = (1, -1, 1, 1)
    y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + bn.eps)
    if bn.affine:
        y = y * bn.weight.view(shape) + bn.bias.view(shape)
    return y.to(x.dtype)


@contextlib.contextmanager
def twice_differentiable(net: nn.Module) -> Iterator[nn.Module]:
    """``net`` with each training-mode batch norm computed by ``_batch_norm_twice_differentiable``
    for as long as the context lasts (an instance attribute shadows the class's forward)."""
    layers = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    for bn in layers:
        bn.forward = lambda x, bn=bn: _batch_norm_twice_differentiable(bn, x)
    try:
        yield net
    finally:
        for bn in layers:
            del bn.forward
