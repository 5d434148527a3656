"""The five reference DCGANs (configs/*.yaml), each a pair of plain ``nn.Sequential`` layer lists.

Every list keeps its seed's layers, widths, kernel/stride/padding, bias flags and
norm/activation order. One change for all: the discriminator ends in a logit (no
Sigmoid) and training uses BCE-with-logits, which is the seeds' Sigmoid + BCELoss maths in
a form autocast accepts. Generators take ``z`` of shape (B, nz, 1, 1) and return images
in [-1, 1] of shape (B, channels, S, S).

Init is the seeds' DCGAN init: conv and transposed-conv weights ~ N(0, 0.02), batch-norm
weights ~ N(1, 0.02) and biases 0. As in the seeds, conv biases (MNIST's D is the only
net with any) and Linear layers keep PyTorch's default init: the seed's ``weights_init``
matches class names on "Conv" / "BatchNorm" and touches weights only.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from torch import nn

from dcgan.base.checks import check_field


def _up(cin: int, cout: int, k: int = 4, s: int = 2, p: int = 1) -> nn.ConvTranspose2d:
    return nn.ConvTranspose2d(cin, cout, k, s, p, bias=False)


def _down(cin: int, cout: int, k: int = 4, s: int = 2, p: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, s, p, bias=False)


def _lrelu() -> nn.LeakyReLU:
    return nn.LeakyReLU(0.2, inplace=True)


# 001 CelebA: Radford et al. / pytorch examples. 003 Pokemon (d2l) uses the same generator.
def celeba_generator(nz: int, ngf: int, nc: int) -> nn.Sequential:
    return nn.Sequential(
        _up(nz, ngf * 8, 4, 1, 0), nn.BatchNorm2d(ngf * 8), nn.ReLU(True),  # 4x4
        _up(ngf * 8, ngf * 4), nn.BatchNorm2d(ngf * 4), nn.ReLU(True),  # 8x8
        _up(ngf * 4, ngf * 2), nn.BatchNorm2d(ngf * 2), nn.ReLU(True),  # 16x16
        _up(ngf * 2, ngf), nn.BatchNorm2d(ngf), nn.ReLU(True),  # 32x32
        _up(ngf, nc), nn.Tanh(),  # 64x64
    )  # fmt: skip


def celeba_discriminator(ndf: int, nc: int) -> nn.Sequential:
    return nn.Sequential(
        _down(nc, ndf), _lrelu(),  # 32x32
        _down(ndf, ndf * 2), nn.BatchNorm2d(ndf * 2), _lrelu(),  # 16x16
        _down(ndf * 2, ndf * 4), nn.BatchNorm2d(ndf * 4), _lrelu(),  # 8x8
        _down(ndf * 4, ndf * 8), nn.BatchNorm2d(ndf * 8), _lrelu(),  # 4x4
        _down(ndf * 8, 1, 4, 1, 0),  # 1x1 logit
    )  # fmt: skip


# 003 Pokemon: batch norm in every D block, the first one too.
def pokemon_discriminator(ndf: int, nc: int) -> nn.Sequential:
    return nn.Sequential(
        _down(nc, ndf), nn.BatchNorm2d(ndf), _lrelu(),  # 32x32
        _down(ndf, ndf * 2), nn.BatchNorm2d(ndf * 2), _lrelu(),  # 16x16
        _down(ndf * 2, ndf * 4), nn.BatchNorm2d(ndf * 4), _lrelu(),  # 8x8
        _down(ndf * 4, ndf * 8), nn.BatchNorm2d(ndf * 8), _lrelu(),  # 4x4
        _down(ndf * 8, 1, 4, 1, 0),  # 1x1 logit
    )  # fmt: skip


# 000 Pumpkins: G widths ngf*32 .. ngf*4; D widths ndf, ndf, 2ndf, 4ndf.
def pumpkins_generator(nz: int, ngf: int, nc: int) -> nn.Sequential:
    return nn.Sequential(
        _up(nz, ngf * 32, 4, 1, 0), nn.BatchNorm2d(ngf * 32), nn.ReLU(True),  # 4x4
        _up(ngf * 32, ngf * 16), nn.BatchNorm2d(ngf * 16), nn.ReLU(True),  # 8x8
        _up(ngf * 16, ngf * 8), nn.BatchNorm2d(ngf * 8), nn.ReLU(True),  # 16x16
        _up(ngf * 8, ngf * 4), nn.BatchNorm2d(ngf * 4), nn.ReLU(True),  # 32x32
        _up(ngf * 4, nc), nn.Tanh(),  # 64x64
    )  # fmt: skip


def pumpkins_discriminator(ndf: int, nc: int) -> nn.Sequential:
    return nn.Sequential(
        _down(nc, ndf), _lrelu(),  # 32x32
        _down(ndf, ndf), nn.BatchNorm2d(ndf), _lrelu(),  # 16x16
        _down(ndf, ndf * 2), nn.BatchNorm2d(ndf * 2), _lrelu(),  # 8x8
        _down(ndf * 2, ndf * 4), nn.BatchNorm2d(ndf * 4), _lrelu(),  # 4x4
        _down(ndf * 4, 1, 4, 1, 0),  # 1x1 logit
    )  # fmt: skip


# 002 MNIST (pyimagesearch): transposed conv -> ReLU -> BN; D is two biased convs and two
# fully connected layers (hidden 512 at ndf=32, so 16 * ndf).
def mnist_generator(nz: int, ngf: int, nc: int) -> nn.Sequential:
    return nn.Sequential(
        _up(nz, ngf * 4, 4, 2, 0), nn.ReLU(), nn.BatchNorm2d(ngf * 4),  # 4x4
        _up(ngf * 4, ngf * 2, 3, 2, 1), nn.ReLU(), nn.BatchNorm2d(ngf * 2),  # 7x7
        _up(ngf * 2, ngf), nn.ReLU(), nn.BatchNorm2d(ngf),  # 14x14
        _up(ngf, nc), nn.Tanh(),  # 28x28
    )  # fmt: skip


def mnist_discriminator(ndf: int, nc: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(nc, ndf, 4, 2, 1), _lrelu(),  # 14x14
        nn.Conv2d(ndf, ndf * 2, 4, 2, 1), _lrelu(),  # 7x7
        nn.Flatten(),
        nn.Linear(ndf * 2 * 7 * 7, ndf * 16), _lrelu(),
        nn.Linear(ndf * 16, 1),  # logit
    )  # fmt: skip


# 004 Kuzushiji-MNIST (R torch): widths from the image size (ngf = ndf = 28 -> 112, 56, 28)
# and a padding-2 transposed conv for 8x8 -> 14x14.
def kmnist_generator(nz: int, ngf: int, nc: int) -> nn.Sequential:
    return nn.Sequential(
        _up(nz, ngf * 4, 4, 1, 0), nn.BatchNorm2d(ngf * 4), nn.ReLU(),  # 4x4
        _up(ngf * 4, ngf * 2), nn.BatchNorm2d(ngf * 2), nn.ReLU(),  # 8x8
        _up(ngf * 2, ngf, 4, 2, 2), nn.BatchNorm2d(ngf), nn.ReLU(),  # 14x14
        _up(ngf, nc), nn.Tanh(),  # 28x28
    )  # fmt: skip


def kmnist_discriminator(ndf: int, nc: int) -> nn.Sequential:
    return nn.Sequential(
        _down(nc, ndf), _lrelu(),  # 14x14
        _down(ndf, ndf * 2), nn.BatchNorm2d(ndf * 2), _lrelu(),  # 7x7
        _down(ndf * 2, ndf * 4), nn.BatchNorm2d(ndf * 4), _lrelu(),  # 3x3
        _down(ndf * 4, 1),  # 1x1 logit
    )  # fmt: skip


# arch -> (generator(nz, ngf, nc), discriminator(ndf, nc), native image size)
ARCHS: dict[str, tuple[Callable[..., nn.Module], Callable[..., nn.Module], int]] = {
    "celeba": (celeba_generator, celeba_discriminator, 64),
    "pumpkins": (pumpkins_generator, pumpkins_discriminator, 64),
    "mnist": (mnist_generator, mnist_discriminator, 28),
    "pokemon": (celeba_generator, pokemon_discriminator, 64),
    "kmnist": (kmnist_generator, kmnist_discriminator, 28),
}
ARCH_IMAGE_SIZE = {arch: size for arch, (_, _, size) in ARCHS.items()}


@dataclass
class ModelConfig:
    """Which reference architecture, at which widths (the layer lists above)."""

    arch: str = "celeba"  # celeba | pumpkins | mnist | pokemon | kmnist
    image_size: int = 64  # must be the arch's native size (64 for RGB seeds, 28 for digits)
    channels: int = 3  # image channels (1 grey, 3 RGB); decoded images are converted to it
    nz: int = 100  # latent size
    ngf: int = 64  # generator base width
    ndf: int = 64  # discriminator base width
    # Decay of the moving average of G's weights (the EMA generator used for sample
    # grids); it ramps up as min(decay, (1 + step) / (10 + step)). 0 disables it.
    ema_decay: float = 0.999

    def __post_init__(self) -> None:
        for name in ("image_size", "channels", "nz", "ngf", "ndf"):
            check_field(getattr(self, name) >= 1, name, "must be >= 1")
        check_field(0 <= self.ema_decay < 1, "ema_decay", "must lie in [0, 1) (0 disables the EMA generator)")
        check_field(self.arch in ARCH_IMAGE_SIZE, "arch", f"{self.arch!r} is not one of {', '.join(ARCH_IMAGE_SIZE)}")
        native = ARCH_IMAGE_SIZE[self.arch]
        check_field(
            self.image_size == native, "image_size",
            f"arch {self.arch!r} makes {native}x{native} images (its seed's layer list); {self.image_size} is impossible",
        )  # fmt: skip


class HasModel(Protocol):
    model: ModelConfig


def dcgan_init_(module: nn.Module) -> None:
    """The seeds' weights_init, applied to every submodule."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


def build_models(cfg: ModelConfig | HasModel) -> tuple[nn.Module, nn.Module]:
    """(G, D) for ``cfg.model`` (or a ModelConfig), DCGAN-initialised, on the CPU."""
    m = getattr(cfg, "model", cfg)
    make_g, make_d, _ = ARCHS[m.arch]
    generator = make_g(m.nz, m.ngf, m.channels)
    discriminator = make_d(m.ndf, m.channels)
    dcgan_init_(generator)
    dcgan_init_(discriminator)
    return generator, discriminator


def checkpoint_bytes(cfg: ModelConfig | HasModel) -> tuple[int, int, int]:
    """(G's parameters, D's parameters, about how many bytes one checkpoint takes), from the
    nets' shapes alone (built on the meta device: nothing allocated). A checkpoint holds G,
    the EMA generator and D (parameters and buffers), Adam's two moments and step per
    parameter tensor, the RNG states (about 10 kB) and about 250 bytes of zip entry per tensor."""
    m = getattr(cfg, "model", cfg)
    with torch.device("meta"):
        make_g, make_d, _ = ARCHS[m.arch]
        nets = make_g(m.nz, m.ngf, m.channels), make_d(m.ndf, m.channels)
    copies = (2 if m.ema_decay else 1, 1)  # G (and its EMA), D
    params = [list(net.parameters()) for net in nets]
    tensors = [[*p, *net.buffers()] for p, net in zip(params, nets)]
    total = 10_000
    for copies_of_net, held, trained in zip(copies, tensors, params):
        total += copies_of_net * sum(t.numel() * t.element_size() + 250 for t in held)
        total += sum(2 * t.numel() * 4 + 3 * 250 + 4 for t in trained)
    return sum(p.numel() for p in params[0]), sum(p.numel() for p in params[1]), total


def sample_latent(n: int, nz: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None):
    """Latent codes as the seeds draw them: N(0, 1) of shape (n, nz, 1, 1)."""
    return torch.randn(n, nz, 1, 1, device=device, generator=generator)


# --------------------------------------------------------------------------- EMA generator
# A moving average of G's weights makes steadier samples than G itself. Written out here
# rather than with torch.optim.swa_utils.AveragedModel: that hands its averaging function
# the update count as a device tensor (a decay ramp would cost a host sync per step) and
# prefixes every state-dict key with "module.", so the EMA would no longer load into a
# plain generator.


def ema_copy(generator: nn.Module) -> nn.Module:
    """A frozen copy of ``generator`` to hold the average (build it before any SyncBN
    conversion: the copy is only ever run on its own, in eval mode)."""
    ema = copy.deepcopy(generator).eval()
    ema.requires_grad_(False)
    return ema


def ema_decay(step: torch.Tensor, decay: float) -> torch.Tensor:
    """min(decay, (1 + step) / (10 + step)) for ``step`` (steps done, a 0-dim float64 tensor
    on the device): the ramp keeps early samples from averaging in the random init. Worked
    out on the device, so a CUDA graph replay recomputes it every step (a Python float would
    be frozen at capture); float64 rounds it as the same formula in Python floats."""
    return ((1 + step) / (10 + step)).clamp(max=decay).float()


@torch.no_grad()
def update_ema(ema: nn.Module, generator: nn.Module, decay: torch.Tensor) -> None:
    """ema <- decay * ema + (1 - decay) * G, with ``decay`` a 0-dim tensor on G's device
    (``ema_decay``): foreach kernels that take it by address, so no host sync. Buffers
    (BN running statistics) are copied, as in stylegan2-ada."""
    averaged = list(ema.parameters())
    torch._foreach_mul_(averaged, decay)
    torch._foreach_add_(averaged, torch._foreach_mul([p.detach() for p in generator.parameters()], 1 - decay))
    torch._foreach_copy_(list(ema.buffers()), list(generator.buffers()))
