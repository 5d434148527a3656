"""The data pipeline alone: img/s of dcgan.data.stream.Loader (read tar, decode, resize when the
shards are not at model size, augment, collate, to float in [-1, 1]) on the CPU, per
shard encoding and DataLoader worker count. Nothing trains.

    python -m bench.data --config configs/celeba.yaml --batch 64
    python -m bench.data --workers 0,1,2 --formats 'png jpg npy raw png@128' --versus 230
    python -m bench.data data.augment.hflip=true data.augment.degrees=10   # with augmentation

``raw`` is `dcgan.shards --format raw`: 256 images per tar member as one uint8 .npy,
decoded without PIL. A format ``F@S`` reads shards stored at S px, resized to the
model's size while loading (what skipping `dcgan.shards --size` costs). Shards of 4096 photo patches (or of
--source) are written once per format under data/ (bench/throughput.py's; --data-dir). Each run reads --epochs epochs and
counts from each epoch's --skip-th batch on (worker start-up is a per-epoch cost that a
real epoch of a large dataset amortises); the median of --repeats runs is printed.
--versus: the trainer's consumption in img/s (bench/throughput.py's (b)), to print how
many times over the pipeline keeps up.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from bench.throughput import BENCH_DATA, ensure_bench_shards, int_list
from dcgan.config.loading import load_config
from dcgan.data.shardset import resolve_shards
from dcgan.data.stream import Loader, ShardStream
from dcgan.training.setup import memory_format


def pipeline_rate(loader: Loader, epochs: int, skip: int) -> float:
    images, seconds = 0, 0.0
    for epoch in range(epochs):
        start = None
        for i, (batch, _) in enumerate(loader.epoch(epoch)):
            if i == skip:
                start = time.perf_counter()
            elif i > skip:
                images += batch.shape[0]
        seconds += time.perf_counter() - start
    return images / seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/celeba.yaml")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int_list, default=[0, 1, 2], help="comma-separated")
    parser.add_argument("--formats", type=str.split, default="png jpg npy raw png@128", help="space-separated, quoted")
    parser.add_argument("--epochs", type=int, default=2, help="epochs of 4096 images per run")
    parser.add_argument("--skip", type=int, default=4, help="batches of each epoch not timed")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--versus", type=float, help="the trainer's img/s, for the ratio")
    parser.add_argument("--data-dir", type=Path, default=BENCH_DATA, help="where the bench shards go")
    parser.add_argument("--source", default="", help="images for the shards (default: photo patches)")
    parser.add_argument("overrides", nargs="*", help="a.b=value config overrides")
    args = parser.parse_args(argv)

    cfg = load_config(args.config, args.overrides)
    size = cfg.model.image_size
    print(
        f"# {args.config}: {size}x{size}x{cfg.model.channels}, batch {args.batch}, augment {cfg.data.augment}, "
        f"channels_last {cfg.train.channels_last}, {torch.get_num_threads()} threads in the main process",
        flush=True,
    )
    print(f"{'shards':14s} {'workers':>7s} {'img/s':>9s}" + ("  x trainer" if args.versus else "") + "  runs")
    for fmt in args.formats:
        image_format, _, stored = fmt.partition("@")
        shards = ensure_bench_shards(int(stored or size), image_format, args.data_dir, args.source)
        for workers in args.workers:
            run_cfg = load_config(
                args.config,
                [*args.overrides, f"data.shards={shards}", f"data.workers={workers}", f"train.batch_size={args.batch}"],
            )
            stream = ShardStream(
                resolve_shards(run_cfg.data), run_cfg.data, rank=0, world_size=1, batch_size=args.batch,
                image_size=size, channels=run_cfg.model.channels, seed=0,
            )  # fmt: skip
            loader = Loader(stream, torch.device("cpu"), memory_format=memory_format(run_cfg))
            runs = [pipeline_rate(loader, args.epochs, args.skip) for _ in range(args.repeats)]
            rate = statistics.median(runs)
            versus = f"  {rate / args.versus:9.1f}" if args.versus else ""
            print(f"{fmt:14s} {workers:7d} {rate:9.0f}{versus}  ({', '.join(f'{r:.0f}' for r in runs)})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
