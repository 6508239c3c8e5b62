"""Calibration and evaluation inputs, onnxruntime CPU runs, and activation statistics.

Inputs (../shared/CLI.md, "Calibration inputs")
-----------------------------------------------
Without a data file, :func:`default_inputs` makes seeded random samples that match the model's input signature.
Each input's role is recognised by its name *and* its dtype, first rule that matches:

1. name contains ``mask``, integer, bool or float dtype: ones (attention masks attend everywhere);
2. name contains ``token_type`` or ``segment``, integer: zeros;
3. name contains ``position`` or ``pos_ids``, integer: 0, 1, 2, ... along the last axis;
4. name contains ``ids``, ``token`` or ``input``, integer: token ids drawn uniformly from [1000, 2000);
5. any float input: uniform in [0, 1).

Any other input (an integer input with an unrecognised name, strings, ...) is refused with an
:class:`~pyqshare.errors.InputError` that asks for ``--calibration-data``. Calibration and evaluation samples come
from different fixed seeds, so a model is never evaluated on the data it was calibrated on.

Dynamic dimensions are resolved by :func:`pyqshare.shapes.resolve_input_shapes` (``--input-shape``, then batch 1
and sequence 128 by dim name, as its table says).

Data files (:func:`load_calibration_data`)
------------------------------------------
- ``.npz`` keyed by input name. An array with the input's rank is one sample; an array with one more axis is a
  stack of samples along a new leading axis. Every input needs the same number of samples. Arrays are cast
  to the input's dtype only within the same kind (int32 -> int64, float64 -> float32); pickled objects are
  refused.
- Anything else is read as a QNN input list: one inference per line, entries ``input_name:=path/to/file.raw``
  separated by spaces, raw files holding the tensor's C-order bytes with the dtype and shape of the model's
  input (dynamic dims resolved as above). Relative paths resolve against the list's folder; blank lines and
  lines starting with ``#`` (qnn-net-run's output-name header) are skipped.

Activation statistics (:func:`collect_activation_ranges`)
---------------------------------------------------------
The requested main-graph tensors become extra graph outputs of an onnxruntime CPU session (tensors inside
``If``/``Loop``/``Scan`` bodies cannot be graph outputs and are not exposed). Samples are streamed: each run's
intermediates are reduced to running min/max (and histograms) and dropped. Percentile and MSE make a second
pass that histograms every tensor over the exact range found by the first. Returned ranges always include 0,
as QNN requires for activations.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

from pyqshare._atomic import atomic_write_bytes, atomic_write_text
from pyqshare.errors import InputError
from pyqshare.model import PROTOBUF_LIMIT, load_model, save_model
from pyqshare.model.graph import iter_tensors
from pyqshare.shapes import InputSpec, ModelSource, input_signature, resolve_input_shapes
from pyqshare.shapes import parse_input_shapes  # noqa: F401  (re-exported: commands parse --input-shape from here)

Sample = dict[str, np.ndarray]

DEFAULT_COUNT = 8
TOKEN_ID_RANGE = (1000, 2000)
# Fixed, distinct seeds: evaluation never reuses calibration samples.
SEEDS = {"calibration": 20240601, "evaluation": 20240602}

ACTIVATION_METHODS = ("minmax", "percentile", "mse")
ACTIVATION_BITS = (8, 16)
HISTOGRAM_BINS = 4096
FLOAT_TENSOR_TYPES = frozenset({"tensor(float)", "tensor(float16)", "tensor(double)", "tensor(bfloat16)"})

_MASK = re.compile(r"mask", re.IGNORECASE)
_TOKEN_TYPE = re.compile(r"token_?type|segment", re.IGNORECASE)
_POSITION = re.compile(r"position|pos_?ids", re.IGNORECASE)
_TOKEN_IDS = re.compile(r"ids|token|input", re.IGNORECASE)

# Lets onnxruntime find external data files for a model handed over as bytes.
_EXTERNAL_FOLDER_KEY = "session.model_external_initializers_file_folder_path"


# ------------------------------------------------------------------------------------------------ default data


def default_inputs(
    model: ModelSource,
    *,
    count: int = DEFAULT_COUNT,
    purpose: str = "calibration",
    input_shapes: Mapping[str, Sequence[int]] | None = None,
) -> list[Sample]:
    """Seeded random samples matching the model's inputs (roles and dims as the module docstring describes).

    Parameters
    ----------
    model
        A ModelProto or the path of an ONNX file.
    count
        Number of samples (CLI.md: 8).
    purpose
        ``"calibration"`` or ``"evaluation"``; each has its own fixed seed, so the same call gives the same
        data and the two purposes never share samples.
    input_shapes
        ``{input name: full shape}`` for dynamic dims (see :func:`resolve_input_shapes`).
    """
    if purpose not in SEEDS:
        raise InputError(f"purpose must be one of {sorted(SEEDS)}, not {purpose!r}")
    if count < 1:
        raise InputError(f"the number of samples must be at least 1, not {count}")
    shapes = resolve_input_shapes(model, input_shapes)
    specs = input_signature(model)
    fills = [(spec, shapes[spec.name], _fill_for(spec)) for spec in specs]
    rng = np.random.default_rng(SEEDS[purpose])
    return [{spec.name: fill(rng, shape, spec.dtype) for spec, shape, fill in fills} for _ in range(count)]


def _fill_for(spec: InputSpec):
    """The value generator for an input's role: ``fill(rng, shape, dtype) -> ndarray``."""
    kind = spec.dtype.kind
    integer = kind in "iu"
    if _MASK.search(spec.name) and kind in "iubf":
        return lambda rng, shape, dtype: np.ones(shape, dtype)
    if integer and _TOKEN_TYPE.search(spec.name):
        return lambda rng, shape, dtype: np.zeros(shape, dtype)
    if integer and _POSITION.search(spec.name):
        return lambda rng, shape, dtype: np.broadcast_to(np.arange(shape[-1], dtype=dtype), shape).copy()
    if integer and _TOKEN_IDS.search(spec.name):
        return lambda rng, shape, dtype: rng.integers(*TOKEN_ID_RANGE, size=shape).astype(dtype)
    if kind == "f":
        return lambda rng, shape, dtype: rng.random(shape).astype(dtype)
    raise InputError(
        f"no default values for input {spec.name!r} ({spec.dtype}): its role is not recognised by name and dtype; "
        "pass --calibration-data (an .npz keyed by input name or a QNN input list)"
    )


def describe_inputs(samples: Sequence[Sample], source: str | os.PathLike[str] | None = None) -> str:
    """The summary's account of which inputs were used: ``"random:8"`` or ``"<file>:<count>"``.

    Parameters
    ----------
    samples
        The samples used.
    source
        The data file they came from, or None for the seeded defaults.
    """
    return f"{'random' if source is None else os.fspath(source)}:{len(samples)}"


def resolve_inputs(
    model: ModelSource,
    data_path: str | os.PathLike[str] | None = None,
    *,
    purpose: str = "calibration",
    count: int = DEFAULT_COUNT,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
) -> tuple[list[Sample], str]:
    """Samples from ``data_path`` if given, else the seeded defaults; with their :func:`describe_inputs` string.

    Parameters
    ----------
    model
        A ModelProto or the path of an ONNX file.
    data_path
        ``--calibration-data`` / ``--inputs``: an .npz or a QNN input list, or None.
    purpose
        ``"calibration"`` or ``"evaluation"`` (picks the seed of the defaults).
    count
        Number of default samples (ignored with a data file).
    input_shapes
        ``{input name: full shape}`` for dynamic dims.
    """
    if data_path is None:
        samples = default_inputs(model, count=count, purpose=purpose, input_shapes=input_shapes)
    else:
        samples = load_calibration_data(data_path, model, input_shapes=input_shapes)
    return samples, describe_inputs(samples, data_path)


# --------------------------------------------------------------------------------------------------- data files


def load_calibration_data(
    path: str | os.PathLike[str],
    model: ModelSource,
    *,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
) -> list[Sample]:
    """Read samples from an ``.npz`` keyed by input name or a QNN input list (formats in the module docstring).

    Parameters
    ----------
    path
        The data file; ``.npz`` by suffix, anything else is read as an input list.
    model
        A ModelProto or the path of an ONNX file: gives the input names, dtypes and shapes.
    input_shapes
        ``{input name: full shape}`` for dynamic dims; input lists need them to size raw files.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such calibration data file")
    specs = input_signature(model)
    if path.suffix.lower() == ".npz":
        return _load_npz(path, specs)
    return _load_input_list(path, specs, resolve_input_shapes(model, input_shapes))


def _load_npz(path: Path, specs: Sequence[InputSpec]) -> list[Sample]:
    # The handle is ours: np.load leaks the file it opens when the archive is corrupt.
    with path.open("rb") as handle:
        try:
            archive = np.load(handle, allow_pickle=False)
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
            raise InputError(f"{path}: not a readable .npz archive ({error})") from None
        if isinstance(archive, np.ndarray):
            raise InputError(f"{path}: an .npy array, not an .npz archive keyed by input name")
        with archive:
            names = {spec.name for spec in specs}
            extra = sorted(set(archive.files) - names)
            missing = sorted(names - set(archive.files))
            if extra or missing:
                raise InputError(
                    f"{path}: keys must be the model's inputs {sorted(names)}; missing {missing}, unknown {extra}"
                )
            stacks = {spec.name: _npz_stack(path, archive, spec) for spec in specs}
    counts = {name: len(stack) for name, stack in stacks.items()}
    if len(set(counts.values())) != 1:
        raise InputError(f"{path}: inputs hold different numbers of samples: {counts}")
    count = next(iter(counts.values()))
    if count == 0:
        raise InputError(f"{path}: holds no samples")
    return [{name: stack[index] for name, stack in stacks.items()} for index in range(count)]


def _npz_stack(path: Path, archive: np.lib.npyio.NpzFile, spec: InputSpec) -> np.ndarray:
    """The samples of one input as a stack along a leading axis, in the input's dtype."""
    try:
        array = archive[spec.name]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise InputError(f"{path}: entry {spec.name!r} is unreadable ({error})") from None
    if spec.dims is None or array.ndim == len(spec.dims):
        array = array[np.newaxis]
    elif array.ndim != len(spec.dims) + 1:
        raise InputError(
            f"{path}: entry {spec.name!r} has shape {array.shape}; input {spec.name!r} has rank {len(spec.dims)} "
            f"(one sample) or rank {len(spec.dims) + 1} (a stack of samples)"
        )
    if spec.dims is not None:
        for declared, given in zip(spec.dims, array.shape[1:], strict=True):
            if isinstance(declared, int) and declared != given:
                raise InputError(f"{path}: entry {spec.name!r} has sample shape {array.shape[1:]}, model wants {list(spec.dims)}")
    if array.dtype != spec.dtype:
        if not np.can_cast(array.dtype, spec.dtype, casting="same_kind"):
            raise InputError(f"{path}: entry {spec.name!r} is {array.dtype}; input {spec.name!r} is {spec.dtype}")
        array = array.astype(spec.dtype)
    return np.ascontiguousarray(array)


def _load_input_list(path: Path, specs: Sequence[InputSpec], shapes: Mapping[str, tuple[int, ...]]) -> list[Sample]:
    by_name = {spec.name: spec for spec in specs}
    samples = []
    with path.open(encoding="utf-8", errors="replace") as handle:
        for line_number, line in enumerate(handle, start=1):
            entries = line.split()
            if not entries or entries[0].startswith("#"):
                continue
            where = f"{path}:{line_number}"
            sample: Sample = {}
            for entry in entries:
                name, sep, raw = entry.partition(":=")
                if not sep or not name or not raw:
                    raise InputError(f"{where}: malformed entry {entry!r}; expected input_name:=path/to/file.raw")
                if name not in by_name:
                    raise InputError(f"{where}: unknown input {name!r}; the model's inputs are {sorted(by_name)}")
                if name in sample:
                    raise InputError(f"{where}: input {name!r} appears twice")
                sample[name] = _read_raw(where, path.parent / raw, by_name[name], shapes[name])
            missing = sorted(set(by_name) - set(sample))
            if missing:
                raise InputError(f"{where}: no file for inputs {missing}")
            samples.append(sample)
    if not samples:
        raise InputError(f"{path}: the input list holds no samples")
    return samples


def _read_raw(where: str, raw: Path, spec: InputSpec, shape: tuple[int, ...]) -> np.ndarray:
    expected = int(np.prod(shape)) * spec.dtype.itemsize
    try:
        size = raw.stat().st_size
    except OSError:
        raise InputError(f"{where}: no such raw file {raw}") from None
    if not raw.is_file() or size != expected:
        raise InputError(
            f"{where}: {raw} holds {size} bytes; input {spec.name!r} as {spec.dtype}{list(shape)} needs {expected} "
            "(dynamic dims: see --input-shape)"
        )
    return np.fromfile(raw, dtype=spec.dtype).reshape(shape)


def write_input_list(
    samples: Sequence[Sample], folder: str | os.PathLike[str], *, list_name: str = "input_list.txt",
    file_prefix: str = "",
) -> Path:
    """Write samples as raw files plus a QNN input list (paths relative to ``folder``); returns the list's path.

    Every file is written atomically and the list last, so a list never names a missing file.

    Parameters
    ----------
    samples
        Samples whose arrays already have the model's dtypes (as :func:`resolve_inputs` returns them).
    folder
        Output folder (created if needed).
    list_name
        File name of the input list inside ``folder``.
    file_prefix
        Prefix of the raw files' names, so that several models' lists can share one folder (qnn-net-run
        reads relative paths from its working folder, one for all the lists it is given).
    """
    folder = Path(folder)
    lines = []
    for index, sample in enumerate(samples):
        entries = []
        for position, (name, array) in enumerate(sample.items()):
            if not name or any(char.isspace() for char in name) or ":=" in name:
                raise InputError(f"input name {name!r} cannot appear in a QNN input list (spaces or ':=')")
            raw_name = f"{file_prefix}sample{index:04d}_input{position}_{re.sub(r'[^A-Za-z0-9._-]', '_', name)}.raw"
            atomic_write_bytes(folder / raw_name, np.ascontiguousarray(array).tobytes())
            entries.append(f"{name}:={raw_name}")
        lines.append(" ".join(entries) + "\n")
    target = folder / list_name
    atomic_write_text(target, "".join(lines))
    return target


# ----------------------------------------------------------------------------------------- onnxruntime on CPU


@contextlib.contextmanager
def cpu_session(
    model: ModelSource | bytes,
    *,
    extra_outputs: Sequence[str] = (),
    model_dir: str | os.PathLike[str] | None = None,
    options: ort.SessionOptions | None = None,
) -> Iterator[ort.InferenceSession]:
    """An onnxruntime CPU session, optionally exposing main-graph tensors as extra outputs.

    The model is never copied in memory: a path is read without its external data (onnxruntime reads the
    weights from the model's folder), and a ModelProto carries the extra outputs only while it is serialized.
    A ModelProto too big for protobuf (2 GiB, so its weights are inline) is written with external data to a
    temporary folder for onnxruntime instead, and left as it was.

    Parameters
    ----------
    model
        Path of an ONNX file, its bytes, or a ModelProto.
    extra_outputs
        Names of main-graph tensors to add as graph outputs (those already outputs are skipped).
    model_dir
        Folder that a ModelProto's or bytes' external data locations are relative to; a path's own folder
        is used for a path.
    options
        Session options (default :func:`exact_cpu_options`); a ModelProto's external-data folder is added.
    """
    options = options or exact_cpu_options()
    if isinstance(model, bytes) and extra_outputs:
        model = onnx.load_from_string(model)
    elif not isinstance(model, (bytes, onnx.ModelProto)):
        if not Path(model).is_file():
            raise InputError(f"{model}: no such model file")
        if not extra_outputs:
            with _ort_errors_as_input_errors(model):
                session = ort.InferenceSession(os.fspath(model), options, providers=["CPUExecutionProvider"])
            yield session
            return
        model, model_dir = load_model(model), Path(model).parent
    with contextlib.ExitStack() as stack:
        source = model if isinstance(model, bytes) else _serialized(model, extra_outputs, model_dir, stack)
        if model_dir is not None and isinstance(source, bytes):
            options.add_session_config_entry(_EXTERNAL_FOLDER_KEY, os.fspath(Path(model_dir).resolve()))
        with _ort_errors_as_input_errors("model"):
            session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        del source
        yield session


def exact_cpu_options() -> ort.SessionOptions:
    """CPU session options under which a QDQ model computes exactly what its nodes say.

    onnxruntime's CPU provider otherwise replaces QDQ node groups by its own integer kernels, which are not
    what the model (or the QNN HTP) computes: it fuses DequantizeLinear + MatMul into MatMulNBits with int8
    activations (about 1.2 dB of output SQNR on MiniLM), and its QLinearSoftmax returned 0 for the larger of
    two class probabilities on PP-OCR's classifier. With QDQ fusion off, every Q and DQ runs as written.
    """
    options = ort.SessionOptions()
    options.add_session_config_entry("session.disable_quant_qdq", "1")
    return options


def _serialized(
    model: onnx.ModelProto, extra_outputs: Sequence[str], model_dir: str | os.PathLike[str] | None,
    stack: contextlib.ExitStack,
) -> bytes | str:
    """``model`` plus the extra outputs as bytes, or as a temporary file when protobuf cannot hold it (the
    model's tensors stay as they were: save_model puts back what it moves into the data file)."""
    outputs = model.graph.output
    kept = len(outputs)
    present = {value.name for value in outputs}
    outputs.extend(onnx.ValueInfoProto(name=name) for name in dict.fromkeys(extra_outputs) if name not in present)
    try:
        # ByteSize() costs a whole serialization in upb: judge by the tensor payload, which dominates, and
        # serialize once; protobuf refuses (ValueError) what still passes 2 GiB.
        if sum(len(tensor.raw_data) for _, tensor in iter_tensors(model)) <= PROTOBUF_LIMIT // 2:
            with contextlib.suppress(ValueError):
                return model.SerializeToString()
        target = Path(stack.enter_context(tempfile.TemporaryDirectory())) / "model.onnx"
        save_model(model, target, external_data=True, model_dir=model_dir)
        return os.fspath(target)
    finally:
        del outputs[kept:]


@contextlib.contextmanager
def _ort_errors_as_input_errors(what: object) -> Iterator[None]:
    """A model onnxruntime refuses to load is bad input (exit status 2), with onnxruntime's reason."""
    try:
        yield
    except (ort_errors.InvalidGraph, ort_errors.InvalidProtobuf, ort_errors.NoSuchFile, ort_errors.Fail,
            ort_errors.NotImplemented, ort_errors.InvalidArgument) as error:
        raise InputError(f"{what}: onnxruntime cannot load it: {str(error).splitlines()[0]}") from None


def run_session(
    session: ort.InferenceSession, samples: Sequence[Sample], output_names: Sequence[str] | None = None
) -> list[Sample]:
    """Run ``session`` on every sample; returns one ``{output name: array}`` per sample.

    Parameters
    ----------
    session
        Any onnxruntime session (CPU or QNN HTP).
    samples
        ``{input name: array}`` per run; every model input must be present and no other name.
    output_names
        Outputs to fetch; all graph outputs when None.
    """
    names = list(output_names) if output_names is not None else [output.name for output in session.get_outputs()]
    return [dict(zip(names, outputs, strict=True)) for outputs in _run_each(session, samples, names)]


def _run_each(session: ort.InferenceSession, samples: Sequence[Sample], names: Sequence[str]) -> Iterator[list]:
    expected = {value.name for value in session.get_inputs()}
    for index, sample in enumerate(samples):
        if set(sample) != expected:
            raise InputError(
                f"sample {index}: inputs {sorted(sample)} do not match the model's {sorted(expected)}"
            )
        try:
            yield session.run(names, sample)
        except ort_errors.InvalidArgument as error:
            raise InputError(f"sample {index}: {str(error).splitlines()[0]}") from None


def run_model(
    model: ModelSource | bytes,
    samples: Sequence[Sample],
    output_names: Sequence[str] | None = None,
    *,
    model_dir: str | os.PathLike[str] | None = None,
) -> list[Sample]:
    """Run a model on onnxruntime's CPU provider (one session for all samples).

    Parameters
    ----------
    model
        Path of an ONNX file, its bytes, or a ModelProto.
    samples
        ``{input name: array}`` per run.
    output_names
        Outputs to fetch; all graph outputs when None.
    model_dir
        Folder of the external data of a ModelProto or bytes (see :func:`cpu_session`).
    """
    with cpu_session(model, model_dir=model_dir) as session:
        return run_session(session, samples, output_names)


# ------------------------------------------------------------------------------------- activation statistics


def collect_activation_ranges(
    model: ModelSource,
    samples: Sequence[Sample],
    tensor_names: Sequence[str] | None = None,
    *,
    method: str = "minmax",
    bits: int = 8,
    percentile: float = 99.99,
    symmetric: bool = False,
    model_dir: str | os.PathLike[str] | None = None,
    on_activation: Callable[[str, np.ndarray], None] | None = None,
) -> dict[str, tuple[float, float]]:
    """Calibrated ``(min, max)`` of float activations over the samples, each range widened to include 0.

    Parameters
    ----------
    model
        A ModelProto or the path of an ONNX file (external data stays on disk).
    samples
        Calibration samples, ``{input name: array}`` each; streamed one at a time.
    tensor_names
        Main-graph tensors to measure: node outputs or graph inputs of a float type. Default: every float
        tensor a node produces (``Constant`` outputs are weights, not activations) plus every float graph input.
    method
        ``"minmax"``: observed extremes. ``"percentile"``: the ``100 - percentile`` and ``percentile``
        percentiles (of ``|x|`` when symmetric). ``"mse"``: the clipping range that minimises the expected
        quantization error on the histogram at ``bits``: clipped values cost their distance to the range
        squared, values inside cost ``scale**2 / 12`` (uniform rounding noise); searched over histogram
        edges by coordinate descent from the min/max range, so it is never worse than min/max in that measure.
    bits
        Activation bit width, 8 or 16 (used by ``"mse"``).
    percentile
        For ``"percentile"``: in (50, 100].
    symmetric
        Ranges symmetric about 0: ``(-t, t)``.
    model_dir
        Folder of a ModelProto's external data (see :func:`cpu_session`).
    on_activation
        Called as ``(tensor name, values)`` for every measured tensor of every sample, once: other
        statistics (GPTQ's Gram matrices) share this onnxruntime pass.

    Returns
    -------
    dict
        ``{tensor name: (min, max)}`` as Python floats with ``min <= 0 <= max``. Non-finite values are ignored;
        a tensor with no finite value gets ``(0.0, 0.0)``.
    """
    if method not in ACTIVATION_METHODS:
        raise InputError(f"--activation-method must be one of {', '.join(ACTIVATION_METHODS)}, not {method!r}")
    if bits not in ACTIVATION_BITS:
        raise InputError(f"--activation-bits must be 8 or 16, not {bits}")
    if not 50.0 < percentile <= 100.0:
        raise InputError(f"percentile must lie in (50, 100], not {percentile}")
    if not isinstance(model, onnx.ModelProto):
        model, model_dir = load_model(model), Path(model).parent
    fed_inputs, produced = _activation_tensors(model, tensor_names)
    with cpu_session(model, extra_outputs=produced, model_dir=model_dir) as session:
        types = {output.name: output.type for output in session.get_outputs()}
        outputs = [name for name in produced if types.get(name) in FLOAT_TENSOR_TYPES]
        if tensor_names is not None and len(outputs) < len(produced):
            raise InputError(f"not float tensors: {sorted(set(produced) - set(outputs))}")

        def activations() -> Iterator[tuple[str, np.ndarray]]:
            for index, values in enumerate(_run_each(session, samples, outputs)):
                yield from ((name, samples[index][name]) for name in fed_inputs)
                yield from zip(outputs, values, strict=True)

        stats = {name: _TensorStats() for name in [*fed_inputs, *outputs]}
        for name, values in activations():
            stats[name].observe(values)
            if on_activation is not None:
                on_activation(name, values)
        if method != "minmax":
            for stat in stats.values():
                stat.start_histogram(symmetric)
            for name, values in activations():
                stats[name].accumulate(values)
    return {name: stat.calibrated_range(method, bits, percentile, symmetric) for name, stat in stats.items()}


def _activation_tensors(model: onnx.ModelProto, tensor_names: Sequence[str] | None) -> tuple[list[str], list[str]]:
    """(float graph inputs read from the samples, node outputs to expose) for the requested tensors."""
    graph = model.graph
    float_inputs = [spec.name for spec in input_signature(model) if spec.dtype.kind == "f"]
    if tensor_names is None:
        produced = [name for node in graph.node if node.op_type != "Constant" for name in node.output if name]
        return float_inputs, list(dict.fromkeys(produced))
    inputs = {spec.name for spec in input_signature(model)}
    node_outputs = {name for node in graph.node for name in node.output if name}
    weights = {tensor.name for tensor in graph.initializer}
    fed, produced = [], []
    for name in dict.fromkeys(tensor_names):
        if name in inputs:
            if name not in float_inputs:
                raise InputError(f"graph input {name!r} is not a float tensor")
            fed.append(name)
        elif name in node_outputs:
            produced.append(name)
        elif name in weights:
            raise InputError(f"{name!r} is a weight (initializer), not an activation")
        else:
            raise InputError(f"{name!r} is not a main-graph tensor (subgraph tensors cannot be exposed as outputs)")
    return fed, produced


class _TensorStats:
    """Running min/max of one tensor over samples, then (second pass) a histogram over that exact range."""

    def __init__(self) -> None:
        self.low = np.inf
        self.high = -np.inf
        self.has_non_finite = False
        self.symmetric = False
        self.counts: np.ndarray | None = None

    def observe(self, values: np.ndarray) -> None:
        if values.size == 0:
            return
        low, high = float(values.min()), float(values.max())
        if not (np.isfinite(low) and np.isfinite(high)):
            self.has_non_finite = True
            values = values[np.isfinite(values)]
            if values.size == 0:
                return
            low, high = float(values.min()), float(values.max())
        self.low, self.high = min(self.low, low), max(self.high, high)

    def start_histogram(self, symmetric: bool) -> None:
        if self.low > self.high:  # nothing finite observed
            return
        if symmetric:
            self.low, self.high = 0.0, max(-self.low, self.high)
        self.symmetric = symmetric
        self.counts = np.zeros(HISTOGRAM_BINS, dtype=np.int64)

    def accumulate(self, values: np.ndarray) -> None:
        if self.counts is None or values.size == 0:
            return
        values = values.ravel()
        if self.has_non_finite:
            values = values[np.isfinite(values)]
        if self.symmetric:
            values = np.abs(values)
        span = self.high - self.low
        if span == 0.0:
            self.counts[0] += values.size
            return
        # float32 arithmetic is 3x faster than float64; values >= low keeps positions >= 0 after rounding.
        work = np.float32 if values.dtype.itemsize <= 4 and np.isfinite(np.float32(span)) else np.float64
        positions = np.subtract(values, work(self.low), dtype=work)
        positions *= work(HISTOGRAM_BINS / span)
        bins = positions.astype(np.intp)
        np.minimum(bins, HISTOGRAM_BINS - 1, out=bins)
        self.counts += np.bincount(bins, minlength=HISTOGRAM_BINS)

    def calibrated_range(self, method: str, bits: int, percentile: float, symmetric: bool) -> tuple[float, float]:
        if self.low > self.high:
            return 0.0, 0.0
        if method == "minmax" or self.counts is None or self.low == self.high:
            low, high = (-max(-self.low, self.high), max(-self.low, self.high)) if symmetric else (self.low, self.high)
        elif method == "percentile":
            high = _histogram_quantile(self.counts, self.low, self.high, percentile / 100.0)
            low = -high if symmetric else _histogram_quantile(self.counts, self.low, self.high, 1.0 - percentile / 100.0)
        else:
            low, high = _mse_range(self.counts, self.low, self.high, bits, symmetric)
        return float(min(low, 0.0)), float(max(high, 0.0))


def _histogram_quantile(counts: np.ndarray, low: float, high: float, quantile: float) -> float:
    """The ``quantile`` of histogrammed data, interpolating linearly inside the bin where it falls."""
    cumulative = np.cumsum(counts)
    target = quantile * cumulative[-1]
    index = min(int(np.searchsorted(cumulative, target, side="left")), len(counts) - 1)
    before = cumulative[index - 1] if index else 0
    inside = (target - before) / counts[index] if counts[index] else 0.0
    width = (high - low) / len(counts)
    return low + (index + inside) * width


def _mse_range(counts: np.ndarray, low: float, high: float, bits: int, symmetric: bool) -> tuple[float, float]:
    """The clipping range minimising the histogram's expected quantization MSE at ``bits``.

    Candidates are histogram edges, so every bin lies wholly inside or outside the range; a bin's values are
    taken as uniform over the bin. A clipped bin costs ``count * ((center - edge)**2 + width**2 / 12)``, an
    inside value ``scale**2 / 12``. For a symmetric histogram of ``|x|`` over [0, high] the range is (-t, t);
    otherwise [a, b] with a <= 0 <= b, found by coordinate descent from the min/max range (each step lowers
    the cost or stops).
    """
    levels = 2**bits - 1
    bins = len(counts)
    width = (high - low) / bins
    edges = low + np.arange(bins + 1) * width
    centers = edges[:-1] + 0.5 * width
    weights = counts.astype(np.float64)
    # Prefix sums over bins of c, c*x, c*x^2: the clip cost of the bins before edge k is, with a = edges[k],
    # a^2 C[k] - 2 a S[k] + Q[k] + C[k] w^2/12, one O(1) formula per candidate edge.
    count_sum = np.concatenate([[0.0], np.cumsum(weights)])
    first_sum = np.concatenate([[0.0], np.cumsum(weights * centers)])
    second_sum = np.concatenate([[0.0], np.cumsum(weights * centers * centers)])
    total, spread = count_sum[-1], width * width / 12.0

    def cost(k: np.ndarray, j: np.ndarray) -> np.ndarray:
        """Expected squared error of the range [edges[k], edges[j]], for arrays of edge indices k <= j."""
        a, b = edges[k], edges[j]
        n_low, n_high = count_sum[k], total - count_sum[j]
        clip_low = a * a * n_low - 2 * a * first_sum[k] + second_sum[k]
        clip_high = b * b * n_high - 2 * b * (first_sum[-1] - first_sum[j]) + (second_sum[-1] - second_sum[j])
        # A symmetric range spans (-b, b): the |x| histogram's lower edge 0 is not its lower bound.
        step = (2.0 * b if symmetric else np.maximum(b, 0.0) - np.minimum(a, 0.0)) / levels
        inside = total - n_low - n_high
        return np.maximum(clip_low, 0.0) + np.maximum(clip_high, 0.0) + (n_low + n_high) * spread + inside * step * step / 12

    if symmetric:
        tops = np.arange(1, bins + 1)
        best = edges[tops[int(np.argmin(cost(np.zeros_like(tops), tops)))]]
        return -best, best
    # Lower bounds are edges at or below 0, upper bounds edges at or above 0. A histogram on one side of 0
    # keeps the bound on the other side at its outer edge, which the range then widens to 0.
    lows = np.flatnonzero(edges <= 0.0) if low < 0 else np.zeros(1, np.intp)
    highs = np.flatnonzero(edges >= 0.0) if high > 0 else np.full(1, bins, np.intp)
    k, j = int(lows[0]), int(highs[-1])  # start from min/max
    for _ in range(64):
        j_next = int(highs[np.argmin(cost(np.full_like(highs, k), highs))])
        k_next = int(lows[np.argmin(cost(lows, np.full_like(lows, j_next)))])
        if (k_next, j_next) == (k, j):
            break
        k, j = k_next, j_next
    return min(float(edges[k]), 0.0), max(float(edges[j]), 0.0)
