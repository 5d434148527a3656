"""Checks that need a real process group; run by test_train.py under
``torchrun --nproc_per_node=2 tests/ddp_checks.py`` (gloo on the CPU).

1. CPUSyncBatchNorm over two half-batches equals BatchNorm2d over the whole batch:
   output, input gradient, parameter gradients and running statistics.
2. One training step all-reduces D's gradients once (not once per backward, and not in
   the G step) and G's once, and leaves both nets identical on every rank.
3. The gradient average a CUDA graph runs instead of DDP (train_step.average_gradients)
   trains the nets as DDP does.
Prints "ddp checks passed" on rank 0; any failure raises (non-zero exit).
"""

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

from dcgan.config.sections import Config, DataConfig, TrainConfig
from dcgan.models.networks import ModelConfig
from dcgan.run import distributed
from dcgan.training.setup import build_training
from dcgan.training.step import average_gradients, gan_step
from dcgan.training.sync_batchnorm import CPUSyncBatchNorm, convert_sync_batchnorm


def check_sync_batchnorm(rank: int) -> None:
    torch.manual_seed(0)  # same full batch and upstream gradient on both ranks
    x_full = torch.randn(8, 3, 5, 5) * 3 + 1
    upstream = torch.randn(8, 3, 5, 5)
    reference = nn.BatchNorm2d(3)
    nn.init.normal_(reference.weight, 1.0, 0.5)
    nn.init.normal_(reference.bias, 0.0, 0.5)
    synced = convert_sync_batchnorm(nn.Sequential(reference), torch.device("cpu"))[0]
    assert isinstance(synced, CPUSyncBatchNorm)
    reference = nn.BatchNorm2d(3)
    reference.load_state_dict(synced.state_dict())

    x_ref = x_full.clone().requires_grad_()
    y_ref = reference(x_ref)
    (y_ref * upstream).sum().backward()
    half = slice(4 * rank, 4 * rank + 4)
    x_local = x_full[half].clone().requires_grad_()
    y_local = synced(x_local)
    (y_local * upstream[half]).sum().backward()

    torch.testing.assert_close(y_local, y_ref[half].detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x_local.grad, x_ref.grad[half], rtol=1e-4, atol=1e-5)
    for name in ("weight", "bias"):
        grad = getattr(synced, name).grad.clone()
        dist.all_reduce(grad)  # what DDP does with parameter gradients
        torch.testing.assert_close(grad, getattr(reference, name).grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(synced.running_mean, reference.running_mean)
    torch.testing.assert_close(synced.running_var, reference.running_var)


TINY = Config(
    data=DataConfig(shards="unused"),
    model=ModelConfig(arch="kmnist", image_size=28, channels=1, nz=8, ngf=4, ndf=4),
    train=TrainConfig(batch_size=6),
)


def check_one_all_reduce_per_network(info: distributed.DistInfo) -> None:
    cfg = TINY
    state, g_train, d_train = build_training(cfg, info)
    calls = {"G": 0, "D": 0}

    def counting(name):
        def hook(process_group, bucket):
            calls[name] += 1
            return allreduce_hook(process_group, bucket)

        return hook

    g_train.register_comm_hook(None, counting("G"))
    d_train.register_comm_hook(None, counting("D"))
    torch.manual_seed(100 + info.rank)  # each rank its own real batch and latents
    for _ in range(3):
        gan_step(state, g_train, d_train, torch.rand(6, 1, 28, 28) * 2 - 1, cfg.model.nz, None)
    assert calls == {"G": 3, "D": 3}, calls  # one bucket each, one all-reduce per step
    for net in (state.generator, state.discriminator):
        flat = torch.cat([p.detach().flatten() for p in net.parameters()])
        gathered = [torch.empty_like(flat) for _ in range(info.world_size)]
        dist.all_gather(gathered, flat)
        assert torch.equal(gathered[0], gathered[1]), "ranks diverged"


def check_graph_gradient_average(info: distributed.DistInfo) -> None:
    """Three steps with DDP, and three from the same start and data with the bare nets and
    average_gradients: the same nets, to float32 rounding (DDP divides before it sums)."""
    trained = []
    for ddp in (True, False):
        state, g_train, d_train = build_training(TINY, info)
        average = None if ddp else average_gradients
        if not ddp:
            g_train, d_train = g_train.module, d_train.module  # the bare (SyncBN) nets, as a graph runs them
        torch.manual_seed(100 + info.rank)
        for _ in range(3):
            gan_step(state, g_train, d_train, torch.rand(6, 1, 28, 28) * 2 - 1, TINY.model.nz, None, 1.0, average)
        trained.append(torch.cat([p.detach().flatten() for net in (state.generator, state.discriminator)
                                  for p in net.parameters()]))  # fmt: skip
    torch.testing.assert_close(trained[1], trained[0], rtol=1e-5, atol=1e-6)


def main() -> None:
    info = distributed.setup("cpu")
    try:
        check_sync_batchnorm(info.rank)
        check_one_all_reduce_per_network(info)
        check_graph_gradient_average(info)
        if info.is_main:
            print("ddp checks passed")
    finally:
        distributed.teardown()


if __name__ == "__main__":
    main()
