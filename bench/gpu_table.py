"""bench/gpu.sh's throughput table: each way of running the training step, measured alike.

Columns: img/s and ms per step (the median of the repeats, wall time with the GPU
synchronised at both ends); host µs per step (wall time until the last step was issued,
before waiting for the GPU: close to ms per step when the host is what bounds the step);
kernels and GPU-busy µs per step (torch.profiler's CUDA kernels, summed); MFU (FLOPs per
image, counted by torch.utils.flop_counter on one eager step, times img/s, over the dense
bf16 peak, for every row); peak memory; img/s over the plain seed loop's at the same batch.

Rows: the plain seed loop (bench/plain_loop.py, fp32); dcgan's step (dcgan/training/step.py)
eager in fp32 and bf16, compiled (train.compile), captured as a CUDA graph, and as a graph
fed by the cache (data.cache: the gather and the augmentation are in the timing); with a
process group of one (DDP over NCCL eager; the graph's flat all-reduce); the demo config.
Every row but the cache's is fed one batch held on the device.
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

from bench.plain_loop import PlainLoop
from bench.throughput import ensure_bench_shards, flops_per_image, host_syncs
from dcgan.config.loading import load_config
from dcgan.config.sections import Config
from dcgan.data.cache import CachedLoader
from dcgan.data.shardset import resolve_shards
from dcgan.run.distributed import DistInfo
from dcgan.training.setup import build_training, memory_format, set_tf32
from dcgan.training.step import STAT_NAMES, WARMUP_STEPS, TrainStep

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
    kernels = [
        e for e in prof.events() if e.device_type == DeviceType.CUDA and not e.name.startswith(("Memcpy", "Memset"))
    ]
    by_name: dict[str, list[float]] = {}
    for e in kernels:
        by_name.setdefault(e.name, []).append(e.time_range.elapsed_us())
    top = sorted(by_name.items(), key=lambda item: -sum(item[1]))[:10]
    return {
        "kernels": len(kernels) / steps,
        "gpu_busy_us": sum(e.time_range.elapsed_us() for e in kernels) / steps,
        # where the GPU's time goes: (kernel, calls per step, µs per step)
        "top_kernels": [(name[:90], len(times) / steps, sum(times) / steps) for name, times in top],
    }


def trainer_step(cfg: Config, dist_info: DistInfo, graphed: bool) -> Step:
    state, g_train, d_train = build_training(cfg, dist_info, graphed=graphed)
    stats_sum = torch.zeros(len(STAT_NAMES), device=dist_info.device)
    return TrainStep(state, g_train, d_train, cfg, dist_info, stats_sum, graphed=graphed)


def config(smoke: bool, name: str, *overrides: str) -> Config:
    tiny = ["model.ngf=8", "model.ndf=8"] if smoke else []
    return load_config(f"configs/{name}.yaml", [*tiny, "data.workers=4", *overrides])


class Table:
    """The rows measured so far; ``row`` measures one (an error is recorded as the row's figure)."""

    def __init__(self, device: torch.device, smoke: bool, peak_tflops: float, deadline_s: float, only: list[str]):
        self.device, self.timing, self.peak_tflops, self.only = device, Timing(smoke), peak_tflops, only
        self.t_end = time.perf_counter() + deadline_s
        self.rows: list[dict] = []
        self.skipped: list[str] = []
        self.flops: dict[str, float] = {}  # arch -> FLOPs per image per iteration

    def wants(self, name: str) -> bool:
        return not self.only or any(word in name for word in self.only)

    def row(
        self, name: str, batch: int, build: Callable[[], Step], feed: Callable[[], Iterator], arch="celeba"
    ) -> None:
        """Measure ``build()``'s step fed by ``feed()`` (both called here, so rows never share a state)."""
        if not self.wants(name):
            return
        if time.perf_counter() > self.t_end:
            self.skipped.append(f"{name} @ {batch} (time budget)")
            return
        try:
            figures = measure(build(), feed(), batch, self.device, self.timing)
        except Exception as e:  # one row's failure is a figure too: the table goes on
            figures = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:150] if str(e) else ''}"}
        figures.update(name=name, batch=batch, arch=arch)
        if "img_s" in figures and arch in self.flops:
            figures["mfu"] = figures["img_s"] * self.flops[arch] / (self.peak_tflops * 1e12)
        self.rows.append(figures)
        print(format_row(figures, self.rows), flush=True)
        for kernel, calls, us in figures.get("top_kernels", []):
            print(f"      {us:8.1f} us in {calls:5.1f} calls/step  {kernel}")
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def random_batch(device: torch.device, batch: int, channels: int = 3, size: int = 64, channels_last=True) -> Iterator:
    """One batch in [-1, 1] on the device, given again and again."""
    layout = torch.channels_last if channels_last else torch.contiguous_format
    return itertools.repeat(
        (torch.rand(batch, channels, size, size, device=device) * 2 - 1).contiguous(memory_format=layout)
    )


def measure_all(smoke: bool, only: list[str], peak_tflops: float, deadline_s: float) -> dict:
    """Every row (``only``: the rows whose name holds one of these words), then the table."""
    device = torch.device("cuda" if torch.cuda.is_available() and not smoke else "cpu")
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True  # as dcgan.train
    one = DistInfo(rank=0, local_rank=0, world_size=1, device=device)
    table = Table(device, smoke, peak_tflops, deadline_s, only)
    tf32 = set_tf32("default")
    celeba = partial(config, smoke, "celeba")
    demo = config(smoke, "fashion-mnist", "train.precision=bf16")
    table.flops["celeba"] = flops_per_image(trainer_step(celeba(), one, False), next(random_batch(device, 8)))
    table.flops["demo"] = flops_per_image(trainer_step(demo, one, False), next(random_batch(device, 8, 1, 28)))

    shards = bench_shards(smoke)
    batch_sizes = (8,) if smoke else (128, 512)
    for batch in batch_sizes:
        size = f"train.batch_size={batch}"
        feed = partial(random_batch, device, batch)
        table.row("plain seed loop, fp32", batch, partial(plain_step, celeba(size), device),
                  partial(random_batch, device, batch, channels_last=False))  # fmt: skip
        for precision in ("fp32", "bf16"):
            table.row(f"eager {precision}", batch, partial(trainer_step, celeba(size, f"train.precision={precision}"),
                                                           one, False), feed)  # fmt: skip
        if not cuda:
            table.skipped.append(f"graph rows @ {batch} (no GPU)")
            continue
        for precision in ("fp32", "bf16"):
            cfg = celeba(size, f"train.precision={precision}")
            table.row(f"graph {precision}", batch, partial(trainer_step, cfg, one, True), feed)
        cached = celeba(size, "train.precision=bf16", f"data.shards={shards}")
        table.row(
            "graph bf16, cache", batch, partial(trainer_step, cached, one, True), partial(cache_batches, cached, one)
        )
    if cuda:
        demo_feed = partial(random_batch, device, demo.train.batch_size, 1, 28)
        for name, graphed in (("demo config, eager bf16", False), ("demo config, graph bf16", True)):
            table.row(name, demo.train.batch_size, partial(trainer_step, demo, one, graphed), demo_feed, "demo")
    extra = process_group_rows(table, celeba, device, batch_sizes) if cuda and table.wants("process group") else {}
    if smoke:  # inductor's C++ build of the nets takes minutes on a small CPU: the smoke test checks the code path
        torch.compile = partial(torch.compile, backend="eager")
    for batch in batch_sizes:  # last: compiling takes the longest, and the time budget may cut it
        # NCHW: train.compile refuses channels_last on a GPU (pytorch#171622, dcgan/preflight.py).
        compiled = celeba(f"train.batch_size={batch}", "train.precision=bf16", "train.compile=true",
                          "train.channels_last=false")  # fmt: skip
        feed = partial(random_batch, device, batch, channels_last=False)
        table.row("compile bf16, NCHW", batch, partial(trainer_step, compiled, one, False), feed)
        if cuda:  # the compiled step captured as a graph (train.cuda_graph=on with train.compile), and without compile
            table.row("compile + graph bf16, NCHW", batch, partial(trainer_step, compiled, one, True), feed)
            nchw = celeba(f"train.batch_size={batch}", "train.precision=bf16", "train.channels_last=false")
            table.row("graph bf16, NCHW", batch, partial(trainer_step, nchw, one, True), feed)

    lines = format_table(table.rows, tf32, device, peak_tflops, table.skipped, extra)
    for line in lines:
        print(line)
    failed = [r["name"] for r in table.rows if "error" in r]
    return {
        "ok": not failed, "line": f"{len(table.rows)} rows, {len(failed)} failed" + (f" ({', '.join(failed)})" if failed else ""),
        "rows": table.rows, "table": lines, "flops_per_image": table.flops, "skipped": table.skipped, **extra,
    }  # fmt: skip


def plain_step(cfg: Config, device: torch.device) -> Step:
    return PlainLoop(cfg, device).step


def bench_shards(smoke: bool) -> Path:
    """64x64 shards to train on: photo patches (scikit-image's sample photos, on the GPU
    image); for the smoke test scikit-learn's digits, scaled up (what the CPU machine has)."""
    if not smoke:
        return ensure_bench_shards(64)
    source = Path("data/bench-digits.npy")
    if not source.exists():
        import numpy as np
        from sklearn.datasets import load_digits

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


def process_group_rows(table: Table, celeba: Callable[..., Config], device: torch.device, batch_sizes) -> dict:
    """Rows with a process group of one (NCCL), its host syncs, and the all-reduce of the nets' gradients."""
    device = torch.device("cuda", torch.cuda.current_device())  # NCCL's device_id needs the index
    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1, device_id=device)
    grouped = DistInfo(rank=0, local_rank=0, world_size=1, device=device, control_group=dist.new_group(backend="gloo"))
    extra = {}
    try:
        for batch in batch_sizes:
            cfg, feed = (
                celeba(f"train.batch_size={batch}", "train.precision=bf16"),
                partial(random_batch, device, batch),
            )
            table.row("process group of 1: eager DDP bf16", batch, partial(trainer_step, cfg, grouped, False), feed)
            table.row("process group of 1: graph bf16", batch, partial(trainer_step, cfg, grouped, True), feed)
        cfg, real = celeba("train.batch_size=128", "train.precision=bf16"), next(random_batch(device, 128))
        ddp_step = trainer_step(cfg, grouped, False)
        extra["host_syncs_per_step_ddp_syncbn"] = host_syncs(ddp_step, real)
        graph_step = trainer_step(cfg, grouped, True)
        for _ in range(WARMUP_STEPS + 1):  # then a replay is what is counted
            graph_step(real)
        extra["host_syncs_per_step_graph"] = host_syncs(graph_step, real)
        nets = (ddp_step.state.generator, ddp_step.state.discriminator)
        flat = torch.randn(sum(p.numel() for net in nets for p in net.parameters()), device=device)
        extra["all_reduce"] = {"params": flat.numel(), "us": all_reduce_us(flat), "world_size": 1}
    finally:
        dist.destroy_process_group()
    return extra


def all_reduce_us(flat: torch.Tensor, repeats: int = 30) -> float:
    """The median time of one NCCL all-reduce of ``flat``, by CUDA events."""
    for _ in range(5):
        dist.all_reduce(flat)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dist.all_reduce(flat)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


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
