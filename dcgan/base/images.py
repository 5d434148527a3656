"""Image conversions shared by tracking, evaluation and generation: generator output in
[-1, 1] to uint8 pixels, to a grid, and to PNG files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torchvision.utils as vutils
from PIL import Image

from dcgan.base.fileio import write_atomic


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Generator output in [-1, 1] -> uint8 [0, 255], quantised as a saved PNG would be, so
    fakes reach the extractor exactly as real images (decoded from PNG/JPEG) do."""
    return images.float().add(1).mul(127.5).round_().clamp_(0, 255).to(torch.uint8)


def to_uint8_grid(images: torch.Tensor, nrow: int = 8) -> np.ndarray:
    """Images in [-1, 1] (N, C, H, W) as one HxWxC uint8 grid: PNG and W&B both want uint8."""
    grid = vutils.make_grid(images.detach().float().cpu(), nrow=nrow, padding=2, normalize=True, value_range=(-1, 1))
    return grid.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


GRID_MIN_WIDTH = 512  # px: sample grids of small images are enlarged to at least this width


def enlarged(grid: np.ndarray) -> np.ndarray:
    """A grid enlarged by a whole factor (nearest: each pixel a square, nothing smoothed)
    to at least GRID_MIN_WIDTH px across, so that a grid of 28x28 samples can be looked at."""
    factor = max(1, -(-GRID_MIN_WIDTH // grid.shape[1]))
    return grid.repeat(factor, axis=0).repeat(factor, axis=1)


def save_grid(grid: np.ndarray, path: Path) -> None:
    save_png(enlarged(grid), path)


def save_png(grid: np.ndarray, path: Path) -> None:
    image = Image.fromarray(grid[:, :, 0] if grid.shape[2] == 1 else grid)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda f: image.save(f, format="PNG"))
