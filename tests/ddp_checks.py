"""Checks that need a real process group; run by test_train.py under
``torchrun --nproc_per_node=2 tests/ddp_checks.py`` (gloo on the CPU).

1. CPUSyncBatchNorm over two half-batches equals BatchNorm2d over the whole batch:
   output, input gradient, parameter gradients and running statistics.
2. One training step all-reduces D's gradients once (not once per backward, and not in
   the G step) and G's once, and leaves both nets identical on every rank.
3. The gradient average a CUDA graph runs instead of DDP (train_step.average_gradients)
   trains the nets as DDP does.
4. ADA's statistic is the mean over both ranks' real images, and both ranks apply the same p.
5. Gradient penalties (wgan's and R1, through DDP and SyncBN) on two ranks give D the
   gradients of one process on the whole batch.
Prints "ddp checks passed" on rank 0; any failure raises (non-zero exit).
"""

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel as DDP

from dcgan.checkpoint.state import TrainState
from dcgan.config.sections import Config, DataConfig, TrainConfig
from dcgan.models.d_augment import DAugmentConfig
from dcgan.models.losses import LossConfig
from dcgan.models.networks import ModelConfig, build_models
from dcgan.run import distributed
from dcgan.training import ada, penalties
from dcgan.training.setup import NO_FORWARD_BUFFER_SYNC, build_training
from dcgan.training.step import StepSettings, average_gradients, gan_step
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
        gan_step(state, g_train, d_train, torch.rand(6, 1, 28, 28) * 2 - 1, StepSettings(cfg.model.nz))
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
            gan_step(state, g_train, d_train, torch.rand(6, 1, 28, 28) * 2 - 1, StepSettings(TINY.model.nz), average)
        trained.append(torch.cat([p.detach().flatten() for net in (state.generator, state.discriminator)
                                  for p in net.parameters()]))  # fmt: skip
    torch.testing.assert_close(trained[1], trained[0], rtol=1e-5, atol=1e-6)


def check_ada_over_ranks(info: distributed.DistInfo) -> None:
    """Rank 0's D calls 3 of 4 real images real, rank 1's 1 of 4: r_t is 0 on both (each
    rank alone would see +0.5 or -0.5), so p falls to 0 on both; then 3 of 4 on both (r_t
    0.5, below the target 0.6) keeps it there, and 4 of 4 (r_t 1) takes it to 1."""
    cfg = Config(d_augment=DAugmentConfig(policy="cutout", p="ada", ada_interval=2, ada_kimg=0.016))
    state = build_training(TINY, info)[0]
    ada.initial_state(cfg.d_augment, state, info.device)
    state.aug_p.fill_(0.5)
    augmenter = ada.DAugment(cfg.d_augment, state, 0, info, batch_size=4)  # 16 images an interval: p moves 1
    logits = torch.tensor([1.0, 1.0, 1.0, -1.0] if info.rank == 0 else [1.0, -1.0, -1.0, -1.0])
    for step in (1, 2):
        augmenter.observe(logits)
        augmenter.end(step)
    assert state.d_real_sign.item() == 0.0, state.d_real_sign
    mine = torch.stack([state.aug_p, state.d_real_sign])
    both = [torch.zeros(2) for _ in range(2)]
    dist.all_gather(both, mine)
    assert torch.equal(both[0], both[1]) and both[0][0].item() == 0.0, both
    for step in (3, 4):
        augmenter.observe(torch.tensor([1.0, 1.0, 1.0, -1.0]))
        augmenter.end(step)
    assert state.d_real_sign.item() == 0.5 and state.aug_p.item() == 0.0  # 0.5 < 0.6: p stays at 0
    for step in (5, 6):
        augmenter.observe(torch.tensor([1.0, 1.0, 1.0, 1.0]))
        augmenter.end(step)
    assert state.d_real_sign.item() == 1.0 and state.aug_p.item() == 1.0


class FixedFakes(nn.Module):
    """A stand-in G whose "fakes" are its parameter: the same images whatever the latents."""

    def __init__(self, fakes: torch.Tensor):
        super().__init__()
        self.fakes = nn.Parameter(fakes.clone())

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.fakes


def check_penalties_over_ranks(info: distributed.DistInfo) -> None:
    """wgan's gradient penalty and R1 on two ranks of 6 images (DDP, SyncBN) give D the
    gradients, and the update, of one process on the 12 (plain batch norm)."""
    cfg = Config(model=TINY.model, loss=LossConfig(kind="wgan", r1_gamma=2.0, r1_every=1))
    torch.manual_seed(5)  # the same images and mixing weights on both ranks, and in the reference
    real, fake, mix = torch.rand(12, 1, 28, 28) * 2 - 1, torch.rand(12, 1, 28, 28) * 2 - 1, torch.rand(12, 1, 1, 1)
    half = slice(6 * info.rank, 6 * info.rank + 6)
    trained = []
    for world in (2, 1):
        torch.manual_seed(0)
        D = build_models(cfg)[1]
        if world == 2:
            D = DDP(convert_sync_batchnorm(D, info.device), **NO_FORWARD_BUFFER_SYNC)
        bare = D.module if world == 2 else D
        G = FixedFakes(fake[half] if world == 2 else fake)
        state = TrainState(G, bare, None, torch.optim.Adam(G.parameters()), torch.optim.Adam(bare.parameters()),
                           torch.amp.GradScaler("cpu", enabled=False), torch.amp.GradScaler("cpu", enabled=False))  # fmt: skip
        penalties.mixing_weights = lambda n, like, e=(mix[half] if world == 2 else mix): e
        stats = gan_step(state, G, D, real[half] if world == 2 else real, StepSettings.of(cfg), r1_due=True)
        assert stats[-1] > 0  # a penalty was added
        trained.append([torch.cat([p.grad.flatten() for p in bare.parameters()]),
                        torch.cat([p.detach().flatten() for p in bare.parameters()])])  # fmt: skip
    torch.testing.assert_close(trained[0][0], trained[1][0], rtol=1e-4, atol=1e-6)  # D's gradients
    torch.testing.assert_close(trained[0][1], trained[1][1], rtol=1e-5, atol=1e-6)  # D after its update


def main() -> None:
    info = distributed.setup("cpu")
    try:
        check_sync_batchnorm(info.rank)
        check_one_all_reduce_per_network(info)
        check_graph_gradient_average(info)
        check_ada_over_ranks(info)
        check_penalties_over_ranks(info)
        if info.is_main:
            print("ddp checks passed")
    finally:
        distributed.teardown()


if __name__ == "__main__":
    main()
