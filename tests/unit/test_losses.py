"""``loss``: the four losses, wgan's gradient penalty, lazy R1 and ``optim.d_steps``, in-process
on the CPU (dcgan/models/losses.py, dcgan/training/penalties.py). The penalty over two
ranks against one process: tests/ddp_checks.py; exact resume: tests/e2e/test_losses_resume.py."""

import math

import pytest
import torch
from torch import nn

from dcgan.base.checks import ConfigError
from dcgan.config.loading import load_config
from dcgan.models import losses
from dcgan.models.networks import ARCH_IMAGE_SIZE
from dcgan.run.distributed import DistInfo
from dcgan.training import penalties
from dcgan.training.setup import build_training
from dcgan.training.step import StepSettings, gan_step, stat_names

CPU = DistInfo(0, 0, 1, torch.device("cpu"))
LOGITS = torch.tensor([-3.0, -0.5, 0.0, 0.5, 3.0])


def test_each_loss_is_its_formula_on_d_outputs():
    real, fake = LOGITS, LOGITS.flip(0)
    sp = nn.functional.softplus
    expected = {
        "bce": (sp(-real).mean(), sp(fake).mean(), sp(-fake).mean()),
        "hinge": ((1 - real).clamp(min=0).mean(), (1 + fake).clamp(min=0).mean(), -fake.mean()),
        "lsgan": (0.5 * (real - 1).square().mean(), 0.5 * fake.square().mean(), 0.5 * (fake - 1).square().mean()),
        "wgan": (-real.mean(), fake.mean(), -fake.mean()),
    }
    for kind, (d_real, d_fake, g) in expected.items():
        got = losses.d_real_loss(kind, real, 1.0), losses.d_fake_loss(kind, fake), losses.g_loss(kind, fake)
        torch.testing.assert_close(torch.stack(got), torch.stack([d_real, d_fake, g]), msg=kind)
    # Label smoothing moves the real target of bce and lsgan.
    torch.testing.assert_close(losses.d_real_loss("lsgan", real, 0.9), 0.5 * (real - 0.9).square().mean())


def test_r1_and_the_gradient_penalty_measure_ds_input_gradient():
    w = torch.randn(1, 2, 3, 3)
    linear_d = lambda x: (x * w).sum(dim=(1, 2, 3))  # noqa: E731  grad_x D = w for every image
    real, fake = torch.randn(4, 2, 3, 3), torch.randn(4, 2, 3, 3)
    torch.testing.assert_close(penalties.r1_penalty(linear_d, real), w.square().sum())
    torch.testing.assert_close(penalties.wgan_gradient_penalty(linear_d, real, fake), (w.norm() - 1).square())


def test_the_penalty_pass_batch_norm_is_torchs_and_twice_differentiable():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.LeakyReLU(0.2), nn.Conv2d(4, 1, 6)
    ).train()
    nn.init.normal_(net[1].weight, 1.0, 0.3)
    x = torch.randn(5, 3, 8, 8)
    expected = net(x)
    with penalties.twice_differentiable(net) as twice:
        torch.testing.assert_close(twice(x), expected, rtol=1e-4, atol=1e-5)
        penalty = penalties.r1_penalty(lambda v: twice(v).view(-1), x)
        penalty.backward()  # a second derivative through batch norm
    # Biases shift a piecewise-linear net's input gradient nowhere: the weights carry the penalty's gradient.
    assert all(
        torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in (net[0].weight, net[1].weight, net[3].weight)
    )
    assert "forward" not in vars(net[1])  # the class's own forward is back
    running = net[1].running_mean.clone()
    with penalties.twice_differentiable(net) as twice:
        twice(x)
    assert torch.equal(net[1].running_mean, running)  # the penalty's pass leaves the statistics alone


def tiny_config(*overrides: str):
    return load_config(None, [
        "model.arch=kmnist", "model.image_size=28", "model.channels=1", "model.nz=8", "model.ngf=4", "model.ndf=4",
        "train.batch_size=4", *overrides,
    ])  # fmt: skip


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize(
    "overrides",
    [
        ["loss.kind=hinge"],
        ["loss.kind=lsgan", "optim.label_smoothing=0.1"],
        ["loss.kind=wgan"],
        ["loss.kind=bce", "loss.r1_gamma=1"],
        ["loss.kind=hinge", "loss.r1_gamma=0.5", "optim.d_steps=3"],
    ],
    ids=lambda o: " ".join(o),
)
def test_every_loss_and_penalty_trains_both_nets(overrides):
    cfg = tiny_config(*overrides)
    state, g_train, d_train = build_training(cfg, CPU)
    before = [[p.detach().clone() for p in net.parameters()] for net in (state.generator, state.discriminator)]
    reals = [images(4, seed) for seed in range(cfg.optim.d_steps)]
    stats = gan_step(state, g_train, d_train, reals, StepSettings.of(cfg), r1_due=cfg.loss.r1_due(16))
    assert stats.shape == (len(stat_names(cfg)),) and torch.isfinite(stats).all()
    for old, net in zip(before, (state.generator, state.discriminator)):
        assert all(not torch.equal(a, b) for a, b in zip(old, net.parameters()))
    if cfg.loss.penalised:
        assert stat_names(cfg)[-1] == "loss_d_penalty" and stats[-1] > 0


def test_d_steps_makes_that_many_d_updates_and_one_g_update():
    cfg = tiny_config("optim.d_steps=3")
    state, g_train, d_train = build_training(cfg, CPU)
    gan_step(state, g_train, d_train, [images(4, s) for s in range(3)], StepSettings.of(cfg))
    d_steps = {s["step"].item() for s in state.opt_d.state.values()}
    g_steps = {s["step"].item() for s in state.opt_g.state.values()}
    assert (d_steps, g_steps) == ({3.0}, {1.0})


def test_lazy_r1_is_due_every_r1_every_steps_and_weighted_by_it():
    loss = tiny_config("loss.r1_gamma=2", "loss.r1_every=4").loss
    assert [s for s in range(1, 13) if loss.r1_due(s)] == [4, 8, 12]
    assert not tiny_config().loss.r1_due(16)  # off by default
    w = torch.randn(1, 1, 28, 28)
    d = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 1, bias=False))
    d[1].weight.data = w.view(1, -1)
    term = penalties.penalty(d, images(3), images(3, 1), loss, True, lambda x: x)
    torch.testing.assert_close(term, 2 / 2 * 4 * w.square().sum())  # gamma/2 x r1_every x |w|^2
    assert not penalties.penalty(d, images(3), images(3, 1), loss, False, lambda x: x).requires_grad


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["loss.kind=wgan", "optim.label_smoothing=0.1"], "optim.label_smoothing: 0.1 smooths the real target"),
        (["loss.kind=hinge", "optim.label_smoothing=0.2"], "loss.kind=hinge has no target to smooth"),
        (["loss.kind=softmax"], "loss.kind"),
        (["optim.d_steps=0"], "optim.d_steps: must be >= 1"),
        (["loss.r1_gamma=-1"], "loss.r1_gamma: must be >= 0 and finite"),
        (["loss.r1_every=0"], "loss.r1_every: must be >= 1"),
        (["loss.gp_weight=.inf"], "loss.gp_weight: must be >= 0 and finite"),
    ],
)
def test_bad_loss_settings_are_one_line_naming_the_key(overrides, message):
    with pytest.raises(ConfigError) as caught:
        load_config(None, overrides)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_every_architecture_takes_a_gradient_penalty():
    for arch, size in ARCH_IMAGE_SIZE.items():
        channels = 1 if size == 28 else 3
        cfg = load_config(None, [
            f"model.arch={arch}", f"model.image_size={size}", f"model.channels={channels}", "model.ngf=4",
            "model.ndf=4", "train.batch_size=3", "loss.kind=wgan", "loss.r1_gamma=1",
        ])  # fmt: skip
        state, g_train, d_train = build_training(cfg, CPU)
        real = torch.rand(3, channels, size, size) * 2 - 1
        stats = gan_step(state, g_train, d_train, real, StepSettings.of(cfg), r1_due=True)
        assert torch.isfinite(stats).all() and stats[-1] > 0, arch


def test_spectral_norm_divides_each_d_weight_by_its_largest_singular_value():
    cfg = tiny_config("model.spectral_norm=true", "loss.kind=hinge")
    state, g_train, d_train = build_training(cfg, CPU)
    layers = [m for m in state.discriminator.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert layers and all(nn.utils.parametrize.is_parametrized(m, "weight") for m in layers)
    assert not any(nn.utils.parametrize.is_parametrized(m) for m in state.generator.modules())
    for _ in range(20):  # each D forward is one power iteration
        gan_step(state, g_train, d_train, images(4), StepSettings.of(cfg))
    for m in layers:
        sigma = torch.linalg.matrix_norm(m.weight.detach().flatten(1), ord=2)
        assert sigma.item() == pytest.approx(1.0, abs=0.05)


def test_spectral_norm_cannot_change_on_resume(tmp_path):
    from dcgan.checkpoint.resume import check_model_unchanged

    saved = tiny_config().to_dict()["model"]
    with pytest.raises(ConfigError, match="model.spectral_norm False -> True"):
        check_model_unchanged(saved, tiny_config("model.spectral_norm=true"), tmp_path / "step_00000010.pt")


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_penalties_and_d_steps_train_under_mixed_precision(precision):
    # The penalty's pass runs in float32 outside autocast; under fp16 the grad scaler scales it with D's loss.
    cfg = tiny_config(f"train.precision={precision}", "loss.kind=wgan", "loss.r1_gamma=1", "optim.d_steps=2")
    state, g_train, d_train = build_training(cfg, CPU)
    names = stat_names(cfg)
    updated = []
    for _ in range(20):  # fp16's scaler starts at 2**16 and skips the steps that overflow, halving it each time
        stats = dict(zip(names, gan_step(state, g_train, d_train, [images(4, 0), images(4, 1)],
                                         StepSettings.of(cfg), r1_due=True).tolist()))  # fmt: skip
        assert all(math.isfinite(stats[k]) for k in ("loss_d_real", "loss_d_fake", "loss_g", "loss_d_penalty"))
        assert stats["loss_d_penalty"] > 0
        updated.append(stats["skipped_d"] < 1 and stats["skipped_g"] == 0)
    assert updated[-1] and (all(updated) if precision == "bf16" else not updated[0])
