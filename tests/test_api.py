"""The public surface: exports, thread-count default, documentation and stub completeness."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest

import pyqshare
import pyqshare._core as core
import pyqshare.kernels as kernels

ROOT = Path(__file__).resolve().parents[1]
KERNELS = ["kmeans1d", "nm_mask", "magnitude_mask", "nm_compress", "nm_decompress", "scale_search",
           "quantize", "dequantize", "chunk_hash", "tensor_digest"]


def test_kernels_are_reexported_from_the_package():
    for name in KERNELS:
        assert name in kernels.__all__
        assert getattr(pyqshare, name) is getattr(kernels, name)


@pytest.mark.parametrize("name", KERNELS)
def test_every_argument_is_documented(name):
    fn = getattr(kernels, name)
    doc = inspect.getdoc(fn) or ""
    missing = [p for p in inspect.signature(fn).parameters if not re.search(rf"\b{p}\b", doc)]
    assert not missing, f"{name} docstring does not describe {missing}"


def test_num_threads_default_roundtrip_and_validation():
    before = pyqshare.get_num_threads()
    assert before == 1
    try:
        pyqshare.set_num_threads(3)
        assert kernels.get_num_threads() == 3
    finally:
        pyqshare.set_num_threads(before)
    with pytest.raises(ValueError, match=">= 1"):
        pyqshare.set_num_threads(0)
    with pytest.raises(TypeError, match="positive int"):
        pyqshare.set_num_threads(2.0)
    assert pyqshare.available_cores() >= 1


def test_stub_declares_every_compiled_function():
    stub = ast.parse((ROOT / "pyqshare" / "_core.pyi").read_text())
    declared = {n.name for n in stub.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    compiled = {n for n in dir(core) if not n.startswith("__")}
    assert compiled - declared == set(), "functions missing from _core.pyi"
    assert declared - compiled == set(), "stub declares functions the module lacks"


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    commands = re.findall(r"^(pip install torch.*pytest.*)$", readme, flags=re.M)
    assert commands, "README lacks the test command"
    assert commands[0] in ci.splitlines()


def test_readme_example_runs(capsys):
    readme = (ROOT / "README.md").read_text()
    example = re.search(r"```python\n(.*?)```", readme, flags=re.S).group(1)
    exec(compile(example, "README.md", "exec"), {})
    printed = capsys.readouterr().out.split()
    assert printed[:2] == ["(512,", "16)"] and printed[2] == "uint8"


def test_human_output_prints_short_record_lists_as_tables(capsys):
    from pyqshare import cli

    cli._print_human({"pairs": [{"a": 0, "b": 1, "identical": 95, "matches": [1]}], "groups": [{"x": 1}] * 65})
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "pairs:"
    assert lines[1].split() == ["a", "b", "identical"] and lines[2].split() == ["0", "1", "95"]
    assert lines[3] == "groups: 65 entries (use --json for all)"
