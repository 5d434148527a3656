"""bench/gpu.sh's throughput table: each way of running the training step, measured alike.

Columns: img/s and ms per step (the median of the repeats, wall time with the GPU
synchronised at both ends); host µs per step (wall time until the last step was issued,
before waiting for the GPU: close to ms per step when the host is what bounds the step);
kernels and GPU-busy µs per step (torch.profiler's CUDA kernels, summed); MFU (FLOPs per
image, counted by torch.utils.flop_counter on one eager step, times img/s, over the dense
bf16 peak, for every row); peak memory; img/s over the plain seed loop's at the same batch.

Rows: the plain seed loop (bench/plain_loop.py, fp32); dcgan's step (dcgan/train_step.py)
eager in fp32 and bf16, compiled (train.compile), captured as a CUDA graph, and as a graph
fed by the cache (data.cache: the gather and the augmentation are in the timing); with a
process group of one (DDP over NCCL eager; the graph's flat all-reduce); the demo config.
Every row but the cache's is fed one batch held on the device.
"""

from __future__ import annotations

import functools
import itertools
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.distributed as dist

from dcgan.cache import CachedLoader
from dcgan.config import Config, load_config
from dcgan.distributed import DistInfo
from dcgan.shardset import resolve_shards
from dcgan.train_step import WARMUP_STEPS, TrainStep
from dcgan.training import STAT_NAMES, build_training, memory_format, set_tf32
from plain_loop import PlainLoop  # bench/ is on sys.path
from throughput import ensure_bench_shards, flops_per_image, host_syncs

Step = Callable[[torch.Tensor], object]


class Timing:
    def __init__(self, smoke: bool):
        self.warmup, self.steps, self.repeats, self.profiled = (3, 4, 2, 2) if smoke else (10, 60, 3, 10)


def measure(step: Step, batches: Iterator[torch.Tensor], batch: int, device: torch.device, timing: Timing) -> dict:
    """The row's figures for ``step`` fed by ``batches``."""
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for _ in range(timing.warmup):
        step(next(batches))
    sync()
    rates, hosts = [], []
    for _ in range(timing.repeats):
        t0 = time.perf_counter()
        for _ in range(timing.steps):
            step(next(batches))
        issued = time.perf_counter()
        sync()
        wall = time.perf_counter() - t0
        rates.append(timing.steps * batch / wall)
        hosts.append((issued - t0) / timing.steps)
    rate = statistics.median(rates)
    row = {"img_s": rate, "ms_step": 1e3 * batch / rate, "host_us": 1e6 * statistics.median(hosts)}
    if cuda:
        row["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
        row.update(kernel_profile(step, batches, timing.profiled))
    return row


def kernel_profile(step: Step, batches: Iterator[torch.Tensor], steps: int) -> dict:
    """CUDA kernels per step and their summed time, from torch.profiler."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step(next(batches))
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA and not e.name.startswith(("Memcpy", "Memset"))]
    return {"kernels": len(kernels) / steps, "gpu_busy_us": sum(e.time_range.elapsed_us() for e in kernels) / steps}


def trainer_step(cfg: Config, dist_info: DistInfo, graphed: bool) -> Step:
    state, g_train, d_train = build_training(cfg, dist_info, graphed=graphed)
    stats_sum = torch.zeros(len(STAT_NAMES), device=dist_info.device)
    return TrainStep(state, g_train, d_train, cfg, dist_info, stats_sum, graphed=graphed)


def config(smoke: bool, name: str, *overrides: str) -> Config:
    tiny = ["model.ngf=8", "model.ndf=8"] if smoke else []
    return load_config(f"configs/{name}.yaml", [*tiny, "data.workers=4", *overrides])


def measure_all(out: Path, smoke: bool, peak_tflops: float, deadline_s: float) -> dict:
    t_start = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() and not smoke else "cpu")
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True  # as dcgan.train
    one = DistInfo(rank=0, local_rank=0, world_size=1, device=device)
    timing = Timing(smoke)
    batches_sizes = (8,) if smoke else (128, 512)
    rows: list[dict] = []
    skipped: list[str] = []
    flops = {}

    def row(name: str, batch: int, make: Callable[[], tuple[Step, Iterator]], arch: str = "celeba") -> None:
        if time.perf_counter() - t_start > deadline_s:
            skipped.append(f"{name} @ {batch}")
            return
        try:
            step, batches = make()
            figures = measure(step, batches, batch, device, timing)
        except Exception as e:  # one row's failure is a figure too: the table goes on
            figures = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:150] if str(e) else ''}"}
        figures.update(name=name, batch=batch, arch=arch)
        if "img_s" in figures and arch in flops:
            figures["mfu"] = figures["img_s"] * flops[arch] / (peak_tflops * 1e12)
        rows.append(figures)
        print(format_row(figures, rows), flush=True)
        if cuda:
            torch.cuda.empty_cache()

    def repeat(batch_tensor: torch.Tensor) -> Iterator:
        return itertools.repeat(batch_tensor)

    def celeba_real(batch: int, layout=torch.channels_last) -> torch.Tensor:
        return (torch.rand(batch, 3, 64, 64, device=device) * 2 - 1).contiguous(memory_format=layout)

    tf32 = set_tf32("default")
    fp32 = config(smoke, "celeba", "train.precision=fp32")
    flops["celeba"] = flops_per_image(trainer_step(fp32, one, False), celeba_real(8))
    demo = config(smoke, "fashion-mnist", "train.precision=bf16")
    flops["demo"] = flops_per_image(trainer_step(demo, one, False), torch.rand(8, 1, 28, 28, device=device) * 2 - 1)

    shards = bench_shards(smoke)
    for batch in batches_sizes:
        b = [f"train.batch_size={batch}"]
        row("plain seed loop, fp32", batch,
            lambda: (PlainLoop(config(smoke, "celeba", *b), device).step, repeat(celeba_real(batch, torch.contiguous_format))))
        for precision in ("fp32", "bf16"):
            cfg = config(smoke, "celeba", *b, f"train.precision={precision}")
            row(f"eager {precision}", batch, lambda cfg=cfg: (trainer_step(cfg, one, False), repeat(celeba_real(batch))))
        bf16 = config(smoke, "celeba", *b, "train.precision=bf16")
        if cuda:
            row("graph bf16", batch, lambda: (trainer_step(bf16, one, True), repeat(celeba_real(batch))))
            cached = config(smoke, "celeba", *b, "train.precision=bf16", f"data.shards={shards}")
            row("graph bf16, cache", batch, lambda: (trainer_step(cached, one, True), cache_batches(cached, one)))
        else:
            skipped.append(f"graph rows @ {batch}: no GPU")
    if cuda:
        row("demo config, eager bf16", 128, lambda: (trainer_step(demo, one, False), repeat(torch.rand(128, 1, 28, 28, device=device).contiguous(memory_format=torch.channels_last))), "demo")
        row("demo config, graph bf16", 128, lambda: (trainer_step(demo, one, True), repeat(torch.rand(128, 1, 28, 28, device=device).contiguous(memory_format=torch.channels_last))), "demo")

    extra = process_group_rows(row, smoke, device, batches_sizes, celeba_real, repeat) if cuda else {}
    if smoke:  # inductor's C++ build of the nets takes minutes on a small CPU: the smoke test checks the code path
        torch.compile = functools.partial(torch.compile, backend="eager")
    for batch in batches_sizes:  # last: compiling takes the longest, and the time budget may stop it
        compiled = config(smoke, "celeba", f"train.batch_size={batch}", "train.precision=bf16", "train.compile=true")
        row("compile bf16", batch, lambda compiled=compiled: (trainer_step(compiled, one, False), repeat(celeba_real(batch))))

    table = format_table(rows, tf32, device, peak_tflops, skipped, extra)
    for line in table:
        print(line)
    failed = [r["name"] for r in rows if "error" in r]
    return {
        "ok": not failed, "line": f"{len(rows)} rows, {len(failed)} failed" + (f" ({', '.join(failed)})" if failed else ""),
        "rows": rows, "table": table, "flops_per_image": flops, "skipped": skipped, **extra,
    }  # fmt: skip


def bench_shards(smoke: bool) -> Path:
    """64x64 shards to train on: photo patches (scikit-image's sample photos, on the GPU
    image); for the smoke test scikit-learn's digits, scaled up (what the CPU machine has)."""
    if not smoke:
        return ensure_bench_shards(64)
    source = Path("data/bench-digits.npy")
    if not source.exists():
        from sklearn.datasets import load_digits

        import numpy as np

        source.parent.mkdir(parents=True, exist_ok=True)
        np.save(source, (load_digits().images[:256] * (255 / 16)).astype(np.uint8))
    return ensure_bench_shards(64, source=str(source))


def cache_batches(cfg: Config, one: DistInfo) -> Iterator[torch.Tensor]:
    loader = CachedLoader(
        resolve_shards(cfg.data), cfg.data, one, batch_size=cfg.train.batch_size, image_size=cfg.model.image_size,
        channels=cfg.model.channels, seed=0, memory_format=memory_format(cfg),
    )  # fmt: skip
    for epoch in itertools.count():
        for images, _ in loader.epoch(epoch):
            yield images


def process_group_rows(row, smoke, device, batch_sizes, celeba_real, repeat) -> dict:
    """Rows with a process group of one (NCCL), and the all-reduce of the nets' gradients."""
    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1, device_id=device)
    grouped = DistInfo(rank=0, local_rank=0, world_size=1, device=device, control_group=dist.new_group(backend="gloo"))
    extra = {}
    try:
        for batch in batch_sizes:
            cfg = config(smoke, "celeba", f"train.batch_size={batch}", "train.precision=bf16")
            row("process group of 1: eager DDP bf16", batch, lambda cfg=cfg: (trainer_step(cfg, grouped, False), repeat(celeba_real(batch))))
            row("process group of 1: graph bf16", batch, lambda cfg=cfg: (trainer_step(cfg, grouped, True), repeat(celeba_real(batch))))
        cfg = config(smoke, "celeba", "train.batch_size=128", "train.precision=bf16")
        ddp_step = trainer_step(cfg, grouped, False)
        extra["host_syncs_per_step_ddp_syncbn"] = host_syncs(ddp_step, celeba_real(128))
        graph_step = trainer_step(cfg, grouped, True)
        for _ in range(WARMUP_STEPS + 1):  # then a replay is what is counted
            graph_step(celeba_real(128))
        extra["host_syncs_per_step_graph"] = host_syncs(graph_step, celeba_real(128))
        params = sum(p.numel() for net in (ddp_step.state.generator, ddp_step.state.discriminator) for p in net.parameters())
        flat = torch.randn(params, device=device)
        for _ in range(5):
            dist.all_reduce(flat)
        torch.cuda.synchronize()
        times = []
        for _ in range(30):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dist.all_reduce(flat)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3)
        extra["all_reduce"] = {"params": params, "us": statistics.median(times), "world_size": 1}
    finally:
        dist.destroy_process_group()
    return extra


def format_row(r: dict, rows: list[dict]) -> str:
    if "error" in r:
        return f"{r['name']:<38} {r['batch']:>5}  ERROR {r['error']}"
    base = next((x for x in rows if x["name"].startswith("plain") and x["batch"] == r["batch"] and "img_s" in x), None)
    ratio = f"{r['img_s'] / base['img_s']:.2f}x" if base and r["arch"] == "celeba" else "-"
    kernels = f"{r['kernels']:.0f}" if "kernels" in r else "-"
    busy = f"{r['gpu_busy_us']:.0f}" if "gpu_busy_us" in r else "-"
    mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else "-"
    peak = f"{r['peak_gb']:.2f}" if "peak_gb" in r else "-"
    return (f"{r['name']:<38} {r['batch']:>5} {r['img_s']:>9.0f} {r['ms_step']:>8.2f} {r['host_us']:>8.0f} {kernels:>7} "
            f"{busy:>8} {mfu:>6} {peak:>6} {ratio:>7}")  # fmt: skip


def format_table(rows, tf32, device, peak_tflops, skipped, extra) -> list[str]:
    head = (f"{'row':<38} {'batch':>5} {'img/s':>9} {'ms/step':>8} {'host us':>8} {'kernels':>7} {'GPU us':>8} "
            f"{'MFU':>6} {'peakGB':>6} {'x plain':>7}")  # fmt: skip
    lines = [f"throughput on {device} ({tf32}; MFU vs {peak_tflops:g} TFLOP/s dense bf16)", head]
    lines += [format_row(r, rows[: i + 1]) for i, r in enumerate(rows)]
    if "all_reduce" in extra:
        a = extra["all_reduce"]
        lines.append(f"NCCL all-reduce of {a['params'] / 1e6:.2f}M fp32 gradients at world size 1: {a['us']:.0f} us")
    if "host_syncs_per_step_ddp_syncbn" in extra:
        lines.append(f"host syncs per step, world size 1: eager DDP + SyncBN {extra['host_syncs_per_step_ddp_syncbn']}, "
                     f"graph {extra['host_syncs_per_step_graph']}")  # fmt: skip
    if skipped:
        lines.append(f"skipped: {'; '.join(skipped)}")
    return lines
