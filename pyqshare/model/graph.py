"""Walking ONNX graphs: subgraphs and their paths, scopes, tensors, producers, consumers and fresh names.

A subgraph (the ``then_branch``/``else_branch`` of ``If``, the ``body`` of ``Loop``/``Scan``, or any other
graph-valued attribute) is addressed by a path string: ``""`` for the main graph, else
``"<node>/<attribute>"`` segments joined by ``/``, where ``<node>`` is the node's name, or its first output's
name when the node is unnamed (output names are unique and survive node insertions), and a ``GRAPHS``
attribute adds ``[i]``. Example: ``"loop_1/body/if_3/then_branch"``. Node names may contain ``/`` themselves,
so paths are looked up in :func:`iter_graphs`' listing, never split.

A subgraph reads names of enclosing graphs (outer scope) unless it defines them itself (as an input,
initializer or node output): :func:`readers` follows those reads.
"""

from __future__ import annotations

from collections.abc import Iterator

import onnx
from onnx import AttributeProto

__all__ = [
    "declared_type",
    "defined_names",
    "find_graph",
    "iter_graphs",
    "iter_nodes",
    "iter_tensors",
    "name_nodes_uniquely",
    "node_label",
    "NameFactory",
    "producer_index",
    "readers",
    "subgraphs",
]


def subgraphs(node: onnx.NodeProto) -> Iterator[tuple[str, onnx.GraphProto]]:
    """Yield ``(attribute label, graph)`` for every graph-valued attribute of ``node``."""
    for attr in node.attribute:
        if attr.type == AttributeProto.GRAPH:
            yield attr.name, attr.g
        elif attr.type == AttributeProto.GRAPHS:
            for i, graph in enumerate(attr.graphs):
                yield f"{attr.name}[{i}]", graph


def node_label(node: onnx.NodeProto) -> str:
    """The node's name, or its first output's name when it has none (how paths and reports name nodes)."""
    return node.name or (node.output[0] if node.output else node.op_type)


def _join(path: str, node: onnx.NodeProto, attr_label: str) -> str:
    segment = f"{node_label(node)}/{attr_label}"
    return f"{path}/{segment}" if path else segment


def iter_graphs(model: onnx.ModelProto) -> Iterator[tuple[str, onnx.GraphProto]]:
    """Yield ``(path, graph)`` for ``model``'s main graph and every subgraph, depth first, parents first."""
    stack = [("", model.graph)]
    while stack:
        path, graph = stack.pop()
        yield path, graph
        children = [(_join(path, node, label), sub) for node in graph.node for label, sub in subgraphs(node)]
        stack.extend(reversed(children))


def iter_nodes(model: onnx.ModelProto) -> Iterator[onnx.NodeProto]:
    """Every node of ``model``'s main graph, then of each subgraph in :func:`iter_graphs` order."""
    for _, graph in iter_graphs(model):
        yield from graph.node


def name_nodes_uniquely(model: onnx.ModelProto) -> int:
    """Name every unnamed or repeatedly named node of ``model`` ``<op_type>_<position>``; returns how many changed.

    Logs and reports identify nodes by name (onnxruntime's placement log, for one), so names must be unique
    across the main graph and subgraphs. The first node holding a name keeps it; positions count nodes in
    :func:`iter_nodes` order; a taken name gets ``_1``, ``_2``, ... appended.
    """
    nodes = list(iter_nodes(model))
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


def find_graph(model: onnx.ModelProto, path: str) -> onnx.GraphProto:
    """The graph at ``path`` (see the module docstring); ``ValueError`` if the model has none there."""
    for candidate, graph in iter_graphs(model):
        if candidate == path:
            return graph
    raise ValueError(f"the model has no graph at path {path!r}")


def iter_tensors(model: onnx.ModelProto) -> Iterator[tuple[str, onnx.TensorProto]]:
    """Yield ``(graph path, tensor)`` for every TensorProto that can hold data: initializers, sparse
    initializers' values and indices, and tensor-valued node attributes (``Constant`` values included)."""
    for path, graph in iter_graphs(model):
        yield from ((path, tensor) for tensor in graph.initializer)
        for sparse in graph.sparse_initializer:
            yield path, sparse.values
            yield path, sparse.indices
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == AttributeProto.TENSOR:
                    yield path, attr.t
                elif attr.type == AttributeProto.TENSORS:
                    yield from ((path, tensor) for tensor in attr.tensors)


def defined_names(graph: onnx.GraphProto) -> set[str]:
    """Names a graph defines itself: inputs, initializers (dense and sparse) and node outputs."""
    names = {value.name for value in graph.input}
    names.update(tensor.name for tensor in graph.initializer)
    names.update(sparse.values.name for sparse in graph.sparse_initializer)
    names.update(out for node in graph.node for out in node.output if out)
    return names


def readers(graph: onnx.GraphProto) -> dict[str, list[tuple[onnx.NodeProto, int, onnx.GraphProto]]]:
    """name -> every ``(node, input index, the node's graph)`` reading it as ``graph`` defines it: nodes of
    ``graph``, and nodes of its subgraphs reading it from the outer scope (a subgraph that defines the name
    itself shadows it)."""
    found: dict[str, list] = {}
    for node in graph.node:
        for index, name in enumerate(node.input):
            if name:
                found.setdefault(name, []).append((node, index, graph))
        for _, sub in subgraphs(node):
            own = defined_names(sub)
            for name, nested in readers(sub).items():
                if name not in own:
                    found.setdefault(name, []).extend(nested)
    return found


def producer_index(graph: onnx.GraphProto, name: str) -> int | None:
    """Index in ``graph.node`` of the node producing ``name``, or None (an input, initializer or outer name)."""
    for index, node in enumerate(graph.node):
        if name in node.output:
            return index
    return None


def declared_type(graph: onnx.GraphProto, name: str) -> onnx.TypeProto | None:
    """The type of ``name`` as declared in the graph's inputs, outputs or value_info, or None."""
    for value in (*graph.input, *graph.output, *graph.value_info):
        if value.name == name:
            return value.type
    return None


class NameFactory:
    """Hands out tensor and node names unused anywhere in a model (subgraphs share one namespace for
    tensors, since a subgraph sees every outer name)."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self._used: set[str] = set()
        for _, graph in iter_graphs(model):
            self._used |= defined_names(graph)
            self._used.update(value.name for value in (*graph.output, *graph.value_info))
            self._used.update(node.name for node in graph.node if node.name)

    def __call__(self, base: str) -> str:
        """``base`` if unused, else ``base_1``, ``base_2``, ...; the name returned is marked used."""
        candidate, counter = base, 0
        while candidate in self._used:
            counter += 1
            candidate = f"{base}_{counter}"
        self._used.add(candidate)
        return candidate
