"""``pyqshare share harmonize``: make float-identical weights quantize to identical bytes in every model.

QNN shares a weight across the graphs of one context binary only when its quantized bytes are identical
(../shared/QNN_NOTES.md). The same float weight quantized per channel in one model and per tensor in another,
or rounded differently (GPTQ rounds against each model's own calibration data), is stored twice.

**Which encoding a group gets.** For every group of float-identical weights whose stored bytes differ, one
member is the reference and every other member takes its encoding *and its codes*: the finest grid (the
smallest mean squared quantization step over the tensor) among the members' own encodings with the group's
narrowest code width, ties going to the earliest model. The float weights are identical, so the grid with
the least rounding noise is the best for every member at once; never widening keeps each model's size and
the formats its HTP layers run in (a wider weight type may need wider activations); copying the codes
leaves the reference member byte-identical, its rounding (GPTQ's, say) included. A merged encoding covering
every member (per-channel maxima) was rejected: it would change every member, the reference too, and is
coarser than the finest member's grid.

**Snapping** (``--snap-tolerance F``, ../shared/CLI.md): the first model is the base. A later model's weight
with the base weight's name, shape and layout (code type, granularity, axes, block size) takes the base's
codes and encoding when, measured on the base's grid, at most a fraction F of its elements differ from the
base's codes, each by one code at most. Its position on the base grid is its own codes when the encodings
are equal, else its float weight (or, unknown, its dequantized weight) rounded to the base grid.

**Outputs.** Every member is written into ``--output-dir`` as a QDQ model plus its ``.encodings`` (same file
name; a ``<index>_`` prefix when two members share one). A QDQ member keeps everything but the rewritten
weights (codes, scale, zero point, axis attributes). A float member becomes a QDQ model whose weights are
quantized by its encodings (activations stay float: activation encodings name tensors of the graph they
were computed on); its encodings file keeps every entry but the rewritten params. Nothing is written until
every input has been read and validated; files are staged in the output folder and moved in at the end.

**Fidelity.** Each changed model is evaluated on the default evaluation inputs against its float model when
known (a float member's own, or ``--float-models``), else against its own pre-harmonization QDQ model:
output SQNR before, after harmonizing, and after snapping (the difference is the snap's cost).
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from pyqshare.encodings import EncodingKind, param_name, encodings_from_qdq_model, write_encodings
from pyqshare.errors import InputError
from pyqshare.evaluate import evaluate
from pyqshare.model import WEIGHT_MIN_ELEMENTS, find_weights, iter_graphs, save_model
from pyqshare.model.graph import NameFactory
from pyqshare.model.qdq import quantize_weight_in_place
from pyqshare.share.quantized import (
    FamilyModel, QuantizedWeight, weight_dequantizers, encoding_differences, encoding_fields, encoding_mismatches,
    float_identical_groups, load_family, mean_squared_step, predict_sharing, quantize_with, same_bytes, same_layout,
    storage_bits,
)

__all__ = ["Change", "choose_reference", "configure", "harmonize", "run", "snap_to_base"]

State = list[dict[str, QuantizedWeight]]  # per model: weight name -> its weight as it will be written


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("models", nargs="*", metavar="MODEL",
                        help="QDQ models (pyqshare's methods), or float models with an .encodings file beside them")
    parser.add_argument("--model-path", nargs="+", action="extend", default=[], metavar="MODEL",
                        help="more models (the Guide's spelling; repeatable)")
    parser.add_argument("--output-dir", required=True, help="folder for the harmonized models and encodings")
    parser.add_argument("--float-models", nargs="+", metavar="F",
                        help="the float model of each MODEL, in order: exact float identity and fidelity figures")
    parser.add_argument("--encodings", nargs="+", metavar="E",
                        help="the AIMET encodings file of each MODEL, in order (default: MODEL's .encodings)")
    parser.add_argument("--snap-tolerance", type=float, metavar="F",
                        help="a later model's weight takes the first model's bytes when at most a fraction F of "
                        "its elements differ, each by one quantization step (0..1)")
    parser.add_argument("--min-elements", type=int, default=WEIGHT_MIN_ELEMENTS,
                        help="smallest tensor counted as a weight")


def run(args: argparse.Namespace) -> dict:
    return harmonize([*args.models, *args.model_path], args.output_dir, float_models=args.float_models,
                     encodings=args.encodings, snap_tolerance=args.snap_tolerance, min_elements=args.min_elements)


@dataclass
class Change:
    """One rewritten weight.

    Attributes
    ----------
    model : int
        Index of the model.
    tensor : str
        The weight's name.
    reason : {"harmonize", "snap"}
        Why it changed.
    old, new : QuantizedWeight
        Before and after.
    source : (int, str)
        The model and weight whose bytes it took.
    differing_elements : int
        Snaps: elements whose code differed from the base's.
    """

    model: int
    tensor: str
    reason: str
    old: QuantizedWeight
    new: QuantizedWeight
    source: tuple[int, str]
    differing_elements: int | None = None

    def to_dict(self) -> dict:
        old, new = encoding_fields(self.old), encoding_fields(self.new)
        entry = {"model": self.model, "tensor": self.tensor, "reason": self.reason, "bytes": self.new.nbytes,
                 "from": {"model": self.source[0], "tensor": self.source[1]},
                 "fields": encoding_differences(self.old, self.new), "old": old, "new": new}
        if self.differing_elements is not None:
            entry["differing_elements"] = self.differing_elements
            entry["differing_fraction"] = self.differing_elements / max(1, self.new.codes.size)
        return entry


def harmonize(
    models: Sequence[str | os.PathLike[str]],
    output_dir: str | os.PathLike[str],
    *,
    float_models: Sequence[str | os.PathLike[str]] | None = None,
    encodings: Sequence[str | os.PathLike[str]] | None = None,
    snap_tolerance: float | None = None,
    min_elements: int = WEIGHT_MIN_ELEMENTS,
) -> dict:
    """Harmonize (and optionally snap) a family's quantized weights and write the rewritten family.

    Parameters
    ----------
    models : sequence of path
        Two or more QDQ models, or float models with encodings files (see :mod:`pyqshare.share.quantized`).
    output_dir : path
        Folder to write every member into (created if missing).
    float_models : sequence of path, optional
        The float model of each member, in order.
    encodings : sequence of path, optional
        The encodings file of each member, in order (default: the ``.encodings`` file beside each model).
    snap_tolerance : float, optional
        Fraction of elements, in [0, 1], that may differ by one code from the base's (module docstring).
    min_elements : int
        Smallest tensor counted as a weight.

    Returns
    -------
    dict
        ``{"models", "outputs", "float_evidence", "before", "after" (predictions, the after one read back
        from the written files), "mismatches", "changes", "snap" (with a tolerance), "fidelity"}``; entries
        name models by their index in ``models`` (a model may be given twice, with two encodings files).

    Raises
    ------
    InputError
        For bad inputs (see :func:`~pyqshare.share.quantized.load_family`), fewer than two models, a tolerance
        outside [0, 1], or an output that would overwrite an input. Nothing is written then.
    """
    if len(models) < 2:
        raise InputError(f"needs at least two models, got {len(models)}")
    if snap_tolerance is not None and not 0.0 <= snap_tolerance <= 1.0:
        raise InputError(f"--snap-tolerance: must lie in [0, 1], got {snap_tolerance}")
    family = load_family(models, float_models=float_models, encodings=encodings, min_elements=min_elements)
    output_dir = Path(output_dir)
    outputs = _output_paths(family, output_dir, [*(float_models or []), *(encodings or [])])
    groups, evidence = float_identical_groups(family)
    mismatches = encoding_mismatches(family, groups)

    state: State = [dict(member.weights) for member in family]
    changes = _harmonize_groups(family, groups, state)
    harmonized = [dict(weights) for weights in state]
    snaps = snap_to_base(family, state, snap_tolerance) if snap_tolerance is not None else []
    changed = {change.model for change in [*changes, *snaps]}

    output_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".harmonize-", dir=output_dir) as scratch:
        staged = [Path(scratch) / path.name for path in outputs]
        for member, weights, path in zip(family, state, staged):
            _write_member(member, weights, path)
        fidelity = []
        for index in sorted(changed):
            stages = {"harmonized": harmonized[index]} if any(s.model == index for s in snaps) else {}
            fidelity.append({"model": index, **_fidelity(family[index], staged[index], stages, Path(scratch))})
        for source, target in zip(staged, outputs):
            for suffix in ("", ".encodings"):
                os.replace(_sidecar_of(source, suffix), _sidecar_of(target, suffix))

    report = {
        "models": [os.fspath(member.path) for member in family],
        "outputs": [{"model": os.fspath(path), "encodings": os.fspath(_sidecar_of(path, ".encodings"))}
                    for path in outputs],
        "float_evidence": evidence,
        "before": predict_sharing(family).to_dict(),
        "after": predict_sharing(load_family(outputs, min_elements=min_elements)).to_dict(),
        "mismatches": mismatches,
        "changes": [change.to_dict() for change in [*changes, *snaps]],
        "fidelity": fidelity,
    }
    if snap_tolerance is not None:
        report["snap"] = _snap_report(family, snaps, fidelity, snap_tolerance)
    return report


def _output_paths(family: Sequence[FamilyModel], output_dir: Path, other_inputs: Sequence) -> list[Path]:
    names = [member.path.name for member in family]
    paths = [output_dir / (name if names.count(name) == 1 else f"{index}_{name}") for index, name in enumerate(names)]
    inputs = {Path(p).resolve() for p in other_inputs}
    for member in family:
        inputs.add(member.path.resolve())
        if member.encodings_path is not None:
            inputs.add(member.encodings_path.resolve())
    for path in paths:
        for target in (path, _sidecar_of(path, ".encodings")):
            if target.resolve() in inputs:
                raise InputError(f"--output-dir: {target} would overwrite an input (choose another folder)")
    return paths


def _sidecar_of(path: Path, suffix: str) -> Path:
    if not suffix:
        return path
    return path.with_suffix(suffix) if path.suffix == ".onnx" else path.with_name(path.name + suffix)


# ----------------------------------------------------------------------------------------------------- choosing


def choose_reference(weights: Sequence[QuantizedWeight]) -> int:
    """The member whose encoding and codes a float-identical group adopts (module docstring).

    Parameters
    ----------
    weights : sequence of QuantizedWeight
        The group's members, earliest model first.

    Returns
    -------
    int
        Index into ``weights``: the smallest mean squared step among the narrowest code width, earliest first.
    """
    narrowest = min(storage_bits(w) for w in weights)
    candidates = [i for i, w in enumerate(weights) if storage_bits(w) == narrowest]
    return min(candidates, key=lambda i: (mean_squared_step(weights[i]), i))


def _adopt(weight: QuantizedWeight, source: QuantizedWeight) -> QuantizedWeight:
    """``weight`` storing ``source``'s codes under ``source``'s encoding (renamed to ``weight``)."""
    return replace(weight, codes=source.codes, elem_type=source.elem_type,
                   encoding=replace(source.encoding, name=weight.name))


def _harmonize_groups(family: Sequence[FamilyModel], groups, state: State) -> list[Change]:
    changes = []
    for group in groups:
        weights = [family[m].weights[name] for m, name in group]
        reference = choose_reference(weights)
        source = weights[reference]
        for (m, name), weight in zip(group, weights):
            if not same_bytes(weight, source):
                _refuse_lpbq(family[m], weight)
                state[m][name] = _adopt(weight, source)
                changes.append(Change(m, name, "harmonize", weight, state[m][name], group[reference]))
    return changes


def _refuse_lpbq(member: FamilyModel, weight: QuantizedWeight) -> None:
    if member.kind == "qdq" and weight.encoding.kind == EncodingKind.LPBQ:
        raise InputError(f"{member.path}: weight {weight.name!r} is LPBQ (two DequantizeLinear levels); "
                         "rewriting LPBQ weights is not supported")


def snap_to_base(family: Sequence[FamilyModel], state: State, tolerance: float) -> list[Change]:
    """Give later models' weights the base's (model 0's) bytes where they differ slightly (module docstring).

    Parameters
    ----------
    family : sequence of FamilyModel
        The family; model 0 is the base.
    state : list of dict
        Each model's weights as they will be written (after harmonizing); updated in place.
    tolerance : float
        Largest fraction of elements allowed to differ, each by one code.

    Returns
    -------
    list of Change
        One per snapped weight.
    """
    base = state[0]
    changes = []
    for m in range(1, len(family)):
        for name, weight in list(state[m].items()):
            target = base.get(name)
            if target is None or weight.codes.size < family[m].min_elements or not same_layout(weight, target):
                continue
            if same_bytes(weight, target):
                continue
            differing = _codes_off_base(weight, target)
            if differing is not None and differing <= tolerance * weight.codes.size:
                _refuse_lpbq(family[m], weight)
                state[m][name] = _adopt(weight, target)
                changes.append(Change(m, name, "snap", weight, state[m][name], (0, name), differing))
    return changes


def _codes_off_base(weight: QuantizedWeight, base: QuantizedWeight) -> int | None:
    """How many of ``weight``'s elements sit on another code of the base's grid than the base's own codes;
    None when one sits more than one code away."""
    if replace(weight.encoding, name=base.name) == base.encoding:
        codes = weight.codes
    else:
        # Rounded and saturated as QNN's converter would store it under the base's encoding: where the base
        # clips, its own float lies beyond its range too.
        values = weight.float_values if weight.float_values is not None else weight.dequantized()
        codes, _ = quantize_with(np.ascontiguousarray(values, np.float32), base.encoding, base.name)
    difference = np.abs(codes.astype(np.int64) - base.codes.astype(np.int64))
    return int(np.count_nonzero(difference)) if difference.max(initial=0) <= 1 else None


# ------------------------------------------------------------------------------------------------------ writing


def _write_member(member: FamilyModel, weights: Mapping[str, QuantizedWeight], path: Path) -> None:
    """``member`` with ``weights`` as a QDQ model at ``path`` and its encodings beside it."""
    model = onnx.ModelProto()
    model.CopyFrom(member.model)
    if member.kind == "qdq":
        _rewrite_qdq(model, {name: w for name, w in weights.items() if w is not member.weights[name]})
        encodings = encodings_from_qdq_model(model)
    else:
        _quantize_float(model, member, weights)
        encodings = replace(member.encodings, params={**member.encodings.params,
                                                       **{name: w.encoding for name, w in weights.items()}})
    save_model(model, path)
    write_encodings(_sidecar_of(path, ".encodings"), encodings, member.encodings_version)


def _rewrite_qdq(model: onnx.ModelProto, changed: Mapping[str, QuantizedWeight]) -> None:
    """Store new codes, scales, zero points and axes for the ``changed`` weights of a QDQ model."""
    if not changed:
        return
    names = NameFactory(model)
    readers = Counter(name for _, graph in iter_graphs(model) for node in graph.node for name in node.input)
    rescaled: dict[str, tuple[onnx.GraphProto, np.ndarray, np.ndarray]] = {}  # DQ output -> (graph, old, new scale)
    for _, graph, node in list(weight_dequantizers(model)):
        weight = changed.get(param_name(node.input[0], node.output[0]))
        if weight is None:
            continue
        qdq = weight.encoding.to_qdq(weight.shape)
        old_scale = _initializer(graph, node.input[1])
        if old_scale is not None:
            rescaled[node.output[0]] = (graph, numpy_helper.to_array(old_scale).ravel(), np.ravel(qdq.scale))
        scale_type = numpy_helper.to_array(old_scale).dtype if old_scale is not None else np.float32
        scale = np.asarray(qdq.scale, dtype=scale_type)  # the scale's type is DequantizeLinear's output type
        _set_initializer(graph, node.input[0], weight.codes)
        while len(node.input) < 3:
            node.input.append("")
        for position, value in ((1, scale), (2, qdq.zero_point)):
            name = node.input[position]
            if not name or readers.get(name, 0) > 1 or _initializer(graph, name) is None:
                name = names(f"{weight.name}_{'scale' if position == 1 else 'zero_point'}")
                node.input[position] = name
            _set_initializer(graph, name, value)
        kept = [a for a in node.attribute if a.name not in ("axis", "block_size")]
        del node.attribute[:]
        node.attribute.extend(kept)
        if qdq.axis is not None:
            node.attribute.append(helper.make_attribute("axis", qdq.axis))
        if qdq.block_size is not None:
            node.attribute.append(helper.make_attribute("block_size", qdq.block_size))
    _rescale_int32_biases(rescaled, changed)


def _rescale_int32_biases(
    rescaled: Mapping[str, tuple[onnx.GraphProto, np.ndarray, np.ndarray]], changed: Mapping[str, QuantizedWeight]
) -> None:
    """Keep QNN's bias rule (int32 bias scale = input scale x weight scale) for every Gemm/Conv/ConvTranspose
    whose weight changed scale: the bias takes scale ``old_bias_scale * new / old`` per output entry and is
    requantized to it. (A grouped ConvTranspose's weight has O/g scales for O bias entries: tiled.) A bias
    harmonized itself (``changed``) already holds its reference's codes and scale."""
    for graph in {id(graph): graph for graph, _, _ in rescaled.values()}.values():
        producers = {output: node for node in graph.node for output in node.output}
        for node in graph.node:
            if node.op_type not in ("Gemm", "Conv", "ConvTranspose") or len(node.input) < 3:
                continue
            change, bias_dq = rescaled.get(node.input[1]), producers.get(node.input[2])
            if change is None or bias_dq is None or bias_dq.op_type != "DequantizeLinear":
                continue
            if param_name(bias_dq.input[0], bias_dq.output[0]) in changed:
                continue
            codes, bias_scale = _initializer(graph, bias_dq.input[0]), _initializer(graph, bias_dq.input[1])
            if codes is None or bias_scale is None or codes.data_type != onnx.TensorProto.INT32:
                continue
            _, old, new = change
            values = numpy_helper.to_array(codes).astype(np.float64)
            scale = numpy_helper.to_array(bias_scale)
            ratio = new.astype(np.float64) / old.astype(np.float64)  # one of them may be per tensor
            if ratio.size > 1:
                ratio = np.tile(ratio, values.size // ratio.size)
            new_scale = (scale.astype(np.float64) * ratio).astype(scale.dtype)
            new_scale = new_scale.reshape(()) if new_scale.size == 1 else new_scale.ravel()
            new_codes = np.clip(np.rint(values * scale / new_scale), -(2**31), 2**31 - 1).astype(np.int32)
            _set_initializer(graph, bias_dq.input[0], new_codes)
            _set_initializer(graph, bias_dq.input[1], new_scale)
            if new_scale.ndim:
                if len(bias_dq.input) > 2 and bias_dq.input[2]:  # zero points take the scale's shape
                    _set_initializer(graph, bias_dq.input[2], np.zeros(new_scale.shape, np.int32))
                kept = [a for a in bias_dq.attribute if a.name != "axis"]
                del bias_dq.attribute[:]
                bias_dq.attribute.extend([*kept, helper.make_attribute("axis", 0)])


def _initializer(graph: onnx.GraphProto, name: str) -> onnx.TensorProto | None:
    return next((t for t in graph.initializer if t.name == name), None)


def _set_initializer(graph: onnx.GraphProto, name: str, value: np.ndarray) -> None:
    tensor = numpy_helper.from_array(np.asarray(value), name)
    existing = _initializer(graph, name)
    if existing is None:
        graph.initializer.append(tensor)
    else:
        existing.CopyFrom(tensor)


def _quantize_float(model: onnx.ModelProto, member: FamilyModel, weights: Mapping[str, QuantizedWeight]) -> None:
    """Store every encoded weight of a float member as codes behind a DequantizeLinear."""
    names = NameFactory(model)
    for weight in find_weights(model, member.path.parent, min_elements=1):
        quantized = weights.get(weight.name)
        if quantized is None:
            continue
        qdq = quantized.encoding.to_qdq(quantized.shape)
        # 4-bit codes arrive as ml_dtypes int4/uint4, which numpy does not count as integers: pass int64.
        quantize_weight_in_place(model, weight, quantized.codes.astype(np.int64), qdq.scale,
                                 qdq.zero_point.astype(np.int64), qdq.elem_type, axis=qdq.axis,
                                 block_size=qdq.block_size, names=names)


# ----------------------------------------------------------------------------------------------------- fidelity


def _fidelity(member: FamilyModel, written: Path, stages: Mapping[str, dict], scratch: Path) -> dict:
    """Min output SQNR of the model before, (after harmonizing,) and as written, against its reference."""
    reference = member.float_path or member.path
    result: dict = {"reference": os.fspath(reference)}
    candidates: dict[str, Path] = {}
    if member.float_path is not None:
        if member.kind == "qdq":
            candidates["before"] = member.path
        else:
            candidates["before"] = scratch / f"before_{written.name}"
            _write_member(member, member.weights, candidates["before"])
    for stage, weights in stages.items():
        candidates[stage] = scratch / f"{stage}_{written.name}"
        _write_member(member, weights, candidates[stage])
    candidates["after"] = written
    for stage, path in candidates.items():
        report = evaluate(reference, path)
        result[stage] = {key: report[key] for key in ("min_sqnr_db", "min_sqnr_db_nonfinite") if key in report}
        result[stage]["outputs"] = {name: out.get("sqnr_db") for name, out in report["outputs"].items()}
    return result


def _min_sqnr(entry: Mapping) -> float:
    if entry.get("min_sqnr_db") is not None:
        return float(entry["min_sqnr_db"])
    return float(entry.get("min_sqnr_db_nonfinite", "nan"))


def _snap_report(family: Sequence[FamilyModel], snaps: Sequence[Change], fidelity: Sequence[dict],
                 tolerance: float) -> dict:
    per_model = []
    for index in range(1, len(family)):
        mine = [change for change in snaps if change.model == index]
        entry = {"model": index, "tensors": len(mine), "bytes_gained": sum(change.new.nbytes for change in mine)}
        figures = next((f for f in fidelity if f["model"] == index), {})
        if mine and "harmonized" in figures:
            before, after = _min_sqnr(figures["harmonized"]), _min_sqnr(figures["after"])
            cost = before - after
            entry["sqnr_cost_db"] = cost if math.isfinite(cost) else None
            entry["min_sqnr_db"] = {"harmonized": figures["harmonized"].get("min_sqnr_db"),
                                    "snapped": figures["after"].get("min_sqnr_db")}
        per_model.append(entry)
    return {"tolerance": tolerance, "base": 0, "models": per_model,
            "bytes_gained": sum(entry["bytes_gained"] for entry in per_model)}

