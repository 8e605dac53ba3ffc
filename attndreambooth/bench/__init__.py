"""The benchmarks: DreamBench, the shapes world, their statistics and figures, and the released code's step kept
to measure against."""
