"""Benchmarks (step time, lookup time, what runs on a device): scripts, not library code.

``python -m experiments.benches.step``, ``python -m experiments.benches.lookup``,
``python -m experiments.benches.device`` (each module's docstring says what it measures).
"""
