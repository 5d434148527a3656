"""Where a run's progress goes, from rank 0: the console (a bar on a terminal, plain lines
otherwise), the run folder and W&B (``dcgan/tracking/wandb_run.py``).

The tracker also keeps the log interval on every rank (``Interval``: the summed step
statistics on the device, the data wait, the time) and decides when a log line and a
sample grid are due (``log_due``, ``sample_grid_if_due``).

Run folder, W&B or not: ``metrics.jsonl`` (one object per log step), ``samples/*.png``,
``losses.png`` (redrawn with every sample grid), ``summary.json`` (at the end of each
attempt) and ``provenance.json`` (what ran, each attempt: ``dcgan/tracking/provenance.py``; also
the W&B config's ``provenance``). Other ranks hold a Tracker that does nothing, nothing
here is a collective, and PNG writing and plotting happen on a background thread: no
rank waits on tracking.

A write to the run folder that fails (a full disk, a quota, an I/O error) is reported
once per file kind and training goes on: metrics lines wait in memory and are written
with the next line that gets through; the checkpoints decide the run's fate
(``dcgan/train.py``).

Resume: W&B keeps a run's history and needs increasing steps, so after a resume from
step S the steps S+1..L that the stopped attempt had already logged (L: the last step in
metrics.jsonl) are not sent again; metrics.jsonl is cut back to S and re-written as the
replay goes (an exact resume replays the same values).
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from dcgan.base.fileio import write_atomic
from dcgan.base.images import enlarged, save_png, to_uint8_grid
from dcgan.base.progress import StepProgress
from dcgan.checkpoint.state import TrainState
from dcgan.config.sections import Config
from dcgan.quality.scores import format_scores, protocol_tag
from dcgan.run.distributed import DistInfo
from dcgan.run.folder import RunFolder, metrics_records
from dcgan.tracking import provenance
from dcgan.tracking.wandb_run import WandbRun, open_run

log = logging.getLogger(__name__)

# Metrics with a better direction, reported as "best" in the summary (the eval metrics).
BEST = {"fid": "min", "kid": "min", "precision": "max", "recall": "max"}
# What losses.png shows: (panel title, metric names).
PLOT_PANELS = (("loss", ("loss_d", "loss_g")), ("discriminator output", ("d_real", "d_fake", "d_fake_after")))


class Interval:
    """The log interval in progress, on every rank: the sum of its steps' gan_step
    statistics (on the device: read once, at the log step), its steps, data wait and time."""

    def __init__(self, stat_names: tuple[str, ...], device: torch.device):
        self.stat_names = stat_names
        # Summed into in place by the step (dcgan/training/step.py), and only ever zeroed in
        # place: a captured CUDA graph holds its address.
        self.stats = torch.zeros(len(stat_names), device=device)
        self.steps, self.data_wait, self.started = 0, 0.0, time.perf_counter()

    def timed(self, batches: Iterable) -> Iterator:
        """``batches``, counting the time spent waiting for each as data wait."""
        t_fetch = time.perf_counter()
        for batch in batches:
            self.data_wait += time.perf_counter() - t_fetch
            yield batch
            t_fetch = time.perf_counter()

    def exclude(self, seconds: float) -> None:
        """Leave ``seconds`` (an evaluation) out of the interval's img/s."""
        self.started += seconds

    def reset(self) -> None:
        self.stats.zero_()
        self.steps, self.data_wait, self.started = 0, 0.0, time.perf_counter()


class Tracker:
    def __init__(self, cfg: Config, enabled: bool, stat_names: tuple[str, ...], device: torch.device | None = None):
        """``stat_names``: what each entry of the step's statistics is (its producer's
        STAT_NAMES, dcgan/training/step.py), in order."""
        self.cfg, self.enabled = cfg, enabled
        self.device = device or torch.device("cpu")
        self.interval = Interval(stat_names, self.device)
        self.folder = RunFolder.of(cfg)
        self.run_dir = self.folder.path
        self.samples_dir = self.folder.samples
        self.metrics_path = self.folder.metrics
        self.wandb = WandbRun(None, "disabled")
        self.wandb_has_through = -1  # the W&B run already holds steps up to here (see module doc)
        self.timeline = ""  # the id of the timeline trained on (dcgan/run/timelines.py), in every metrics line
        self.last: dict[str, Any] = {}  # the newest logged value of each metric
        self.best: dict[str, dict[str, float]] = {}  # BEST metric -> {"value", "step"}
        self.progress = StepProgress(0, 0, enabled=False)
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="tracker") if enabled else None
        self._pending: list[tuple[str, Future]] = []
        self._unwritten: list[str] = []  # metrics lines not on disk yet (a write failed)
        self._torn = False  # the last metrics write failed, maybe after half a line
        self.failed_writes: dict[str, int] = {}  # what -> writes that failed

    def start(self, step: int, total: int, wandb_run_id: str | None, config: dict, timeline: str = "") -> str | None:
        """Open the outlets at ``step`` (0, or the step resumed from). ``wandb_run_id``:
        the checkpoint's, to continue that W&B run; ``timeline``: the id every metrics line
        of this attempt carries (dcgan/run/timelines.py). Returns the id to store in checkpoints."""
        self.timeline = timeline
        if not self.enabled:
            return wandb_run_id
        try:
            self.samples_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            self._write_failed("sample grids", e)
        logged_through = self._rewind(step)
        if wandb_run_id is not None:
            self.wandb_has_through = logged_through
        config = {**config, "provenance": self._provenance(step)}
        self.wandb = open_run(self.cfg.wandb, self.run_dir, self.cfg.train.name, wandb_run_id, config)
        self.progress = StepProgress(total, step, enabled=True)
        return self.wandb.id or wandb_run_id  # W&B off this time: keep the id for the next attempt

    def advance(self, step: int) -> None:
        """A step is done (its statistics are in ``interval.stats``): count it, move the progress bar."""
        self.interval.steps += 1
        self.progress.update(step)

    def log_due(self, step: int) -> bool:
        return step % self.cfg.log.every == 0 or step == self.cfg.train.steps

    def log_interval(self, step: int, state: TrainState, corrupt_samples: int, dist: DistInfo) -> None:
        """The interval's metrics line (rank 0; the one host sync of the interval), then a new interval."""
        if self.enabled:
            values = interval_values(self.interval, state, self.cfg.train.batch_size * self.cfg.optim.d_steps, dist)
            values.update(epoch=state.epoch, corrupt_samples=corrupt_samples)
            self.metrics(step, values, (
                f"step {step}/{self.cfg.train.steps} | epoch {state.epoch} | "
                f"loss_D {values['loss_d']:.3f} | loss_G {values['loss_g']:.3f} | "
                f"D(x) {values['d_real']:.3f} | D(G(z)) {values['d_fake']:.3f} -> {values['d_fake_after']:.3f} | "
                f"{values['img_per_s']:.0f} img/s | data wait {100 * values['data_wait']:.0f}%"
                + (f" | aug p {values['aug_p']:.3f} (r_t {values['d_real_sign']:.2f})" if "aug_p" in values else "")
            ))  # fmt: skip
        self.interval.reset()

    def sample_grid_if_due(
        self, step: int, sample: Callable[..., torch.Tensor], noise: torch.Tensor, labels: torch.Tensor | None = None
    ) -> None:
        """G(fixed noise) every log.samples_every steps and at the end (rank 0); a conditional
        G's with ``labels``, one row per class."""
        if self.enabled and (step % self.cfg.log.samples_every == 0 or step == self.cfg.train.steps):
            if labels is None:
                self.sample_grid(step, sample(noise))
            else:
                self.sample_grid(
                    step, sample(noise, labels), nrow=len(labels) // self.cfg.model.num_classes
                )  # a row a class

    def scores(self, step: int, scores: dict[str, float], state: TrainState, improved: bool) -> None:
        """An evaluation's line and metrics (state: after the evaluator updated the best FID)."""
        if improved:
            best = " | best so far"
        elif state.best_fid is None:  # degenerate samples so far: no best yet
            best = " | no best yet"
        else:
            best = f" | best {state.best_fid:.3f} at step {state.best_fid_step}"
        tag = f" [{protocol_tag(scores.get('protocol'))}]" if scores.get("protocol") else ""
        line = f"eval step {step}{tag}: {format_scores(scores)} | {scores['eval_seconds']:.1f}s{best}"
        self.metrics(step, {**scores, "best_fid": state.best_fid}, line)

    def metrics(self, step: int, values: dict[str, float], line: str) -> None:
        """Log ``line`` (with the ETA) and record ``values`` at ``step``; a non-finite
        value is written as null and not sent to W&B."""
        if not self.enabled:
            return
        clean = {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in values.items()}
        self._append_metrics(json.dumps({"step": step, "timeline": self.timeline, **clean}) + "\n")
        self._remember(step, clean)
        log.info("%s | eta %s", line, self.progress.eta())
        self.progress.postfix(loss_d=clean.get("loss_d"), loss_g=clean.get("loss_g"))
        if step > self.wandb_has_through:
            self.wandb.log({k: v for k, v in clean.items() if v is not None}, step=step)

    def real_grid(self, images: torch.Tensor) -> None:
        """A grid of real training images, once at the start of a run (``samples/real.png``)."""
        self._grid(images, "real", self.folder.real_grid, step=0)

    def sample_grid(self, step: int, images: torch.Tensor, nrow: int = 8) -> None:
        """G(fixed noise) at ``step``: ``samples/step_<step>.png``, W&B "samples"; redraws losses.png."""
        self._grid(images, "samples", self.folder.sample(step), step, nrow)
        self._in_background("losses.png", plot_losses, self.metrics_path, self.folder.losses_plot)

    def finish(self, exit_code: int, preempted: bool, facts: dict[str, Any]) -> None:
        """End of this attempt: summary.json (``facts`` + final and best values), the last
        plot, the W&B summary; waits for the background writes."""
        if not self.enabled:
            return
        self.progress.close()
        self._in_background("losses.png", plot_losses, self.metrics_path, self.folder.losses_plot)
        self._writer.shutdown(wait=True)
        self._collect(wait=True)
        if self._unwritten:
            self._append_metrics("")  # a last try
        summary = {
            **facts,
            "final": self.last,
            "best": self.best,
            "wandb": {"mode": self.wandb.mode, "id": self.wandb.id, "dir": str(self.wandb.files_dir or "")},
            "failed_writes": self.failed_writes,
        }
        try:
            self.folder.write_summary(summary)
        except OSError as e:
            self._write_failed(self.folder.summary.name, e)
        if self.failed_writes:
            log.warning(
                "writes to %s that failed this attempt: %s%s", self.run_dir,
                ", ".join(f"{what} {n}" for what, n in self.failed_writes.items()),
                f"; {len(self._unwritten)} metrics line(s) never reached metrics.jsonl" if self._unwritten else "",
            )  # fmt: skip
        self.wandb.summary({
            **{k: v for k, v in facts.items() if isinstance(v, (int, float, str))},
            **{f"best_{name}": b["value"] for name, b in self.best.items()},
        })  # fmt: skip
        self.wandb.finish(exit_code, preempted)

    # ------------------------------------------------------------------ internals

    def _provenance(self, step: int) -> dict[str, Any]:
        """This attempt's provenance (dcgan/tracking/provenance.py), appended to provenance.json."""
        source = self.cfg.source
        attempt = {
            "step": step,  # the step this attempt starts from
            **provenance.collect(getattr(sys, "orig_argv", sys.argv), list(source.overrides), self.device, source.file),
        }
        try:
            provenance.record(self.folder.provenance, attempt)
        except OSError as e:
            self._write_failed(self.folder.provenance.name, e)
        return attempt

    def _grid(self, images: torch.Tensor, key: str, path: Path, step: int, nrow: int = 8) -> None:
        if not self.enabled:
            return
        grid = enlarged(to_uint8_grid(images, nrow=nrow))
        self._in_background("sample grids", save_png, grid, path)
        if step > self.wandb_has_through:
            self.wandb.image(key, grid, step, caption=f"step {step}")

    def _rewind(self, step: int) -> int:
        """Keep the metrics of steps <= ``step`` (the rest is about to be trained again; a
        line cut by a kill goes too) and take the final/best values from them. Returns the
        last step the file had."""
        if not self.metrics_path.exists():
            return 0
        lines = self.metrics_path.read_text().splitlines(keepends=True)
        kept, last_step = [], 0
        for line, record, at in metrics_records(lines):
            last_step = max(last_step, at)
            if at <= step:
                kept.append(line)
                self._remember(at, {k: v for k, v in record.items() if k not in ("step", "timeline")})
        if len(kept) != len(lines):
            try:
                write_atomic(self.metrics_path, lambda f: f.write("".join(kept).encode()))
            except OSError as e:
                self._write_failed(self.metrics_path.name, e)
        return last_step

    def _remember(self, step: int, values: dict[str, Any]) -> None:
        # Merged: evaluation lines (fid, ...) and training lines (losses, ...) alternate.
        self.last = {**self.last, "step": step, **values}
        if values.get("degenerate"):  # scores of degenerate samples are never a best (dcgan/eval.py)
            return
        for name, direction in BEST.items():
            value, held = values.get(name), self.best.get(name)
            if value is None:
                continue
            if held is None or (value < held["value"] if direction == "min" else value > held["value"]):
                self.best[name] = {"value": value, "step": step}

    def _append_metrics(self, line: str) -> None:
        """Append ``line`` (and the lines a failed write left waiting) to metrics.jsonl."""
        self._unwritten += [line] if line else []
        try:
            append_text(self.metrics_path, ("\n" if self._torn else "") + "".join(self._unwritten))
        except OSError as e:
            self._torn = True
            self._write_failed(self.metrics_path.name, e)
            return
        self._unwritten.clear()
        self._torn = False

    def _write_failed(self, what: str, error: BaseException) -> None:
        """Say once per kind of file that writing it fails; count every failure."""
        if what not in self.failed_writes:
            log.warning(
                "cannot write %s in %s (%s: %s); training goes on (said once; the count goes into summary.json)",
                what, self.run_dir, type(error).__name__, error,
            )  # fmt: skip
        self.failed_writes[what] = self.failed_writes.get(what, 0) + 1

    def _in_background(self, what: str, fn, *args) -> None:
        self._collect(wait=False)
        self._pending.append((what, self._writer.submit(fn, *args)))

    def _collect(self, wait: bool) -> None:
        """Report failures of finished background writes (a full disk must not go unseen)."""
        still = []
        for what, future in self._pending:
            if not wait and not future.done():
                still.append((what, future))
            elif future.exception() is not None:
                self._write_failed(what, future.exception())
        self._pending = still


def interval_values(interval: Interval, state: TrainState, batch_size: int, dist: DistInfo) -> dict[str, float]:
    """The metrics of one log interval: the mean step statistics plus rates, learning rates and memory.
    ``batch_size``: real images per process per step (a batch per D update)."""
    seconds = time.perf_counter() - interval.started
    values = dict(zip(interval.stat_names, (interval.stats / interval.steps).tolist()))
    global_rate = interval.steps * batch_size * dist.world_size / seconds
    values.update(
        loss_d=values["loss_d_real"] + values["loss_d_fake"] + values.get("loss_d_penalty", 0.0),
        lr_g=state.opt_g.param_groups[0]["lr"],
        lr_d=state.opt_d.param_groups[0]["lr"],
        img_per_s=global_rate,
        img_per_s_per_process=global_rate / dist.world_size,
        step_time_s=seconds / interval.steps,
        data_wait=interval.data_wait / seconds,
    )
    if dist.device.type == "cuda":
        values["gpu_mem_peak_gb"] = torch.cuda.max_memory_allocated(dist.device) / 2**30
    if state.scaler_g.is_enabled():
        values.update(grad_scale_g=state.scaler_g.get_scale(), grad_scale_d=state.scaler_d.get_scale())
    return values


def append_text(path: Path, text: str) -> None:
    with open(path, "a") as f:
        f.write(text)


def plot_losses(metrics_path: Path, out: Path) -> None:
    """Draw PLOT_PANELS against step from metrics.jsonl into ``out`` (PNG)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # pyplot's global state is not thread-safe
    from matplotlib.figure import Figure

    records = []
    if metrics_path.exists():
        for line in metrics_path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue  # a line being written right now
    fig = Figure(figsize=(10, 3.6), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    for ax, (title, names) in zip(fig.subplots(1, len(PLOT_PANELS)), PLOT_PANELS):
        for name in names:
            points = [(r["step"], r[name]) for r in records if r.get(name) is not None]
            if points:
                ax.plot(*zip(*points), label=name, linewidth=1)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(loc="best", fontsize="small")
    write_atomic(out, lambda f: fig.savefig(f, format="png"))
