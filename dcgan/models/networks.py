"""The five reference DCGANs (configs/*.yaml), each a pair of plain ``nn.Sequential`` layer lists.

At its seed's image size every list keeps its seed's layers, widths, kernel/stride/padding,
bias flags and norm/activation order. One change for all: the discriminator ends in a logit
(no Sigmoid) and training uses BCE-with-logits, which is the seeds' Sigmoid + BCELoss maths in
a form autocast accepts. Generators take ``z`` of shape (B, nz, 1, 1) and return images
in [-1, 1] of shape (B, channels, S, S).

Image sizes. The 28x28 seeds (mnist, kmnist) make 28x28 images only, as their write-ups
made them. The 64x64 seeds (celeba, pokemon, pumpkins) make S x S images for S = 32, 64,
128 or 256, by the DCGAN rule: G is a 4x4 projection of ``z`` followed by stride-2 blocks
that double the size up to S/2, then the output layer; D mirrors it, stride-2 blocks from
S down to 4x4, then the 4x4 logit conv. So a net has log2(S) - 2 hidden blocks, and their
widths are counted from the image end: the block next to the image (G's last, D's first)
has the 64x64 net's width there, and each block further towards 4x4 has the 64x64 net's
next width, or its widest once those run out. For celeba and pumpkins G and celeba D that
is "the width doubles per block towards 4x4, capped at the 64x64 net's widest" (celeba
G ngf .. 8ngf, pumpkins G 4ngf .. 32ngf, D ndf .. 8ndf); pumpkins D keeps its seed's
ndf, ndf, 2ndf, 4ndf (capped at 4ndf). At 64 the nets are the seeds' layer for layer; at
128 and 256 blocks of the widest width are added next to 4x4; at 32 the block nearest
4x4 goes. Each seed's quirks hold at every size: celeba and pumpkins D have no batch norm
in the block next to the image, pokemon D has it in every block, pokemon uses celeba's G.

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
from dcgan.models.conditional import ConditionalGenerator, ProjectionDiscriminator


def _up(cin: int, cout: int, k: int = 4, s: int = 2, p: int = 1) -> nn.ConvTranspose2d:
    return nn.ConvTranspose2d(cin, cout, k, s, p, bias=False)


def _down(cin: int, cout: int, k: int = 4, s: int = 2, p: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, s, p, bias=False)


def _lrelu() -> nn.LeakyReLU:
    return nn.LeakyReLU(0.2, inplace=True)


# ------------------------------------------------------------------ the 64x64 seeds' family
DCGAN_SIZES = (32, 64, 128, 256)  # the image sizes the 64x64 seeds' family makes


def block_widths(seed_widths: tuple[int, ...], size: int) -> list[int]:
    """The hidden blocks' widths (in base widths) of a net making ``size`` x ``size``
    images, listed from the image end: ``seed_widths`` (the 64x64 net's, from the image
    end) cut short at 32, or followed by its last (widest) width at 128 and 256."""
    if size not in DCGAN_SIZES:
        raise ValueError(f"the DCGAN family makes {', '.join(map(str, DCGAN_SIZES))}px images, not {size}")
    blocks = (size // 4).bit_length() - 1  # log2(size / 4): 4 at 64
    return [seed_widths[min(i, len(seed_widths) - 1)] for i in range(blocks)]


def dcgan_generator(nz: int, nc: int, widths: list[int]) -> nn.Sequential:
    """z (B, nz, 1, 1) -> 4x4 -> ... -> (B, nc, S, S); ``widths`` are the hidden blocks'
    channels from the image end (the last is the 4x4 projection's)."""
    inward = widths[::-1]
    layers: list[nn.Module] = [_up(nz, inward[0], 4, 1, 0), nn.BatchNorm2d(inward[0]), nn.ReLU(True)]  # 4x4
    for cin, cout in zip(inward, inward[1:]):  # each doubles the size
        layers += [_up(cin, cout), nn.BatchNorm2d(cout), nn.ReLU(True)]
    return nn.Sequential(*layers, _up(inward[-1], nc), nn.Tanh())


def dcgan_discriminator(nc: int, widths: list[int], first_bn: bool) -> nn.Sequential:
    """(B, nc, S, S) -> ... -> 4x4 -> one logit per image (B, 1, 1, 1); ``widths`` are the
    hidden blocks' channels from the image end; ``first_bn``: batch norm in the first block."""
    layers: list[nn.Module] = []
    cin = nc
    for i, cout in enumerate(widths):  # each halves the size
        layers += [_down(cin, cout), *([nn.BatchNorm2d(cout)] if i or first_bn else []), _lrelu()]
        cin = cout
    return nn.Sequential(*layers, _down(cin, 1, 4, 1, 0))  # 1x1 logit


# 001 CelebA: Radford et al. / pytorch examples. 003 Pokemon (d2l) uses the same generator.
# At 64: G 8ngf (4x4), 4ngf, 2ngf, ngf (32x32) -> nc; D ndf (32x32), 2ndf, 4ndf, 8ndf (4x4).
def celeba_generator(nz: int, ngf: int, nc: int, size: int = 64) -> nn.Sequential:
    return dcgan_generator(nz, nc, [ngf * w for w in block_widths((1, 2, 4, 8), size)])


def celeba_discriminator(ndf: int, nc: int, size: int = 64) -> nn.Sequential:
    return dcgan_discriminator(nc, [ndf * w for w in block_widths((1, 2, 4, 8), size)], first_bn=False)


# 003 Pokemon: batch norm in every D block, the first one too.
def pokemon_discriminator(ndf: int, nc: int, size: int = 64) -> nn.Sequential:
    return dcgan_discriminator(nc, [ndf * w for w in block_widths((1, 2, 4, 8), size)], first_bn=True)


# 000 Pumpkins: at 64 G widths 32ngf (4x4), 16ngf, 8ngf, 4ngf (32x32); D widths ndf (32x32),
# ndf, 2ndf, 4ndf (4x4).
def pumpkins_generator(nz: int, ngf: int, nc: int, size: int = 64) -> nn.Sequential:
    return dcgan_generator(nz, nc, [ngf * w for w in block_widths((4, 8, 16, 32), size)])


def pumpkins_discriminator(ndf: int, nc: int, size: int = 64) -> nn.Sequential:
    return dcgan_discriminator(nc, [ndf * w for w in block_widths((1, 1, 2, 4), size)], first_bn=False)


# ------------------------------------------------------------------ the 28x28 seeds
def _only_28(size: int) -> None:
    if size != 28:
        raise ValueError(f"this seed's layer list makes 28x28 images, not {size}")


# 002 MNIST (pyimagesearch): transposed conv -> ReLU -> BN; D is two biased convs and two
# fully connected layers (hidden 512 at ndf=32, so 16 * ndf).
def mnist_generator(nz: int, ngf: int, nc: int, size: int = 28) -> nn.Sequential:
    _only_28(size)
    return nn.Sequential(
        _up(nz, ngf * 4, 4, 2, 0), nn.ReLU(), nn.BatchNorm2d(ngf * 4),  # 4x4
        _up(ngf * 4, ngf * 2, 3, 2, 1), nn.ReLU(), nn.BatchNorm2d(ngf * 2),  # 7x7
        _up(ngf * 2, ngf), nn.ReLU(), nn.BatchNorm2d(ngf),  # 14x14
        _up(ngf, nc), nn.Tanh(),  # 28x28
    )  # fmt: skip


def mnist_discriminator(ndf: int, nc: int, size: int = 28) -> nn.Sequential:
    _only_28(size)
    return nn.Sequential(
        nn.Conv2d(nc, ndf, 4, 2, 1), _lrelu(),  # 14x14
        nn.Conv2d(ndf, ndf * 2, 4, 2, 1), _lrelu(),  # 7x7
        nn.Flatten(),
        nn.Linear(ndf * 2 * 7 * 7, ndf * 16), _lrelu(),
        nn.Linear(ndf * 16, 1),  # logit
    )  # fmt: skip


# 004 Kuzushiji-MNIST (R torch): widths from the image size (ngf = ndf = 28 -> 112, 56, 28)
# and a padding-2 transposed conv for 8x8 -> 14x14.
def kmnist_generator(nz: int, ngf: int, nc: int, size: int = 28) -> nn.Sequential:
    _only_28(size)
    return nn.Sequential(
        _up(nz, ngf * 4, 4, 1, 0), nn.BatchNorm2d(ngf * 4), nn.ReLU(),  # 4x4
        _up(ngf * 4, ngf * 2), nn.BatchNorm2d(ngf * 2), nn.ReLU(),  # 8x8
        _up(ngf * 2, ngf, 4, 2, 2), nn.BatchNorm2d(ngf), nn.ReLU(),  # 14x14
        _up(ngf, nc), nn.Tanh(),  # 28x28
    )  # fmt: skip


def kmnist_discriminator(ndf: int, nc: int, size: int = 28) -> nn.Sequential:
    _only_28(size)
    return nn.Sequential(
        _down(nc, ndf), _lrelu(),  # 14x14
        _down(ndf, ndf * 2), nn.BatchNorm2d(ndf * 2), _lrelu(),  # 7x7
        _down(ndf * 2, ndf * 4), nn.BatchNorm2d(ndf * 4), _lrelu(),  # 3x3
        _down(ndf * 4, 1),  # 1x1 logit
    )  # fmt: skip


@dataclass(frozen=True)
class Arch:
    generator: Callable[..., nn.Module]  # (nz, ngf, nc, size) -> G
    discriminator: Callable[..., nn.Module]  # (ndf, nc, size) -> D
    sizes: tuple[int, ...]  # the image sizes it makes
    seed_size: int  # its seed's (and configs/*.yaml's) image size


ARCHS: dict[str, Arch] = {
    "celeba": Arch(celeba_generator, celeba_discriminator, DCGAN_SIZES, 64),
    "pumpkins": Arch(pumpkins_generator, pumpkins_discriminator, DCGAN_SIZES, 64),
    "mnist": Arch(mnist_generator, mnist_discriminator, (28,), 28),
    "pokemon": Arch(celeba_generator, pokemon_discriminator, DCGAN_SIZES, 64),
    "kmnist": Arch(kmnist_generator, kmnist_discriminator, (28,), 28),
}
ARCH_IMAGE_SIZE = {arch: a.seed_size for arch, a in ARCHS.items()}  # each seed's image size
ARCH_IMAGE_SIZES = {arch: a.sizes for arch, a in ARCHS.items()}  # every size each arch makes


def size_list(sizes: tuple[int, ...]) -> str:
    """(32, 64, 128) -> '32x32, 64x64 or 128x128'."""
    names = [f"{s}x{s}" for s in sizes]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


@dataclass
class ModelConfig:
    """Which reference architecture, at which widths and image size (the layer lists above)."""

    arch: str = "celeba"  # celeba | pumpkins | mnist | pokemon | kmnist
    # Square image size. celeba, pokemon and pumpkins: 32, 64, 128 or 256 (blocks added or
    # removed by the DCGAN rule, the extra ones at the widest width; 64 is the seed's net);
    # mnist and kmnist: 28 only.
    image_size: int = 64
    channels: int = 3  # image channels (1 grey, 3 RGB); decoded images are converted to it
    nz: int = 100  # latent size
    ngf: int = 64  # generator base width
    ndf: int = 64  # discriminator base width
    # Decay of the moving average of G's weights (the EMA generator used for sample
    # grids); it ramps up as min(decay, (1 + step) / (10 + step)). 0 disables it.
    ema_decay: float = 0.999
    # Spectral norm (Miyato et al. 2018) on every conv and linear layer of D (and a
    # conditional D's class embedding): each weight
    # divided by its largest singular value (one power iteration per forward), which keeps
    # D 1-Lipschitz per layer. D's batch norm layers stay as its arch has them.
    spectral_norm: bool = False
    # Class-conditional G and D (dcgan/models/conditional.py): trained on the shards' labels
    # (their manifest's classes), G given a class with z, D a projection of the class.
    conditional: bool = False
    # Classes of a conditional model; 0: as many as the shards' manifest lists (set at start).
    num_classes: int = 0

    def __post_init__(self) -> None:
        for name in ("image_size", "channels", "nz", "ngf", "ndf"):
            check_field(getattr(self, name) >= 1, name, "must be >= 1")
        check_field(0 <= self.ema_decay < 1, "ema_decay", "must lie in [0, 1) (0 disables the EMA generator)")
        check_field(self.arch in ARCHS, "arch", f"{self.arch!r} is not one of {', '.join(ARCHS)}")
        check_field(self.num_classes >= 0, "num_classes", "must be >= 0 (0: the shards' classes)")
        check_field(
            self.conditional or self.num_classes == 0,
            "num_classes",
            "is for a conditional model: set model.conditional=true",
        )
        sizes = ARCHS[self.arch].sizes
        check_field(
            self.image_size in sizes, "image_size",
            f"arch {self.arch!r} makes {size_list(sizes)} images; {self.image_size} is impossible",
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


def make_nets(m: ModelConfig) -> tuple[nn.Module, nn.Module]:
    """(G, D) for ``m``, as PyTorch initialises them, on the current default device; a
    conditional model's are wrapped (dcgan/models/conditional.py), G taking z and the class's embedding."""
    arch = ARCHS[m.arch]
    if not m.conditional:
        return arch.generator(m.nz, m.ngf, m.channels, m.image_size), arch.discriminator(
            m.ndf, m.channels, m.image_size
        )
    if m.num_classes < 1:
        raise ValueError("model.num_classes is 0: a conditional run sets it from the shards' classes at start")
    generator = ConditionalGenerator(arch.generator(m.nz, m.ngf, m.channels, m.image_size), m.num_classes, m.nz)
    discriminator = ProjectionDiscriminator(arch.discriminator(m.ndf, m.channels, m.image_size), m.num_classes)
    return generator, discriminator


def build_models(cfg: ModelConfig | HasModel) -> tuple[nn.Module, nn.Module]:
    """(G, D) for ``cfg.model`` (or a ModelConfig), DCGAN-initialised, on the CPU."""
    m = getattr(cfg, "model", cfg)
    generator, discriminator = make_nets(m)
    dcgan_init_(generator)
    dcgan_init_(discriminator)
    if m.spectral_norm:  # after the init: the init draws the weight that spectral norm then divides
        spectral_norm_(discriminator)
    return generator, discriminator


def spectral_norm_(net: nn.Module) -> None:
    """Spectral norm on each conv, linear and embedding layer of ``net`` (torch's parametrization: the
    state dict holds ``<layer>.parametrizations.weight.original`` and the power iteration's
    vectors ``_u`` and ``_v``, which checkpoints carry for an exact resume)."""
    for layer in list(net.modules()):
        if isinstance(layer, (nn.Conv2d, nn.Linear, nn.Embedding)):  # the embedding: a projection D's class vectors
            nn.utils.parametrizations.spectral_norm(layer)


def checkpoint_bytes(cfg: ModelConfig | HasModel) -> tuple[int, int, int]:
    """(G's parameters, D's parameters, about how many bytes one checkpoint takes), from the
    nets' shapes alone (built on the meta device: nothing allocated). A checkpoint holds G,
    the EMA generator and D (parameters and buffers), Adam's two moments and step per
    parameter tensor, the RNG states (about 10 kB) and about 250 bytes of zip entry per tensor."""
    m = getattr(cfg, "model", cfg)
    with torch.device("meta"):
        nets = make_nets(m)
        if m.spectral_norm:
            spectral_norm_(nets[1])
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
