"""The shipped ml_collections configs, each addressable as `--config=NAME[:ARGS]`."""
