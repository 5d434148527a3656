"""The speed settings (channels_last, fused Adam, torch.compile) change how fast a step
runs, never what it computes or what a checkpoint holds; the bench scripts run."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, run_module, run_python, write_config
from dcgan.config.loading import load_config
from dcgan.data.shardset import resolve_shards
from dcgan.data.stream import Loader, ShardStream
from dcgan.models.networks import build_models
from dcgan.run.distributed import DistInfo
from dcgan.training.setup import build_training, memory_format
from dcgan.training.step import StepSettings, gan_step

CPU = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


def three_steps(cfg):
    """(per-step stats, state) of three gan_steps on the config's first three batches."""
    torch.manual_seed(1)
    stream = ShardStream(
        resolve_shards(cfg.data), cfg.data, rank=0, world_size=1, batch_size=cfg.train.batch_size,
        image_size=cfg.model.image_size, channels=cfg.model.channels, seed=0,
    )  # fmt: skip
    loader = Loader(stream, CPU.device, memory_format=memory_format(cfg))
    state, g_train, d_train = build_training(cfg, CPU)
    stats = []
    for real, _ in list(loader.epoch(0))[:3]:
        assert real.is_contiguous(memory_format=memory_format(cfg))
        stats.append(gan_step(state, g_train, d_train, real, StepSettings(cfg.model.nz)))
    return torch.stack(stats), state


def test_channels_last_and_fused_adam_keep_the_maths(tmp_path, digit_shards):
    config = write_config(tmp_path / "fast.yaml", digit_shards, data={"workers": 0})
    fast_cfg = load_config(config)
    assert fast_cfg.train.channels_last and fast_cfg.optim.fused  # the defaults
    plain_cfg = load_config(config, ["train.channels_last=false", "optim.fused=false"])
    fast, fast_state = three_steps(fast_cfg)
    plain, plain_state = three_steps(plain_cfg)

    conv = fast_state.discriminator[2].weight  # (16, 8, 4, 4): the layouts differ
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert plain_state.discriminator[2].weight.is_contiguous()
    assert fast_state.opt_d.defaults["fused"] and not plain_state.opt_d.defaults["fused"]
    # Same losses, D outputs and gradient norms step by step; same weights after.
    torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-5)
    for net in ("generator", "discriminator", "generator_ema"):
        fast_sd, plain_sd = getattr(fast_state, net).state_dict(), getattr(plain_state, net).state_dict()
        for key in plain_sd:
            torch.testing.assert_close(fast_sd[key], plain_sd[key], rtol=1e-4, atol=1e-5, msg=f"{net}.{key}")

    # A channels_last checkpoint is an ordinary state dict: a plain generator loads it and
    # draws the same images.
    G, _ = build_models(fast_cfg)
    G.load_state_dict(fast_state.generator.state_dict())
    z = torch.randn(4, fast_cfg.model.nz, 1, 1)
    fast_state.generator.eval(), G.eval()
    torch.testing.assert_close(G(z), fast_state.generator(z.contiguous(memory_format=torch.channels_last)))


def test_compiled_run_trains_and_checkpoints_plain_keys(tmp_path, digit_shards):
    pytest.importorskip("torch._inductor")
    config = write_config(tmp_path / "compiled.yaml", digit_shards, train={"compile": True, "steps": 4})
    result = run_module("dcgan.train", "--config", str(config), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "fp32, channels_last, torch.compile, 4 steps" in result.stderr
    assert re.search(r"torch.compile: [3-9] graphs so far", result.stderr)  # G, D, D frozen: counted and logged
    run_dir = tmp_path / "runs" / "compiled"
    state = torch.load(run_dir / "checkpoints" / "step_00000004.pt", weights_only=True)
    G, D = build_models(load_config(run_dir / "config.yaml"))
    G.load_state_dict(state["generator"])  # no "_orig_mod." prefixes: the bare nets are saved, not their compiled calls
    D.load_state_dict(state["discriminator"])
    assert all(math.isfinite(v) for v in state["generator"]["1.running_mean"].tolist())
    # It resumes: compiled or not, a checkpoint is the bare nets' state.
    again = run_module("dcgan.train", "--config", str(config), "train.steps=6", "train.compile=false", timeout=300)
    assert again.returncode == 0 and "at step 4" in again.stderr, again.stderr[-3000:]


def test_bench_scripts_print_their_tables(tmp_path, digit_shards, real_images):
    config = write_config(tmp_path / "bench.yaml", digit_shards)
    np.save(tmp_path / "digits.npy", real_images[0][:512])  # bench/data.py's source (no scikit-image here)
    common = ["--config", str(config), "--batch", "16"]
    throughput = run_python(
        "-m", "bench.throughput", *common, "--shards", str(digit_shards), "--steps", "2", "--warmup", "1",
        "--repeats", "1", "--ablate", "optim.fused=false", timeout=300,
    )  # fmt: skip
    assert throughput.returncode == 0, throughput.stderr[-3000:]
    for row in (
        "(a) trainer reading shards", "(a') trainer reading the cache", "(b) same step", "(c) plain seed-style loop",
        "(b) with optim.fused",
    ):  # fmt: skip
        assert row in throughput.stdout
    assert "(a)/(c) = " in throughput.stdout and "GFLOP per image per iteration" in throughput.stdout
    assert re.search(r"\(a'\)/\(a\) = [\d.]+ .* cache of 512 images built in", throughput.stdout)

    data = run_python(
        "-m", "bench.data", *common, "--data-dir", str(tmp_path / "data"), "--source", str(tmp_path / "digits.npy"),
        "--formats", "npy raw png@32", "--workers", "0,1", "--epochs", "1", "--repeats", "1", "--versus", "100",
        timeout=300,
    )  # fmt: skip
    assert data.returncode == 0, data.stderr[-3000:]
    rows = [line.split() for line in data.stdout.splitlines() if line.startswith(("npy ", "raw ", "png@32 "))]
    assert [(r[0], r[1]) for r in rows] == [(f, w) for f in ("npy", "raw", "png@32") for w in ("0", "1")]
    assert all(float(r[2]) > 0 for r in rows)

    scaling = run_python(
        "-m", "bench.scaling", *common, "--shards", str(digit_shards), "--nproc", "1,2", "--steps", "6",
        "--log-every", "2", "--repeats", "1", "--ddp-overhead", timeout=300,
    )  # fmt: skip
    assert scaling.returncode == 0, scaling.stderr[-3000:]
    table = [line.split() for line in scaling.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert [r[0] for r in table] == ["1", "2"] and float(table[0][3]) == 1.0
    assert "under DDP" in scaling.stdout

    scale = run_python("-m", "bench.plan_at_scale", "--ranks", "8", "--shards", "100", "--cache-samples", "10000")
    assert scale.returncode == 0, scale.stderr[-3000:]
    assert "read amplification      1." in scale.stdout and scale.stdout.count("on every rank: True") == 2


@pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").exists(),
    reason="Debian's dataset-fashion-mnist is not installed (scripts/setup.sh installs it as root)",
)
def test_the_small_data_study_trains_each_variant_on_the_same_subset(tmp_path):
    # bench/quality.py --small-data: the d_augment table of bench/README.md, at toy size.
    out = tmp_path / "study"
    study = run_python(
        "-m", "bench.quality", "--small-data", "64", "--steps", "4", "--eval-every", "4", "--num-samples", "500",
        "--variants", "off,translation", "--out-dir", str(out), "train.batch_size=16", "data.workers=0", "log.every=2", timeout=600,
    )  # fmt: skip
    assert study.returncode == 0, study.stderr[-3000:]
    rows = {line.split(" | ")[0].lstrip("| "): line for line in study.stdout.splitlines() if line.startswith("| ")}
    assert {"off", "translation"} <= set(rows)
    runs = json.loads((out / "study.json").read_text())["runs"]
    assert set(runs) == {"off", "translation"}
    fid = {name: scores["4"]["fid"] for name, (scores, _) in runs.items()}
    assert fid["off"] != fid["translation"]  # the variant changed training, nothing else did
    assert runs["translation"][0]["4"]["aug_p"] == 1.0 and runs["off"][0]["4"]["aug_p"] is None
    subset = np.load(out / "data" / "train-64.npz")
    assert (
        subset["x"].shape == (64, 28, 28)
        and json.loads((out / "data" / "train-64" / "manifest.json").read_text())["samples"] == 64
    )
    assert (out / "data" / "test" / "features.pt").exists()
    bad = run_python("-m", "bench.quality", "--small-data", "64", "--variants", "off,blur", "--out-dir", str(out))
    assert bad.returncode == 2 and "unknown variant 'blur'" in bad.stderr


def test_the_gpu_script_runs_every_stage_on_the_cpu(tmp_path):
    """bash bench/gpu.sh --cpu-smoke: every stage at tiny sizes, so the one script a GPU
    machine runs still works the day a GPU comes."""
    out = tmp_path / "out"
    result = subprocess.run(
        ["bash", "bench/gpu.sh", "--cpu-smoke", "--out", str(out), "--work", str(tmp_path / "work")],
        cwd=REPO, env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert list(report["stages"]) == ["env", "packages", "e2e", "tests", "throughput"]
    assert all(stage["status"] == "PASS" for stage in report["stages"].values())
    assert report["stages"]["e2e"]["line"] == "6/6 runs passed"
    summary = result.stdout[result.stdout.index("== bench/gpu.sh summary") :].splitlines()
    assert len(summary) <= 60 and any(line.startswith("plain seed loop, fp32") for line in summary)
    assert "===== stage throughput" in (out / "gpu.log").read_text()
