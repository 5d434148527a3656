"""The seeds' RandomHorizontalFlip + RandomAffine, batched on the training device.

Per sample in the DataLoader workers, torchvision's affine is a Python loop of small CPU
kernels that holds the workers back, and the cache (dcgan/data/cache.py) has no workers. Here
the whole batch is augmented at once, on the device it lives on (``data.DeviceBatches``),
so the workers only decode.

* The definition is torchvision's (0.29, ``transforms.v2.RandomAffine`` with
  ``interpolation=NEAREST, fill=None``, after ``RandomHorizontalFlip(0.5)``): the same
  parameter ranges, whole-pixel translations rounded half to even, the same inverse matrix
  about the image centre, the same pixel-centre grid and nearest sampling, with black
  outside the image. ``tests/unit/test_augment.py`` checks it pixel for pixel against
  ``torchvision.transforms.v2.functional.affine``.
* Every random number comes from the caller's generator, drawn on its device in a fixed
  order (see ``draw_params``), so one generator state gives one batch, bit for bit, and a
  resumed run replays the same augmentation.
* ``apply`` and ``augment`` never wait for the device (no ``.item()``, no boolean-mask
  indexing, no branch on tensor values), so they can run inside a CUDA graph.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from dcgan.config.sections import AugmentConfig


class AugmentParams(NamedTuple):
    """Per-sample parameters of one batch, on the generator's device."""

    flip: torch.Tensor  # (B,) bool: mirror left-right before the affine
    angle: torch.Tensor  # (B,) float32, degrees (counter-clockwise, as torchvision)
    translate: torch.Tensor  # (B, 2) float32 holding whole pixels (tx, ty)
    scale: torch.Tensor  # (B,) float32
    shear: torch.Tensor  # (B,) float32, x-shear in degrees (the y-shear is 0)


def draw_params(n: int, cfg: AugmentConfig, gen: torch.Generator, height: int, width: int) -> AugmentParams:
    """Draw ``n`` samples' parameters from ``gen`` alone.

    Order of draws (the stream a resumed run must replay): if ``cfg.hflip``, one
    ``rand(n)`` for the flips; then, if ``cfg.affine``, one ``rand(5, n)`` whose rows are
    angle, tx, ty, scale, shear. A part that is off draws nothing and gets the identity
    (no flip; angle 0, translate 0, scale 1, shear 0).
    """
    device = gen.device
    if cfg.hflip:
        flip = torch.rand(n, generator=gen, device=device) < 0.5
    else:
        flip = torch.zeros(n, dtype=torch.bool, device=device)
    if not cfg.affine:
        zeros = torch.zeros(n, device=device)
        return AugmentParams(flip, zeros, torch.zeros(n, 2, device=device), torch.ones(n, device=device), zeros)

    u = torch.rand(5, n, generator=gen, device=device)

    def uniform(row: int, lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * u[row]

    max_dx, max_dy = cfg.translate[0] * width, cfg.translate[1] * height
    # torch.round rounds half to even, as Python's round() in torchvision's make_params.
    translate = torch.stack([uniform(1, -max_dx, max_dx), uniform(2, -max_dy, max_dy)], dim=1).round()
    return AugmentParams(
        flip=flip,
        angle=uniform(0, -cfg.degrees, cfg.degrees),
        translate=translate,
        scale=uniform(3, *cfg.scale),
        shear=uniform(4, -cfg.shear, cfg.shear),
    )


def _inverse_matrices(params: AugmentParams, device: torch.device) -> torch.Tensor:
    """(B, 2, 3) float32: torchvision's ``_get_inverse_affine_matrix`` about the centre.

    Computed in float64 like torchvision's Python floats, then cast to float32 as
    ``affine_image`` does, so both round the same way. With the y-shear 0,
    torchvision's ``cos(sy)`` is exactly 1 and ``rot - sy`` exactly ``rot``.
    """
    f64 = dict(dtype=torch.float64, device=device)
    rot = params.angle.to(**f64) * (math.pi / 180.0)  # math.radians multiplies by the same constant
    tan_sx = torch.tan(params.shear.to(**f64) * (math.pi / 180.0))
    scale = params.scale.to(**f64)
    tx, ty = params.translate.to(**f64).unbind(1)

    # Forward rotate-shear without scale: [[a, b], [c, d]], determinant 1.
    a = torch.cos(rot)
    b = -(a * tan_sx + torch.sin(rot))
    c = torch.sin(rot)
    d = torch.cos(rot) - c * tan_sx
    # Inverse, then undo the translation (the centre is the origin: center_f = [0, 0]).
    m0, m1, m3, m4 = d / scale, -b / scale, -c / scale, a / scale
    m2 = -m0 * tx - m1 * ty
    m5 = -m3 * tx - m4 * ty
    return torch.stack([m0, m1, m2, m3, m4, m5], dim=1).view(-1, 2, 3).to(torch.float32)


def _grids(theta: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, H, W, 2) sampling grids: torchvision's ``_affine_grid`` for a batch of matrices.

    Output pixel centres in pixel units about the image centre, mapped by theta, then
    normalised to grid_sample's [-1, 1]; the same float32 operations in the same order.
    """
    device = theta.device
    base = torch.empty(1, height, width, 3, dtype=torch.float32, device=device)
    base[..., 0].copy_(torch.linspace((1.0 - width) * 0.5, (width - 1.0) * 0.5, steps=width, device=device))
    ys = torch.linspace((1.0 - height) * 0.5, (height - 1.0) * 0.5, steps=height, device=device)
    base[..., 1].copy_(ys.unsqueeze(-1))
    base[..., 2].fill_(1)
    # Divided column by column by Python floats: a torch.tensor of them on a GPU would be a
    # blocking host-to-device copy every batch.
    columns = theta.transpose(1, 2)  # (B, 3, 2)
    rescaled = torch.stack([columns[..., 0] / (0.5 * width), columns[..., 1] / (0.5 * height)], dim=-1)
    batch = theta.shape[0]
    return base.view(1, height * width, 3).expand(batch, -1, -1).bmm(rescaled).view(batch, height, width, 2)


def apply(images: torch.Tensor, params: AugmentParams, cfg: AugmentConfig) -> torch.Tensor:
    """Flip then affine-warp a float (B, C, H, W) batch of 0..255 values with ``params``.

    Returns a new tensor of the same shape, dtype, device and memory format (``images``
    when ``cfg`` augments nothing). Parts that ``cfg`` switches off are skipped.
    """
    if not (cfg.hflip or cfg.affine):
        return images
    params = AugmentParams(*(p.to(images.device) for p in params))
    out = images
    if cfg.hflip:
        out = torch.where(params.flip.view(-1, 1, 1, 1), out.flip(-1), out)
    if cfg.affine:
        height, width = images.shape[-2:]
        grid = _grids(_inverse_matrices(params, images.device).to(images.dtype), height, width)
        # Nearest sampling of integer values returns them unchanged, so torchvision's final
        # round-and-cast to uint8 is a no-op here; zeros padding is its fill=None.
        out = F.grid_sample(out, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    layout = torch.channels_last if images.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    return out.contiguous(memory_format=layout)


def augment(images: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    """``apply(images, draw_params(...), cfg)``: the seeds' augmentation of one batch, drawn from ``gen``."""
    if not (cfg.hflip or cfg.affine):
        return images
    height, width = images.shape[-2:]
    return apply(images, draw_params(len(images), cfg, gen, height, width), cfg)
