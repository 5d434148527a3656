"""The baseline: a plain seed-style DCGAN loop, as pytorch/examples' dcgan and the seed
write-ups run it. fp32, D ending in Sigmoid with BCELoss, D on real then fake
(separate batches), one D step, one G step through D, no EMA, no DDP, G sampled in
train mode (batch statistics). It takes architecture, DCGAN init, Adam settings and data
stream from the config it is given (bench/quality.py gives it the seeds' Adam settings).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from dcgan.config.sections import Config
from dcgan.models.networks import build_models, sample_latent


class PlainLoop:
    def __init__(self, cfg: Config, device: torch.device):
        torch.manual_seed(cfg.train.seed)
        generator, discriminator = build_models(cfg)
        self.netG = generator.to(device)
        self.netD = nn.Sequential(discriminator, nn.Sigmoid()).to(device)
        o = cfg.optim
        self.optG = torch.optim.Adam(self.netG.parameters(), lr=o.g.lr, betas=o.g.betas)
        self.optD = torch.optim.Adam(self.netD.parameters(), lr=o.d.lr, betas=o.d.betas)
        self.criterion = nn.BCELoss()
        self.nz, self.device = cfg.model.nz, device

    def step(self, real: torch.Tensor) -> None:
        n = real.shape[0]
        label = torch.full((n,), 1.0, device=self.device)
        self.netD.zero_grad()
        err_real = self.criterion(self.netD(real).view(-1), label)
        err_real.backward()
        fake = self.netG(sample_latent(n, self.nz, self.device))
        label.fill_(0.0)
        err_fake = self.criterion(self.netD(fake.detach()).view(-1), label)
        err_fake.backward()
        self.optD.step()
        self.netG.zero_grad()
        label.fill_(1.0)
        err_g = self.criterion(self.netD(fake).view(-1), label)
        err_g.backward()
        self.optG.step()

    def sample(self, z: torch.Tensor) -> torch.Tensor:
        """G(z) as the seeds draw their sample grids: in train mode."""
        return self.netG(z)


def batches(loader, start_epoch: int = 0) -> Iterator[torch.Tensor]:
    """The loader's batches, epoch after epoch."""
    epoch = start_epoch
    while True:
        for images, _ in loader.epoch(epoch):
            yield images
        epoch += 1
