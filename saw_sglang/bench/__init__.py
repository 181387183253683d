"""Benchmarks: `python -m saw_sglang.bench.kernels` (attention and write kernels)."""
