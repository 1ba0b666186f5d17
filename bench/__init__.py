"""The gesture service's benchmark: `python -m bench [--quick]` (see bench/README.md)."""
