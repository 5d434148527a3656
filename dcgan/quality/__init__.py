"""Sample quality: feature extractors, the scores (FID, KID, precision/recall) and the evaluator."""
