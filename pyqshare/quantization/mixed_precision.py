"""Mixed precision: what each precision does to a weight, how much each layer's precision costs the model
output, and the mix of precisions that fits an average bit budget with the least loss.

Precisions (:data:`PRECISION_BITS`, bits per weight in budgets and size figures):

* ``int4``, ``int8``, ``int16``: symmetric codes, scales searched for the least squared error (int4 is always
  symmetric on QNN); a linear layer's weight per output channel, an embedding table per tensor (QNN's EP
  refuses a per-row DequantizeLinear in front of a Gather: measured). MiniLM's word embeddings reach 37.3 dB
  at int8 and 18.5 dB at int4 this way, against 30.0 and 5.6 dB with min/max ranges;
* ``fp16``: the weight stays a float tensor, its values rounded to float16 (what QNN's HTP stores for a
  float weight: measured, 2 bytes per element in the context binary).

Sensitivity (:func:`measure_sensitivity`): each layer alone is quantized at each candidate precision, the
rest of the model float, and the model's outputs on calibration samples are compared with the float
model's; a layer's SQNR is the minimum over the float outputs, pooled over samples. One onnxruntime
session serves the whole table: the weights under study become overridable initializers and the
fake-quantized values (quantized, then dequantized) are fed in their place.

Loss model: each layer's quantization noise is taken as independent and additive at the output, so the
model's relative noise power is the sum over layers of ``10 ** (-SQNR / 10)``, and its predicted SQNR is
``-10 * log10(sum)``.

Allocation (:func:`allocate`): a multiple-choice knapsack. Item ``i`` (a layer of ``n_i`` weights) takes one
option ``o`` (a precision) costing ``n_i * bits_o`` bits with loss ``l_io``; the total cost may not exceed the
budget, the total loss is minimised. It is solved exactly by dynamic programming over the cost axis:
``best_i(c) = min_o best_{i-1}(c - cost_io) + l_io`` with ``best_0(c) = 0``, the optimum of the first ``i``
items within ``c`` (optimal substructure: removing item ``i`` from an optimal choice within ``c`` leaves an
optimal choice of the first ``i - 1`` items within ``c - cost_io``, else swapping that part in would do
better). Costs are counted above each item's cheapest option, in units of their greatest common divisor, so
the table is exact and small for real models (MiniLM: 14,671 units of 3,072 bits at 6 bits per weight).
When the exact table would exceed ``max_cells``, costs are rounded *up* to a coarser unit and the budget
down: every answer still fits the true budget, and it is optimal for the rounded costs (``exact`` is then
False).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from pyqshare.calibration import Sample, cpu_session, exact_cpu_options, run_model
from pyqshare.errors import InputError
from pyqshare.evaluate import sqnr_db
from pyqshare.model import Weight, replace_weight
from pyqshare.quantization.pipeline import fake_quantize_linear
from pyqshare.quantization.scheme import WeightScheme

PRECISION_BITS = {"fp16": 16, "int16": 16, "int8": 8, "int4": 4}
"""Every precision and its bits per weight."""

MAX_LOSS = 1e12
"""Relative noise power standing in for a non-finite one (an SQNR of -120 dB) so that sums stay finite."""

_FLOAT16_MAX = float(np.finfo(np.float16).max)


def weight_scheme(weight: Weight, precision: str, rounding: str = "gptq") -> WeightScheme | None:
    """How ``weight`` is quantized at ``precision`` (module docstring); None for fp16 (it stays float).

    Parameters
    ----------
    weight
        A linear-layer weight or an embedding table.
    precision
        A key of :data:`PRECISION_BITS`.
    rounding
        ``gptq`` or ``nearest`` for int4 and int8 linear layers. Embedding tables (no layer input to compensate
        against) and int16 weights (whose rounding noise lies some 90 dB below the weights: GPTQ would only
        cost time) round to nearest.
    """
    if precision == "fp16":
        return None
    table = weight.role == "embedding"
    nearest = table or precision == "int16"
    return WeightScheme(bits=PRECISION_BITS[precision], granularity="per-tensor" if table else "per-channel",
                        symmetric=True, search="mse", rounding="nearest" if nearest else rounding)


def float16_values(weight: Weight) -> np.ndarray:
    """The weight's values rounded to float16, in the weight's own dtype.

    Parameters
    ----------
    weight
        Any float weight.

    Raises
    ------
    InputError
        If a value lies beyond float16's range (it would become infinite).
    """
    values = np.asarray(weight.array(), dtype=np.float32)
    if values.size and float(np.max(np.abs(values))) > _FLOAT16_MAX:
        raise InputError(f"weight {weight.name!r} holds values beyond float16's range: choose an integer precision")
    return values.astype(np.float16).astype(weight.dtype)


def fake_quantize(
    weight: Weight, precision: str, rounding: str = "nearest", gram: np.ndarray | None = None
) -> np.ndarray:
    """The values ``weight`` takes at ``precision`` (quantized and dequantized), as the written model holds it.

    Parameters
    ----------
    weight
        A linear-layer weight or an embedding table.
    precision
        A key of :data:`PRECISION_BITS`.
    rounding
        ``nearest``, or ``gptq`` with ``gram``.
    gram
        The layer's input Gram matrix for GPTQ (:func:`pyqshare.quantization.layers.layer_input_grams`).
    """
    scheme = weight_scheme(weight, precision, rounding)
    if scheme is None:
        return float16_values(weight)
    return fake_quantize_linear(weight, scheme, gram).astype(weight.dtype)


def noise_power(sqnr: float) -> float:
    """Relative noise power ``10 ** (-sqnr / 10)``: 0 for an exact output, :data:`MAX_LOSS` at most.

    Parameters
    ----------
    sqnr
        An SQNR in dB (inf, -inf and nan allowed).
    """
    if math.isnan(sqnr):
        return MAX_LOSS
    return min(MAX_LOSS, 10.0 ** (-sqnr / 10.0))


def measure_sensitivity(
    model: onnx.ModelProto,
    samples: Sequence[Sample],
    plan: Sequence[tuple[Weight, Sequence[str]]],
    *,
    rounding: str = "nearest",
    grams: Mapping[str, np.ndarray] | None = None,
    model_dir: str | os.PathLike[str] | None = None,
) -> dict[str, dict[str, float]]:
    """Output SQNR of the model with one layer at a time quantized at each of its candidate precisions.

    Parameters
    ----------
    model
        The float model; left as it was (weights under study are declared as inputs only while the
        session is created).
    samples
        Calibration samples.
    plan
        ``(weight, precisions to try)`` per layer.
    rounding, grams
        How linear layers round (:func:`fake_quantize`): the quantizer of the model to be written, so that the
        table measures the weights that model will hold.
    model_dir
        Folder of the model's external data.

    Returns
    -------
    dict
        Weight name -> precision -> SQNR in dB: the minimum over the model's float outputs, pooled over the
        samples, against the float model.
    """
    graph = model.graph
    declared = {value.name for value in graph.input}
    stored = {tensor.name for tensor in graph.initializer}
    feedable = {w.name for w, _ in plan if not w.graph and w.name in stored}
    kept_inputs = len(graph.input)
    graph.input.extend(
        helper.make_tensor_value_info(w.name, helper.np_dtype_to_tensor_dtype(w.dtype), w.shape)
        for w, _ in plan if w.name in feedable and w.name not in declared
    )
    options = exact_cpu_options()
    options.log_severity_level = 3  # onnxruntime notes every overridable initializer at warning level
    table: dict[str, dict[str, float]] = {}
    try:
        with cpu_session(model, model_dir=model_dir, options=options) as session:
            names = [output.name for output in session.get_outputs()]
            reference = [dict(zip(names, session.run(names, sample), strict=True)) for sample in samples]
            compared = [name for name in names if reference[0][name].dtype.kind == "f"]
            for weight, precisions in plan:
                table[weight.name] = {}
                for precision in precisions:
                    values = fake_quantize(weight, precision, rounding, (grams or {}).get(weight.name))
                    if weight.name in feedable:
                        outputs = [dict(zip(names, session.run(names, {**sample, weight.name: values}), strict=True))
                                   for sample in samples]
                    else:
                        outputs = _run_replaced(model, weight, values, samples, model_dir)
                    table[weight.name][precision] = min(
                        sqnr_db([r[name] for r in reference], [o[name] for o in outputs]) for name in compared
                    )
    finally:
        del graph.input[kept_inputs:]
    return table


def _run_replaced(model, weight: Weight, values: np.ndarray, samples, model_dir) -> list[Sample]:
    """Outputs with ``weight`` replaced (a Constant node or a subgraph weight cannot be fed): a session each."""
    original = np.array(weight.array())
    replace_weight(model, weight, values)
    try:
        return run_model(model, samples, model_dir=model_dir)
    finally:
        replace_weight(model, weight, original)


@dataclass
class Allocation:
    """The answer of :func:`allocate`.

    Attributes
    ----------
    choice
        The chosen option's index, per item.
    loss
        Total loss of the choice.
    bits
        Total cost of the choice in bits (at most the budget).
    exact
        True when the table held the exact costs (the choice is optimal), False when costs were rounded up.
    """

    choice: list[int]
    loss: float
    bits: int
    exact: bool


def allocate(
    sizes: Sequence[int],
    options: Sequence[Sequence[tuple[int, float]]],
    budget_bits: int,
    *,
    max_cells: int = 1 << 24,
) -> Allocation:
    """Choose one option per item to minimise the total loss within a bit budget (multiple-choice knapsack by
    dynamic programming; the module docstring has the method and its optimality argument).

    Parameters
    ----------
    sizes
        Elements per item (a layer's weight count).
    options
        Per item, ``(bits per element, loss)`` of each option; losses are non-negative (non-finite ones are
        capped at :data:`MAX_LOSS`). Ties go to the earlier option.
    budget_bits
        The most bits the choice may take in total (``sum(sizes[i] * bits)``).
    max_cells
        Largest DP table (items x cost units) before costs are rounded up to a coarser unit.

    Raises
    ------
    ValueError
        If even the cheapest options exceed the budget, an item has no option, or a loss is negative.
    """
    if len(sizes) != len(options) or any(not row for row in options):
        raise ValueError("every item needs at least one option, and one size")
    cheapest = [size * min(bits for bits, _ in row) for size, row in zip(sizes, options, strict=True)]
    capacity = budget_bits - sum(cheapest)
    if capacity < 0:
        raise ValueError(f"the cheapest choice takes {sum(cheapest)} bits, over the budget of {budget_bits}")
    extras = [[size * bits - base for bits, _ in row] for size, row, base in zip(sizes, options, cheapest, strict=True)]
    losses = [[min(MAX_LOSS, loss) if not math.isnan(loss) else MAX_LOSS for _, loss in row] for row in options]
    if any(loss < 0 for row in losses for loss in row):
        raise ValueError("losses must be non-negative")
    unit = math.gcd(*(extra for row in extras for extra in row)) or 1
    limit = max(1, max_cells // max(1, len(sizes)) - 1)
    exact = capacity // unit <= limit
    if not exact:
        unit = -(-capacity // limit)
    units = capacity // unit
    costs = [[-(-extra // unit) for extra in row] for row in extras]

    best = np.zeros(units + 1)  # least loss of the items so far within c units
    picks = np.zeros((len(sizes), units + 1), dtype=np.int16)
    for item, (row_costs, row_losses) in enumerate(zip(costs, losses, strict=True)):
        merged = np.full(units + 1, np.inf)
        for option, (cost, loss) in enumerate(zip(row_costs, row_losses, strict=True)):
            if cost > units:
                continue
            candidate = np.full(units + 1, np.inf)
            candidate[cost:] = best[: units + 1 - cost] + loss
            better = candidate < merged
            merged[better] = candidate[better]
            picks[item, better] = option
        best = merged
    choice = [0] * len(sizes)
    remaining = units
    for item in reversed(range(len(sizes))):
        choice[item] = int(picks[item, remaining])
        remaining -= costs[item][choice[item]]
    bits = sum(size * row[pick][0] for size, row, pick in zip(sizes, options, choice, strict=True))
    loss = sum(row[pick] for row, pick in zip(losses, choice, strict=True))
    return Allocation(choice, loss, bits, exact)
