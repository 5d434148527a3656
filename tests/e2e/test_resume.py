"""Stopping and starting again, with real processes (python, torchrun, signals, SIGKILL).

A run stopped at a checkpoint, by a signal between checkpoints, or by SIGKILL under
``torchrun --max-restarts`` ends with G, D, the EMA generator, both optimisers and every
rank's RNG bitwise equal to a run that was never stopped. Bitwise equal weights also mean
that no sample was repeated or skipped across the stop: D saw exactly the same batches.
Damaged checkpoints and failed writes cost at most the steps since the previous one.
A checkpoint resumes under the other memory layout (train.channels_last), and on
another device type: it goes on, with a warning that it is not bitwise exact.
"""

import json
import os
import re
import resource
import signal
import time
from pathlib import Path

import pytest
import torch

from conftest import run_module, start_python, write_config
from dcgan.base.exits import EXIT_PREEMPTED
from dcgan.checkpoint import files as checkpoint
from dcgan.checkpoint.state import TrainState
from dcgan.config.loading import load_config
from dcgan.models.networks import build_models
from dcgan.run.distributed import DistInfo
from dcgan.training.setup import build_training
from dcgan.training.step import StepSettings, gan_step
from wandb_files import read_run

STEPS, EVERY = 120, 40  # epochs of 32 steps (1 rank) or 16 (2 ranks): stops land mid-epoch
LONG_RUN = {
    "train": {"steps": STEPS},
    "log": {"every": 1, "samples_every": 1000},
    "checkpoint": {"every": EVERY, "keep": 10},
}


# --------------------------------------------------------------------------- helpers


def final_state(run_dir: Path, step: int = STEPS) -> dict:
    path = checkpoint.checkpoint_path(run_dir / "checkpoints", step)
    assert checkpoint.verify(path) is None
    return torch.load(path, weights_only=True)


def assert_bitwise_equal(a, b, where="state"):
    """Every tensor equal bit for bit, every other value equal (the config, the W&B run id,
    the wall time and the timeline ids may differ: they describe the run, not what it trained)."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            if where != "state" or k not in ("config", "wandb_run_id", "train_seconds", "lineage"):
                assert_bitwise_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_bitwise_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def last_logged_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    steps = re.findall(r'"step": (\d+)', path.read_text()) if path.exists() else []
    return int(steps[-1]) if steps else 0


def wait_until(condition, proc, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended (code {proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def worker_pids(launcher_pid: int) -> dict[int, int]:
    """{rank: pid} of torchrun's worker processes (its direct children)."""
    workers = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) != launcher_pid:  # field 4 of stat: the parent pid
                continue
            environ = (stat.parent / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError):
            continue  # gone meanwhile
        rank = next(int(e[5:]) for e in environ if e.startswith(b"RANK="))
        workers[rank] = int(stat.parent.name)
    return workers


def resumed_at(log_text: str) -> int:
    return int(re.search(r"resumed from \S+ at step (\d+)", log_text).group(1))


def stop_and_resume(config: Path, nproc: int, name: str, after_step: int, log: Path) -> int:
    """Run ``config`` as ``name``, SIGTERM it once it has logged ``after_step`` (rank 1 under
    torchrun: it must tell rank 0), check it stopped preempted, run it again to the end;
    returns the step it resumed from."""
    run_dir = config.parent / "runs" / name
    proc = start_python("-m", "dcgan.train", "--config", str(config), f"train.name={name}", nproc=nproc, log=log)
    wait_until(lambda: last_logged_step(run_dir) >= after_step, proc, f"step {after_step}")
    os.kill(worker_pids(proc.pid)[1] if nproc else proc.pid, signal.SIGTERM)
    proc.wait(timeout=120)
    text = log.read_text()
    assert (proc.returncode == EXIT_PREEMPTED) if not nproc else text.count(f"exitcode  : {EXIT_PREEMPTED} ") == 2, text
    again = run_module("dcgan.train", "--config", str(config), f"train.name={name}", nproc=nproc)
    assert again.returncode == 0, again.stderr
    return resumed_at(again.stderr)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory, digit_shards):
    """(config, final state of the uninterrupted single-process run)."""
    config = write_config(tmp_path_factory.mktemp("one_rank") / "one.yaml", digit_shards, **LONG_RUN)
    result = run_module("dcgan.train", "--config", str(config), "train.name=reference")
    assert result.returncode == 0, result.stderr
    return config, final_state(config.parent / "runs" / "reference")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, digit_shards):
    """(config, final state of the uninterrupted 2-rank torchrun run), 2 data workers each."""
    sections = {**LONG_RUN, "data": {"workers": 2}}
    config = write_config(tmp_path_factory.mktemp("two_ranks") / "two.yaml", digit_shards, **sections)
    result = run_module("dcgan.train", "--config", str(config), "train.name=reference", nproc=2)
    assert result.returncode == 0, result.stderr
    return config, final_state(config.parent / "runs" / "reference")


# --------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("nproc", [0, 2])  # 0: plain python, one process
def test_stopped_at_a_checkpoint_and_resumed_is_bitwise_exact(request, nproc):
    config, reference = request.getfixturevalue("one_rank" if nproc == 0 else "two_ranks")
    name = "at_checkpoint"
    first = run_module(
        "dcgan.train", "--config", str(config), f"train.name={name}", f"train.steps={2 * EVERY}", nproc=nproc
    )
    assert first.returncode == 0, first.stderr
    second = run_module("dcgan.train", "--config", str(config), f"train.name={name}", nproc=nproc)
    assert second.returncode == 0, second.stderr
    assert resumed_at(second.stderr) == 2 * EVERY
    assert_bitwise_equal(reference, final_state(config.parent / "runs" / name))


@pytest.mark.parametrize(
    "nproc, sig, to",
    [
        (0, signal.SIGUSR1, "process"),  # plain python
        (2, signal.SIGTERM, "rank 1"),  # one rank only: it must tell the others
        (2, signal.SIGUSR2, "torchrun"),  # as Slurm does: torchrun forwards it to every worker
    ],
)
def test_signal_stops_all_ranks_saves_and_resumes_bitwise(request, tmp_path, nproc, sig, to):
    config, reference = request.getfixturevalue("one_rank" if nproc == 0 else "two_ranks")
    name = f"signal_{sig.name}"
    run_dir = config.parent / "runs" / name
    log = tmp_path / "stopped.log"
    forward = ("--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1,SIGUSR2",) if to == "torchrun" else ()
    proc = start_python(
        "-m", "dcgan.train", "--config", str(config), f"train.name={name}", nproc=nproc, launcher_args=forward, log=log
    )  # fmt: skip
    wait_until(lambda: last_logged_step(run_dir) >= 10, proc, "step 10")
    os.kill(worker_pids(proc.pid)[1] if to == "rank 1" else proc.pid, sig)  # rank 1: not the one that writes
    proc.wait(timeout=120)
    text = log.read_text()
    if nproc == 0:
        assert proc.returncode == EXIT_PREEMPTED, text
    elif to == "rank 1":  # torchrun itself exits 1; it reports each worker's code
        assert proc.returncode == 1 and text.count(f"exitcode  : {EXIT_PREEMPTED} ") == 2, text
    else:  # torchrun re-raises the signal it got once its workers are done
        assert proc.returncode != 0 and "Received 12 death signal" in text, text
    stop = int(re.search(r"stopped on request after step (\d+)/", text).group(1))
    assert 10 <= stop < STEPS and stop % EVERY != 0  # between two periodic checkpoints
    assert re.search(r"checkpoint on disk \d+\.\d+s after the signal", text)
    assert checkpoint.list_checkpoints(run_dir / "checkpoints")[-1].name == f"step_{stop:08d}.pt"
    assert final_state(run_dir, stop)["step"] == stop
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["status"], summary["exit_code"], summary["step"]) == ("stopped", EXIT_PREEMPTED, stop)

    again = run_module("dcgan.train", "--config", str(config), f"train.name={name}", nproc=nproc)
    assert again.returncode == 0, again.stderr
    assert resumed_at(again.stderr) == stop
    assert_bitwise_equal(reference, final_state(run_dir))
    assert last_logged_step(run_dir) == STEPS and len((run_dir / "metrics.jsonl").read_text().splitlines()) == STEPS
    stopped, resumed = read_run(run_dir)  # one W&B run in two offline segments
    assert stopped.run_id == resumed.run_id and stopped.exit_code == EXIT_PREEMPTED
    logged = [step for segment in (stopped, resumed) for step in sorted(segment.metric("loss_g"))]
    assert logged == list(range(1, STEPS + 1))  # log.every=1: every step once, in order, across the stop


def test_sigkill_under_max_restarts_resumes_by_itself(two_ranks, tmp_path):
    config, reference = two_ranks
    run_dir = config.parent / "runs" / "killed"
    log = tmp_path / "killed.log"
    proc = start_python(
        "-m", "dcgan.train", "--config", str(config), "train.name=killed",
        nproc=2, launcher_args=("--max-restarts=1",), log=log,
    )  # fmt: skip
    first_checkpoint = checkpoint.checkpoint_path(run_dir / "checkpoints", EVERY)
    wait_until(lambda: checkpoint.record_path(first_checkpoint).exists(), proc, "the first checkpoint")
    wait_until(lambda: last_logged_step(run_dir) >= EVERY + 10, proc, f"step {EVERY + 10}")
    os.kill(worker_pids(proc.pid)[1], signal.SIGKILL)
    assert proc.wait(timeout=300) == 0, log.read_text()

    train_log = (run_dir / "train.log").read_text()
    before, restart_line = re.search(r"(?s)(.*)\n(.*restart 1 of this job.*?)\n", train_log).groups()
    resume_step = resumed_at(restart_line)
    logged_before = [int(s) for s in re.findall(r"INFO step (\d+)/", before)]
    steps_lost = max(logged_before) - resume_step
    print(f"SIGKILL at step ~{max(logged_before)}: resumed at {resume_step}, steps lost {steps_lost}")
    assert resume_step % EVERY == 0 and 0 <= steps_lost <= EVERY
    assert_bitwise_equal(reference, final_state(run_dir))
    killed, restarted = read_run(run_dir)  # one W&B run; the replayed steps are not sent again
    assert killed.run_id == restarted.run_id
    sent_before = sorted(killed.metric("loss_g"))
    assert sent_before == list(range(1, len(sent_before) + 1)) and sent_before[-1] <= max(logged_before)
    assert sorted(restarted.metric("loss_g")) == list(range(max(logged_before) + 1, STEPS + 1))


# --------------------------------------------------------------------------- damage and failures


def test_truncated_newest_checkpoint_is_reported_and_the_one_before_used(tmp_path, digit_shards):
    config = write_config(tmp_path / "trunc.yaml", digit_shards)  # checkpoints at 3 and 6
    assert run_module("dcgan.train", "--config", str(config)).returncode == 0
    ckpt_dir = tmp_path / "runs" / "trunc" / "checkpoints"
    newest = checkpoint.checkpoint_path(ckpt_dir, 6)
    with open(newest, "r+b") as f:
        f.truncate(newest.stat().st_size // 2)

    again = run_module("dcgan.train", "--config", str(config), "train.steps=9")
    assert again.returncode == 0, again.stderr
    assert f"checkpoint {newest} is unusable" in again.stderr and "truncated" in again.stderr
    assert resumed_at(again.stderr) == 3
    assert (ckpt_dir / "step_00000006.pt.corrupt").exists()  # kept for a look, never loaded again
    assert final_state(tmp_path / "runs" / "trunc", 9)["step"] == 9


def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path, digit_shards):
    config = write_config(tmp_path / "full.yaml", digit_shards, train={"steps": 3}, log={"samples_every": 100})
    assert run_module("dcgan.train", "--config", str(config)).returncode == 0
    ckpt_dir = tmp_path / "runs" / "full" / "checkpoints"
    good = checkpoint.checkpoint_path(ckpt_dir, 3)
    limit = good.stat().st_size // 2  # any file larger than this fails to grow, as on a full disk

    def small_file_limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    cut = run_module("dcgan.train", "--config", str(config), "train.steps=9", preexec_fn=small_file_limit)
    assert cut.returncode == 1, cut.stderr  # step 6 failed (reported, training went on); step 9, final, failed
    assert cut.stderr.count("could not be written") == 2, cut.stderr
    assert "the resume point stays step_00000003.pt" in cut.stderr
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["step_00000003.pt", "step_00000003.pt.json"]
    assert checkpoint.verify(good) is None

    again = run_module("dcgan.train", "--config", str(config), "train.steps=9")
    assert again.returncode == 0 and resumed_at(again.stderr) == 3, again.stderr


def test_explicit_checkpoint_overwrite_and_a_new_world_size(tmp_path, digit_shards):
    config = write_config(tmp_path / "ws.yaml", digit_shards)
    two = run_module("dcgan.train", "--config", str(config), nproc=2)
    assert two.returncode == 0, two.stderr
    run_dir = tmp_path / "runs" / "ws"

    # The 2-rank run's step-3 checkpoint, continued by one process under another name.
    path = checkpoint.checkpoint_path(run_dir / "checkpoints", 3)
    one = run_module("dcgan.train", "--config", str(config), "train.name=one", f"train.resume={path}", "train.steps=12")
    assert one.returncode == 0, one.stderr
    assert resumed_at(one.stderr) == 3 and "world size 2 -> 1" in one.stderr
    assert "epoch 0 goes on at batch 6 of 32 (was 3 of 16)" in one.stderr
    assert final_state(tmp_path / "runs" / "one", 12)["samples_seen"] == 3 * 32 + 9 * 16

    refused = run_module("dcgan.train", "--config", str(config), "train.resume=never")
    assert refused.returncode == 2 and "train.overwrite=true" in refused.stderr
    fresh = run_module("dcgan.train", "--config", str(config), "train.resume=never", "train.overwrite=true")
    assert fresh.returncode == 0 and "resumed from" not in fresh.stderr, fresh.stderr
    assert final_state(run_dir, 6)["world_size"] == 1
    assert [p.name for p in checkpoint.list_checkpoints(run_dir / "checkpoints")] == [
        "step_00000003.pt",
        "step_00000006.pt",
    ]


def test_resuming_on_other_data_is_refused_unless_asked_for(tmp_path, digit_shards):
    config = write_config(tmp_path / "data.yaml", digit_shards)
    assert run_module("dcgan.train", "--config", str(config)).returncode == 0
    run_dir = tmp_path / "runs" / "data"
    identity = final_state(run_dir, 6)["data"]  # the shards' names, counts and fingerprint travel with it
    record = json.loads(checkpoint.record_path(checkpoint.checkpoint_path(run_dir / "checkpoints", 6)).read_text())
    assert record["data"] == identity and identity["samples"] == 512 and len(identity["fingerprint"]) == 16

    fewer = tmp_path / "fewer"  # the same shards but the last
    fewer.mkdir()
    manifest = json.loads((digit_shards / "manifest.json").read_text())
    for name in manifest["shards"][:-1]:
        (fewer / name).symlink_to(digit_shards / name)
    manifest.update(shards=manifest["shards"][:-1], shard_samples=manifest["shard_samples"][:-1])
    (fewer / "manifest.json").write_text(json.dumps(manifest))
    config_before = (run_dir / "config.yaml").read_text()

    refused = run_module("dcgan.train", "--config", str(config), f"data.shards={fewer}", "train.steps=9")
    assert refused.returncode == 2, refused.stderr
    assert "6 shards / 512 samples then, 5 / 500 now" in refused.stderr and "removed shard-000005.tar" in refused.stderr
    assert "train.data_changed=continue" in refused.stderr
    assert (run_dir / "config.yaml").read_text() == config_before  # refused before anything started

    # Without the record's copy the start-up check cannot tell; the loaded checkpoint still does.
    record_file = checkpoint.record_path(checkpoint.checkpoint_path(run_dir / "checkpoints", 6))
    record_file.write_text(json.dumps({k: v for k, v in record.items() if k != "data"}))
    refused = run_module("dcgan.train", "--config", str(config), f"data.shards={fewer}", "train.steps=9")
    assert refused.returncode == 2 and "removed shard-000005.tar" in refused.stderr, refused.stderr
    assert (run_dir / "config.yaml").read_text() == config_before

    go_on = run_module(
        "dcgan.train", "--config", str(config), f"data.shards={fewer}", "train.steps=9", "train.data_changed=continue"
    )
    assert go_on.returncode == 0 and resumed_at(go_on.stderr) == 6, go_on.stderr
    assert "the data changed (6 shards / 512 samples then, 5 / 500 now" in go_on.stderr
    assert "epoch 0 goes on at batch 6 of 31 (was 6 of 32)" in go_on.stderr
    assert final_state(run_dir, 9)["data"]["samples"] == 500


# --------------------------------------------------------------------------- another layout, another device


CPU = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
TINY = ("model.arch=kmnist", "model.image_size=28", "model.channels=1", "model.nz=16", "model.ngf=8", "model.ndf=8")


def stepped_state(channels_last: bool) -> tuple[dict, TrainState]:
    """(config dict, a tiny CPU TrainState after one gan_step: Adam's moments exist)."""
    cfg = load_config(None, [*TINY, f"train.channels_last={str(channels_last).lower()}"])
    state, g_train, d_train = build_training(cfg, CPU)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    real = (torch.rand(4, 1, 28, 28) * 2 - 1).contiguous(memory_format=layout)
    gan_step(state, g_train, d_train, real, StepSettings(cfg.model.nz))
    return cfg.to_dict(), state


def assert_moments_follow(params: list[torch.Tensor], opt_state: dict, where: str) -> None:
    """Adam's moments of each 4-d parameter have its strides; ``opt_state``: an optimiser
    state dict's "state", keyed by the parameters' positions."""
    convs = [(i, p) for i, p in enumerate(params) if p.dim() == 4]
    assert convs, where
    for i, p in convs:
        moments = opt_state[i]["exp_avg"].stride(), opt_state[i]["exp_avg_sq"].stride()
        assert moments == (p.stride(), p.stride()), f"{where}: parameter {i} {p.stride()}, moments {moments}"


@pytest.mark.parametrize("saved_channels_last", [True, False])
def test_loaded_optimiser_moments_take_each_parameters_layout(tmp_path, saved_channels_last):
    config, before = stepped_state(saved_channels_last)
    sd = before.state_dict(config, [checkpoint.capture_rng_state(CPU.device)], 1, {})
    path = checkpoint.save(sd, tmp_path, 1, keep=1).path
    _, after = stepped_state(not saved_channels_last)
    conv = after.discriminator[2].weight  # (16, 8, 4, 4): its two layouts have different strides
    assert before.discriminator[2].weight.stride() != conv.stride()

    after.load_state_dict(checkpoint.load(path))
    for name, net, opt in (("G", after.generator, after.opt_g), ("D", after.discriminator, after.opt_d)):
        params = list(net.parameters())
        assert_moments_follow(params, {i: opt.state[p] for i, p in enumerate(params)}, name)
    assert after.opt_d.state[conv]["step"].item() == 1  # scalars are left as they were


@pytest.fixture(scope="module")
def six_steps(tmp_path_factory, digit_shards):
    """(config, its checkpoint at step 6): a run trained channels_last (the default)."""
    config = write_config(tmp_path_factory.mktemp("six_steps") / "six.yaml", digit_shards)
    result = run_module("dcgan.train", "--config", str(config))
    assert result.returncode == 0, result.stderr
    return config, checkpoint.checkpoint_path(config.parent / "runs" / "six" / "checkpoints", 6)


def test_a_channels_last_run_resumes_without_it(six_steps):
    config, path = six_steps
    plain = run_module(
        "dcgan.train", "--config", str(config), "train.name=plain", f"train.resume={path}",
        "train.channels_last=false", "train.steps=9",
    )  # fmt: skip
    assert plain.returncode == 0, plain.stderr
    assert resumed_at(plain.stderr) == 6
    sd = final_state(config.parent / "runs" / "plain", 9)
    G, D = build_models(load_config(config).model)
    for net, opt in (("generator", "opt_g"), ("discriminator", "opt_d")):
        names = [name for name, _ in (G if net == "generator" else D).named_parameters()]
        params = [sd[net][name] for name in names]
        assert all(p.is_contiguous() for p in params)  # the nets are plain now
        assert_moments_follow(params, sd[opt]["state"], net)


def claim_gpu(path: Path, out_dir: Path) -> Path:
    """A copy of the CPU checkpoint ``path`` (with its record) that says a GPU wrote it."""
    sd = checkpoint.load(path)
    assert sd["device"] == "cpu" and sd["rng"][0]["cuda"] is None
    sd["device"] = "cuda"
    sd["rng"][0]["cuda"] = torch.zeros(16, dtype=torch.uint8)  # a Philox seed and offset, as CUDA's generator keeps
    return checkpoint.save(sd, out_dir, sd["step"], keep=1).path


def test_a_gpu_checkpoint_resumes_on_the_cpu_with_a_warning(six_steps, tmp_path):
    config, path = six_steps
    from_gpu = claim_gpu(path, tmp_path)
    runs = config.parent / "runs"
    moved = run_module(
        "dcgan.train", "--config", str(config), "train.name=moved", f"train.resume={from_gpu}", "train.steps=9"
    )
    assert moved.returncode == 0, moved.stderr
    assert resumed_at(moved.stderr) == 6
    warnings = re.findall(r".*device cuda -> cpu.*", moved.stderr)
    assert len(warnings) == 1 and "not bitwise exact" in warnings[0], moved.stderr
    assert "latents and augmentation" in warnings[0] and "split afresh" not in moved.stderr
    # On the CPU the CUDA state has nothing to restore: the run is the exact resume's, bit for bit.
    exact = run_module(
        "dcgan.train", "--config", str(config), "train.name=exact", f"train.resume={path}", "train.steps=9"
    )
    assert exact.returncode == 0 and "not bitwise exact" not in exact.stderr, exact.stderr
    assert_bitwise_equal(final_state(runs / "exact", 9), final_state(runs / "moved", 9))
    assert final_state(runs / "moved", 9)["device"] == "cpu"

    # With a new batch too: one warning, the re-split's, which names the device among its reasons.
    resplit = run_module(
        "dcgan.train", "--config", str(config), "train.name=resplit", f"train.resume={from_gpu}",
        "train.batch_size=8", "train.steps=7",
    )  # fmt: skip
    assert resplit.returncode == 0, resplit.stderr
    assert re.search(r"batch per process 16 -> 8, device cuda -> cpu: the data is split afresh", resplit.stderr)
    assert "not bitwise exact" not in resplit.stderr
