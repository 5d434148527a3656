"""Against a real Slurm (tests/local_slurm.sh: two fake nodes on this machine): a 2-node
job through launch.submit, a sweep as a job array, preemption and outside requeues that
resume by themselves, and slurm/train.sbatch under sbatch with a real preemption by a
higher-priority partition. Skipped (with the reason) where Slurm cannot be started."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, run_module, write_config
from dcgan.checkpoint import files as checkpoint
from launch.options import SlurmOptions
from launch.submit import submit_run

pytestmark = pytest.mark.usefixtures("slurm_cluster")
TWO_NODES = SlurmOptions(nodes=2, tasks_per_node=1, time="30")


def wait_for(predicate, what: str, timeout: float = 240, every: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def job_state(job_id: str) -> str:
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "State", "-j", job_id], capture_output=True, text=True)
    return out.stdout.strip().split("\n")[0].split(" ")[0]


FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "PREEMPTED", "NODE_FAIL", "OUT_OF_MEMORY", "DEADLINE"}


def wait_until_ended(job_id: str) -> str:
    """The job's final state. sacct lags behind the result files, under load by seconds,
    and until slurmdbd has the start record it may still say PENDING."""
    return wait_for(lambda: job_state(job_id) in FINAL_STATES and job_state(job_id), f"job {job_id} to end", timeout=60)


def read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def logged_steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in read(run_dir / "metrics.jsonl").splitlines()]


def final_step(run_dir: Path) -> int:
    newest, _ = checkpoint.latest_valid(run_dir / "checkpoints")
    return checkpoint.step_of(newest) if newest else 0


@pytest.fixture
def long_config(tmp_path, digit_shards):
    """2 ranks x 16 images, 300 steps (about 13 s on this CPU), checkpoints every 50."""
    return write_config(
        tmp_path / "long.yaml", digit_shards,
        train={"steps": 300, "batch_size": 16}, checkpoint={"every": 50, "keep": 2},
        log={"every": 10, "samples_every": 1000},
    )  # fmt: skip


def test_submit_runs_a_two_node_job(tmp_path, digit_shards):
    config = write_config(tmp_path / "two.yaml", digit_shards, train={"steps": 20})
    run_dir = tmp_path / "runs" / "two"
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "launch.submit", "--config", str(config), "--nodes", "2", "--tasks-per-node", "1",
            "--time", "30", "--wait",
        ],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    wait_for(lambda: "INFO step " in read(run_dir / "train.log") or proc.poll() is not None, "the first step")
    first_step = time.monotonic() - t0
    out = proc.communicate(timeout=240)[0]
    print(f"submit -> first training step logged: {first_step:.1f}s; submit -> done {time.monotonic() - t0:.1f}s")
    assert proc.returncode == 0, out
    job_id = re.search(r"submitted job (\d+)", out).group(1)
    assert f"run folder : {run_dir}" in out and f"{run_dir}/slurm/{job_id}_0_log.out" in out
    assert final_step(run_dir) == 20 and "'step': 20" in out
    train_log = read(run_dir / "train.log")
    assert "2 process(es)" in train_log
    # one task per node: each rank ran on its own (fake) node
    nodes = subprocess.check_output(["sacct", "-n", "-X", "-P", "-o", "NodeList", "-j", job_id], text=True)
    assert nodes.strip() == "n[1-2]"
    assert wait_until_ended(job_id) == "COMPLETED"


def test_preempted_job_requeues_and_resumes_to_the_last_step(long_config):
    job, cfg = submit_run(str(long_config), ["train.name=preempted"], TWO_NODES)
    train_log = cfg.run_dir / "train.log"
    wait_for(lambda: max(logged_steps(cfg.run_dir), default=0) >= 60, "step 60")
    t_signal = time.monotonic()
    job._interrupt()  # what Slurm does on preemption: SIGTERM, then submitit's USR2
    wait_for(lambda: "resumed from" in read(train_log), "the requeued job to resume")
    print(f"requeue round trip (signal -> resumed): {time.monotonic() - t_signal:.1f}s")
    results = job.results()  # waits for the requeued job
    assert results[0]["step"] == 300 and final_step(cfg.run_dir) == 300

    text = read(train_log)
    stopped = int(re.search(r"stopped on request after step (\d+)/300", text).group(1))
    assert f"requeued job {job.job_id} (requeue 1 of at most 20)" in text
    assert re.search(rf"resumed from \S+step_{stopped:08d}\.pt at step {stopped} .*restart 1 of this job", text)
    steps = logged_steps(cfg.run_dir)
    assert steps == sorted(set(steps)) and steps[-1] == 300  # each step logged once, none replayed
    assert wait_until_ended(job.job_id) == "COMPLETED"


def test_requeues_are_bounded(long_config):
    opts = SlurmOptions(nodes=1, tasks_per_node=1, time="30", max_requeues=0)
    job, cfg = submit_run(str(long_config), ["train.name=bounded"], opts)
    wait_for(lambda: max(logged_steps(cfg.run_dir), default=0) >= 20, "step 20")
    job._interrupt()
    with pytest.raises(Exception) as ended:
        job.result()
    not_requeued = r"not requeued: it already was 0 time\(s\), the limit \(--max-requeues 0\)"
    assert re.search(not_requeued, str(ended.value)), (job.stderr() or "")[-3000:]
    stopped = int(re.search(r"stopped on request after step (\d+)/300", read(cfg.run_dir / "train.log")).group(1))
    assert final_step(cfg.run_dir) == stopped  # the state is saved: submitting again carries on
    assert wait_until_ended(job.job_id) == "FAILED"


def test_outside_requeue_resumes_from_the_last_checkpoint(long_config):
    job, cfg = submit_run(str(long_config), ["train.name=requeued"], TWO_NODES)
    ckpt_dir = cfg.run_dir / "checkpoints"
    wait_for(lambda: checkpoint.record_path(checkpoint.checkpoint_path(ckpt_dir, 100)).exists(), "checkpoint 100")
    subprocess.run(["scontrol", "requeue", job.job_id], check=True)  # an admin, or a node failure
    wait_for(lambda: "resumed from" in read(cfg.run_dir / "train.log"), "the requeued job to resume")
    assert job.results()[0]["step"] == 300

    resumed = int(re.search(r"resumed from \S+ at step (\d+)", read(cfg.run_dir / "train.log")).group(1))
    # Slurm's SIGTERM reaches the trainer as a stop signal, so it usually saves one more
    # checkpoint on the way out; at worst it resumes from the periodic one.
    assert resumed >= 100
    assert final_step(cfg.run_dir) == 300


def test_sweep_runs_a_job_array_and_skips_finished_runs(tmp_path, digit_shards):
    base = write_config(tmp_path / "base.yaml", digit_shards, train={"steps": 12})
    sweep = tmp_path / "lr.yaml"
    sweep.write_text(
        f"base: {base}\nname: lr\ngrid:\n  optim.g.lr: [1.0e-4, 3.0e-4]\n"
        "slurm: {nodes: 1, tasks_per_node: 1, time: '30', array_parallelism: 2}\n"
    )
    out = run_module("launch.sweep", str(sweep), timeout=120)
    assert out.returncode == 0, out.stderr
    array_id = re.search(r"as job array (\d+)", out.stdout).group(1)
    summary = json.loads((tmp_path / "runs" / "lr" / "sweep.json").read_text())
    runs = summary["runs"]
    assert [r["job_ids"] for r in runs] == [[f"{array_id}_0"], [f"{array_id}_1"]]
    wait_for(lambda: all(job_state(f"{array_id}_{i}") == "COMPLETED" for i in range(2)), "both array tasks")
    for run in runs:
        run_dir = Path(run["run_dir"])
        assert final_step(run_dir) == 12
        assert re.search(r"group: lr", read(run_dir / "config.yaml"))
    lrs = [next(o for o in r["overrides"] if o.startswith("optim.g.lr=")) for r in runs]
    assert lrs == ["optim.g.lr=0.0001", "optim.g.lr=0.0003"]

    again = run_module("launch.sweep", str(sweep), timeout=120)
    assert again.returncode == 0 and "every run has finished; nothing submitted" in again.stdout
    assert again.stdout.count("finished, skipped") == 2

    # status: the run folders and sacct agree (job ids from sweep.json)
    status = run_module("launch.sweep", "status", str(sweep), "--csv", str(tmp_path / "status.csv"), timeout=120)
    assert status.returncode == 0, status.stderr
    assert "2 done" in status.stdout.splitlines()[0]
    assert all(f"{array_id}_{i} COMPLETED" in status.stdout for i in range(2)), status.stdout
    assert (tmp_path / "status.csv").exists() and not (tmp_path / "runs" / "lr" / "status.csv").exists()


def test_sweep_with_a_bad_key_submits_nothing(tmp_path, digit_shards):
    base = write_config(tmp_path / "base.yaml", digit_shards)
    sweep = tmp_path / "bad.yaml"
    sweep.write_text(f"base: {base}\ngrid:\n  optim.g.lr: [1.0e-4]\n  optim.g.learning_rate: [1, 2]\n")
    before = subprocess.check_output(["squeue", "-h", "-o", "%i"], text=True)
    out = run_module("launch.sweep", str(sweep), timeout=120)
    assert out.returncode == 2
    assert f"{sweep}: run 0" in out.stderr and "optim.g.learning_rate: unknown key" in out.stderr
    assert not (tmp_path / "runs").exists()
    assert subprocess.check_output(["squeue", "-h", "-o", "%i"], text=True) == before


@pytest.mark.parametrize("launcher", ["launch.submit", "launch.sweep"])
def test_a_job_sbatch_refuses_is_one_line_and_leaves_no_files(tmp_path, digit_shards, launcher):
    """A real refusal by the controller (an unknown partition): sbatch's error as one line,
    exit 1, no traceback, and none of the attempt's files or folders left."""
    config = write_config(tmp_path / "c.yaml", digit_shards)
    if launcher == "launch.submit":
        argv = ["--config", str(config)]
    else:
        (tmp_path / "lr.yaml").write_text(f"base: {config}\ngrid:\n  optim.g.lr: [1.0e-4, 2.0e-4]\n")
        argv = [str(tmp_path / "lr.yaml")]
    before = subprocess.check_output(["squeue", "-h", "-o", "%i"], text=True)
    out = run_module(launcher, *argv, "--tasks-per-node", "1", "--time", "30", "--partition", "nosuch", timeout=120)
    what = "the job" if launcher == "launch.submit" else "the job array"
    assert (out.returncode, out.stderr) == (
        1,
        f"{launcher}: sbatch refused {what}: invalid partition specified: nosuch\n",
    )
    assert not (tmp_path / "runs").exists()
    assert subprocess.check_output(["squeue", "-h", "-o", "%i"], text=True) == before


def test_sbatch_script_is_preempted_by_a_higher_partition_and_resumes(long_config, tmp_path):
    """slurm/train.sbatch as a user runs it (srun + torchrun, c10d on the first node), then
    a job in partition "high" takes both nodes: Slurm signals, the run checkpoints and
    requeues, and once the nodes are free it resumes and finishes."""
    with_venv = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}  # its torchrun
    submit = subprocess.run(
        [
            "sbatch", "--parsable", "--gpus-per-node=0", "--cpus-per-task=1", "--job-name=sb",
            "--export=ALL,DCGAN_NPROC_PER_NODE=1",
            str(REPO / "slurm" / "train.sbatch"), str(long_config), "train.name=sbatch",
        ],
        cwd=tmp_path, capture_output=True, text=True, env=with_venv,
    )  # fmt: skip
    assert submit.returncode == 0, submit.stderr
    job_id = submit.stdout.strip()
    run_dir = tmp_path / "runs" / "sbatch"
    wait_for(lambda: max(logged_steps(run_dir), default=0) >= 60, "step 60")
    high = subprocess.run(
        ["sbatch", "--parsable", "-p", "high", "--nodes=2", "--ntasks-per-node=1", "--exclusive", "--wrap", "sleep 1"],
        cwd=tmp_path, capture_output=True, text=True, check=True,
    )  # fmt: skip
    wait_for(lambda: job_state(high.stdout.strip()) == "COMPLETED", "the high-priority job", timeout=120)
    wait_for(lambda: job_state(job_id) in ("COMPLETED", "FAILED", "CANCELLED"), "the sbatch job", timeout=240)
    out = read(tmp_path / f"sb-{job_id}.out")
    assert job_state(job_id) == "COMPLETED", out[-4000:]
    assert "dcgan.train exit code 75" in out and "dcgan.train exit code 0" in out
    assert re.search(r"rendezvous n1:\d+, requeue 1 of at most 20", out)
    assert final_step(run_dir) == 300
    text = read(run_dir / "train.log")
    stopped = int(re.search(r"stopped on request after step (\d+)/300", text).group(1))
    assert f"resumed from {run_dir}/checkpoints/step_{stopped:08d}.pt" in text
    assert not list(tmp_path.glob(".dcgan-exit-*"))
