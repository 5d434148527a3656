"""How fast a failure ends a run: seconds from the failing rank's line to the end of every
process (the launcher included), for failures injected by tests/faults.py into the real
trainer (dcgan/run/failure.py says how a failure ends a run).

    python -m bench.failures --shards data/fashion-mnist
    python -m bench.failures --config configs/celeba.yaml --shards data/celeba --nproc 8   # GPUs: NCCL

The cases: a step failing on one process alone; a step failing on the last of --nproc
ranks under torchrun, while the others wait for it in a collective; and the same with
rank 1 stuck in its step (as a rank waiting in an NCCL collective is), which only its
watch of the store can end (after failure.PEER_GRACE_S).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def seconds_to_end(fault: str, nproc: int, args: argparse.Namespace, out_dir: str) -> tuple[int, float]:
    """(exit code, seconds from the first failure line to the end of every process)."""
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = [
        *launcher, str(REPO / "tests" / "faults.py"), "--config", args.config, *args.overrides,
        f"data.shards={args.shards}", f"data.workers={args.workers}", f"train.out_dir={out_dir}",
        f"train.name=fault-{nproc}-{fault.replace(':', '-').replace(',', '_')}", "train.steps=1000",
        "train.resume=never", "train.overwrite=true", "log.every=1", "checkpoint.every=1000", "eval.every=0",
        "wandb.mode=disabled",
    ]  # fmt: skip
    env = {**os.environ, "DCGAN_FAULT": fault, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    t_line, tail = None, []
    for line in proc.stdout:  # the pipe closes when the last process holding it has ended
        tail = (tail + [line])[-40:]
        if t_line is None and " failed (" in line:
            t_line = time.monotonic()
    proc.wait()
    if t_line is None:
        raise SystemExit(f"{fault}: no failure line; the run's last lines:\n{''.join(tail)}")
    return proc.returncode, time.monotonic() - t_line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/fashion-mnist.yaml")
    parser.add_argument("--shards", default="data/fashion-mnist", help="data.shards for the runs")
    parser.add_argument("--nproc", type=int, default=2, help="ranks of the torchrun cases (>= 2)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers per rank")
    parser.add_argument("overrides", nargs="*", help="a.b=value config overrides")
    args = parser.parse_args()
    last = args.nproc - 1
    cases = [
        ("a step fails, one process", "step:0:3", 1),
        (f"a step fails on rank {last} of {args.nproc}", f"step:{last}:3", args.nproc),
        (f"rank 0 fails, rank 1 stuck, {args.nproc} ranks", "step:0:3,stuck:1:3", args.nproc),
    ]
    print(f"{'case':<36} {'exit':>5} {'seconds':>8}   (from the failure line to the end of every process)")
    with tempfile.TemporaryDirectory(prefix="dcgan-bench-failures-") as out_dir:
        for label, fault, nproc in cases:
            code, seconds = seconds_to_end(fault, nproc, args, out_dir)
            print(f"{label:<36} {code:>5} {seconds:>8.1f}", flush=True)


if __name__ == "__main__":
    main()
