"""Empirical bias correction: remove the mean shift that quantizing a layer's weight puts on its outputs.

Quantizing ``W`` to ``W_q`` moves each output channel's mean by ``E[x] (W_q - W)``, where ``E[x]`` is the mean
of what multiplies the weight on calibration data (Nagel et al., "Data-Free Quantization Through Weight
Equalization and Bias Correction", ICCV 2019, section 4.2; the empirical variant, measured rather than
derived from BatchNorm statistics). The bias absorbs it: ``b' = b - E[x] (W_q - W)``, per output channel.

Corrected layers, with what ``E[x]`` is:
- ``MatMul`` with a stored 2-D weight and a ``MatMul + Add`` bias: the mean row of its input;
- ``Gemm``: the mean row of ``A`` (column with ``transA``); ``C`` moves by ``alpha / beta`` times the shift;
- ``Conv``: the mean im2col patch of its input (per input channel and kernel offset, zeros of the padding
  included), so that the shift of output channel ``o`` is ``sum(mean_patch[group of o] * (W_q - W)[o])``.

Not corrected: ``ConvTranspose`` (its patches overlap unevenly at the borders), RNN weights, and MatMuls
without an ``Add`` bias (the graph has no bias to move; adding an ``Add`` node would change the graph QNN sees).
:func:`add_missing_biases` gives every Gemm and Conv without one a zero bias first, which their ONNX forms
allow and which changes nothing in float.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from pyqshare.calibration import cpu_session, run_session
from pyqshare.model import Weight, find_weights, replace_weight
from pyqshare.model.graph import NameFactory, node_label


def add_missing_biases(model: onnx.ModelProto) -> list[str]:
    """Give every main-graph Gemm and Conv without a bias a zero one (exact: nothing changes in float).

    Parameters
    ----------
    model
        Changed in place. The weight's output-channel count must be known from a stored weight.

    Returns
    -------
    list[str]
        Names of the layers that got a bias.
    """
    stored = {tensor.name: tensor for tensor in model.graph.initializer}
    names = NameFactory(model)
    added = []
    for node in model.graph.node:
        if node.op_type not in ("Gemm", "Conv") or (len(node.input) > 2 and node.input[2]):
            continue
        weight = stored.get(node.input[1])
        if weight is None or len(weight.dims) < 2:
            continue
        attrs = {attr.name: attr for attr in node.attribute}
        transposed = node.op_type == "Conv" or ("transB" in attrs and attrs["transB"].i)
        channels = weight.dims[0] if transposed else weight.dims[1]
        dtype = helper.tensor_dtype_to_np_dtype(weight.data_type)
        name = names(f"{node_label(node)}.bias")
        model.graph.initializer.append(numpy_helper.from_array(np.zeros(channels, dtype=dtype), name))
        while len(node.input) < 3:
            node.input.append("")
        node.input[2] = name
        if node.op_type == "Gemm" and "beta" in attrs:
            attrs["beta"].f = 1.0  # without C the product ignored beta; with the new C it must be 1
        added.append(node_label(node))
    return added


class BiasCorrection:
    """Measures ``E[x]`` of every correctable layer on calibration data, then corrects biases on request.

    Use it as ``quantize_model``'s ``on_weight_quantized`` hook: it is called with each linear-layer weight as
    it is quantized, and moves that layer's bias (still float at that point).

    Parameters
    ----------
    model
        The float model that is about to be quantized (its biases are replaced in place when corrected).
    samples
        Calibration samples ``{input name: array}``.
    model_dir
        Folder of the model's external data.
    """

    def __init__(
        self,
        model: onnx.ModelProto,
        samples: Sequence[Mapping[str, np.ndarray]],
        model_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.model = model
        self.corrected: dict[str, float] = {}  # weight name -> largest |shift| removed from its bias
        weights = find_weights(model, model_dir, min_elements=1)
        biases = {w.bias_of: w for w in weights if w.role == "bias" and w.bias_of is not None and not w.graph}
        nodes = {node_label(node): node for node in model.graph.node}
        self._layers: dict[str, tuple[onnx.NodeProto, Weight, Weight]] = {}  # name -> (layer, weight, bias)
        for weight in weights:
            bias = biases.get(weight.name)
            if weight.graph or bias is None or len(weight.consumers) != 1 or len(bias.consumers) != 1:
                continue
            node = nodes.get(weight.consumers[0][0])
            if node is not None and _correctable(node, weight, bias):
                self._layers[weight.name] = (node, weight, bias)
        self._means = _input_means(model, samples, self._layers, model_dir)

    def __call__(self, weight: Weight, values: np.ndarray, dequantized: np.ndarray) -> None:
        """Correct the bias of ``weight``'s layer for the change from ``values`` to ``dequantized``."""
        if weight.name not in self._layers:
            return
        node, _, bias = self._layers[weight.name]
        delta = np.asarray(dequantized, dtype=np.float64) - np.asarray(values, dtype=np.float64)
        mean = self._means[weight.name]
        if node.op_type == "Conv":
            shift = _conv_shift(node, mean, delta)
        else:
            if node.op_type == "Gemm":
                attrs = {attr.name: attr for attr in node.attribute}
                if "transB" in attrs and attrs["transB"].i:
                    delta = delta.T
                alpha = attrs["alpha"].f if "alpha" in attrs else 1.0
                beta = attrs["beta"].f if "beta" in attrs else 1.0
                shift = alpha / beta * (mean @ delta)
            else:
                shift = mean @ delta
        current = np.asarray(bias.array(), dtype=np.float64)
        replace_weight(self.model, bias, current - shift)  # broadcasts over a Gemm C of shape [M, N]
        self.corrected[weight.name] = float(np.max(np.abs(shift))) if shift.size else 0.0


def _correctable(node: onnx.NodeProto, weight: Weight, bias: Weight) -> bool:
    if node.input[1] != weight.name or len(weight.shape) < 2:
        return False
    attrs = {attr.name: attr for attr in node.attribute}
    if node.op_type == "MatMul":
        return len(weight.shape) == 2 and bias.shape == weight.shape[1:]
    if node.op_type == "Gemm":
        beta = attrs["beta"].f if "beta" in attrs else 1.0
        channels = weight.shape[0] if "transB" in attrs and attrs["transB"].i else weight.shape[1]
        # C must hold one value per output channel (shape [N], [1, N] or [M, N]) for a per-channel shift.
        return beta != 0 and 1 <= len(bias.shape) <= 2 and bias.shape[-1] == channels
    return node.op_type == "Conv" and len(weight.shape) >= 3


def _input_means(
    model, samples, layers: Mapping[str, tuple[onnx.NodeProto, Weight, Weight]], model_dir
) -> dict[str, np.ndarray]:
    """Per weight name: the mean input row of its MatMul/Gemm, or the mean im2col patch of its Conv."""
    tensors = sorted({node.input[0] for node, _, _ in layers.values()})
    if not tensors:
        return {}
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}

    def add(key: str, total: np.ndarray, count: int) -> None:
        sums[key] = sums.get(key, 0.0) + total
        counts[key] = counts.get(key, 0) + count

    for values in _tensor_values(model, samples, tensors, model_dir):
        for name, (node, weight, _) in layers.items():
            x = np.asarray(values[node.input[0]], dtype=np.float64)
            if node.op_type == "Conv":
                add(name, *_patch_sum(node, x, weight.shape[2:]))
            elif node.op_type == "Gemm" and any(a.name == "transA" and a.i for a in node.attribute):
                add(name, x.sum(axis=1), x.shape[1])
            else:
                rows = x.reshape(-1, x.shape[-1])
                add(name, rows.sum(axis=0), rows.shape[0])
    return {key: total / counts[key] for key, total in sums.items()}


def _tensor_values(model, samples, tensors: Sequence[str], model_dir) -> Iterator[dict[str, np.ndarray]]:
    """Per sample, the values of main-graph ``tensors`` (graph inputs come from the sample itself)."""
    inputs = {value.name for value in model.graph.input}
    fetched = [name for name in tensors if name not in inputs]
    if not fetched:
        yield from ({name: sample[name] for name in tensors} for sample in samples)
        return
    with cpu_session(model, extra_outputs=fetched, model_dir=model_dir) as session:
        for sample in samples:
            (outputs,) = run_session(session, [sample], fetched)
            yield {**outputs, **{name: sample[name] for name in tensors if name in inputs}}


def _conv_geometry(node: onnx.NodeProto, spatial: tuple[int, ...], kernel: tuple[int, ...]):
    """(strides, dilations, pads begin, pads end, output sizes) of a Conv on ``spatial`` input dims."""
    attrs = {attr.name: helper.get_attribute_value(attr) for attr in node.attribute}
    rank = len(spatial)
    strides = list(attrs.get("strides", [1] * rank))
    dilations = list(attrs.get("dilations", [1] * rank))
    auto_pad = attrs.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for size, k, s, d in zip(spatial, kernel, strides, dilations):
            total = max(0, (math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size)
            small, large = total // 2, total - total // 2
            begin.append(small if auto_pad == "SAME_UPPER" else large)
            end.append(large if auto_pad == "SAME_UPPER" else small)
    elif auto_pad == "VALID":
        begin, end = [0] * rank, [0] * rank
    else:
        pads = list(attrs.get("pads", [0] * (2 * rank)))
        begin, end = pads[:rank], pads[rank:]
    outputs = [
        (size + b + e - (k - 1) * d - 1) // s + 1
        for size, k, s, d, b, e in zip(spatial, kernel, strides, dilations, begin, end)
    ]
    return strides, dilations, begin, end, outputs


def _patch_sum(node: onnx.NodeProto, x: np.ndarray, kernel: tuple[int, ...]) -> tuple[np.ndarray, int]:
    """Sum over batch and output positions of every im2col patch of a Conv's input ``x`` [N, C, spatial...]
    for a ``kernel`` of spatial shape [k...]: shape [C, k...], and the number of patches."""
    spatial = x.shape[2:]
    strides, dilations, begin, end, outputs = _conv_geometry(node, spatial, kernel)
    padded = np.pad(x, [(0, 0), (0, 0)] + list(zip(begin, end)))
    sums = np.empty((x.shape[1],) + kernel)
    for offset in itertools.product(*(range(k) for k in kernel)):
        window = tuple(
            slice(o * d, o * d + s * (n - 1) + 1, s) for o, d, s, n in zip(offset, dilations, strides, outputs)
        )
        sums[(slice(None),) + offset] = padded[(slice(None), slice(None)) + window].sum(axis=(0, *range(2, x.ndim)))
    return sums, x.shape[0] * math.prod(outputs)


def _conv_shift(node: onnx.NodeProto, mean_patch: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """Per output channel, the mean output change of a Conv whose weight changed by ``delta`` [O, C/g, k...]."""
    group = next((attr.i for attr in node.attribute if attr.name == "group"), 1)
    out_channels, per_group = delta.shape[0], delta.shape[1]
    patches = mean_patch.reshape(group, per_group, -1)
    changes = delta.reshape(group, out_channels // group, per_group, -1)
    return np.einsum("gck,gock->go", patches, changes).reshape(out_channels)
