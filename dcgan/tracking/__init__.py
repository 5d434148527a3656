"""Where progress goes: metrics.jsonl, sample grids, plots, provenance and W&B."""
