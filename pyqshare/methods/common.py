"""The flow every method shares, and the flags every method command accepts.

``run_method`` turns a float ONNX model into ``OUT`` (the QDQ model), ``OUT`` with ``.encodings`` (AIMET
encodings) and ``OUT`` with ``.summary.json`` (keys in ../shared/CLI.md), all written atomically.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from typing import TypeVar
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from pyqshare._atomic import atomic_write_text
from pyqshare.calibration import input_signature, parse_input_shapes, resolve_inputs, run_model
from pyqshare.encodings import encodings_from_qdq_model, write_encodings
from pyqshare.errors import InputError
from pyqshare.evaluate import summarize_outputs
from pyqshare.kernels._common import available_cores, get_num_threads, set_num_threads
from pyqshare.model import load_model, save_model
from pyqshare.prepare import prepare_model
from pyqshare.quantization.pipeline import QuantizedModel

MODEL_TYPES = ("text", "text_generation", "vision", "audio", "multimodal")
TARGETS = ("qnn", "cpu")
ENCODINGS_VERSIONS = ("1.0.0", "0.6.1")
T = TypeVar("T")


@dataclass
class MethodContext:
    """What a method's quantizer gets: the float model ready to quantize, and the data to quantize it with."""

    model: onnx.ModelProto  # prepared (static shapes, folded) when targeting QNN; quantize it in place
    model_dir: Path  # folder of its external data
    model_type: str
    calibration: list[dict[str, np.ndarray]]
    calibration_source: str
    args: argparse.Namespace


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-path", required=True, help="the float ONNX model")
    parser.add_argument("--output-path", required=True, help="the quantized ONNX model to write")
    parser.add_argument("--model-type", choices=MODEL_TYPES, help="picks defaults (default: from the inputs: "
                        "integer token ids mean text, float images vision)")
    parser.add_argument("--calibration-data", help=".npz keyed by input name, or a QNN input list "
                        "(default: 8 seeded random samples, see ../shared/CLI.md)")
    parser.add_argument("--input-shape", action="append", default=[], metavar="NAME=D1,D2,...",
                        help="static shape of one input (repeat per input); defaults: batch 1, sequence 128")
    parser.add_argument("--target", choices=TARGETS, default="qnn",
                        help="qnn (default): prepare for the QNN HTP first (static shapes, folding, fused GELU)")
    parser.add_argument("--encodings-version", choices=ENCODINGS_VERSIONS, default="1.0.0",
                        help="AIMET encodings format of OUT.encodings")
    parser.add_argument("--optimize-for", choices=("hexagon", "mobile", "general"), default="hexagon",
                        help="recorded in the summary; hexagon and mobile imply --target qnn defaults")
    parser.add_argument("--min-elements", type=int, default=64,
                        help="smallest tensor counted as a weight in size figures")
    parser.add_argument("--num-threads", type=int, default=None, metavar="N",
                        help="threads for pyqshare's kernels and per-layer work (default: the cores this process "
                        "may use); results do not depend on it")


def infer_model_type(model: onnx.ModelProto) -> str:
    """text when an input holds integer ids, vision for a float 4-D input, else text."""
    for spec in input_signature(model):
        if spec.dtype.kind in "iu":
            return "text"
        if spec.dtype.kind == "f" and spec.dims is not None and len(spec.dims) == 4:
            return "vision"
    return "text"


def sidecar(output: Path, suffix: str) -> Path:
    """``OUT`` with ``.encodings`` / ``.summary.json`` in place of ``.onnx``."""
    return output.with_suffix(suffix) if output.suffix == ".onnx" else output.with_name(output.name + suffix)


def run_method(
    method: str,
    args: argparse.Namespace,
    quantize: Callable[[MethodContext], QuantizedModel],
    *,
    parameters: Mapping[str, object],
) -> dict:
    """Prepare, calibrate, ``quantize``, write the three outputs and return the summary.

    ``parameters`` go into the summary as they are after ``quantize`` ran (it may record resolved defaults).
    The kernels' default thread count is ``--num-threads`` while the method runs, and restored after.
    """
    threads = available_cores() if args.num_threads is None else args.num_threads
    previous = get_num_threads()
    try:
        set_num_threads(threads)
    except (TypeError, ValueError) as error:
        raise InputError(f"--num-threads: {error}") from None
    try:
        return _run_method(method, args, quantize, parameters)
    finally:
        set_num_threads(previous)


def _run_method(
    method: str,
    args: argparse.Namespace,
    quantize: Callable[[MethodContext], QuantizedModel],
    parameters: Mapping[str, object],
) -> dict:
    source, output = Path(args.model_path), Path(args.output_path)
    if not source.is_file():
        raise InputError(f"--model-path: {source}: no such model file")
    if output.resolve() == source.resolve():
        raise InputError("--output-path: must differ from --model-path (the input is never overwritten)")
    input_shapes = parse_input_shapes(args.input_shape)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=output.parent if output.parent.exists() else None) as scratch:
        if args.target == "qnn":
            _progress(f"{method}: preparing {source.name} for the QNN HTP")
            prepared = Path(scratch) / "prepared.onnx"
            prepare_model(source, prepared, input_shapes, placement="none")
            model_path = prepared
        else:
            model_path = source
        model = load_model(model_path, load_weights=True)
        model_type = args.model_type or infer_model_type(model)
        calibration, calibration_source = resolve_inputs(
            model, args.calibration_data, purpose="calibration", input_shapes=input_shapes
        )
        context = MethodContext(model, model_path.parent, model_type, calibration, calibration_source, args)
        _progress(f"{method}: quantizing with {calibration_source} calibration samples")
        quantized = quantize(context)
        save_model(quantized.model, output)
    quantize_seconds = time.perf_counter() - started
    write_encodings(sidecar(output, ".encodings"), encodings_from_qdq_model(quantized.model), args.encodings_version)

    _progress(f"{method}: evaluating against the float model")
    evaluation, evaluation_source = resolve_inputs(
        load_model(source), None, purpose="evaluation", input_shapes=input_shapes
    )
    fidelity = summarize_outputs(run_model(source, evaluation), run_model(output, evaluation))
    summary = {
        "method": method,
        "model": str(source),
        "output": str(output),
        "encodings": str(sidecar(output, ".encodings")),
        "model_type": model_type,
        "target": args.target,
        "parameters": dict(parameters),
        "size_bytes": _disk_bytes(output),
        "packed_bytes": quantized.packed_bytes,
        "bits_per_weight": round(quantized.bits_per_weight, 4),
        "calibration": calibration_source,
        "evaluation": evaluation_source,
        "quantize_seconds": round(quantize_seconds, 3),
        **fidelity,
        **quantized.report,
        "layers": {name: layer.to_dict() for name, layer in quantized.layers.items()},
    }
    atomic_write_text(sidecar(output, ".summary.json"), json.dumps(_json_safe(summary), indent=1) + "\n")
    return summary


def _disk_bytes(output: Path) -> int:
    """The model file plus every external data file it references."""
    model = onnx.load(output, load_external_data=False)
    locations = {
        entry.value
        for tensor in model.graph.initializer
        for entry in tensor.external_data
        if entry.key == "location"
    }
    return output.stat().st_size + sum((output.parent / location).stat().st_size for location in locations)


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    return value


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def load_layer_map(path: str | os.PathLike[str], flag: str, convert: Callable[[object, str], T]) -> list[tuple[str, T]]:
    """A layer-wise JSON file (../shared/CLI.md: layer name or regular expression -> value), in file order.

    Parameters
    ----------
    path
        The JSON file.
    flag
        The flag that named it, for messages (``--layer-wise-sparsity``).
    convert
        ``convert(value, where)`` checks one value and returns it converted; raises InputError naming ``where``.

    Raises
    ------
    InputError
        Unreadable file, malformed JSON, not an object, duplicate keys, an invalid regular expression, or a
        value ``convert`` refuses; the message names the flag and the file.
    """

    def unique_keys(items: list[tuple[str, object]]) -> dict[str, object]:
        keys = [key for key, _ in items]
        if len(set(keys)) != len(keys):
            raise InputError(f"{flag} {path}: duplicate key {next(k for k in keys if keys.count(k) > 1)!r}")
        return dict(items)  # keeps file order

    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"), object_pairs_hook=unique_keys)
    except OSError as error:
        raise InputError(f"{flag} {path}: cannot read it ({error.strerror or error})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"{flag} {path}: not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise InputError(f"{flag} {path}: must be a JSON object mapping layer names or regular expressions to values")
    entries = []
    for key, value in data.items():
        try:
            re.compile(key)
        except re.error as error:
            raise InputError(f"{flag} {path}: key {key!r} is not a valid regular expression ({error})") from None
        entries.append((key, convert(value, f"{flag} {path}: key {key!r}")))
    return entries
