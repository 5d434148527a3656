"""Latents for generation (dcgan/models/latents.py): seed lists, a latent per seed, truncation."""

import math

import numpy as np
import pytest
import torch

from dcgan.models.latents import MAX_SEED, check_seeds, check_truncation, draw, parse_seeds, seed_latents
from dcgan.models.networks import sample_latent


def test_seed_lists_read_like_stylegans():
    assert parse_seeds("0-3") == [0, 1, 2, 3]
    assert parse_seeds("3,7,11") == [3, 7, 11]
    assert parse_seeds("0-2, 20-21,5") == [0, 1, 2, 20, 21, 5]  # the order written
    assert parse_seeds("4-4,4") == [4, 4]
    assert parse_seeds(str(MAX_SEED)) == [MAX_SEED]
    assert check_seeds("1-2") == [1, 2] and check_seeds(range(3)) == [0, 1, 2]
    assert check_seeds(np.arange(2)) == [0, 1]


@pytest.mark.parametrize(
    "text, says",
    [
        ("5-2", "seed range 5-2 runs backwards: write 2-5"),
        ("a", "'a' in seed list 'a': seeds are whole numbers"),
        ("-3", "-3 in seed list '-3': seeds are 0 or more"),
        ("1,-3-4", "-3-4 in seed list '1,-3-4': seeds are 0 or more"),
        ("", "no seeds given"),
        (" ", "no seeds given"),
        ("0-9,", "an empty item in seed list '0-9,'"),
        ("1.5", "'1.5' in seed list"),
        (f"0-{MAX_SEED + 1}", f"seed {MAX_SEED + 1} in '0-{MAX_SEED + 1}' is above the largest seed"),
    ],
)
def test_bad_seed_lists_say_what_is_wrong_in_one_line(text, says):
    with pytest.raises(ValueError) as raised:
        parse_seeds(text)
    assert str(raised.value).startswith(says) and "\n" not in str(raised.value)


@pytest.mark.parametrize("seeds", [[], [-1], [1.0], [True], [MAX_SEED + 1], ["3"]])
def test_bad_seeds_from_python(seeds):
    with pytest.raises(ValueError):
        check_seeds(seeds)


@pytest.mark.parametrize("psi", [0, -0.5, math.nan, math.inf, "0.5", True])
def test_truncation_is_a_finite_number_above_zero(psi):
    with pytest.raises(ValueError, match="truncation must be a finite number > 0"):
        check_truncation(psi)


def test_untruncated_latents_are_sample_latents():
    """Outputs made before truncation existed do not change."""
    made = sample_latent(7, 16, generator=torch.Generator().manual_seed(3))
    assert torch.equal(draw(7, 16, torch.Generator().manual_seed(3)), made)
    # A psi above every |z| redraws nothing: the same latents.
    assert torch.equal(draw(7, 16, torch.Generator().manual_seed(3), truncation=made.abs().max().item() + 1), made)


@pytest.mark.parametrize("psi", [0.05, 0.5, 1.0, 2.0])
def test_truncation_draws_the_truncated_normal(psi):
    plain = draw(4000, 50, torch.Generator().manual_seed(0))
    z = draw(4000, 50, torch.Generator().manual_seed(0), truncation=psi)
    assert z.shape == plain.shape and z.abs().max() <= psi
    assert torch.equal(draw(4000, 50, torch.Generator().manual_seed(0), truncation=psi), z)  # seeded
    inside = plain.abs() <= psi
    assert torch.equal(z[inside], plain[inside])  # only the coordinates outside are drawn again
    # The truncated normal's variance: 1 - 2 psi phi(psi) / (2 Phi(psi) - 1).
    mass = math.erf(psi / math.sqrt(2))
    variance = 1 - 2 * psi * math.exp(-psi * psi / 2) / math.sqrt(2 * math.pi) / mass
    assert z.var().item() == pytest.approx(variance, rel=0.02)
    assert abs(z.mean().item()) < 0.01 * psi


def test_a_tiny_truncation_still_ends_quickly():
    z = draw(256, 100, torch.Generator().manual_seed(0), truncation=1e-6)  # uniform proposals, not redraws
    assert z.abs().max() <= 1e-6


def test_a_seeds_latent_depends_on_that_seed_alone():
    together = seed_latents([0, 5, 9, 5], 16, truncation=0.7)
    assert torch.equal(together[1], seed_latents([5], 16, truncation=0.7)[0])
    assert torch.equal(together[1], together[3])
    assert torch.equal(together[1], draw(1, 16, torch.Generator().manual_seed(5), 0.7)[0])
    assert torch.equal(seed_latents([5], 16)[0], sample_latent(1, 16, generator=torch.Generator().manual_seed(5))[0])
