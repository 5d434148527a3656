"""Bad configs are rejected before any work, naming the key and the file; good ones load."""

import re
from pathlib import Path

import pytest
import torch

from conftest import REPO, run_module, write_config
from dcgan.base.checks import ConfigError
from dcgan.config.loading import load_config


def test_overrides_are_typed(tmp_path):
    cfg = load_config(REPO / "configs/pumpkins.yaml", ["optim.g.lr=1e-3", "train.steps=7", "data.augment.hflip=false",
                                                       "optim.d.betas=[0.0, 0.9]", "train.name=x",
                                                       "train.stop_signals=[SIGUSR2]", "model.ema_decay=0"])  # fmt: skip
    assert cfg.optim.g.lr == 1e-3 and isinstance(cfg.optim.g.lr, float)
    assert cfg.train.steps == 7 and cfg.data.augment.hflip is False
    assert cfg.optim.d.betas == (0.0, 0.9)
    assert cfg.data.augment.translate == (0.05, 0.025)  # untouched keys keep the file's values
    assert cfg.run_dir == Path("runs/x")
    assert cfg.train.stop_signals == ["SIGUSR2"] and cfg.model.ema_decay == 0.0
    assert load_config(REPO / "configs/pumpkins.yaml").train.name == "pumpkins"  # default: the file's stem


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["train.stepz=3"], "train.stepz: unknown key"),
        (["train.steps=many"], "train.steps: expected an integer"),
        (["train.steps=0"], "train.steps: must be >= 1"),
        (["train.precision=fp8"], "train.precision: 'fp8' is not one of"),
        (["model.image_size=32"], "model.image_size: arch 'kmnist' makes 28x28"),
        (["model.arch=resnet"], "model.arch: 'resnet' is not one of"),
        (["optim.g.betas=[0.5]"], "optim.g.betas: expected a list of 2"),
        (["data.augment.scale=[1.2, 1.0]"], "data.augment.scale: needs 0 < lo <= hi"),
        (["train.sync_bn=yes please"], "train.sync_bn: expected true or false"),
        (["train.steps"], "not of the form a.b=value"),
        (["train.stop_signals=[SIGKILL]"], "train.stop_signals: 'SIGKILL' is not a signal name a process can catch"),
        (["train.stop_signals=SIGTERM"], "train.stop_signals: expected a list"),
        (["model.ema_decay=1"], "model.ema_decay: must lie in [0, 1)"),
        (["data.cache_max_gb=lots"], "data.cache_max_gb: expected float|auto, got 'lots'"),
        (["data.cache_max_gb=-1"], "data.cache_max_gb: must be >= 0 and finite, or auto"),
        # numbers that would only fail later (issue 27): finite and in range before the start
        (["data.augment.degrees=.inf"], "data.augment.degrees: must lie in [0, 180], not inf"),
        (["data.augment.shear=.inf"], "data.augment.shear: must lie in [0, 90), not inf"),
        (["data.augment.shear=90"], "data.augment.shear: must lie in [0, 90)"),
        (["data.augment.scale=[1.0, .inf]"], "data.augment.scale: must be finite numbers"),
        (["data.augment.degrees=.nan"], "data.augment.degrees: must lie in [0, 180], not nan"),
        (["optim.g.lr=.inf"], "optim.g.lr: must be > 0 and finite, not inf"),
        (["optim.d.lr=.nan"], "optim.d.lr: must be > 0 and finite, not nan"),
        (["optim.d.betas=[.nan, 0.9]"], "optim.d.betas: must lie in [0, 1)"),
        (["optim.g.weight_decay=.inf"], "optim.g.weight_decay: must be >= 0 and finite"),
        (["train.seed=-1"], "train.seed: must lie in 0..2**63-1, not -1"),
        (["train.seed=9223372036854775808"], "train.seed: must lie in 0..2**63-1"),
        (["eval.seed=-1"], "eval.seed: must lie in 0..2**63-1"),
        (["wandb.init_timeout=.inf"], "wandb.init_timeout: must be > 0 and finite"),
        (["data.cache_max_gb=.inf"], "data.cache_max_gb: must be >= 0 and finite, or auto"),
        # stop signals the trainer itself receives would stop every attempt
        (["train.stop_signals=[SIGCHLD]"], "train.stop_signals: SIGCHLD reaches the trainer while it works"),
        (["train.stop_signals=[SIGTERM, SIGWINCH]"], "train.stop_signals: SIGWINCH reaches the trainer"),
        (["train.stop_signals=[SIGPIPE]"], "train.stop_signals: SIGPIPE reaches the trainer"),
        (["train.stop_signals=[SIGSEGV]"], "train.stop_signals: SIGSEGV means the process itself failed"),
        # a run name is one folder inside out_dir
        (["train.name=."], "train.name: '.' is not a folder name"),
        (["train.name=.."], "train.name: '..' is not a folder name"),
        (["train.name=a/b"], "train.name: 'a/b' must be one folder name"),
        ([f"train.name={'x' * 256}"], "train.name: must fit a file name: at most 255 bytes"),
        # finite, yet every image blank: a zoom float32 holds as 0 or inf, or one under a pixel
        (["data.augment.scale=[1e-50, 1e-50]"], "data.augment.scale: each bound must lie in [0.01, 100]"),
        (["data.augment.scale=[1.0, 1e39]"], "data.augment.scale: each bound must lie in [0.01, 100]"),
        # wandb refuses these at its start, and the run would go on without W&B
        ([f"wandb.project={'p' * 129}"], "wandb.project: W&B project names have at most 128 characters, not 129"),
        (["train.stop_signals=[SIGTTOU]"], "train.stop_signals: SIGTTOU reaches the trainer"),
        # a path with a NUL in it was a traceback in start-up
        ([r'train.out_dir="runs\0x"'], "train.out_dir: 'runs\\x00x' is not a path: it holds a NUL character"),
        ([r'train.resume="a\0b"'], "train.resume: 'a\\x00b' is not a path"),
        ([r'data.shards="a\0b"'], "data.shards: 'a\\x00b' is not a path"),
        ([r'eval.features="a\0b"'], "eval.features: 'a\\x00b' is not a path"),
        ([r'eval.inception="a\0b"'], "eval.inception: 'a\\x00b' is not a path"),
    ],
)
def test_bad_overrides_name_the_override_and_key(overrides, key):
    with pytest.raises(ConfigError) as err:
        load_config(REPO / "configs/fashion-mnist.yaml", overrides)
    assert key in str(err.value)
    assert str(err.value).startswith(f"override {overrides[0]!r}")  # not the config file, which is fine


def test_bad_values_in_the_file_name_the_file(tmp_path):
    config = tmp_path / "typo.yaml"
    config.write_text("train:\n  stpes: 3\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(config))}: train.stpes: unknown key"):
        load_config(config, ["train.steps=4"])


def test_a_config_file_named_dot_needs_a_run_name(tmp_path):
    config = tmp_path / "..yaml"  # its stem, the default run name, is "."
    config.write_text("train: {steps: 2}\n")
    with pytest.raises(ConfigError, match=r"train.name: '.' is not a folder name .*set train.name"):
        load_config(config)
    assert load_config(config, ["train.name=ok"]).run_dir == Path("runs/ok")


@pytest.mark.e2e  # starts processes
def test_the_largest_seed_trains(tmp_path, digit_shards):
    config = write_config(tmp_path / "seed.yaml", digit_shards, train={"steps": 1, "seed": 2**63 - 1})
    result = run_module("dcgan.train", "--config", str(config), timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize("value, read", [("auto", "auto"), ("3.5", 3.5), ("2", 2.0)])
def test_cache_max_gb_is_a_number_or_auto(value, read):
    got = load_config(REPO / "configs/fashion-mnist.yaml", [f"data.cache_max_gb={value}"]).data.cache_max_gb
    assert got == read and type(got) is type(read)


def test_yaml_is_loaded_safely(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.yaml"
    evil.write_text(f"train: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(evil)
    assert not marker.exists()


@pytest.mark.parametrize(
    "text, problem",
    [
        ("train: {steps: 2\n", "line 2, column 1: expected ',' or '}', but got '<stream end>' (while parsing a flow mapping)"),
        ("train:\n  name: a\x07b\n", "line 2: character U+0007 is not allowed"),
    ],
)  # fmt: skip
def test_a_config_yaml_cannot_read_is_one_line_with_its_place(tmp_path, text, problem):
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(config)
    assert str(err.value) == f"{config}: not valid YAML: {problem}"


def test_wrong_type_in_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  ngf: sixty-four\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: model.ngf: expected an integer"):
        load_config(path)


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.shards=/nonexistent/shards", "data.shards: /nonexistent/shards does not exist"),
        ("data.shards=/nonexistent/s-{0..3}.tar", "data.shards: shard /nonexistent/s-0.tar does not exist"),
        ("train.batch_size=100000", "train.batch_size: 512 samples cannot fill one batch"),
        ("model.ngf=-1", "model.ngf: must be >= 1"),
        ("d_augment.policy=color,zoom", "d_augment.policy: 'zoom' is not one of color, translation, cutout"),
        ("d_augment.p=2", "d_augment.p: must lie in [0, 1] or be ada, not 2"),
        ("d_augment.ada_interval=-4", "d_augment.ada_interval: must be >= 1"),
        pytest.param(
            "train.device=cuda",
            "train.device: 'cuda', but torch sees no CUDA device",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present"),
        ),
    ],
)
@pytest.mark.e2e  # starts processes
def test_cli_rejects_bad_config_with_exit_2(tmp_path, digit_shards, override, message):
    config = write_config(tmp_path / "tiny.yaml", digit_shards)
    result = run_module("dcgan.train", "--config", str(config), override, timeout=120)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert str(config) in result.stderr or f"override {override!r}" in result.stderr  # where it was set
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()  # nothing was started


@pytest.mark.e2e  # starts processes
def test_missing_shard_file_is_named(tmp_path, digit_shards):
    config = write_config(tmp_path / "tiny.yaml", digit_shards)
    pattern = f"{digit_shards}/shard-{{000000..000009}}.tar"  # only 6 of these exist
    result = run_module("dcgan.train", "--config", str(config), f"data.shards={pattern}", timeout=120)
    assert result.returncode == 2
    assert f"data.shards: shard {digit_shards}/shard-000006.tar does not exist" in result.stderr


@pytest.mark.parametrize("name", ["pumpkins", "pokemon"])
def test_the_commented_d_augment_line_of_a_small_set_config_turns_it_on(tmp_path, name):
    # The reference setups keep their write-ups' settings; their header shows the one line
    # that turns d_augment on. Uncommented, it must load and switch it on.
    text = (REPO / f"configs/{name}.yaml").read_text()
    assert "\nd_augment:" not in text  # off as the write-up has it
    on = tmp_path / f"{name}.yaml"
    on.write_text(text.replace("\n# d_augment:", "\nd_augment:"))
    assert load_config(on).d_augment.on and not load_config(REPO / f"configs/{name}.yaml").d_augment.on
