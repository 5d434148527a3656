"""SyncBatchNorm on every device: torch's on CUDA, a small one of ours on the CPU.

torch.nn.SyncBatchNorm only runs on GPUs (its kernels are CUDA-only and DDP refuses it in
a CPU module), yet CPU + gloo is how multi-process training is tested and debugged. On
the CPU, ``CPUSyncBatchNorm`` all-reduces per-channel sums and counts in the forward and
two per-channel gradient sums in the backward, around torch's fused batch-norm kernels.
Both forms have BatchNorm2d's parameters and buffers, so checkpoints move freely between
them, plain BatchNorm2d and any world size.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class _SyncBatchNormFunction(torch.autograd.Function):
    """Batch norm with statistics already reduced over all ranks. The backward is written
    out so that each pass over the activations is one of torch's fused CPU kernels (an
    autograd graph of elementwise ops cost 3-4x the native layer); the one all-reduce it
    needs is of the per-channel sums of dy and dy * (x - mean)."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean, var, count, eps):
        ctx.save_for_backward(x, weight, mean, var, count)
        ctx.eps = eps
        return torch.batch_norm(x, weight, bias, mean, var, False, 0.0, eps, False)

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, var, count = ctx.saved_tensors
        weight = torch.ones_like(mean) if weight is None else weight
        _, grad_weight, grad_bias = torch.ops.aten.native_batch_norm_backward(
            dy, x, weight, mean, var, None, None, False, ctx.eps, [False, True, True]
        )
        invstd = torch.rsqrt(var + ctx.eps)
        sums = torch.cat([grad_bias, grad_weight / invstd])  # this rank's sum dy, sum dy * (x - mean)
        dist.all_reduce(sums)
        mean_dy, mean_dy_xmu = (sums / count).chunk(2)
        # dx = w * invstd * (dy - mean_dy - (x - mean) * invstd^2 * mean_dy_xmu) = a*dy + c*x + d
        a = weight * invstd
        c = -a * invstd.square() * mean_dy_xmu
        d = -a * mean_dy - c * mean
        shape = (1, -1, 1, 1)
        dx = torch.addcmul(d.view(shape), x, c.view(shape)).addcmul_(dy, a.view(shape)).to(x.dtype)
        needs = ctx.needs_input_grad  # no gradient for a weight or bias that is None (affine=False)
        return dx, grad_weight if needs[1] else None, grad_bias if needs[2] else None, None, None, None, None


class CPUSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training-mode statistics cover the batches of all ranks."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        channels = x.shape[1]
        with torch.no_grad():  # the statistics' gradient is part of _SyncBatchNormFunction's backward
            local_mean, local_var = torch.batch_norm_update_stats(x.float(), None, None, 0.0)  # fp32 under autocast
            local_count = x.numel() // channels
            totals = torch.cat([local_mean, local_var + local_mean.square(), local_mean.new_ones(1)]) * local_count
            dist.all_reduce(totals)
            count = totals[-1]
            mean = totals[:channels] / count
            var = (totals[channels : 2 * channels] / count - mean.square()).clamp_min(0)
            if self.track_running_stats:
                self.num_batches_tracked.add_(1)
                momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean, momentum)
                self.running_var.lerp_(var * count / (count - 1), momentum)  # unbiased, as BatchNorm2d
        return _SyncBatchNormFunction.apply(x, self.weight, self.bias, mean, var, count, self.eps)


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
