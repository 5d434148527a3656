"""Trainer throughput: (a) the training step fed by the shard pipeline, (b) the same step
fed one batch already in memory. The gap is what the data pipeline costs.

    python bench/throughput.py --config configs/celeba.yaml --batch 64
    python bench/throughput.py --config configs/celeba.yaml --batch 64 --precision bf16 --workers 1

Without --shards it writes 64x64 RGB photo patches (random crops of scikit-image's
bundled sample photos, `pip install scikit-image`) to data/bench-photos64 once. One
process, no process group; each repeat times --steps steps after --warmup steps, and
the median over repeats is printed with the ratio (b)/(a).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from dcgan.config import load_config
from dcgan.data import Loader, ShardStream, resolve_shards
from dcgan.distributed import DistInfo
from dcgan.shards import main as shards_main
from dcgan.train import AMP_DTYPES, build_training, gan_step

BENCH_SHARDS = Path("data/bench-photos64")


def photo_patches(n: int, size: int, seed: int = 0) -> np.ndarray:
    """n RGB patches of real photos: random crops (96..256 px) resized to size x size."""
    import skimage.data
    from PIL import Image

    names = ["astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field"]
    photos = [getattr(skimage.data, name)()[..., :3] for name in names]
    rng = np.random.default_rng(seed)
    patches = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        photo = photos[rng.integers(len(photos))]
        side = int(rng.integers(96, min(256, *photo.shape[:2]) + 1))
        y, x = rng.integers(photo.shape[0] - side + 1), rng.integers(photo.shape[1] - side + 1)
        crop = Image.fromarray(photo[y : y + side, x : x + side]).resize((size, size), Image.BILINEAR)
        patches[i] = np.asarray(crop.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else crop)
    return patches


def ensure_bench_shards(size: int) -> Path:
    out = BENCH_SHARDS if size == 64 else Path(f"data/bench-photos{size}")
    if not (out / "manifest.json").exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        source = out.parent / f"{out.name}.npy"
        np.save(source, photo_patches(4096, size))
        assert shards_main([str(source), str(out), "--per-shard", "1024", "--overwrite"]) == 0
    return out


def timed_steps(step, batches, warmup: int, steps: int, sync) -> float:
    """img/s of ``step(batch)`` over ``steps`` batches after ``warmup`` batches."""
    for _ in range(warmup):
        step(next(batches))
    sync()
    start = time.perf_counter()
    n = 0
    for _ in range(steps):
        batch = next(batches)
        step(batch)
        n += batch.shape[0]
    sync()
    return n / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/celeba.yaml")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--precision", choices=list(AMP_DTYPES), help="default: the config's")
    parser.add_argument("--workers", type=int, default=1, help="data workers (default 1)")
    parser.add_argument("--shards", help="shards to read (default: photo patches made here)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("overrides", nargs="*", help="a.b=value config overrides")
    args = parser.parse_args(argv)

    base = load_config(args.config, args.overrides)
    shards = args.shards or str(ensure_bench_shards(base.model.image_size))
    overrides = [
        *args.overrides,
        f"train.batch_size={args.batch}",
        f"data.shards={shards}",
        f"data.workers={args.workers}",
    ]
    if args.precision:
        overrides.append(f"train.precision={args.precision}")
    cfg = load_config(args.config, overrides)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dist = DistInfo(rank=0, local_rank=0, world_size=1, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    amp_dtype = AMP_DTYPES[cfg.train.precision]

    state, g_train, d_train = build_training(cfg, dist)
    stream = ShardStream(
        resolve_shards(cfg.data), cfg.data, rank=0, world_size=1, batch_size=args.batch,
        image_size=cfg.model.image_size, channels=cfg.model.channels, seed=0,
    )  # fmt: skip
    loader = Loader(stream, device)

    def step(real: torch.Tensor) -> None:
        gan_step(state, g_train, d_train, real, cfg.model.nz, amp_dtype)

    def shard_batches():
        for epoch in range(10**9):
            for images, _ in loader.epoch(epoch):
                yield images

    def memory_batches():
        real = next(shard_batches())
        while True:
            yield real

    per_run = args.warmup + args.steps
    print(
        f"# {args.config}: arch {cfg.model.arch}, batch {args.batch}, {cfg.train.precision}, {device.type}, "
        f"{torch.get_num_threads()} threads, {args.workers} data worker(s), {args.repeats} x {args.steps} steps",
        flush=True,
    )
    shards_runs, memory_runs = [], []
    for _ in range(args.repeats):  # interleaved, so drift hits both alike
        shards_runs.append(timed_steps(step, shard_batches(), args.warmup, args.steps, sync))
        memory_runs.append(timed_steps(step, memory_batches(), args.warmup, args.steps, sync))
    a, b = statistics.median(shards_runs), statistics.median(memory_runs)
    print(f"(a) trainer reading shards : {a:8.1f} img/s  (runs: {', '.join(f'{x:.1f}' for x in shards_runs)})")
    print(f"(b) same step, batch in RAM: {b:8.1f} img/s  (runs: {', '.join(f'{x:.1f}' for x in memory_runs)})")
    print(f"(a)/(b) = {a / b:.3f}   ({per_run} steps per run, median of {args.repeats})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
