"""Benchmark harness for spts-compile: real models, offline long-context tasks, speed and accuracy.

Run from the repository root: `python -m benchmarks.run --quick`. See benchmarks/README.md.
"""
