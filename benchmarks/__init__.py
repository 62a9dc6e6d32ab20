"""Benchmark scripts: each prints a table. Run them as modules from the repository root,
e.g. ``python -m benchmarks.bench_dissect --quick`` (see docs/performance.md)."""
