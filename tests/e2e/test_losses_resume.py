"""The losses, penalties and conditional nets under real processes: a conditional wgan run
with its gradient penalty, lazy R1, spectral norm on D, DiffAugment and three D updates a
step, stopped by a signal between two checkpoints, resumes bitwise equal to the
uninterrupted run (one process reading the shards, and two ranks under torchrun drawing
from the cache), and each metrics line carries the penalty. The epochs' last batches that
cannot fill a step are skipped on both. The losses themselves: tests/unit/test_losses.py;
the conditional nets: tests/unit/test_conditional.py."""

import json

import pytest
from test_resume import assert_bitwise_equal, final_state, stop_and_resume

from conftest import run_module, write_config

STEPS, EVERY = 24, 7
PENALISED = {
    "train": {"steps": STEPS},
    "log": {"every": 1, "samples_every": 1000},
    "checkpoint": {"every": EVERY, "keep": 10},
    "optim": {"d_steps": 3},
    "model": {
        "arch": "kmnist",
        "image_size": 28,
        "channels": 1,
        "nz": 16,
        "ngf": 8,
        "ndf": 8,
        "spectral_norm": True,
        "conditional": True,
    },
    "d_augment": {"policy": "translation", "p": 0.5},
    # R1 every 4 steps, so that a stop lands between two R1 steps.
    "loss": {"kind": "wgan", "gp_weight": 10.0, "r1_gamma": 0.5, "r1_every": 4},
}


def logged(run_dir) -> list[tuple]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    return [(r["step"], r["epoch"], r["loss_d_penalty"], r["loss_g"]) for r in lines if "loss_g" in r]


@pytest.fixture(scope="module", params=[0, 2], ids=["one process", "two ranks"])
def reference(request, tmp_path_factory, digit_shards):
    """(nproc, config, final state of the uninterrupted run)."""
    nproc = request.param
    # The labels' two paths: the shard reader in one process, the cache on two ranks.
    data = {"shards": str(digit_shards), "workers": 1, "shuffle_buffer": 64, "cache": "on" if nproc else "off"}
    config = write_config(tmp_path_factory.mktemp("penalised") / "penalised.yaml", digit_shards, **PENALISED, data=data)
    result = run_module("dcgan.train", "--config", str(config), "train.name=reference", nproc=nproc)
    assert result.returncode == 0, result.stderr
    assert "loss.kind=wgan, gradient penalty 10 every step, R1 gamma 0.5 every 4 steps, 3 D updates" in result.stderr
    state = final_state(config.parent / "runs" / "reference", STEPS)
    assert state["config"]["model"]["num_classes"] == 10  # the shards' classes, set at start
    return nproc, config, state


def test_three_batches_a_step_and_the_epoch_tail_skipped(reference):
    nproc, config, state = reference
    # 512 images in batches of 16: 32 batches an epoch in one process (10 steps, 2 skipped),
    # 16 per rank with two (5 steps, 1 skipped).
    steps_per_epoch = 10 if not nproc else 5
    assert state["samples_seen"] == STEPS * 3 * 16 * max(nproc, 1)
    assert (state["epoch"], state["batch_in_epoch"]) == (STEPS // steps_per_epoch, 3 * (STEPS % steps_per_epoch))
    steps = logged(config.parent / "runs" / "reference")
    assert [epoch for _, epoch, _, _ in steps] == [s // steps_per_epoch for s in range(STEPS)]
    assert all(penalty > 0 for _, _, penalty, _ in steps)  # wgan's penalty every step, R1's on top every 4th


def test_stopped_and_resumed_is_bitwise_exact(reference, tmp_path):
    nproc, config, expected = reference
    name = "stopped"
    run_dir = config.parent / "runs" / name
    stop = stop_and_resume(config, nproc, name, 9, tmp_path / "stopped.log")
    assert 9 <= stop < STEPS and stop % EVERY != 0
    assert_bitwise_equal(expected, final_state(run_dir, STEPS))
    assert logged(run_dir) == logged(config.parent / "runs" / "reference")
