"""The Python API: ``from dcgan import load_generator`` on a real tiny run's checkpoints."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, run_module, write_config
from dcgan import load_generator
from dcgan.base.images import save_grid, to_uint8_grid
from dcgan.checkpoint import files as checkpoint
from dcgan.checkpoint.inference import Generator
from dcgan.config.sections import Config


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, digit_shards):
    """A 4-step run with checkpoints at steps 2 and 4 (EMA generator on, the default)."""
    tmp = tmp_path_factory.mktemp("api")
    config = write_config(tmp / "api.yaml", digit_shards, train={"steps": 4}, checkpoint={"every": 2, "keep": 5})
    result = run_module("dcgan.train", "--config", str(config), "wandb.mode=disabled", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp / "runs" / "api"


def same_weights(module: torch.nn.Module, tensors: dict) -> bool:
    state = module.state_dict()
    return state.keys() == tensors.keys() and all(torch.equal(state[k], tensors[k]) for k in tensors)


def test_load_by_run_folder_or_file_ema_by_default(tiny_run):
    newest = tiny_run / "checkpoints" / "step_00000004.pt"
    by_folder, by_file = load_generator(tiny_run), load_generator(str(newest))
    assert isinstance(by_folder, Generator) and by_folder.path == newest and by_file.path == newest
    sd = torch.load(newest, map_location="cpu", weights_only=True)
    assert same_weights(by_folder, sd["generator_ema"]) and same_weights(by_file, sd["generator_ema"])
    assert by_folder.weights == "ema" and by_folder.step == 4 and not by_folder.training
    assert all(p.device.type == "cpu" for p in by_folder.parameters())
    assert isinstance(by_folder.config, Config) and by_folder.config.model.nz == 16 and by_folder.nz == 16
    assert by_folder.config.train.name == "api" and by_folder.model_config.arch == "kmnist"

    raw = load_generator(tiny_run, weights="raw")
    assert raw.weights == "raw" and same_weights(raw, sd["generator"])
    assert not same_weights(raw, sd["generator_ema"])  # the two really differ after 4 steps

    z = torch.randn(3, 16, 1, 1)
    with torch.no_grad():
        out = by_folder(z)  # G(z) still works: images in [-1, 1]
    assert out.shape == (3, 1, 28, 28) and out.abs().max() <= 1
    assert isinstance(by_folder[:3], torch.nn.Sequential) and not isinstance(by_folder[:3], Generator)


def test_a_run_folder_means_its_best_checkpoint_when_it_has_one(tiny_run, tmp_path, caplog):
    run = tmp_path / "api"
    shutil.copytree(tiny_run, run)
    ckpts = run / "checkpoints"
    for suffix in ("", ".json"):  # best.pt as evaluation writes it: a full state with its record
        shutil.copy(ckpts / f"step_00000002.pt{suffix}", ckpts / f"best.pt{suffix}")
    G = load_generator(run)
    assert G.path == ckpts / "best.pt" and G.step == 2
    assert load_generator(run, best=False).step == 4

    with open(ckpts / "best.pt", "r+b") as f:  # damaged: the newest valid one, with a warning
        f.truncate(1000)
    with caplog.at_level(logging.WARNING, logger="dcgan.checkpoint.files"):
        assert load_generator(run).step == 4
    assert "best.pt" in caplog.text and "newest valid" in caplog.text


def test_sample_is_seeded_uint8_and_leaves_the_global_rng_alone(tiny_run):
    G = load_generator(tiny_run)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a, again, other = G.sample(8, seed=1), G.sample(8, seed=1), G.sample(8, seed=2)
    fresh, fresh2 = G.sample(8), G.sample(8)
    assert torch.equal(torch.get_rng_state(), before)  # no draw from torch's global generator
    assert a.dtype == torch.uint8 and a.shape == (8, 1, 28, 28)
    assert torch.equal(a, again) and not torch.equal(a, other)
    assert not torch.equal(fresh, fresh2)  # seed=None: a fresh seed each time, kept in last_seed
    assert torch.equal(G.sample(8, seed=G.last_seed), fresh2)
    assert torch.equal(G.sample(8, seed=1, batch_size=3), a)  # batching does not change the images (eval mode)
    assert not G.training


def test_sample_matches_dcgan_generate(tiny_run, tmp_path):
    """dcgan.generate loads through load_generator: the same seed gives the same PNGs."""
    out = tmp_path / "pngs"
    result = run_module("dcgan.generate", "--checkpoint", str(tiny_run), "-n", "4", "--seed", "5", "--out", str(out))
    assert result.returncode == 0, result.stderr
    pngs = np.stack([np.asarray(Image.open(out / f"{i:06d}.png")) for i in range(4)])
    assert np.array_equal(pngs, load_generator(tiny_run).sample(4, seed=5)[:, 0].numpy())


def generate(tiny_run, out, *args: str) -> None:
    result = run_module("dcgan.generate", "--checkpoint", str(tiny_run), *args, "--out", str(out))
    assert result.returncode == 0, result.stderr


def pngs(folder, names) -> np.ndarray:
    return np.stack([np.asarray(Image.open(folder / name)) for name in names])


def test_seeds_give_each_image_its_own_seed(tiny_run, tmp_path):
    """--seeds 0-9: seed0000.png ... seed0009.png, and seed s's PNG is the same bytes
    whatever the other seeds, their order or the batch size (and -n 1 --seed s's)."""
    generate(tiny_run, tmp_path / "all", "--seeds", "0-9")
    generate(tiny_run, tmp_path / "two", "--seeds", "9,5", "--batch-size", "1")
    generate(tiny_run, tmp_path / "one", "-n", "1", "--seed", "5")
    names = [f"seed{s:04d}.png" for s in range(10)]
    assert sorted(p.name for p in (tmp_path / "all").iterdir()) == names
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["seed0005.png", "seed0009.png"]
    five = (tmp_path / "all" / "seed0005.png").read_bytes()
    assert (tmp_path / "two" / "seed0005.png").read_bytes() == five == (tmp_path / "one" / "000000.png").read_bytes()
    assert (tmp_path / "two" / "seed0009.png").read_bytes() == (tmp_path / "all" / "seed0009.png").read_bytes()
    assert (tmp_path / "all" / "seed0006.png").read_bytes() != five

    G = load_generator(tiny_run)
    assert np.array_equal(pngs(tmp_path / "all", names), G.sample(seeds="0-9")[:, 0].numpy())
    assert torch.equal(G.sample(seeds=[9, 5], batch_size=1), G.sample(seeds=range(10))[[9, 5]])
    assert torch.equal(G.sample(seeds=[5]), G.sample(1, seed=5)) and G.last_seed == 5
    G.latents(seeds=[5])
    assert G.last_seed is None  # no one seed for the batch
    with pytest.raises(ValueError, match="not both"):
        G.sample(4, seeds=[1])
    with pytest.raises(ValueError, match="backwards"):
        G.latents(seeds="5-2")


def test_a_grid_of_seeds_is_in_seed_order(tiny_run, tmp_path):
    generate(tiny_run, tmp_path / "g", "--seeds", "9,5,7", "--grid")
    assert [p.name for p in (tmp_path / "g").iterdir()] == ["grid.png"]
    G = load_generator(tiny_run)
    with torch.no_grad():
        images = G(G.latents(seeds=[9, 5, 7]))
    save_grid(to_uint8_grid(images, nrow=2), tmp_path / "expected.png")  # nrow about sqrt(3)
    assert np.array_equal(pngs(tmp_path, ["g/grid.png"]), pngs(tmp_path, ["expected.png"]))
    save_grid(to_uint8_grid(images[[1, 0, 2]], nrow=2), tmp_path / "reordered.png")
    assert not np.array_equal(pngs(tmp_path, ["g/grid.png"]), pngs(tmp_path, ["reordered.png"]))


def test_truncation_keeps_latents_inside_psi_and_python_gives_the_pngs(tiny_run, tmp_path):
    generate(tiny_run, tmp_path / "s", "--seeds", "0-3", "--truncation", "0.5", "--interpolate", "4")
    generate(tiny_run, tmp_path / "n", "-n", "4", "--seed", "5", "--truncation", "0.5")
    G = load_generator(tiny_run)
    truncated = G.sample(seeds=range(4), truncation=0.5)
    assert np.array_equal(pngs(tmp_path / "s", [f"seed{s:04d}.png" for s in range(4)]), truncated[:, 0].numpy())
    n_mode = G.sample(4, seed=5, truncation=0.5)
    assert np.array_equal(pngs(tmp_path / "n", [f"{i:06d}.png" for i in range(4)]), n_mode[:, 0].numpy())
    assert not torch.equal(truncated, G.sample(seeds=range(4)))  # the truncated latents make other images
    assert not torch.equal(n_mode, G.sample(4, seed=5))

    z, plain = G.latents(seeds=range(4), truncation=0.5), G.latents(seeds=range(4))
    assert z.abs().max() <= 0.5 < plain.abs().max()
    assert torch.equal(G.latents(4, seed=5, truncation=0.5), G.latents(4, seed=5, truncation=0.5))
    assert G.latents(4, seed=5, truncation=0.5).abs().max() <= 0.5
    with pytest.raises(ValueError, match="finite number > 0"):
        G.sample(4, seed=5, truncation=0)

    walk = Image.open(tmp_path / "s" / "interpolation.png")  # 3 walks (0->1, 1->2, 2->3) of 4 steps
    factor = walk.size[0] // (2 + 4 * 30)
    assert walk.size == (factor * (2 + 4 * 30), factor * (2 + 3 * 30))


def test_an_unconditional_generator_takes_no_labels_and_no_class(tiny_run, tmp_path):
    """Labels for an unconditional model: a ValueError from Python, one line and exit 2 from
    dcgan.generate --class. A conditional model's classes: tests/e2e/test_conditional_tools.py."""
    G = load_generator(tiny_run)
    assert not G.conditional and G.num_classes == 0 and G.labels(4, seed=0) is None
    for call in (lambda: G.sample(4, seed=0, labels=1), lambda: G.labels(seeds=[1], labels=[1])):
        with pytest.raises(ValueError, match=r"holds an unconditional generator \(model.conditional=false\)"):
            call()
    with pytest.raises(ValueError, match="takes no labels"):
        G(G.latents(1, seed=0), torch.tensor([0]))
    result = run_module("dcgan.generate", "--checkpoint", str(tiny_run), "--class", "3", "--out", str(tmp_path / "no"))
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("python -m dcgan.generate: error: --class: ") and line.endswith(
        "step_00000004.pt holds an unconditional model (model.conditional=false): it has no classes"
    )
    assert not (tmp_path / "no").exists()


def test_bad_paths_and_weights_are_named(tiny_run, tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="missing.pt: no such checkpoint"):
        load_generator(tmp_path / "missing.pt")
    with pytest.raises(checkpoint.CheckpointError, match="no valid checkpoint"):
        load_generator(tmp_path)
    with pytest.raises(ValueError, match="weights must be one of ema, raw"):
        load_generator(tiny_run, weights="g")


def test_files_that_are_not_checkpoints_say_what_they_are(tiny_run, tmp_path):
    record = tiny_run / "checkpoints" / "step_00000002.pt.json"
    with pytest.raises(
        checkpoint.CheckpointError, match=r"a checkpoint's size/SHA-256 record, not a checkpoint; load "
    ):
        load_generator(record)
    text = tmp_path / "notes.pt"
    text.write_text("hello, not a checkpoint")
    with pytest.raises(
        checkpoint.CheckpointError,
        match=r"notes.pt: cannot be read as a checkpoint: not a file torch.save wrote \(it starts with b'hello",
    ):
        load_generator(text)
    pickled = tmp_path / "object.pt"
    torch.save({"generator": Generator}, pickled)  # a class: weights_only refuses it
    with pytest.raises(checkpoint.CheckpointError, match=r"refused by torch.load\(weights_only=True\) \(\S.*\)"):
        load_generator(pickled)


def test_an_empty_file_and_a_set_aside_record_say_what_they_are(tiny_run, tmp_path):
    """No reason left empty: torch says nothing about an empty file, and "Unsupported operand
    123" about JSON (the record of a checkpoint set aside has no .pt.json name to go by)."""
    empty = tmp_path / "empty.pt"
    empty.touch()
    with pytest.raises(
        checkpoint.CheckpointError, match=r"empty.pt: cannot be read as a checkpoint: the file is empty$"
    ):
        load_generator(empty)
    shutil.copytree(tiny_run / "checkpoints", tmp_path / "checkpoints")
    aside = checkpoint.set_aside(tmp_path / "checkpoints" / "step_00000002.pt")
    record = checkpoint.record_path(aside)
    with pytest.raises(checkpoint.CheckpointError) as raised:
        load_generator(record)
    assert str(raised.value) == f"{record}: the size/SHA-256 record of step_00000002.pt, not a checkpoint"
    result = run_module("dcgan.generate", "--checkpoint", str(record), "--out", str(tmp_path / "out"), timeout=120)
    assert result.returncode == 2 and result.stderr == f"dcgan.generate: {raised.value}\n", result.stderr


def test_a_checkpoint_whose_weights_do_not_fit_its_config_is_one_line(tiny_run, tmp_path):
    sd = torch.load(tiny_run / "checkpoints" / "step_00000002.pt", map_location="cpu", weights_only=True)
    sd["config"]["model"]["ngf"] = 16  # edited: its tensors are ngf 8's
    saved = checkpoint.save(sd, tmp_path / "checkpoints", 2, keep=1).path
    with pytest.raises(checkpoint.CheckpointError, match="does not fit its own model settings"):
        load_generator(saved)
    result = run_module("dcgan.generate", "--checkpoint", str(saved), "--out", str(tmp_path / "out"), timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith(f"dcgan.generate: {saved}: its generator does not fit its own model settings")


def test_dcgan_eval_says_in_one_line_what_does_not_fit(tiny_run, tmp_path):
    """dcgan.eval reads the checkpoint itself: a generator that does not fit its own model
    settings, or a torch file of something else, is one line naming it, exit 2."""
    sd = torch.load(tiny_run / "checkpoints" / "step_00000002.pt", map_location="cpu", weights_only=True)
    sd["config"]["model"]["ngf"] = 16  # edited: its tensors are ngf 8's
    edited = checkpoint.save(sd, tmp_path / "checkpoints", 2, keep=1).path
    other = tmp_path / "weights.pt"
    torch.save({"weights": torch.zeros(3)}, other)  # loads with weights_only=True, but holds no run
    for path, why in ((edited, "its generator does not fit its own model settings"),
                      (other, "not a dcgan.train checkpoint (no generator state)")):  # fmt: skip
        result = run_module("dcgan.eval", "--checkpoint", str(path), "--device", "cpu", timeout=120)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1, result.stderr[-3000:]
        assert lines[0].startswith(f"dcgan.eval: {path}: {why}")


def test_no_ema_falls_back_to_g(tiny_run, tmp_path, caplog):
    """A run with model.ema_decay=0 saves no EMA generator: "ema" loads G, and says so."""
    sd = torch.load(tiny_run / "checkpoints" / "step_00000002.pt", map_location="cpu", weights_only=True)
    sd["generator_ema"] = None
    sd["config"]["model"]["ema_decay"] = 0.0
    saved = checkpoint.save(sd, tmp_path / "checkpoints", 2, keep=1)
    with caplog.at_level(logging.WARNING, logger="dcgan.checkpoint.files"):
        G = load_generator(tmp_path)
    assert G.path == saved.path and G.weights == "raw" and same_weights(G, sd["generator"])
    assert "no EMA generator" in caplog.text


def assert_python_runs(code: str) -> None:
    """``python -c code`` in a fresh interpreter (what it imports is what a new process pays for)."""
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_importing_dcgan_is_cheap():
    code = (
        "import sys, dcgan; assert 'torch' not in sys.modules, 'import dcgan loaded torch'; "
        "from dcgan import load_generator; assert 'wandb' not in sys.modules, 'load_generator loaded wandb'"
    )
    assert_python_runs(code)


def test_the_trainer_starts_without_the_scoring_stack():
    # torchmetrics, and the scipy and matplotlib it loads, cost every process about 2 s of
    # start-up; only an evaluation needs them (dcgan/quality/scores.py imports them then).
    code = (
        "import sys, dcgan.train; loaded = {'torchmetrics', 'scipy', 'matplotlib', 'wandb'} & set(sys.modules); "
        "assert not loaded, f'importing dcgan.train loaded {sorted(loaded)}'"
    )
    assert_python_runs(code)
