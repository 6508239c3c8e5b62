"""Which component of a model each weight belongs to: attention, feed-forward, embedding, conv or output.

Mixed-precision recipes (the Guide's "Recommended Configurations") assign precisions by component. Components
are read from the graph's structure first, so that any exporter's naming works; names are the fallback.

Graph rules (main graph; a *linear node* reads a weight as MatMul/Gemm B, Conv/ConvTranspose W or RNN W/R;
*pass-through* nodes are the layout and element-wise ops listed in :data:`PASS_THROUGH`, walked along their
data inputs only):

* **attention**: a MatMul of two activations whose output reaches a Softmax through pass-through nodes is an
  attention score product; the linear nodes found walking back from its two inputs through pass-through
  nodes are the Q and K projections. The MatMul of two activations that the Softmax output reaches is the
  context product: walking back from its other input gives the V projection, walking forward from its
  output gives the output projection. Fused attention ops (:data:`ATTENTION_OPS`) count the same way
  (query, key and value inputs back, output forward).
* **feed-forward**: MatMul/Gemm layers found walking back from the input of an activation function
  (:data:`ACTIVATIONS`: Gelu, Relu, SiLU's Sigmoid, erf-GELU's Erf, ...) and forward from its output; a
  gating Mul passed on the way forward (SwiGLU's ``silu(gate) * up``) adds the layers behind its other input.
* **embedding**: tables read by Gather (the ``embedding`` role of :mod:`pyqshare.model.weights`).
* **conv**: Conv/ConvTranspose weights.
* **output**: linear layers from which a graph output is reachable and no other linear layer is. (Reaching
  an output "without passing another linear layer" along some path would make every transformer block's
  last projection an output layer, through the residual connections.) In an encoder without a head this is
  the last block's feed-forward down projection; in a decoder the LM head; in a classifier its last layer.

A weight matching several rules takes the first of output, attention, feed-forward, embedding, conv.

Name fallback, for weights the graph rules leave unassigned (inside subgraphs, or in unrecognised
structures): regular expressions (:data:`NAME_PATTERNS`, tried in that order) searched case-insensitively
in the weight's name, its layer name and its consumers' node names. Anything else is ``other``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import onnx

from pyqshare.model import Weight
from pyqshare.model.graph import node_label
from pyqshare.quantization.scheme import LINEAR_ROLES

COMPONENTS = ("attention", "feed-forward", "embedding", "conv", "output", "other")

PASS_THROUGH = frozenset({
    "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Split", "Slice", "Concat", "Gather", "Expand",
    "Tile", "Identity", "Cast", "Dropout", "Where", "Add", "Sub", "Mul", "Div", "Neg",
})
"""Layout and element-wise ops that carry a projection's output on to where it is used."""

# Inputs of pass-through ops that carry data (the others are shapes, indices, masks or axes).
_DATA_INPUTS = {
    "Reshape": (0,), "Expand": (0,), "Tile": (0,), "Slice": (0,), "Gather": (0,), "Squeeze": (0,),
    "Unsqueeze": (0,), "Split": (0,), "Dropout": (0,), "Where": (1, 2),
}

ACTIVATIONS = frozenset({
    "Gelu", "FastGelu", "BiasGelu", "QuickGelu", "Relu", "LeakyRelu", "PRelu", "Elu", "Selu", "Celu", "Sigmoid",
    "HardSigmoid", "HardSwish", "Swish", "Tanh", "Softplus", "Mish", "Erf",
})
"""Activation functions that mark a feed-forward block (Sigmoid and Erf: SiLU and erf-GELU written out)."""

ATTENTION_OPS = frozenset({"Attention", "MultiHeadAttention", "GroupQueryAttention"})

NAME_PATTERNS = (
    ("output", r"lm_head|classifier|logits|(^|[./_])head([./_]|$)"),
    ("attention", r"attn|attention|[qkvo]_proj|out_proj|qkv|query|key|value"),
    ("feed-forward", r"mlp|ffn|feed_?forward|intermediate|fc[12]|fc_in|fc_out|gate_proj|up_proj|down_proj"
                     r"|dense_h_to_4h|dense_4h_to_h|(^|[./_])output[./_]dense"),
    ("embedding", r"embed|wte|wpe"),
    ("conv", r"conv"),
)
"""(component, regular expression) tried in order on a weight's names when the graph rules say nothing.
BERT's ``layer.N.output.dense`` (its feed-forward down projection) appears after attention's patterns so
that ``attention.output.dense`` stays attention."""

_PRECEDENCE = ("output", "attention", "feed-forward", "embedding", "conv")
_LINEAR_INPUTS = {"MatMul": (1,), "Gemm": (1,), "Conv": (1,), "ConvTranspose": (1,), "LSTM": (1, 2), "GRU": (1, 2),
                  "RNN": (1, 2)}
_TORCH_NODE = re.compile(r"^/(.+)/[^/]+$")


@dataclass(frozen=True)
class LayerComponent:
    """The component of one weight, how it was found, and the names it goes by.

    Attributes
    ----------
    weight
        The weight's tensor name.
    layer
        A readable layer name: the module path of a torch export (node ``/a/b/MatMul`` gives ``a.b``), else
        the weight name without a trailing ``.weight``.
    component
        One of :data:`COMPONENTS`.
    detected_by
        ``"graph"``, ``"name"`` or ``"none"`` (component ``other``).
    names
        The weight name, the layer name and the consumers' node names: what layer-wise configurations match.
    """

    weight: str
    layer: str
    component: str
    detected_by: str
    names: tuple[str, ...]

    def to_dict(self) -> dict:
        return {"component": self.component, "detected_by": self.detected_by, "layer": self.layer}


class _Graph:
    """Producers, consumers and linear nodes of a main graph, with walks through pass-through nodes."""

    def __init__(self, graph: onnx.GraphProto, linear: Mapping[int, str]) -> None:
        self.nodes = list(graph.node)
        self.linear = linear
        self.stored = {tensor.name for tensor in graph.initializer}
        self.stored.update(node.output[0] for node in self.nodes if node.op_type == "Constant" and node.output)
        self.outputs = {value.name for value in graph.output}
        self.producer: dict[str, int] = {}
        self.consumers: dict[str, list[tuple[int, int]]] = {}
        for index, node in enumerate(self.nodes):
            for name in node.output:
                if name:
                    self.producer[name] = index
            for position, name in enumerate(node.input):
                if name:
                    self.consumers.setdefault(name, []).append((index, position))

    def is_activation(self, name: str) -> bool:
        return bool(name) and name not in self.stored

    def activation_product(self, index: int) -> bool:
        """A MatMul of two activations (attention's scores or context)."""
        node = self.nodes[index]
        return node.op_type == "MatMul" and index not in self.linear and all(map(self.is_activation, node.input))

    def _data_inputs(self, index: int) -> list[str]:
        node = self.nodes[index]
        positions = _DATA_INPUTS.get(node.op_type, range(len(node.input)))
        return [node.input[p] for p in positions if p < len(node.input) and self.is_activation(node.input[p])]

    def back(self, tensor: str) -> set[int]:
        """Linear nodes producing ``tensor`` through pass-through nodes."""
        found, seen, stack = set(), set(), [tensor]
        while stack:
            name = stack.pop()
            index = self.producer.get(name)
            if index is None or index in seen:
                continue
            seen.add(index)
            if index in self.linear:
                found.add(index)
            elif self.nodes[index].op_type in PASS_THROUGH:
                stack.extend(self._data_inputs(index))
        return found

    def forward(self, tensor: str, is_target) -> tuple[set[tuple[int, int]], set[int]]:
        """``(node, input position)`` of every target node ``tensor`` reaches through pass-through nodes, and
        the pass-through nodes walked."""
        found, walked, stack = set(), set(), [tensor]
        while stack:
            for index, position in self.consumers.get(stack.pop(), []):
                node = self.nodes[index]
                if is_target(index):
                    found.add((index, position))
                elif (node.op_type in PASS_THROUGH and index not in walked
                      and node.input[position] in self._data_inputs(index)):
                    walked.add(index)
                    stack.extend(name for name in node.output if name)
        return found, walked

    def forward_linear(self, tensor: str) -> tuple[set[int], set[int]]:
        hits, walked = self.forward(tensor, lambda index: index in self.linear)
        return {index for index, _ in hits}, walked

    def attention_layers(self) -> set[int]:
        found: set[int] = set()
        for index, node in enumerate(self.nodes):
            if node.op_type in ATTENTION_OPS:
                for name in node.input[:3]:
                    found |= self.back(name)
                if node.output:
                    found |= self.forward_linear(node.output[0])[0]
                continue
            if not self.activation_product(index):
                continue
            softmaxes, _ = self.forward(node.output[0], lambda i: self.nodes[i].op_type == "Softmax")
            if not softmaxes:
                continue
            found |= self.back(node.input[0]) | self.back(node.input[1])
            for softmax, _ in softmaxes:
                contexts, _ = self.forward(self.nodes[softmax].output[0], self.activation_product)
                for context, position in contexts:
                    found |= self.back(self.nodes[context].input[1 - position])
                    found |= self.forward_linear(self.nodes[context].output[0])[0]
        return found

    def feed_forward_layers(self) -> set[int]:
        found: set[int] = set()
        for node in self.nodes:
            if node.op_type not in ACTIVATIONS or not node.input or not node.output:
                continue
            found |= self.back(node.input[0])
            downs, walked = self.forward_linear(node.output[0])
            found |= downs
            for gate in walked:
                if self.nodes[gate].op_type == "Mul":
                    for name in self._data_inputs(gate):
                        found |= self.back(name)
        return {index for index in found if self.nodes[index].op_type in ("MatMul", "Gemm")}

    def output_layers(self) -> set[int]:
        """Linear nodes that reach a graph output and no other linear node (nodes are in topological order)."""
        reaches_output = [False] * len(self.nodes)
        reaches_linear = [False] * len(self.nodes)
        for index in reversed(range(len(self.nodes))):
            for name in self.nodes[index].output:
                reaches_output[index] |= name in self.outputs
                for consumer, _ in self.consumers.get(name, []):
                    reaches_output[index] |= reaches_output[consumer]
                    reaches_linear[index] |= consumer in self.linear or reaches_linear[consumer]
        return {index for index in self.linear if reaches_output[index] and not reaches_linear[index]}


def layer_name(weight: Weight) -> str:
    """A readable name for the layer owning ``weight`` (see :class:`LayerComponent`).

    Parameters
    ----------
    weight
        As :func:`pyqshare.model.find_weights` returns it.
    """
    for node, _, _ in weight.consumers:
        match = _TORCH_NODE.match(node)
        if match:
            return match.group(1).replace("/", ".")
    return weight.name.removesuffix(".weight")


def _by_name(names: Iterable[str]) -> str | None:
    for component, pattern in NAME_PATTERNS:
        if any(re.search(pattern, name, re.IGNORECASE) for name in names):
            return component
    return None


def detect_components(model: onnx.ModelProto, weights: Sequence[Weight]) -> dict[str, LayerComponent]:
    """The component of every linear-layer weight and embedding table in ``weights`` (rules in the module
    docstring).

    Parameters
    ----------
    model
        The float model (before quantization; static shapes are not needed).
    weights
        Its weights, as :func:`pyqshare.model.find_weights` returns them (pass ``min_elements=1``, so that
        every linear layer counts when deciding which layers are output layers).

    Returns
    -------
    dict
        Weight name -> :class:`LayerComponent`, for weights with a linear role (MatMul/Gemm/Conv/RNN) or
        the embedding role; other weights (norms, biases) are not layers and are left out.
    """
    layers = [w for w in weights if w.role in LINEAR_ROLES or w.role == "embedding"]
    labels = {node_label(node): index for index, node in enumerate(model.graph.node)}
    linear: dict[int, str] = {}
    for weight in layers:
        if weight.graph or weight.role not in LINEAR_ROLES:
            continue
        for node, op_type, position in weight.consumers:
            if node in labels and position in _LINEAR_INPUTS.get(op_type, ()):
                linear[labels[node]] = weight.name
    graph = _Graph(model.graph, linear)
    by_rule = {
        "output": graph.output_layers(),
        "attention": graph.attention_layers(),
        "feed-forward": graph.feed_forward_layers(),
        "conv": {i for i in linear if graph.nodes[i].op_type in ("Conv", "ConvTranspose")},
    }
    found: dict[str, set[str]] = {}
    for component, indices in by_rule.items():
        for index in indices:
            found.setdefault(linear[index], set()).add(component)
    result = {}
    for weight in layers:
        name = layer_name(weight)
        names = tuple(dict.fromkeys((weight.name, name, *(node for node, _, _ in weight.consumers))))
        rules = set(found.get(weight.name, ()))
        if weight.role == "embedding" and not weight.graph:
            rules.add("embedding")
        if rules:
            component, how = next(c for c in _PRECEDENCE if c in rules), "graph"
        else:
            component = _by_name(names)
            component, how = (component, "name") if component else ("other", "none")
        result[weight.name] = LayerComponent(weight.name, name, component, how, names)
    return result
