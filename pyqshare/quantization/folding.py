"""BatchNormalization folding: a linear layer followed by an inference-form BatchNormalization becomes one layer.

BatchNormalization in inference form (one output, ``training_mode`` 0) computes, per channel ``c`` of axis 1,
``y = (x - mean_c) * k_c + bias_c`` with ``k_c = scale_c / sqrt(var_c + epsilon)``. When ``x`` is the output of
a linear layer whose output channels lie on that axis, the layer absorbs it exactly:
``W'[c] = W[c] * k_c`` and ``b'_c = (b_c - mean_c) * k_c + bias_c``. Folded here (main graph):

- ``Conv -> BN``: the weight ``[O, I/g, k...]`` scales along axis 0; a missing bias is created.
- ``ConvTranspose -> BN``: the weight ``[I, O/g, k...]`` feeds output channel ``(i // (I/g)) * (O/g) + j``
  from ``[i, j]``; a missing bias is created.
- ``Gemm -> BN`` (output ``[M, N]``): ``B`` scales along its output axis (1, or 0 with ``transB``); ``C`` becomes
  ``C * k + (bias - mean * k) / beta`` (created, with ``beta = 1``, when absent or when ``beta`` is 0).
- ``MatMul -> BN`` with a 2-D output ``[M, N]`` and a stored ``[K, N]`` weight: the weight scales along axis 1
  and, MatMul having no bias input, the BN becomes an ``Add`` of the folded shift (a MatMul + Add bias).

A pair is left alone unless the layer's weight (and bias) and the BN's four parameters are stored float
tensors, the layer's weight and bias are read by this layer only, and the layer's output is read by the BN only
and is no graph output. The arithmetic runs in float64 and is stored in the weight's own type: the folded
model computes what the original did, up to float rounding.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
from onnx import helper, numpy_helper

from pyqshare.model import Weight, find_weights, replace_weight
from pyqshare.model.graph import NameFactory, declared_type, node_label, producer_index, readers

FOLDABLE_LAYERS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def fold_batch_norms(model: onnx.ModelProto, model_dir: str | os.PathLike[str] | None = None) -> list[str]:
    """Fold every foldable ``layer -> BatchNormalization`` pair of the main graph into the layer, in place.

    Parameters
    ----------
    model
        The model; changed in place. BN parameters (and replaced biases) that nothing reads any more are removed.
    model_dir
        Folder of the model's external data (None when it has none).

    Returns
    -------
    list[str]
        The names of the BatchNormalization nodes folded away, in graph order.
    """
    graph = model.graph
    stored = {w.name: w for w in find_weights(model, model_dir, min_elements=1) if not w.graph}
    names = NameFactory(model)
    folded: list[str] = []
    unread_candidates: set[str] = set()
    batch_norms = [node_label(node) for node in graph.node
                   if node.op_type == "BatchNormalization" and node.domain in ("", "ai.onnx")]
    for label in batch_norms:
        # Looked up afresh each time: every fold rewires the graph.
        bn = next(node for node in graph.node if node_label(node) == label)
        reads = readers(graph)
        producer = producer_index(graph, bn.input[0])
        if producer is None or not _inference_form(bn) or any(name not in stored for name in bn.input[1:5]):
            continue
        layer = graph.node[producer]
        if layer.op_type not in FOLDABLE_LAYERS or not _only_reader(graph, reads, layer.output[0], bn):
            continue
        gamma, beta, mean, var = (np.asarray(stored[name].array(), dtype=np.float64) for name in bn.input[1:5])
        if not gamma.ndim == 1 or not gamma.shape == beta.shape == mean.shape == var.shape:
            continue
        epsilon = next((attr.f for attr in bn.attribute if attr.name == "epsilon"), 1e-5)
        factor = gamma / np.sqrt(var + epsilon)
        shift = beta - mean * factor
        # A replaced Gemm C (new shape) becomes unread like the BN's parameters; the pruning checks readers.
        replaced = list(bn.input[1:5]) + list(layer.input[2:3])
        fold = _FOLDERS[layer.op_type]
        if not fold(model, layer, bn, factor, shift, stored, names):
            continue
        folded.append(label)
        unread_candidates.update(replaced)
    _remove_unread(graph, unread_candidates)
    return folded


def _inference_form(bn: onnx.NodeProto) -> bool:
    attrs = {attr.name: helper.get_attribute_value(attr) for attr in bn.attribute}
    if attrs.get("training_mode", 0) or attrs.get("spatial", 1) != 1 or attrs.get("is_test", 1) != 1:
        return False
    return len(bn.input) == 5 and all(not output for output in bn.output[1:])


def _only_reader(graph: onnx.GraphProto, reads, name: str, node: onnx.NodeProto) -> bool:
    """``node`` is the only reader of ``name``, which is no graph output."""
    found = reads.get(name, [])
    return len(found) == 1 and found[0][0] is node and name not in {out.name for out in graph.output}


def _own(weight: Weight | None, layer: onnx.NodeProto) -> bool:
    """A stored float tensor that only ``layer`` reads."""
    label = node_label(layer)
    return weight is not None and all(consumer == label for consumer, _, _ in weight.consumers)


def _absorb(graph: onnx.GraphProto, layer: onnx.NodeProto, bn: onnx.NodeProto) -> None:
    """The layer now writes the BN's output; the BN node and the old intermediate tensor go."""
    intermediate = layer.output[0]
    layer.output[0] = bn.output[0]
    graph.node.remove(bn)
    for info in [info for info in graph.value_info if info.name == intermediate]:
        graph.value_info.remove(info)


def _set_bias(model, layer: onnx.NodeProto, index: int, values: np.ndarray, stored, dtype, names: NameFactory) -> None:
    """Write ``values`` as the layer's input ``index`` (replacing the stored tensor, or adding one)."""
    current = layer.input[index] if len(layer.input) > index and layer.input[index] else None
    if current is not None and stored[current].shape == values.shape:
        replace_weight(model, stored[current], values)
        return
    name = names(f"{node_label(layer)}.folded_bias")
    model.graph.initializer.append(numpy_helper.from_array(values.astype(dtype), name))
    while len(layer.input) <= index:
        layer.input.append("")
    layer.input[index] = name


def _existing_bias(layer: onnx.NodeProto, index: int, stored) -> tuple[bool, np.ndarray | None]:
    """(usable, values): a bias input that is absent is usable (None); a present one must be ours."""
    if len(layer.input) <= index or not layer.input[index]:
        return True, None
    bias = stored.get(layer.input[index])
    if not _own(bias, layer):
        return False, None
    return True, np.asarray(bias.array(), dtype=np.float64)


def _fold_conv(model, layer, bn, factor, shift, stored, names) -> bool:
    weight = stored.get(layer.input[1])
    usable, bias = _existing_bias(layer, 2, stored)
    if not _own(weight, layer) or not usable:
        return False
    values = np.asarray(weight.array(), dtype=np.float64)
    channels = factor.size
    if layer.op_type == "Conv":
        if values.shape[0] != channels:
            return False
        multiplier = factor.reshape((channels,) + (1,) * (values.ndim - 1))
    else:  # ConvTranspose [I, O/g, k...]: input channel i of group i // (I/g) feeds output slot j of that group
        group = next((attr.i for attr in layer.attribute if attr.name == "group"), 1)
        inputs, per_group = values.shape[0], values.shape[1]
        if per_group * group != channels or inputs % group:
            return False
        by_input = factor.reshape(group, per_group)[np.arange(inputs) // (inputs // group)]
        multiplier = by_input.reshape(by_input.shape + (1,) * (values.ndim - 2))
    replace_weight(model, weight, values * multiplier)
    folded_bias = (shift if bias is None else bias * factor + shift)
    _set_bias(model, layer, 2, folded_bias, stored, weight.dtype, names)
    _absorb(model.graph, layer, bn)
    return True


def _fold_gemm(model, layer, bn, factor, shift, stored, names) -> bool:
    weight = stored.get(layer.input[1])
    usable, bias = _existing_bias(layer, 2, stored)
    if not _own(weight, layer) or not usable or weight.channel_axis is None:
        return False
    values = np.asarray(weight.array(), dtype=np.float64)
    axis = weight.channel_axis  # 1, or 0 with transB
    if values.shape[axis] != factor.size:
        return False
    attrs = {attr.name: attr for attr in layer.attribute}
    beta_attr = attrs["beta"].f if "beta" in attrs else 1.0
    if bias is not None and beta_attr != 0:
        if bias.ndim > 2 or (bias.ndim >= 1 and bias.shape[-1] not in (1, factor.size)):
            return False
        folded_bias = bias * factor + shift / beta_attr
    else:  # no C (or C ignored): a fresh per-channel C with beta 1
        folded_bias = shift
        if "beta" in attrs:
            attrs["beta"].f = 1.0
    replace_weight(model, weight, values * (factor if axis == 1 else factor[:, None]))
    _set_bias(model, layer, 2, folded_bias, stored, weight.dtype, names)
    _absorb(model.graph, layer, bn)
    return True


def _fold_matmul(model, layer, bn, factor, shift, stored, names) -> bool:
    weight = stored.get(layer.input[1])
    activation = declared_type(model.graph, layer.input[0])
    known = activation is not None and activation.tensor_type.HasField("shape")
    rank = len(activation.tensor_type.shape.dim) if known else None
    # BN's channel axis 1 is the MatMul's output channel only for a 2-D product.
    if rank != 2 or not _own(weight, layer) or weight.shape != (weight.shape[0], factor.size):
        return False
    replace_weight(model, weight, np.asarray(weight.array(), dtype=np.float64) * factor)
    shift_name = names(f"{node_label(bn)}.folded_shift")
    model.graph.initializer.append(numpy_helper.from_array(shift.astype(weight.dtype), shift_name))
    add = helper.make_node("Add", [layer.output[0], shift_name], [bn.output[0]], name=bn.name)
    position = list(model.graph.node).index(bn)
    model.graph.node.remove(bn)
    model.graph.node.insert(position, add)
    return True


_FOLDERS = {"Conv": _fold_conv, "ConvTranspose": _fold_conv, "Gemm": _fold_gemm, "MatMul": _fold_matmul}


def _remove_unread(graph: onnx.GraphProto, candidates: set[str]) -> None:
    """Drop the stored tensors among ``candidates`` that no node reads and no output names."""
    still_read = set(readers(graph)) | {out.name for out in graph.output}
    dead = candidates - still_read
    for tensor in [tensor for tensor in graph.initializer if tensor.name in dead]:
        graph.initializer.remove(tensor)
    for node in [node for node in graph.node if node.op_type == "Constant" and node.output[0] in dead]:
        graph.node.remove(node)
    for value in [value for value in graph.input if value.name in dead]:
        graph.input.remove(value)
