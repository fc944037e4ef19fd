"""The pieces of benchmark.py: FLOPs, synthetic data, assets, the worker, the launcher and the report."""
