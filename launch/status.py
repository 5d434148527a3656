"""python -m launch.sweep status SWEEP.yaml: where every run of a sweep stands, best FID first.

The runs are the sweep file's, named as submission names them (``launch.sweep_file.placed_runs``),
so every run shows, also one never submitted. Each run's state comes from, in order:

* its ``run.lock`` held by a trainer on this host (``/proc/locks``: looked up, never
  taken, so a trainer starting at that moment is never refused) -> running;
* Slurm, when ``squeue`` / ``sacct`` are on PATH and ``sweep.json`` holds the run's job
  id (a few seconds at most; never required) -> running or pending;
* its folder: none -> pending when ``sweep.json`` records a job for the run (submitted,
  not started yet), else not submitted; ``summary.json`` of the last attempt -> done, preempted
  (status "stopped", exit 75: the state is saved and a requeue resumes it) or failed
  (failed, diverged); an attempt that started after the last summary and holds no lock
  here -> running on the host its ``run.lock`` names, or failed when that is this host
  (killed before it could write a summary: out of memory, SIGKILL, a lost node; or ended
  in start-up), with train.log's last error or warning.

Step, losses (``loss_d``, ``loss_g``) and img/s come from the last training row of
``metrics.jsonl``, the FID curve from its rows with ``fid`` (``summary.json``'s ``best``
when there are none). Prints one table, sorted by best FID (runs without one last), and
writes nothing unless asked: ``--csv PATH`` the same table as CSV, ``--plot PATH`` FID
against step, one line per run (PNG; not written while no run has an FID). Works
offline: no W&B, no Slurm needed.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dcgan.base.checks import ConfigError
from dcgan.base.exits import EXIT_CONFIG, EXIT_OK, EXIT_PREEMPTED
from dcgan.base.fileio import write_atomic
from dcgan.config.loading import load_config
from dcgan.run.folder import RunFolder, metrics_records
from dcgan.run.lock import held_on_this_host
from launch.sweep_file import check_owner, job_ids, placed_runs, read_sweep_file, run_error, sweep_name

STATES = ("running", "pending", "not submitted", "preempted", "failed", "done")
SLURM_RUNNING = {"RUNNING", "COMPLETING", "CONFIGURING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT"}
SLURM_PENDING = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING", "RESV_DEL_HOLD"}
SLURM_ENDED_BADLY = {"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
SLURM_TIMEOUT_S = 5.0
PLACEMENT = ("train.name=", "train.out_dir=", "wandb.group=")  # overrides every run has; not shown
CSV_COLUMNS = (
    "rank", "run", "state", "detail", "step", "steps", "best_fid", "best_fid_step", "loss_d", "loss_g",
    "img_per_s", "job_id", "slurm_state", "overrides", "run_dir",
)  # fmt: skip


@dataclass
class RunStatus:
    index: int
    name: str
    overrides: list[str]  # the run's own (set + grid point + random draw)
    run_dir: Path
    steps: int  # train.steps
    state: str = "pending"
    detail: str = ""  # why the state (failed: the error), one line
    step: int | None = None
    best_fid: float | None = None
    best_fid_step: int | None = None
    loss_d: float | None = None
    loss_g: float | None = None
    img_per_s: float | None = None
    job_id: str = ""
    slurm_state: str = ""
    fid_curve: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class SweepStatus:
    name: str
    base: str
    folder: Path
    runs: list[RunStatus]  # sorted: best FID first, runs without one last (in sweep order)

    @property
    def shared(self) -> list[str]:
        """Overrides every run has (the sweep's ``set:``, and any value all runs share)."""
        if not self.runs:
            return []
        first = self.runs[0].overrides
        return [o for o in first if all(o in r.overrides for r in self.runs[1:])] if len(self.runs) > 1 else []


# --------------------------------------------------------------------------- reading one run


def read_metrics(path: Path) -> tuple[dict[str, Any] | None, list[tuple[int, float]], int | None]:
    """(the last row with training losses, [(step, fid)], the last step) from metrics.jsonl;
    unreadable lines (one cut by a kill) are skipped."""
    last_train, fids, last_step = None, [], None
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return None, [], None
    for _, row, step in metrics_records(lines):
        last_step = step if last_step is None else max(last_step, step)
        if "loss_d" in row:
            last_train = row
        if _number(row.get("fid")) is not None:
            fids.append((step, float(row["fid"])))
    return last_train, fids, last_step


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def decide_state(
    exists: bool,
    locked: bool | None,
    slurm: str,
    summary: dict[str, Any] | None,
    attempt_after_summary: bool,
    holder_host: str | None,
    finished_by_checkpoint: bool,
    submitted: bool = False,
) -> tuple[str, str]:
    """(state, detail) from what was observed of one run (see the module doc for the order).
    ``submitted``: sweep.json records a job for the run."""
    if locked:
        return "running", f"run.lock held on {socket.gethostname()}"
    if slurm in SLURM_RUNNING:
        return "running", f"Slurm {slurm}"
    if slurm in SLURM_PENDING:
        return "pending", f"Slurm {slurm}"
    if not exists:
        if slurm in SLURM_ENDED_BADLY:
            return "failed", f"Slurm {slurm} before the run folder was made"
        if not submitted:
            return "not submitted", "no job for it in sweep.json"
        return "pending", "submitted, no run folder yet" + (f" (Slurm {slurm})" if slurm else "")
    if summary is not None and not attempt_after_summary:
        status, code = summary.get("status"), summary.get("exit_code")
        if status == "done":
            return "done", ""
        if status == "stopped" and code == EXIT_PREEMPTED:
            return "preempted", "stopped on a signal, state saved: a requeue resumes it"
        why = _one_line(str(summary.get("diverged") or summary.get("error") or f"exit code {code}"))
        return "failed", why if status == "failed" else f"{status}: {why}"
    if finished_by_checkpoint:
        return "done", "a checkpoint at train.steps (no summary.json)"
    if attempt_after_summary or summary is None:
        if holder_host and holder_host != socket.gethostname() and locked is not True:
            return "running", f"started on {holder_host} (run.lock), not checkable from here"
        if holder_host or summary is not None:
            return "failed", "ended without writing summary.json (killed, or stopped in start-up)"
    return "pending", "run folder made, trainer not started"


def _one_line(text: str, limit: int = 160) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def read_run(index: int, name: str, own: list[str], run_dir: Path, steps: int, slurm: tuple[str, str]) -> RunStatus:
    run = RunStatus(index, name, own, run_dir, steps, job_id=slurm[0], slurm_state=slurm[1])
    folder = RunFolder(run_dir)
    exists = run_dir.is_dir()
    summary = folder.read_summary() if exists else None
    last, fids, last_step = read_metrics(folder.metrics) if exists else (None, [], None)
    holder = folder.lock_holder() if exists else None
    attempt_after_summary = summary is not None and folder.attempt_after_summary()
    newest = folder.newest_recorded_step() if exists else None
    run.state, run.detail = decide_state(
        exists,
        held_on_this_host(run_dir) if exists else False,
        slurm[1],
        summary,
        attempt_after_summary,
        str(holder["host"]) if holder and holder.get("host") else None,
        newest is not None and newest >= steps,
        submitted=bool(slurm[0]),
    )
    if run.detail.startswith("ended without writing summary.json") and (line := last_log_line(run_dir)):
        run.detail += f"; {folder.train_log.name}: {line}"
    steps_seen = [s for s in (last_step, newest, (summary or {}).get("step")) if isinstance(s, int)]
    run.step = max(steps_seen) if steps_seen else None
    if last is not None:
        run.loss_d, run.loss_g = _number(last.get("loss_d")), _number(last.get("loss_g"))
        run.img_per_s = _number(last.get("img_per_s"))
    run.fid_curve = fids
    if fids:
        run.best_fid_step, run.best_fid = min(fids, key=lambda sf: sf[1])
    elif summary and isinstance(summary.get("best"), dict) and isinstance(summary["best"].get("fid"), dict):
        best = summary["best"]["fid"]
        run.best_fid, run.best_fid_step = _number(best.get("value")), best.get("step")
    return run


def last_log_line(run_dir: Path, tail_bytes: int = 16384) -> str:
    """The last error or warning in train.log (its last 16 kB), for a run that left no summary."""
    found = RunFolder(run_dir).last_log_problem(tail_bytes)
    return _one_line(found) if found else ""


# --------------------------------------------------------------------------- Slurm


def slurm_states(job_ids: list[str], timeout: float = SLURM_TIMEOUT_S) -> dict[str, str]:
    """Job id -> Slurm state for the ids Slurm knows: squeue for live jobs (array tasks one
    per line), sacct for the rest. {} when neither is on PATH or answers in ``timeout``."""
    ids = sorted({j for j in job_ids if j})
    states: dict[str, str] = {}
    if not ids:
        return states
    if shutil.which("squeue"):
        for line in _run(["squeue", "-h", "-r", "-o", "%i|%T", "-j", ",".join(ids)], timeout):
            job, _, state = line.partition("|")
            if job.strip() in ids and state.strip():
                states[job.strip()] = state.strip()
    missing = [j for j in ids if j not in states]
    if missing and shutil.which("sacct"):
        for line in _run(["sacct", "-n", "-P", "-X", "-o", "JobID,State", "-j", ",".join(missing)], timeout):
            job, _, state = line.partition("|")
            if job.strip() in missing and state.strip():
                states.setdefault(job.strip(), state.split()[0])  # "CANCELLED by 0" -> CANCELLED
    return states


def _run(cmd: list[str], timeout: float) -> list[str]:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return []
    return out.stdout.splitlines()  # an unknown id makes squeue exit 1 but still list the others


# --------------------------------------------------------------------------- the whole sweep


def sweep_status(path: Path, use_slurm: bool = True) -> SweepStatus:
    """Every run of the sweep file at ``path``, read from its folder (and Slurm); raises
    ConfigError naming the file (and run) when the sweep file or a run's config is bad."""
    spec = read_sweep_file(path)
    base = str(spec["base"])
    planned = []
    for index, own, placed in placed_runs(path, spec):
        try:
            cfg = load_config(base, placed)
        except ConfigError as e:
            raise run_error(path, index, own, e) from None
        planned.append((index, own, cfg))
    folder = planned[0][2].run_dir.parent
    check_owner(path, folder, [cfg.train.name for _, _, cfg in planned])
    jobs = job_ids(folder)
    live = slurm_states(list(jobs.values())) if use_slurm else {}
    runs = []
    for index, own, cfg in planned:
        job = jobs.get(cfg.train.name, "")
        runs.append(read_run(index, cfg.train.name, own, cfg.run_dir, cfg.train.steps, (job, live.get(job, ""))))
    runs.sort(key=lambda r: (r.best_fid is None, r.best_fid if r.best_fid is not None else 0.0, r.index))
    return SweepStatus(sweep_name(path, spec), base, folder, runs)


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(status: SweepStatus) -> str:
    """The printed table: one line per run, best FID first."""
    shared = status.shared
    counts = {s: sum(r.state == s for r in status.runs) for s in STATES}
    lines = [
        f"sweep {status.name}: {len(status.runs)} run(s) from {status.base}, folder {status.folder}; "
        + ", ".join(f"{n} {s}" for s, n in counts.items() if n),
    ]
    if shared:
        lines.append(f"every run: {' '.join(shared)}")
    rows = [("run", "state", "step", "best FID (step)", "loss_d", "loss_g", "img/s", "job", "overrides")]
    for r in status.runs:
        step = f"{r.step if r.step is not None else '-'}/{r.steps}"
        fid = "-" if r.best_fid is None else f"{r.best_fid:.4g} ({r.best_fid_step})"
        job = r.job_id + (f" {r.slurm_state}" if r.slurm_state else "") if r.job_id else "-"
        own = " ".join(o for o in r.overrides if o not in shared) or "(base config)"
        rows.append((r.name, r.state, step, fid, _fmt(r.loss_d), _fmt(r.loss_g), _fmt(r.img_per_s, 0), job, own))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        lines.append("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1])
    for r in status.runs:
        if r.state in ("failed", "preempted") or (r.state == "running" and "not checkable" in r.detail):
            lines.append(f"  {r.name}: {r.state}: {r.detail} ({RunFolder(r.run_dir).train_log})")
    return "\n".join(lines)


def write_csv(status: SweepStatus, path: Path) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for rank, r in enumerate(status.runs, 1):
        writer.writerow([
            rank, r.name, r.state, r.detail, "" if r.step is None else r.step, r.steps,
            "" if r.best_fid is None else r.best_fid, "" if r.best_fid_step is None else r.best_fid_step,
            *("" if v is None else v for v in (r.loss_d, r.loss_g, r.img_per_s)),
            r.job_id, r.slurm_state, " ".join(r.overrides), str(r.run_dir),
        ])  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda f: f.write(buffer.getvalue().encode()))


def plot_fid(status: SweepStatus, path: Path) -> None:
    """FID against step, one line per run that has evaluated (Agg: no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # no pyplot: no global state, no display
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(8, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    shared = status.shared
    drawn = 0
    for r in status.runs:
        if r.fid_curve:
            steps, fids = zip(*r.fid_curve)
            own = " ".join(o for o in r.overrides if o not in shared)
            ax.plot(steps, fids, marker="o", markersize=3, label=f"{r.name} {own}".strip())
            drawn += 1
    ax.set(xlabel="step", ylabel="FID", title=f"sweep {status.name}: FID (lower is better)")
    if drawn:
        ax.legend(loc="best", fontsize="small")
    else:
        ax.text(0.5, 0.5, "no FID yet (eval.every is 0, or no evaluation has run)", ha="center", transform=ax.transAxes)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda f: fig.savefig(f, format="png"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m launch.sweep status",
        description=__doc__.split("\n\n")[0].split(": ", 1)[1].replace("where", "Where", 1)
        + " Prints a table; writes nothing unless --csv or --plot asks.",
    )
    parser.add_argument("sweep", type=Path, help="the sweep file, as submitted (same working directory)")
    parser.add_argument("--no-slurm", action="store_true", help="do not ask squeue / sacct")
    parser.add_argument("--csv", type=Path, metavar="PATH", help="also write the table as CSV to PATH")
    parser.add_argument(
        "--plot",
        type=Path,
        metavar="PATH",
        help="also draw FID against step, one line per run, into PATH (PNG); not written while no run has an FID",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        status = sweep_status(args.sweep, use_slurm=not args.no_slurm)
    except ConfigError as e:
        print(f"launch.sweep: {e}", file=sys.stderr)
        return EXIT_CONFIG
    wrote = []
    # Before printing: a reader that stops early (`| head`) still gets them.
    if args.csv:
        write_csv(status, args.csv)
        wrote.append(str(args.csv))
    if args.plot and any(r.fid_curve for r in status.runs):
        plot_fid(status, args.plot)
        wrote.append(str(args.plot))
    print(table(status))
    if args.plot and str(args.plot) not in wrote:
        print(
            f"launch.sweep: no run has an FID yet (eval.every 0, or no evaluation has run): {args.plot} not written",
            file=sys.stderr,
        )
    if wrote:
        print(f"wrote {' and '.join(wrote)}")
    return EXIT_OK
