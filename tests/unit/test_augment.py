"""dcgan.data.augment: the seeds' flip + affine, batched and seeded, exactly as torchvision defines it."""

from __future__ import annotations

import pytest
import torch
import torchvision.transforms.v2.functional as TF

from dcgan.config.sections import AugmentConfig
from dcgan.data.augment import AugmentParams, apply, augment, draw_params

# configs/pumpkins.yaml's data.augment
PUMPKINS = AugmentConfig(hflip=True, degrees=5.0, translate=(0.05, 0.025), scale=(0.95, 1.05), shear=0.025)
# Large enough that a wrong sign, centre or axis moves most pixels, not a few.
STRONG = AugmentConfig(hflip=True, degrees=45.0, translate=(0.2, 0.3), scale=(0.6, 1.4), shear=30.0)
FLIP_ONLY = AugmentConfig(hflip=True)
NONE = AugmentConfig()


def random_images(n: int, channels: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """uint8 noise: every pixel differs from its neighbours, so any misplaced sample shows."""
    return torch.randint(
        0, 256, (n, channels, height, width), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)
    )


def torchvision_reference(images: torch.Tensor, params: AugmentParams) -> torch.Tensor:
    """RandomHorizontalFlip then v2.functional.affine (nearest, fill=None), one uint8 image at a time."""
    out = []
    for i, image in enumerate(images):
        if params.flip[i]:
            image = image.flip(-1)
        tx, ty = params.translate[i].tolist()
        assert tx == int(tx) and ty == int(ty)
        out.append(
            TF.affine(
                image,
                angle=float(params.angle[i]),
                translate=[int(tx), int(ty)],
                scale=float(params.scale[i]),
                shear=[float(params.shear[i]), 0.0],
            )
        )
    return torch.stack(out).float()


@pytest.mark.parametrize(
    "cfg, shape",
    [(PUMPKINS, (3, 64, 64)), (PUMPKINS, (1, 28, 28)), (STRONG, (3, 64, 64)), (STRONG, (1, 37, 52))],
    ids=["pumpkins-rgb64", "pumpkins-grey28", "strong-rgb64", "strong-grey37x52"],
)
def test_matches_torchvision_pixel_for_pixel(cfg, shape):
    images = random_images(16, *shape)
    params = draw_params(16, cfg, torch.Generator().manual_seed(3), *shape[1:])
    assert 0 < params.flip.sum() < 16  # both branches are exercised
    assert (params.translate != 0).any()

    batched = apply(images.float(), params, cfg)

    # Exact: the same float64 matrix, the same float32 grid arithmetic, nearest sampling.
    expected = torchvision_reference(images, params)
    assert batched.dtype == torch.float32 and batched.shape == images.shape
    mismatched = (batched != expected).sum().item()
    assert mismatched == 0, f"{mismatched} of {expected.numel()} values differ from torchvision"


def test_parameters_follow_the_definition():
    n, height, width = 20_000, 48, 80  # not square: tx must scale with the width, ty with the height
    p = draw_params(n, PUMPKINS, torch.Generator().manual_seed(0), height, width)
    assert p.flip.dtype == torch.bool and abs(p.flip.float().mean().item() - 0.5) < 0.02

    assert p.angle.min() >= -5.0 and p.angle.max() <= 5.0
    assert p.angle.min() < -4.95 and p.angle.max() > 4.95

    tx, ty = p.translate.unbind(1)
    assert torch.equal(p.translate, p.translate.round())
    max_tx, max_ty = round(0.05 * width), round(0.025 * height)  # 4 and 1
    assert set(tx.int().tolist()) == set(range(-max_tx, max_tx + 1))
    assert set(ty.int().tolist()) == set(range(-max_ty, max_ty + 1))

    assert p.scale.min() >= 0.95 and p.scale.max() <= 1.05
    assert p.scale.min() < 0.951 and p.scale.max() > 1.049
    assert p.shear.min() >= -0.025 and p.shear.max() <= 0.025
    assert p.shear.min() < -0.0245 and p.shear.max() > 0.0245


def test_draws_come_from_the_generator_in_the_documented_order():
    n = 64
    p = draw_params(n, PUMPKINS, torch.Generator().manual_seed(5), 64, 64)
    stream = torch.Generator().manual_seed(5)
    flip = torch.rand(n, generator=stream) < 0.5
    u = torch.rand(5, n, generator=stream)
    assert torch.equal(p.flip, flip)
    assert torch.equal(p.angle, -5.0 + 10.0 * u[0])
    assert torch.equal(p.translate[:, 0], (-3.2 + 6.4 * u[1]).round())
    assert torch.equal(p.scale, 0.95 + (1.05 - 0.95) * u[3])

    # A part that is off draws nothing: flips alone take n numbers, the affine alone 5 n.
    for cfg, draws in [(FLIP_ONLY, (n,)), (AugmentConfig(degrees=5.0), (5, n))]:
        gen, expected = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
        draw_params(n, cfg, gen, 64, 64)
        torch.rand(*draws, generator=expected)
        assert torch.equal(gen.get_state(), expected.get_state())


def test_same_generator_state_same_batch_and_global_rng_untouched():
    images = random_images(32, 3, 64, 64).float()
    global_state = torch.random.get_rng_state()

    a = augment(images, PUMPKINS, torch.Generator().manual_seed(7))
    b = augment(images, PUMPKINS, torch.Generator().manual_seed(7))
    other = augment(images, PUMPKINS, torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, other)
    assert not torch.equal(a, images)

    # Resume: restoring a saved generator state replays the batch.
    gen = torch.Generator().manual_seed(9)
    augment(images, PUMPKINS, gen)
    saved = gen.get_state()
    next_batch = augment(images, PUMPKINS, gen)
    gen.set_state(saved)
    assert torch.equal(augment(images, PUMPKINS, gen), next_batch)

    assert torch.equal(torch.random.get_rng_state(), global_state)


def test_flip_only_mirrors_the_drawn_samples_and_nothing_else():
    images = random_images(32, 3, 16, 24).float()
    flip = draw_params(32, FLIP_ONLY, torch.Generator().manual_seed(1), 16, 24).flip
    assert 0 < flip.sum() < 32

    out = augment(images, FLIP_ONLY, torch.Generator().manual_seed(1))

    assert torch.equal(out[flip], images[flip].flip(-1))
    assert torch.equal(out[~flip], images[~flip])


def test_no_augmentation_returns_the_input_and_draws_nothing():
    images = random_images(8, 3, 16, 16).float()
    gen = torch.Generator().manual_seed(1)
    state = gen.get_state()
    assert augment(images, NONE, gen) is images
    assert torch.equal(gen.get_state(), state)


def test_channels_last_gives_the_same_values_and_keeps_its_layout():
    images = random_images(16, 3, 32, 32).float()
    contiguous = augment(images, PUMPKINS, torch.Generator().manual_seed(4))
    channels_last = augment(
        images.contiguous(memory_format=torch.channels_last), PUMPKINS, torch.Generator().manual_seed(4)
    )
    assert torch.equal(channels_last, contiguous)
    assert channels_last.is_contiguous(memory_format=torch.channels_last)
    assert contiguous.is_contiguous()


def test_apply_never_reads_tensor_values_on_the_host():
    """Meta tensors hold no data: .item(), .tolist(), .cpu(), nonzero, mask indexing and
    `if tensor` all raise on them, so running on meta proves apply never syncs (CUDA graphs)."""
    params = draw_params(8, PUMPKINS, torch.Generator().manual_seed(0), 16, 16)
    on_meta = AugmentParams(*(p.to("meta") for p in params))
    out = apply(torch.empty(8, 3, 16, 16, device="meta"), on_meta, PUMPKINS)
    assert out.shape == (8, 3, 16, 16) and out.device.type == "meta"
