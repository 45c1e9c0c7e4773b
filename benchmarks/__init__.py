"""Benchmarks of lime_attr against established attribution methods.

The faithfulness and cost benchmark lives in :mod:`benchmarks.faithfulness`
(``python -m benchmarks.faithfulness``); the small models it explains are trained
by :mod:`benchmarks.bench_models`.
"""
