"""Explainability (paper §7): block/head class-embedding gradients, baselines, deletion curves."""
