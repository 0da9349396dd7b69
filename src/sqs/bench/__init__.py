"""Benchmarks. Every number is a ratio to a baseline measured in the same run,
interleaved round-robin so machine noise hits all variants alike."""
