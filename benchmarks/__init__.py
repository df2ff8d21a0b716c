"""Reproducible benchmarks for lmd_lightning; results are committed under benchmarks/results/."""
