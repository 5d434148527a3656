"""Every seed config builds its seed's nets: layer lists, shapes, parameter counts, init."""

from pathlib import Path

import pytest
import torch
from torch import nn

from dcgan.config.loading import load_config
from dcgan.models.networks import build_models, ema_copy, ema_decay, update_ema

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
