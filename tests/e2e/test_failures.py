"""Every failure ends every process of a run within seconds, with one line that says what
failed and where (dcgan/run/failure.py). Faults are injected into real runs, with two
DataLoader workers per process, alone and under a 2-rank torchrun: undecodable data, an
exception in a step, a full disk under a checkpoint write, a DataLoader worker killed as
the OOM killer would, a rank stuck in a collective, and a rank killed outright. Each run
must exit non-zero within DEADLINE_S, and no process (rank, worker, launcher) may be left
behind."""

import json
import os
import re
import signal
import socket
import time
import uuid
from pathlib import Path

import pytest
import webdataset as wds

from conftest import REPO, run_python, start_python, write_config

DEADLINE_S = 60
TORCHRUN = pytest.mark.parametrize("nproc", [0, 2], ids=["alone", "torchrun-2"])


def marked(marker: str) -> list[int]:
    """Pids of live processes whose environment carries ``marker`` (every process a run started)."""
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if f"DCGAN_TEST_MARK={marker}".encode() in environ.read_bytes():
                stat = (environ.parent / "stat").read_text()
                if stat.rsplit(")", 1)[1].split()[0] != "Z":  # a zombie has ended, its parent reaps it
                    found.append(int(environ.parent.name))
        except OSError:
            continue  # it ended while we looked
    return found


def children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(stat.parent.name))
        except (OSError, ValueError):
            continue
    return kids


def is_rank_copy(pid: int) -> bool:
    """A forked copy of a dcgan.train process: a DataLoader worker (the W&B service is another child)."""
    try:
        return b"dcgan.train" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def assert_nothing_left(marker: str, within_s: float = 2) -> None:
    deadline = time.monotonic() + within_s  # a reaped child may take a moment to vanish from /proc
    while (left := marked(marker)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, f"processes left behind: {left}"


def run_with_fault(tmp_path, shards, fault: str, nproc: int, **sections):
    """Train on ``shards`` with ``fault`` injected (tests/faults.py); returns (result, seconds)."""
    name = f"{fault.replace(':', '-') or 'none'}-{nproc}"
    config = write_config(tmp_path / f"{name}.yaml", shards, **{"data": {"workers": 2}, **sections})
    marker = uuid.uuid4().hex
    env = {"DCGAN_FAULT": fault, "DCGAN_TEST_MARK": marker, "PYTHONPATH": str(REPO)}
    t0 = time.monotonic()
    result = run_python("tests/faults.py", "--config", str(config), nproc=nproc, env=env, timeout=DEADLINE_S)
    seconds = time.monotonic() - t0
    assert_nothing_left(marker)
    assert result.returncode != 0, result.stderr[-3000:]
    return result, seconds


@pytest.fixture(scope="module")
def undecodable_shards(tmp_path_factory):
    """200 samples whose PNG members are not images."""
    folder = tmp_path_factory.mktemp("undecodable")
    with wds.TarWriter(str(folder / "shard-000000.tar")) as sink:
        for i in range(200):
            sink.write({"__key__": f"{i:05d}", "png": b"\x89PNG\r\n\x1a\n not an image"})
    (folder / "manifest.json").write_text(json.dumps({"shards": ["shard-000000.tar"], "shard_samples": [200]}))
    return folder


@TORCHRUN
def test_undecodable_data_ends_the_run(tmp_path, undecodable_shards, nproc):
    result, seconds = run_with_fault(tmp_path, undecodable_shards, "", nproc)
    assert seconds < DEADLINE_S
    shard = undecodable_shards / "shard-000000.tar"
    assert "failed (step 1): DataError: no sample decodes: 1001 in a row failed" in result.stderr
    assert f"in {shard}: UnidentifiedImageError" in result.stderr
    assert "BytesIO" not in result.stderr  # PIL's in-memory file name is noise


@TORCHRUN
def test_exception_in_a_step_ends_every_rank(tmp_path, digit_shards, nproc):
    failing = max(nproc - 1, 0)  # rank 1 under torchrun: rank 0 then waits for it in a collective
    result, seconds = run_with_fault(tmp_path, digit_shards, f"step:{failing}:3", nproc, train={"steps": 1000})
    assert seconds < DEADLINE_S
    line = f"rank {failing} failed (step 3): RuntimeError: injected fault in gan_step at step 3"
    assert line in result.stderr
    if nproc:
        assert f"stopping rank 0: {line}" in result.stderr
    run_dir = tmp_path / "runs" / f"step-{failing}-3-{nproc}"
    if failing == 0:  # rank 0's traceback goes to train.log, and its summary says what failed
        assert "Traceback" in (run_dir / "train.log").read_text()
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["status"] == "failed" and "injected fault" in summary["error"]
        assert summary["where"] == "step 3"


@TORCHRUN
def test_full_disk_under_the_final_checkpoint(tmp_path, digit_shards, nproc):
    result, seconds = run_with_fault(tmp_path, digit_shards, "checkpoint-write", nproc)
    assert seconds < DEADLINE_S
    assert "checkpoint at step 6 could not be written" in result.stderr and "No space left on device" in result.stderr
    ckpt_dir = tmp_path / "runs" / f"checkpoint-write-{nproc}" / "checkpoints"
    assert not list(ckpt_dir.iterdir())  # no temp file, no half checkpoint


def test_fp16_skipping_every_step_of_an_interval_ends_the_run_at_that_log_step(tmp_path, digit_shards):
    """Gradients overflow at every step from step 15 on, while the forward pass, the weights
    and batch norm's statistics stay finite: nothing but the scaler's skips shows that the
    run no longer trains. Steps 21-40 are the first interval the scaler skipped whole."""
    result, seconds = run_with_fault(
        tmp_path, digit_shards, "inf-grad:15", 0, train={"steps": 200, "precision": "fp16"}, log={"every": 20},
        checkpoint={"every": 100},
    )  # fmt: skip
    assert seconds < DEADLINE_S
    assert "diverged at step 40: the fp16 grad scaler skipped the last 20 steps in a row" in result.stderr, (
        result.stderr[-3000:]
    )
    summary = json.loads((tmp_path / "runs" / "inf-grad-15-0" / "summary.json").read_text())
    assert summary["status"] == "diverged"


def test_killed_dataloader_worker_ends_the_run(tmp_path, digit_shards):
    config = write_config(tmp_path / "long.yaml", digit_shards, data={"workers": 2}, train={"steps": 100000})
    marker = uuid.uuid4().hex
    log = tmp_path / "long.log"
    proc = start_python("-m", "dcgan.train", "--config", str(config), log=log, env={"DCGAN_TEST_MARK": marker})
    try:
        deadline = time.monotonic() + 120
        worker = None
        while worker is None:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            workers = [k for k in children(proc.pid) if is_rank_copy(k)]
            worker = workers[0] if workers and "step 2/" in log.read_text() else None
            time.sleep(0.05)
        os.kill(worker, signal.SIGKILL)
        t0 = time.monotonic()
        proc.wait(timeout=DEADLINE_S)
        seconds = time.monotonic() - t0
    finally:
        proc.kill()
    assert_nothing_left(marker)
    text = log.read_text()
    assert proc.returncode != 0 and seconds < DEADLINE_S
    # torch says either, depending on where it notices: its SIGCHLD handler or its queue timeout
    assert re.search(rf"RuntimeError: DataLoader worker \(pid(\(s\))? {worker}\) (is killed by signal|exited)", text)


def test_a_rank_stuck_in_a_collective_is_ended_when_a_peer_fails(tmp_path, digit_shards):
    """Rank 1 never comes back from step 3 (as in an NCCL collective whose peer is gone);
    rank 0 fails there. Rank 1's watch of the store ends it."""
    result, seconds = run_with_fault(tmp_path, digit_shards, "step:0:3,stuck:1:3", 2, train={"steps": 1000})
    assert seconds < DEADLINE_S
    assert "stopping rank 1: rank 0 failed (step 3): RuntimeError: injected fault" in result.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("killed", [0, 1])
def test_a_rank_killed_outright_ends_the_others_without_torchrun(tmp_path, digit_shards, killed):
    """One process per rank, as a submitit job runs them (rank 0 hosts the store). The
    killed rank dies of SIGKILL, as under the OOM killer. The survivor is stuck from step
    3 on when rank 0 is killed (it then learns it only from the store going away), and in
    a collective with the dead rank when rank 1 is."""
    config = write_config(tmp_path / "tasks.yaml", digit_shards, data={"workers": 2}, train={"steps": 100000})
    marker, port, survivor = uuid.uuid4().hex, free_port(), 1 - killed
    env = {"DCGAN_TEST_MARK": marker, "PYTHONPATH": str(REPO), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "DCGAN_FAULT": f"stuck:{survivor}:3" if killed == 0 else ""}  # fmt: skip
    logs = [tmp_path / f"rank{r}.log" for r in (0, 1)]
    procs = [
        start_python(
            "tests/faults.py", "--config", str(config), log=logs[r], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}
        )  # fmt: skip
        for r in (0, 1)
    ]
    try:
        deadline = time.monotonic() + 120
        ready = "is stuck at step 3" if killed == 0 else "step 2/"
        while ready not in logs[survivor if killed == 0 else 0].read_text():
            assert all(p.poll() is None for p in procs) and time.monotonic() < deadline, logs[0].read_text()[-3000:]
            time.sleep(0.05)
        procs[killed].kill()
        t0 = time.monotonic()
        procs[survivor].wait(timeout=DEADLINE_S)
        seconds = time.monotonic() - t0
    finally:
        for p in procs:
            p.kill()
    assert procs[survivor].returncode != 0 and seconds < DEADLINE_S
    text = logs[survivor].read_text()
    if killed == 0:
        assert f"stopping rank {survivor}: the job's store is gone" in text
    else:
        # Its collective with the dead rank broke: in a step, or in a checkpoint's or an
        # evaluation's collective when the kill lands there (seen under CI load).
        assert re.search(rf"rank {survivor} failed \((step|checkpoint at step|evaluation at step) \d+\)", text), text
    assert_nothing_left(marker)
