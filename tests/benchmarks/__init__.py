"""Benchmark harness for bol-proxy: ``python -m tests.benchmarks.bench`` (see bench.py).

Nothing here is collected by pytest (no module starts with ``test_``) and no timing is
asserted anywhere: the harness measures and prints, people judge.
"""
