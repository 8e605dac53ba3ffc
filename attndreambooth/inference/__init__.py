"""Sampling from what a run saved: the pipeline assembled from a run folder or files, sampling, attention maps."""
