"""What is never lost (README, "What is never lost"): divergence, two trainers on one run
folder, branching, settings changed on resume, Ctrl-C and signals during start-up, clear
one-line errors, a full disk under the run folder's files, and settings kept as written.
Real trainer processes throughout; faults come from tests/faults.py."""

import json
import os
import re
import signal
import subprocess
import time
import uuid

import pytest
import yaml
from test_failures import assert_nothing_left

from conftest import REPO, run_module, run_python, start_python, write_config
from dcgan.checkpoint import files as checkpoint

FAULTS = ("tests/faults.py", "--config")


def faulty(config, fault: str, *overrides: str, nproc: int = 0, env: dict | None = None):
    env = {"DCGAN_FAULT": fault, "PYTHONPATH": str(REPO), **(env or {})}
    return run_python(*FAULTS, str(config), *overrides, nproc=nproc, env=env, timeout=120)


def train(config, *overrides: str, nproc: int = 0):
    return run_module("dcgan.train", "--config", str(config), *overrides, nproc=nproc, timeout=120)


def start_long_run(tmp_path, shards, name: str, *script: str, env: dict | None = None, **sections):
    """(config, log, process) of a run of 100000 steps in the background (``script``: tests/faults.py)."""
    config = write_config(tmp_path / f"{name}.yaml", shards, train={"steps": 100000}, **sections)
    log = tmp_path / f"{name}.log"
    return config, log, start_python(*(script or ("-m", "dcgan.train")), "--config", str(config), log=log, env=env)


def wait_for(text: str, log, proc, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)


def steps_in(metrics) -> list[int]:
    return [json.loads(line)["step"] for line in metrics.read_text().splitlines() if line.strip() and "loss_d" in line]


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


# --------------------------------------------------------------------------- divergence


def test_weights_turning_nan_stop_the_run_before_a_checkpoint_and_keep_the_finite_ones(tmp_path, digit_shards):
    config = write_config(
        tmp_path / "nan.yaml", digit_shards, train={"steps": 30}, log={"every": 5}, checkpoint={"every": 3, "keep": 1}
    )
    result = faulty(config, "nan:9")
    ckpt_dir = tmp_path / "runs" / "nan" / "checkpoints"
    assert result.returncode == 1, result.stderr[-3000:]
    assert "checkpoint at step 9 not written: non-finite values in discriminator." in result.stderr
    assert "diverged at step 9: the state holds NaN or infinite values at the checkpoint of step 9" in result.stderr
    assert f"the resume point stays {ckpt_dir / 'step_00000006.pt'}" in result.stderr
    assert [p.name for p in checkpoint.list_checkpoints(ckpt_dir)] == ["step_00000006.pt"]  # keep=1 kept the finite one
    summary = json.loads((ckpt_dir.parent / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["exit_code"] == 1

    again = train(config, "train.steps=8")
    assert again.returncode == 0 and f"resumed from {ckpt_dir / 'step_00000006.pt'}" in again.stderr


def test_a_nan_loss_on_two_ranks_stops_both_at_the_log_step(tmp_path, digit_shards):
    config = write_config(
        tmp_path / "lr.yaml", digit_shards, train={"steps": 30}, log={"every": 4}, checkpoint={"every": 100}
    )
    result = train(config, "optim.d.lr=1e30", nproc=2)
    assert result.returncode != 0
    assert "diverged at step 4: the weights or batch-norm statistics hold NaN or infinite values after steps 1-4" in (
        result.stderr
    )
    assert not (tmp_path / "runs" / "lr" / "checkpoints").exists()
    assert json.loads((tmp_path / "runs" / "lr" / "summary.json").read_text())["status"] == "diverged"


def test_fp16_nan_at_every_step_stops_at_the_log_step(tmp_path, digit_shards):
    config = write_config(
        tmp_path / "fp16.yaml", digit_shards, train={"steps": 200, "precision": "fp16"}, log={"every": 20},
        checkpoint={"every": 14, "keep": 5},
    )  # fmt: skip
    result = faulty(config, "nan-input:15")  # the next checkpoint, at step 28, would have found the NaN 8 steps late
    ckpt_dir = tmp_path / "runs" / "fp16" / "checkpoints"
    assert result.returncode == 1, result.stderr[-3000:]
    # the running statistics turned NaN at step 15 while the scaler kept the weights: stopped at the log step
    assert "diverged at step 20: the weights or batch-norm statistics hold NaN" in result.stderr, result.stderr[-3000:]
    assert [p.name for p in checkpoint.list_checkpoints(ckpt_dir)] == ["step_00000014.pt"]


def test_unusable_checkpoints_are_set_aside_and_the_one_before_is_used(tmp_path, digit_shards):
    config = write_config(tmp_path / "aside.yaml", digit_shards, checkpoint={"every": 2, "keep": 3})
    assert train(config).returncode == 0
    ckpt_dir = tmp_path / "runs" / "aside" / "checkpoints"
    two, four, six = checkpoint.list_checkpoints(ckpt_dir)
    nan = checkpoint.load(six)  # as an older dcgan.train wrote them: a NaN state, saved all the same
    next(iter(nan["generator"].values())).fill_(float("nan"))
    checkpoint.save(nan, ckpt_dir, 6, keep=3)
    # A file with a record that matches, but holding an object weights_only=True refuses to unpickle.
    checkpoint._write_with_record({**checkpoint.load(four), "extra": subprocess.CompletedProcess([], 0)}, four, 4)

    named = train(config, f"train.resume={four}")
    assert named.returncode == 2
    line = one_line(named.stderr)
    assert (
        f"train.resume: {four}: refused by torch.load(weights_only=True)" in line and "weights_only=False" not in line
    )

    result = train(config, "train.steps=8")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"checkpoint {six} is unusable: non-finite values in generator." in result.stderr
    assert f"checkpoint {four} is unusable: refused by torch.load(weights_only=True)" in result.stderr
    assert f"resumed from {two} at step 2" in result.stderr
    assert (ckpt_dir / "step_00000006.pt.corrupt").exists() and (ckpt_dir / "step_00000004.pt.corrupt").exists()


# --------------------------------------------------------------------------- one trainer per run folder


def test_a_second_trainer_on_a_busy_run_folder_exits_2_and_a_killed_holder_frees_it(tmp_path, digit_shards):
    config, log, first = start_long_run(tmp_path, digit_shards, "busy", checkpoint={"every": 5})
    try:
        wait_for("step 6/", log, first)
        second = train(config)
        assert first.poll() is None  # the first one goes on untouched
        assert second.returncode == 2
        line = one_line(second.stderr)
        assert f"run folder {tmp_path / 'runs' / 'busy'} is in use by another trainer (pid {first.pid} on " in line
    finally:
        first.kill()  # as a crash or the OOM killer would: the kernel releases the lock
        first.wait()
    run_dir = tmp_path / "runs" / "busy"
    assert steps_in(run_dir / "metrics.jsonl") == sorted(set(steps_in(run_dir / "metrics.jsonl")))
    newest = checkpoint.step_of(checkpoint.list_checkpoints(run_dir / "checkpoints")[-1])
    third = train(config, f"train.steps={newest + 2}")  # the lock is free: it trains on
    assert third.returncode == 0 and "resumed from" in third.stderr, third.stderr[-3000:]


# --------------------------------------------------------------------------- branching, resume overrides


def test_resuming_an_older_checkpoint_starts_a_new_timeline_and_keeps_the_old_one(tmp_path, digit_shards):
    config = write_config(tmp_path / "branch.yaml", digit_shards, train={"steps": 12}, checkpoint={"every": 3})
    assert train(config).returncode == 0
    run_dir = tmp_path / "runs" / "branch"
    nine = run_dir / "checkpoints" / "step_00000009.pt"
    result = train(config, f"train.resume={nine}", "train.steps=11")
    assert result.returncode == 0, result.stderr[-3000:]
    (old,) = (run_dir / "timelines").iterdir()
    assert old.name.endswith("-after-step_00000009")
    assert "on a new timeline" in result.stderr and str(old) in result.stderr
    assert [p.name for p in checkpoint.list_checkpoints(old / "checkpoints")] == ["step_00000012.pt"]
    assert (old / "samples" / "step_00000012.png").exists() and steps_in(old / "metrics.jsonl")[-1] == 12
    assert [p.name for p in checkpoint.list_checkpoints(run_dir / "checkpoints")] == [
        "step_00000009.pt", "step_00000011.pt",
    ]  # fmt: skip
    assert steps_in(run_dir / "metrics.jsonl")[-1] == 11
    again = train(config, "train.steps=12")
    assert f"resumed from {run_dir / 'checkpoints' / 'step_00000011.pt'}" in again.stderr


def test_optimiser_settings_apply_on_resume_and_net_shapes_are_refused(tmp_path, digit_shards):
    config = write_config(tmp_path / "over.yaml", digit_shards, train={"steps": 4})
    assert train(config).returncode == 0
    run_dir = tmp_path / "runs" / "over"
    result = train(config, "train.steps=6", "optim.g.lr=0.05", "optim.d.betas=[0.0,0.99]")
    assert result.returncode == 0
    assert "optim.g.lr 0.0002 -> 0.05" in result.stderr and "optim.d.betas [0.5, 0.999] -> [0.0, 0.99]" in result.stderr
    sd = checkpoint.load(run_dir / "checkpoints" / "step_00000006.pt")
    assert sd["opt_g"]["param_groups"][0]["lr"] == 0.05 and sd["opt_d"]["param_groups"][0]["betas"] == (0.0, 0.99)

    before = {p: p.read_bytes() for p in (run_dir / "config.yaml", run_dir / "train.log")}
    refused = train(config, "train.steps=8", "model.ngf=16")
    assert refused.returncode == 2
    assert "model.ngf 8 -> 16: " in one_line(refused.stderr) and "cannot change on resume" in refused.stderr
    assert {p: p.read_bytes() for p in before} == before  # nothing written


# --------------------------------------------------------------------------- signals


def test_ctrl_c_saves_and_exits_75(tmp_path, digit_shards):
    _, log, proc = start_long_run(tmp_path, digit_shards, "ctrlc", checkpoint={"every": 1000})
    try:
        wait_for("step 4/", log, proc)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 75
    finally:
        proc.kill()
    text = log.read_text()
    assert "received SIGINT" in text and "KeyboardInterrupt" not in text
    summary = json.loads((tmp_path / "runs" / "ctrlc" / "summary.json").read_text())
    assert summary["status"] == "stopped" and summary["exit_code"] == 75
    assert (
        checkpoint.latest_valid(tmp_path / "runs" / "ctrlc" / "checkpoints")[0].name == f"step_{summary['step']:08d}.pt"
    )


def test_a_second_ctrl_c_during_the_save_exits_at_once(tmp_path, digit_shards):
    marker = uuid.uuid4().hex
    env = {"DCGAN_FAULT": "slow-checkpoint", "PYTHONPATH": str(REPO), "DCGAN_TEST_MARK": marker}
    _, log, proc = start_long_run(
        tmp_path, digit_shards, "twice", "tests/faults.py", env=env, checkpoint={"every": 1000}
    )
    try:
        wait_for("step 2/", log, proc)
        proc.send_signal(signal.SIGINT)
        wait_for("slow-checkpoint begins", log, proc)
        time.sleep(1.2)  # a second press, not the same Ctrl-C delivered twice
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=30)
        seconds = time.monotonic() - t0
    finally:
        proc.kill()
    assert code == -signal.SIGINT and seconds < 5
    assert "second Ctrl-C: exiting now" in log.read_text()
    assert_nothing_left(marker, within_s=10)  # W&B's service ends itself once it sees its parent gone


@pytest.mark.parametrize("nproc", [0, 2], ids=["alone", "torchrun-2"])
def test_a_stop_signal_during_start_up_reports_75(tmp_path, digit_shards, nproc):
    config = write_config(tmp_path / f"startup{nproc}.yaml", digit_shards)
    log, code_file = tmp_path / "startup.log", tmp_path / "exit-code"
    env = {"DCGAN_FAULT": "slow-start", "PYTHONPATH": str(REPO), "DCGAN_EXIT_CODE_FILE": str(code_file)}
    proc = start_python(*FAULTS, str(config), log=log, env=env, nproc=nproc)
    try:
        wait_for("slow-start begins", log, proc)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    finally:
        proc.kill()
    assert code_file.read_text().strip() == "75", log.read_text()[-3000:]
    assert "stopped by SIGTERM during start-up" in log.read_text()
    if not nproc:
        assert code == 75


# A rank's data workers under stop signals sent to every process of its group, from outside, as
# Slurm signals a step: each new DataLoader worker is exposed in its first milliseconds.
SIGNAL_STORM = r"""
import os, signal, subprocess, sys
import torch
from dcgan.config.sections import DataConfig
from dcgan.data.cache import CachedLoader
from dcgan.data.shardset import resolve_shards
from dcgan.data.stream import Loader, ShardStream
from dcgan.run.distributed import DistInfo
from dcgan.run.preemption import WorkerSignals

noted = []
signal.signal(signal.SIGTERM, lambda *_: noted.append(1))  # the rank notes a stop, as the trainer does
signals = WorkerSignals(("SIGTERM",))
cfg = DataConfig(shards=sys.argv[1], workers=2, shuffle_buffer=8)
shards = resolve_shards(cfg)
storm = subprocess.Popen(
    ["bash", "-c", f"while kill -TERM -- -{os.getpgid(0)}; do sleep 0.001; done"], start_new_session=True
)
try:
    stream = ShardStream(shards, cfg, rank=0, world_size=1, batch_size=64, image_size=28, channels=1, seed=0)
    loader = Loader(stream, torch.device("cpu"), worker_signals=signals)
    batches = [sum(1 for _ in loader.epoch(e)) for e in range(5)]
    one = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    cached = CachedLoader(shards, cfg, one, batch_size=64, image_size=28, channels=1, seed=0, worker_signals=signals)
finally:
    storm.kill()
print(f"batches per epoch {batches}, cached {cached.samples} images, rank noted {len(noted)} signals", flush=True)
"""


def test_stop_signals_to_every_process_never_kill_a_starting_data_worker(digit_shards):
    # Without the signals held across the fork, torch's SIGTERM handler ends a worker that
    # is hit before its init runs, and the loader fails ("worker exited unexpectedly").
    result = run_python("-c", SIGNAL_STORM, str(digit_shards), timeout=120, start_new_session=True)
    assert result.returncode == 0, result.stderr[-3000:]
    found = re.search(r"batches per epoch \[(.*)\], cached (\d+) images, rank noted (\d+) signals", result.stdout)
    assert found, result.stdout + result.stderr[-3000:]
    assert found.group(1) == "8, 8, 8, 8, 8" and found.group(2) == "512" and int(found.group(3)) > 10


# --------------------------------------------------------------------------- clear errors, full disk, text settings


def test_a_config_that_is_not_utf8_is_one_line(tmp_path):
    config = tmp_path / "latin1.yaml"
    config.write_bytes("train:\n  name: caf\u00e9\n".encode("latin-1"))
    result = train(config)
    assert result.returncode == 2
    assert one_line(result.stderr).endswith("not UTF-8 text (byte 0xe9 on line 2); save it as UTF-8")


def test_a_run_named_dot_cannot_wipe_the_other_runs(tmp_path, digit_shards):
    config = write_config(tmp_path / "kept.yaml", digit_shards)
    assert train(config).returncode == 0
    kept = {p: p.read_bytes() for p in (tmp_path / "runs").rglob("*") if p.is_file()}
    for name in (".", ".."):
        wipe = train(config, f"train.name={name}", "train.resume=never", "train.overwrite=true")
        assert wipe.returncode == 2 and "is not a folder name" in one_line(wipe.stderr)
    assert {p: p.read_bytes() for p in (tmp_path / "runs").rglob("*") if p.is_file()} == kept


@pytest.mark.parametrize(
    "variables, message",
    [
        ({"WORLD_SIZE": "0"}, "$WORLD_SIZE: 0 processes; a job has at least 1"),
        ({"WORLD_SIZE": "abc"}, "$WORLD_SIZE: 'abc' is not a whole number"),
        ({"WORLD_SIZE": "-2"}, "$WORLD_SIZE: -2 processes"),
        ({"WORLD_SIZE": "2", "RANK": "2"}, "$RANK: 2 is not a rank of a job of $WORLD_SIZE=2"),
        ({"LOCAL_RANK": "-1"}, "$LOCAL_RANK: -1 is below 0"),
        ({"WANDB_MODE": "bogus"}, "$WANDB_MODE: 'bogus' is not a W&B mode"),
        ({"WANDB_PROJECT": "my/proj"}, "$WANDB_PROJECT: W&B project names cannot contain /"),
        ({"WANDB_TAGS": "ok," + "x" * 65}, "$WANDB_TAGS: each tag needs 1 to 64 characters"),
        # read later in start-up (the data plan, the resume point), where they were a traceback
        ({"LOCAL_WORLD_SIZE": "abc"}, "$LOCAL_WORLD_SIZE: 'abc' is not a whole number"),
        ({"LOCAL_WORLD_SIZE": "0"}, "$LOCAL_WORLD_SIZE: 0 processes on this machine"),
        ({"LOCAL_WORLD_SIZE": "2", "LOCAL_RANK": "2"}, "$LOCAL_RANK: 2 is not a rank of this machine's"),
        ({"TORCHELASTIC_RESTART_COUNT": "x"}, "$TORCHELASTIC_RESTART_COUNT: 'x' is not a whole number"),
        # wandb refuses these at its start (the run then went on without W&B)
        ({"WANDB_PROJECT": "p" * 129}, "$WANDB_PROJECT: W&B project names have at most 128 characters"),
        ({"WANDB_BASE_URL": "bogus"}, "$WANDB_BASE_URL: 'bogus' is not the http:// or https:// address"),
    ],
)
@pytest.mark.parametrize("dry_run", [True, False])
def test_bad_job_and_wandb_variables_are_one_line_before_the_start(tmp_path, digit_shards, variables, message, dry_run):
    config = write_config(tmp_path / "env.yaml", digit_shards)
    result = run_module("dcgan.train", "--config", str(config), *(["--dry-run"] if dry_run else []),
                        env={"WANDB_MODE": "offline", **variables}, timeout=120)  # fmt: skip
    assert result.returncode == 2 and message in one_line(result.stderr)
    assert not (tmp_path / "runs").exists()  # nothing started


def test_an_override_that_is_not_utf8_is_one_line(tmp_path, digit_shards):
    config = write_config(tmp_path / "bytes.yaml", digit_shards)
    # Python holds the command line's byte 0xff as the lone surrogate U+DCFF; YAML refuses it
    result = train(config, "train.name=run-\udcff")
    assert result.returncode == 2
    assert one_line(result.stderr).endswith(
        "override 'train.name=run-\\udcff': not a valid YAML value (byte 0xff is not UTF-8)"
    )
    assert not (tmp_path / "runs").exists()


@pytest.fixture
def read_only_dir(tmp_path):
    folder = tmp_path / "read-only"
    folder.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)], capture_output=True
    ).returncode:
        pytest.skip("cannot mount a read-only filesystem here (needs root)")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def test_an_out_dir_on_a_read_only_filesystem_is_one_line(tmp_path, digit_shards, read_only_dir):
    config = write_config(tmp_path / "ro.yaml", digit_shards, train={"out_dir": str(read_only_dir)})
    result = train(config)
    assert result.returncode == 2
    assert f"cannot write the run folder {read_only_dir / 'ro'} (Read-only file system)" in one_line(result.stderr)


def test_a_full_disk_under_metrics_grids_and_summary_does_not_stop_training(tmp_path, digit_shards):
    config = write_config(tmp_path / "full.yaml", digit_shards, train={"steps": 8})
    result = faulty(config, "run-folder-full:2")
    assert result.returncode == 0, result.stderr[-3000:]
    for what in ("metrics.jsonl", "sample grids", "losses.png", "summary.json"):
        assert result.stderr.count(f"cannot write {what} in ") == 1, what
    run_dir = tmp_path / "runs" / "full"
    assert steps_in(run_dir / "metrics.jsonl") == [2, 4, 6, 8]  # the lines held back got through later
    assert checkpoint.latest_valid(run_dir / "checkpoints")[0].name == "step_00000008.pt"


def test_string_settings_keep_their_text(tmp_path, digit_shards):
    config = write_config(tmp_path / "text.yaml", digit_shards, train={"steps": 2})
    config.write_text(config.read_text() + "wandb:\n  notes: 0755\n  tags: [12:30, yes]\n")
    assert train(config, "train.name=1.10").returncode == 0
    assert os.listdir(tmp_path / "runs") == ["1.10"]
    saved = yaml.safe_load((tmp_path / "runs" / "1.10" / "config.yaml").read_text())
    assert (
        saved["train"]["name"] == "1.10"
        and saved["wandb"]["notes"] == "0755"
        and saved["wandb"]["tags"] == ["12:30", "yes"]
    )


def test_a_run_resumed_at_or_past_its_steps_ends_at_once(tmp_path, digit_shards):
    config = write_config(tmp_path / "past.yaml", digit_shards)
    assert train(config).returncode == 0
    summary = (tmp_path / "runs" / "past" / "summary.json").read_bytes()
    result = train(config, "train.steps=4")
    assert result.returncode == 0 and "has nothing to train" in result.stderr
    assert (tmp_path / "runs" / "past" / "summary.json").read_bytes() == summary  # the record stays the run's
