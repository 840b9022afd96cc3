"""Benchmarks of the collection against its peers (ANTs, ConvexAdam, elastix), run from the repository root:
``python -m benchmarks.run_benchmark``."""
