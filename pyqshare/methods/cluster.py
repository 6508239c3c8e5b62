"""``pyqshare cluster``: k-means weight clustering (look-up-table weights), written as QDQ for the QNN HTP.

Every linear-layer weight (MatMul, Gemm, Conv, ConvTranspose, RNN ``W``/``R``) with at least ``--min-elements``
elements is clustered; embeddings, norms and biases are not (they go through the QDQ pipeline as usual).

1. **Clustering**: ``kmeans1d`` (the optimal-within-0.01% 1-D k-means kernel) over the whole tensor (one
   codebook of k values) or, with ``--per-channel``, per output channel (the weight's channel axis: one
   codebook per channel). k is ``--clusters``, by default from the Guide's table for ``--model-type``
   (:data:`DEFAULT_CLUSTERS`: text 32, vision 16, text_generation 64, audio 32, multimodal 32).
   ``--adaptive-centroids`` picks k per layer instead: the smallest of 2, 4, 8, ..., up to ``--clusters``
   (default 256) whose layer-output SQNR reaches ``--min-sqnr`` (default 30 dB); a layer that misses it
   even at the largest k keeps that k and says so (``meets_min_sqnr: false``).
2. **Cluster-aware refinement** (MatMul/Gemm with a 2-D weight in the main graph; ``--no-refine`` skips it):
   the closed-form counterpart of cluster-aware fine-tuning, against the layer's outputs on calibration
   data. With ``X`` the layer's calibration inputs and ``H = X^T X`` their Gram matrix, the layer-output
   error of clustered weights ``C[labels]`` is ``||X W - X C[labels]||^2 = tr(D^T H D)``, ``D = W - C[labels]``.

   * Energy-weighted k-means (round 1): the clustering again, each value weighted by its input's energy
     ``H_ii`` (the diagonal part of the output error).
   * Codebook refit (every round): with the labels fixed this is a least-squares problem in the k codebook
     values (per channel: k per channel), solved through its k x k normal equations
     ``(A^T H A) c = A^T H w`` (``A`` the one-hot label matrix) with a small ridge towards the current
     codebook (an empty cluster keeps its value). Forming ``A^T H A`` exactly costs ``I^2 O`` operations
     (minutes on a transformer), so ``H`` enters as its best rank-16 part (randomised eigen-decomposition)
     plus the exact remaining diagonal: exact for layers with at most 16 inputs, and on MiniLM within
     0.01 dB of the exact refit.
   * Label re-assignment (rounds 2 and later, ``--refine-rounds``, default 2): GPTQ with the codebook in
     place of the integer grid (:func:`pyqshare.quantization.rounding.gptq_assign`): each input row takes the
     nearest codebook value and its error is pushed onto the rows not yet assigned.

   Every step is kept per output channel only where it lowers that channel's output error on the
   calibration data (and does not merge codebook values), so refinement never lowers the layer-output SQNR
   the summary reports. A weight clustered losslessly (k at or above its number of distinct values), or
   with more than :data:`REFINE_MAX_CLUSTERS` values, is not refined.
3. **Writing**: QNN has no look-up-table weight type, so the clustered weights are written as float values (at
   most k distinct values per tensor or channel, exactly k when the weight has that many) and the model is then
   quantized to QDQ for QNN by the per-channel pipeline: int8 symmetric per-channel weights from min-max scales
   with nearest rounding (GPTQ would scatter the clusters), activations as ``per-channel`` picks them (16-bit
   min-max for text models, else 8-bit percentile; ``--activation-bits``). int8 rounding may move a codebook
   value by up to half a step, and may merge two values closer than one step: the summary's ``int8_sqnr_db``
   per layer measures that. ``--grid-aligned`` removes it: the weight is clustered on its int8 codes (min-max
   scale of each channel, or of the tensor for per-tensor clustering), so every codebook value is an integer
   multiple of the scale, and the QDQ model is written with exactly those scales (per-tensor int8 weights for
   per-tensor clustering): the int8 model's weights *are* the clustered ones. Clustering integer codes cannot
   merge values: rounding the cluster means keeps them apart. One int8 grid per tensor is coarse for a tensor
   with outliers (MiniLM's first feed-forward output weight: largest 7.9, standard deviation 0.045): combine
   ``--grid-aligned`` with ``--per-channel`` (table below). ``--no-quantize`` writes the float clustered model
   instead (no QDQ; for runtimes with their own look-up-table formats, or to measure the clustering alone).

Measured on all-MiniLM-L6-v2 (seq 128, default calibration and evaluation inputs, int8 QDQ with 16-bit
activations; output SQNR of ``sentence_embedding``/``last_hidden_state``, the lower one):

==========================================  =========  ===================================================
k, granularity                              SQNR (dB)  note
==========================================  =========  ===================================================
16 per tensor, ``--no-refine``              0.8        plain k-means; mean layer-output SQNR 19.8 dB
16 per tensor, ``--refine-rounds 1``        4.5        energy-weighted k-means + least-squares refit
16 per tensor (default refinement)          12.2       + GPTQ re-assignment; layers 31.5 dB (calibration)
16 per tensor, ``--grid-aligned``           4.2        one int8 grid per tensor: too coarse (outliers)
32 per tensor (``--model-type text``)       17.9
16 per channel                              13.8       the float clustered model: 16.5; int8 rounding ...
16 per channel, ``--grid-aligned``          16.7       ... of the codebooks costs that, unless aligned
==========================================  =========  ===================================================

Layer-output SQNRs are measured on the calibration data the refinement fitted: on held-out inputs the
refined layers lose about 3.6 dB of their calibration figure (GPTQ fits 1,024 calibration rows), plain
k-means none. ``--adaptive-centroids`` judges k by the calibration figure, so it chooses optimistically.

``packed_bytes`` counts each clustered weight as ``ceil(log2 k)`` index bits per value plus its codebooks
(k float32 values per tensor or per channel), every other weight as the pipeline writes it (float32 with
``--no-quantize``). Per layer the summary reports weight SQNR and layer-output SQNR (on the calibration
inputs, bias excluded) after refinement and before it (``*_unrefined``).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import onnx

from pyqshare import kernels
from pyqshare._blas import single_threaded_blas
from pyqshare.errors import InputError
from pyqshare.kernels._common import resolve_num_threads
from pyqshare.kernels.clustering import MAX_CLUSTERS
from pyqshare.methods.common import MethodContext, add_common_arguments, run_method
from pyqshare.methods.per_channel import DEFAULT_ACTIVATION_BITS, DEFAULT_ACTIVATION_METHOD
from pyqshare.model import Weight, find_weights, replace_weight
from pyqshare.quantization.layers import gram_input, tensor_grams
from pyqshare.quantization.pipeline import QuantizedModel, quantize_model
from pyqshare.quantization.rounding import gptq_assign
from pyqshare.quantization.scheme import ACTIVATION_BITS, LINEAR_ROLES, QuantScheme, WeightScheme

# The Guide's recommended clusters per model type (the low end of its ranges; multimodal follows text).
DEFAULT_CLUSTERS = {"text": 32, "vision": 16, "text_generation": 64, "audio": 32, "multimodal": 32}
ADAPTIVE_MAX_CLUSTERS = 256
DEFAULT_MIN_SQNR_DB = 30.0
DEFAULT_REFINE_ROUNDS = 2
REFINE_MAX_CLUSTERS = 256  # beyond, the k x k systems grow large and the clustering is near lossless anyway
SKETCH_RANK = 16  # rank of the Gram matrix's part that enters the refit's normal equations exactly
_RIDGE = 1e-6  # relative to the mean diagonal of each normal-equation system
_SKETCH_SEED = 20240603
_INT8_LIMIT = 127  # symmetric int8 codes, as the QDQ pipeline writes them


def configure(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument("--clusters", type=int, metavar="K",
                        help=f"codebook values per tensor (or channel), 1 to {MAX_CLUSTERS}; default by --model-type: "
                        + ", ".join(f"{kind} {k}" for kind, k in DEFAULT_CLUSTERS.items())
                        + f"; with --adaptive-centroids the largest k tried (default {ADAPTIVE_MAX_CLUSTERS})")
    parser.add_argument("--per-channel", action="store_true", help="one codebook per output channel")
    parser.add_argument("--adaptive-centroids", action="store_true",
                        help="per layer the smallest k in 2, 4, ..., --clusters whose layer-output SQNR "
                        "reaches --min-sqnr (weight SQNR for layers without calibration inputs, e.g. Conv)")
    parser.add_argument("--min-sqnr", type=float, metavar="D",
                        help=f"dB target of --adaptive-centroids (default {DEFAULT_MIN_SQNR_DB:g})")
    parser.add_argument("--refine", action=argparse.BooleanOptionalAction, default=True,
                        help="cluster-aware refinement of MatMul/Gemm layers against calibration outputs (default on)")
    parser.add_argument("--refine-rounds", type=int, default=DEFAULT_REFINE_ROUNDS, metavar="N",
                        help="refinement rounds: 1 = energy-weighted k-means and a least-squares codebook refit; "
                        "each further round re-assigns labels GPTQ-style, then refits "
                        f"(default {DEFAULT_REFINE_ROUNDS})")
    parser.add_argument("--grid-aligned", action="store_true",
                        help="codebook values on the int8 grid: the int8 QDQ model holds exactly the clustered weights")
    parser.add_argument("--quantize", action=argparse.BooleanOptionalAction, default=True,
                        help="write QDQ for QNN (default); --no-quantize writes the float clustered model")
    parser.add_argument("--activation-bits", type=int, choices=ACTIVATION_BITS,
                        help="default by --model-type: 16 for text, text_generation and multimodal, else 8")


# ------------------------------------------------------------------------------------------------ clustering


@dataclass
class Clustering:
    """A weight in its (rows, channels) view as codebooks and labels.

    Attributes
    ----------
    codebooks
        (1, k) for one codebook per tensor or (channels, k) per channel, float32, each row ascending.
    labels
        (rows, channels) int32 indices into the codebook of each value's channel (or the tensor's).
    steps
        Grid-aligned clusterings only: (1,) or (channels,) float32 int8 scales; every codebook value is
        ``float32(code) * step`` for an integer code in [-127, 127], as DequantizeLinear computes it.
    """

    codebooks: np.ndarray
    labels: np.ndarray
    steps: np.ndarray | None = None

    @property
    def clusters(self) -> int:
        return self.codebooks.shape[1]

    def weights(self) -> np.ndarray:
        """The clustered (rows, channels) float32 weight."""
        if len(self.codebooks) == 1:
            return self.codebooks[0][self.labels]
        return np.take_along_axis(self.codebooks.T, self.labels, axis=0)

    def distinct_values(self) -> np.ndarray:
        """Distinct values in use per codebook group: shape (1,) per tensor, (channels,) per channel."""
        groups, k = self.codebooks.shape
        key = self.labels + k * np.arange(self.labels.shape[1]) if groups > 1 else self.labels
        used = np.bincount(key.ravel(), minlength=groups * k).reshape(groups, k) > 0
        # Codebooks are ascending: count the used entries that differ from the previous used one.
        ordered = np.sort(np.where(used, self.codebooks, np.nan), axis=1)  # unused (NaN) last
        return used.sum(axis=1) - np.count_nonzero(np.diff(ordered, axis=1) == 0, axis=1)


def cluster_view(
    view: np.ndarray, k: int, *, per_channel: bool, grid_aligned: bool, importance: np.ndarray | None = None
) -> Clustering:
    """k-means clustering of a (rows, channels) weight view, optionally on its int8 grid.

    Parameters
    ----------
    view
        C-contiguous float32 (rows, channels): the weight with its channel axis last.
    k
        Number of clusters, 1 to 65536.
    per_channel
        One codebook per channel (column) instead of one for the whole weight.
    grid_aligned
        Cluster the symmetric int8 codes (min-max scale per channel, or per tensor) instead of the values,
        and round the cluster means to integers: every codebook value is then an int8 grid point, and
        distinct clusters keep distinct values.
    importance
        (rows,) non-negative weight of each row's errors (weighted k-means), e.g. its input's energy; None:
        all equal.
    """
    axis = 1 if per_channel else None
    weights = None
    if importance is not None:
        weights = np.ascontiguousarray(np.broadcast_to(importance[:, None], view.shape), dtype=np.float32)
    if not grid_aligned:
        centroids, labels, _ = kernels.kmeans1d(view, k, axis=axis, sample_weight=weights)
        return Clustering(centroids.reshape(-1, k), labels.astype(np.int32))
    steps, zero_points = kernels.scale_search(view, 8, axis=axis, symmetric=True, objective="minmax")
    codes = kernels.quantize(view, steps, zero_points, 8, axis=axis).astype(np.float32)
    centroids, labels, _ = kernels.kmeans1d(codes, k, axis=axis, sample_weight=weights)
    steps = steps.reshape(-1)
    return Clustering(_on_grid(centroids.reshape(-1, k), steps), labels.astype(np.int32), steps)


def _on_grid(codes: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """float32 codebook values of integer ``codes`` (rounded, clipped to int8) times each group's step."""
    integers = np.clip(np.rint(codes), -_INT8_LIMIT, _INT8_LIMIT).astype(np.float32)
    return integers * steps[:, None]  # float32 product: exactly what DequantizeLinear computes


# ------------------------------------------------------------------------------------------------ refinement


class LayerInputs:
    """The Gram matrix ``H = X^T X`` of a layer's calibration inputs, and what refinement derives from it.

    Parameters
    ----------
    gram
        (I, I) float64 Gram matrix over all calibration samples (rows of X are positions).
    """

    def __init__(self, gram: np.ndarray) -> None:
        self.gram = gram
        self._gram32 = gram.astype(np.float32)

    def output_errors(self, difference: np.ndarray) -> np.ndarray:
        """Per output channel ``||X d_j||^2`` of a (I, channels) weight difference."""
        return np.einsum("ij,ij->j", difference, self._gram32 @ difference, dtype=np.float64)

    @cached_property
    def sketch(self) -> tuple[np.ndarray, np.ndarray]:
        """``(V, d)`` with ``H ~ V V^T + diag(d)``: the rank-:data:`SKETCH_RANK` part of ``H`` and the diagonal
        it leaves over (``H`` itself when ``I <= SKETCH_RANK``)."""
        size = len(self.gram)
        probes = SKETCH_RANK + 8
        if size <= probes:
            basis = np.eye(size)
        else:  # randomised range finder with one power iteration (Halko et al. 2011)
            omega = np.random.default_rng(_SKETCH_SEED).standard_normal((size, probes))
            basis, _ = np.linalg.qr(self.gram @ (self.gram @ omega))
        eigenvalues, vectors = np.linalg.eigh(basis.T @ self.gram @ basis)
        top = np.argsort(eigenvalues)[::-1][:SKETCH_RANK]
        low_rank = (basis @ vectors[:, top]) * np.sqrt(np.maximum(eigenvalues[top], 0.0))
        return low_rank, np.maximum(np.diag(self.gram) - np.sum(low_rank**2, axis=1), 0.0)


def refit_codebooks(clustering: Clustering, view: np.ndarray, inputs: LayerInputs) -> Clustering:
    """Least-squares codebooks for fixed labels: minimise ``||X (W - C[labels])||^2`` over the codebook values.

    Solves the k x k normal equations (one system per tensor, or one per channel) with ``H`` replaced by
    :attr:`LayerInputs.sketch`, and a ridge of 1e-6 of the mean diagonal towards the current values. A
    grid-aligned codebook is rounded back onto its grid. The result is sorted, labels remapped.

    Parameters
    ----------
    clustering
        The current clustering of ``view``.
    view
        (I, channels) float32 weight: rows are the layer's input features.
    inputs
        The layer's calibration statistics.
    """
    low_rank, diagonal = inputs.sketch
    channels = view.shape[1]
    groups, k = clustering.codebooks.shape
    # Sums over the members of each (channel, cluster) pair, in one bincount per quantity.
    key = (clustering.labels + k * np.arange(channels, dtype=np.int64)).ravel()

    def member_sums(per_element: np.ndarray) -> np.ndarray:
        return np.bincount(key, per_element.ravel(), minlength=channels * k).reshape(channels, k)

    projected = np.stack([member_sums(np.repeat(column, channels)) for column in low_rank.T], axis=-1)
    diagonal_mass = member_sums(np.repeat(diagonal, channels))
    diagonal_rhs = member_sums(diagonal[:, None] * view)
    targets = low_rank.T @ view  # (rank, channels)
    if groups == 1:
        normal = np.tensordot(projected, projected, axes=([0, 2], [0, 2]))[None]
        normal[0][np.diag_indices(k)] += diagonal_mass.sum(axis=0)
        rhs = (np.einsum("jar,rj->a", projected, targets) + diagonal_rhs.sum(axis=0))[None]
    else:
        normal = projected @ projected.transpose(0, 2, 1)
        normal[:, np.arange(k), np.arange(k)] += diagonal_mass
        rhs = np.einsum("jar,rj->ja", projected, targets) + diagonal_rhs
    current = clustering.codebooks.astype(np.float64)
    ridge = _RIDGE * np.trace(normal, axis1=1, axis2=2) / k + np.finfo(np.float64).tiny
    normal[:, np.arange(k), np.arange(k)] += ridge[:, None]
    solved = np.linalg.solve(normal, (rhs + ridge[:, None] * current)[..., None])[..., 0]
    if clustering.steps is None:
        codebooks = solved.astype(np.float32)
    else:
        codebooks = _on_grid(solved / clustering.steps[:, None], clustering.steps)
    return _sorted(Clustering(codebooks, clustering.labels, clustering.steps))


def _sorted(clustering: Clustering) -> Clustering:
    """The same clustering with each codebook ascending (labels remapped)."""
    order = np.argsort(clustering.codebooks, axis=1, kind="stable")
    rank = np.argsort(order, axis=1)
    codebooks = np.take_along_axis(clustering.codebooks, order, axis=1)
    if len(codebooks) == 1:
        labels = rank[0][clustering.labels]
    else:
        labels = np.take_along_axis(rank.T, clustering.labels, axis=0)
    return Clustering(codebooks, labels.astype(np.int32), clustering.steps)


def _energy_weighted(clustering: Clustering, view: np.ndarray, inputs: LayerInputs) -> Clustering:
    """The same k-means, each value weighted by its input's energy ``H_ii`` (the diagonal of the output error)."""
    energy = np.diag(inputs.gram)
    if not energy.any():  # a layer whose inputs are all zero: nothing to weigh by
        return clustering
    return cluster_view(view, clustering.clusters, per_channel=len(clustering.codebooks) > 1,
                        grid_aligned=clustering.steps is not None, importance=energy)


def reassign_labels(clustering: Clustering, view: np.ndarray, inputs: LayerInputs) -> Clustering:
    """Labels chosen GPTQ-style for the layer's outputs, codebooks fixed (:func:`gptq_assign`).

    Parameters
    ----------
    clustering, view, inputs
        As for :func:`refit_codebooks`.
    """
    labels = gptq_assign(view, clustering.codebooks, inputs.gram)
    return Clustering(clustering.codebooks, labels, clustering.steps)


def _keep_better(
    current: Clustering, errors: np.ndarray, candidate: Clustering, view: np.ndarray, inputs: LayerInputs
) -> tuple[Clustering, np.ndarray]:
    """``candidate`` where it lowers a channel's output error without merging codebook values, else ``current``.

    Per channel for per-channel codebooks and for label changes; all or nothing for a shared codebook's
    values (they affect every channel).
    """
    candidate_errors = inputs.output_errors(view - candidate.weights())
    shared_codebook_changed = len(current.codebooks) == 1 and not np.array_equal(current.codebooks, candidate.codebooks)
    if shared_codebook_changed:
        keeps_values = candidate.distinct_values()[0] >= current.distinct_values()[0]
        better = candidate_errors.sum() < errors.sum() and keeps_values
        return (candidate, candidate_errors) if better else (current, errors)
    better = candidate_errors < errors
    if len(current.codebooks) > 1:
        better &= candidate.distinct_values() >= current.distinct_values()
    if not better.any():
        return current, errors
    labels = np.where(better[None, :], candidate.labels, current.labels)
    codebooks = current.codebooks
    if len(codebooks) > 1:
        codebooks = np.where(better[:, None], candidate.codebooks, current.codebooks)
    merged = Clustering(codebooks, labels, current.steps)
    if len(codebooks) == 1 and merged.distinct_values()[0] < current.distinct_values()[0]:
        return current, errors
    return merged, np.where(better, candidate_errors, errors)


def refine(
    clustering: Clustering, view: np.ndarray, inputs: LayerInputs, rounds: int, errors: np.ndarray | None = None
) -> tuple[Clustering, np.ndarray]:
    """Cluster-aware refinement (module docstring): codebook refits and GPTQ label re-assignments, each kept
    only where it lowers the layer's output error on the calibration data.

    Parameters
    ----------
    clustering
        The k-means clustering of ``view``.
    view
        (I, channels) float32 weight: rows are the layer's input features.
    inputs
        The layer's calibration statistics.
    rounds
        1: one codebook refit; each further round re-assigns the labels, then refits the codebooks again.
        Stops early when a round changes nothing.
    errors
        ``inputs.output_errors(view - clustering.weights())`` if already known.

    Returns
    -------
    Clustering, np.ndarray
        The refined clustering and its output error per channel.
    """
    if errors is None:
        errors = inputs.output_errors(view - clustering.weights())
    for round_index in range(rounds):
        before = errors.sum()
        first_step = _energy_weighted if round_index == 0 else reassign_labels
        clustering, errors = _keep_better(clustering, errors, first_step(clustering, view, inputs), view, inputs)
        clustering, errors = _keep_better(clustering, errors, refit_codebooks(clustering, view, inputs), view, inputs)
        if not errors.sum() < before:
            break
    return clustering, errors


# ------------------------------------------------------------------------------------------------- the model


@dataclass
class ClusteredLayer:
    """One clustered weight: its clustering and how well it reproduces the float weight and layer."""

    clusters: int
    per_channel: bool
    grid_aligned: bool
    elements: int
    groups: int
    distinct_values: int  # the most distinct values any codebook group holds
    weight_sqnr_db: float
    weight_sqnr_db_unrefined: float
    output_sqnr_db: float | None  # on the calibration inputs; None without them (Conv, subgraphs, ...)
    output_sqnr_db_unrefined: float | None
    meets_min_sqnr: bool | None = None  # --adaptive-centroids only
    int8_sqnr_db: float | None = None  # the int8 QDQ weight against the clustered one, once quantized
    steps: np.ndarray | None = field(default=None, repr=False)  # grid-aligned int8 scales, for the QDQ writer

    @property
    def packed_bits(self) -> int:
        """Index bits plus float32 codebooks."""
        return self.elements * math.ceil(math.log2(self.clusters)) + self.groups * self.clusters * 32

    def to_dict(self) -> dict:
        entry = {
            "clusters": self.clusters,
            "granularity": "per-channel" if self.per_channel else "per-tensor",
            "grid_aligned": self.grid_aligned,
            "elements": self.elements,
            "distinct_values": self.distinct_values,
            "bits_per_weight": round(self.packed_bits / self.elements, 4),
        }
        sqnrs = {
            "weight_sqnr_db": self.weight_sqnr_db,
            "output_sqnr_db": self.output_sqnr_db,
            "weight_sqnr_db_unrefined": self.weight_sqnr_db_unrefined,
            "output_sqnr_db_unrefined": self.output_sqnr_db_unrefined,
            "int8_sqnr_db": self.int8_sqnr_db,
        }
        for key, value in sqnrs.items():
            # JSON has no infinities: as in ``evaluate``, null plus a ``*_nonfinite`` note ("inf": lossless).
            finite = value is None or math.isfinite(value)
            entry[key] = round(value, 3) if value is not None and finite else None
            if not finite:
                entry[f"{key}_nonfinite"] = str(value)
        if self.meets_min_sqnr is not None:
            entry["meets_min_sqnr"] = self.meets_min_sqnr
        return entry


def cluster_model(
    model: onnx.ModelProto,
    samples: Sequence[Mapping[str, np.ndarray]],
    *,
    clusters: int,
    per_channel: bool = False,
    min_sqnr_db: float | None = None,
    refine_rounds: int = DEFAULT_REFINE_ROUNDS,
    grid_aligned: bool = False,
    model_dir: str | Path | None = None,
    min_elements: int = 64,
    num_threads: int | None = None,
) -> dict[str, ClusteredLayer]:
    """Replace every linear-layer weight of ``model`` (in place) by its clustering; return per-layer results.

    Parameters
    ----------
    model
        A float model (static shapes when it will be quantized for QNN). Modified in place.
    samples
        Calibration samples ``{input name: array}``: the inputs of MatMul/Gemm layers are recorded on them for
        refinement and layer-output SQNR.
    clusters
        k (1 to 65536), or with ``min_sqnr_db`` the largest k tried.
    per_channel
        One codebook per output channel instead of per tensor.
    min_sqnr_db
        Adaptive k: per layer the smallest k of 2, 4, 8, ... up to ``clusters`` whose layer-output SQNR
        (weight SQNR without calibration inputs) is at least this; None: k = ``clusters`` everywhere.
    refine_rounds
        Refinement rounds for MatMul/Gemm layers (:func:`refine`); 0 disables refinement.
    grid_aligned
        Codebook values on each group's int8 grid (:func:`cluster_view`).
    model_dir
        Folder of the model's external data.
    min_elements
        Smaller weights are left as they are.
    num_threads
        Layers clustered at once (None: :func:`pyqshare.get_num_threads`); the result does not depend on it.
    """
    candidates = _candidates(clusters, adaptive=min_sqnr_db is not None)
    weights = [w for w in find_weights(model, model_dir, min_elements=min_elements)
               if w.role in LINEAR_ROLES and w.channel_axis is not None]
    layer_inputs = {w.name: tensor for w in weights if (tensor := gram_input(model, w)) is not None}
    grams = tensor_grams(model, samples, set(layer_inputs.values()), model_dir=model_dir, dtype=np.float32)
    statistics = {tensor: LayerInputs(gram) for tensor, gram in grams.items()}

    def cluster_one(weight: Weight) -> tuple[np.ndarray, ClusteredLayer]:
        values = np.asarray(weight.array(), dtype=np.float32)
        channels_last = np.moveaxis(values, weight.channel_axis, -1)
        view = np.ascontiguousarray(channels_last.reshape(-1, channels_last.shape[-1]))
        inputs = statistics.get(layer_inputs.get(weight.name))
        for k in candidates:
            clustering, layer = _cluster_layer(view, k, per_channel, grid_aligned, inputs, refine_rounds)
            sqnr = layer.weight_sqnr_db if layer.output_sqnr_db is None else layer.output_sqnr_db
            if min_sqnr_db is not None:
                layer.meets_min_sqnr = sqnr >= min_sqnr_db
                if layer.meets_min_sqnr:
                    break
        clustered = clustering.weights().reshape(channels_last.shape)
        return np.moveaxis(clustered, -1, weight.channel_axis), layer

    # Layers are independent: one per thread, each with single-threaded BLAS (many small products, where BLAS
    # threads would only spin); results are consumed in order, at most two rounds of layers held at once.
    results = {}
    workers = resolve_num_threads(num_threads)
    with single_threaded_blas(), ThreadPoolExecutor(workers) as pool:
        for start in range(0, len(weights), 2 * workers):
            batch = weights[start : start + 2 * workers]
            for weight, (clustered, layer) in zip(batch, pool.map(cluster_one, batch), strict=True):
                replace_weight(model, weight, clustered)
                results[weight.name] = layer
    return results


def _candidates(clusters: int, *, adaptive: bool) -> list[int]:
    """The k values to try: ``clusters``, or adaptively 2, 4, 8, ... up to it."""
    if not 1 <= clusters <= MAX_CLUSTERS:
        raise InputError(f"--clusters must be between 1 and {MAX_CLUSTERS}, not {clusters}")
    if not adaptive:
        return [clusters]
    if clusters < 2:
        raise InputError(f"--clusters: with --adaptive-centroids the largest k tried (2, 4, 8, ...), not {clusters}")
    return [2**exponent for exponent in range(1, clusters.bit_length())]


def _cluster_layer(
    view: np.ndarray, k: int, per_channel: bool, grid_aligned: bool, inputs: LayerInputs | None, rounds: int
) -> tuple[Clustering, ClusteredLayer]:
    clustering = cluster_view(view, k, per_channel=per_channel, grid_aligned=grid_aligned)
    weight_energy = _energy(view)
    weight_unrefined = _ratio_db(weight_energy, _energy(view - clustering.weights()))
    output_energy = errors = output_unrefined = None
    if inputs is not None:
        output_energy = float(inputs.output_errors(view).sum())
        errors = inputs.output_errors(view - clustering.weights())
        output_unrefined = _ratio_db(output_energy, float(errors.sum()))
        if rounds > 0 and math.isfinite(weight_unrefined) and k <= REFINE_MAX_CLUSTERS:
            clustering, errors = refine(clustering, view, inputs, rounds, errors)
    layer = ClusteredLayer(
        clusters=k,
        per_channel=per_channel,
        grid_aligned=grid_aligned,
        elements=view.size,
        groups=len(clustering.codebooks),
        distinct_values=int(clustering.distinct_values().max(initial=0)),
        weight_sqnr_db=_ratio_db(weight_energy, _energy(view - clustering.weights())),
        weight_sqnr_db_unrefined=weight_unrefined,
        output_sqnr_db=None if inputs is None else _ratio_db(output_energy, float(errors.sum())),
        output_sqnr_db_unrefined=output_unrefined,
        steps=clustering.steps,
    )
    return clustering, layer


def _energy(values: np.ndarray) -> float:
    return float(np.sum(np.square(values, dtype=np.float64)))


def _ratio_db(signal: float, noise: float) -> float:
    if noise == 0:
        return math.inf
    return 10 * math.log10(signal / noise) if signal > 0 else -math.inf


# --------------------------------------------------------------------------------------------------- command


def _validate(args: argparse.Namespace) -> None:
    """Flag combinations argparse cannot check; refused before any work (exit status 2)."""
    if args.min_sqnr is not None and not args.adaptive_centroids:
        raise InputError("--min-sqnr: only with --adaptive-centroids (it is the per-layer SQNR target of adaptive k)")
    if args.clusters is not None:
        _candidates(args.clusters, adaptive=args.adaptive_centroids)
    if args.refine_rounds < 0:
        raise InputError(f"--refine-rounds must be 0 or more, not {args.refine_rounds}")
    if not args.quantize and args.activation_bits is not None:
        raise InputError("--activation-bits: --no-quantize writes a float model (no activations to quantize)")


def run(args: argparse.Namespace) -> dict:
    _validate(args)
    parameters: dict[str, object] = {
        "per_channel": args.per_channel,
        "adaptive_centroids": args.adaptive_centroids,
        "refine_rounds": args.refine_rounds if args.refine else 0,
        "grid_aligned": args.grid_aligned,
        "quantize": args.quantize,
        "codebook_dtype": "float32",
    }

    def quantize(context: MethodContext) -> QuantizedModel:
        if args.adaptive_centroids:
            clusters = args.clusters or ADAPTIVE_MAX_CLUSTERS
            min_sqnr = DEFAULT_MIN_SQNR_DB if args.min_sqnr is None else args.min_sqnr
            parameters.update(max_clusters=clusters, min_sqnr_db=min_sqnr)
        else:
            clusters = args.clusters or DEFAULT_CLUSTERS[context.model_type]
            min_sqnr = None
            parameters.update(clusters=clusters)
        layers = cluster_model(
            context.model, context.calibration, clusters=clusters, per_channel=args.per_channel,
            min_sqnr_db=min_sqnr, refine_rounds=parameters["refine_rounds"], grid_aligned=args.grid_aligned,
            model_dir=context.model_dir, min_elements=args.min_elements,
        )
        if not args.quantize:
            return _float_result(context.model, context.model_dir, layers, args.min_elements)
        activation_bits = args.activation_bits or DEFAULT_ACTIVATION_BITS[context.model_type]
        parameters.update(activation_bits=activation_bits, activation_method=DEFAULT_ACTIVATION_METHOD[activation_bits],
                          weight_bits=8)
        return quantize_clustered(
            context.model, context.calibration, layers, activation_bits=activation_bits,
            grid_aligned=args.grid_aligned, per_channel=args.per_channel, model_dir=context.model_dir,
            min_elements=args.min_elements,
        )

    return run_method("cluster", args, quantize, parameters=parameters)


def quantize_clustered(
    model: onnx.ModelProto,
    samples: Sequence[Mapping[str, np.ndarray]],
    layers: dict[str, ClusteredLayer],
    *,
    activation_bits: int,
    grid_aligned: bool = False,
    per_channel: bool = False,
    model_dir: str | Path | None = None,
    min_elements: int = 64,
) -> QuantizedModel:
    """The clustered model (in place) as the per-channel pipeline's int8 QDQ (min-max scales, nearest
    rounding), with the clustered size figures.

    Parameters
    ----------
    model
        The model :func:`cluster_model` clustered.
    samples
        Calibration samples for the activation ranges.
    layers
        :func:`cluster_model`'s result; each layer's ``int8_sqnr_db`` is filled in.
    activation_bits
        8 or 16.
    grid_aligned, per_channel
        As given to :func:`cluster_model`: grid-aligned codebooks are written with exactly their grid.
    model_dir
        Folder of the model's external data.
    min_elements
        Smaller weights are not counted in the size figures.
    """
    weights = WeightScheme(bits=8, granularity="per-channel", symmetric=True, search="minmax", rounding="nearest")
    scheme = QuantScheme(weights=weights, activation_bits=activation_bits,
                         activation_method=DEFAULT_ACTIVATION_METHOD[activation_bits])
    overrides: dict[str, WeightScheme] = {}
    scales: dict[str, np.ndarray] = {}
    if grid_aligned:
        # The QDQ grid is the one clustered on: per tensor for a per-tensor codebook, per channel otherwise.
        for name, layer in layers.items():
            scales[name] = layer.steps if per_channel else layer.steps.reshape(())
            if not per_channel:
                overrides[name] = WeightScheme(bits=8, granularity="per-tensor", symmetric=True, search="minmax",
                                               rounding="nearest")
    result = quantize_model(model, samples, scheme, model_dir=model_dir, overrides=overrides,
                            min_elements=min_elements, fixed_scales=scales)
    for name, layer in layers.items():
        written = result.layers[name]
        layer.int8_sqnr_db = written.weight_sqnr_db  # the int8 codes against the clustered float weight
        result.weight_bits += layer.packed_bits - written.packed_bits
        result.layers[name] = layer
    result.packed_bytes = math.ceil(result.weight_bits / 8)
    return result


def _float_result(
    model: onnx.ModelProto, model_dir: Path, layers: dict[str, ClusteredLayer], min_elements: int
) -> QuantizedModel:
    """The clustered float model with its size figures: clustered weights packed, the rest at their dtype."""
    result = QuantizedModel(model, layers=dict(layers))
    for weight in find_weights(model, model_dir, min_elements=min_elements):
        result.weight_elements += weight.size
        layer = layers.get(weight.name)
        result.weight_bits += layer.packed_bits if layer else weight.size * weight.dtype.itemsize * 8
    result.packed_bytes = math.ceil(result.weight_bits / 8)
    return result
