"""The data plans at cluster scale, simulated: no processes, no data, only the plan code
the trainer runs (dcgan/data/stream.py's ``epoch_layout`` and ``slot_span``, dcgan/data/cache.py's
``epoch_permutation`` and ``rank_share``).

    python -m bench.plan_at_scale                      # 512 ranks x 8 workers, 20,000 shards; 10M cached
    python -m bench.plan_at_scale --ranks 64 --shards 2000 --cache-samples 1000000

Shard reader: per epoch, every (rank, worker slot) run of positions, checked for equal
steps per rank, disjoint runs and full coverage (all but fewer than ranks x batch
positions), with the read amplification: each run reads its first shard from the start
(tar is sequential), so bytes read / bytes used = (used + skipped) / used. Cache: the
epoch permutation over every sample and each rank's share, checked the same way.
Planning time is what one worker computes at the start of an epoch, and what the whole
cluster's plan costs when computed in one place (as here).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from dcgan.data.cache import epoch_permutation, rank_share
from dcgan.data.stream import epoch_layout, slot_span, steps_per_epoch


def simulate_shards(counts: np.ndarray, ranks: int, workers: int, batch: int, epoch: int = 0, seed: int = 0) -> dict:
    """The shard reader's plan of one epoch, with its checks and costs."""
    total = int(counts.sum())
    t0 = time.perf_counter()
    steps = steps_per_epoch(total, ranks, batch)
    order, offset = epoch_layout(tuple(int(c) for c in counts), seed, epoch)
    ends = np.cumsum(counts[order])
    one_worker_s = time.perf_counter() - t0  # what each worker computes, besides its own run below
    spans = np.array([slot_span(r, s, steps, workers, batch) for r in range(ranks) for s in range(workers)])
    starts, lengths = spans[:, 0], spans[:, 1]
    absolute = (offset + starts) % total
    first_shard = np.searchsorted(ends, absolute, side="right")
    skipped = absolute - np.concatenate([[0], ends])[first_shard]
    last = (absolute + np.maximum(lengths, 1) - 1) % total  # (a run may wrap around the sequence's end)
    shards_opened = (np.searchsorted(ends, last, side="right") - first_shard) % len(counts) + 1
    plan_s = time.perf_counter() - t0
    by_start = np.argsort(starts)
    contiguous = bool(np.all(starts[by_start][1:] == (starts + lengths)[by_start][:-1]))
    return {
        "samples": total,
        "steps": steps,
        "steps_per_rank": lengths.reshape(ranks, workers).sum(axis=1) // batch,
        "disjoint_and_contiguous": contiguous and starts[by_start][0] == 0,
        "used": int(lengths.sum()),
        "unused": total - int(lengths.sum()),
        "read_amplification": float((lengths.sum() + skipped[lengths > 0].sum()) / lengths.sum()),
        "shard_opens": int(shards_opened[lengths > 0].sum()),
        "plan_s": plan_s,
        "one_worker_plan_s": one_worker_s,
    }


def simulate_cache(samples: int, ranks: int, batch: int, seed: int = 0) -> dict:
    """The cache's plan of epochs 0 and 1 over ``samples``, with its checks and costs."""
    t0 = time.perf_counter()
    steps = steps_per_epoch(samples, ranks, batch)
    order = epoch_permutation(samples, seed, 0)
    shares = [rank_share(order, r, steps, batch) for r in range(ranks)]
    plan_s = time.perf_counter() - t0
    drawn = torch.bincount(torch.cat([s.reshape(-1) for s in shares]), minlength=samples)
    return {
        "samples": samples,
        "steps": steps,
        "steps_per_rank": np.array([len(s) for s in shares]),
        "most_draws_of_a_sample": int(drawn.max()),
        "used": int((drawn > 0).sum()),
        "unused": int((drawn == 0).sum()),
        "new_order_next_epoch": not torch.equal(order, epoch_permutation(samples, seed, 1)),
        "plan_s": plan_s,
    }


def uneven_counts(shards: int, seed: int = 0) -> np.ndarray:
    """Shard sizes as writers leave them: mostly ~1000, some short, a few empty or large."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(500, 1500, shards)
    short = rng.random(shards) < 0.05  # cut short, or empty (planned 0: never opened)
    counts[short] = rng.integers(0, 100, short.sum())
    large = rng.random(shards) < 0.01
    counts[large] = rng.integers(2000, 5000, large.sum())
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=512)
    parser.add_argument("--workers", type=int, default=8, help="DataLoader workers per rank")
    parser.add_argument("--shards", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=64, help="per rank")
    parser.add_argument("--cache-samples", type=int, default=10_000_000)
    args = parser.parse_args()

    counts = uneven_counts(args.shards)
    s = simulate_shards(counts, args.ranks, args.workers, args.batch)
    print(f"# shard reader: {args.ranks} ranks x {args.workers} workers, batch {args.batch} per rank, "
          f"{args.shards} shards of {counts.min()}..{counts.max()} samples ({s['samples']} in all)")  # fmt: skip
    print(f"steps per rank          {s['steps']} on every rank: {bool((s['steps_per_rank'] == s['steps']).all())}")
    print(f"runs disjoint, no gaps  {s['disjoint_and_contiguous']}")
    print(f"coverage                {s['used']} of {s['samples']} ({s['unused']} unused < ranks x batch "
          f"{args.ranks * args.batch}: {s['unused'] < args.ranks * args.batch})")  # fmt: skip
    print(f"read amplification      {s['read_amplification']:.3f} (bytes read / bytes used per epoch)")
    print(f"shard opens per epoch   {s['shard_opens']} ({s['shard_opens'] / args.shards:.2f} per shard)")
    print(f"planning time           {s['one_worker_plan_s'] * 1e3:.1f} ms per worker, "
          f"{s['plan_s']:.2f} s for the whole cluster's plan in one process")  # fmt: skip
    c = simulate_cache(args.cache_samples, args.ranks, args.batch)
    print(f"# cache: {args.cache_samples} samples, {args.ranks} ranks, batch {args.batch} per rank")
    print(f"steps per rank          {c['steps']} on every rank: {bool((c['steps_per_rank'] == c['steps']).all())}")
    print(f"shares disjoint         {c['most_draws_of_a_sample'] == 1} (most draws of one sample: "
          f"{c['most_draws_of_a_sample']})")  # fmt: skip
    print(f"coverage                {c['used']} of {c['samples']} ({c['unused']} unused)")
    print(f"new order next epoch    {c['new_order_next_epoch']}")
    print("read amplification      one decoding pass per run; nothing read per epoch")
    print(f"planning time           {c['plan_s']:.2f} s per epoch (the permutation, on every rank)")


if __name__ == "__main__":
    main()
