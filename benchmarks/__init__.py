"""Benchmarks (throughput, MFU, memory, decode speed); results are written up in BENCHMARKS.md."""
