"""Training throughput, img/s, for one config at one batch size, one process:

(a) the trainer's step (dcgan.training.step.gan_step, as configured) fed by the shard pipeline;
(a') the same step fed by the set cached on the device (data.cache; its build time is
    printed), when data.cache=auto would cache it: (a')/(a) is what the cache gains;
(b) the same step fed one batch already in memory: (a)/(b) is what the data costs;
(c) the plain seed-style loop of bench/plain_loop.py (fp32, Sigmoid + BCELoss, separate
    real/fake passes, no DDP, torch's default Adam and memory layout) on the same
    architecture, fed from memory like (b): (a)/(c) is what the project gains.

    python -m bench.throughput --config configs/celeba.yaml --batch 64 --precision bf16
    python -m bench.throughput --precision bf16 --ablate train.channels_last=false --ablate optim.fused=false

Each --ablate override is one more variant: (b) with that one setting changed, so each
speed setting is seen to pay (ratio to (b) below 1) or not. All variants run in turn in
every repeat (drift hits them alike); each repeat times --steps steps after --warmup
steps, and the medians are printed. FLOPs per image per iteration are counted by
torch.utils.flop_counter on one real step (and on CUDA, the host syncs in one step by
torch.cuda.set_sync_debug_mode); with --peak-tflops (the device's dense peak
for the precision) the model FLOPs utilisation (MFU) of (a) is printed too.

Without --shards it writes 64x64 RGB photo patches (random crops of scikit-image's
bundled sample photos, `pip install scikit-image`) to data/bench-photos64 once.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.plain_loop import PlainLoop, batches
from dcgan.config.loading import load_config
from dcgan.config.sections import Config
from dcgan.data.cache import CachedLoader, choose_cache, measure_room
from dcgan.data.shardset import resolve_shards
from dcgan.data.stream import Loader, ShardStream
from dcgan.run.distributed import DistInfo
from dcgan.shards import main as shards_main
from dcgan.training.setup import build_training, memory_format, set_tf32
from dcgan.training.step import AMP_DTYPES, StepSettings, gan_step

BENCH_DATA = Path("data")  # where the photo-patch shards are written


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


def ensure_bench_shards(size: int, image_format: str = "png", root: Path = BENCH_DATA, source: str = "") -> Path:
    """Shards at ``size`` px in ``image_format`` under ``root``, written once: of ``source``
    (anything `python -m dcgan.shards` reads) when given, else of 4096 photo patches."""
    name = Path(source).stem.split(".")[0] if source else "bench-photos"
    out = root / (f"{name}{size}" + ("" if image_format == "png" else f"-{image_format}"))
    if not (out / "manifest.json").exists():
        root.mkdir(parents=True, exist_ok=True)
        if not source:
            source = str(root / f"bench-photos{size}.npy")
            if not Path(source).exists():
                np.save(source, photo_patches(4096, size))
        args = [source, str(out), "--size", str(size), "--per-shard", "1024", "--format", image_format, "--overwrite"]
        assert shards_main(args) == 0
    return out


def bench_overrides(args: argparse.Namespace) -> list[str]:
    """The user's overrides plus the bench's batch, workers and shards (photo patches at
    the config's image size unless --shards)."""
    size = load_config(args.config, args.overrides).model.image_size
    shards = args.shards or str(ensure_bench_shards(size))
    return [*args.overrides, f"train.batch_size={args.batch}", f"data.shards={shards}", f"data.workers={args.workers}"]


def int_list(text: str) -> list[int]:
    """argparse type: "1,2,4" -> [1, 2, 4]."""
    return [int(part) for part in text.split(",")]


def timed_steps(step: Callable[[torch.Tensor], object], batches: Iterator, warmup: int, steps: int, sync) -> float:
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


def trainer_step(cfg: Config, dist: DistInfo) -> Callable[[torch.Tensor], torch.Tensor]:
    """dcgan.train's step, as ``cfg`` configures it, on a fresh state."""
    state, g_train, d_train = build_training(cfg, dist)
    amp_dtype, real_target = AMP_DTYPES[cfg.train.precision], 1.0 - cfg.optim.label_smoothing

    def step(real: torch.Tensor) -> torch.Tensor:
        return gan_step(state, g_train, d_train, real, StepSettings(cfg.model.nz, amp_dtype, real_target))

    return step


def flops_per_image(step: Callable[[torch.Tensor], object], real: torch.Tensor) -> float:
    """FLOPs of one training iteration (forwards and backwards of D and G) per image."""
    counter = FlopCounterMode(display=False)
    with counter:
        step(real)
    return counter.get_total_flops() / real.shape[0]


def host_syncs(step: Callable[[torch.Tensor], object], real: torch.Tensor) -> int:
    """CUDA only: the operations of one step that make the host wait for the GPU."""
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step(real)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/celeba.yaml")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--precision", choices=list(AMP_DTYPES), help="default: the config's")
    parser.add_argument("--workers", type=int, default=1, help="data workers (default 1)")
    parser.add_argument("--shards", help="shards to read (default: photo patches made here)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--ablate", action="append", default=[], metavar="A.B=VALUE", help="one more variant; repeatable"
    )
    parser.add_argument("--peak-tflops", type=float, help="the device's dense peak TFLOP/s, for MFU")
    parser.add_argument("overrides", nargs="*", help="a.b=value config overrides (all variants)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    overrides = bench_overrides(args) + ([f"train.precision={args.precision}"] if args.precision else [])
    cfg = load_config(args.config, overrides)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dist = DistInfo(rank=0, local_rank=0, world_size=1, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as dcgan.train does
    tf32 = set_tf32(cfg.train.tf32) if device.type == "cuda" else ""

    stream = ShardStream(
        resolve_shards(cfg.data), cfg.data, rank=0, world_size=1, batch_size=args.batch,
        image_size=cfg.model.image_size, channels=cfg.model.channels, seed=0,
    )  # fmt: skip
    loader = Loader(stream, device, memory_format=memory_format(cfg))
    real = next(batches(loader))
    cache = choose_cache(replace(cfg.data, cache="auto"), stream.shards.counts, cfg.model.channels,
                         cfg.model.image_size, 1, measure_room(device))  # fmt: skip
    cached = None
    if cache.on:
        cached = CachedLoader(
            stream.shards, cfg.data, dist, batch_size=args.batch, image_size=cfg.model.image_size,
            channels=cfg.model.channels, seed=0, memory_format=memory_format(cfg),
        )  # fmt: skip

    # name -> (step, a fresh batch iterator per run)
    step = trainer_step(cfg, dist)
    variants: dict[str, tuple[Callable, Callable[[], Iterator]]] = {
        "(a) trainer reading shards": (step, lambda: batches(loader)),
        "(b) same step, batch in RAM": (step, lambda: itertools.repeat(real)),
    }
    if cached is not None:
        variants["(a') trainer reading the cache"] = (step, lambda: batches(cached))
    plain = PlainLoop(cfg, device)  # fp32 whatever the config says
    plain_real = real.contiguous()  # the seeds' layout
    variants["(c) plain seed-style loop"] = (plain.step, lambda: itertools.repeat(plain_real))
    for override in args.ablate:
        ablated = load_config(args.config, [*overrides, override])
        ablated_real = real.contiguous(memory_format=memory_format(ablated))
        variants[f"(b) with {override}"] = (trainer_step(ablated, dist), lambda r=ablated_real: itertools.repeat(r))

    # Counted on an eager copy of the step: FLOPs do not depend on compilation.
    flops = flops_per_image(trainer_step(load_config(args.config, [*overrides, "train.compile=false"]), dist), real)
    print(
        f"# {args.config}: arch {cfg.model.arch}, batch {args.batch}, {cfg.train.precision}, "
        f"channels_last {cfg.train.channels_last}, fused Adam {cfg.optim.fused}, compile {cfg.train.compile}, "
        f"{device.type}, {torch.get_num_threads()} threads, {args.workers} data worker(s); "
        f"{args.repeats} x {args.steps} steps; {flops / 1e9:.3f} GFLOP per image per iteration"
        + (f"; {tf32}" if tf32 else ""),
        flush=True,
    )
    runs: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, (variant_step, make_batches) in variants.items():
            runs[name].append(timed_steps(variant_step, make_batches(), args.warmup, args.steps, sync))
    median = {name: statistics.median(r) for name, r in runs.items()}
    a, b, c = (median[name] for name in ("(a) trainer reading shards", "(b) same step, batch in RAM",
                                          "(c) plain seed-style loop"))  # fmt: skip
    for name, rate in median.items():
        extra = f"  x{rate / b:.3f} of (b)" if name.startswith("(b) with") else ""
        print(f"{name:40s} {rate:9.1f} img/s{extra}  (runs: {', '.join(f'{x:.1f}' for x in runs[name])})")
    print(f"(a)/(c) = {a / c:.2f}   (b)/(c) = {b / c:.2f}   (a)/(b) = {a / b:.3f}")
    if cached is None:
        print(f"(a') not run: {cache.why}")
    else:
        cache_rate = median["(a') trainer reading the cache"]
        print(f"(a')/(a) = {cache_rate / a:.3f}   (a')/(b) = {cache_rate / b:.3f}   cache of {cached.samples} images "
              f"built in {cached.build_seconds:.1f}s ({cached.samples / cached.build_seconds:.0f} img/s)")  # fmt: skip
    achieved = a * flops / 1e12
    mfu = f", MFU {100 * achieved / args.peak_tflops:.1f}% of {args.peak_tflops:g}" if args.peak_tflops else ""
    print(f"(a) achieves {achieved:.3f} TFLOP/s{mfu}")
    if device.type == "cuda":  # after the timed runs: compilation and cudnn autotuning are done
        print(f"host syncs in one training step: {host_syncs(step, real)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
