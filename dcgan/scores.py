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
    KID's subsets are drawn from ``seed`` without touching the caller's RNG."""
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
    return {
        "fid": float(fid.compute()),
        "kid": float(kid_mean),
        "kid_std": float(kid_std),
        "precision": precision,
        "recall": recall,
    }


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


def format_scores(scores: dict[str, float]) -> str:
    return (
        f"FID {scores['fid']:.3f} | KID {scores['kid']:.5f} ± {scores['kid_std']:.5f} | "
        f"precision {scores['precision']:.3f} | recall {scores['recall']:.3f}"
    )
