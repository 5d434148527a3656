"""The split plans at cluster scale, simulated without processes (bench/plan_at_scale.py
runs the trainer's own plan functions): 512 ranks x 8 workers over 20,000 shards of uneven
sizes, and the cache over 10M samples. Every rank runs the same number of steps, the
shares are disjoint, and all but fewer than one global batch of samples are used."""

from bench.plan_at_scale import simulate_cache, simulate_shards, uneven_counts

RANKS, WORKERS, BATCH = 512, 8, 64


def test_shard_plan_at_512_ranks_x_8_workers_over_20000_uneven_shards():
    counts = uneven_counts(20_000)
    assert counts.min() == 0 and counts.max() > 4 * counts.mean()  # empty and large shards among them
    for epoch in (0, 1):
        plan = simulate_shards(counts, RANKS, WORKERS, BATCH, epoch=epoch)
        assert (plan["steps_per_rank"] == plan["steps"]).all()
        assert plan["disjoint_and_contiguous"]
        assert plan["used"] == RANKS * BATCH * plan["steps"] and 0 <= plan["unused"] < RANKS * BATCH
        assert 1.0 < plan["read_amplification"] < 1.25  # each run re-reads part of its first shard only


def test_cache_plan_over_10m_samples():
    plan = simulate_cache(10_000_000, RANKS, BATCH)
    assert (plan["steps_per_rank"] == plan["steps"]).all() and plan["steps"] == 10_000_000 // (RANKS * BATCH)
    assert plan["most_draws_of_a_sample"] == 1  # disjoint
    assert plan["unused"] == 10_000_000 - RANKS * BATCH * plan["steps"] < RANKS * BATCH
    assert plan["new_order_next_epoch"]
