"""The trainer end to end, with real processes: python -m dcgan.train alone and under
torchrun (gloo, SyncBN), its run folder, checkpoints, resume and precisions."""

import json
import math

import pytest
import torch
from PIL import Image

from conftest import run_module, run_python, write_config
from dcgan.checkpoint import files as checkpoint
from dcgan.config.loading import load_config
from dcgan.models.networks import build_models


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def folder_contents(folder):
    """Every file under ``folder``: its bytes and modification time, by relative path."""
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def check_run_folder(run_dir, last_step, grid_side=3 * (2 + 8 * 30)):
    """A finished run's folder: config, grids, checkpoints that load with weights_only=True."""
    assert (run_dir / "config.yaml").exists() and (run_dir / "train.log").exists()
    grid = Image.open(run_dir / "samples" / f"step_{last_step:08d}.png")
    assert grid.width == grid_side  # 8 images of 28 px per row with 2 px padding, enlarged 3x to >= 512 px
    assert Image.open(run_dir / "samples" / "real.png").size == grid.size
    ckpts = checkpoint.list_checkpoints(run_dir / "checkpoints")
    assert ckpts[-1].name == f"step_{last_step:08d}.pt"
    state = torch.load(ckpts[-1], weights_only=True)
    assert state["step"] == last_step
    G, D = build_models(load_config(run_dir / "config.yaml"))
    G.load_state_dict(state["generator"])  # SyncBN or not, the keys are plain BatchNorm2d's
    G.load_state_dict(state["generator_ema"])  # the EMA generator is a plain generator too
    D.load_state_dict(state["discriminator"])
    assert not any(p.name.endswith(".tmp") for p in (run_dir / "checkpoints").iterdir())
    return state


def test_single_process_run_and_resume(tmp_path, digit_shards):
    config = write_config(tmp_path / "tiny.yaml", digit_shards)
    run_dir = tmp_path / "runs" / "tiny"
    first = run_module("dcgan.train", "--config", str(config), timeout=300)
    assert first.returncode == 0, first.stderr
    state = check_run_folder(run_dir, 6)
    assert [p.name for p in checkpoint.list_checkpoints(run_dir / "checkpoints")] == [
        "step_00000003.pt",
        "step_00000006.pt",
    ]
    assert state["samples_seen"] == 6 * 16 and state["epoch"] == 0 and state["batch_in_epoch"] == 6
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == [2, 4, 6]
    assert all(math.isfinite(m["loss_g"]) and 0 < m["d_real"] < 1 for m in metrics)

    # The same command with more steps carries on from step 6 (train.resume=auto).
    again = run_module("dcgan.train", "--config", str(config), "train.steps=40", timeout=300)
    assert again.returncode == 0, again.stderr
    assert "resumed from" in again.stderr and "at step 6" in again.stderr
    state = check_run_folder(run_dir, 40)
    assert state["epoch"] == 1 and state["batch_in_epoch"] == 8  # 32 batches of 16 per epoch of 512
    assert [m["step"] for m in read_metrics(run_dir)][3:5] == [8, 10]
    assert len(checkpoint.list_checkpoints(run_dir / "checkpoints")) == 2  # checkpoint.keep

    # The finished run's command again: exit 0 at once, saying how to go on; nothing in the folder changes.
    before = folder_contents(run_dir)
    finished = run_module("dcgan.train", "--config", str(config), "train.steps=40", timeout=120)
    assert finished.returncode == 0, finished.stderr
    assert "has nothing to train" in finished.stderr and "train.steps=N (N > 40)" in finished.stderr
    assert "resumed from" not in finished.stderr
    assert folder_contents(run_dir) == before

    refused = run_module("dcgan.train", "--config", str(config), "train.resume=never", timeout=120)
    assert refused.returncode == 2 and "already holds 2 checkpoint(s)" in refused.stderr


def test_a_64x64_arch_trains_at_128(tmp_path, digit_shards):
    """celeba made at 128x128 RGB (a block added next to 4x4) from the 28x28 grey shards,
    which the reader resizes and converts: --dry-run and the start line show its parameter
    counts, and it trains, saves grids and checkpoints that load into the config's nets."""
    model = {"arch": "celeba", "image_size": 128, "channels": 3, "nz": 8, "ngf": 4, "ndf": 4}
    config = write_config(
        tmp_path / "big.yaml", digit_shards, model=model, train={"steps": 2, "batch_size": 2},
        log={"every": 1, "samples_every": 2, "num_samples": 2}, checkpoint={"every": 2, "keep": 1},
    )  # fmt: skip
    G, D = build_models(load_config(config))
    g_m, d_m = (sum(p.numel() for p in net.parameters()) / 1e6 for net in (G, D))
    counts = f"G {g_m:.2f}M and D {d_m:.2f}M parameters"
    plan = run_module("dcgan.train", "--config", str(config), "--dry-run", timeout=120)
    assert plan.returncode == 0, plan.stderr
    assert counts in plan.stdout + plan.stderr
    result = run_module("dcgan.train", "--config", str(config), timeout=300)
    assert result.returncode == 0, result.stderr
    assert "arch celeba, 1 process(es) on cpu, batch 2 x 1" in result.stderr
    assert f"G {g_m:.2f}M params, D {d_m:.2f}M params" in result.stderr
    state = check_run_folder(tmp_path / "runs" / "big", 2, grid_side=2 * (2 + 2 * 130))  # 2 of 128 px, enlarged 2x
    assert state["generator"]["0.weight"].shape == (8, 32, 4, 4)  # z -> 8ngf at 4x4, as at 64
    assert G(torch.randn(2, 8, 1, 1)).shape == (2, 3, 128, 128)


def test_torchrun_two_processes_with_syncbn(tmp_path, digit_shards):
    config = write_config(tmp_path / "ddp.yaml", digit_shards, data={"workers": 2})
    result = run_module("dcgan.train", "--config", str(config), nproc=2, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "2 process(es) on cpu" in result.stderr
    state = check_run_folder(tmp_path / "runs" / "ddp", 6)
    assert state["samples_seen"] == 6 * 16 * 2
    assert state["generator"]["1.num_batches_tracked"] == 6  # one G forward per step
    assert "[rank 1] INFO" not in result.stderr  # only rank 0 reports progress


def test_one_all_reduce_per_network_and_exact_syncbn():
    result = run_python("tests/ddp_checks.py", nproc=2, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ddp checks passed" in result.stdout


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision(tmp_path, digit_shards, precision):
    config = write_config(tmp_path / f"{precision}.yaml", digit_shards, train={"precision": precision})
    result = run_module("dcgan.train", "--config", str(config), timeout=300)
    assert result.returncode == 0, result.stderr
    state = check_run_folder(tmp_path / "runs" / precision, 6)
    metrics = read_metrics(tmp_path / "runs" / precision)
    assert all(math.isfinite(m["loss_d_real"]) for m in metrics)
    if precision == "fp16":  # the grad scalers' state travels with the checkpoint, and is logged
        assert state["scaler_g"]["scale"] > 0 and state["scaler_d"]["scale"] > 0
        assert metrics[-1]["grad_scale_g"] == state["scaler_g"]["scale"]
    else:
        assert state["scaler_g"] == {} and "grad_scale_g" not in metrics[-1]
