"""What the QNN HTP backend rejects or computes wrongly in a QDQ model, found before compiling it.

Rules (measured on the HTP simulator of onnxruntime-qnn 2.7.0, ../shared/QNN_NOTES.md):

* ``asymmetric-int4`` (error): an int4 weight whose zero point is not 0 (uint4: not 8). The HTP accepts
  it and gives wrong answers (0.175 error on outputs near 1.46); int4 weights must be symmetric.
* ``blockwise-8bit-activations`` (error): a block-wise quantized weight (DequantizeLinear with
  ``block_size``) read by a node whose activation input is not 16-bit quantized. Block-wise weights run
  only with uint16/int16 activations.
* ``cpu-fallback`` (warning): a node the QNN EP leaves to onnxruntime's CPU provider, with the EP's reason
  (from :func:`pyqshare.qnn.placement.placement_report`). Its weights stay out of the context binary.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from pyqshare.model import iter_graphs, load_model
from pyqshare.model.graph import readers
from pyqshare.qnn.placement import Placement

# Zero point of a symmetric weight, by element type.
_SYMMETRIC_INT4_ZERO = {TensorProto.INT4: 0, TensorProto.UINT4: 8}
_SIXTEEN_BIT = {TensorProto.INT16, TensorProto.UINT16}


@dataclasses.dataclass(frozen=True)
class LintFinding:
    """One problem the HTP would have with a model.

    Attributes
    ----------
    rule : str
        ``asymmetric-int4``, ``blockwise-8bit-activations`` or ``cpu-fallback`` (module docstring).
    severity : str
        ``error`` (wrong results or rejected) or ``warning`` (runs, but not on the HTP).
    node : str
        The node concerned (the DequantizeLinear of the weight, or the node left on the CPU).
    message : str
        What is wrong and what to do.
    """

    rule: str
    severity: str
    node: str
    message: str


def constant_tensors(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    """Tensors of ``graph`` with fixed values, by name: initializers and ``Constant`` node values.

    Parameters
    ----------
    graph : onnx.GraphProto
        One graph (subgraphs are separate).
    """
    found = {tensor.name: tensor for tensor in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and not node.domain:
            for attribute in node.attribute:
                if attribute.name == "value":
                    found[node.output[0]] = attribute.t
    return found


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {output: node for node in graph.node for output in node.output if output}


def _block_size(node: onnx.NodeProto) -> int:
    return next((attribute.i for attribute in node.attribute if attribute.name == "block_size"), 0)


def _quantized_type(node: onnx.NodeProto, constants: dict[str, onnx.TensorProto], producers) -> int | None:
    """The element type a DequantizeLinear reads (from its zero point, or the QuantizeLinear feeding it)."""
    for candidate in (node, producers.get(node.input[0])):
        if candidate is None or candidate.op_type not in ("DequantizeLinear", "QuantizeLinear"):
            continue
        if len(candidate.input) > 2 and candidate.input[2] in constants:
            return constants[candidate.input[2]].data_type
        if candidate is node and node.input[0] in constants:
            return constants[node.input[0]].data_type
    return None


def lint_qdq_model(model_path: str | os.PathLike[str], placement: Placement | None = None) -> list[LintFinding]:
    """Check a QDQ model against the HTP's rules (module docstring).

    Parameters
    ----------
    model_path : str or os.PathLike
        The ONNX model.
    placement : Placement, optional
        Its QNN placement report; without it the ``cpu-fallback`` rule is not checked.

    Returns
    -------
    list[LintFinding]
        Every finding, errors first.
    """
    model = load_model(model_path)
    findings: list[LintFinding] = []
    for _, graph in iter_graphs(model):
        constants, producers, consumers = constant_tensors(graph), _producers(graph), readers(graph)
        for node in graph.node:
            if node.op_type != "DequantizeLinear" or node.input[0] not in constants:
                continue
            weight = constants[node.input[0]]
            label = node.name or node.output[0]
            if weight.data_type in _SYMMETRIC_INT4_ZERO and len(node.input) > 2 and node.input[2] in constants:
                zero_points = numpy_helper.to_array(constants[node.input[2]]).astype(np.int64)
                symmetric = _SYMMETRIC_INT4_ZERO[weight.data_type]
                if np.any(zero_points != symmetric):
                    findings.append(LintFinding(
                        "asymmetric-int4", "error", label,
                        f"int4 weight {weight.name!r} has zero points other than {symmetric}: the HTP gives wrong "
                        "answers for asymmetric int4 weights; quantize it symmetrically"))
            if _block_size(node) > 0:
                for reader, _, _ in consumers.get(node.output[0], []):
                    activation_types = [
                        _quantized_type(producers[name], constants, producers)
                        if name in producers and producers[name].op_type == "DequantizeLinear" else None
                        for name in reader.input if name and name != node.output[0] and name not in constants
                    ]
                    if any(kind not in _SIXTEEN_BIT for kind in activation_types):
                        findings.append(LintFinding(
                            "blockwise-8bit-activations", "error", label,
                            f"block-wise weight {weight.name!r} feeds {reader.op_type} {reader.name!r}, whose activations "
                            "are not 16-bit quantized: the HTP runs block-wise weights only with 16-bit activations"))
    if placement is not None:
        findings += [
            LintFinding("cpu-fallback", "warning", entry["node"], f"{entry['op_type']} runs on the CPU: {entry['reason']}")
            for entry in placement.fallback_reasons
        ]
    return findings
