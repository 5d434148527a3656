"""python -m launch.sweep status: a real sweep's run folders (two tiny runs that evaluate,
one that fails, one never started), read without Slurm and without W&B."""

from __future__ import annotations

import csv
import os
import time

import pytest
import torch
from PIL import Image

from conftest import REPO, load_real_images, start_python, write_config
from dcgan.base.exits import EXIT_PREEMPTED
from dcgan.quality.features import Classifier, HeldOut, save_classifier
from dcgan.run.lock import RunLock
from launch.status import decide_state, sweep_status
from launch.sweep import cli, load_sweep, placed_runs, read_sweep_file, write_summary


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, digit_shards):
    """A 4-run sweep (optim.g.lr grid, train.steps 4, FID every 2 steps): runs 0 and 1
    trained to the end, run 2 failed at step 3 (tests/faults.py), run 3 never started.
    The three trainings run at once, each as submission would start it."""
    tmp = tmp_path_factory.mktemp("sweep-status")
    # An untrained classifier's features, recorded as passing: 512 images train none that
    # beats chance clearly (dcgan.eval train-features refuses it), and the table needs FIDs.
    features = tmp / "features.pt"
    net = Classifier(1, 28, 10).eval()
    with torch.no_grad():
        real = net.features(torch.from_numpy(load_real_images(256)[0])[:, None])
    save_classifier(features, net, real, held_out=HeldOut(0.9, 0.1, 500), shards=str(digit_shards), classes=10)
    base = write_config(
        tmp / "base.yaml", digit_shards, train={"steps": 4}, checkpoint={"every": 2, "keep": 2},
        model={"ema_decay": 0.0},  # samples of G itself: an EMA 4 steps old is one grey image (degenerate)
        log={"every": 2, "samples_every": 100}, wandb={"mode": "disabled"},
        eval={"every": 2, "features": str(features), "num_samples": 128, "num_real": 256, "batch_size": 64},
    )  # fmt: skip
    path = tmp / "lr.yaml"
    path.write_text(f"base: {base}\nset: {{train.seed: 0}}\ngrid:\n  optim.g.lr: [1.0e-4, 2.0e-4, 4.0e-4, 8.0e-4]\n")
    runs = placed_runs(path, read_sweep_file(path))
    procs = []
    for index, _, placed in runs[:3]:
        script = ("tests/faults.py",) if index == 2 else ("-m", "dcgan.train")
        env = {"DCGAN_FAULT": "step:0:3", "PYTHONPATH": str(REPO)} if index == 2 else None
        procs.append(start_python(*script, "--config", str(base), *placed, log=tmp / f"run{index}.log", env=env))
    codes = [proc.wait(timeout=300) for proc in procs]
    assert codes == [0, 0, 1], [(tmp / f"run{i}.log").read_text()[-2000:] for i in range(3)]
    return path, [placed[-3].removeprefix("train.name=") for _, _, placed in runs]


@pytest.mark.e2e  # starts processes
def test_status_table_csv_and_plot(sweep, capsys, tmp_path):
    path, names = sweep
    folder = path.parent / "runs" / "lr"
    csv_path, png_path = tmp_path / "out" / "status.csv", tmp_path / "fid.png"
    t0 = time.monotonic()
    assert cli(["status", str(path), "--csv", str(csv_path), "--plot", str(png_path)]) == 0
    seconds = time.monotonic() - t0
    out = capsys.readouterr()
    lines = out.out.splitlines()
    assert lines[0].startswith(f"sweep lr: 4 run(s) from {path.parent / 'base.yaml'}, folder {folder}")
    assert "1 not submitted, 1 failed, 2 done" in lines[0]  # run 3: no job for it in sweep.json, no folder
    assert lines[1] == "every run: train.seed=0"  # shared overrides once, then only what differs

    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    by_name = {r["run"]: r for r in rows}
    assert [by_name[n]["state"] for n in names] == ["done", "done", "failed", "not submitted"]
    # sorted by best FID, runs without one last
    fids = [float(r["best_fid"]) for r in rows if r["best_fid"]]
    assert fids == sorted(fids) and len(fids) == 3 and rows[-1]["run"] == names[3]
    assert [r["rank"] for r in rows] == ["1", "2", "3", "4"]
    for name in names[:2]:
        row = by_name[name]
        assert (row["step"], row["steps"]) == ("4", "4") and row["best_fid_step"] in ("2", "4")
        assert float(row["loss_d"]) > 0 and float(row["loss_g"]) > 0 and float(row["img_per_s"]) > 0
    failed = by_name[names[2]]
    assert failed["step"] == "2" and failed["best_fid_step"] == "2"  # its last checkpoint and evaluation
    assert "injected fault in gan_step at step 3" in failed["detail"]
    assert failed["overrides"] == "train.seed=0 optim.g.lr=0.0004"
    never = by_name[names[3]]
    assert (never["step"], never["best_fid"], never["loss_d"]) == ("", "", "")
    assert never["detail"] == "no job for it in sweep.json"

    # the printed table: same order and states as the CSV, one line per run, then the failure's reason
    table = [line.split("  ") for line in lines[3:7]]
    table = [[cell.strip() for cell in cols if cell.strip()] for cols in table]
    assert [cols[:2] for cols in table] == [[r["run"], r["state"]] for r in rows]
    assert table[-1][:3] == [names[3], "not submitted", "-/4"] and table[-1][-1] == "optim.g.lr=0.0008"
    assert f"{names[2]}: failed: RuntimeError: injected fault in gan_step at step 3" in out.out
    assert out.out.rstrip().endswith(f"wrote {csv_path} and {png_path}")
    assert not list(folder.glob("*.csv")) and not list(folder.glob("*.png"))  # only where asked

    with Image.open(png_path) as png:
        assert png.format == "PNG" and png.size[0] > 100
        png.verify()
    assert seconds < 10


@pytest.mark.e2e  # starts processes
def test_a_held_run_lock_means_running(sweep):
    path, names = sweep
    run_dir = path.parent / "runs" / "lr" / names[2]
    lock = RunLock(run_dir)
    lock.acquire()  # what a trainer on this host holds for the run's life
    try:
        states = {r.name: (r.state, r.detail) for r in sweep_status(path, use_slurm=False).runs}
        assert states[names[2]][0] == "running" and "run.lock held" in states[names[2]][1]
    finally:
        lock.release()
    # the lock was only looked up, never taken: a trainer can take it at once
    again = RunLock(run_dir)
    again.acquire()
    again.release()
    # a newer attempt that left no summary (killed) and holds no lock here: failed
    os.utime(run_dir / "run.lock", (time.time() + 5, time.time() + 5))
    states = {r.name: (r.state, r.detail) for r in sweep_status(path, use_slurm=False).runs}
    assert states[names[2]][0] == "failed" and "without writing summary.json" in states[names[2]][1]
    assert "train.log: rank 0 failed (step 3): RuntimeError: injected fault" in states[names[2]][1]  # its last error


@pytest.mark.parametrize(
    "observed, state",
    [
        (dict(summary={"status": "stopped", "exit_code": EXIT_PREEMPTED}), "preempted"),
        (dict(summary={"status": "diverged", "exit_code": 1, "diverged": "loss_d is nan"}), "failed"),
        (dict(summary={"status": "done", "exit_code": 0}), "done"),
        (dict(summary={"status": "stopped", "exit_code": EXIT_PREEMPTED}, slurm="PENDING"), "pending"),  # requeued
        (dict(summary={"status": "done", "exit_code": 0}, locked=True), "running"),  # resubmitted, running again
        (dict(exists=False, slurm="RUNNING"), "running"),  # Slurm started it; no folder yet
        (dict(exists=False, slurm="CANCELLED"), "failed"),
        (dict(exists=False), "not submitted"),  # no job for it in sweep.json
        (dict(exists=False, submitted=True), "pending"),  # submitted, Slurm not asked (or gone)
        (dict(summary=None, holder_host="some-other-node"), "running"),  # not checkable from this host
        (dict(summary=None, finished_by_checkpoint=True), "done"),  # summary.json could not be written
        (dict(summary=None), "pending"),  # a folder, but no trainer has taken its lock yet
    ],
)
def test_state_rules(observed, state):
    seen = dict(exists=True, locked=False, slurm="", summary=None, attempt_after_summary=False, holder_host=None)
    seen.update(finished_by_checkpoint=False)
    seen.update(observed)
    assert decide_state(**seen)[0] == state


def test_a_bad_sweep_file_exits_2_with_one_line(tmp_path, digit_shards, capsys):
    base = write_config(tmp_path / "base.yaml", digit_shards)
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"base: {base}\ngrid:\n  optim.g.learning_rate: [1, 2]\n")
    assert cli(["status", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith(f"launch.sweep: {bad}: run 0")
    assert "optim.g.learning_rate: unknown key" in err
    assert cli(["status", str(tmp_path / "missing.yaml")]) == 2
    assert "cannot read sweep file" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


@pytest.mark.e2e  # starts processes
def test_a_status_query_writes_nothing_and_tells_submitted_from_not(tmp_path, digit_shards, capsys):
    """`launch.sweep status` is a query: no status.csv or fid.png unless --csv / --plot
    asks, and no empty plot when no run has an FID. A run with a job in sweep.json but no
    folder yet is pending; one never submitted says so, in the table as in the CSV."""
    base = write_config(tmp_path / "base.yaml", digit_shards, train={"out_dir": str(tmp_path / "runs")})
    path = tmp_path / "lr.yaml"
    path.write_text(f"base: {base}\ngrid:\n  optim.g.lr: [1.0e-4, 2.0e-4]\n")
    sweep = load_sweep(path)
    sweep.runs[0].job_id = "4242_0"  # submitted; the array task has not started yet
    write_summary(sweep)
    folder = sweep.folder
    before = sorted(p.name for p in folder.rglob("*"))

    assert cli(["status", str(path), "--no-slurm"]) == 0
    out = capsys.readouterr()
    assert sorted(p.name for p in folder.rglob("*")) == before and "wrote" not in out.out
    rows = [[cell.strip() for cell in line.split("  ") if cell.strip()] for line in out.out.splitlines()]
    states = {cells[0]: cells[1] for cells in rows if cells and cells[0].startswith("r00")}
    assert states == {sweep.runs[0].name: "pending", sweep.runs[1].name: "not submitted"}
    assert "1 pending, 1 not submitted" in out.out.splitlines()[0]

    csv_path, png_path = tmp_path / "s.csv", tmp_path / "fid.png"
    assert cli(["status", str(path), "--no-slurm", "--csv", str(csv_path), "--plot", str(png_path)]) == 0
    out = capsys.readouterr()
    with open(csv_path) as f:
        rows = {r["run"]: (r["state"], r["detail"], r["job_id"]) for r in csv.DictReader(f)}
    assert rows == {
        sweep.runs[0].name: ("pending", "submitted, no run folder yet", "4242_0"),
        sweep.runs[1].name: ("not submitted", "no job for it in sweep.json", ""),
    }
    assert not png_path.exists() and f"{png_path} not written" in out.err  # nothing to plot yet
    assert out.out.rstrip().endswith(f"wrote {csv_path}")
    assert sorted(p.name for p in folder.rglob("*")) == before


def test_help_shows_the_status_command(capsys):
    with pytest.raises(SystemExit) as done:
        cli(["--help"])
    assert done.value.code == 0
    usage = capsys.readouterr().out.split("\n\n")[0]
    assert "python -m launch.sweep [-h] [--dry-run]" in usage
    assert "python -m launch.sweep status [-h] [--no-slurm] [--csv PATH]" in usage and "[--plot PATH]" in usage
