"""Weight discovery: every float tensor a model stores, where it lives, who reads it, and its channel axis.

Roles and axes come from the consumer (``nd`` is the weight's rank; axes are non-negative):

==========================  =======  ============  ==========  ==========  ==========================
consumer, input             shape    role          channel     reduction   note
==========================  =======  ============  ==========  ==========  ==========================
MatMul B (input 1)          [in,out] matmul        nd-1        nd-2        batched B: the last two axes
MatMul A (input 0)          [out,in] matmul_lhs    nd-2        nd-1        ``W @ x``: rows are outputs
Gemm B, transB=0            [in,out] matmul        1           0
Gemm B, transB=1            [out,in] matmul        0           1
Gemm A (input 0)            [M,K]    matmul_lhs    0 (1 if     1 (0 if
                                                   transA)     transA)
Gemm C                      [N]      bias          nd-1        None        bias_of = Gemm's B
Conv W                      [O,I/g,…] conv         0           1
ConvTranspose W             [I,O/g,…] conv         1           0           with group > 1, one scale
                                                                           per slot of O/g, shared by
                                                                           the groups
Conv/ConvTranspose B        [O]      bias          0           None        bias_of = the node's W
LSTM/GRU/RNN W              [D,G*H,I] rnn_w        1           2
LSTM/GRU/RNN R              [D,G*H,H] rnn_r        1           2
LSTM/GRU/RNN B              [D,2*G*H] rnn_b        1           None
Gather data (axis 0)        [V,H]    embedding     None        None        see below
Layer/Batch/Instance/Group  [C]      norm          nd-1        None        stays float unless QNN
Normalization parameters                                                   needs it quantized
Add after a MatMul          [N]      bias          0           None        bias_of = the MatMul's B,
                                                                           which must be stored
anything else                        other         None        None
==========================  =======  ============  ==========  ==========  ==========================

Embeddings get no channel axis: a QNN Gather's output carries its table's single encoding, so embedding
tables are quantized per tensor (onnxruntime's QNN recipe quantizes Gather data per tensor too; a per-row
scale would have to follow each token through the Gather, which QNN does not do).

When several consumers read one weight, its role is the strongest one in this order: matmul, conv, rnn_w,
rnn_r, matmul_lhs, embedding, bias, rnn_b, norm, other; the axes come from the first consumer with that role,
and ``consumers`` lists them all. Roles look at the direct consumer only (a weight read through a Cast or
Transpose is "other").

Not returned at all: tensors that are not floating point (integer, bool and string tensors hold shapes,
indices and masks, and already-quantized codes), tensors with fewer than ``min_elements`` elements, sparse
initializers and sparse Constant values, and float tensors read as a shape or parameter input (Reshape's
shape, Resize's scales, Pad's pads, Clip's bounds, QuantizeLinear/DequantizeLinear's scale and zero point,
...), which are not weights to quantize.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import AttributeProto, TensorProto, helper, numpy_helper

from pyqshare.model.external import external_array, is_external, resolve_external, set_raw, tensor_data_nbytes
from pyqshare.model.graph import find_graph, iter_graphs, node_label, producer_index, readers

__all__ = ["ROLES", "WEIGHT_MIN_ELEMENTS", "Weight", "find_weights", "replace_weight", "weight_sizes"]

WEIGHT_MIN_ELEMENTS = 64
"""The smallest tensor that counts as a weight (../shared/CLI.md), unless ``--min-elements`` says otherwise."""

ROLES = ("matmul", "conv", "rnn_w", "rnn_r", "matmul_lhs", "embedding", "bias", "rnn_b", "norm", "other")
"""Every role, strongest first."""

_FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}
_NORMS = {"LayerNormalization", "BatchNormalization", "InstanceNormalization", "GroupNormalization"}
_RNNS = {"LSTM", "GRU", "RNN"}
# (op type -> input indices) read as shapes or parameters rather than as data.
_PARAMETER_INPUTS = {
    "Reshape": {1}, "Expand": {1}, "Tile": {1}, "Slice": {1, 2, 3, 4}, "Pad": {1, 2, 3}, "Resize": {1, 2, 3},
    "Upsample": {1}, "ConstantOfShape": {0}, "Range": {0, 1, 2}, "TopK": {1}, "Unsqueeze": {1}, "Squeeze": {1},
    "Split": {1}, "Clip": {1, 2}, "OneHot": {1, 2}, "CenterCropPad": {1}, "Col2Im": {1, 2}, "DFT": {1, 2},
    "QuantizeLinear": {1, 2}, "DequantizeLinear": {1, 2}, "Dropout": {1, 2}, "Trilu": {1},
    **{f"Reduce{kind}": {1} for kind in ("Sum", "Mean", "Max", "Min", "Prod", "L1", "L2", "LogSum", "LogSumExp")},
    "ReduceSumSquare": {1},
}


@dataclass
class Weight:
    """A float tensor stored in the model (see the module docstring for roles and axes).

    Attributes
    ----------
    name
        The tensor name its consumers read.
    location
        ``"initializer"`` (data in the model file), ``"external"`` (an initializer whose data lies in an
        external file) or ``"constant"`` (a ``Constant`` node's value).
    graph
        The path of the graph holding it: ``""`` for the main graph, else e.g. ``"if_1/then_branch"`` (see
        :mod:`pyqshare.model.graph`).
    shape, dtype
        Its shape and numpy dtype.
    consumers
        ``(node name, op type, input index)`` of every reader, in this graph and in subgraphs that read it
        from the outer scope (unnamed nodes are named by their first output).
    role, channel_axis, reduction_axis
        From the consumers (module docstring); axes are None when they do not apply.
    nbytes
        Bytes of its data.
    bias_of
        For a bias: the name of the weight it is added to (the MatMul, Gemm or Conv weight), else None.
    """

    name: str
    location: str
    graph: str
    shape: tuple[int, ...]
    dtype: np.dtype
    consumers: list[tuple[str, str, int]]
    role: str
    channel_axis: int | None
    reduction_axis: int | None
    nbytes: int
    bias_of: str | None = None
    _source: TensorProto | AttributeProto | None = field(default=None, repr=False, compare=False)
    _model_dir: Path | None = field(default=None, repr=False, compare=False)

    @property
    def size(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)

    def array(self) -> np.ndarray:
        """The values, as a read-only array (copy it before changing it).

        External data is memory-mapped, not read: the array is a view of the file, re-validated (location
        inside the model's folder, offset and length inside the file) each time. A weight changed by
        :func:`replace_weight` reads its new values.
        """
        source = self._source
        if isinstance(source, AttributeProto):
            values = np.asarray(source.floats if source.name == "value_floats" else [source.f], dtype=np.float32)
        elif is_external(source):
            values = external_array(source, self._model_dir)
        else:
            values = numpy_helper.to_array(source)
        values = values.reshape(self.shape)
        values.flags.writeable = False
        return values


def _role(node: onnx.NodeProto, index: int, ndim: int, graph: onnx.GraphProto):
    """``(role, channel axis, reduction axis, bias_of)`` for a weight read by ``node`` at input ``index``;
    None when the input is a shape or parameter (the tensor is then no weight)."""
    op = node.op_type
    if index in _PARAMETER_INPUTS.get(op, ()):
        return None
    last, second = ndim - 1, ndim - 2
    attrs = {attr.name: helper.get_attribute_value(attr) for attr in node.attribute if attr.type == AttributeProto.INT}
    if op == "MatMul":
        if ndim == 1:  # a vector operand: no output channels of its own
            return ("matmul", None, 0, None) if index == 1 else ("matmul_lhs", None, 0, None)
        return ("matmul", last, second, None) if index == 1 else ("matmul_lhs", second, last, None)
    if op == "Gemm":
        if index == 0:
            return ("matmul_lhs", 1, 0, None) if attrs.get("transA") else ("matmul_lhs", 0, 1, None)
        if index == 1:
            return ("matmul", 0, 1, None) if attrs.get("transB") else ("matmul", 1, 0, None)
        return "bias", last, None, node.input[1]
    if op in ("Conv", "ConvTranspose") and index in (1, 2):
        if index == 2:
            return "bias", 0, None, node.input[1]
        return ("conv", 0, 1, None) if op == "Conv" else ("conv", 1, 0, None)
    if op in _RNNS and index in (1, 2, 3):
        return {1: ("rnn_w", 1, 2, None), 2: ("rnn_r", 1, 2, None), 3: ("rnn_b", 1, None, None)}[index]
    if op == "Gather" and index == 0 and attrs.get("axis", 0) == 0:
        return "embedding", None, None, None
    if op in _NORMS and index >= 1:
        return "norm", last, None, None
    if op == "Add" and ndim == 1 and len(node.input) == 2:
        producer = producer_index(graph, node.input[1 - index])
        if producer is not None and graph.node[producer].op_type == "MatMul":
            matmul_weight = graph.node[producer].input[1]
            # The MatMul's B must be stored, not computed: attention's (q @ k^T) + mask is no bias.
            source = producer_index(graph, matmul_weight)
            if source is None or graph.node[source].op_type == "Constant":
                return "bias", 0, None, matmul_weight
    return "other", None, None, None


def _candidates(graph: onnx.GraphProto):
    """``(name, location, source, data type, shape)`` of every tensor stored in ``graph``."""
    for tensor in graph.initializer:
        location = "external" if is_external(tensor) else "initializer"
        yield tensor.name, location, tensor, tensor.data_type, tuple(tensor.dims)
    for node in graph.node:
        if node.op_type != "Constant" or node.domain not in ("", "ai.onnx") or not node.attribute:
            continue
        attr = node.attribute[0]
        if attr.name == "value":
            yield node.output[0], "constant", attr.t, attr.t.data_type, tuple(attr.t.dims)
        elif attr.name == "value_floats":
            yield node.output[0], "constant", attr, TensorProto.FLOAT, (len(attr.floats),)
        elif attr.name == "value_float":
            yield node.output[0], "constant", attr, TensorProto.FLOAT, ()


def find_weights(
    model: onnx.ModelProto, model_dir: str | os.PathLike[str] | None, *, min_elements: int = WEIGHT_MIN_ELEMENTS
) -> list[Weight]:
    """Every float weight of ``model``, in graph order (main graph first, then subgraphs depth first).

    Parameters
    ----------
    model
        The model, as :func:`pyqshare.model.load_model` returns it (external data left on disk) or with
        everything in memory.
    model_dir
        The folder the model was loaded from; external data is resolved (and validated) there. None is
        fine for a model without external data.
    min_elements
        Smallest tensor reported (../shared/CLI.md's weight definition: 64).

    Raises
    ------
    InputError
        If an external-data location is hostile or broken (see :func:`pyqshare.model.load_model`).
    ValueError
        If the model has external data but ``model_dir`` is None.
    """
    weights = []
    for path, graph in iter_graphs(model):
        reads = None
        for name, location, source, data_type, shape in _candidates(graph):
            if data_type not in _FLOAT_TYPES or math.prod(shape) < min_elements:
                continue
            if reads is None:
                reads = readers(graph)
            roles = []
            for node, index, node_graph in reads.get(name, []):
                role = _role(node, index, len(shape), node_graph)
                if role is None:
                    break
                roles.append(role)
            else:
                found = reads.get(name, [])
                weights.append(_weight(name, location, path, source, data_type, shape, found, roles, model_dir))
    return weights


def _weight(name, location, path, source, data_type, shape, readers, roles, model_dir) -> Weight:
    if isinstance(source, TensorProto) and is_external(source):
        if model_dir is None:
            raise ValueError(f"weight {name!r} lives in external data: pass model_dir (the model's folder)")
        resolve_external(source, model_dir)
    dtype = helper.tensor_dtype_to_np_dtype(data_type)
    strongest = min(roles or [("other", None, None, None)], key=lambda found: ROLES.index(found[0]))
    role, channel_axis, reduction_axis, bias_of = strongest
    return Weight(
        name=name,
        location=location,
        graph=path,
        shape=shape,
        dtype=dtype,
        consumers=[(node_label(node), node.op_type, index) for node, index, _ in readers],
        role=role,
        channel_axis=channel_axis,
        reduction_axis=reduction_axis,
        nbytes=_stored_nbytes(source, shape),
        bias_of=bias_of,
        _source=source,
        _model_dir=Path(model_dir) if model_dir is not None else None,
    )


def _stored_nbytes(source: TensorProto | AttributeProto, shape: tuple[int, ...]) -> int:
    """Bytes of a stored tensor's values, from its shape and type (external data is not read)."""
    if isinstance(source, AttributeProto):  # a Constant's value_float(s): float32
        return math.prod(shape) * 4
    if source.data_type == TensorProto.STRING:
        return sum(len(value) for value in source.string_data)
    return tensor_data_nbytes(source)


def weight_sizes(model: onnx.ModelProto, *, min_elements: int = WEIGHT_MIN_ELEMENTS) -> dict[str, int]:
    """Bytes of every weight by name, as ../shared/CLI.md counts weights in byte totals.

    Unlike :func:`find_weights` (the float weights to quantize), this counts every tensor of at least
    ``min_elements`` elements that the model stores, of any element type and whoever reads it:
    initializers (external data included, never read) and ``Constant`` values, in every graph.

    Parameters
    ----------
    model
        The model; external data may stay on disk.
    min_elements
        Smallest tensor counted.
    """
    sizes = {}
    for _, graph in iter_graphs(model):
        for name, _, source, _, shape in _candidates(graph):
            if math.prod(shape) >= min_elements:
                sizes[name] = _stored_nbytes(source, shape)
    return sizes


def locate(model: onnx.ModelProto, weight: Weight) -> tuple[onnx.GraphProto, int | None, int | None]:
    """``(graph, initializer index, Constant node index)`` of ``weight`` in ``model`` (one index is None).

    Raises
    ------
    ValueError
        If the model no longer stores the weight there (for example it was quantized already).
    """
    graph = find_graph(model, weight.graph)
    for index, tensor in enumerate(graph.initializer):
        if tensor.name == weight.name:
            return graph, index, None
    for index, node in enumerate(graph.node):
        if node.op_type == "Constant" and node.output and node.output[0] == weight.name:
            return graph, None, index
    where = f"graph {weight.graph!r}" if weight.graph else "the main graph"
    raise ValueError(f"weight {weight.name!r} is no longer stored as a float tensor in {where}")


def replace_weight(model: onnx.ModelProto, weight: Weight, new_array: np.ndarray) -> None:
    """Replace ``weight``'s values in ``model``, wherever it lives (initializer, external data, Constant,
    subgraph). An external weight moves into memory; :func:`pyqshare.model.save_model` writes it out again.

    Parameters
    ----------
    model
        The model holding the weight (found by name in the weight's graph).
    weight
        As :func:`find_weights` returned it.
    new_array
        Same shape as the weight; cast to the weight's dtype.
    """
    values = np.asarray(new_array)
    if values.shape != weight.shape:
        raise ValueError(f"weight {weight.name!r} has shape {weight.shape}, the new values {values.shape}")
    values = np.ascontiguousarray(values, dtype=weight.dtype.newbyteorder("<"))
    graph, initializer, constant = locate(model, weight)
    if initializer is not None:
        set_raw(graph.initializer[initializer], values.tobytes())
        return
    attr = graph.node[constant].attribute[0]
    if attr.name == "value":
        set_raw(attr.t, values.tobytes())
    elif attr.name == "value_floats":
        attr.floats[:] = values.ravel().tolist()
    else:
        attr.f = float(values)
