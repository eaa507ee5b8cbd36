"""Benchmarks: each runs its baseline in the same process and reports the ratio."""
