"""The divergence guard's rules, in-process (tests/e2e/test_never_lost.py stops real runs
with them): skipped fp16 steps are not divergence, patience counts log intervals, and an
fp16 run that skips every step stops once the scaler had its chance."""

import torch

from dcgan.run.distributed import DistInfo
from dcgan.training import step as train_step
from dcgan.training.divergence import FP16_SKIPS_IN_A_ROW, DivergenceGuard


def test_skipped_fp16_steps_are_not_divergence_and_patience_counts_intervals():
    names = train_step.STAT_NAMES
    #        loss_d_real, loss_d_fake, loss_g, d_real, d_fake, d_fake_after, grad_norm_d, grad_norm_g, skipped_d, skipped_g
    stats = torch.tensor([1.0, 1.0, 1.0, 0.5, 0.5, 0.5, float("inf"), 1.0, 1.0, 0.0])  # one of 2 steps skipped by D
    nets = [torch.nn.Linear(2, 2)]
    one = DistInfo(0, 0, 1, torch.device("cpu"))
    assert DivergenceGuard(names, patience=1, fp16=True).check(stats, nets, one, (1, 2)) is None
    guard = DivergenceGuard(names, patience=2, fp16=False)
    assert guard.check(stats, nets, one, (1, 2)) is None
    assert "non-finite grad_norm_d in 2 log interval(s) in a row" in guard.check(stats, nets, one, (3, 4))
    with torch.no_grad():
        nets[0].weight[0, 0] = float("nan")
    assert "the weights or batch-norm" in DivergenceGuard(names, patience=5, fp16=True).check(stats, nets, one, (1, 2))


def test_fp16_skipping_every_step_stops_only_once_the_scaler_had_its_chance():
    names, nets, one = train_step.STAT_NAMES, [torch.nn.Linear(2, 2)], DistInfo(0, 0, 1, torch.device("cpu"))
    all_skipped = torch.tensor([1.0, 1.0, 1.0, 0.5, 0.5, 0.5, float("inf"), 1.0, 4.0, 0.0])  # 4 of 4 steps skipped
    guard = DivergenceGuard(names, patience=1, fp16=True)
    for first in range(1, FP16_SKIPS_IN_A_ROW - 3, 4):  # a scaler finding its scale at the start: not divergence
        assert guard.check(all_skipped, nets, one, (first, first + 3)) is None
    last = FP16_SKIPS_IN_A_ROW - 3
    assert "skipped the last 16 steps in a row" in guard.check(all_skipped, nets, one, (last, last + 3))
    one_applied = torch.tensor([1.0, 1.0, 1.0, 0.5, 0.5, 0.5, float("inf"), 1.0, 3.0, 0.0])
    guard = DivergenceGuard(names, patience=1, fp16=True)
    assert all(guard.check(one_applied, nets, one, (s, s + 3)) is None for s in range(1, 100, 4))
