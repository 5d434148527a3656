"""Sample-quality scores from two feature matrices (real (N, D), generated (M, D)).

* FID and KID: torchmetrics' ``FrechetInceptionDistance`` / ``KernelInceptionDistance``,
  fed features that are already extracted (``_Precomputed`` passes them through), so
  the extractor, the batching and the split over ranks stay ours (dcgan/eval.py) and
  torchmetrics never syncs states across processes (``sync_on_compute=False``: the
  features arrive here gathered, in sample order, on one process).
* Precision and recall: Kynkäänniemi et al. 2019 (k-NN manifolds, k = 3). torchmetrics
  has no implementation, so it is written out below: a real sample's manifold is the
  ball reaching its k-th nearest real neighbour; precision is the share of generated
  samples inside some real ball, recall the share of real samples inside some generated
  ball. Low recall: the generator misses modes; low precision: off-manifold samples.
* Degenerate samples (``sample_spread`` / ``degenerate_reason``): images so alike, or so
  flat, that the scores above say nothing about the generator. A batch of uniform grey
  images can score a tiny FID and precision 1.0 on weak features; such scores are
  flagged, and never make a best checkpoint (dcgan/eval.py).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn


class _Precomputed(nn.Module):
    """The 'feature extractor' handed to torchmetrics: features in, features out."""

    def __init__(self, dim: int):
        super().__init__()
        self.num_features = dim

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def quality_scores(
    real: torch.Tensor,
    fake: torch.Tensor,
    *,
    k: int = 3,
    kid_subsets: int = 50,
    kid_subset_size: int = 1000,
    seed: int = 0,
) -> dict[str, float]:
    """FID, KID (mean and std over random subsets), precision and recall. Deterministic:
    KID's subsets are drawn from ``seed`` without touching the caller's RNG. ``kid_std`` is
    left out when no two subsets can differ (both sets no larger than a subset: every
    subset is the whole set, and the std would be a meaningless 0)."""
    # Imported here: torchmetrics (with the scipy and matplotlib it loads) adds about 2 s to
    # the start of every process that imports the trainer, and most runs never score.
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    if len(real) < k + 1 or len(fake) < k + 1:
        raise ValueError(f"need more than k={k} real and generated samples, got {len(real)} and {len(fake)}")
    real, fake = real.float().cpu(), fake.float().cpu()
    dim = real.shape[1]
    fid = FrechetInceptionDistance(feature=_Precomputed(dim), sync_on_compute=False)
    fid.update(real, real=True)
    fid.update(fake, real=False)
    subset = min(kid_subset_size, len(real), len(fake))
    with warnings.catch_warnings():  # "will save all extracted features": that is the point here
        warnings.simplefilter("ignore", UserWarning)
        kid = KernelInceptionDistance(
            feature=_Precomputed(dim), subsets=kid_subsets, subset_size=subset, sync_on_compute=False
        )
    kid.update(real, real=True)
    kid.update(fake, real=False)
    with torch.random.fork_rng(devices=[]):  # KID draws its subsets with the global RNG
        torch.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
    precision, recall = precision_recall(real, fake, k=k)
    scores = {"fid": float(fid.compute()), "kid": float(kid_mean)}
    if subset < max(len(real), len(fake)):
        scores["kid_std"] = float(kid_std)
    return {**scores, "precision": precision, "recall": recall}


def fid_score(real: torch.Tensor, fake: torch.Tensor) -> float:
    """FID alone (``quality_scores``' torchmetrics FID): an intra-class FID's, on one class's
    features. Needs at least 2 real and 2 generated samples (ValueError)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    if len(real) < 2 or len(fake) < 2:
        raise ValueError(f"FID needs at least 2 real and 2 generated samples, got {len(real)} and {len(fake)}")
    real, fake = real.float().cpu(), fake.float().cpu()
    fid = FrechetInceptionDistance(feature=_Precomputed(real.shape[1]), sync_on_compute=False)
    fid.update(real, real=True)
    fid.update(fake, real=False)
    return float(fid.compute())


# Degenerate samples, in grey levels of 0..255. A real image set spreads by tens of levels
# per pixel across images (Fashion-MNIST: about 90) and within an image; 2 levels is what
# rounding and a whisper of noise give a generator that makes one image.
SAME_IMAGE_SPREAD = 2.0  # mean over pixels of the per-pixel std across the samples
FLAT_IMAGE_STD = 2.0  # std of one image's pixels: below it the image is flat
FLAT_SHARE = 0.5  # this share of flat images or more is degenerate
SAME_FEATURES = 1e-3  # generated features' total variance below this share of the real ones'


class PixelStats:
    """Sums of generated uint8 images from which the degenerate checks are made; summed
    per rank and combined on rank 0 (``merge``), so any split over ranks gives the same."""

    def __init__(self) -> None:
        self.n, self.flat, self.sum, self.sum_sq = 0, 0, None, None

    def add(self, images: torch.Tensor) -> None:
        x = images.detach().to("cpu", torch.float64).flatten(1)
        self.n += len(x)
        self.flat += int((x.std(dim=1, correction=0) < FLAT_IMAGE_STD).sum())
        s, sq = x.sum(0), x.square().sum(0)
        self.sum = s if self.sum is None else self.sum + s
        self.sum_sq = sq if self.sum_sq is None else self.sum_sq + sq

    @classmethod
    def merge(cls, parts: list["PixelStats"]) -> "PixelStats":
        out = cls()
        for p in parts:
            if p.n:
                out.n, out.flat = out.n + p.n, out.flat + p.flat
                out.sum = p.sum if out.sum is None else out.sum + p.sum
                out.sum_sq = p.sum_sq if out.sum_sq is None else out.sum_sq + p.sum_sq
        return out

    def spread(self) -> float:
        """Mean over pixels of the per-pixel std across the samples (grey levels)."""
        if not self.n:
            return 0.0
        mean = self.sum / self.n
        return float((self.sum_sq / self.n - mean.square()).clamp_min(0).sqrt().mean())


def degenerate_reason(stats: PixelStats, real: torch.Tensor, fake: torch.Tensor) -> str | None:
    """Why the generated samples are degenerate (None: they are not): nearly one image,
    mostly flat images, or features that hardly vary against the real ones'."""
    spread = stats.spread()
    if spread < SAME_IMAGE_SPREAD:
        return f"the samples are nearly one image (pixels vary by {spread:.2f} of 255 across them)"
    if stats.flat >= FLAT_SHARE * stats.n:
        return f"{stats.flat} of {stats.n} samples are flat images (pixel std under {FLAT_IMAGE_STD:g} of 255)"
    real_var, fake_var = real.float().var(0).sum().item(), fake.float().var(0).sum().item()
    if real_var > 0 and fake_var < SAME_FEATURES * real_var:
        return f"the samples' features hardly vary ({fake_var / real_var:.1e} of the real features' variance)"
    return None


def knn_radii(features: torch.Tensor, k: int, chunk: int = 2048) -> torch.Tensor:
    """Distance from each sample to its k-th nearest other sample of the same set."""
    radii = []
    for i in range(0, len(features), chunk):
        d = torch.cdist(features[i : i + chunk], features)
        radii.append(d.kthvalue(k + 1, dim=1).values)  # k + 1: the sample itself is at 0
    return torch.cat(radii)


def share_inside(queries: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk: int = 2048) -> float:
    """Share of ``queries`` inside at least one ball (centre, radius)."""
    inside = 0
    for i in range(0, len(queries), chunk):
        d = torch.cdist(queries[i : i + chunk], centres)
        inside += (d <= radii.unsqueeze(0)).any(dim=1).sum().item()
    return inside / len(queries)


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
    precision = share_inside(fake, real, knn_radii(real, k))
    recall = share_inside(real, fake, knn_radii(fake, k))
    return precision, recall


def format_scores(scores: dict) -> str:
    kid_std = f" ± {scores['kid_std']:.5f}" if "kid_std" in scores else ""
    line = (
        f"FID {scores['fid']:.3f} | KID {scores['kid']:.5f}{kid_std} | "
        f"precision {scores['precision']:.3f} | recall {scores['recall']:.3f}"
    )
    if scores.get("degenerate"):
        line += f" | DEGENERATE: {scores.get('degenerate_reason', 'degenerate samples')}, not a best"
    return line


def protocol_tag(protocol: dict | None) -> str:
    """The protocol in a few characters, for log lines: ``classifier@1a2b3c4d 5000v10000``."""
    if not protocol:
        return ""
    return f"{protocol['extractor']}@{protocol['sha256'][:8]} {protocol['generated']}v{protocol['real']}"


def describe_protocol(protocol: dict) -> str:
    """The protocol in one line, logged once when the evaluator is built."""
    return (
        f"{protocol['extractor']} {protocol['weights']} (sha256 {protocol['sha256']}), resize {protocol['resize']}, "
        f"{protocol['generated']} generated vs {protocol['real']} real images ({protocol['real_split']})"
    )
