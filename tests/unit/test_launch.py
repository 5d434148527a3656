"""The launchers without Slurm: options and sweep files checked before anything is
submitted, sweep expansion, and launch.submit end to end on submitit's local executor
(the same job code as on Slurm, two real processes)."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import yaml

from conftest import REPO, run_module, write_config
from dcgan.base.checks import ConfigError
from dcgan.config.loading import load_config, save_config
from dcgan.config.sections import Config
from launch.options import SlurmOptions, add_arguments, from_arguments, time_minutes
from launch.status import sweep_status
from launch.sweep import cli, load_sweep, write_summary


@pytest.mark.parametrize(
    "text, minutes",
    [("90", 90), ("30:30", 31), ("4:00:00", 240), ("1-0", 1440), ("1-2:30", 1590), ("2-00:00:01", 2881)],
)
def test_slurm_time_formats(text, minutes):
    assert time_minutes(text) == minutes


def parse(*argv: str, base=None) -> SlurmOptions:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return from_arguments(parser.parse_args(argv), base=base, where="sweep.yaml" if base else "")


def test_options_from_flags_and_a_sweep_section():
    opts = parse(
        "--nodes", "2", "--gpus-per-node", "8", "--time", "4:00:00", "--sbatch", "exclusive", "--sbatch", "comment=x"
    )
    assert (opts.nodes, opts.tasks, opts.world_size, opts.timeout_min) == (2, 8, 16, 240)
    assert opts.sbatch == ["exclusive", "comment=x"]
    cpu = parse("--tasks-per-node", "4", base={"nodes": 3, "time": "1:00:00"})
    assert (cpu.world_size, cpu.timeout_min) == (12, 60)  # flags override the sweep file's section


@pytest.mark.parametrize(
    "argv, message",
    [
        (("--nodes", "0"), "slurm.nodes: must be >= 1"),
        (("--time", "soon"), "slurm.time: 'soon' is not a time limit"),
        (("--time", "1", "--signal-delay-s", "120"), "slurm.signal_delay_s: 120 s is longer than the time limit 1"),
        (("--cluster", "local", "--nodes", "2"), "slurm.nodes: the local executor runs one node"),
        (("--sbatch=--exclusive",), "slurm.sbatch: '--exclusive' is not key=value"),
        (("--gpus-per-node", "two"), "slurm.gpus_per_node: expected an integer"),
    ],
)
def test_bad_options_are_named(argv, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse(*argv)


def write_sweep(tmp_path, digit_shards, body: str):
    base = write_config(tmp_path / "base.yaml", digit_shards)
    path = tmp_path / "s.yaml"
    path.write_text(f"base: {base}\n" + body)
    return path


def test_sweep_is_a_grid_times_seeded_random_draws(tmp_path, digit_shards):
    path = write_sweep(
        tmp_path, digit_shards,
        "set: {train.steps: 9}\ngrid:\n  optim.g.betas: [[0.5, 0.999], [0.0, 0.99]]\n"
        "random:\n  samples: 3\n  seed: 7\n  params:\n"
        "    optim.d.lr: {log_uniform: [1.0e-5, 1.0e-3]}\n    train.batch_size: {choice: [8, 16]}\n",
    )  # fmt: skip
    sweep = load_sweep(path)
    assert len(sweep.runs) == 6 and sweep.name == "s"
    assert all(r.cfg.train.steps == 9 and r.cfg.wandb.group == "s" for r in sweep.runs)
    assert [r.cfg.optim.g.betas for r in sweep.runs] == [(0.5, 0.999)] * 3 + [(0.0, 0.99)] * 3
    lrs = [r.cfg.optim.d.lr for r in sweep.runs]
    assert all(1e-5 <= lr <= 1e-3 for lr in lrs) and len(set(lrs[:3])) == 3
    assert {r.cfg.train.batch_size for r in sweep.runs} <= {8, 16}
    # run names: index + hash of the settings, the same on every load (resubmission finds them)
    assert [r.name for r in load_sweep(path).runs] == [r.name for r in sweep.runs]
    assert len({r.cfg.run_dir for r in sweep.runs}) == 6
    assert all(r.cfg.run_dir.parent == tmp_path / "runs" / "s" for r in sweep.runs)


@pytest.mark.parametrize(
    "body, message",
    [
        ("grid:\n  train.stepz: [1]\n", "run 0 (train.stepz=1): override 'train.stepz=1': train.stepz: unknown key"),
        (
            "grid:\n  train.steps: [10, -1]\n",
            "run 1 (train.steps=-1): override 'train.steps=-1': train.steps: must be >= 1",
        ),
        ("grid:\n  train.steps: 10\n", "grid.train.steps: expected a non-empty list"),
        ("grids: {}\n", "grids: unknown key"),
        ("random:\n  params:\n    optim.g.lr: {normal: [0, 1]}\n", "random.params.optim.g.lr: expected one of"),
        ("random:\n  params:\n    optim.g.lr: {log_uniform: [0, 1]}\n", "log_uniform: needs 0 < low <= high"),
    ],
)
def test_bad_sweep_files_are_rejected_naming_the_key(tmp_path, digit_shards, body, message):
    path = write_sweep(tmp_path, digit_shards, body)
    with pytest.raises(ConfigError, match=".*".join(map(re.escape, message.split("*")))) as err:
        load_sweep(path)
    assert str(err.value).startswith(str(path))


@pytest.mark.e2e  # starts processes
def test_submit_rejects_a_bad_config_before_submitting(tmp_path, digit_shards):
    config = write_config(tmp_path / "bad.yaml", digit_shards, train={"batch_size": 1000})
    out = run_module("launch.submit", "--config", str(config), "--nodes", "2", "--tasks-per-node", "4", timeout=120)
    assert out.returncode == 2
    assert "launch.submit:" in out.stderr and "8 processes" in out.stderr and "batch" in out.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.e2e  # starts processes
def test_submit_on_the_local_executor_trains_two_ranks(tmp_path, digit_shards):
    config = write_config(tmp_path / "local.yaml", digit_shards, train={"steps": 6})
    out = run_module(
        "launch.submit", "--config", str(config), "--cluster", "local", "--tasks-per-node", "2", "--wait", timeout=240
    )
    assert out.returncode == 0, out.stdout + out.stderr
    run_dir = tmp_path / "runs" / "local"
    assert "'step': 6" in out.stdout and f"run folder : {run_dir}" in out.stdout
    assert "2 process(es)" in (run_dir / "train.log").read_text()
    assert len(list((run_dir / "slurm").glob("*_result.pkl"))) == 2  # one result per task


def refusing_sbatch(tmp_path) -> dict:
    """An environment whose ``sbatch`` fails as a Slurm client without a controller does."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "sbatch"
    fake.write_text(
        "#!/bin/sh\necho 'sbatch: error: Batch job submission failed: Unable to contact slurm controller "
        "(connect failure)' >&2\nexit 1\n"
    )
    fake.chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}"}


def files_under(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("launcher", ["launch.submit", "launch.sweep"])
@pytest.mark.e2e  # starts processes
def test_a_refused_submission_is_one_line_exit_1_and_leaves_no_files(tmp_path, digit_shards, launcher):
    """sbatch that cannot reach a controller: one line with its error (no submitit
    traceback), exit 1 (dcgan/base/exits.py: failed; not 2, the input was fine), and none of the
    files the attempt wrote (job pickles, sbatch script) nor the folders it made; an earlier
    submission's files (task logs, results, sweep.json) stay as they were."""
    env = refusing_sbatch(tmp_path)
    config = write_config(tmp_path / "c.yaml", digit_shards)
    if launcher == "launch.submit":
        argv = ["--config", str(config), "--tasks-per-node", "1"]
        job_folder = tmp_path / "runs" / "c" / "slurm"
    else:
        sweep = tmp_path / "lr.yaml"
        sweep.write_text(f"base: {config}\ngrid:\n  optim.g.lr: [1.0e-4, 2.0e-4]\n")
        argv = [str(sweep), "--tasks-per-node", "1"]
        job_folder = tmp_path / "runs" / "lr" / "slurm"
    what = "the job" if launcher == "launch.submit" else "the job array"
    line = f"{launcher}: sbatch refused {what}: Batch job submission failed: Unable to contact slurm controller"

    out = run_module(launcher, *argv, env=env, timeout=120)
    assert (out.returncode, out.stderr) == (1, f"{line} (connect failure)\n"), out.stderr
    assert not (tmp_path / "runs").exists()  # the run (or sweep) folder was made for this attempt only

    # a folder an earlier submission used: its files stay, nothing is added
    job_folder.mkdir(parents=True)
    (job_folder / "1234_0_log.out").write_text("earlier task log\n")
    (job_folder / "1234_submitted.pkl").write_bytes(b"earlier job")
    (job_folder / f"{'ab' * 16}.pkl").write_bytes(b"another attempt's")
    if launcher == "launch.sweep":
        write_summary(load_sweep(sweep))
    before = files_under(tmp_path / "runs")
    out = run_module(launcher, *argv, env=env, timeout=120)
    assert (out.returncode, out.stderr.count("\n"), "Traceback" in out.stderr) == (1, 1, False), out.stderr
    assert out.stderr.startswith(line)
    assert files_under(tmp_path / "runs") == before


@pytest.mark.e2e  # starts processes
def test_submitting_without_a_slurm_client_is_one_line(tmp_path, digit_shards):
    config = write_config(tmp_path / "c.yaml", digit_shards)
    (tmp_path / "bin").mkdir()  # a PATH with no sbatch or srun
    out = run_module("launch.submit", "--config", str(config), env={"PATH": str(tmp_path / "bin")}, timeout=120)
    assert (out.returncode, out.stderr) == (
        1,
        "launch.submit: no Slurm client here (sbatch and srun not on PATH): submit from a login node of the "
        "cluster, or run the job on this machine with --cluster local\n",
    )
    assert not (tmp_path / "runs").exists()


@pytest.mark.e2e  # starts processes
def test_a_finished_run_is_not_submitted_again(tmp_path, digit_shards):
    config = write_config(tmp_path / "c.yaml", digit_shards, train={"steps": 2})
    assert run_module("dcgan.train", "--config", str(config), timeout=240).returncode == 0
    (tmp_path / "bin").mkdir()  # no Slurm client: a submission would fail
    out = run_module("launch.submit", "--config", str(config), env={"PATH": str(tmp_path / "bin")}, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("launch.submit: nothing submitted: run c has nothing to train")
    assert "train.steps=N (N > 2)" in out.stdout
    assert not (tmp_path / "runs" / "c" / "slurm").exists()


# --------------------------------------------------------------------------- sweeps own their runs


def sweep_on(tmp_path, digit_shards, folder: str, base_settings: dict, grid: str = "[1.0e-4, 2.0e-4]"):
    """A sweep file ``<folder>/lr.yaml`` on its own base config, its runs under tmp_path/runs."""
    (tmp_path / folder).mkdir()
    base = write_config(tmp_path / folder / "base.yaml", digit_shards, train={"out_dir": str(tmp_path / "runs")},
                        **base_settings)  # fmt: skip
    path = tmp_path / folder / "lr.yaml"
    path.write_text(f"base: {base}\ngrid:\n  optim.g.lr: {grid}\n")
    return path


def test_two_sweeps_with_one_name_never_share_a_run_folder(tmp_path, digit_shards, capsys):
    a = sweep_on(tmp_path, digit_shards, "a", {"model": {"ngf": 8}})
    b = sweep_on(tmp_path, digit_shards, "b", {"model": {"ngf": 16}})  # another base, the same file stem
    runs_a, runs_b = load_sweep(a), load_sweep(b)
    assert runs_a.folder == runs_b.folder  # one sweep folder: runs/lr
    assert not {r.name for r in runs_a.runs} & {r.name for r in runs_b.runs}  # but no run folder in common

    # a comment in the base config is not another base: the same run folders
    (tmp_path / "a" / "base.yaml").write_text("# tuned\n" + (tmp_path / "a" / "base.yaml").read_text())
    assert [r.name for r in load_sweep(a).runs] == [r.name for r in runs_a.runs]

    write_summary(runs_a)  # sweep a was submitted: the folder is a's
    for argv in (["status", str(b), "--no-slurm"], [str(b), "--dry-run"]):
        assert cli(argv) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and f"holds the runs of another sweep, {a.resolve()}" in err
    assert cli(["status", str(a), "--no-slurm"]) == 0 and cli([str(a), "--dry-run"]) == 0


def test_run_names_stay_when_the_code_adds_a_setting_or_changes_a_default(tmp_path, digit_shards, monkeypatch):
    """Resubmitting a sweep after a `git pull` carries on its runs: their folders are named
    by what the sweep and base files set, not by what the code fills in."""
    path = sweep_on(tmp_path, digit_shards, "a", {})
    names = [r.name for r in load_sweep(path).runs]
    base = tmp_path / "a" / "base.yaml"  # the same settings in another order, with a comment: the same runs
    settings = yaml.safe_load(base.read_text())
    base.write_text("# tuned\n" + yaml.safe_dump(dict(reversed(settings.items())), sort_keys=False))
    assert [r.name for r in load_sweep(path).runs] == names
    this_code = Config.to_dict

    def later_code(cfg):  # a later version of dcgan.config.sections: one setting more, another default
        settings = this_code(cfg)
        settings["train"]["a_new_setting"] = True
        settings["optim"]["label_smoothing"] = 0.05  # the base does not set it
        return settings

    monkeypatch.setattr(Config, "to_dict", later_code)
    assert [r.name for r in load_sweep(path).runs] == names


def test_a_run_folder_of_the_earlier_naming_is_resumed_by_its_own_sweep_only(tmp_path, digit_shards):
    """The earlier launch.sweep named a run r<index>-<hash of its overrides>: sweep b, on
    another base, had the same name as sweep a's finished run. After the update a's runs
    carry on in their folders, and b never takes a's run as its own."""
    a = sweep_on(tmp_path, digit_shards, "a", {"model": {"ngf": 8}})
    b = sweep_on(tmp_path, digit_shards, "b", {"model": {"ngf": 16}})  # another base, the same file stem
    own = ["optim.g.lr=0.0001"]  # run 0's override in both
    old_name = "r000-" + hashlib.sha256("\n".join(sorted(own)).encode()).hexdigest()[:8]
    folder = tmp_path / "runs" / "lr"
    cfg = load_config(str(tmp_path / "a" / "base.yaml"), [*own, f"train.name={old_name}",
                                                          f"train.out_dir={folder}", "wandb.group=lr"])  # fmt: skip
    cfg.run_dir.mkdir(parents=True)
    save_config(cfg, cfg.run_dir / "config.yaml")  # as a's trainer wrote it
    (cfg.run_dir / "summary.json").write_text(json.dumps({"status": "done", "exit_code": 0, "step": 6}))
    (cfg.run_dir / "metrics.jsonl").write_text(json.dumps({"step": 6, "loss_d": 1.25, "loss_g": 0.75}) + "\n")

    assert load_sweep(a).runs[0].name == old_name  # resubmitted, a's run 0 resumes in its folder
    assert load_sweep(b).runs[0].name != old_name
    run_a = next(r for r in sweep_status(a, use_slurm=False).runs if r.index == 0)
    run_b = next(r for r in sweep_status(b, use_slurm=False).runs if r.index == 0)
    assert (run_a.name, run_a.state, run_a.step, run_a.loss_d) == (old_name, "done", 6, 1.25)
    assert (run_b.state, run_b.step, run_b.loss_d) == ("not submitted", None, None)


def test_a_moved_sweep_file_still_owns_its_folder(tmp_path, digit_shards, capsys):
    """Another clone or mount of the same sweep file is not another sweep."""
    path = sweep_on(tmp_path, digit_shards, "a", {})
    write_summary(load_sweep(path))  # submitted from here
    moved = tmp_path / "clone" / "lr.yaml"
    moved.parent.mkdir()
    moved.write_text(path.read_text())
    assert cli(["status", str(moved), "--no-slurm"]) == 0 and cli([str(moved), "--dry-run"]) == 0
    assert "another sweep" not in capsys.readouterr().err


def test_a_sweep_file_that_is_not_utf8_is_one_line(tmp_path, digit_shards, capsys):
    path = sweep_on(tmp_path, digit_shards, "s", {})
    path.write_bytes(path.read_bytes() + "# r\u00e9glage\n".encode("latin-1"))
    for argv in (["status", str(path)], [str(path), "--dry-run"]):
        assert cli(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"launch.sweep: {path}: not UTF-8 text (byte 0xe9 on line 4); save it as UTF-8"


@pytest.mark.parametrize(
    "command", [["status", "{sweep}", "--no-slurm", "--csv", "{csv}"], ["{sweep}", "--dry-run"], ["status", "--help"]]
)
@pytest.mark.e2e  # starts processes
def test_a_table_into_a_closed_pipe_ends_quietly(tmp_path, digit_shards, command):
    """`launch.sweep status SWEEP | head -1`: no traceback, exit 1, like Unix tools. A user's
    shell has no PYTHONUNBUFFERED, so a short table sits in stdout's buffer until Python
    flushes it on the way out, after any handler of the print would have run."""
    path = sweep_on(tmp_path, digit_shards, "s", {})
    csv_path = tmp_path / "status.csv"
    argv = [sys.executable, "-m", "launch.sweep", *(a.format(sweep=path, csv=csv_path) for a in command)]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the table comes, as `| head -1` once it has its line
    stderr = proc.stderr.read().decode()
    assert (proc.wait(timeout=120), stderr) == (1, "")
    if "--csv" in command:
        assert csv_path.exists()  # written before the table


# --------------------------------------------------------------------------- scripts/test.sh


@pytest.mark.parametrize(
    "args",
    [["tests/e2e/test_cli.py"], ["tests/e2e/test_cli.py::test_help", "-x"], ["tests", "-q"], ["-k", "data", "-x"], []],
)
@pytest.mark.e2e  # starts processes
def test_test_sh_hands_its_arguments_to_pytest_as_given(tmp_path, args):
    """`bash scripts/test.sh tests/e2e/test_cli.py` runs that file only: the script adds no
    `tests` of its own (with it, pytest ran the whole suite and the file twice). The real
    script runs, with its set-up stubbed (a fake `python` that notes what it is asked)."""
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "test.sh", repo / "scripts" / "test.sh")
    (repo / "scripts" / "setup.sh").write_text("PYTHON=python\n")  # the real one installs the .venv
    img2dataset = repo / ".venv-img2dataset" / "bin" / "img2dataset"
    img2dataset.parent.mkdir(parents=True)
    img2dataset.write_text("#!/bin/sh\n")
    img2dataset.chmod(0o755)
    (tmp_path / "bin").mkdir()
    calls = tmp_path / "calls"
    fake = tmp_path / "bin" / "python"
    fake.write_text(f"#!/bin/sh\nprintf '%s|' \"$@\" >> {calls}\necho >> {calls}\n")
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"}
    done = subprocess.run(["bash", str(repo / "scripts" / "test.sh"), *args], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    pytest_call = calls.read_text().splitlines()[-1]
    assert pytest_call == "|".join(["-m", "pytest", *args]) + "|"


@pytest.mark.e2e  # starts processes
def test_pytest_without_a_path_runs_the_whole_suite_and_with_one_only_that():
    """What scripts/test.sh relies on: from the repository root, pytest with no test path
    among its arguments collects pyproject.toml's testpaths (tests/), and with one only that."""

    def collected(*args: str) -> set[str]:
        out = subprocess.run(
            [sys.executable, "-m", "pytest", "--co", "-q", "-p", "no:cacheprovider", *args],
            cwd=REPO, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        return {line.split("::")[0] for line in out.stdout.splitlines() if "::" in line}

    assert collected("-k", "test_slurm_time_formats or test_state_rules") == {
        "tests/unit/test_launch.py",
        "tests/unit/test_sweep_status.py",
    }
    assert collected("tests/unit/test_launch.py::test_slurm_time_formats") == {"tests/unit/test_launch.py"}
