"""Unlearning benchmarks (docs/unlearning.md)."""
