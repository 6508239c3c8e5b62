"""Sharing as QNN decides it: by the quantized bytes of each weight, whatever its name and scale.

A family member is either

* a **QDQ model** (as pyqshare's methods write it): each weight is stored as integer codes behind a
  ``DequantizeLinear``, and those codes are exactly what QNN stores. An ``.encodings`` file next to it (or
  given) must agree with the model's own quantization parameters; or
* a **float model plus an AIMET encodings file** (0.6.1 or 1.0.0): each weight with a param encoding is
  quantized as QNN's converter does, ``QuantizeLinear`` with the encoding's grid (round half to even, the
  float32 division): :func:`pyqshare.quantize`. Encodings files record no axes; a weight's channel and block
  axes come from its consumer (:func:`pyqshare.model.find_weights`).

Float identity, needed to tell which weights *could* share: from the float weights when they are known (float
inputs, or ``float_models`` given beside QDQ models: same weight name and shape), compared exactly
(:func:`identical_float_groups`). When some weight's float values are unknown (QDQ models alone), the family
falls back to the dequantized weights: two weights of one shape *and different layouts* (code type,
granularity, axes, block size) count as float-identical when every element pair could be the nearest
rounding of one float value, ``|dequantized_a - dequantized_b| <= (step_a + step_b) / 2``; two weights of
one layout only when they store the same bytes under the same scales. A layout difference explains a code
difference; within one layout, differing codes may be a fine-tune's small change, which only
``--snap-tolerance`` may override. The inference misses codes rounded otherwise than to nearest (GPTQ) and
cannot tell a float-identical weight from one changed by less than half a step under another layout: pass
the float models when they exist. The report says which evidence was used.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from pyqshare.encodings import (
    Encodings, EncodingKind, TensorEncoding, param_name, encodings_from_qdq_model, read_encodings,
)
from pyqshare.errors import InputError
from pyqshare.kernels import buffers_equal, quantize, tensor_digest
from pyqshare.model import WEIGHT_MIN_ELEMENTS, find_weights, iter_graphs, load_model
from pyqshare.model.qdq import QUANTIZED_TYPES

__all__ = [
    "FamilyModel",
    "QuantizedWeight",
    "SharingPrediction",
    "encoding_differences",
    "encoding_mismatches",
    "float_identical_groups",
    "identical_float_groups",
    "load_family",
    "predict_sharing",
    "same_bytes",
    "same_layout",
]

_CODE_BITS = {TensorProto.INT4: 4, TensorProto.UINT4: 4, TensorProto.INT8: 8, TensorProto.UINT8: 8,
              TensorProto.INT16: 16, TensorProto.UINT16: 16, TensorProto.INT32: 32}
_SIGNED = {TensorProto.INT4, TensorProto.INT8, TensorProto.INT16, TensorProto.INT32}

# The encoding fields a report compares, in the order it lists differences.
ENCODING_FIELDS = ("dtype", "bitwidth", "symmetric", "granularity", "axis", "block_size", "scale", "offset")


@dataclass(frozen=True, eq=False)
class QuantizedWeight:
    """One weight as QNN stores it: integer codes and the encoding that gives them meaning.

    Attributes
    ----------
    name : str
        The float weight's name (the ``DequantizeLinear`` output consumers read; the encoding's name).
    graph : str
        Path of the graph holding it (``""``: the main graph).
    codes : numpy.ndarray
        The codes in the numpy type of ``elem_type`` (ml_dtypes int4/uint4 for 4 bits), the weight's shape.
    elem_type : int
        ``onnx.TensorProto`` type of the codes.
    encoding : TensorEncoding
        Its encoding with ``axis`` (and ``block_axis``) set.
    float_values : numpy.ndarray or None
        The original float weight when known.
    """

    name: str
    graph: str
    codes: np.ndarray
    elem_type: int
    encoding: TensorEncoding
    float_values: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.codes.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of the stored codes (4-bit codes packed two per byte, as ONNX and QNN store them)."""
        return _packed_nbytes(self.codes.size, self.elem_type)

    def step(self) -> np.ndarray:
        """The quantization step of every element (the encoding's scale laid out over the weight)."""
        qdq = self.encoding.to_qdq(self.shape)
        return _spread(np.asarray(qdq.scale, np.float64), self.shape, qdq.axis, qdq.block_size)

    def zero_points(self) -> np.ndarray:
        """The zero point of every element, as a signed integer (the code that stands for 0.0)."""
        qdq = self.encoding.to_qdq(self.shape)
        return _spread(qdq.zero_point.astype(np.int64), self.shape, qdq.axis, qdq.block_size)

    def dequantized(self) -> np.ndarray:
        """``(codes - zero_point) * scale`` in float64."""
        return (self.codes.astype(np.float64) - self.zero_points()) * self.step()


@dataclass
class FamilyModel:
    """One member of a family, read for the quantized view.

    Attributes
    ----------
    path : Path
        The model file given.
    kind : {"qdq", "float"}
        A QDQ model, or a float model quantized by its encodings file.
    model : onnx.ModelProto
        The model with every tensor in memory.
    weights : dict of str to QuantizedWeight
        Its quantized weights by name, in graph order (small ones too: :meth:`counted` applies the weight
        size).
    float_weights : dict of str to numpy.ndarray
        Weights it stores unquantized (float), by name: QNN stores their float bytes.
    encodings : Encodings
        The member's encodings: its file's for float members, the model's own for QDQ members.
    encodings_path : Path or None
        The encodings file read (float members always; QDQ members when one lies beside them or was given).
    encodings_version : str
        Its ``version`` ("1.0.0" when there is no file).
    float_path : Path or None
        Where the float weights came from: the model itself (float members) or the given float model.
    min_elements : int
        Smallest tensor counted as a weight.
    """

    path: Path
    kind: str
    model: onnx.ModelProto
    weights: dict[str, QuantizedWeight]
    float_weights: dict[str, np.ndarray]
    encodings: Encodings
    encodings_path: Path | None
    encodings_version: str
    float_path: Path | None
    min_elements: int = WEIGHT_MIN_ELEMENTS

    def counted(self) -> dict[str, QuantizedWeight]:
        """The quantized weights of at least ``min_elements`` elements (../shared/CLI.md's weights)."""
        return {name: w for name, w in self.weights.items() if w.codes.size >= self.min_elements}


@dataclass
class SharingPrediction:
    """What one weight-shared context binary would hold, predicted from the stored bytes.

    Attributes
    ----------
    models : list of str
        The members, in order; ``members`` refer to them by index.
    groups : list of dict
        Contents stored by more than one tensor: ``{"bytes", "dtype", "shape", "members": [{"model",
        "tensor"}]}``.
    solo_bytes : list of int
        Weight bytes of each model alone.
    total_bytes : int
        Their sum (the solo binaries' weights together).
    predicted_combined_bytes : int
        Weight bytes of one shared binary: every distinct content once.
    shared_bytes : int
        Bytes of the contents more than one model uses, counted once (the shared-weights pool).
    """

    models: list[str]
    groups: list[dict]
    solo_bytes: list[int]
    total_bytes: int
    predicted_combined_bytes: int
    shared_bytes: int

    def to_dict(self) -> dict:
        return {
            "models": self.models, "total_bytes": self.total_bytes, "solo_bytes": self.solo_bytes,
            "predicted_combined_bytes": self.predicted_combined_bytes, "shared_bytes": self.shared_bytes,
            "saved_bytes": self.total_bytes - self.predicted_combined_bytes, "groups": self.groups,
        }


# ------------------------------------------------------------------------------------------------------ loading


def load_family(
    models: Sequence[str | os.PathLike[str]],
    *,
    float_models: Sequence[str | os.PathLike[str]] | None = None,
    encodings: Sequence[str | os.PathLike[str] | None] | None = None,
    min_elements: int = WEIGHT_MIN_ELEMENTS,
) -> list[FamilyModel]:
    """Read every member, validating everything before anyone writes anything.

    Parameters
    ----------
    models : sequence of path
        ONNX files: QDQ models or float models with an encodings file.
    float_models : sequence of path, optional
        One float model per member, in the same order, giving the original float weights of QDQ members (a
        float member's own weights win).
    encodings : sequence of path or None, optional
        One AIMET encodings file per member (None: the ``.encodings`` file beside the model, if any).
        Required for float members.
    min_elements : int
        Smallest tensor counted as a weight (../shared/CLI.md).

    Returns
    -------
    list of FamilyModel

    Raises
    ------
    InputError
        For a missing or malformed model or encodings file, a float model without encodings, an encodings
        file that does not fit its model (unknown tensors, channel counts, disagreement with a QDQ model's
        parameters), or list lengths that do not match the models.
    """
    paths = [Path(p) for p in models]
    for flag, values in (("--float-models", float_models), ("--encodings", encodings)):
        if values is not None and len(values) != len(paths):
            raise InputError(f"{flag}: {len(values)} files for {len(paths)} models (give one per model, in order)")
    return [
        _load_member(path, None if float_models is None else Path(float_models[i]),
                     None if encodings is None or encodings[i] is None else Path(encodings[i]), min_elements)
        for i, path in enumerate(paths)
    ]


def _load_member(path: Path, float_path: Path | None, encodings_path: Path | None, min_elements: int) -> FamilyModel:
    model = load_model(path, load_weights=True)
    if encodings_path is None and _sidecar(path).is_file():
        encodings_path = _sidecar(path)
    nodes = list(weight_dequantizers(model))
    if nodes:
        return _load_qdq(path, model, nodes, float_path, encodings_path, min_elements)
    if encodings_path is None:
        raise InputError(f"{path}: a float model needs an AIMET encodings file (none beside it: pass --encodings)")
    return _load_float(path, model, encodings_path, min_elements)


def _sidecar(path: Path) -> Path:
    return path.with_suffix(".encodings") if path.suffix == ".onnx" else path.with_name(path.name + ".encodings")


def weight_dequantizers(model: onnx.ModelProto) -> Iterator[tuple[str, onnx.GraphProto, onnx.NodeProto]]:
    """``(graph path, graph, node)`` of every DequantizeLinear whose input is an integer initializer and whose
    output is not another DequantizeLinear's scale (LPBQ's first level)."""
    scales = {node.input[1] for _, graph in iter_graphs(model) for node in graph.node
              if node.op_type == "DequantizeLinear" and len(node.input) > 1}
    for path, graph in iter_graphs(model):
        integers = {t.name for t in graph.initializer if t.data_type in QUANTIZED_TYPES}
        for node in graph.node:
            if (node.op_type == "DequantizeLinear" and node.domain in ("", "ai.onnx") and node.input[0] in integers
                    and node.output[0] not in scales):
                yield path, graph, node


def _load_qdq(path: Path, model: onnx.ModelProto, nodes, float_path: Path | None, encodings_path: Path | None,
              min_elements: int) -> FamilyModel:
    own = encodings_from_qdq_model(model)
    floats = _float_arrays(float_path, min_elements=1) if float_path is not None else {}
    weights = {}
    for graph_path, graph, node in nodes:
        tensor = next(t for t in graph.initializer if t.name == node.input[0])
        codes = numpy_helper.to_array(tensor)
        name = param_name(node.input[0], node.output[0])
        if name not in own.params:
            continue
        original = floats.get(name)
        if original is not None and original.shape != codes.shape:
            original = None  # a different tensor of the same name (e.g. reshaped by preparation)
        weights[name] = QuantizedWeight(name, graph_path, codes, tensor.data_type, own.params[name], original)
    version = "1.0.0"
    if encodings_path is not None:
        shapes = {name: w.shape for name, w in weights.items()}
        written = read_encodings(encodings_path, _block_channels(own.params.values(), shapes))
        _check_agrees(encodings_path, path, written, own)
        version = _version(encodings_path)
    float_weights = {w.name: w.array() for w in find_weights(model, path.parent, min_elements=min_elements)}
    return FamilyModel(path, "qdq", model, weights, float_weights, own, encodings_path, version, float_path,
                       min_elements)


def _block_channels(encodings, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, int]:
    return {e.name: shapes[e.name][e.axis] for e in encodings
            if e.kind == EncodingKind.PER_BLOCK and e.name in shapes and e.axis is not None}


def _check_agrees(encodings_path: Path, model_path: Path, written: Encodings, own: Encodings) -> None:
    """A QDQ model's encodings file must say what the model's own parameters say, param by param."""
    for name, entry in written.params.items():
        if entry.dtype == "float" and name not in own.params:
            continue  # kept float, as the model keeps it
        if name not in own.params:
            raise InputError(f"{encodings_path}: param {name!r} is not quantized in {model_path}")
        actual = own.params[name]
        if entry.kind != actual.kind or replace(entry, axis=actual.axis, block_axis=actual.block_axis) != actual:
            raise InputError(f"{encodings_path}: param {name!r} differs from {model_path}'s own quantization "
                             "parameters (not this model's encodings?)")


def _version(encodings_path: Path) -> str:
    # read_encodings validated the file; it does not return the version, which a rewrite keeps.
    return json.loads(encodings_path.read_text(encoding="utf-8"))["version"]


def _float_arrays(path: Path, *, min_elements: int) -> dict[str, np.ndarray]:
    model = load_model(path)
    return {w.name: np.asarray(w.array()) for w in find_weights(model, path.parent, min_elements=min_elements)}


def _load_float(path: Path, model: onnx.ModelProto, encodings_path: Path, min_elements: int) -> FamilyModel:
    found = {w.name: w for w in find_weights(model, path.parent, min_elements=1)}
    channels = {name: w.shape[w.channel_axis] for name, w in found.items() if w.channel_axis is not None}
    file = read_encodings(encodings_path, channels)
    weights, quantized_names = {}, set()
    for name, entry in file.params.items():
        where = f"{encodings_path}: param {name!r}"
        weight = found.get(name)
        if weight is None:
            raise InputError(f"{where} names no float weight of {path}")
        if entry.dtype == "float":
            continue  # stays float: stored as its float bytes
        quantized_names.add(name)
        encoding = _with_axes(entry, weight.channel_axis, weight.reduction_axis, weight.shape, where)
        values = np.ascontiguousarray(weight.array(), dtype=np.float32)
        codes, elem_type = quantize_with(values, encoding, where)
        weights[name] = QuantizedWeight(name, weight.graph, codes, elem_type, encoding, values)
    float_weights = {name: np.asarray(w.array()) for name, w in found.items()
                     if name not in quantized_names and w.size >= min_elements}
    return FamilyModel(path, "float", model, weights, float_weights, file, encodings_path, _version(encodings_path),
                       path, min_elements)


def _with_axes(entry: TensorEncoding, channel_axis: int | None, reduction_axis: int | None,
               shape: tuple[int, ...], where: str) -> TensorEncoding:
    """The file's entry with the axes the weight's consumer implies, checked against the weight's shape."""
    if entry.kind == EncodingKind.PER_TENSOR:
        encoding = entry
    elif channel_axis is None:
        raise InputError(f"{where}: a {entry.kind} encoding for a weight without a channel axis (shape {shape})")
    elif entry.kind == EncodingKind.PER_CHANNEL:
        encoding = replace(entry, axis=channel_axis)
    else:
        encoding = replace(entry, axis=channel_axis, block_axis=reduction_axis)
    try:
        encoding.to_qdq(shape)
    except InputError as exc:
        raise InputError(f"{where}: does not fit the weight of shape {shape}: {exc}") from None
    return encoding


def quantize_with(values: np.ndarray, encoding: TensorEncoding, where: str) -> tuple[np.ndarray, int]:
    """``values`` quantized on ``encoding``'s grid as ONNX QuantizeLinear (and QNN's converter) computes it.

    Parameters
    ----------
    values : numpy.ndarray
        C-contiguous float32 weight.
    encoding : TensorEncoding
        An integer encoding with its axes set.
    where : str
        Names the tensor in error messages.

    Returns
    -------
    (numpy.ndarray, int)
        The codes in the numpy type of the ONNX element type, and that type.
    """
    qdq = encoding.to_qdq(values.shape)
    bits, signed = _CODE_BITS.get(qdq.elem_type, 32), qdq.elem_type in _SIGNED
    if bits == 32:
        raise InputError(f"{where}: 32-bit weight encodings are not supported (QNN takes int32 only for biases)")
    zero_type = np.dtype(np.int8 if signed else np.uint8) if bits <= 8 else np.dtype(np.int16 if signed else np.uint16)
    codes = quantize(values, np.asarray(qdq.scale, np.float32), qdq.zero_point.astype(zero_type), bits,
                     axis=qdq.axis, block_size=qdq.block_size)
    return codes.astype(helper.tensor_dtype_to_np_dtype(qdq.elem_type)), qdq.elem_type


def _spread(values: np.ndarray, shape: tuple[int, ...], axis: int | None, block_size: int | None) -> np.ndarray:
    """Per-tensor, per-axis or blocked parameters (ONNX layouts) broadcast over a tensor of ``shape``."""
    if axis is None:
        return np.broadcast_to(values.reshape(()), shape)
    if block_size is None:
        return np.broadcast_to(values.reshape([-1 if d == axis else 1 for d in range(len(shape))]), shape)
    return np.repeat(values, block_size, axis=axis).take(range(shape[axis]), axis=axis)


def _packed_nbytes(size: int, elem_type: int) -> int:
    return -(-size * _CODE_BITS.get(elem_type, 32) // 8)


# ----------------------------------------------------------------------------------------------------- grouping


def identical_float_groups(tensors: Sequence[np.ndarray]) -> list[list[int]]:
    """Group tensors with identical contents: same dtype, same shape, same bytes.

    Candidates share ``(dtype, shape, tensor_digest)``; every member is then confirmed byte for byte
    against its group's first member with ``buffers_equal`` (a digest only nominates). Used for float
    weights, and for quantized codes too (the same rule: QNN compares stored bytes).

    Parameters
    ----------
    tensors : sequence of numpy.ndarray
        The tensors (made C-contiguous if they are not, which copies).

    Returns
    -------
    list of list of int
        Indices into ``tensors``; every index in exactly one group; groups in order of first member,
        members in input order.
    """
    groups: list[list[int]] = []
    candidates: dict[tuple, list[int]] = {}  # key -> indices into groups
    contiguous = [np.ascontiguousarray(t) for t in tensors]
    for index, tensor in enumerate(contiguous):
        key = (tensor.dtype.str, tensor.dtype.name, tensor.shape, tensor_digest(tensor))
        for group in candidates.setdefault(key, []):
            if buffers_equal(contiguous[groups[group][0]], tensor):
                groups[group].append(index)
                break
        else:
            candidates[key].append(len(groups))
            groups.append([index])
    return groups


def predict_sharing(models: Sequence[FamilyModel]) -> SharingPrediction:
    """Predict what one weight-shared context binary of ``models`` holds: identical stored bytes are shared.

    Quantized weights count their codes (what QNN stores), float weights their float bytes. Tensors below
    the weight size (../shared/CLI.md) are not counted. Two tensors of one model with the same content count
    twice in its solo figure (stored twice) and once in the combined one: whether QNN also merges copies
    within one graph is for the compiled binary to tell.

    Parameters
    ----------
    models : sequence of FamilyModel
        As :func:`load_family` returns them.

    Returns
    -------
    SharingPrediction
    """
    entries = [(index, name, array, nbytes) for index, member in enumerate(models)
               for name, array, nbytes in _stored(member)]
    groups = identical_float_groups([array for _, _, array, _ in entries])
    shared, combined, listed = 0, 0, []
    for group in groups:
        first = entries[group[0]]
        combined += first[3]
        if len({entries[i][0] for i in group}) > 1:
            shared += first[3]
        if len(group) > 1:
            listed.append({"bytes": first[3], "dtype": str(first[2].dtype), "shape": list(first[2].shape),
                           "members": [{"model": entries[i][0], "tensor": entries[i][1]} for i in group]})
    solo = [sum(nbytes for index, _, _, nbytes in entries if index == m) for m in range(len(models))]
    return SharingPrediction([os.fspath(m.path) for m in models], listed, solo, sum(solo), combined, shared)


def _stored(member: FamilyModel) -> Iterator[tuple[str, np.ndarray, int]]:
    for name, weight in member.counted().items():
        yield name, weight.codes, weight.nbytes
    for name, values in member.float_weights.items():
        yield name, values, values.nbytes


def quantized_view(models: Sequence[FamilyModel]) -> dict:
    """Sharing as QNN decides it, for ``share analyze --quantized``: the prediction from stored bytes and every
    float-identical group whose encodings differ.

    Parameters
    ----------
    models : sequence of FamilyModel
        As :func:`load_family` returns them.

    Returns
    -------
    dict
        ``prediction`` (:meth:`SharingPrediction.to_dict`), ``float_evidence`` and ``mismatches``
        (:func:`encoding_mismatches`).
    """
    groups, evidence = float_identical_groups(models)
    return {"prediction": predict_sharing(models).to_dict(), "float_evidence": evidence,
            "mismatches": encoding_mismatches(models, groups)}


def float_identical_groups(models: Sequence[FamilyModel]) -> tuple[list[list[tuple[int, str]]], str]:
    """Groups of quantized weights whose float weights are identical, across and within models.

    Parameters
    ----------
    models : sequence of FamilyModel
        As :func:`load_family` returns them.

    Returns
    -------
    (list of list of (model index, tensor name), str)
        Groups of two or more members, and the evidence: ``"float"`` (float weights compared exactly) or
        ``"dequantized"`` (some float weight unknown: the module docstring's inference for every weight).
    """
    items = [(index, weight) for index, member in enumerate(models) for weight in member.counted().values()]
    if all(weight.float_values is not None for _, weight in items):
        groups = identical_float_groups([weight.float_values for _, weight in items])
        evidence = "float"
    else:
        groups = _roundable_groups([weight for _, weight in items])
        evidence = "dequantized"
    return [[(items[i][0], items[i][1].name) for i in group] for group in groups if len(group) > 1], evidence


def _roundable_groups(weights: Sequence[QuantizedWeight]) -> list[list[int]]:
    """Groups of weights whose codes could all come from one float tensor (module docstring).

    Each weight joins the first group (of its shape) whose first member it is consistent with.
    """
    groups: list[list[int]] = []
    by_shape: dict[tuple[int, ...], list[int]] = {}
    intervals = [_float_interval(w) for w in weights]
    for index, weight in enumerate(weights):
        low, high = intervals[index]
        for group in by_shape.setdefault(weight.shape, []):
            first = groups[group][0]
            if same_layout(weight, weights[first]):
                consistent = same_bytes(weight, weights[first]) and np.array_equal(weight.step(), weights[first].step())
            else:
                other_low, other_high = intervals[first]
                consistent = bool(np.all(np.maximum(low, other_low) <= np.minimum(high, other_high)))
            if consistent:
                groups[group].append(index)
                break
        else:
            by_shape[weight.shape].append(len(groups))
            groups.append([index])
    return groups


def _float_interval(weight: QuantizedWeight) -> tuple[np.ndarray, np.ndarray]:
    """The float values each element's code can stand for under round-to-nearest with saturation: half a
    step either side, unbounded beyond the type's extreme codes (a clipped value lies anywhere past them).
    A relative slack of 1e-6 covers float64 rounding of products exact in real arithmetic."""
    value, half = weight.dequantized(), weight.step() * (0.5 + 1e-6)
    lowest, highest = QUANTIZED_TYPES[weight.elem_type]
    codes = weight.codes.astype(np.int64)
    return (np.where(codes == lowest, -np.inf, value - half), np.where(codes == highest, np.inf, value + half))


# --------------------------------------------------------------------------------------------------- mismatches


def encoding_fields(weight: QuantizedWeight) -> dict:
    """The compared fields of a weight's encoding (JSON-ready; scale and offset as lists).

    Parameters
    ----------
    weight : QuantizedWeight
        The weight.
    """
    enc = weight.encoding
    return {
        "dtype": TensorProto.DataType.Name(weight.elem_type).lower(),
        "bitwidth": enc.bitwidth,
        "symmetric": enc.symmetric,
        "granularity": str(enc.kind).lower(),
        "axis": enc.axis,
        "block_size": enc.block_size,
        "scale": np.asarray(enc.block_scale, np.float64).reshape(-1).tolist(),
        "offset": enc.offset.reshape(-1).tolist(),
    }


def encoding_differences(a: QuantizedWeight, b: QuantizedWeight) -> list[str]:
    """The fields in which two weights' quantization differs, in :data:`ENCODING_FIELDS` order, then
    ``"codes"`` when the encodings agree but the stored codes do not (another rounding, e.g. GPTQ's).

    Parameters
    ----------
    a, b : QuantizedWeight
        The weights.
    """
    fields_a, fields_b = encoding_fields(a), encoding_fields(b)
    differ = [name for name in ENCODING_FIELDS[:-2] if fields_a[name] != fields_b[name]]
    # Scales and offsets are compared element by element, so that a per-channel encoding whose channels all
    # equal a per-tensor one differs from it only in granularity.
    if a.shape != b.shape or not np.array_equal(a.step(), b.step()):
        differ.append("scale")
    if a.shape != b.shape or not np.array_equal(a.zero_points(), b.zero_points()):
        differ.append("offset")
    if not differ and not same_bytes(a, b):
        differ.append("codes")
    return differ


def same_layout(a: QuantizedWeight, b: QuantizedWeight) -> bool:
    """Whether two weights have one shape, code type, granularity, bit width, axes and block size.

    Parameters
    ----------
    a, b : QuantizedWeight
        The weights.
    """
    ea, eb = a.encoding, b.encoding
    return (a.shape == b.shape and a.elem_type == b.elem_type and ea.kind == eb.kind and ea.axis == eb.axis
            and ea.block_axis == eb.block_axis and ea.block_size == eb.block_size and ea.bitwidth == eb.bitwidth)


def same_bytes(a: QuantizedWeight, b: QuantizedWeight) -> bool:
    """Whether QNN would store both weights as the same bytes.

    Parameters
    ----------
    a, b : QuantizedWeight
        The weights.
    """
    return (a.elem_type == b.elem_type and a.shape == b.shape
            and buffers_equal(np.ascontiguousarray(a.codes), np.ascontiguousarray(b.codes)))


def encoding_mismatches(models: Sequence[FamilyModel], groups: Sequence[Sequence[tuple[int, str]]]) -> list[dict]:
    """Float-identical groups whose members QNN would not share: the members and the fields that differ.

    Parameters
    ----------
    models : sequence of FamilyModel
        The family.
    groups : sequence of groups of (model index, tensor name)
        From :func:`float_identical_groups`.

    Returns
    -------
    list of dict
        ``{"members": [{"model", "tensor", **encoding fields}], "differs": [field, ...], "bytes"}`` per group
        whose stored bytes are not all identical; ``differs`` is the union over members of their differences
        from the first member. Scales and offsets list every channel.
    """
    result = []
    for group in groups:
        weights = [models[m].weights[name] for m, name in group]
        differ = set()
        for weight in weights[1:]:
            differ.update(encoding_differences(weights[0], weight))
        if not differ:
            continue
        result.append({
            "members": [{"model": m, "tensor": name, **encoding_fields(w)} for (m, name), w in zip(group, weights)],
            "differs": [f for f in (*ENCODING_FIELDS, "codes") if f in differ],
            "bytes": weights[0].nbytes,
        })
    return result


def mean_squared_step(weight: QuantizedWeight) -> float:
    """The mean over elements of the squared quantization step: the encoding's rounding noise (up to 1/12).

    Parameters
    ----------
    weight : QuantizedWeight
        The weight.
    """
    return float(np.mean(np.square(weight.step()))) if weight.codes.size else math.inf


def storage_bits(weight: QuantizedWeight) -> int:
    """Bits per stored code.

    Parameters
    ----------
    weight : QuantizedWeight
        The weight.
    """
    return _CODE_BITS.get(weight.elem_type, 32)

