"""Benchmarks of moe-offload, run from the repository root as `python -m bench.<script>`; bench/RESULTS.md sums up
what they measured, from the raw files in bench/results/."""
