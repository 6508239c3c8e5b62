"""Benchmark conventions.

Every benchmark puts ``impl`` (``"pyqshare"`` for the default one-thread run, ``"pyqshare 2 threads"``,
``"numpy"``, ``"scikit-learn"`` ...) and, where throughput matters, ``bytes`` (bytes processed per call)
into ``benchmark.extra_info``, and a ``group`` naming the workload. Quality figures (for example
``inertia_vs_optimal``) go into ``extra_info`` too. Every benchmark also asserts that its result agrees
with the reference. ``python -m bench`` turns the JSON into one table of ratios.

Sizes: ``PYQSHARE_BENCH_SCALE=full`` (set by ``python -m bench``) runs the sizes the README quotes;
anything else (the default, used by the test suite's smoke run) runs tiny sizes.
"""

from __future__ import annotations

import os

import pytest

FULL = os.environ.get("PYQSHARE_BENCH_SCALE", "tiny") == "full"


@pytest.fixture(scope="session")
def scaled():
    """``scaled(full, tiny)`` is ``full`` when running the real benchmark, ``tiny`` in the smoke run.

    A fixture rather than an import: bench files are collected with ``--import-mode=importlib``.
    """
    return lambda full, tiny: full if FULL else tiny


@pytest.fixture
def run_once(benchmark):
    """Time a slow peer with a single call (pytest-benchmark would otherwise repeat it for seconds)."""

    def run(fn, *args, **kwargs):
        return benchmark.pedantic(fn, args=args, kwargs=kwargs, rounds=1, iterations=1, warmup_rounds=0)

    return run
