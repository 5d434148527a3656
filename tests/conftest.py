"""Shared fixtures: real images (Fashion-MNIST from Debian when installed, else
scikit-learn's bundled digits), shards made by the real ``dcgan.shards`` CLI, tiny
configs, and a runner for real torchrun jobs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from dcgan.config.sections import DataConfig
from dcgan.data.shardset import resolve_shards
from dcgan.data.stream import Loader, ShardStream
from dcgan.shards import main as shards_main

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
# Tests never talk to a W&B server, whatever login this machine has (wandb.mode=auto
# follows $WANDB_MODE); tests that need another mode set it in their config or env.
os.environ["WANDB_MODE"] = "offline"
REPO = Path(__file__).resolve().parents[1]


def load_real_images(n: int) -> tuple[np.ndarray, np.ndarray]:
    """n real 28x28 uint8 images and their labels."""
    test_file = FASHION_MNIST / "t10k-images-idx3-ubyte.gz"
    if test_file.exists():
        from dcgan.data.writing import read_idx

        images = read_idx(test_file)[:n]
        labels = read_idx(FASHION_MNIST / "t10k-labels-idx1-ubyte.gz")[:n]
        return images.copy(), labels.astype(np.int64)
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()  # 1797 8x8 images, values 0..16
    idx = np.arange(n) % len(digits.images)
    small = (digits.images[idx] * (255 / 16)).astype(np.uint8)
    images = np.stack([np.asarray(Image.fromarray(im).resize((28, 28), Image.BILINEAR)) for im in small])
    return images, digits.target[idx].astype(np.int64)


@pytest.fixture(scope="session")
def real_images() -> tuple[np.ndarray, np.ndarray]:
    return load_real_images(2000)


def make_shards(out: Path, images: np.ndarray, labels: np.ndarray | None = None, *extra: str) -> Path:
    """Write ``images`` (N,H,W[,C]) as shards through the real CLI; returns ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    source = out.parent / f"{out.name}-source.npz"
    arrays = {"x": images} if labels is None else {"x": images, "y": labels}
    np.savez(source, **arrays)
    assert shards_main([str(source), str(out), "--workers", "1", *extra]) == 0
    return out


def make_loader(shards, rank=0, world_size=1, batch_size=4, workers=2, **data) -> Loader:
    """One rank's shard reader over 28x28 grey ``shards`` (data.* settings as keywords)."""
    cfg = DataConfig(shards=str(shards), workers=workers, shuffle_buffer=data.pop("shuffle_buffer", 8), **data)
    stream = ShardStream(resolve_shards(cfg), cfg, rank=rank, world_size=world_size, batch_size=batch_size,
                         image_size=28, channels=1, seed=0)  # fmt: skip
    return Loader(stream, torch.device("cpu"))


def epoch_labels(loader, epoch, start_batch=0) -> list[list[int]]:
    """The labels of each batch of one epoch."""
    return [labels.tolist() for _, labels in loader.epoch(epoch, start_batch)]


@pytest.fixture(scope="session")
def digit_shards(tmp_path_factory, real_images) -> Path:
    """512 real 28x28 images in shards of 100 (the last holds 12)."""
    images, labels = real_images
    return make_shards(tmp_path_factory.mktemp("shards") / "real", images[:512], labels[:512], "--per-shard", "100")


def write_config(path: Path, shards: Path, **sections) -> Path:
    """A tiny kmnist-arch config on ``shards``; ``sections`` update its sections. It reads
    the shards every epoch (data.cache=off), as most tests are about that reader; the
    cache's tests turn it on. It trains on the CPU, also on a GPU machine (CUDA tests,
    tests/e2e/test_cuda.py, set train.device themselves)."""
    cfg = {
        "data": {"shards": str(shards), "workers": 1, "shuffle_buffer": 64, "cache": "off"},
        "model": {"arch": "kmnist", "image_size": 28, "channels": 1, "nz": 16, "ngf": 8, "ndf": 8},
        "train": {"steps": 6, "batch_size": 16, "out_dir": str(path.parent / "runs"), "seed": 0, "device": "cpu"},
        "log": {"every": 2, "samples_every": 3, "num_samples": 16},
        "checkpoint": {"every": 3, "keep": 2},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(cfg))
    return path


def _command(args: tuple[str, ...], nproc: int, launcher_args: tuple[str, ...], env: dict | None):
    # No GPU for the processes tests start, unless a test gives CUDA_VISIBLE_DEVICES in
    # ``env`` (a CUDA test): several ranks on a one-GPU machine would share its one GPU,
    # which NCCL refuses.
    full_env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "CUDA_VISIBLE_DEVICES": "",
        **(env or {}),
    }
    launcher = [sys.executable]
    if nproc:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *launcher_args]
    return [*launcher, *args], full_env


def run_python(*args: str, nproc: int = 0, timeout: float = 300, env: dict | None = None, launcher_args=(), **kw):
    """``python ARGS`` (e.g. "-m", "dcgan.train", ...), or ``torchrun --nproc_per_node=nproc ARGS``."""
    cmd, full_env = _command(args, nproc, tuple(launcher_args), env)
    return subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout, **kw)


def start_python(*args: str, log: Path, nproc: int = 0, env: dict | None = None, launcher_args=()):
    """Like ``run_python`` but in the background, stdout and stderr into ``log``."""
    cmd, full_env = _command(args, nproc, tuple(launcher_args), env)
    with open(log, "w") as out:
        return subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=out, stderr=subprocess.STDOUT, text=True)


def run_module(module: str, *args: str, **kwargs):
    """``python -m module args`` (under torchrun with ``nproc=N``); returns CompletedProcess."""
    return run_python("-m", module, *args, **kwargs)


E2E = Path(__file__).resolve().parent / "e2e"


def pytest_collection_modifyitems(config, items):
    """Every test under tests/e2e is marked ``e2e``, and every test on the local Slurm
    cluster ``slurm`` (``-m "not e2e"``: the unit tier). Tests marked ``cuda`` need a GPU:
    skipped, with the reason, where torch sees none."""
    for item in items:
        if E2E in item.path.resolve().parents:
            item.add_marker(pytest.mark.e2e)
        if "slurm_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slurm)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="a CUDA test: torch sees no CUDA device here (bench/gpu.sh runs them on a GPU)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


# --------------------------------------------------------------------------- local Slurm


def _slurm_unavailable() -> str | None:
    import shutil

    if shutil.which("slurmctld") and shutil.which("sbatch"):
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "Slurm is not installed and cannot be (needs root and apt-get)"
    return None


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A real Slurm cluster (two fake nodes n1, n2; partitions debug and high) for the
    session, started by tests/local_slurm.sh and stopped after by its pid files. Skipped
    with the reason where it cannot run, unless DCGAN_REQUIRE_SLURM=1 (.ci/run sets it)."""
    required = os.environ.get("DCGAN_REQUIRE_SLURM") == "1"
    reason = _slurm_unavailable()
    if reason:
        if required:
            pytest.fail(f"DCGAN_REQUIRE_SLURM=1 but {reason}")
        pytest.skip(reason)
    script = REPO / "tests" / "local_slurm.sh"
    root = Path(os.environ.get("DCGAN_TEST_SLURM_ROOT", "/tmp/dcgan-test-slurm"))
    env = {**os.environ, "SLURM_LOCAL_ROOT": str(root)}
    started = subprocess.run(["bash", str(script), "start"], env=env, capture_output=True, text=True, timeout=600)
    if started.returncode != 0:
        message = f"local Slurm did not start:\n{started.stderr[-3000:]}"
        if required:
            pytest.fail(message)
        pytest.skip(message)
    conf = str(root / "etc" / "slurm.conf")
    saved = {k: os.environ.get(k) for k in ("SLURM_CONF", "OMP_NUM_THREADS")}
    # submitit runs sbatch / sacct / scontrol from this process, and sbatch hands this
    # environment to the jobs.
    os.environ.update(SLURM_CONF=conf, OMP_NUM_THREADS="1")
    try:
        yield conf
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        subprocess.run(["bash", str(script), "stop"], env=env, capture_output=True, timeout=120)


# --------------------------------------------------------------------------- img2dataset


@pytest.fixture(scope="session")
def img2dataset() -> str:
    """The img2dataset command (scripts/test.sh installs it in .venv-img2dataset). Skipped
    where it is missing, unless DCGAN_REQUIRE_IMG2DATASET=1 (.ci/run sets it)."""
    import shutil

    found = os.environ.get("DCGAN_IMG2DATASET") or shutil.which("img2dataset")
    if found and Path(found).is_file():
        return found
    reason = "img2dataset is not installed (scripts/test.sh installs it in .venv-img2dataset)"
    if os.environ.get("DCGAN_REQUIRE_IMG2DATASET") == "1":
        pytest.fail(f"DCGAN_REQUIRE_IMG2DATASET=1 but {reason}")
    pytest.skip(reason)
