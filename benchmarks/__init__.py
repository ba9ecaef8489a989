"""Benchmarks of readme_jax against its baselines, as ratios measured in the same run.

``python -m benchmarks [NAME ...] [--quick] [--out DIR]`` (:mod:`benchmarks.runner`, which also says how to
register a new benchmark); shared timing / subprocess / row helpers in :mod:`benchmarks.common`.

This package imports neither jax nor torch at import time: every measured variant runs in its own fresh
subprocess with the thread settings of :mod:`benchmarks.common`.
"""
