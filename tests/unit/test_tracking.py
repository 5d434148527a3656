"""Run tracking: W&B (offline, read back from its own files), the run folder's metrics,
grids, loss plot and summary, resumed runs, and the console."""

import fcntl
import json
import logging
import math
import os
import pty
import re
import signal
import struct
import subprocess
import sys
import termios
import time

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import REPO, run_module, start_python, write_config
from dcgan.base.checks import ConfigError
from dcgan.base.images import enlarged, to_uint8_grid
from dcgan.base.progress import progress
from dcgan.checkpoint import files as checkpoint
from dcgan.config.loading import load_config
from dcgan.config.sections import WandbConfig
from dcgan.tracking import provenance
from dcgan.tracking.tracker import Tracker
from dcgan.tracking.wandb_run import check_environment, find_login, resolve_identity, resolve_mode, tidy_environment
from dcgan.training.step import STAT_NAMES
from wandb_files import read_run

# 16 grid images, 8 per row, of 28 px with 2 px padding: 242 x 62, enlarged 3x to be >= 512 px across
GRID_SIZE = (3 * (2 + 8 * 30), 3 * (2 + 2 * 30))
WANDB = {"mode": "offline", "project": "dcgan-tests", "group": "g1", "tags": ["a", "b"], "notes": "two ranks"}


def git(*args):
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True).stdout.strip()


def read_provenance(run_dir):
    """provenance.json's attempts, each checked for the facts every attempt records."""
    attempts = json.loads((run_dir / "provenance.json").read_text())
    for attempt in attempts:
        assert attempt["git"] == {
            "commit": git("rev-parse", "HEAD"),  # the tests run from a git checkout
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        }
        assert attempt["versions"]["torch"] == torch.__version__ and attempt["versions"]["cuda"] == torch.version.cuda
        assert attempt["versions"]["webdataset"] and attempt["versions"]["wandb"] and attempt["versions"]["python"]
        assert attempt["versions"]["nccl"] is None  # no CUDA here
        assert attempt["host"] and attempt["device"] == "cpu" and attempt["device_name"]
        assert "dcgan.train" in attempt["command"] and "--config" in attempt["command"]
    return attempts


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_real_grid(path, like=None):
    """A PNG grid of the right size that is not blank (wandb 0.31 saves float images black)."""
    pixels = np.asarray(Image.open(path).convert("L"))
    assert (pixels.shape[1], pixels.shape[0]) == GRID_SIZE, path
    assert pixels.std() > 10 and pixels.max() > 100, f"{path}: a blank grid"
    if like is not None:
        assert np.array_equal(pixels, np.asarray(Image.open(like).convert("L"))), f"{path} != {like}"


# --------------------------------------------------------------------------- W&B offline


@pytest.mark.e2e  # starts processes
def test_two_rank_run_is_read_back_from_wandb_files(tmp_path, digit_shards):
    config_path = write_config(tmp_path / "tracked.yaml", digit_shards, wandb=WANDB)
    result = run_module("dcgan.train", "--config", str(config_path), nproc=2)
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / "runs" / "tracked"
    assert "W&B offline (wandb.mode)" in result.stderr and "wandb sync" in result.stderr

    (segment,) = read_run(run_dir)  # rank 0 alone writes to W&B
    assert (segment.project, segment.group, segment.name) == ("dcgan-tests", "g1", "tracked")
    assert (segment.tags, segment.notes) == (["a", "b"], "two ranks")
    config = {k: v for k, v in segment.config.items() if k != "provenance"}
    assert config == yaml.safe_load((run_dir / "config.yaml").read_text())  # the resolved config
    assert segment.exit_code == 0
    (attempt,) = read_provenance(run_dir)  # and what ran it
    assert segment.config["provenance"] == attempt
    assert (attempt["step"], attempt["overrides"], attempt["config_file"]) == (0, [], str(config_path))

    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == [2, 4, 6]
    expected = {
        "loss_d_real", "loss_d_fake", "loss_d", "loss_g", "d_real", "d_fake", "d_fake_after", "grad_norm_d",
        "grad_norm_g", "lr_g", "lr_d", "img_per_s", "img_per_s_per_process", "step_time_s", "data_wait",
        "epoch", "corrupt_samples",
    }  # fmt: skip
    assert expected <= metrics[0].keys()
    for m in metrics:
        assert m["img_per_s"] == pytest.approx(2 * m["img_per_s_per_process"])
        assert m["lr_g"] == m["lr_d"] == 2e-4 and m["grad_norm_d"] > 0 and m["grad_norm_g"] > 0
        assert m["loss_d"] == pytest.approx(m["loss_d_real"] + m["loss_d_fake"])
    for name in expected:  # W&B holds exactly what metrics.jsonl holds, at the same steps
        assert segment.metric(name) == pytest.approx({m["step"]: m[name] for m in metrics}), name

    media = segment.folder / "files"
    real = segment.metric("real/path")
    assert list(real) == [0]
    assert_real_grid(media / real[0], like=run_dir / "samples" / "real.png")
    samples = segment.metric("samples/path")
    assert list(samples) == [3, 6]
    for step, path in samples.items():
        assert_real_grid(media / path, like=run_dir / "samples" / f"step_{step:08d}.png")

    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["status"], summary["step"], summary["world_size"]) == ("done", 6, 2)
    *_, (timeline, _) = json.loads((run_dir / "lineage.json").read_text())["lineage"]
    assert {m.pop("timeline") for m in metrics} == {timeline}  # every line names the run's timeline
    assert summary["final"] == metrics[-1] and summary["wandb"]["id"] == segment.run_id
    assert segment.summary["status"] == "done" and segment.summary["train_time_s"] == summary["train_time_s"]
    state = torch.load(checkpoint.latest_valid(run_dir / "checkpoints")[0], weights_only=True)
    assert state["wandb_run_id"] == segment.run_id


@pytest.mark.e2e  # starts processes
def test_resumed_run_continues_the_same_wandb_run_without_logging_a_step_twice(tmp_path, digit_shards):
    config = write_config(
        tmp_path / "resumed.yaml", digit_shards, wandb={"mode": "offline"},
        train={"steps": 8}, checkpoint={"every": 4, "keep": 5},
    )  # fmt: skip
    run_dir = tmp_path / "runs" / "resumed"
    assert run_module("dcgan.train", "--config", str(config)).returncode == 0
    first_metrics = read_metrics(run_dir)
    # As if killed after logging step 8 but before its checkpoint: steps 5..8 get replayed.
    ckpt_8 = checkpoint.checkpoint_path(run_dir / "checkpoints", 8)
    ckpt_8.unlink()
    checkpoint.record_path(ckpt_8).unlink()

    again = run_module("dcgan.train", "--config", str(config), "train.steps=12")
    assert again.returncode == 0, again.stderr
    assert "resumed from" in again.stderr and "at step 4" in again.stderr
    first, second = read_run(run_dir)
    assert first.run_id == second.run_id and f"run {first.run_id} continues" in again.stderr
    assert sorted(first.metric("loss_g")) == [2, 4, 6, 8]
    assert sorted(second.metric("loss_g")) == [10, 12]  # 6 and 8 were trained again, not sent again
    assert sorted(first.metric("samples/path")) == [3, 6, 8] and sorted(second.metric("samples/path")) == [9, 12]
    assert "real/path" not in {k for row in second.history for k in row}  # the real grid once per run

    metrics = read_metrics(run_dir)  # the run folder: each step once, the replay's values
    assert [m["step"] for m in metrics] == [2, 4, 6, 8, 10, 12]
    for before, after in zip(first_metrics, metrics):  # an exact resume replays the same losses
        assert before["loss_g"] == after["loss_g"] and before["d_real"] == after["d_real"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_from"].endswith("step_00000004.pt") and summary["steps_this_attempt"] == 8
    attempts = read_provenance(run_dir)  # one record per attempt, the newest last
    assert [(a["step"], a["overrides"]) for a in attempts] == [(0, []), (4, ["train.steps=12"])]
    assert (first.config["provenance"], second.config["provenance"]) == tuple(attempts)
    assert summary["train_time_s"] > summary["wall_time_s"]  # the first attempt's time counts too


@pytest.mark.e2e  # starts processes
def test_resume_from_another_run_folder_starts_a_new_wandb_run(tmp_path, digit_shards):
    config = write_config(tmp_path / "source.yaml", digit_shards, wandb={"mode": "offline"})
    assert run_module("dcgan.train", "--config", str(config)).returncode == 0
    (source,) = read_run(tmp_path / "runs" / "source")
    ckpt = checkpoint.checkpoint_path(tmp_path / "runs" / "source" / "checkpoints", 6)
    branch = run_module("dcgan.train", "--config", str(config), "train.name=branch", f"train.resume={ckpt}",
                        "train.steps=8")  # fmt: skip
    assert branch.returncode == 0, branch.stderr
    (segment,) = read_run(tmp_path / "runs" / "branch")
    assert segment.run_id != source.run_id and sorted(segment.metric("loss_g")) == [8]


@pytest.mark.e2e  # starts processes
def test_unreachable_server_falls_back_to_offline(tmp_path, digit_shards):
    """The online code path up to the network: a configured key, a server that refuses."""
    config = write_config(
        tmp_path / "online.yaml", digit_shards, wandb={"mode": "online", "init_timeout": 2}, train={"steps": 2}
    )
    env = {"WANDB_API_KEY": "x" * 40, "WANDB_BASE_URL": "http://127.0.0.1:9"}  # port 9: nothing listens
    result = run_module("dcgan.train", "--config", str(config), env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "W&B online failed" in result.stderr and "W&B offline (the server could not be reached)" in result.stderr
    (segment,) = read_run(tmp_path / "runs" / "online")
    assert sorted(segment.metric("loss_g")) == [2]


@pytest.mark.e2e  # starts processes
def test_training_goes_on_when_wandb_dies(tmp_path, digit_shards):
    """Slurm signals every process of a job, wandb-core too, and SIGTERM ends it."""
    config = write_config(tmp_path / "dies.yaml", digit_shards, wandb={"mode": "offline"}, train={"steps": 300},
                          log={"every": 1, "samples_every": 50})  # fmt: skip
    run_dir = tmp_path / "runs" / "dies"
    proc = start_python("-m", "dcgan.train", "--config", str(config), log=tmp_path / "dies.log")
    deadline = time.monotonic() + 120
    while not (run_dir / "metrics.jsonl").exists() or len(read_metrics(run_dir)) < 20:
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "dies.log").read_text()
        time.sleep(0.05)
    children = subprocess.run(["pgrep", "-P", str(proc.pid), "wandb-core"], capture_output=True, text=True)
    os.kill(int(children.stdout.split()[0]), signal.SIGTERM)
    assert proc.wait(timeout=300) == 0
    text = (tmp_path / "dies.log").read_text()
    assert "going on without W&B" in text and "Traceback" not in text
    assert [m["step"] for m in read_metrics(run_dir)] == list(range(1, 301))
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "done"


# --------------------------------------------------------------------------- W&B off


@pytest.mark.e2e  # starts processes
def test_disabled_wandb_still_writes_the_run_folder(tmp_path, digit_shards):
    config = write_config(tmp_path / "off.yaml", digit_shards, wandb={"mode": "auto"})
    result = run_module("dcgan.train", "--config", str(config), env={"WANDB_MODE": "disabled"})
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / "runs" / "off"
    assert "W&B disabled ($WANDB_MODE)" in result.stderr
    assert not (run_dir / "wandb").exists()
    assert [m["step"] for m in read_metrics(run_dir)] == [2, 4, 6]
    for step in (3, 6):
        assert_real_grid(run_dir / "samples" / f"step_{step:08d}.png")
    assert_real_grid(run_dir / "samples" / "real.png")
    plot = Image.open(run_dir / "losses.png")
    assert plot.format == "PNG" and plot.size == (1000, 360)
    assert np.asarray(plot.convert("L")).std() > 5  # curves, not an empty canvas
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "done" and summary["final"]["step"] == 6
    assert summary["wandb"] == {"mode": "disabled", "id": None, "dir": ""}


# --------------------------------------------------------------------------- pieces


KEY = "k" * 40  # wandb checks an API key's form (40+ characters), never the server here


def login_cases():
    """(name, env, files, whether wandb finds a login); each case gets its own HOME, for
    which "{home}" stands in env values and file contents; the working directory is
    {home}/work."""
    netrc_for = "machine {}\n  login user\n  password " + KEY + "\n"
    settings = "[default]\n{}\n"
    return [
        ("nothing", {}, {}, False),
        ("$WANDB_API_KEY", {"WANDB_API_KEY": KEY}, {}, True),
        ("$WANDB_IDENTITY_TOKEN_FILE", {"WANDB_IDENTITY_TOKEN_FILE": "{home}/token.jwt"}, {}, True),
        ("~/.netrc, the public server", {}, {".netrc": netrc_for.format("api.wandb.ai")}, True),
        ("~/_netrc", {}, {"_netrc": netrc_for.format("api.wandb.ai")}, True),
        ("$NETRC", {"NETRC": "{home}/elsewhere"}, {"elsewhere": netrc_for.format("api.wandb.ai")}, True),
        ("a netrc entry without a key", {}, {".netrc": "machine api.wandb.ai\n  login user\n"}, False),
        # a key for the public server says nothing about a private one, and the reverse
        ("$WANDB_BASE_URL, netrc for another host", {"WANDB_BASE_URL": "https://wandb.corp"},
         {".netrc": netrc_for.format("api.wandb.ai")}, False),
        ("$WANDB_BASE_URL with a port", {"WANDB_BASE_URL": "http://wandb.corp:8080"},
         {".netrc": netrc_for.format("wandb.corp:8080")}, True),
        ("base_url setting, netrc for it", {},
         {".config/wandb/settings": settings.format("base_url = https://wandb.corp"),
          ".netrc": netrc_for.format("wandb.corp")}, True),
        ("base_url setting, netrc for the public server", {},
         {".config/wandb/settings": settings.format("base_url = https://wandb.corp"),
          ".netrc": netrc_for.format("api.wandb.ai")}, False),
        ("api_key setting", {}, {".config/wandb/settings": settings.format(f"api_key = {KEY}")}, True),
        ("api_key setting under $WANDB_CONFIG_DIR", {"WANDB_CONFIG_DIR": "{home}/cfg"},
         {"cfg/settings": settings.format(f"api_key = {KEY}")}, True),
        ("api_key in the workspace settings", {}, {"work/wandb/settings": settings.format(f"api_key = {KEY}")}, True),
        # wandb 0.31 reads identity_token_file from a settings file but its login check does
        # not count it: an online run stops with "No API key configured"
        ("identity_token_file setting", {},
         {".config/wandb/settings": settings.format("identity_token_file = {home}/token.jwt")}, False),
    ]  # fmt: skip


def prepared_login_cases(tmp_path):
    """login_cases() written out: (name, env, working directory, found)."""
    prepared = []
    for i, (name, env, files, found) in enumerate(login_cases()):
        home = tmp_path / f"case{i}"
        (home / "work").mkdir(parents=True)
        (home / "token.jwt").write_text("a.b.c\n")
        for rel, text in files.items():
            (home / rel).parent.mkdir(parents=True, exist_ok=True)
            (home / rel).write_text(text.replace("{home}", str(home)))
        env = {"HOME": str(home), **{k: v.replace("{home}", str(home)) for k, v in env.items()}}
        prepared.append((name, env, home / "work", found))
    return prepared


def test_mode_auto_follows_every_login_wandb_accepts(tmp_path):
    auto = WandbConfig()
    for name, env, cwd, found in prepared_login_cases(tmp_path):
        mode, why = resolve_mode(auto, env, cwd)
        assert mode == ("online" if found else "offline"), (name, why)
        assert why.startswith("W&B login from ") if found else why.startswith("no W&B login"), (name, why)
        assert (find_login(env, cwd) is not None) == found, name


@pytest.mark.e2e  # starts processes
def test_login_check_agrees_with_wandb_itself(tmp_path):
    """The same cases through wandb's own check (what wandb.init does before an online run;
    no prompt, no server), each in a fresh wandb state."""
    pytest.importorskip("wandb.sdk.lib.wbauth", reason="wandb < 0.2x checks logins elsewhere")
    cases = [
        {"name": name, "env": env, "cwd": str(cwd), "found": found}
        for name, env, cwd, found in prepared_login_cases(tmp_path)
    ]
    script = """
import json, os, sys
import wandb
from wandb.sdk import wandb_setup
from wandb.sdk.lib import wbauth
keep = {k: os.environ[k] for k in ("PATH", "PYTHONPATH") if k in os.environ}
for case in json.loads(sys.stdin.read()):
    os.environ.clear()
    os.environ.update(keep, WANDB_SILENT="true", **case["env"])
    os.chdir(case["cwd"])
    wandb.teardown()  # forget the previous case's settings
    host = wandb_setup.singleton().settings.base_url
    auth = wbauth.authenticate_session(host=host, source="test", prompt=False, update_session=False)
    print(json.dumps([case["name"], auth is not None]))
"""
    result = subprocess.run(
        [sys.executable, "-c", script], input=json.dumps(cases), capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    wandb_says = dict(json.loads(line) for line in result.stdout.splitlines())
    assert wandb_says == {case["name"]: case["found"] for case in cases}


def test_mode_resolution_order(tmp_path):
    (tmp_path / "home" / "work").mkdir(parents=True)
    env = {"HOME": str(tmp_path / "home")}
    auto = WandbConfig()
    assert resolve_mode(WandbConfig(mode="offline"), {**env, "WANDB_API_KEY": KEY}) == ("offline", "wandb.mode")
    assert resolve_mode(auto, {**env, "WANDB_MODE": "disabled", "WANDB_API_KEY": KEY}) == ("disabled", "$WANDB_MODE")
    assert resolve_mode(auto, {**env, "WANDB_MODE": "dryrun"}) == ("offline", "$WANDB_MODE")
    assert resolve_mode(auto, {**env, "WANDB_MODE": " ", "WANDB_API_KEY": KEY})[0] == "online"  # empty: unset
    workspace = tmp_path / "home" / "work" / "wandb"  # `wandb offline` writes mode into ./wandb/settings
    workspace.mkdir()
    (workspace / "settings").write_text("[default]\nmode = offline\n")
    mode, why = resolve_mode(auto, {**env, "WANDB_API_KEY": KEY}, cwd=tmp_path / "home" / "work")
    assert (mode, why) == ("offline", f"mode = offline in {workspace / 'settings'}")
    assert resolve_mode(auto, {**env, "WANDB_MODE": "online"}, cwd=tmp_path / "home" / "work")[0] == "online"


def test_run_identity_config_then_environment_then_default():
    env = {
        "WANDB_PROJECT": "p-env", "WANDB_ENTITY": "team", "WANDB_NAME": "n-env", "WANDB_RUN_GROUP": "g-env",
        "WANDB_TAGS": " x, y,,z ,", "WANDB_NOTES": "from the env",
    }  # fmt: skip
    values, sources = resolve_identity(WandbConfig(), "run-name", env)
    assert values == {"project": "p-env", "entity": "team", "name": "n-env", "group": "g-env",
                      "tags": ["x", "y", "z"], "notes": "from the env"}  # fmt: skip
    assert sources == {"project": "$WANDB_PROJECT", "entity": "$WANDB_ENTITY", "name": "$WANDB_NAME",
                       "group": "$WANDB_RUN_GROUP", "tags": "$WANDB_TAGS", "notes": "$WANDB_NOTES"}  # fmt: skip
    configured = WandbConfig(project="p", group="g", tags=["t"])
    values, sources = resolve_identity(configured, "run-name", env)
    assert (values["project"], values["group"], values["tags"], values["entity"]) == ("p", "g", ["t"], "team")
    assert (sources["project"], sources["entity"]) == ("wandb.project", "$WANDB_ENTITY")
    values, sources = resolve_identity(WandbConfig(), "run-name", {"WANDB_PROJECT": " ", "WANDB_TAGS": ","})
    assert values == {"project": "dcgan", "entity": None, "name": "run-name", "group": None, "tags": None,
                      "notes": None}  # fmt: skip
    assert set(sources.values()) == {"default"}


def test_empty_wandb_variables_count_as_unset():
    env = {"WANDB_MODE": "", "WANDB_BASE_URL": " ", "WANDB_TAGS": " a,, b ,", "WANDB_NOTES": "n", "HOME": "/h"}
    changed = tidy_environment(env)
    assert env == {"WANDB_TAGS": "a,b", "WANDB_NOTES": "n", "HOME": "/h"}  # as wandb can start with
    assert changed == ["$WANDB_BASE_URL is empty: taken as unset", "$WANDB_MODE is empty: taken as unset"]


WANDB_ENVIRONMENTS = [
    {"WANDB_MODE": "bogus"}, {"WANDB_MODE": "OFFLINE"}, {"WANDB_MODE": "dryrun"}, {"WANDB_MODE": "shared"},
    {"WANDB_PROJECT": "my/proj"}, {"WANDB_PROJECT": "p" * 128}, {"WANDB_PROJECT": "p" * 129},
    {"WANDB_TAGS": "a,, b"}, {"WANDB_TAGS": "a," + "x" * 65},
    {"WANDB_BASE_URL": "bogus"}, {"WANDB_BASE_URL": "localhost:8080"}, {"WANDB_BASE_URL": "ftp://x"},
    {"WANDB_BASE_URL": "http://x:99999"}, {"WANDB_BASE_URL": "http://exa mple.com"},
    {"WANDB_BASE_URL": "https://wandb.ai/"}, {"WANDB_BASE_URL": "http://api.wandb.ai"},
    {"WANDB_BASE_URL": "https://api.wandb.ai"}, {"WANDB_BASE_URL": "http://127.0.0.1:9"},
    {"WANDB_BASE_URL": "http://[::1]:80/path"}, {"WANDB_BASE_URL": "https://api.forge.coreweave.com"},
]  # fmt: skip


def test_wandb_variables_pass_the_check_before_the_start_exactly_when_wandb_starts_with_them():
    """A variable the check lets through must not stop wandb at its start (the run would go
    on without W&B), and one it refuses must be one wandb refuses, as tidy_environment leaves
    it; but for $WANDB_MODE=shared, a wandb mode the trainer does not run (nor takes as wandb.mode)."""
    wandb = pytest.importorskip("wandb")
    for env in WANDB_ENVIRONMENTS:
        try:
            check_environment(WandbConfig(), env)
            passes = True
        except ConfigError:
            passes = False
        tidied = dict(env)
        tidy_environment(tidied)
        try:
            wandb.Settings().update_from_env_vars(tidied)
            starts = True
        except Exception:  # noqa: BLE001 - pydantic's ValidationError, wandb's UsageError
            starts = False
        assert passes == (starts and env != {"WANDB_MODE": "shared"}), (env, passes, starts)


def test_wandb_variables_are_checked_also_where_the_config_sets_their_value():
    """wandb validates $WANDB_PROJECT at its start even when wandb.project overrides it."""
    with pytest.raises(ConfigError, match=r"^\$WANDB_PROJECT: W&B project names cannot contain /"):
        check_environment(WandbConfig(project="mine"), {"WANDB_PROJECT": "my/proj"})
    check_environment(WandbConfig(mode="disabled"), {"WANDB_PROJECT": "my/proj"})  # wandb does not start


@pytest.mark.e2e  # starts processes
def test_wandb_mode_in_capitals_still_opens_a_wandb_run(tmp_path, digit_shards):
    config = write_config(tmp_path / "caps.yaml", digit_shards, wandb={"mode": "auto"}, train={"steps": 2})
    result = run_module("dcgan.train", "--config", str(config), env={"WANDB_MODE": "OFFLINE"})
    assert result.returncode == 0, result.stderr
    assert "W&B offline ($WANDB_MODE)" in result.stderr and "could not start" not in result.stderr
    (segment,) = read_run(tmp_path / "runs" / "caps")
    assert sorted(segment.metric("loss_g")) == [2] and segment.exit_code == 0


ENV_IDENTITY = {
    "WANDB_PROJECT": "from-env", "WANDB_ENTITY": "a-team", "WANDB_NAME": "env-name", "WANDB_RUN_GROUP": "env-group",
    "WANDB_TAGS": "x, y,,z", "WANDB_NOTES": "env notes",
}  # fmt: skip


@pytest.mark.parametrize(
    "case, wandb_cfg, env, expected",
    [
        # config leaves them unset: the W&B variables name the run
        ("env", {}, ENV_IDENTITY, ("from-env", "a-team", "env-name", "env-group", ["x", "y", "z"], "env notes")),
        # a value set in the config wins over its variable; the others still come from the environment
        ("config", {"project": "cfg-project", "name": "cfg-name", "group": "cfg-group", "tags": ["c"], "notes": "cfg"},
         ENV_IDENTITY, ("cfg-project", "a-team", "cfg-name", "cfg-group", ["c"], "cfg")),
    ],
)  # fmt: skip
@pytest.mark.e2e  # starts processes
def test_wandb_run_identity_from_config_and_environment(tmp_path, digit_shards, case, wandb_cfg, env, expected):
    config = write_config(tmp_path / f"{case}.yaml", digit_shards, wandb=wandb_cfg, train={"steps": 2})
    result = run_module("dcgan.train", "--config", str(config), env=env)
    assert result.returncode == 0, result.stderr
    (segment,) = read_run(tmp_path / "runs" / case)
    assert (segment.project, segment.entity, segment.name, segment.group, segment.tags, segment.notes) == expected
    if case == "env":
        assert "project 'from-env' from $WANDB_PROJECT" in result.stderr
        assert "tags ['x', 'y', 'z'] from $WANDB_TAGS" in result.stderr
    else:
        assert "from $WANDB_PROJECT" not in result.stderr and "entity 'a-team' from $WANDB_ENTITY" in result.stderr


@pytest.mark.e2e  # starts processes
def test_empty_wandb_mode_is_unset(tmp_path, digit_shards, monkeypatch):
    """wandb refuses to start on WANDB_MODE=""; here it means "unset": auto, no login, offline."""
    for var in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "NETRC", "WANDB_CONFIG_DIR", "WANDB_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no netrc, no settings file
    config = write_config(tmp_path / "empty.yaml", digit_shards, wandb={"mode": "auto"}, train={"steps": 2})
    # a closed local port: were a login found after all, going online fails here and not on the internet
    env = {"WANDB_MODE": "", "WANDB_BASE_URL": "http://127.0.0.1:9"}
    result = run_module("dcgan.train", "--config", str(config), env=env)
    assert result.returncode == 0, result.stderr
    assert "$WANDB_MODE is empty: taken as unset" in result.stderr
    assert "W&B offline (no W&B login" in result.stderr
    (segment,) = read_run(tmp_path / "runs" / "empty")
    assert sorted(segment.metric("loss_g")) == [2] and segment.exit_code == 0
    # neither config nor environment names the run: project dcgan, name train.name
    identity = (segment.project, segment.entity, segment.name, segment.group, segment.tags)
    assert identity == ("dcgan", "", "empty", "", [])


def test_provenance_file_keeps_every_attempt(tmp_path):
    path = tmp_path / "provenance.json"
    first = provenance.collect(["python", "-m", "dcgan.train"], ["a.b=1"], "cpu", "c.yaml")
    assert provenance.record(path, first) == [first]
    assert provenance.record(path, {"step": 4}) == [first, {"step": 4}]
    path.write_text("{half")  # cut by a crash: set aside, a new list starts
    assert provenance.record(path, {"step": 8}) == [{"step": 8}]
    assert (tmp_path / "provenance.json.unreadable").read_text() == "{half"
    assert provenance.git_state(tmp_path) is None  # not a git checkout


@pytest.mark.parametrize(
    "override, key",
    [
        ("wandb.mode=cloud", "wandb.mode"),
        ("wandb.project=a/b", "wandb.project"),
        ("wandb.tags=[ok, '']", "wandb.tags"),
        ("wandb.colour=red", "wandb.colour"),
        ("log.group=x", "log.group"),  # moved to wandb.group
    ],
)
def test_bad_wandb_settings_name_the_key(override, key):
    with pytest.raises(ConfigError, match=rf"^override {re.escape(repr(override))}: {key}"):
        load_config(None, [override])


def test_tracker_records_nonfinite_as_null_and_keeps_the_best(tmp_path):
    cfg = load_config(None, [f"train.out_dir={tmp_path}", "train.name=t", "wandb.mode=disabled"])
    tracker = Tracker(cfg, enabled=True, stat_names=STAT_NAMES)
    tracker.start(0, 30, None, cfg.to_dict())
    for step, fid, loss in ((10, 50.0, 1.0), (20, 30.0, math.nan), (30, 40.0, math.inf)):
        tracker.metrics(step, {"fid": fid, "loss_g": loss}, f"step {step}")
    tracker.finish(0, preempted=False, facts={"status": "done"})
    lines = (tmp_path / "t" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["loss_g"] for line in lines] == [1.0, None, None]  # valid JSON, no NaN
    summary = json.loads((tmp_path / "t" / "summary.json").read_text())
    assert summary["best"] == {"fid": {"value": 30.0, "step": 20}}
    assert summary["final"] == {"step": 30, "fid": 40.0, "loss_g": None}

    again = Tracker(cfg, enabled=True, stat_names=STAT_NAMES)  # resumed from step 20: step 30 is trained again
    again.start(20, 30, None, cfg.to_dict())
    assert [json.loads(line)["step"] for line in (tmp_path / "t" / "metrics.jsonl").read_text().splitlines()] == [
        10,
        20,
    ]
    assert again.best == {"fid": {"value": 30.0, "step": 20}} and again.last["step"] == 20
    again.finish(0, preempted=False, facts={})


def test_uint8_grid_maps_the_generator_range_to_0_255():
    images = torch.stack([torch.full((1, 2, 2), -1.0), torch.full((1, 2, 2), 1.0)])
    grid = to_uint8_grid(images, nrow=2)
    assert grid.dtype == np.uint8 and grid.shape == (6, 10, 3)  # 2 px padding around 2x2 images
    assert grid[2:4, 2:4].max() == 0 and grid[2:4, 6:8].min() == 255


def test_grids_are_enlarged_to_be_looked_at_pixel_for_pixel():
    grid = np.random.default_rng(0).integers(0, 256, (32, 62, 3), dtype=np.uint8)  # two 28 px images
    big = enlarged(grid)
    assert big.shape == (32 * 9, 62 * 9, 3)  # the smallest whole factor to >= 512 px across
    assert np.array_equal(big[::9, ::9], grid) and np.array_equal(big[8::9, 8::9], grid)  # nearest: squares
    assert enlarged(np.zeros((600, 600, 3), np.uint8)).shape == (600, 600, 3)  # large enough already


# --------------------------------------------------------------------------- console


@pytest.mark.e2e  # starts processes
def test_progress_bar_on_a_terminal_plain_lines_otherwise(tmp_path, digit_shards):
    config = write_config(tmp_path / "console.yaml", digit_shards, wandb={"mode": "disabled"})
    plain = run_module("dcgan.train", "--config", str(config), "train.name=plain")
    assert plain.returncode == 0
    assert "step/s" not in plain.stderr and "it/s" not in plain.stderr
    assert all(" | eta " in line for line in plain.stderr.splitlines() if " INFO step " in line)

    parent, child = pty.openpty()  # stderr a terminal, as under an interactive torchrun
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 160, 0, 0))  # a window size, as a terminal has
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "dcgan.train", "--config", str(config), "train.name=tty"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=child)
    os.close(child)
    out = b""
    while True:
        try:
            chunk = os.read(parent, 4096)
        except OSError:  # EIO: the child closed its end
            break
        if not chunk:
            break
        out += chunk
    assert proc.wait(timeout=300) == 0
    text = out.decode(errors="replace")
    assert "train: 100%" in text and "6/6" in text  # the tqdm bar, with its count
    assert "INFO step 6/6" in text  # metric lines still print, above the bar


def test_long_loops_in_plain_logs_say_how_long_is_left(caplog):
    """The feature classifier's progress in a log (the demo, Slurm): a count, a rate and an ETA."""
    caplog.set_level(logging.INFO, logger="dcgan")

    def slow(n):
        for i in range(n):
            time.sleep(0.01)
            yield i

    assert list(progress(slow(5), 5, desc="work", unit="batch", every_s=0.0)) == list(range(5))
    lines = [r.getMessage() for r in caplog.records]
    assert re.fullmatch(r"work: 2/5 \(40%, \d+s left\) batch, [\d.]+ batch/s", lines[1]), lines
    assert lines[-1].startswith("work: done, 5 batch in ")
