"""A class-conditional checkpoint from Python and the commands: ``G.sample(labels=...)``,
``dcgan.generate --class``, and ``dcgan.eval``'s intra-class FID, on a real tiny
conditional run (``model.conditional=true``, the digit shards' 10 classes). The nets
themselves: tests/unit/test_conditional.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_api import generate, pngs

from conftest import run_module, write_config
from dcgan import load_generator
from dcgan.base.checks import ConfigError
from dcgan.base.images import save_grid, to_uint8_grid
from dcgan.eval import intra_class_count
from dcgan.eval import main as eval_main
from dcgan.generate import parse_args
from dcgan.models.networks import ModelConfig
from dcgan.quality.features import Classifier, HeldOut, save_classifier


@pytest.fixture(scope="module")
def cond_run(tmp_path_factory, digit_shards):
    """A 4-step conditional run on the digit shards (10 classes), checkpoints at 2 and 4."""
    tmp = tmp_path_factory.mktemp("conditional")
    config = write_config(
        tmp / "cond.yaml", digit_shards, train={"steps": 4}, checkpoint={"every": 2, "keep": 5},
        model={"conditional": True},
    )  # fmt: skip
    result = run_module("dcgan.train", "--config", str(config), "wandb.mode=disabled", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp / "runs" / "cond"


def test_sample_takes_a_class_one_per_image_or_draws_them_from_the_seed(cond_run):
    G = load_generator(cond_run)
    assert G.conditional and G.num_classes == 10 and "embed.weight" in G.state_dict()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    three = G.sample(8, seed=0, labels=3)
    assert three.dtype == torch.uint8 and three.shape == (8, 1, 28, 28)
    assert torch.equal(three, G.sample(8, seed=0, labels=3))  # seeded
    assert not torch.equal(three, G.sample(8, seed=0, labels=4))  # the same latents, another class
    each = torch.tensor([3, 4] * 4)
    mixed = G.sample(8, seed=0, labels=each)
    assert torch.equal(mixed[::2], three[::2]) and torch.equal(mixed, G.sample(8, seed=0, labels=each.tolist()))
    assert torch.equal(G.sample(8, seed=0, labels=np.int64(3)), three)
    assert torch.equal(G.sample(8, seed=0, labels=3, batch_size=3), three)  # eval mode: batching changes nothing

    drawn = G.labels(8, seed=0)  # no labels: uniform classes from the seed, not from the latents' generator
    assert torch.equal(G.sample(8, seed=0), G.sample(8, seed=0, labels=drawn)) and drawn.dtype == torch.int64
    assert torch.equal(drawn, G.labels(8, seed=0)) and not torch.equal(drawn, G.labels(8, seed=1))
    assert set(G.labels(200, seed=0).tolist()) == set(range(10))
    assert torch.equal(G.latents(8, seed=0), G.latents(8, seed=0))  # the classes leave the latents alone
    # Per seed: seed s's class, like its latent, whatever the other seeds; and sample(1, seed=s)'s.
    assert torch.equal(G.labels(seeds=[9, 5]), G.labels(seeds=range(10))[[9, 5]])
    assert torch.equal(G.sample(seeds=[5]), G.sample(1, seed=5))
    assert torch.equal(G.sample(seeds=[9, 5], labels=2), G.sample(seeds=range(10), labels=2)[[9, 5]])
    fresh = G.sample(8)
    assert torch.equal(G.sample(8, seed=G.last_seed), fresh)  # seed=None: one fresh seed for latents and classes
    assert torch.equal(torch.get_rng_state(), before)  # no draw from torch's global generator
    with torch.no_grad():
        assert G(G.latents(2, seed=0), torch.tensor([3, 3])).shape == (2, 1, 28, 28)


@pytest.mark.parametrize(
    "labels, message",
    [
        (10, r"class 10 is not one of this generator's 10 classes: labels lie in 0\.\.9"),
        (-1, r"class -1 is not one of"),
        ([1, 2, 3], "labels gives 3 classes for 8 images"),
        (2.0, r"labels must be class indices \(ints\), got 2.0"),
        (True, r"labels must be class indices \(ints\), got True"),
        ("3", r"labels must be class indices \(ints\), got '3'"),
        (torch.zeros(8), "labels must be class indices, got a torch.float32 tensor"),
    ],
)
def test_bad_labels_are_named_in_one_line(cond_run, labels, message):
    G = load_generator(cond_run)
    with pytest.raises(ValueError, match=message) as e:
        G.sample(8, seed=0, labels=labels)
    assert "\n" not in str(e.value)


def test_generate_class_k_writes_g_sample_labels_k(cond_run, tmp_path):
    generate(cond_run, tmp_path / "n", "-n", "5", "--seed", "2", "--class", "7")
    generate(cond_run, tmp_path / "s", "--seeds", "3,1", "--class", "7", "--truncation", "0.7", "--batch-size", "1")
    generate(cond_run, tmp_path / "r", "-n", "5", "--seed", "2")  # no --class: G.sample's random classes
    G = load_generator(cond_run)
    names = [f"{i:06d}.png" for i in range(5)]
    assert np.array_equal(pngs(tmp_path / "n", names), G.sample(5, seed=2, labels=7)[:, 0].numpy())
    assert np.array_equal(pngs(tmp_path / "r", names), G.sample(5, seed=2)[:, 0].numpy())
    seeded = G.sample(seeds=[3, 1], labels=7, truncation=0.7)[:, 0].numpy()
    assert np.array_equal(pngs(tmp_path / "s", ["seed0003.png", "seed0001.png"]), seeded)


def test_class_all_makes_a_row_per_class_each_with_the_same_latents(cond_run, tmp_path):
    generate(cond_run, tmp_path / "g", "--class", "all", "--grid", "-n", "3", "--seed", "1", "--interpolate", "4")
    G = load_generator(cond_run)
    z = G.latents(3, seed=1)
    with torch.no_grad():  # row k: class k; column j: latent j in every row
        rows = torch.cat([G(z, torch.full((3,), k)) for k in range(10)])
    save_grid(to_uint8_grid(rows, nrow=3), tmp_path / "expected.png")
    assert np.array_equal(pngs(tmp_path, ["g/grid.png"]), pngs(tmp_path, ["expected.png"]))
    walks = Image.open(tmp_path / "g" / "interpolation.png")  # the 4 default walks in each of the 10 classes
    factor = walks.size[0] // (2 + 4 * 30)
    assert walks.size == (factor * (2 + 4 * 30), factor * (2 + 10 * 4 * 30))

    generate(cond_run, tmp_path / "f", "--class", "all", "--seeds", "4,2")  # without --grid: a folder per class
    assert sorted(p.name for p in (tmp_path / "f").iterdir()) == [f"class{k}" for k in range(10)]
    assert sorted(p.name for p in (tmp_path / "f" / "class6").iterdir()) == ["seed0002.png", "seed0004.png"]
    six = G.sample(seeds=[4, 2], labels=6)[:, 0].numpy()
    assert np.array_equal(pngs(tmp_path / "f" / "class6", ["seed0004.png", "seed0002.png"]), six)


def test_a_class_the_model_lacks_is_refused_in_one_line(cond_run, tmp_path, capsys):
    """(An unconditional checkpoint's --class: tests/e2e/test_api.py.)"""
    result = run_module("dcgan.generate", "--checkpoint", str(cond_run), "--class", "10", "--out", str(tmp_path / "no"))
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == "python -m dcgan.generate: error: --class 10: the model has 10 classes, 0..9"
    assert not (tmp_path / "no").exists()
    for args, message in (
        (["--class", "all", "--nrow", "4"], "--class all makes one grid row per class"),
        (["--class", "two"], "argument --class: 'two' is not a class index (0, 1, ...) or all"),
    ):
        with pytest.raises(SystemExit) as e:
            parse_args(["--checkpoint", str(cond_run), *args])
        assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.fixture(scope="module")
def cond_features(tmp_path_factory, digit_shards):
    """A features file for the digit shards' 10 classes: an untrained classifier, recorded as
    accurate (its features are as good as any for checking what is scored against what)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("features") / "features.pt"
    held_out = HeldOut(0.9, 0.1, 500)
    save_classifier(path, Classifier(1, 28, 10).eval(), torch.randn(300, 128), held_out=held_out,
                    shards=str(digit_shards), classes=10)  # fmt: skip
    return path


def test_eval_reports_intra_class_fid_alone_and_under_torchrun(cond_run, cond_features, tmp_path):
    """Besides the scores over the class mix, each class's images against the real images
    of that class among the first --num-real; classes with under 2 of them are left out of
    the mean, and two ranks give what one does."""
    args = ["--checkpoint", str(cond_run), "--features", str(cond_features), "--num-samples", "60"]
    args += ["--num-real", "12", "--per-class", "6", "--batch-size", "4"]
    one = run_module("dcgan.eval", *args, "--out", str(tmp_path / "one.json"), timeout=300)
    assert one.returncode == 0, one.stderr
    two = run_module("dcgan.eval", *args, "--out", str(tmp_path / "two.json"), nproc=2, timeout=300)
    assert two.returncode == 0, two.stderr
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    intra = a["intra_class"]
    assert intra["generated"] == 6 and sum(intra["real"]) == 12 and len(intra["fid"]) == 10
    assert intra["skipped"] == [k for k in range(10) if intra["real"][k] < 2] != list(range(10))
    scored = [f for f in intra["fid"] if f is not None]
    assert len(scored) == 10 - len(intra["skipped"]) and all(math.isfinite(f) for f in scored)
    assert math.isfinite(a["fid"]) and a["intra_fid"] == pytest.approx(sum(scored) / len(scored))
    assert "by their class labels" in intra["real_split"] and "intra-class FID" in one.stderr
    assert "left out of the mean" in one.stderr
    assert (b["world_size"], b["intra_class"]["skipped"]) == (2, intra["skipped"])
    assert b["intra_fid"] == pytest.approx(a["intra_fid"], rel=1e-5)
    assert [f for f in b["intra_class"]["fid"] if f is not None] == pytest.approx(scored, rel=1e-5)


def test_intra_class_counts_that_cannot_work_are_one_line(cond_run, cond_features, capsys):
    base = ["--checkpoint", str(cond_run), "--features", str(cond_features)]
    assert eval_main([*base, "--per-class", "1"]) == 2
    assert "--per-class: the intra-class FID needs 2 or more images a class, got 1" in capsys.readouterr().err
    assert eval_main([*base, "--num-samples", "15"]) == 2  # 15 // 10 classes
    assert "got 1 (--num-samples 15 over 10 classes)" in capsys.readouterr().err
    model = ModelConfig(arch="kmnist", image_size=28, channels=1)
    with pytest.raises(ConfigError, match="--per-class: x.pt holds an unconditional model"):
        intra_class_count(5, 100, model, "shards", Path("x.pt"))
    assert intra_class_count(None, 100, model, "shards", Path("x.pt")) == 0
