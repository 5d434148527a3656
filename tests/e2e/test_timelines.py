"""A run folder's history (dcgan/run/timelines.py): the settings that act once (the same
command after a stop carries on, whatever train.resume and train.overwrite it gives) and
lineage (a branch moves aside what is not on the resumed lineage, whatever its steps).
Real trainer processes; a stop is a real SIGINT."""

import json
import signal

import pytest
from test_never_lost import wait_for

from conftest import run_module, write_config
from dcgan.checkpoint import files as checkpoint
from dcgan.config.sections import Config, TrainConfig
from dcgan.preflight import settle_start
from dcgan.run import timelines


def train(config, *overrides: str):
    return run_module("dcgan.train", "--config", str(config), *overrides, timeout=120)


def stop_after(config, log_name: str, tmp_path, text: str, *overrides: str) -> tuple[str, dict]:
    """Start ``config`` with ``overrides`` for 100000 steps, SIGINT it once ``text`` is in
    its log; (log, summary.json) after it exited 75."""
    from conftest import start_python

    log = tmp_path / log_name
    proc = start_python("-m", "dcgan.train", "--config", str(config), "train.steps=100000", *overrides, log=log)
    try:
        wait_for(text, log, proc)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 75, log.read_text()[-3000:]
    finally:
        proc.kill()
    summary = json.loads((config.parent / "runs" / config.stem / "summary.json").read_text())
    return log.read_text(), summary


def logged_after(step: int) -> int:
    """A step a few steps past ``step`` that has a log line (write_config logs every 2)."""
    return (step // 2 + 2) * 2


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}.pt"


def test_the_same_command_after_a_stop_carries_on_with_overwrite(tmp_path, digit_shards):
    config = write_config(tmp_path / "again.yaml", digit_shards, checkpoint={"every": 1000})
    assert train(config).returncode == 0  # a finished run, for the overwrite to wipe
    command = ("train.resume=never", "train.overwrite=true")
    first, stopped = stop_after(config, "first.log", tmp_path, "step 8/", *command)
    assert "wiping" in first and stopped["status"] == "stopped" and stopped["step"] >= 8
    assert "the same command carries on from the run folder's newest checkpoint" in first

    second, again = stop_after(config, "second.log", tmp_path, f"step {logged_after(stopped['step'])}/", *command)
    run_dir = tmp_path / "runs" / "again"
    assert "wiping" not in second and "acts once per run folder" in second, second[-3000:]
    assert f"resumed from {run_dir / 'checkpoints' / checkpoint_name(stopped['step'])}" in second
    assert again["step"] > stopped["step"] and not (run_dir / "timelines").exists()


def test_the_same_command_after_a_stop_carries_on_from_the_run_not_the_path(tmp_path, digit_shards):
    source = write_config(tmp_path / "source.yaml", digit_shards)
    assert train(source).returncode == 0
    start = tmp_path / "runs" / "source" / "checkpoints" / "step_00000006.pt"
    config = write_config(tmp_path / "tuned.yaml", digit_shards, checkpoint={"every": 1000})
    _, stopped = stop_after(config, "first.log", tmp_path, "step 10/", f"train.resume={start}")
    assert stopped["step"] >= 10

    second, _ = stop_after(
        config, "second.log", tmp_path, f"step {logged_after(stopped['step'])}/", f"train.resume={start}"
    )
    run_dir = tmp_path / "runs" / "tuned"
    assert f"resumed from {run_dir / 'checkpoints' / checkpoint_name(stopped['step'])}" in second, second[-3000:]
    assert not (run_dir / "timelines").exists()  # nothing of the stopped attempt was moved aside


@pytest.mark.parametrize(
    "recorded, status, restart, carries_on",
    [
        (None, None, 0, False),  # the first attempt applies them
        (None, None, 1, True),  # a restart of the job, should the record be missing
        ("same", "stopped", 0, True),  # the same command after a stop
        ("same", "failed", 0, True),
        ("same", "done", 0, False),  # the run finished: the same command starts it again, as asked
        ("other", "stopped", 0, False),  # other settings: a new request, applied
    ],
)
@pytest.mark.parametrize("resume, overwrite", [("never", True), ("never", False), ("PATH", False)])
def test_resume_and_overwrite_act_once_per_run_folder(
    tmp_path, recorded, status, restart, carries_on, resume, overwrite
):
    resume = str(tmp_path / "elsewhere" / "step_00000004.pt") if resume == "PATH" else resume
    cfg = Config(train=TrainConfig(out_dir=str(tmp_path), name="r", resume=resume, overwrite=overwrite))
    checkpoint.save(tiny_state(5), cfg.run_dir / "checkpoints", 5, keep=1)
    if recorded is not None:
        timelines.record_start(cfg, 0)
        if recorded == "other":
            (cfg.run_dir / timelines.STARTED_WITH).write_text(json.dumps({"resume": "/x.pt", "overwrite": False}))
    if status is not None:
        (cfg.run_dir / "summary.json").write_text(json.dumps({"status": status}))
    settled, note = settle_start(cfg, restart)
    assert (settled.train.resume, settled.train.overwrite) == (("auto", False) if carries_on else (resume, overwrite))
    assert (cfg.train.resume, cfg.train.overwrite) == (resume, overwrite)  # the plan's input stays as it was
    assert (note is not None) == carries_on
    if carries_on:
        assert "acts once per run folder" in note and f"train.resume={resume}" in note


def test_a_path_with_nothing_saved_since_is_loaded_again(tmp_path):
    cfg = Config(train=TrainConfig(out_dir=str(tmp_path), name="r", resume="/x/step_00000004.pt"))
    cfg.run_dir.mkdir(parents=True)
    timelines.record_start(cfg, 4)
    settled, note = settle_start(cfg, 0)
    assert settled.train.resume == "/x/step_00000004.pt" and note is None


def tiny_state(step: int) -> dict:
    from test_checkpoint import tiny_state as state

    return state(step)


# --------------------------------------------------------------------------- lineage


def lineage_of(path) -> list:
    return checkpoint.read_record(path)["lineage"]


def metrics_lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_going_back_to_an_older_timeline_keeps_every_checkpoint_and_metrics_line(tmp_path, digit_shards):
    """Issue 27's item 3: timeline A to step 20; B from A's step 5 to step 30; then back to
    A's step 20 with checkpoint.keep=3. B's checkpoints at steps 10-20 are not on A's
    lineage: they move aside with B's others, never pruned."""
    config = write_config(
        tmp_path / "lin.yaml", digit_shards, train={"steps": 20}, checkpoint={"every": 5, "keep": 10}, log={"every": 1}
    )
    run_dir = tmp_path / "runs" / "lin"
    ckpts = run_dir / "checkpoints"
    assert train(config).returncode == 0
    a_lineage = lineage_of(ckpts / "step_00000020.pt")
    a_bytes = {p.name: p.read_bytes() for p in checkpoint.list_checkpoints(ckpts)}

    b = train(config, f"train.resume={ckpts / 'step_00000005.pt'}", "train.steps=30")
    assert b.returncode == 0, b.stderr[-3000:]
    (a_aside,) = (run_dir / "timelines").iterdir()
    b_lineage = lineage_of(ckpts / "step_00000030.pt")
    assert b_lineage[:-1] == a_lineage and b_lineage[-1][1] == 5
    b_bytes = {p.name: p.read_bytes() for p in checkpoint.list_checkpoints(ckpts) if p.name != "step_00000005.pt"}

    back = train(config, f"train.resume={a_aside / 'checkpoints' / 'step_00000020.pt'}", "train.steps=25",
                 "checkpoint.keep=3")  # fmt: skip
    assert back.returncode == 0, back.stderr[-3000:]
    (b_aside,) = set((run_dir / "timelines").iterdir()) - {a_aside}
    assert b_aside.name.endswith("-after-step_00000005")

    # every checkpoint of both timelines is on disk, byte for byte
    found = {**{p.name: p.read_bytes() for p in checkpoint.list_checkpoints(a_aside / "checkpoints")},
             "step_00000005.pt": (ckpts / "step_00000005.pt").read_bytes()}  # fmt: skip
    assert found == a_bytes
    assert {p.name: p.read_bytes() for p in checkpoint.list_checkpoints(b_aside / "checkpoints")} == b_bytes
    # the run folder holds A's lineage only, and goes on on a new timeline after A's step 20
    assert [p.name for p in checkpoint.list_checkpoints(ckpts)] == ["step_00000005.pt", "step_00000025.pt"]
    now = lineage_of(ckpts / "step_00000025.pt")
    assert now[:-1] == a_lineage and now[-1][1] == 20
    assert json.loads((run_dir / timelines.LINEAGE).read_text())["lineage"] == now
    # each metrics line under its own timeline: the run folder's curve is A's to 20, then the new one's
    lines = [line for line in metrics_lines(run_dir / "metrics.jsonl") if "loss_d" in line]
    assert [line["step"] for line in lines] == list(range(1, 26))
    assert all(line["timeline"] == timelines.timeline_at(now, line["step"]) for line in lines)
    b_lines = [line for line in metrics_lines(b_aside / "metrics.jsonl") if "loss_d" in line]
    assert [line["step"] for line in b_lines] == list(range(1, 31))
    assert all(line["timeline"] == timelines.timeline_at(b_lineage, line["step"]) for line in b_lines)
    # B's sample grids past step 5 went with B
    grids = sorted(p.name for p in (b_aside / "samples").iterdir())
    assert grids == [f"step_{s:08d}.png" for s in range(6, 31) if s % 3 == 0]
