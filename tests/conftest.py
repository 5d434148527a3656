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
import yaml

from dcgan.shards import main as shards_main

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
REPO = Path(__file__).resolve().parents[1]


def load_real_images(n: int) -> tuple[np.ndarray, np.ndarray]:
    """n real 28x28 uint8 images and their labels."""
    test_file = FASHION_MNIST / "t10k-images-idx3-ubyte.gz"
    if test_file.exists():
        from dcgan.shards import read_idx

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


@pytest.fixture(scope="session")
def digit_shards(tmp_path_factory, real_images) -> Path:
    """512 real 28x28 images in shards of 100 (the last holds 12)."""
    images, labels = real_images
    return make_shards(tmp_path_factory.mktemp("shards") / "real", images[:512], labels[:512], "--per-shard", "100")


def write_config(path: Path, shards: Path, **sections) -> Path:
    """A tiny kmnist-arch config on ``shards``; ``sections`` update its sections."""
    cfg = {
        "data": {"shards": str(shards), "workers": 1, "shuffle_buffer": 64},
        "model": {"arch": "kmnist", "image_size": 28, "channels": 1, "nz": 16, "ngf": 8, "ndf": 8},
        "train": {"steps": 6, "batch_size": 16, "out_dir": str(path.parent / "runs"), "seed": 0},
        "log": {"every": 2, "samples_every": 3, "num_samples": 16},
        "checkpoint": {"every": 3, "keep": 2},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(cfg))
    return path


def _command(args: tuple[str, ...], nproc: int, launcher_args: tuple[str, ...], env: dict | None):
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
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
