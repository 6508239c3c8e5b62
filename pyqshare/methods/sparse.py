"""``pyqshare sparse``: prune linear-layer weights, re-fit what is kept, then quantize to QDQ.

Which weights
    Every linear-layer weight (MatMul B, Gemm B, Conv/ConvTranspose W, LSTM/GRU/RNN W and R) with at least
    ``--min-elements`` elements. Embedding tables, biases and normalization parameters stay dense.

Defaults by ``--model-type`` (the Guide's recommendation table; the middle of its sparsity ranges):

=================  ========  =======  ====================================================
model type         sparsity  pattern  Guide
=================  ========  =======  ====================================================
vision             0.5       2:4      50-70%, 2:4 or 4:8 (higher sparsity possible on CNNs)
text               0.5       2:4      40-60%, 2:4
audio              0.4       4:8      30-50%, 4:8 (more sensitive)
text_generation    0.3       2:4      LLMs: 20-40%, 2:4 (be conservative)
multimodal         0.5       2:4      (not in the Guide: as text)
=================  ========  =======  ====================================================

The pattern is used when pruning is structured; the sparsity when it is not.

Criteria and masks (``--pruning-method``)
    ``magnitude`` keeps the largest ``|w|``; ``weight_importance`` the largest ``|w| * ||x_i||``, where
    ``||x_i||`` is the L2 norm, over every calibration sample and position, of the input feature that the
    weight multiplies (Wanda's score; from the diagonal of the layer input's Gram matrix for MatMul/Gemm,
    from per-channel sums of squares of the input for Conv/ConvTranspose, group-aware). Layers without a
    known 2-D input (RNN weights, batched MatMul B, subgraphs, Gemm with transA) fall back to magnitude,
    and their summary entry says so. Both are unstructured by default, with exactly
    ``round(sparsity * count)`` zeros per layer (``--mask-scope layer``, the default for magnitude) or per
    output channel (``--mask-scope channel``, the default for weight_importance, as Wanda compares weights
    within each output). ``structured`` is magnitude with an N:M pattern: in every group of ``m``
    consecutive weights along the reduction axis (the input features of one output channel, as NVIDIA's
    2:4 sparse tensor cores and QNN group them; for a Conv the input channels at one kernel position) the
    ``n`` largest are kept, so the sparsity is ``1 - n/m``. An explicit ``--structured-pattern`` makes any
    method N:M (weight_importance then ranks the group members by importance).
    With a pattern, ``--sparsity`` and the ``--layer-wise-sparsity`` values may only be ``1 - n/m`` (prune)
    or 0 (leave the layer dense); ``m`` must divide every pruned layer's reduction axis.

``--layer-wise-sparsity FILE``
    A JSON object mapping a layer name or a regular expression to a sparsity in [0, 1). A layer's names are
    its weight's tensor name, its consumer nodes' names, and, for exporter-style node names such as
    ``/encoder/layer.0/attention/self/query/MatMul``, the module path ``encoder.layer.0.attention.self.query``.
    A key equal to one of these names wins; otherwise the first key (in file order) that matches one of them
    as a regular expression (``re.fullmatch``); otherwise ``--sparsity``. Keys that match no layer are listed
    in the summary (``unmatched_layer_keys``) and on stderr.

Schedule (``--pruning-schedule linear|cubic|exponential --steps N``)
    With ``S`` a layer's final sparsity and ``u = t / N`` for steps ``t = 1 .. N`` the targets are

    * linear: ``s_t = S * u``
    * cubic: ``s_t = S * (1 - (1 - u) ** 3)`` (Zhu and Gupta's gradual pruning: fast first, slow last)
    * exponential: ``s_t = 1 - (1 - S) ** u`` (every step removes the same fraction of the weights still kept)

    Without a schedule pruning is one shot (``N = 1``); with one, ``--steps`` defaults to 4. Masks only grow:
    a weight pruned at one step stays pruned. Unstructured steps prune exactly ``round(s_t * count)``
    weights; N:M steps put ``round(s_t / (1 - n/m) * groups)`` groups (those whose pruning costs the least
    score) into the N:M pattern. The summary lists every layer's achieved sparsity per step.

Re-fit (on unless ``--no-refit``)
    After each step, every pruned MatMul/Gemm layer's kept weights are re-fit so that the layer reproduces
    its pre-pruning outputs on the calibration inputs: with ``H = X^T X`` the Gram matrix of the layer's input
    over the calibration data and ``W`` the original weights, each output channel's kept weights ``w_K``
    solve ``(H + lambda I)_KK w_K = ((H + lambda I) W)_K``, ``lambda = 0.01 * mean(diag(H))``. That is the
    exact minimiser of ``||X (W - w)||^2 + lambda ||W - w||^2`` over weights that are zero off ``K`` (the
    optimal-brain-surgeon reconstruction, solved per channel rather than approximated): the damping pulls
    toward the original weights, so the layer's calibration output error never exceeds plain pruning's.
    Inputs come from the float model: layers are not re-fit to compensate for pruning upstream (one
    calibration pass serves every layer and step). Conv and RNN weights are pruned but not re-fit.

Quantization
    The pruned, re-fit weights then go through :func:`pyqshare.quantization.pipeline.quantize_model` with
    per-channel symmetric weights (``--weight-bits``, default 8; scales from ``scale_search``'s squared-error
    optimum) and *nearest* rounding: symmetric codes keep every pruned weight exactly 0 (code 0). GPTQ is not
    used: it would spread rounding error onto the pruned weights. Activations are calibrated per tensor as
    ``per-channel`` does (``--activation-bits``, default 16 for text, text_generation and multimodal, else
    8; min-max ranges at 16 bits, percentile at 8). ``--weight-bits 16`` is the near-float option: the model stays QDQ (so it runs on the QNN HTP) with
    int16 weights.

Summary
    ``packed_bytes``: per pruned layer, the kept values at their bit width plus sparsity metadata plus
    scales: for N:M the packed in-group indices exactly as :func:`pyqshare.nm_compress` lays them out
    (``ceil(log2 m)`` bits per kept value, e.g. 4 bits per group of 2:4), for unstructured layers a bitmap
    (1 bit per element), or the dense codes when those are smaller. Per layer: ``sparsity`` (zero codes in
    the written model), ``target_sparsity``, ``pattern``, ``criterion``, ``step_sparsity``, ``format`` and,
    for MatMul/Gemm layers, calibration output SQNRs (dB, ``10 log10(tr(W^T H W) / tr(D^T H D))`` with ``D``
    the change): ``plain_pruning_output_sqnr_db`` (the final mask on the original weights),
    ``pruning_output_sqnr_db`` (after the re-fit) and ``output_sqnr_db`` (the written, quantized weights).
    Top level ``sparsity``: the target and the achieved fraction of zero codes over all linear-layer weights.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from pyqshare import kernels
from pyqshare._blas import single_threaded_blas
from pyqshare.calibration import cpu_session, run_session
from pyqshare.errors import InputError
from pyqshare.kernels.sparsity import MAX_M
from pyqshare.methods.common import MethodContext, add_common_arguments, load_layer_map, run_method
from pyqshare.methods.per_channel import DEFAULT_ACTIVATION_BITS, DEFAULT_ACTIVATION_METHOD
from pyqshare.model import Weight, find_weights, iter_graphs, replace_weight
from pyqshare.quantization.layers import consumer_node, layer_input, layer_input_grams
from pyqshare.quantization.pipeline import QuantizedModel, quantize_model
from pyqshare.quantization.scheme import ACTIVATION_BITS, LINEAR_ROLES, WEIGHT_BITS, QuantScheme, WeightScheme

PRUNING_METHODS = ("magnitude", "structured", "weight_importance")
SCHEDULES = ("linear", "cubic", "exponential")
MASK_SCOPES = ("layer", "channel")
DEFAULT_STEPS = 4
# --model-type -> (sparsity, N:M pattern), from the Guide's table (module docstring).
MODEL_TYPE_DEFAULTS: dict[str, tuple[float, tuple[int, int]]] = {
    "vision": (0.5, (2, 4)),
    "text": (0.5, (2, 4)),
    "audio": (0.4, (4, 8)),
    "text_generation": (0.3, (2, 4)),
    "multimodal": (0.5, (2, 4)),
}
_SOLVE_ELEMENTS = 1 << 22  # matrix elements per batch of per-channel re-fit systems (32 MiB of float64)


@dataclass(frozen=True)
class PruningConfig:
    """How to prune (see the module docstring).

    Attributes
    ----------
    sparsity
        Final fraction of zeros per pruned layer, in [0, 1); with a pattern, 0 or ``1 - n/m``.
    criterion
        ``"magnitude"`` (keep the largest ``|w|``) or ``"weight_importance"`` (``|w|`` times the input
        feature's calibration L2 norm).
    pattern
        ``(n, m)``: keep ``n`` of every ``m`` along the reduction axis; None for unstructured masks.
    scope
        Unstructured masks: ``"layer"`` (one ranking per weight) or ``"channel"`` (per output channel).
    layer_sparsity
        ``(name or regular expression, sparsity)`` pairs in priority order (:func:`load_layer_sparsity`).
    schedule, steps
        One of :data:`SCHEDULES` and its number of steps, or None and 1 (one shot).
    refit
        Re-fit the kept weights of MatMul/Gemm layers by least squares after each step.
    damping
        Ridge damping of the re-fit as a fraction of the mean diagonal of the layer's input Gram matrix.
    """

    sparsity: float
    criterion: str = "magnitude"
    pattern: tuple[int, int] | None = None
    scope: str = "layer"
    layer_sparsity: tuple[tuple[str, float], ...] = ()
    schedule: str | None = None
    steps: int = 1
    refit: bool = True
    damping: float = 0.01

    def __post_init__(self) -> None:
        check_sparsity(self.sparsity, "--sparsity")
        if self.criterion not in ("magnitude", "weight_importance"):
            raise InputError(f"unknown pruning criterion {self.criterion!r}")
        if self.scope not in MASK_SCOPES:
            raise InputError(f"--mask-scope must be one of {MASK_SCOPES}, not {self.scope!r}")
        if self.schedule is not None and self.schedule not in SCHEDULES:
            raise InputError(f"--pruning-schedule must be one of {SCHEDULES}, not {self.schedule!r}")
        if self.steps < 1 or (self.schedule is None and self.steps != 1):
            raise InputError(f"--steps must be a positive count and goes with --pruning-schedule, not {self.steps}")
        if not self.damping > 0:
            raise InputError(f"damping must be positive, not {self.damping}")
        if self.pattern is not None:
            _check_pattern(*self.pattern)
            for what, value in [("--sparsity", self.sparsity), *(
                    (f"--layer-wise-sparsity key {key!r}", value) for key, value in self.layer_sparsity)]:
                if not any(math.isclose(value, allowed, abs_tol=1e-9) for allowed in (0.0, self.pattern_sparsity)):
                    raise InputError(f"{what}: sparsity {value:g} with the {self.pattern_text} pattern, which "
                                     f"prunes {self.pattern_sparsity:g} of a layer (use that, or 0 for dense)")

    @property
    def pattern_sparsity(self) -> float:
        n, m = self.pattern
        return 1 - n / m

    @property
    def pattern_text(self) -> str:
        return "unstructured" if self.pattern is None else f"{self.pattern[0]}:{self.pattern[1]}"


@dataclass
class PrunedLayer:
    """What pruning did to one weight."""

    weight: Weight
    target: float
    criterion: str
    step_sparsity: list[float]
    keep: np.ndarray  # bool, the weight's shape
    gram: np.ndarray | None = None  # the layer input's X^T X (MatMul/Gemm only)
    original: np.ndarray | None = None  # float64 weights before pruning, kept with the gram for the summary
    errors: dict[str, float] = field(default_factory=dict)  # output SQNR (dB) before quantization


def check_sparsity(value: object, what: str) -> float:
    """``value`` as a float in [0, 1), or an InputError naming ``what``.

    Parameters
    ----------
    value
        A flag value or a ``--layer-wise-sparsity`` entry (bools and strings are refused).
    what
        The flag or file entry the error message names.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise InputError(f"{what}: sparsity must be a number in [0, 1), not {value!r}")
    return float(value)


def parse_pattern(text: str) -> tuple[int, int]:
    """``"n:m"`` as ``(n, m)`` with ``1 <= n < m``.

    Parameters
    ----------
    text
        The ``--structured-pattern`` value, e.g. ``"2:4"``.
    """
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", text)
    if not match:
        raise InputError(f"--structured-pattern must look like n:m (e.g. 2:4), not {text!r}")
    n, m = int(match[1]), int(match[2])
    _check_pattern(n, m)
    return n, m


def _check_pattern(n: int, m: int) -> None:
    if not 1 <= n < m <= MAX_M:
        raise InputError(f"--structured-pattern {n}:{m}: need 1 <= n < m <= {MAX_M} "
                         "(n weights kept of every m)")


def schedule_targets(sparsity: float, schedule: str | None, steps: int) -> list[float]:
    """The sparsity after each step: ``[sparsity]`` in one shot, else the module docstring's formulas.

    Parameters
    ----------
    sparsity
        Final sparsity ``S`` in [0, 1).
    schedule
        ``"linear"``, ``"cubic"``, ``"exponential"``, or None (one shot).
    steps
        ``N`` (1 without a schedule).
    """
    if schedule is None:
        return [sparsity]
    fractions = [t / steps for t in range(1, steps + 1)]
    if schedule == "linear":
        return [sparsity * u for u in fractions]
    if schedule == "cubic":
        return [sparsity * (1 - (1 - u) ** 3) for u in fractions]
    return [1 - (1 - sparsity) ** u for u in fractions]


def load_layer_sparsity(path: str | Path) -> tuple[tuple[str, float], ...]:
    """Read a ``--layer-wise-sparsity`` file: ``{"name or regex": sparsity, ...}`` in file order.

    Parameters
    ----------
    path
        The JSON file.

    Raises
    ------
    InputError
        Unreadable file, malformed JSON, not an object, duplicate keys, an invalid regular expression, or a
        value that is not a number in [0, 1); the message names the file.
    """
    return tuple(load_layer_map(path, "--layer-wise-sparsity", check_sparsity))


def layer_names(weight: Weight) -> list[str]:
    """The names a ``--layer-wise-sparsity`` key can match: the weight's, its consumers', their module paths.

    Parameters
    ----------
    weight
        As :func:`pyqshare.model.find_weights` returned it.
    """
    names = [weight.name]
    for node, _, _ in weight.consumers:
        names.append(node)
        parts = node.strip("/").split("/")
        if node.startswith("/") and len(parts) > 1:  # torch exporter style: /module/path/OpType
            names.append(".".join(parts[:-1]))
    return list(dict.fromkeys(names))


def layer_target(names: Sequence[str], config: PruningConfig, matched: set[str]) -> float:
    """The sparsity of one layer: an exact key, else the first key matching as a regex, else ``config.sparsity``.

    Parameters
    ----------
    names
        The layer's names (:func:`layer_names`).
    config
        Holds ``layer_sparsity`` and the default ``sparsity``.
    matched
        The key used, if any, is added to it.
    """
    for key, value in config.layer_sparsity:
        if key in names:
            matched.add(key)
            return value
    for key, value in config.layer_sparsity:
        if any(re.fullmatch(key, name) for name in names):
            matched.add(key)
            return value
    return config.sparsity


def refit_weights(
    original: np.ndarray, keep: np.ndarray, gram: np.ndarray, *, damping: float = 0.01
) -> np.ndarray:
    """Least-squares re-fit of a pruned linear layer: the kept weights that best reproduce its outputs.

    For each output channel ``j`` with kept inputs ``K`` and pruned inputs ``P``, with
    ``A = H + lambda I`` and ``lambda = damping * mean(diag(H))``, the result is the exact minimiser of
    ``||X (W_j - w)||^2 + lambda ||W_j - w||^2`` over ``w`` zero on ``P``: ``w_K`` solves
    ``A_KK w_K = (A W_j)_K``. When fewer weights are pruned than kept, the same optimum is computed in the
    smaller dual form ``w = W_j - A^-1_{:P} (A^-1_PP)^-1 W_jP`` (optimal brain surgeon), at the cost of one
    inverse of ``A`` per layer. Since ``W_j`` masked is a candidate, the output error
    ``||X (W_j - w)||^2`` never exceeds plain pruning's.

    Parameters
    ----------
    original
        (I, O) float weights before pruning: I input features (the reduction axis) by O output channels.
    keep
        (I, O) bool mask, True where a weight is kept.
    gram
        (I, I) ``X^T X`` of the layer's inputs over the calibration data (rows of X are positions).
    damping
        ``lambda`` as a fraction of ``mean(diag(H))`` (positive; ``lambda = 1`` when H is all zero).

    Returns
    -------
    numpy.ndarray
        (I, O) float64 weights, exactly 0 where ``keep`` is False; channels keeping everything are unchanged.
    """
    original = np.asarray(original, dtype=np.float64)
    keep = np.asarray(keep, dtype=bool)
    n_in = original.shape[0]
    damped = np.array(gram, dtype=np.float64)
    mean_diagonal = float(np.mean(np.diag(damped))) if n_in else 0.0
    damped[np.diag_indices(n_in)] += damping * mean_diagonal if mean_diagonal > 0 else 1.0
    result = np.where(keep, original, 0.0)
    kept = keep.sum(axis=0)
    partial = (kept > 0) & (kept < n_in)
    primal = np.flatnonzero(partial & (2 * kept <= n_in))
    dual = np.flatnonzero(partial & (2 * kept > n_in))
    if primal.size:
        result[:, primal] = _restricted_solves(damped, keep[:, primal], damped @ original[:, primal])
    if dual.size:
        inverse = np.linalg.inv(damped)
        pruned = ~keep[:, dual]
        multipliers = _restricted_solves(inverse, pruned, original[:, dual])
        result[:, dual] = np.where(pruned, 0.0, original[:, dual] - inverse @ multipliers)
    return result


def _restricted_solves(matrix: np.ndarray, members: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """For every column ``j`` of the bool (n, c) ``members``, with ``S`` its True rows: solve
    ``matrix[S, S] x = rhs[S, j]``; returns (n, c) holding each ``x`` on its ``S`` and 0 elsewhere.

    Columns of similar sizes are solved as one stack; stacks run on :func:`pyqshare.get_num_threads`
    threads with BLAS itself single-threaded (OpenBLAS threads gain nothing on these small systems and cost
    up to 20 times the work on shared cores). The result does not depend on the thread count.
    """
    sizes = members.sum(axis=0)
    order = np.argsort(sizes, kind="stable")
    batches = []
    start = 0
    while start < len(order):
        stop = start + 1
        while stop < len(order) and (stop + 1 - start) * int(sizes[order[stop]]) ** 2 <= _SOLVE_ELEMENTS:
            stop += 1
        batches.append(order[start:stop])
        start = stop
    result = np.zeros(members.shape)

    def solve(batch: np.ndarray) -> None:
        width = int(sizes[batch].max())
        # Smaller systems are padded with identity rows and zero right-hand sides.
        systems = np.zeros((len(batch), width, width))
        systems[:, np.arange(width), np.arange(width)] = 1.0
        targets = np.zeros((len(batch), width))
        chosen = [np.flatnonzero(members[:, column]) for column in batch]
        for row, (column, rows) in enumerate(zip(batch, chosen)):
            systems[row, : rows.size, : rows.size] = matrix[np.ix_(rows, rows)]
            targets[row, : rows.size] = rhs[rows, column]
        solved = np.linalg.solve(systems, targets[:, :, None])[:, :, 0]
        for row, (column, rows) in enumerate(zip(batch, chosen)):
            result[rows, column] = solved[row, : rows.size]

    with single_threaded_blas(), ThreadPoolExecutor(kernels.get_num_threads()) as pool:
        list(pool.map(solve, batches))
    return result


def output_sqnr_db(original: np.ndarray, candidate: np.ndarray, gram: np.ndarray) -> float:
    """SQNR (dB) of a linear layer's outputs ``X @ candidate`` against ``X @ original`` on the inputs of
    ``gram = X^T X``: ``10 log10(tr(W^T H W) / tr(D^T H D))``, ``D = original - candidate``.

    Parameters
    ----------
    original, candidate
        (I, O) weights.
    gram
        (I, I) ``X^T X``.
    """
    original = np.asarray(original, dtype=np.float64)
    difference = original - np.asarray(candidate, dtype=np.float64)
    signal = float(np.sum((gram @ original) * original))
    noise = float(np.sum((gram @ difference) * difference))
    if noise <= 0:
        return math.inf
    return 10 * math.log10(signal / noise) if signal > 0 else -math.inf


def prune_model(
    model: onnx.ModelProto,
    samples: Sequence[Mapping[str, np.ndarray]],
    config: PruningConfig,
    *,
    model_dir: str | Path | None = None,
    min_elements: int = 64,
) -> tuple[dict[str, PrunedLayer], list[str]]:
    """Prune (and re-fit) the linear-layer weights of a float model in place.

    Parameters
    ----------
    model
        A float ONNX model; its weights are replaced.
    samples
        Calibration samples ``{input name: array}`` (layer inputs for weight_importance and the re-fit).
    config
        What to prune how.
    model_dir
        Folder of the model's external data.
    min_elements
        Smaller weights are left alone.

    Returns
    -------
    layers
        Pruned weight name -> :class:`PrunedLayer`, in graph order (layers with target 0 are not pruned).
    unmatched
        ``config.layer_sparsity`` keys that matched no layer.

    Raises
    ------
    InputError
        With a pattern: a pruned layer whose reduction axis is not a multiple of ``m``.
    """
    candidates = [w for w in find_weights(model, model_dir, min_elements=min_elements)
                  if w.role in LINEAR_ROLES and w.channel_axis is not None and w.reduction_axis is not None]
    matched: set[str] = set()
    plan = []
    for weight in candidates:
        target = layer_target(layer_names(weight), config, matched)
        if target > 0:
            plan.append((weight, target))
    _check_pattern_fits([weight for weight, _ in plan], config)
    unmatched = [key for key, _ in config.layer_sparsity if key not in matched]

    # Gram matrices serve the re-fit, the importance scores and the summary's output SQNRs.
    grams = layer_input_grams(model, samples, [w for w, _ in plan], model_dir=model_dir)
    conv_norms = _conv_input_norms(model, samples, [w for w, _ in plan], model_dir) \
        if config.criterion == "weight_importance" else {}

    layers: dict[str, PrunedLayer] = {}
    for weight, target in plan:
        gram = grams.get(weight.name)
        importance = config.criterion == "weight_importance"
        factor = _importance_factor(model, weight, gram, conv_norms) if importance else None
        original = np.array(weight.array(), dtype=np.float64)
        current, keep, steps = _prune_layer(original, weight, target, config, factor, gram)
        replace_weight(model, weight, current)
        layer = PrunedLayer(weight, target, "magnitude" if factor is None else "weight_importance", steps, keep)
        if gram is not None:
            layer.gram, layer.original = gram, _io_view(original, weight)
            plain = _io_view(np.where(keep, original, 0.0), weight)
            layer.errors["plain_pruning_output_sqnr_db"] = output_sqnr_db(layer.original, plain, gram)
            layer.errors["pruning_output_sqnr_db"] = output_sqnr_db(layer.original, _io_view(current, weight), gram)
        layers[weight.name] = layer
    return layers, unmatched


def _io_view(array: np.ndarray, weight: Weight) -> np.ndarray:
    """A 2-D MatMul/Gemm weight as (input features, output channels)."""
    return array.T if weight.channel_axis == 0 else array


def _check_pattern_fits(weights: Sequence[Weight], config: PruningConfig) -> None:
    """Refuse, naming them, the layers whose reduction axis the pattern's group size does not divide."""
    if config.pattern is None:
        return
    n, m = config.pattern
    misfits = [f"{w.name} ({w.shape[w.reduction_axis]})" for w in weights if w.shape[w.reduction_axis] % m]
    if misfits:
        listed = ", ".join(misfits[:3]) + (f" and {len(misfits) - 3} more" if len(misfits) > 3 else "")
        raise InputError(f"--structured-pattern {n}:{m}: the input features along the reduction axis of "
                         f"{listed} are not a multiple of {m} (give such layers sparsity 0 in "
                         "--layer-wise-sparsity to leave them dense)")


def _prune_layer(original, weight: Weight, target: float, config: PruningConfig, factor, gram):
    """``(pruned weights, keep mask, sparsity after each step)`` for one weight."""
    keep = np.ones(original.shape, dtype=bool)
    current = original.copy()
    steps = []
    for sparsity in schedule_targets(target, config.schedule, config.steps):
        scores = np.abs(current) if factor is None else np.abs(current) * factor
        scores[~keep] = -1.0  # already pruned: below every live score, so masks only grow
        keep = _mask(scores, sparsity, weight, config)
        current = np.where(keep, current, 0.0)
        if gram is not None and config.refit:
            fitted = refit_weights(_io_view(original, weight), _io_view(keep, weight), gram, damping=config.damping)
            current = _io_view(fitted, weight)
        steps.append(1.0 - np.count_nonzero(keep) / keep.size)
    return current, keep, steps


def _mask(scores: np.ndarray, sparsity: float, weight: Weight, config: PruningConfig) -> np.ndarray:
    """Keep mask at ``sparsity``, ranking by ``scores`` (larger is kept)."""
    scores = np.ascontiguousarray(scores)
    if config.pattern is not None:
        return _nm_progressive(scores, *config.pattern, weight.reduction_axis, sparsity / config.pattern_sparsity)
    if config.scope == "layer":
        return kernels.magnitude_mask(scores, sparsity, scores=scores)
    by_channel = np.ascontiguousarray(np.moveaxis(scores, weight.channel_axis, 0))
    keep = kernels.magnitude_mask(by_channel, sparsity, scores=by_channel, per_row=True)
    return np.moveaxis(keep, 0, weight.channel_axis)


def _nm_progressive(scores: np.ndarray, n: int, m: int, axis: int, fraction: float) -> np.ndarray:
    """N:M mask on the ``round(fraction * groups)`` groups whose pruning drops the least score; others dense."""
    keep = kernels.nm_mask(scores, n, m, axis=axis, scores=scores)
    moved = np.moveaxis(keep, axis, -1)
    grouped = moved.reshape(-1, m)
    chosen_count = round(fraction * len(grouped))
    if chosen_count >= len(grouped):
        return keep
    cost = np.where(grouped, 0.0, np.moveaxis(scores, axis, -1).reshape(-1, m)).sum(axis=1)
    chosen = np.argsort(cost, kind="stable")[:chosen_count]  # already N:M groups cost -(m - n): first
    partial = np.ones_like(grouped)
    partial[chosen] = grouped[chosen]
    return np.moveaxis(partial.reshape(moved.shape), -1, axis)


def _importance_factor(model, weight: Weight, gram, conv_norms) -> np.ndarray | None:
    """Input-feature L2 norms broadcastable to the weight's shape, or None (magnitude fallback)."""
    if gram is not None:
        norms = np.sqrt(np.maximum(np.diag(gram), 0.0))
        return norms[:, None] if weight.reduction_axis == 0 else norms[None, :]
    node, tensor = consumer_node(model, weight), layer_input(model, weight)
    if node is None or node.op_type not in ("Conv", "ConvTranspose") or tensor not in conv_norms:
        return None
    norms = conv_norms[tensor]
    kernel_axes = (1,) * (len(weight.shape) - 2)
    if node.op_type == "ConvTranspose":  # [I, O/g, k...]: the reduction axis is the input channel itself
        return norms.reshape(-1, 1, *kernel_axes)
    groups = next((a.i for a in node.attribute if a.name == "group"), 1)
    outputs, per_group = weight.shape[0], weight.shape[1]
    channel = (np.arange(outputs)[:, None] // (outputs // groups)) * per_group + np.arange(per_group)[None, :]
    return norms[channel].reshape(outputs, per_group, *kernel_axes)


def _conv_input_norms(model, samples, weights: Sequence[Weight], model_dir) -> dict[str, np.ndarray]:
    """Per-channel L2 norm (axis 1) of every Conv/ConvTranspose input over the calibration samples."""
    convolutions = [w for w in weights if w.role == "conv"]
    tensors = sorted({tensor for w in convolutions if (tensor := layer_input(model, w)) is not None})
    if not tensors:
        return {}
    sums: dict[str, np.ndarray] = {}
    with cpu_session(model, extra_outputs=tensors, model_dir=model_dir) as session:
        for sample in samples:
            (outputs,) = run_session(session, [sample], tensors)
            for tensor, values in outputs.items():
                squares = np.square(np.asarray(values, dtype=np.float64))
                sums[tensor] = sums.get(tensor, 0.0) + squares.sum(axis=tuple(a for a in range(values.ndim) if a != 1))
    return {tensor: np.sqrt(total) for tensor, total in sums.items()}


def sparse_quantize(
    model: onnx.ModelProto,
    samples: Sequence[Mapping[str, np.ndarray]],
    config: PruningConfig,
    scheme: QuantScheme,
    *,
    model_dir: str | Path | None = None,
    min_elements: int = 64,
) -> QuantizedModel:
    """Prune and re-fit (:func:`prune_model`), then quantize into QDQ, with sparse sizes in the result.

    Parameters
    ----------
    model
        A float model with static shapes; modified in place.
    samples
        Calibration samples.
    config
        What to prune how.
    scheme
        Quantization; its weights must be symmetric with nearest rounding, so pruned weights stay exactly 0.
    model_dir
        Folder of the model's external data.
    min_elements
        Smaller tensors are neither pruned nor counted as weights.

    Returns
    -------
    QuantizedModel
        ``packed_bytes`` and ``weight_bits`` count pruned layers in their sparse form; every pruned layer's
        ``details`` and the ``report`` hold the sparsity figures of the module docstring.
    """
    if not scheme.weights.symmetric or scheme.weights.rounding != "nearest":
        raise ValueError("sparse quantization needs symmetric weights with nearest rounding (pruned weights "
                         "must stay exactly zero)")
    layers, unmatched = prune_model(model, samples, config, model_dir=model_dir, min_elements=min_elements)
    quantized = quantize_model(model, samples, scheme, model_dir=model_dir, min_elements=min_elements)
    zeros = elements = 0
    for name, result in quantized.layers.items():
        if result.elements < min_elements:
            continue
        codes, dequantized = _written_weight(model, name)
        written_zeros = int(np.count_nonzero(codes == 0))
        zeros, elements = zeros + written_zeros, elements + codes.size
        layer = layers.get(name)
        if layer is None:
            continue
        sparse_bits, layout = _sparse_bits(layer, result.scheme.bits, config)
        dense_codes = result.elements * result.scheme.bits
        if sparse_bits < dense_codes:
            quantized.weight_bits += sparse_bits - dense_codes
            result.packed_bits += sparse_bits - dense_codes
        else:
            layout = "dense"
        result.details.update(
            sparsity=round(written_zeros / codes.size, 6),
            target_sparsity=layer.target,
            pattern=config.pattern_text,
            criterion=layer.criterion,
            step_sparsity=[round(s, 6) for s in layer.step_sparsity],
            format=layout,
            node=layer.weight.consumers[0][0] if layer.weight.consumers else None,
        )
        if layer.gram is not None:
            view = dequantized.T if layer.weight.channel_axis == 0 else dequantized
            layer.errors["output_sqnr_db"] = output_sqnr_db(layer.original, view, layer.gram)
            result.details.update({key: round(value, 3) for key, value in layer.errors.items()})
    quantized.packed_bytes = math.ceil(quantized.weight_bits / 8)
    quantized.report["sparsity"] = {
        "target": config.sparsity,
        "achieved": round(zeros / elements, 6) if elements else 0.0,
        "zero_weights": zeros,
        "weights": elements,
        "pruned_layers": len(layers),
    }
    if unmatched:
        quantized.report["unmatched_layer_keys"] = unmatched
    return quantized


def _sparse_bits(layer: PrunedLayer, bits: int, config: PruningConfig) -> tuple[int, str]:
    """Bits of the kept codes plus the sparsity metadata, and the layout's name."""
    if config.pattern is not None:  # the final step puts every group of a pruned layer into the pattern
        n, m = config.pattern
        values, indices = kernels.nm_compress(layer.keep.astype(np.float32), n, m, layer.weight.reduction_axis)
        return values.size * bits + indices.size * 8, f"{n}:{m}"
    kept = int(np.count_nonzero(layer.keep))
    return kept * bits + layer.keep.size, "bitmap"


def _written_weight(model: onnx.ModelProto, name: str) -> tuple[np.ndarray, np.ndarray]:
    """``(codes, dequantized values)`` of the per-channel DequantizeLinear producing weight ``name``."""
    for _, graph in iter_graphs(model):
        node = next((node for node in graph.node if node.op_type == "DequantizeLinear" and node.output[0] == name),
                    None)
        if node is None:
            continue
        stored = {tensor.name: tensor for tensor in graph.initializer}
        codes, scale, zero_point = (numpy_helper.to_array(stored[i]) for i in node.input)
        codes = codes.astype(np.int32)
        axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 1)
        shape = [1] * codes.ndim
        shape[axis] = -1
        values = (codes - zero_point.astype(np.int32).reshape(shape)) * scale.astype(np.float64).reshape(shape)
        return codes, values
    raise ValueError(f"weight {name!r} has no DequantizeLinear in the quantized model")


# ------------------------------------------------------------------------------------------------ command line


def configure(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument("--sparsity", type=float, help="final fraction of zeros per pruned layer, in [0, 1) "
                        "(default by --model-type: 0.5, audio 0.4, text_generation 0.3; with a pattern 1 - n/m)")
    parser.add_argument("--pruning-method", choices=PRUNING_METHODS, default="magnitude",
                        help="magnitude (default), structured (N:M by magnitude), weight_importance "
                        "(|w| times the input feature's calibration L2 norm)")
    parser.add_argument("--structured-pattern", metavar="N:M", help="keep N of every M input features of each "
                        "output channel (default for structured by --model-type: 2:4, audio 4:8); given "
                        "explicitly, makes any method N:M")
    parser.add_argument("--layer-wise-sparsity", metavar="JSON", help="file mapping layer names or regular "
                        "expressions to sparsities")
    parser.add_argument("--pruning-schedule", choices=SCHEDULES, help="raise the sparsity over --steps steps, "
                        "re-fitting after each (default: one shot)")
    parser.add_argument("--steps", type=int, help=f"steps of --pruning-schedule (default {DEFAULT_STEPS})")
    parser.add_argument("--mask-scope", choices=MASK_SCOPES, help="unstructured masks rank per layer or per "
                        "output channel (default: layer for magnitude, channel for weight_importance)")
    parser.add_argument("--no-refit", action="store_true",
                        help="skip the least-squares re-fit of the kept weights")
    parser.add_argument("--weight-bits", type=int, choices=WEIGHT_BITS, default=8,
                        help="per-channel symmetric weights (default 8; 16 is the near-float option)")
    parser.add_argument("--activation-bits", type=int, choices=ACTIVATION_BITS,
                        help="default by --model-type: 16 for text, text_generation and multimodal, else 8")


def config_for(args: argparse.Namespace, model_type: str,
               layer_sparsity: tuple[tuple[str, float], ...] = ()) -> PruningConfig:
    """The :class:`PruningConfig` that the command-line flags ask for, defaults resolved by ``model_type``.

    Parameters
    ----------
    args
        Parsed ``pyqshare sparse`` flags.
    model_type
        One of :data:`MODEL_TYPE_DEFAULTS`' keys.
    layer_sparsity
        The parsed ``--layer-wise-sparsity`` file.
    """
    default_sparsity, default_pattern = MODEL_TYPE_DEFAULTS[model_type]
    if args.structured_pattern is not None:
        pattern = parse_pattern(args.structured_pattern)
    else:
        pattern = default_pattern if args.pruning_method == "structured" else None
    if args.sparsity is not None:
        sparsity = check_sparsity(args.sparsity, "--sparsity")
    else:
        sparsity = 1 - pattern[0] / pattern[1] if pattern else default_sparsity
    criterion = "weight_importance" if args.pruning_method == "weight_importance" else "magnitude"
    if args.steps is not None and args.pruning_schedule is None:
        raise InputError("--steps goes with --pruning-schedule (without one, pruning is one shot)")
    return PruningConfig(
        sparsity=sparsity,
        criterion=criterion,
        pattern=pattern,
        scope=args.mask_scope or ("channel" if criterion == "weight_importance" else "layer"),
        layer_sparsity=layer_sparsity,
        schedule=args.pruning_schedule,
        steps=1 if args.pruning_schedule is None else (args.steps if args.steps is not None else DEFAULT_STEPS),
        refit=not args.no_refit,
    )


def run(args: argparse.Namespace) -> dict:
    # Flag errors surface before the model is prepared (the model type, which sets defaults, comes later).
    if args.structured_pattern is not None:
        parse_pattern(args.structured_pattern)
    if args.sparsity is not None:
        check_sparsity(args.sparsity, "--sparsity")
    layer_sparsity = load_layer_sparsity(args.layer_wise_sparsity) if args.layer_wise_sparsity else ()
    if args.model_type or args.pruning_method != "structured" or args.structured_pattern:
        config_for(args, args.model_type or "text", layer_sparsity)  # the rest depends on the model type only
    parameters: dict[str, object] = {"layer_wise_sparsity": args.layer_wise_sparsity}

    def quantize(context: MethodContext) -> QuantizedModel:
        config = config_for(args, context.model_type, layer_sparsity)
        activation_bits = args.activation_bits or DEFAULT_ACTIVATION_BITS[context.model_type]
        weights = WeightScheme(bits=args.weight_bits, granularity="per-channel", symmetric=True, search="mse",
                               rounding="nearest")
        scheme = QuantScheme(weights=weights, activation_bits=activation_bits,
                             activation_method=DEFAULT_ACTIVATION_METHOD[activation_bits])
        parameters.update(
            sparsity=config.sparsity, pruning_method=args.pruning_method, structured_pattern=config.pattern_text,
            criterion=config.criterion, mask_scope=config.scope, pruning_schedule=config.schedule,
            steps=config.steps, targets=schedule_targets(config.sparsity, config.schedule, config.steps),
            refit=config.refit, weight_bits=args.weight_bits, activation_bits=activation_bits,
            activation_method=scheme.activation_method,
        )
        quantized = sparse_quantize(context.model, context.calibration, config, scheme,
                                    model_dir=context.model_dir, min_elements=args.min_elements)
        for key in quantized.report.get("unmatched_layer_keys", []):
            print(f"sparse: --layer-wise-sparsity key {key!r} matches no layer", file=sys.stderr)
        return quantized

    return run_method("sparse", args, quantize, parameters=parameters)
