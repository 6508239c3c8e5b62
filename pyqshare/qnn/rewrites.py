"""Graph rewrites that make a float model's QDQ form valid on the QNN HTP.

Exporters spell GELU as ``x * 0.5 * (1 + erf(x / sqrt(2)))``. QNN has no Erf: the QNN EP only takes the
five nodes together through its GELU fusion, and that fusion refuses a QDQ pair inside the pattern ("Mixed
GELU topology"), which every fully quantized graph has. So ``fuse_gelu`` replaces the pattern by the ONNX
``Gelu`` operator (opset 20) before quantization; QNN runs it natively.

PyTorch exports ``bias + x @ W`` as ``Add(bias, x)``, constant first. QNN's HTP then does not fuse the bias
into the MatMul: it stores the bias broadcast over every row as a separate constant (measured on MiniLM at
sequence 128: 128 x 1536 x 2 bytes for one feed-forward bias, about 3 MB of a 36 MB context binary).
``constants_second`` swaps the operands of commutative Add and Mul nodes so that constants come second,
which QNN stores once, unbroadcast.
"""

from __future__ import annotations

import math

import onnx
from onnx import helper, numpy_helper

from pyqshare.model.graph import readers
from pyqshare.model.opset import ensure_opset

GELU_OPSET = 20


def _scalar(graph: onnx.GraphProto, name: str) -> float | None:
    """The value of a one-element constant (initializer or Constant node output), else None."""
    for tensor in graph.initializer:
        if tensor.name == name:
            values = numpy_helper.to_array(tensor)
            return float(values.reshape(-1)[0]) if values.size == 1 else None
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] == name and node.attribute[0].name == "value":
            values = numpy_helper.to_array(node.attribute[0].t)
            return float(values.reshape(-1)[0]) if values.size == 1 else None
    return None


def _is(graph: onnx.GraphProto, name: str, value: float) -> bool:
    found = _scalar(graph, name)
    return found is not None and math.isclose(found, value, rel_tol=1e-5)


def _other(node: onnx.NodeProto, name: str) -> str:
    return node.input[1] if node.input[0] == name else node.input[0]


def _gelu_at(graph: onnx.GraphProto, erf: onnx.NodeProto, producer: dict, reads: dict) -> tuple[str, list] | None:
    """``(x, the pattern's nodes with the output node first)`` if ``erf`` sits in an erf-GELU whose inner values nobody else reads."""
    scaled = producer.get(erf.input[0])
    if scaled is None:
        return None
    if scaled.op_type == "Div" and _is(graph, scaled.input[1], math.sqrt(2)):
        x = scaled.input[0]
    elif scaled.op_type == "Mul" and _is(graph, scaled.input[1], 1 / math.sqrt(2)):
        x = scaled.input[0]
    elif scaled.op_type == "Mul" and _is(graph, scaled.input[0], 1 / math.sqrt(2)):
        x = scaled.input[1]
    else:
        return None

    def only_reader(name: str, op_type: str) -> onnx.NodeProto | None:
        nodes = reads.get(name, [])
        return nodes[0][0] if len(nodes) == 1 and nodes[0][0].op_type == op_type else None

    plus_one = only_reader(erf.output[0], "Add")
    if plus_one is None or not _is(graph, _other(plus_one, erf.output[0]), 1.0):
        return None
    product = only_reader(plus_one.output[0], "Mul")
    if product is None:
        return None
    factor = _other(product, plus_one.output[0])
    if factor == x:  # (x * (1 + erf)) * 0.5
        half = only_reader(product.output[0], "Mul")
        if half is None or not _is(graph, _other(half, product.output[0]), 0.5):
            return None
        nodes = [half, product, plus_one, erf, scaled]
    else:  # (x * 0.5) * (1 + erf)
        half = producer.get(factor)
        if half is None or half.op_type != "Mul" or x not in half.input or not _is(graph, _other(half, x), 0.5):
            return None
        nodes = [product, half, plus_one, erf, scaled]
    if any(len(reads.get(node.output[0], [])) != 1 for node in nodes[1:]):
        return None  # an inner value read elsewhere (a subgraph included) must stay
    return x, nodes


COMMUTATIVE_OPS = ("Add", "Mul")


def constants_second(model: onnx.ModelProto) -> int:
    """Swap the inputs of main-graph Add/Mul nodes whose first input is an initializer and second is not.

    Returns the number of nodes changed. Values are unchanged: both operators commute and broadcast
    symmetrically.
    """
    constants = {tensor.name for tensor in model.graph.initializer}
    constants.update(node.output[0] for node in model.graph.node if node.op_type == "Constant")
    swapped = 0
    for node in model.graph.node:
        if node.op_type in COMMUTATIVE_OPS and len(node.input) == 2 and node.input[0] in constants \
                and node.input[1] not in constants:
            node.input[0], node.input[1] = node.input[1], node.input[0]
            swapped += 1
    return swapped


def fuse_gelu(model: onnx.ModelProto) -> int:
    """Replace every erf-GELU pattern in the main graph by one ``Gelu`` node; returns how many.

    The opset is raised to 20 or more first when a pattern is found (``Gelu`` appeared in opset 20).
    The rewritten graph computes the same function (ONNX defines Gelu with ``approximate="none"`` as
    exactly this formula).
    """
    graph = model.graph
    producer = {output: node for node in graph.node for output in node.output}
    reads = readers(graph)
    matches = [m for m in (_gelu_at(graph, node, producer, reads) for node in graph.node if node.op_type == "Erf") if m]
    if not matches:
        return 0
    ensure_opset(model, GELU_OPSET)
    replaced = {id(node) for _, nodes in matches for node in nodes}
    gelu_for_last = {
        id(nodes[0]): helper.make_node("Gelu", [x], [nodes[0].output[0]], name=f"{nodes[3].name or nodes[0].output[0]}_Gelu")
        for x, nodes in matches
    }
    kept = [gelu_for_last.get(id(node), node) for node in graph.node if id(node) not in replaced or id(node) in gelu_for_last]
    del graph.node[:]
    graph.node.extend(kept)
    _drop_unused_constants(graph)
    return len(matches)


def _drop_unused_constants(graph: onnx.GraphProto) -> None:
    """Drop initializers and Constant nodes that no node (subgraphs included) reads and no graph input or
    output names."""
    used = set(readers(graph)) | {value.name for value in graph.output} | {value.name for value in graph.input}
    kept_nodes = [node for node in graph.node if node.op_type != "Constant" or node.output[0] in used]
    del graph.node[:]
    graph.node.extend(kept_nodes)
    kept = [tensor for tensor in graph.initializer if tensor.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)


__all__ = ["GELU_OPSET", "fuse_gelu"]
