"""DDP scaling: img/s of the real trainer (`torchrun -m dcgan.train`) at N processes, the
same batch per process, for each N of --nproc; gloo on the CPU, NCCL on GPUs (one per
process). With --ddp-overhead, also the step of one process with and without the DDP
wrappers (a process group of one): what DDP's hooks cost when there is nothing to share.

    python -m bench.scaling --config configs/celeba.yaml --batch 64 --nproc 1,2
    python -m bench.scaling --nproc 1,2,4,8 --ddp-overhead train.precision=bf16   # a GPU box

On the CPU every process gets --threads-per-process threads (default: the cores over the
largest N), so N processes have N times the compute of one and the efficiency
img/s(N) / (N x img/s(1)) shows what DDP costs: the gradient all-reduce, SyncBatchNorm's
per-layer statistics all-reduce, and stragglers. img/s is read from the run's
metrics.jsonl: the median over the log intervals after the first (warm-up).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as tdist
from torch.nn.parallel import DistributedDataParallel as DDP

from bench.throughput import bench_overrides, int_list, timed_steps
from dcgan.config.loading import load_config
from dcgan.run.distributed import DistInfo
from dcgan.training.setup import NO_FORWARD_BUFFER_SYNC, build_training, memory_format
from dcgan.training.step import AMP_DTYPES, StepSettings, gan_step


def trainer_rate(args, overrides: list[str], nproc: int, threads: int, out_dir: Path) -> tuple[float, list[float]]:
    """(median img/s over the log intervals after the first, all of them) of one torchrun run."""
    name = f"scaling-{nproc}"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        "-m", "dcgan.train", "--config", args.config, *overrides,
        f"train.out_dir={out_dir}", f"train.name={name}", f"train.steps={args.steps}",
        f"log.every={args.log_every}", f"log.samples_every={args.steps}", f"checkpoint.every={args.steps}",
        "eval.every=0", "wandb.mode=disabled", "train.resume=never", "train.overwrite=true",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    print("$ OMP_NUM_THREADS=%d torchrun --nproc_per_node=%d -m dcgan.train ..." % (threads, nproc), flush=True)
    done = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{name} failed (exit code {done.returncode}):\n{done.stderr[-3000:]}")
    lines = (out_dir / name / "metrics.jsonl").read_text().splitlines()
    rates = [record["img_per_s"] for record in map(json.loads, lines) if "img_per_s" in record]
    if len(rates) < 2:
        raise SystemExit(f"{name}: only {len(rates)} log interval(s); raise --steps or lower --log-every")
    return statistics.median(rates[1:]), rates[1:]


def ddp_overhead(args, overrides: list[str]) -> None:
    """One process: the in-memory step bare, then inside DDP wrappers (world size 1)."""
    cfg = load_config(args.config, overrides)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with tempfile.TemporaryDirectory() as tmp:
        store = tdist.FileStore(str(Path(tmp) / "store"), 1)
        tdist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=0, world_size=1)
        try:
            dist = DistInfo(rank=0, local_rank=0, world_size=1, device=device)
            amp_dtype = AMP_DTYPES[cfg.train.precision]
            real = torch.rand(cfg.train.batch_size, cfg.model.channels, cfg.model.image_size, cfg.model.image_size)
            real = (real * 2 - 1).to(device).contiguous(memory_format=memory_format(cfg))
            state, g_bare, d_bare = build_training(cfg, dist)
            g_ddp, d_ddp = DDP(g_bare, **NO_FORWARD_BUFFER_SYNC), DDP(d_bare, **NO_FORWARD_BUFFER_SYNC)

            runs = {"bare": [], "DDP": []}
            for _ in range(args.repeats):
                for name, (g, d) in {"bare": (g_bare, d_bare), "DDP": (g_ddp, d_ddp)}.items():
                    step = lambda r, g=g, d=d: gan_step(state, g, d, r, StepSettings(cfg.model.nz, amp_dtype))  # noqa: E731
                    runs[name].append(timed_steps(step, itertools.repeat(real), 3, args.log_every, sync))
            bare, wrapped = statistics.median(runs["bare"]), statistics.median(runs["DDP"])
            print(f"one process, batch in memory: bare {bare:.1f} img/s, under DDP {wrapped:.1f} img/s "
                  f"(DDP costs {100 * (1 - wrapped / bare):.1f}%)")  # fmt: skip
        finally:
            tdist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/celeba.yaml")
    parser.add_argument("--batch", type=int, default=64, help="per process")
    parser.add_argument("--nproc", type=int_list, default=[1, 2], help="comma-separated, e.g. 1,2,4,8")
    parser.add_argument("--threads-per-process", type=int, help="CPU only; default: cores // max(--nproc)")
    parser.add_argument("--workers", type=int, default=1, help="data workers per process")
    parser.add_argument("--shards", help="shards to read (default: bench/throughput.py's photo patches)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3, help="for --ddp-overhead")
    parser.add_argument("--ddp-overhead", action="store_true")
    parser.add_argument("overrides", nargs="*", help="a.b=value config overrides")
    args = parser.parse_args(argv)

    overrides = bench_overrides(args)
    base = load_config(args.config, overrides)
    cores = len(os.sched_getaffinity(0))
    threads = args.threads_per_process or max(1, cores // max(args.nproc))
    gpus = torch.cuda.device_count()
    if gpus and max(args.nproc) > gpus:
        raise SystemExit(f"--nproc {max(args.nproc)}: this machine has {gpus} GPU(s)")
    print(
        f"# {args.config}: batch {args.batch} per process, {base.train.precision}, "
        + (f"{gpus} GPU(s), NCCL" if gpus else f"CPU, gloo, {threads} thread(s) per process of {cores} cores")
        + f", {args.workers} data worker(s) per process, {args.steps} steps",
        flush=True,
    )
    out_dir = Path(tempfile.mkdtemp(prefix="dcgan-scaling-"))
    try:
        rates = {n: trainer_rate(args, overrides, n, threads, out_dir) for n in args.nproc}
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    one = rates.get(1, (None,))[0]
    print(f"{'processes':>9s} {'img/s':>9s} {'per process':>12s} {'efficiency':>10s}  intervals")
    for n, (rate, intervals) in rates.items():
        efficiency = f"{rate / (n * one):10.2f}" if one else f"{'-':>10s}"
        runs = ", ".join(f"{r:.0f}" for r in intervals)
        print(f"{n:9d} {rate:9.1f} {rate / n:12.1f} {efficiency}  ({runs})")
    if args.ddp_overhead:
        ddp_overhead(args, overrides)
    return 0


if __name__ == "__main__":
    sys.exit(main())
