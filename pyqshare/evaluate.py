"""``pyqshare evaluate``: fidelity of a candidate model against a reference, output by output.

Both models run on onnxruntime's CPU provider on the same inputs (by default the 8 seeded evaluation samples
of ../shared/CLI.md, which differ from the calibration samples); with ``--qnn`` the candidate also runs on the
onnxruntime-qnn HTP simulator with CPU fallback disabled, so a result there proves the HTP ran every node.

Metrics per output, pooled over all samples (float64):

- ``sqnr_db``: ``10 * log10(sum(ref**2) / sum((ref - cand)**2))``. JSON has no infinities, so a non-finite
  SQNR is ``null`` and ``sqnr_db_nonfinite`` says which: ``"inf"`` (identical outputs), ``"-inf"`` (an
  all-zero reference with a nonzero error) or ``"nan"`` (non-finite values in an output).
- ``identical``: every element equal.
- ``cosine``: cosine similarity of the flattened outputs (1.0 when both are all zero, 0.0 when only one is;
  ``null`` when not finite).
- ``max_abs_error``: largest ``|ref - cand|`` (``null`` when not finite).
- ``top1_agreement``: fraction of rows whose arg-max agrees, only for outputs that look like class scores: a
  float output of rank 2 ``(batch, classes)`` with more than one class, whose name does not say it is an
  embedding or a hidden state (``embed``, ``hidden``, ``pool``, ``feature``, ``state``). Callers that know
  better pass ``class_scores`` explicitly.

``min_sqnr_db`` is the minimum over outputs, with ``min_sqnr_db_nonfinite`` under the same rule ("nan" ranks
lowest, then "-inf", then numbers, then "inf").
"""

from __future__ import annotations

import argparse
import math
import os
import re
import time
from collections.abc import Collection, Mapping, Sequence

import numpy as np
import onnx
from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

from pyqshare.calibration import Sample, default_inputs, describe_inputs, load_calibration_data, run_model, run_session
from pyqshare.errors import InputError
from pyqshare.model import load_model
from pyqshare.shapes import input_signature, parse_input_shapes, resolve_input_shapes
from pyqshare.qnn import create_htp_session, native_stdout_to_stderr

_NOT_CLASS_SCORES = re.compile(r"embed|hidden|pool|feature|state", re.IGNORECASE)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reference", required=True, metavar="M", help="the reference ONNX model (usually float)")
    parser.add_argument("--candidate", required=True, metavar="Q", help="the ONNX model to judge against it")
    parser.add_argument(
        "--inputs", metavar="F",
        help="evaluation inputs: .npz keyed by input name or a QNN input list (default: 8 seeded random samples)",
    )
    parser.add_argument(
        "--input-shape", action="append", default=[], metavar="NAME=D1,D2,...",
        help="shape of a dynamic input (repeatable); default batch 1, sequence 128",
    )
    parser.add_argument(
        "--qnn", action="store_true",
        help="also run the candidate on the onnxruntime-qnn HTP simulator (CPU fallback disabled)",
    )


def run(args: argparse.Namespace) -> dict:
    return evaluate(
        args.reference, args.candidate, inputs_path=args.inputs,
        input_shapes=parse_input_shapes(args.input_shape), qnn=args.qnn,
    )


def evaluate(
    reference_path: str | os.PathLike[str],
    candidate_path: str | os.PathLike[str],
    *,
    samples: Sequence[Sample] | None = None,
    inputs_path: str | os.PathLike[str] | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    qnn: bool = False,
    provider_options: Mapping[str, object] | None = None,
) -> dict:
    """Run reference and candidate on the same inputs and compare every reference output.

    Parameters
    ----------
    reference_path
        The reference ONNX model.
    candidate_path
        The candidate; it must take the same inputs (names and dtypes) and produce every reference output.
    samples
        Evaluation inputs; default: ``inputs_path`` if given, else the seeded evaluation samples.
    inputs_path
        An .npz keyed by input name or a QNN input list.
    input_shapes
        ``{input name: full shape}`` for dynamic dims. Inputs the candidate declares fully static take the
        candidate's shape unless given here (a prepared candidate fixes the shapes the reference leaves open).
    qnn
        Also run the candidate on the QNN HTP simulator, CPU fallback disabled; reported under ``"qnn"``
        against the reference and against the candidate's own CPU outputs.
    provider_options
        QNN provider options (validated keys; see :func:`pyqshare.qnn.create_htp_session`).

    Returns
    -------
    dict
        ``{"reference", "candidate", "inputs", "samples", "outputs", "min_sqnr_db", "seconds", ["qnn"]}``.
    """
    started = time.perf_counter()
    reference, candidate = load_model(reference_path), load_model(candidate_path)
    _check_same_inputs(reference_path, reference, candidate_path, candidate)
    output_names = [output.name for output in reference.graph.output]
    missing = sorted(set(output_names) - {output.name for output in candidate.graph.output})
    if missing:
        raise InputError(f"{candidate_path}: lacks the reference outputs {missing}")
    if samples is None:
        shapes = _shapes_from_candidate(candidate, input_shapes)
        if inputs_path is None:
            samples = default_inputs(reference, purpose="evaluation", input_shapes=shapes)
        else:
            samples = load_calibration_data(inputs_path, reference, input_shapes=shapes)
    reference_outputs = run_model(reference_path, samples, output_names)
    candidate_outputs = run_model(candidate_path, samples, output_names)
    report = {
        "reference": os.fspath(reference_path),
        "candidate": os.fspath(candidate_path),
        "inputs": describe_inputs(samples, inputs_path),
        "samples": len(samples),
        **summarize_outputs(reference_outputs, candidate_outputs),
    }
    if qnn:
        qnn_outputs = run_on_htp(candidate_path, samples, output_names, provider_options)
        report["qnn"] = {
            **summarize_outputs(reference_outputs, qnn_outputs),
            "against_cpu_candidate": compare_outputs(candidate_outputs, qnn_outputs),
        }
    report["seconds"] = time.perf_counter() - started
    return report


def _check_same_inputs(reference_path, reference: onnx.ModelProto, candidate_path, candidate: onnx.ModelProto) -> None:
    expected, given = _input_types(reference), _input_types(candidate)
    if expected != given:
        raise InputError(f"{candidate_path} takes inputs ({given}) but {reference_path} takes ({expected})")


def _input_types(model: onnx.ModelProto) -> str:
    return ", ".join(sorted(f"{spec.name}:{spec.dtype}" for spec in input_signature(model)))


def _shapes_from_candidate(candidate, input_shapes: Mapping[str, Sequence[int]] | None) -> dict:
    """``input_shapes`` plus the candidate's fully static input shapes, checked against the candidate."""
    shapes = dict(input_shapes or {})
    for spec in input_signature(candidate):
        if spec.name not in shapes and spec.dims is not None and all(isinstance(dim, int) for dim in spec.dims):
            shapes[spec.name] = spec.dims
    resolve_input_shapes(candidate, shapes)
    return shapes


def run_on_htp(path, samples: Sequence[Sample], output_names: Sequence[str], provider_options=None) -> list[Sample]:
    """Outputs of the model at ``path`` on the QNN HTP (simulator on x86) with CPU fallback disabled.

    Parameters
    ----------
    path
        A QDQ (or float) ONNX model with static shapes, or a compiled ``*_ctx.onnx``.
    samples
        ``{input name: array}`` per run.
    output_names
        Outputs to fetch.
    provider_options
        QNN EP provider options over pyqshare's defaults.

    Raises
    ------
    RuntimeError
        When a node would need the CPU.
    """
    with native_stdout_to_stderr():
        try:
            session = create_htp_session(path, provider_options)
        except (ort_errors.Fail, ort_errors.NotImplemented, ort_errors.InvalidGraph) as error:
            raise RuntimeError(
                f"{path} does not run entirely on the QNN HTP (CPU fallback disabled; static shapes and QNN-valid "
                f"ops needed, see `pyqshare prepare`): {str(error).splitlines()[0]}"
            ) from None
        return run_session(session, samples, output_names)


# ------------------------------------------------------------------------------------------------------ metrics


def sqnr_db(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> float:
    """Pooled SQNR in dB of ``candidate`` against ``reference`` over all samples (may be inf or nan).

    Parameters
    ----------
    reference
        One array per sample.
    candidate
        The matching arrays, same shapes.
    """
    return _pooled(reference, candidate)["sqnr_db"]


def _pooled(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> dict[str, float]:
    signal = noise = dot = candidate_energy = 0.0
    sample_max_errors = [0.0]
    for ref, cand in zip(reference, candidate, strict=True):
        if ref.shape != cand.shape:
            raise InputError(f"output shapes differ: reference {ref.shape}, candidate {cand.shape}")
        ref = np.asarray(ref, dtype=np.float64).ravel()
        cand = np.asarray(cand, dtype=np.float64).ravel()
        error = ref - cand
        signal += float(ref @ ref)
        noise += float(error @ error)
        dot += float(ref @ cand)
        candidate_energy += float(cand @ cand)
        if error.size:
            sample_max_errors.append(float(np.max(np.abs(error))))
    if signal == 0.0 and noise == 0.0:
        sqnr = math.inf  # both all zero: identical
    else:
        with np.errstate(divide="ignore", invalid="ignore"):
            sqnr = float(10.0 * np.log10(np.float64(signal) / np.float64(noise)))
    if signal == 0.0 or candidate_energy == 0.0:
        cosine = 1.0 if signal == candidate_energy else 0.0
    else:
        cosine = dot / math.sqrt(signal * candidate_energy)
    return {"sqnr_db": sqnr, "cosine": cosine, "max_abs_error": float(np.max(sample_max_errors))}  # nan propagates


def looks_like_class_scores(name: str, array: np.ndarray) -> bool:
    """Whether an output is class scores (rule in the module docstring).

    Parameters
    ----------
    name
        The output's name.
    array
        One sample of the output.
    """
    return (
        array.dtype.kind == "f" and array.ndim == 2 and array.shape[-1] > 1 and not _NOT_CLASS_SCORES.search(name)
    )


def _top1_agreement(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> float:
    agree = rows = 0
    for ref, cand in zip(reference, candidate, strict=True):
        agree += int(np.count_nonzero(ref.argmax(axis=-1) == cand.argmax(axis=-1)))
        rows += ref.shape[0]
    return agree / rows if rows else 1.0


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _encode_sqnr(key: str, value: float) -> dict:
    """JSON form of an SQNR: a number, or null plus ``<key>_nonfinite``: "inf", "-inf" or "nan"."""
    if math.isfinite(value):
        return {key: value}
    return {key: None, f"{key}_nonfinite": "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")}


def compare_outputs(
    reference: Sequence[Sample], candidate: Sequence[Sample], *, class_scores: Collection[str] | None = None
) -> dict[str, dict]:
    """Per-output metrics (JSON-ready; definitions in the module docstring) over all samples.

    Parameters
    ----------
    reference
        Reference outputs, ``{output name: array}`` per sample.
    candidate
        Candidate outputs for the same samples; must hold every reference output.
    class_scores
        Names of the outputs to report ``top1_agreement`` for; None decides by :func:`looks_like_class_scores`.
    """
    if len(reference) != len(candidate):
        raise InputError(f"{len(reference)} reference samples but {len(candidate)} candidate samples")
    if not reference:
        raise InputError("no samples to compare")
    metrics = {}
    for name in reference[0]:
        ref = [sample[name] for sample in reference]
        try:
            cand = [sample[name] for sample in candidate]
        except KeyError:
            raise InputError(f"the candidate lacks the output {name!r}") from None
        pooled = _pooled(ref, cand)
        entry = {
            **_encode_sqnr("sqnr_db", pooled["sqnr_db"]),
            "identical": all(np.array_equal(r, c) for r, c in zip(ref, cand, strict=True)),
            "cosine": _finite_or_none(pooled["cosine"]),
            "max_abs_error": _finite_or_none(pooled["max_abs_error"]),
        }
        wanted = name in class_scores if class_scores is not None else looks_like_class_scores(name, ref[0])
        if wanted:
            entry["top1_agreement"] = _top1_agreement(ref, cand)
        metrics[name] = entry
    return metrics


def _decoded_sqnr(entry: Mapping[str, object]) -> float:
    if entry["sqnr_db"] is not None:
        return float(entry["sqnr_db"])
    return float(entry["sqnr_db_nonfinite"])  # float("inf"), float("-inf"), float("nan")


def min_sqnr_db(outputs: Mapping[str, Mapping[str, object]]) -> dict:
    """``{"min_sqnr_db": ...}`` over the entries of :func:`compare_outputs` ("nan" ranks lowest).

    Parameters
    ----------
    outputs
        The result of :func:`compare_outputs`.
    """
    values = [_decoded_sqnr(entry) for entry in outputs.values()]
    lowest = math.nan if any(math.isnan(value) for value in values) else min(values)
    return _encode_sqnr("min_sqnr_db", lowest)


def summarize_outputs(
    reference: Sequence[Sample], candidate: Sequence[Sample], *, class_scores: Collection[str] | None = None
) -> dict:
    """``{"outputs": compare_outputs(...), "min_sqnr_db": ...}``: the summary block methods and evaluate share.

    Parameters
    ----------
    reference
        Reference outputs, ``{output name: array}`` per sample.
    candidate
        Candidate outputs for the same samples.
    class_scores
        Outputs to report ``top1_agreement`` for (see :func:`compare_outputs`).
    """
    outputs = compare_outputs(reference, candidate, class_scores=class_scores)
    return {"outputs": outputs, **min_sqnr_db(outputs)}
