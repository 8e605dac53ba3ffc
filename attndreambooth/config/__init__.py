"""The config: its schema, its checks, how it is read, and the run's plan built from it (the bottom layer)."""
