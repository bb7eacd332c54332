"""Benchmarks and result tables, run by hand: `python -m bench.<name>` from the project root."""
