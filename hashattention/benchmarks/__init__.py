"""Benchmarks run by `hashattention bench` (GPU)."""
