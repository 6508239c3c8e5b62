"""Shared fixtures. Models and backends are real: no mocks."""

from __future__ import annotations

import os

import pytest

from pyqshare.qnn import qnn_available


@pytest.fixture(scope="session")
def require_qnn() -> None:
    """Skip when onnxruntime-qnn is missing, unless CI demands it (PYQSHARE_REQUIRE_QNN=1): then fail."""
    if qnn_available():
        return
    if os.environ.get("PYQSHARE_REQUIRE_QNN") == "1":
        pytest.fail("PYQSHARE_REQUIRE_QNN=1 but onnxruntime-qnn is not installed")
    pytest.skip("onnxruntime-qnn is not installed")
