"""Every seed config builds its seed's nets: layer lists, shapes, parameter counts, init; the
64x64 seeds' family at 32, 128 and 256 follows the DCGAN rule; impossible sizes are refused."""

from pathlib import Path

import pytest
import torch
from torch import nn

from dcgan.base.checks import ConfigError
from dcgan.config.loading import load_config
from dcgan.models.networks import (
    ARCHS,
    ModelConfig,
    build_models,
    checkpoint_bytes,
    dcgan_init_,
    ema_copy,
    ema_decay,
    update_ema,
)

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))

# Parameter counts worked out by hand from each seed's layer list at the config's widths:
# weights of every conv (cin * cout * k * k), 2 * C per batch norm, Linear weights + biases.
PARAM_COUNTS = {
    # G: 100*512*16 + 512*256*16 + 256*128*16 + 128*64*16 + 64*3*16 + 2*(512+256+128+64)
    # D: 3*64*16 + 64*128*16 + 128*256*16 + 256*512*16 + 512*16 + 2*(128+256+512)
    "celeba": (3_576_704, 2_765_568),
    # G: 64*2048*16 + 2048*1024*16 + 1024*512*16 + 512*256*16 + 256*3*16 + 2*(2048+1024+512+256)
    # D: 3*64*16 + 64*64*16 + 64*128*16 + 128*256*16 + 256*16 + 2*(64+128+256)
    "pumpkins": (46_157_312, 728_960),
    # G: 100*128*16 + 128*64*9 + 64*32*16 + 32*16 + 2*(128+64+32)
    # D: (16*32+32) + (32*64*16+64) + (3136*512+512) + (512+1)
    "mnist": (312_256, 1_640_033),
    "pokemon": (3_576_704, 2_765_568 + 2 * 64),  # celeba's D plus a first-block batch norm
    # G: 100*112*16 + 112*56*16 + 56*28*16 + 28*16 + 2*(112+56+28)
    # D: 16*28 + 28*56*16 + 56*112*16 + 112*16 + 2*(56+112)
    "kmnist": (305_480, 128_016),
}

# The layer lists, in order (the seeds' norm/activation order included).
G_LAYERS = {
    "dcgan": ["ConvTranspose2d", "BatchNorm2d", "ReLU"] * 4 + ["ConvTranspose2d", "Tanh"],
    "mnist": ["ConvTranspose2d", "ReLU", "BatchNorm2d"] * 3 + ["ConvTranspose2d", "Tanh"],
    "kmnist": ["ConvTranspose2d", "BatchNorm2d", "ReLU"] * 3 + ["ConvTranspose2d", "Tanh"],
}
D_LAYERS = {
    "celeba": ["Conv2d", "LeakyReLU"] + ["Conv2d", "BatchNorm2d", "LeakyReLU"] * 3 + ["Conv2d"],
    "pokemon": ["Conv2d", "BatchNorm2d", "LeakyReLU"] * 4 + ["Conv2d"],
    "mnist": ["Conv2d", "LeakyReLU"] * 2 + ["Flatten", "Linear", "LeakyReLU", "Linear"],
    "kmnist": ["Conv2d", "LeakyReLU"] + ["Conv2d", "BatchNorm2d", "LeakyReLU"] * 2 + ["Conv2d"],
}
G_LAYERS.update(celeba=G_LAYERS["dcgan"], pumpkins=G_LAYERS["dcgan"], pokemon=G_LAYERS["dcgan"])
D_LAYERS["pumpkins"] = D_LAYERS["celeba"]


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_builds_its_seed_nets(path):
    cfg = load_config(path)
    m = cfg.model
    G, D = build_models(cfg)
    z = torch.randn(3, m.nz, 1, 1)
    images = G(z)
    assert images.shape == (3, m.channels, m.image_size, m.image_size)
    assert images.abs().max() <= 1  # tanh range
    assert D(images).reshape(-1).shape == (3,)  # one logit per image
    assert (n_params(G), n_params(D)) == PARAM_COUNTS[m.arch]
    assert [type(layer).__name__ for layer in G] == G_LAYERS[m.arch]
    assert [type(layer).__name__ for layer in D] == D_LAYERS[m.arch]


def test_seed_specific_layers():
    def convs(net):
        return [(l.in_channels, l.out_channels, l.kernel_size[0], l.stride[0], l.padding[0], l.bias is not None)
                for l in net if isinstance(l, (nn.Conv2d, nn.ConvTranspose2d))]  # fmt: skip

    G, D = build_models(load_config(CONFIGS[0].parent / "kmnist.yaml"))
    assert convs(G)[2] == (56, 28, 4, 2, 2, False)  # the padding-2 layer: 8x8 -> 14x14
    assert convs(D) == [
        (1, 28, 4, 2, 1, False),
        (28, 56, 4, 2, 1, False),
        (56, 112, 4, 2, 1, False),
        (112, 1, 4, 2, 1, False),
    ]
    G, D = build_models(load_config(CONFIGS[0].parent / "mnist.yaml"))
    assert convs(G)[:2] == [(100, 128, 4, 2, 0, False), (128, 64, 3, 2, 1, False)]
    assert all(bias for *_, bias in convs(D))  # the MNIST seed's D convs keep their biases
    G, D = build_models(load_config(CONFIGS[0].parent / "pumpkins.yaml"))
    assert [c[1] for c in convs(G)] == [2048, 1024, 512, 256, 3]
    assert [c[1] for c in convs(D)] == [64, 64, 128, 256, 1]


def test_widths_and_channels_come_from_config():
    cfg = load_config(
        CONFIGS[0].parent / "celeba.yaml", ["model.ngf=8", "model.ndf=4", "model.nz=10", "model.channels=1"]
    )
    G, D = build_models(cfg)
    assert G[0].in_channels == 10 and G[0].out_channels == 64 and G[-2].out_channels == 1
    assert D[0].in_channels == 1 and D[0].out_channels == 4
    assert G(torch.randn(2, 10, 1, 1)).shape == (2, 1, 64, 64)


def test_dcgan_init():
    torch.manual_seed(0)
    G, D = build_models(load_config(CONFIGS[0].parent / "celeba.yaml"))
    conv_weights = torch.cat([l.weight.flatten() for l in [*G, *D] if isinstance(l, (nn.Conv2d, nn.ConvTranspose2d))])
    bn = [l for l in [*G, *D] if isinstance(l, nn.BatchNorm2d)]
    bn_weights = torch.cat([l.weight for l in bn])
    assert abs(conv_weights.mean().item()) < 1e-3 and abs(conv_weights.std().item() - 0.02) < 1e-3
    assert abs(bn_weights.mean().item() - 1) < 0.01 and abs(bn_weights.std().item() - 0.02) < 0.005
    assert all((l.bias == 0).all() for l in bn)


def test_ema_generator_averages_weights_with_a_ramp_and_copies_buffers():
    G, _ = build_models(load_config(None, ["model.arch=kmnist", "model.image_size=28", "model.channels=1"]))
    ema = ema_copy(G)
    assert all(not p.requires_grad for p in ema.parameters()) and not ema.training
    before = [p.detach().clone() for p in ema.parameters()]
    with torch.no_grad():
        for p in G.parameters():
            p.add_(1.0)
        G[1].running_mean.fill_(3.0)
    steps_done = torch.tensor(1.0, dtype=torch.float64)
    update_ema(ema, G, ema_decay(steps_done, 0.999))  # the ramp: d = min(0.999, 2 / 11)
    d = 2 / 11
    for b, e, g in zip(before, ema.parameters(), G.parameters()):
        torch.testing.assert_close(e, d * b + (1 - d) * g)
    assert torch.equal(ema[1].running_mean, G[1].running_mean)
    update_ema(ema, G, ema_decay(steps_done + 10**6, 0.5))  # late on the decay itself applies
    torch.testing.assert_close(
        next(ema.parameters()), 0.5 * (d * before[0] + (1 - d) * next(G.parameters())) + 0.5 * next(G.parameters())
    )


# --------------------------------------------------------------------------- image sizes
# The 64x64 seeds' nets as they were written out by hand before any other size was made:
# the generic builder must give them back layer for layer at 64.
def _up(cin, cout, k=4, s=2, p=1):
    return nn.ConvTranspose2d(cin, cout, k, s, p, bias=False)


def _down(cin, cout, k=4, s=2, p=1):
    return nn.Conv2d(cin, cout, k, s, p, bias=False)


def _lrelu():
    return nn.LeakyReLU(0.2, inplace=True)


def seed_celeba_generator(nz, ngf, nc):
    return nn.Sequential(
        _up(nz, ngf * 8, 4, 1, 0), nn.BatchNorm2d(ngf * 8), nn.ReLU(True),
        _up(ngf * 8, ngf * 4), nn.BatchNorm2d(ngf * 4), nn.ReLU(True),
        _up(ngf * 4, ngf * 2), nn.BatchNorm2d(ngf * 2), nn.ReLU(True),
        _up(ngf * 2, ngf), nn.BatchNorm2d(ngf), nn.ReLU(True),
        _up(ngf, nc), nn.Tanh(),
    )  # fmt: skip


def seed_celeba_discriminator(ndf, nc):
    return nn.Sequential(
        _down(nc, ndf), _lrelu(),
        _down(ndf, ndf * 2), nn.BatchNorm2d(ndf * 2), _lrelu(),
        _down(ndf * 2, ndf * 4), nn.BatchNorm2d(ndf * 4), _lrelu(),
        _down(ndf * 4, ndf * 8), nn.BatchNorm2d(ndf * 8), _lrelu(),
        _down(ndf * 8, 1, 4, 1, 0),
    )  # fmt: skip


def seed_pokemon_discriminator(ndf, nc):
    return nn.Sequential(
        _down(nc, ndf), nn.BatchNorm2d(ndf), _lrelu(),
        _down(ndf, ndf * 2), nn.BatchNorm2d(ndf * 2), _lrelu(),
        _down(ndf * 2, ndf * 4), nn.BatchNorm2d(ndf * 4), _lrelu(),
        _down(ndf * 4, ndf * 8), nn.BatchNorm2d(ndf * 8), _lrelu(),
        _down(ndf * 8, 1, 4, 1, 0),
    )  # fmt: skip


def seed_pumpkins_generator(nz, ngf, nc):
    return nn.Sequential(
        _up(nz, ngf * 32, 4, 1, 0), nn.BatchNorm2d(ngf * 32), nn.ReLU(True),
        _up(ngf * 32, ngf * 16), nn.BatchNorm2d(ngf * 16), nn.ReLU(True),
        _up(ngf * 16, ngf * 8), nn.BatchNorm2d(ngf * 8), nn.ReLU(True),
        _up(ngf * 8, ngf * 4), nn.BatchNorm2d(ngf * 4), nn.ReLU(True),
        _up(ngf * 4, nc), nn.Tanh(),
    )  # fmt: skip


def seed_pumpkins_discriminator(ndf, nc):
    return nn.Sequential(
        _down(nc, ndf), _lrelu(),
        _down(ndf, ndf), nn.BatchNorm2d(ndf), _lrelu(),
        _down(ndf, ndf * 2), nn.BatchNorm2d(ndf * 2), _lrelu(),
        _down(ndf * 2, ndf * 4), nn.BatchNorm2d(ndf * 4), _lrelu(),
        _down(ndf * 4, 1, 4, 1, 0),
    )  # fmt: skip


SEED_64 = {
    "celeba": (seed_celeba_generator, seed_celeba_discriminator),
    "pokemon": (seed_celeba_generator, seed_pokemon_discriminator),
    "pumpkins": (seed_pumpkins_generator, seed_pumpkins_discriminator),
}
FAMILY = sorted(SEED_64)
SIZES = (32, 64, 128, 256)

# The hidden blocks' widths in base widths: G's from 4x4 out to the image, D's from the
# image in to 4x4. The DCGAN rule: the block next to the image keeps the 64x64 net's width
# there, and the widths grow towards 4x4 as at 64, then stay at the 64x64 net's widest.
G_WIDTHS = {
    "celeba": {32: [4, 2, 1], 64: [8, 4, 2, 1], 128: [8, 8, 4, 2, 1], 256: [8, 8, 8, 4, 2, 1]},
    "pumpkins": {32: [16, 8, 4], 64: [32, 16, 8, 4], 128: [32, 32, 16, 8, 4], 256: [32, 32, 32, 16, 8, 4]},
}
D_WIDTHS = {
    "celeba": {32: [1, 2, 4], 64: [1, 2, 4, 8], 128: [1, 2, 4, 8, 8], 256: [1, 2, 4, 8, 8, 8]},
    "pumpkins": {32: [1, 1, 2], 64: [1, 1, 2, 4], 128: [1, 1, 2, 4, 4], 256: [1, 1, 2, 4, 4, 4]},
}
G_WIDTHS["pokemon"], D_WIDTHS["pokemon"] = G_WIDTHS["celeba"], D_WIDTHS["celeba"]

# (G, D) parameters of RGB nets at ModelConfig's default widths (nz=100, ngf=ndf=64): the
# same counts --dry-run and the start line show. At 64 celeba's are PARAM_COUNTS' above.
PARAM_COUNTS_BY_SIZE = {
    "celeba": {32: (1_068_928, 663_296), 64: (3_576_704, 2_765_568),
               128: (7_772_032, 6_960_896), 256: (11_967_360, 11_156_224)},
    "pokemon": {32: (1_068_928, 663_424), 64: (3_576_704, 2_765_696),
                128: (7_772_032, 6_961_024), 256: (11_967_360, 11_156_352)},
    "pumpkins": {32: (12_140_032, 202_112), 64: (47_336_960, 728_960),
                 128: (114_449_920, 1_778_048), 256: (181_562_880, 2_827_136)},
}  # fmt: skip


def convs(net):
    return [layer for layer in net if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d))]


@pytest.mark.parametrize("arch", FAMILY)
@pytest.mark.parametrize("channels, nz, ngf, ndf", [(3, 100, 64, 64), (1, 10, 8, 4), (3, 64, 16, 64)])
def test_the_family_at_64_is_its_seed_nets_layer_for_layer(arch, channels, nz, ngf, ndf):
    make_g, make_d = SEED_64[arch]
    cfg = ModelConfig(arch=arch, image_size=64, channels=channels, nz=nz, ngf=ngf, ndf=ndf)
    torch.manual_seed(5)
    G, D = build_models(cfg)
    torch.manual_seed(5)
    seed_g, seed_d = make_g(nz, ngf, channels), make_d(ndf, channels)
    dcgan_init_(seed_g)
    dcgan_init_(seed_d)
    for built, seed in ((G, seed_g), (D, seed_d)):
        assert repr(built) == repr(seed)
        got, want = built.state_dict(), seed.state_dict()
        assert list(got) == list(want)
        assert all(got[k].shape == want[k].shape and torch.equal(got[k], want[k]) for k in want)  # same init draws


@pytest.mark.parametrize("arch", FAMILY)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("channels", [1, 3])
def test_the_family_makes_every_size_by_the_dcgan_rule(arch, size, channels):
    ngf, ndf = 2, 3
    G, D = build_models(ModelConfig(arch=arch, image_size=size, channels=channels, nz=8, ngf=ngf, ndf=ndf))
    assert [c.out_channels for c in convs(G)] == [ngf * w for w in G_WIDTHS[arch][size]] + [channels]
    assert [c.out_channels for c in convs(D)] == [ndf * w for w in D_WIDTHS[arch][size]] + [1]
    assert convs(G)[0].in_channels == 8 and convs(D)[0].in_channels == channels
    blocks = len(G_WIDTHS[arch][size])
    assert blocks == size.bit_length() - 3  # log2(size / 4) stride-2 blocks between the image and 4x4
    norms = [type(layer).__name__ for layer in D].count("BatchNorm2d")
    assert norms == (blocks if arch == "pokemon" else blocks - 1)  # celeba, pumpkins: none next to the image
    images = G(torch.randn(2, 8, 1, 1))
    assert images.shape == (2, channels, size, size)
    assert D(images).shape == (2, 1, 1, 1)  # one logit per image
    g_params, d_params, _ = checkpoint_bytes(ModelConfig(arch=arch, image_size=size, channels=channels, nz=8,
                                                         ngf=ngf, ndf=ndf))  # fmt: skip
    assert (g_params, d_params) == (n_params(G), n_params(D))


@pytest.mark.parametrize("arch", FAMILY)
def test_parameter_counts_at_every_size(arch):
    counts = {s: checkpoint_bytes(ModelConfig(arch=arch, image_size=s))[:2] for s in SIZES}
    assert counts == PARAM_COUNTS_BY_SIZE[arch]
    sizes = [checkpoint_bytes(ModelConfig(arch=arch, image_size=s))[2] for s in SIZES]
    assert sizes == sorted(sizes)  # a checkpoint grows with the nets


@pytest.mark.parametrize(
    "arch, size, made",
    [
        ("celeba", 48, "32x32, 64x64, 128x128 or 256x256"),
        ("pokemon", 512, "32x32, 64x64, 128x128 or 256x256"),
        ("pumpkins", 16, "32x32, 64x64, 128x128 or 256x256"),
        ("celeba", 28, "32x32, 64x64, 128x128 or 256x256"),
        ("mnist", 64, "28x28"),
        ("kmnist", 32, "28x28"),
    ],
)
def test_a_size_the_arch_cannot_make_is_one_line_naming_the_sizes_it_can(arch, size, made):
    channels = 3 if ARCHS[arch].seed_size == 64 else 1
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"model.arch={arch}", f"model.channels={channels}", f"model.image_size={size}"])
    message = str(err.value)
    assert "\n" not in message
    assert f"model.image_size: arch {arch!r} makes {made} images; {size} is impossible" in message
