"""Checkpoint cost and preemption latency.

    python -m bench.checkpoint --config configs/celeba.yaml
    python -m bench.checkpoint --config configs/celeba.yaml --signal-latency --nproc 2

Part 1 (always), one process: builds the config's full training state (G, D, EMA, both
Adams after one step, so their moments exist), then prints the checkpoint's size and the
median over --repeats of: save (serialise + SHA-256 + fsync + rename), verify (re-read
and hash) and load (torch.load weights_only=True + load_state_dict).

Part 2 (--signal-latency): a real ``torchrun --nproc_per_node=N`` run of the config on
photo shards (bench/throughput.py makes them), SIGTERM to the last rank after --after
steps; prints the step it stopped at, the exit codes and the "checkpoint on disk N s
after the signal" figure the trainer logs.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.throughput import ensure_bench_shards
from dcgan.checkpoint import files as checkpoint
from dcgan.config.loading import load_config
from dcgan.run.distributed import DistInfo
from dcgan.training.setup import build_training
from dcgan.training.step import StepSettings, gan_step


def checkpoint_cost(config: str, repeats: int, out_dir: Path) -> None:
    cfg = load_config(config)
    dist = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    state, G, D = build_training(cfg, dist)
    real = torch.rand(8, cfg.model.channels, cfg.model.image_size, cfg.model.image_size) * 2 - 1
    gan_step(state, G, D, real, StepSettings.of(cfg))  # Adam moments now exist
    sd = state.state_dict(cfg.to_dict(), [checkpoint.capture_rng_state(dist.device)], 1)

    saves, verifies, loads = [], [], []
    for i in range(repeats):
        saved = checkpoint.save(sd, out_dir, i + 1, keep=1)
        saves.append(saved.seconds)
        t0 = time.perf_counter()
        assert checkpoint.verify(saved.path) is None
        verifies.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        state.load_state_dict(checkpoint.load(saved.path))
        loads.append(time.perf_counter() - t0)
    params = sum(p.numel() for net in (state.generator, state.discriminator) for p in net.parameters())
    print(f"{config}: G+D {params / 1e6:.2f}M params, EMA {'on' if state.generator_ema is not None else 'off'}")
    print(f"  checkpoint size  {saved.bytes / 2**20:8.1f} MiB")
    print(f"  save             {statistics.median(saves):8.3f} s   (median of {repeats})")
    print(f"  verify (SHA-256) {statistics.median(verifies):8.3f} s")
    print(f"  load             {statistics.median(loads):8.3f} s")


def signal_latency(config: str, nproc: int, after: int, out_dir: Path) -> None:
    shards = ensure_bench_shards(load_config(config).model.image_size)
    log = out_dir / "torchrun.log"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        "-m", "dcgan.train", "--config", config, f"data.shards={shards}", f"train.out_dir={out_dir}",
        "train.name=latency", "train.steps=100000", "log.every=1", "log.samples_every=100000",
        "checkpoint.every=100000", "data.workers=1",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    metrics = out_dir / "latency" / "metrics.jsonl"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= after):
        if proc.poll() is not None:
            sys.exit(f"the run ended early; see {log}")
        time.sleep(0.01)
    children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    last_rank = max(children, key=lambda pid: int(_rank_of(pid)))
    os.kill(int(last_rank), signal.SIGTERM)
    proc.wait()
    text = log.read_text()
    stop = re.search(r"stopped on request after step (\d+)/\d+; checkpoint on disk (\S+)s after the signal", text)
    codes = re.findall(r"^\s+exitcode\s*:\s*(-?\d+)", text, re.M)  # torchrun's failure report
    print(f"{config}, {nproc} ranks: SIGTERM to rank {nproc - 1} after step {after}")
    print(f"  stopped after step {stop.group(1)}; checkpoint on disk {stop.group(2)} s after the signal")
    print(f"  worker exit codes {codes}, torchrun exit code {proc.returncode}")


def _rank_of(pid: str) -> str:
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return next(e[5:].decode() for e in environ if e.startswith(b"RANK="))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/celeba.yaml")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--signal-latency", action="store_true")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--after", type=int, default=5, help="steps before the signal")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir="runs" if Path("runs").is_dir() else None) as tmp:
        checkpoint_cost(args.config, args.repeats, Path(tmp) / "ckpt")
        if args.signal_latency:
            signal_latency(args.config, args.nproc, args.after, Path(tmp))


if __name__ == "__main__":
    main()
