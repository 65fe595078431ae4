"""Micro-benchmarks of the scheduling code (pure Python, no engine)."""
