"""d_augment under real processes: a run with DiffAugment and ADA on, stopped by a signal
between two checkpoints and in the middle of an ADA interval, resumes bitwise equal to the
uninterrupted run (one process, and two ranks under torchrun), ADA's p included; every
metrics line carries p and the statistic. The transforms and ADA's rule: tests/unit/test_d_augment.py."""

import json

import pytest
import torch
from test_resume import assert_bitwise_equal, final_state, stop_and_resume

from conftest import run_module, write_config

STEPS, EVERY = 48, 20
AUGMENTED = {
    "train": {"steps": STEPS},
    "log": {"every": 1, "samples_every": 1000},
    "checkpoint": {"every": EVERY, "keep": 10},
    # An interval of 3 steps, so a stop lands inside one; p moves by up to 0.24 at each
    # adjustment (16 images x ranks x 3 / 200), so it changes within the run.
    "d_augment": {"policy": "color,translation,cutout", "p": "ada", "ada_interval": 3, "ada_kimg": 0.2},
}


def logged(run_dir) -> list[tuple]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    return [(r["step"], r["aug_p"], r["d_real_sign"], r["loss_g"]) for r in lines if "loss_g" in r]


@pytest.fixture(scope="module", params=[0, 2], ids=["one process", "two ranks"])
def reference(request, tmp_path_factory, digit_shards):
    """(nproc, config, final state of the uninterrupted run)."""
    nproc = request.param
    config = write_config(tmp_path_factory.mktemp("augmented") / "augmented.yaml", digit_shards, **AUGMENTED)
    result = run_module("dcgan.train", "--config", str(config), "train.name=reference", nproc=nproc)
    assert result.returncode == 0, result.stderr
    assert "d_augment color,translation,cutout on D's real and fake inputs, p adaptive" in result.stderr
    return nproc, config, final_state(config.parent / "runs" / "reference", STEPS)


def test_ada_moves_p_and_every_metrics_line_carries_it(reference):
    _, config, state = reference
    lines = [json.loads(line) for line in (config.parent / "runs" / "reference" / "metrics.jsonl").open()]
    steps = [r for r in lines if "loss_g" in r]
    assert len(steps) == STEPS and all({"aug_p", "d_real_sign"} <= r.keys() for r in steps)
    p = [r["aug_p"] for r in steps]
    assert p[0] == 0.0 and len(set(p)) > 2 and all(0 <= x <= 1 for x in p)
    assert 0 <= state["d_augment"]["p"].item() <= 1 and state["d_augment"]["signs"].tolist() == [0.0, 0.0]
    assert all(-1 <= r["d_real_sign"] <= 1 for r in steps)


def test_stopped_mid_interval_and_resumed_is_bitwise_exact(reference, tmp_path):
    nproc, config, expected = reference
    name = "stopped"
    run_dir = config.parent / "runs" / name
    stop = stop_and_resume(config, nproc, name, 8, tmp_path / "stopped.log")
    assert 8 <= stop < STEPS and stop % EVERY != 0
    assert_bitwise_equal(expected, final_state(run_dir, STEPS))
    # The metrics lines too: p as applied and r_t at every step, across the stop.
    assert logged(run_dir) == logged(config.parent / "runs" / "reference")
    saved = torch.load(run_dir / "checkpoints" / f"step_{stop:08d}.pt", weights_only=True)["d_augment"]
    if stop % 3:  # a stop inside an interval: the signals counted so far went into the checkpoint
        assert saved["signs"][1].item() == 16 * max(nproc, 1) * (stop % 3)
