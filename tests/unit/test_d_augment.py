"""d_augment: the differentiable transforms D's inputs go through (dcgan/models/d_augment.py)
and ADA's control of their probability (dcgan/training/ada.py), in-process on the CPU.
Exact resume with them on, and the statistic over two ranks: tests/e2e/test_d_augment_resume.py
and tests/ddp_checks.py."""

import itertools
import re

import pytest
import torch

from dcgan.base.checks import ConfigError
from dcgan.config.loading import load_config
from dcgan.models.d_augment import POLICIES, augment
from dcgan.models.networks import ARCH_IMAGE_SIZE
from dcgan.run.distributed import DistInfo
from dcgan.training import ada
from dcgan.training.setup import build_training
from dcgan.training.step import StepSettings, gan_step

CPU = DistInfo(0, 0, 1, torch.device("cpu"))
SUBSETS = [",".join(c) for r in (1, 2, 3) for c in itertools.combinations(POLICIES, r)]
SHAPES = [(1, 28), (3, 64)]  # (channels, size): the grey digits' and the RGB sets'


def images(n: int, channels: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def draw(x: torch.Tensor, policy: str, p: float, seed: int = 1) -> torch.Tensor:
    return augment(x, tuple(policy.split(",")), torch.tensor(p), torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("channels, size", SHAPES)
@pytest.mark.parametrize("policy", SUBSETS)
def test_at_p_0_every_policy_is_the_identity_bit_for_bit(policy, channels, size):
    x = images(8, channels, size)
    assert torch.equal(draw(x, policy, 0.0), x)


@pytest.mark.parametrize("channels, size", SHAPES)
@pytest.mark.parametrize("policy", POLICIES)
def test_each_transform_changes_images_and_passes_a_finite_nonzero_gradient(policy, channels, size):
    x = images(8, channels, size).requires_grad_()
    out = draw(x, policy, 1.0)
    assert out.shape == x.shape and not torch.equal(out, x)
    (out * images(8, channels, size, seed=5)).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_the_draws_come_from_the_given_generator_alone():
    x = images(16, 3, 64)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a, b = draw(x, "color,translation,cutout", 0.5, seed=7), draw(x, "color,translation,cutout", 0.5, seed=7)
    assert torch.equal(a, b) and torch.equal(torch.get_rng_state(), before)
    assert not torch.equal(a, draw(x, "color,translation,cutout", 0.5, seed=8))


def test_translation_shifts_by_whole_pixels_up_to_an_eighth_and_cutout_cuts_half_the_side():
    ones = torch.ones(64, 1, 64, 64)
    shifted = draw(ones, "translation", 1.0)
    # An image of ones shifted by (dy, dx) keeps a (64 - |dy|) x (64 - |dx|) block of ones, zeros elsewhere.
    rows_kept = (shifted.amax(dim=3) > 0).sum(dim=(1, 2))
    assert set(rows_kept.tolist()) <= set(range(56, 65)) and len(set(rows_kept.tolist())) > 3
    assert set(shifted.unique().tolist()) == {0.0, 1.0}
    cut = draw(ones, "cutout", 1.0)
    zeros = (cut == 0).sum(dim=(1, 2, 3))
    assert zeros.max() == 32 * 32 and zeros.min() >= 16 * 16  # a 32 x 32 square, at least a quarter inside


@pytest.mark.parametrize("p, share", [(0.25, 0.25), (0.75, 0.75)])
def test_p_is_the_share_of_images_a_transform_applies_to(p, share):
    x = torch.ones(4000, 1, 8, 8)
    changed = (draw(x, "cutout", p) != x).flatten(1).any(dim=1).float().mean()
    assert abs(changed.item() - share) < 0.03


def test_layout_and_dtype_are_kept():
    x = images(4, 3, 64).contiguous(memory_format=torch.channels_last)
    out = draw(x, "color,translation,cutout", 1.0)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert draw(x.bfloat16(), "color,translation,cutout", 1.0).dtype == torch.bfloat16
    assert draw(images(4, 3, 64), "translation", 1.0).is_contiguous()


@pytest.mark.parametrize("arch", sorted(ARCH_IMAGE_SIZE))
def test_g_learns_through_the_augmentation_in_every_architecture(arch):
    size = ARCH_IMAGE_SIZE[arch]
    channels = 1 if size == 28 else 3
    cfg = load_config(None, [
        f"model.arch={arch}", f"model.image_size={size}", f"model.channels={channels}", "model.ngf=8", "model.ndf=8",
        "train.batch_size=4", "d_augment.policy=color,translation,cutout", "d_augment.p=1",
    ])  # fmt: skip
    state, g_train, d_train = build_training(cfg, CPU)
    augmenter = ada.DAugment(cfg.d_augment, state, 0, CPU, 4)
    augmenter.begin(1)
    before = [p.detach().clone() for p in state.generator.parameters()]
    stats = gan_step(
        state, g_train, d_train, images(4, channels, size), StepSettings(cfg.model.nz), d_augment=augmenter
    )
    assert torch.isfinite(stats).all()
    moved = [not torch.equal(a, b) for a, b in zip(before, state.generator.parameters())]
    assert all(moved), f"{arch}: G parameters left unchanged by a step through the augmentation"


def test_ada_moves_p_towards_the_target_every_interval_and_stays_in_0_1():
    cfg = load_config(None, ["d_augment.policy=translation", "d_augment.p=ada", "d_augment.ada_kimg=0.1"]).d_augment
    state = build_training(load_config(None, ["d_augment.policy=translation", "d_augment.p=ada"]), CPU)[0]
    assert state.aug_p.item() == 0.0
    augmenter = ada.DAugment(cfg, state, 0, CPU, batch_size=10)  # 40 images per interval: p moves 0.4 at most
    sure = torch.ones(10)  # D calls every real image real: r_t = 1 > 0.6, so p rises
    for step in range(1, 13):
        augmenter.begin(step)
        augmenter.observe(sure)
        augmenter.end(step)
        assert state.aug_p.item() == pytest.approx(min(1.0, 0.4 * (step // 4)))
    assert state.d_real_sign.item() == 1.0
    for step in range(13, 29):  # r_t = -1 < 0.6: p falls back to 0 and stays there
        augmenter.begin(step)
        augmenter.observe(-sure)
        augmenter.end(step)
    assert state.aug_p.item() == 0.0 and augmenter.stats().tolist() == [0.0, -1.0]


@pytest.mark.parametrize(
    "override, message",
    [
        ("d_augment.policy=color,blur", "d_augment.policy: 'blur' is not one of color, translation, cutout"),
        ("d_augment.policy=color,color", "d_augment.policy: names a transform twice"),
        ("d_augment.p=1.5", "d_augment.p: must lie in [0, 1] or be ada, not 1.5"),
        ("d_augment.p=-0.5", "d_augment.p: must lie in [0, 1] or be ada"),
        ("d_augment.p=often", "d_augment.p: expected float|ada"),
        ("d_augment.ada_interval=0", "d_augment.ada_interval: must be >= 1"),
        ("d_augment.ada_kimg=0", "d_augment.ada_kimg: must be > 0"),
        ("d_augment.ada_target=1", "d_augment.ada_target: must lie in (0, 1)"),
    ],
)
def test_bad_settings_name_the_key(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [override])
