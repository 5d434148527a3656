"""The cache's split under a real process group; run by test_cache.py under
``torchrun --nproc_per_node=2 tests/cache_checks.py SHARDS`` (gloo on the CPU), on shards
whose label is each sample's index.

Each rank builds the cache from its share of the decoding, reads epochs 0 to 2 and one
epoch resumed mid-way; rank 0 checks, over both ranks: the same cache everywhere, equal
steps, disjoint shares that cover the set, a new order each epoch, and the resumed
batches equal to the rest of the uninterrupted epoch. Each rank also checks that the ranks
agree on one rank's refusal of the cache (``agree_on_cache``).
Prints "cache checks passed" on rank 0; any failure raises (non-zero exit).
"""

import sys

import torch

from dcgan.config.sections import DataConfig
from dcgan.data.cache import CacheChoice, CachedLoader, agree_on_cache
from dcgan.data.shardset import resolve_shards
from dcgan.run import distributed

BATCH = 8


def main(shards: str) -> None:
    info = distributed.setup("cpu")
    cfg = DataConfig(shards=shards, workers=1, cache="on")
    loader = CachedLoader(resolve_shards(cfg), cfg, info, batch_size=BATCH, image_size=28, channels=1, seed=3)
    epochs = [[(x, y) for x, y in loader.epoch(e)] for e in range(3)]
    resumed = [(x, y) for x, y in loader.epoch(1, start_batch=5)]
    mine = {
        "steps": loader.steps_per_epoch,
        "samples": loader.samples,
        "pixels": loader.pixels[loader.index].sum().item(),  # the same cache on every rank
        "labels": [[y.tolist() for _, y in epoch] for epoch in epochs],
        "resumed_ok": all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(resumed, epochs[1][5:]))
        and len(resumed) == len(epochs[1]) - 5,
    }
    # Rank 0 would cache and rank 1 would not (less free GPU memory): neither does.
    agreed = agree_on_cache(CacheChoice(info.rank == 0, f"choice of rank {info.rank}"), info)
    assert agreed == CacheChoice(False, "rank 1: choice of rank 1; every rank reads the shards"), agreed
    ranks = distributed.gather_objects(mine, info)
    if info.is_main:
        check(ranks, loader.samples)
        print("cache checks passed", flush=True)
    distributed.barrier(info)
    distributed.teardown()


def check(ranks: list[dict], samples: int) -> None:
    assert len({(r["steps"], r["samples"], r["pixels"]) for r in ranks}) == 1, "ranks hold different caches"
    steps = ranks[0]["steps"]
    assert steps == samples // (len(ranks) * BATCH)
    orders = []
    for e in range(3):
        seen = [label for r in ranks for batch in r["labels"][e] for label in batch]
        assert all(len(r["labels"][e]) == steps for r in ranks), f"epoch {e}: unequal steps"
        assert len(seen) == len(set(seen)) == steps * BATCH * len(ranks), f"epoch {e}: shares overlap"
        assert set(seen) <= set(range(samples))
        orders.append(seen)
    assert orders[0] != orders[1] != orders[2], "an epoch repeated the order of the one before"
    assert len(set(orders[0]) | set(orders[1]) | set(orders[2])) == samples  # every sample is drawn
    assert all(r["resumed_ok"] for r in ranks), "a resumed epoch differs from the uninterrupted one"


if __name__ == "__main__":
    main(sys.argv[1])
