"""SyncBatchNorm on every device: torch's on CUDA, a small autograd version on the CPU.

torch.nn.SyncBatchNorm only runs on GPUs (its kernels are CUDA-only and DDP refuses it in
a CPU module), yet CPU + gloo is how multi-process training is tested and debugged. On
the CPU, ``CPUSyncBatchNorm`` all-reduces per-channel sums with the differentiable
``torch.distributed.nn.functional.all_reduce``, so autograd supplies the synchronised
backward too. Both forms have BatchNorm2d's parameters and buffers, so checkpoints move
freely between them, plain BatchNorm2d and any world size.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class CPUSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training-mode statistics cover the batches of all ranks."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        channels = x.shape[1]
        xf = x.float()  # statistics in fp32 under any autocast dtype
        local_count = torch.tensor([xf.numel() / channels], device=x.device)
        totals = _AllReduceSum.apply(torch.cat([xf.sum((0, 2, 3)), xf.square().sum((0, 2, 3)), local_count]))
        count = totals[-1]
        mean = totals[:channels] / count
        var = (totals[channels : 2 * channels] / count - mean.square()).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean, momentum)
                self.running_var.lerp_(var * count / (count - 1), momentum)  # unbiased, as BatchNorm2d
        y = (xf - mean[None, :, None, None]) * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y.to(x.dtype)


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Replace every BatchNorm2d of ``module`` by the SyncBN form for ``device``."""
    if device.type != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, CPUSyncBatchNorm):
        synced = CPUSyncBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
        )
        synced.load_state_dict(module.state_dict())
        synced.train(module.training)
        return synced
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchnorm(child, device))
    return module
