"""Linear layers' inputs: which activation multiplies a weight, and the Gram matrices of those activations.

GPTQ and AdaRound rounding, cluster refits, importance pruning and sparse re-fits all need, per linear layer,
the Gram matrix ``H = X^T X`` of its calibration inputs (rows of ``X`` are positions, columns input features).
Layers that read the same activation (attention's Q, K and V projections) share one matrix.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx

from pyqshare.calibration import cpu_session, run_session
from pyqshare.model import Weight

Sample = Mapping[str, np.ndarray]

GRAM_BATCH_ROWS = 1024


def consumer_node(model: onnx.ModelProto, weight: Weight) -> onnx.NodeProto | None:
    """The main-graph node that reads ``weight`` as its linear-layer weight (None for subgraph weights)."""
    if weight.graph:
        return None
    names = {name for name, _, _ in weight.consumers}
    for node in model.graph.node:
        if (node.name or node.output[0]) in names and weight.name in node.input:
            return node
    return None


def layer_input(model: onnx.ModelProto, weight: Weight) -> str | None:
    """The activation a linear layer multiplies ``weight`` with (its input 0, the weight being input 1), or None."""
    node = consumer_node(model, weight)
    if node is None or len(node.input) < 2 or node.input[1] != weight.name:
        return None
    if node.op_type == "Gemm" and any(a.name == "transA" and a.i for a in node.attribute):
        return None
    return node.input[0]


def gram_input(model: onnx.ModelProto, weight: Weight) -> str | None:
    """The layer input whose Gram matrix drives GPTQ, AdaRound and least-squares refits: 2-D MatMul/Gemm
    weights only (a Conv would need im2col), else None."""
    node = consumer_node(model, weight)
    if node is None or len(weight.shape) != 2 or node.op_type not in ("MatMul", "Gemm"):
        return None
    return layer_input(model, weight)


class GramAccumulator:
    """``X^T X`` per tensor, summed over activations streamed from a calibration pass.

    Rows are buffered up to :data:`GRAM_BATCH_ROWS` per tensor before each product: one tall product runs
    at twice the speed of many short ones (measured: 1,024 x 1,536 float32 rows at once against 8 x 128).

    Parameters
    ----------
    tensors
        Names of the activations to accumulate; others passed to :meth:`observe` are ignored.
    dtype
        Precision of each product (float32 is about twice as fast); sums are float64.
    """

    def __init__(self, tensors: Iterable[str], dtype: type = np.float64) -> None:
        self.tensors = frozenset(tensors)
        self._dtype = dtype
        self._sums: dict[str, np.ndarray] = {}
        self._pending: dict[str, list[np.ndarray]] = {}

    def observe(self, tensor: str, values: np.ndarray) -> None:
        """Add one sample's activation ``values`` (features on the last axis) of ``tensor``."""
        if tensor not in self.tensors:
            return
        pending = self._pending.setdefault(tensor, [])
        pending.append(np.asarray(values, dtype=self._dtype).reshape(-1, values.shape[-1]))
        if sum(len(rows) for rows in pending) >= GRAM_BATCH_ROWS:
            self._flush(tensor)

    def grams(self) -> dict[str, np.ndarray]:
        """``{tensor: X^T X}`` for every tensor observed at least once."""
        for tensor in list(self._pending):
            self._flush(tensor)
        return dict(self._sums)

    def _flush(self, tensor: str) -> None:
        pending = self._pending.pop(tensor)
        rows = pending[0] if len(pending) == 1 else np.concatenate(pending)
        product = (rows.T @ rows).astype(np.float64, copy=False)
        self._sums[tensor] = self._sums[tensor] + product if tensor in self._sums else product


def tensor_grams(
    model: onnx.ModelProto, samples: Sequence[Sample], tensors: Collection[str], *,
    model_dir: str | Path | None = None, dtype: type = np.float64,
) -> dict[str, np.ndarray]:
    """``{tensor: X^T X}`` of main-graph activations over ``samples``, in one onnxruntime pass.

    Parameters
    ----------
    model
        The float model.
    samples
        Calibration samples ``{input name: array}``, streamed one at a time.
    tensors
        Activations (node outputs or graph inputs) with their features on the last axis.
    model_dir
        Folder of the model's external data.
    dtype
        Precision of each sample's product; the sum over samples is float64.
    """
    accumulator = GramAccumulator(tensors, dtype)
    if not accumulator.tensors:
        return {}
    inputs = {i.name for i in model.graph.input}
    produced = sorted(accumulator.tensors - inputs)
    for sample in samples:
        for tensor in accumulator.tensors:
            if tensor in inputs:
                accumulator.observe(tensor, sample[tensor])
    if produced:
        with cpu_session(model, extra_outputs=produced, model_dir=model_dir) as session:
            for sample in samples:
                (outputs,) = run_session(session, [sample], produced)
                for tensor, values in outputs.items():
                    accumulator.observe(tensor, values)
    return accumulator.grams()


def layer_input_grams(
    model: onnx.ModelProto, samples: Sequence[Sample], weights: Sequence[Weight], *,
    model_dir: str | Path | None = None, dtype: type = np.float64,
) -> dict[str, np.ndarray]:
    """``{weight name: X^T X}`` of each weight's layer input (:func:`gram_input`) over ``samples``.

    Weights that are not 2-D MatMul/Gemm weights are left out; weights reading the same activation share
    one array. Parameters as for :func:`tensor_grams`; ``weights`` are linear-layer weights.
    """
    inputs = {w.name: tensor for w in weights if (tensor := gram_input(model, w)) is not None}
    grams = tensor_grams(model, samples, set(inputs.values()), model_dir=model_dir, dtype=dtype)
    return {name: grams[tensor] for name, tensor in inputs.items()}
