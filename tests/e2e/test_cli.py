"""What a user expects of the command lines: ``dcgan.train --help`` lists every config key
with its type, default and meaning (from dcgan/config/sections.py, so it cannot drift);
``--print-config`` and ``--dry-run`` show the resolved config and the plan without
starting anything; every launcher flag says what it does and its default; and under
torchrun a failing worker's traceback reaches torchrun's own failure report."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import pytest
import yaml

from conftest import REPO, run_module, run_python, write_config
from dcgan.config.keys import describe_keys, field_comments
from dcgan.config.loading import load_config
from dcgan.config.sections import Config
from dcgan.generate import main as generate_main
from dcgan.models.networks import build_models
from dcgan.run import failure


def flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def as_yaml(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=1 << 16).strip().removesuffix("...").strip()


def type_fits(type_text: str, value) -> bool:
    """The type column agrees with the default's Python type."""
    if isinstance(value, bool):
        return type_text == "bool"
    if isinstance(value, int):
        return type_text == "int"
    if isinstance(value, float):
        return type_text == "float"
    if isinstance(value, str):
        return type_text == "str" or value in type_text.split("|")
    return type_text.startswith(("[", "list["))


# --------------------------------------------------------------------------- --help


def test_every_config_field_has_a_meaning():
    """A key added without a comment beside it fails here: document it in dcgan/config/sections.py."""
    keys = describe_keys()
    assert [k.key for k in keys] and set(k.key for k in keys) == set(flatten(Config().to_dict()))
    assert [k.key for k in keys if not k.meaning] == []
    meanings = {k.key: k.meaning for k in keys}
    assert meanings["train.batch_size"] == "per process; the global batch is batch_size x world size"
    assert (
        meanings["data.cache"].startswith("Hold the whole set decoded")
        and "off: read the shards" in meanings["data.cache"]
    )
    assert meanings["model.nz"] == "latent size"  # ModelConfig, in dcgan/models/networks.py


@dataclass
class Probe:
    """A docstring, not a meaning."""

    # two comment lines
    # above a field
    above: int = 1
    beside: str = ""  # a comment beside it
    undocumented: float = 0.0  # fmt: skip


def test_meanings_come_from_the_comments_above_and_beside_a_field():
    assert field_comments(Probe) == {
        "above": "two comment lines above a field",
        "beside": "a comment beside it",
        "undocumented": "",  # a formatter's pragma is no meaning
    }


def test_help_lists_every_key_with_its_type_default_and_meaning():
    result = run_module("dcgan.train", "--help", timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for option in ("--config", "--print-config", "--dry-run"):
        assert option in result.stdout
    for key, value in flatten(Config().to_dict()).items():
        rows = [i for i, line in enumerate(lines) if re.split(r" {2,}", line.strip())[0] == key]
        assert len(rows) == 1, f"{key} is not listed once in --help"
        columns = re.split(r" {2,}", lines[rows[0]].strip())
        assert len(columns) >= 3, lines[rows[0]]
        assert type_fits(columns[1], value), f"{key}: type {columns[1]!r} for default {value!r}"
        assert columns[2] == as_yaml(value), f"{key}: default {columns[2]!r}, expected {as_yaml(value)!r}"
        meaning = columns[3] if len(columns) > 3 else lines[rows[0] + 1].strip()
        assert meaning and not meaning.startswith("(no meaning"), key
    sections = [line.split(".  ")[0] for line in lines if re.match(r"^[a-z_.]+\.  \S", line)]
    assert sections == ["data", "data.augment", "model", "optim", "optim.g", "optim.d", "loss", "d_augment", "train",
                        "log", "wandb", "checkpoint", "eval"]  # fmt: skip


# --------------------------------------------------------------------------- --print-config


def test_print_config_prints_what_load_config_reads_back(tmp_path, digit_shards):
    config = write_config(tmp_path / "tiny.yaml", digit_shards)
    overrides = ["train.name=1.10", "data.cache=on", "optim.g.betas=[0.0, 0.9]", "train.stop_signals=[SIGUSR2]",
                 "wandb.tags=[a, b]", "data.augment.translate=[0.1, 0.05]", "model.ema_decay=0"]  # fmt: skip
    result = run_module("dcgan.train", "--config", str(config), "--print-config", *overrides, timeout=120)
    assert result.returncode == 0, result.stderr
    printed = tmp_path / "printed.yaml"
    printed.write_text(result.stdout)
    again = load_config(printed)
    assert again == load_config(config, overrides)
    assert again.train.name == "1.10" and again.data.cache == "on" and again.optim.g.betas == (0.0, 0.9)
    assert not (tmp_path / "runs").exists()

    bad = run_module("dcgan.train", "--config", str(config), "--print-config", "train.stepz=3", timeout=120)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.strip().splitlines() == [
        "dcgan.train: config error: override 'train.stepz=3': train.stepz: unknown key (known here: "
        + bad.stderr.split("(known here: ")[1].strip()
    ]  # fmt: skip


# --------------------------------------------------------------------------- --dry-run


def test_dry_run_prints_the_plan_and_starts_nothing(tmp_path, digit_shards):
    config = write_config(tmp_path / "tiny.yaml", digit_shards)
    result = run_module("dcgan.train", "--config", str(config), "--dry-run", env={"WORLD_SIZE": "2"}, timeout=120)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    run_dir = (tmp_path / "runs" / "tiny").resolve()
    assert f"run folder   : {run_dir} (not there yet" in out
    assert "processes    : 2 " in out
    assert "batch        : 16 per process, 32 global" in out
    assert f"512 samples (28x28) in 6 shard(s) from {digit_shards}" in out
    assert "manifest.json" in out  # where the counts come from
    assert "16 per epoch; train.steps=6 takes 0.38 epoch(s)" in out  # 512 // (2 x 16)
    assert "data.cache=off: reading the shards every epoch" in out
    assert "resumes from : starts fresh" in out
    assert "evaluation   : off" in out
    assert not (tmp_path / "runs").exists()


def test_dry_run_finds_the_resume_point(tmp_path, digit_shards):
    config = write_config(tmp_path / "tiny.yaml", digit_shards)
    trained = run_module("dcgan.train", "--config", str(config), "train.steps=3", "checkpoint.every=3", timeout=240)
    assert trained.returncode == 0, trained.stderr[-3000:]
    run_dir = tmp_path / "runs" / "tiny"
    before = sorted((p.relative_to(run_dir), p.stat().st_mtime_ns) for p in run_dir.rglob("*"))

    result = run_module("dcgan.train", "--config", str(config), "--dry-run", "train.steps=3", timeout=120)
    assert result.returncode == 0, result.stderr
    step3 = (run_dir / "checkpoints" / "step_00000003.pt").resolve()
    assert f"resumes from : {step3} (step 3; train.resume=auto); already at train.steps=3" in result.stdout
    assert "(exists, 1 checkpoint(s))" in result.stdout
    assert "processes    : 1 (world size: WORLD_SIZE is not set)" in result.stdout
    # The sizes a user plans disk for: the estimate is within 5% of the checkpoint written.
    nets = re.search(
        r"nets +: G ([\d.]+)M and D ([\d.]+)M parameters; a checkpoint takes about ([\d.]+) MB", result.stdout
    )
    assert nets, result.stdout
    G, D = build_models(load_config(run_dir / "config.yaml"))
    assert (float(nets[1]), float(nets[2])) == tuple(
        round(sum(p.numel() for p in n.parameters()) / 1e6, 2) for n in (G, D)
    )
    assert abs(float(nets[3]) * 1e6 / step3.stat().st_size - 1) < 0.05
    assert sorted((p.relative_to(run_dir), p.stat().st_mtime_ns) for p in run_dir.rglob("*")) == before


def test_dry_run_rejects_missing_data(tmp_path, digit_shards):
    config = write_config(tmp_path / "tiny.yaml", digit_shards)
    missing = run_module("dcgan.train", "--config", str(config), "--dry-run", "data.shards=/nonexistent/shards")
    assert missing.returncode == 2 and missing.stdout == ""
    assert missing.stderr.strip() == (
        f"dcgan.train: config error: {config}: data.shards: /nonexistent/shards does not exist"
    )


# --------------------------------------------------------------------------- the launchers


# An option line of argparse's help: its invocation ("--nodes NODES", "-h, --help", a
# positional's name), then its help two or more spaces on, or on the lines below.
ENTRY = re.compile(r"^  (-\S+(?: \S+)?(?:, -\S+(?: \S+)?)*|[a-z][\w-]*)(?: {2,}(\S.*))?$")


def option_entries(help_text: str) -> dict[str, str]:
    """argparse's option list as {invocation: help}."""
    entries: dict[str, str] = {}
    current = None
    for line in help_text.splitlines():
        if found := ENTRY.match(line):
            current = found.group(1)
            entries[current] = found.group(2) or ""
        elif current is not None and line.startswith("    ") and line.strip():
            entries[current] = f"{entries[current]} {line.strip()}".strip()
        else:
            current = None
    return entries


@pytest.mark.parametrize("module", ["launch.submit", "launch.sweep"])
def test_every_launcher_flag_has_help_and_its_default(module):
    result = run_module(module, "--help", timeout=120)
    assert result.returncode == 0, result.stderr
    entries = option_entries(result.stdout)
    flags = {inv.split()[0].rstrip(","): (inv, text) for inv, text in entries.items() if inv.startswith("-")}
    for name in ("--nodes", "--gpus-per-node", "--time", "--partition", "--sbatch", "--signal-delay-s", "--folder"):
        assert name in flags, f"{name} missing from {module} --help"
    for inv, text in entries.items():
        meaning = re.sub(r"\((repeatable; )?default: [^)]*\)$", "", text).strip()
        assert meaning, f"{module}: {inv} has no help text"
        takes_value = " " in inv and not inv.startswith("-h")
        if takes_value and "(required)" not in text:
            assert re.search(r"\((repeatable; )?default: [^)]+\)$", text), f"{module}: {inv} does not show its default"
    assert "(default: 4:00:00)" in flags["--time"][1] and "(default: 120)" in flags["--signal-delay-s"][1]
    if module == "launch.sweep":
        assert "table below" not in result.stdout
        assert "A sweep file:" in result.stdout  # the format, in the help's epilog


@pytest.mark.parametrize("command", [["dcgan.generate"], ["dcgan.train"], ["dcgan.shards"], ["dcgan.shards", "index"]])
def test_every_command_flag_says_what_it_does(command):
    result = run_module(*command, "--help", timeout=120)
    assert result.returncode == 0, result.stderr
    missing = [inv for inv, text in option_entries(result.stdout).items() if not text]
    assert not missing, f"{' '.join(command)} --help: no text for {missing}"
    description = result.stdout.split("\n\n")[1]  # after the usage lines
    assert description.rstrip().endswith("."), f"{' '.join(command)} --help: {description!r}"


# --------------------------------------------------------------------------- dcgan.generate's arguments


@pytest.mark.parametrize(
    "args, says",
    [
        (["--seeds", "5-2"], "argument --seeds: seed range 5-2 runs backwards: write 2-5"),
        (["--seeds", "a"], "argument --seeds: 'a' in seed list 'a': seeds are whole numbers 0.."),
        (["--seeds=-3"], "argument --seeds: -3 in seed list '-3': seeds are 0 or more"),
        (["--seeds", ""], "argument --seeds: no seeds given: write them like 0-99, 3,7,11 or 0-9,20-29"),
        (["--seeds", "0-9,"], "argument --seeds: an empty item in seed list '0-9,'"),
        (["--seeds", "0-9", "-n", "4"], "--seeds names the images itself: leave out -n/--num"),
        (["--seeds", "0-9", "--seed", "1"], "--seeds names the images itself: leave out --seed"),
        (["--seeds", "0-9", "--interpolate", "4", "--strips", "2"], "--seeds names the images itself: leave out --strips"),
        (["--seeds", "3", "--interpolate", "4"], "--interpolate with --seeds walks from seed to seed: give at least 2"),
        (["--truncation", "0"], "argument --truncation: '0' is not a finite number > 0 (like 0.7)"),
        (["--truncation=-1"], "argument --truncation: '-1' is not a finite number > 0"),
        (["--truncation", "nan"], "argument --truncation: 'nan' is not a finite number > 0"),
        (["--truncation", "inf"], "argument --truncation: 'inf' is not a finite number > 0"),
        (["--truncation", "big"], "argument --truncation: 'big' is not a finite number > 0"),
    ],
)  # fmt: skip
def test_generate_refuses_bad_seeds_and_truncation_in_one_line(args, says, tmp_path, capsys):
    """Checked before the checkpoint is read: argparse's usage, then one error line, exit 2."""
    with pytest.raises(SystemExit) as stopped:
        generate_main(["--checkpoint", str(tmp_path / "none.pt"), *args])
    assert stopped.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"python -m dcgan.generate: error: {says}"), last


def test_generate_bad_seeds_exit_2_from_the_shell(tmp_path):
    result = run_module("dcgan.generate", "--checkpoint", str(tmp_path / "none.pt"), "--seeds", "5-2", timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines()[-1] == (
        "python -m dcgan.generate: error: argument --seeds: seed range 5-2 runs backwards: write 2-5"
    )


# --------------------------------------------------------------------------- torchrun's report


def test_a_failing_worker_traceback_is_torchruns_root_cause(tmp_path, digit_shards):
    """Rank 1 raises in its third step (tests/faults.py); rank 0 stops because of it. The
    workers catch the error to exit 1 (dcgan/base/exits.py), so torchrun learns the traceback
    only from the error file dcgan.run.failure writes: its report must name rank 1 as the
    root cause, with the original traceback."""
    config = write_config(tmp_path / "fails.yaml", digit_shards, train={"steps": 1000})
    env = {"DCGAN_FAULT": "step:1:3", "PYTHONPATH": str(REPO)}
    result = run_python("tests/faults.py", "--config", str(config), nproc=2, env=env, timeout=120)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Root Cause (first observed failure):" in result.stderr, result.stderr[-3000:]
    root = result.stderr.split("Root Cause (first observed failure):")[1].split("=====")[0]
    assert "rank      : 1 (local_rank: 1)" in root
    assert "exitcode  : 1 " in root  # the worker's exit code is still EXIT_FAILED
    assert "Traceback (most recent call last)" in root and "in failing_step" in root, root
    assert "RuntimeError: injected fault in gan_step at step 3" in root
    assert "To enable traceback" not in root


def test_error_file_for_torchrun(tmp_path, monkeypatch):
    """The failing rank's file holds its traceback; a rank stopped by it writes its line,
    dated after, so that it never shows as the root cause."""
    path = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(path))
    try:
        raise ValueError("the original error")
    except ValueError as e:
        failure.tell_torchrun("rank 1 failed (step 3): ValueError: the original error", e)
    root = json.loads(path.read_text())["message"]
    assert root["message"] == "ValueError: the original error"
    assert (
        "Traceback" in root["extraInfo"]["py_callstack"] and "the original error" in root["extraInfo"]["py_callstack"]
    )
    failure.tell_torchrun("stopping rank 0: rank 1 failed", consequence=True)
    after = json.loads(path.read_text())["message"]
    assert after["extraInfo"]["py_callstack"] == "stopping rank 0: rank 1 failed"
    assert int(after["extraInfo"]["timestamp"]) > int(root["extraInfo"]["timestamp"])
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE")
    path.unlink()
    failure.tell_torchrun("not under torchrun")
    assert not path.exists()
