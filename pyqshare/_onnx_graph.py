"""Small ONNX graph helpers shared by ``prepare`` and the QNN placement report.

Weights follow ../shared/CLI.md: a tensor with at least ``min_elements`` (64) elements held in an
initializer, external data, a ``Constant`` node or a subgraph.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path

import onnx
from onnx import helper

from pyqshare.errors import InputError

WEIGHT_MIN_ELEMENTS = 64

# Element types narrower than a byte are packed two per byte.
_PACKED_4BIT = {onnx.TensorProto.INT4, onnx.TensorProto.UINT4, getattr(onnx.TensorProto, "FLOAT4E2M1", -1)}


def iter_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph`` and every subgraph below it (``If``/``Loop``/``Scan`` bodies), depth first."""
    yield graph
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from iter_graphs(attribute.g)
            elif attribute.type == onnx.AttributeProto.GRAPHS:
                for subgraph in attribute.graphs:
                    yield from iter_graphs(subgraph)


def iter_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Every node of ``graph`` and of its subgraphs."""
    for each in iter_graphs(graph):
        yield from each.node


def tensor_elements(tensor: onnx.TensorProto) -> int:
    return math.prod(tensor.dims)


def tensor_nbytes(tensor: onnx.TensorProto) -> int:
    """Bytes of the tensor's values (from its dims and type, so external data need not be read)."""
    if tensor.data_type == onnx.TensorProto.STRING:
        return sum(len(s) for s in tensor.string_data)
    if tensor.data_type in _PACKED_4BIT:
        return (tensor_elements(tensor) + 1) // 2
    return tensor_elements(tensor) * helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


def _constant_tensor(node: onnx.NodeProto) -> onnx.TensorProto | None:
    for attribute in node.attribute:
        if attribute.name == "value" and attribute.type == onnx.AttributeProto.TENSOR:
            return attribute.t
    return None


def weight_tensors(model: onnx.ModelProto, min_elements: int = WEIGHT_MIN_ELEMENTS) -> dict[str, onnx.TensorProto]:
    """Weights by value name: initializers and ``Constant`` values with at least ``min_elements`` elements.

    Parameters
    ----------
    model : onnx.ModelProto
        The model; subgraphs are searched too, and external data is never read.
    min_elements : int
        The smallest element count that makes a tensor a weight (``../shared/CLI.md``: 64).
    """
    found: dict[str, onnx.TensorProto] = {}
    for graph in iter_graphs(model.graph):
        for tensor in graph.initializer:
            if tensor_elements(tensor) >= min_elements:
                found[tensor.name] = tensor
        for node in graph.node:
            tensor = _constant_tensor(node) if node.op_type == "Constant" and not node.domain else None
            if tensor is not None and tensor_elements(tensor) >= min_elements:
                found[node.output[0]] = tensor
    return found


def weight_bytes(model: onnx.ModelProto, min_elements: int = WEIGHT_MIN_ELEMENTS) -> int:
    """Total bytes of the model's weights (see :func:`weight_tensors`)."""
    return sum(tensor_nbytes(tensor) for tensor in weight_tensors(model, min_elements).values())


def count_nodes(model: onnx.ModelProto) -> int:
    """Nodes in the main graph and every subgraph."""
    return sum(1 for _ in iter_nodes(model.graph))


def node_names_are_unique(model: onnx.ModelProto) -> bool:
    names = [node.name for node in iter_nodes(model.graph)]
    return all(names) and len(set(names)) == len(names)


def name_nodes_uniquely(model: onnx.ModelProto) -> int:
    """Name every unnamed or repeatedly named node ``<op_type>_<position>``; returns how many changed.

    Logs and reports identify nodes by name, so names must be unique across the main graph and subgraphs.
    The first node holding a name keeps it; positions count nodes in :func:`iter_nodes` order.
    """
    nodes = list(iter_nodes(model.graph))
    taken = {node.name for node in nodes if node.name}
    seen: set[str] = set()
    renamed = 0
    for position, node in enumerate(nodes):
        if node.name and node.name not in seen:
            seen.add(node.name)
            continue
        name, suffix = f"{node.op_type}_{position}", 0
        while name in taken:
            suffix += 1
            name = f"{node.op_type}_{position}_{suffix}"
        node.name = name
        taken.add(name)
        seen.add(name)
        renamed += 1
    return renamed


def external_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every tensor whose values live in an external file (initializers and node attributes, all graphs)."""
    for graph in iter_graphs(model.graph):
        for tensor in graph.initializer:
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                yield tensor
        for node in graph.node:
            for attribute in node.attribute:
                tensors = [attribute.t] if attribute.type == onnx.AttributeProto.TENSOR else attribute.tensors
                yield from (t for t in tensors if t.data_location == onnx.TensorProto.EXTERNAL)


def external_info(tensor: onnx.TensorProto) -> dict[str, str]:
    return {entry.key: entry.value for entry in tensor.external_data}


def resolve_external_file(model_path: Path, location: str) -> Path:
    """The file an external-data ``location`` names, refusing any that escapes the model's folder.

    Absolute paths, ``..`` components and links that resolve outside the folder raise :class:`InputError`.
    """
    base = model_path.resolve().parent
    if not location or os.path.isabs(location) or ".." in Path(location).parts:
        raise InputError(f"{model_path}: external data location {location!r} escapes the model's folder")
    target = (base / location).resolve()
    if not target.is_relative_to(base):
        raise InputError(f"{model_path}: external data location {location!r} escapes the model's folder")
    if not target.is_file():
        raise InputError(f"{model_path}: external data file {location!r} is missing")
    return target


def load_model(model_path: str | os.PathLike[str], flag: str = "--model-path") -> onnx.ModelProto:
    """The model's graph with external data left on disk (every location checked, none read).

    Parameters
    ----------
    model_path : str or os.PathLike
        The ``.onnx`` file.
    flag : str
        The command-line flag that named the file, for error messages.
    """
    path = Path(model_path)
    if not path.is_file():
        raise InputError(f"{flag}: no such model file: {path}")
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as error:  # noqa: BLE001  (protobuf raises several types for a malformed file)
        raise InputError(f"{flag}: {path} is not an ONNX model ({type(error).__name__})") from error
    if not model.HasField("graph"):
        raise InputError(f"{flag}: {path} is not an ONNX model (no graph)")
    for tensor in external_tensors(model):
        resolve_external_file(path, external_info(tensor).get("location", ""))
    return model
