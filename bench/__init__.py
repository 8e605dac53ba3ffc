"""Speed benchmarks beside the package: the layouts they build with random weights and the released code's step
kept to measure against (scripts/benchmark.py)."""
