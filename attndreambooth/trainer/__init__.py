"""The run's lifecycle: preflight checks, the models prepared, each stage trained, state checkpointed and resumed,
the run folder written."""
