"""The toy reproduction benchmark: `python -m benchmarks.toy [--quick]`."""
