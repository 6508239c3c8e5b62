"""``pyqshare prepare``: make a model QNN-ready (static shapes, folded shape computations) and report placement.

QNN compiles static graphs only: a model exported with dynamic axes puts almost nothing on the HTP
(measured on MiniLM: 46 of 297 nodes, shape arithmetic only, in 8 partitions; every weight on the CPU).
Fixing the dims is what moves the model onto the HTP; folding the shape computations
(``Shape -> Gather -> Concat -> Reshape``) then makes the file itself static, every tensor with its shape,
for the tools that read the file rather than a session (quantizers, QNN converters). onnxruntime 1.31 folds
them too when it loads a fixed-shape model, so for the float MiniLM the placement is the same with or
without the offline fold (../shared/QNN_NOTES.md measured a setup where it was not). :func:`prepare_model`

1. fixes every dynamic input dim: ``input_shapes`` first, then the defaults by dim name (batch 1,
   sequence 128: :func:`pyqshare.shapes.resolve_input_shapes`); any other dynamic dim is an
   :class:`~pyqshare.errors.InputError` that names it;
2. folds shape computations into constants: ``Shape``/``Size`` of a tensor whose shape is now static, and
   any node whose inputs are all constants that are not weights, repeated with ONNX shape inference until
   nothing changes. Weights (tensors of 64 or more elements in the input) and the nodes that consume them
   are never touched, nor are ``Q``/``DQ`` nodes, random ops, control flow and nodes inside subgraphs;
   a folded tensor larger than :data:`MAX_FOLDED_BYTES` stays computed at run time;
3. names unnamed nodes (logs and placement reports identify nodes by name), infers every shape, checks the
   result with ``onnx.checker`` and writes it atomically (:func:`pyqshare.model.save_model`), with external
   data when the input had it or the model would pass the 2 GiB protobuf limit;
4. reports the QNN HTP placement (:func:`pyqshare.qnn.placement.placement_report`) of the prepared model and
   of the original, so the report shows what preparing bought.

The folding is pyqshare's own rather than onnxruntime's offline basic optimization: that one also rewrites
weights (it folds ``Transpose`` of a weight into a second copy, fuses ``MatMul + Add`` into ``Gemm`` with
extra ``Reshape`` nodes) and stamps eight onnxruntime opset domains into the model.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from pyqshare.errors import InputError
from pyqshare.model import (
    WEIGHT_MIN_ELEMENTS,
    external_data_path,
    external_tensors,
    iter_graphs,
    iter_nodes,
    load_model,
    name_nodes_uniquely,
    save_model,
    weight_sizes,
)
from pyqshare.model.external import inline_external, resolve_external
from pyqshare.qnn.placement import placement_report
from pyqshare.qnn.rewrites import constants_second, fuse_gelu
from pyqshare.quantization.folding import fold_batch_norms
from pyqshare.shapes import declared_dims, parse_input_shapes, resolve_input_shapes, runtime_inputs

MAX_FOLDED_BYTES = 1 << 20
PLACEMENT_CHOICES = ("both", "prepared", "none")

_NEVER_FOLD = frozenset({
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear",  # QDQ structure is what QNN reads
    "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli",
    "If", "Loop", "Scan",
})


def _fix_dims(model: onnx.ModelProto, shapes: Mapping[str, Sequence[int]]) -> dict[str, int]:
    """Write the static input shapes, give the dim names they bind their value everywhere and drop stale
    main-graph value_info; returns the value of each dim name."""
    dims: dict[str, int] = {}
    for value in runtime_inputs(model.graph):
        for dim, size in zip(value.type.tensor_type.shape.dim, shapes[value.name], strict=True):
            if dim.dim_param:
                dims[dim.dim_param] = size
            dim.dim_value = size
    for _, graph in iter_graphs(model):
        for value in [*graph.input, *graph.output, *graph.value_info]:
            for dim in value.type.tensor_type.shape.dim:
                if dim.dim_param in dims:
                    dim.dim_value = dims[dim.dim_param]
                elif (dim.HasField("dim_value") and dim.dim_value <= 0) or dim.dim_param == "?":
                    dim.Clear()  # paddle2onnx's -1 and "?" mean "unknown": let shape inference fill them in
    del model.graph.value_info[:]
    return dims


def _infer(model: onnx.ModelProto) -> onnx.ModelProto:
    try:
        return onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    except onnx.shape_inference.InferenceError as error:
        first = str(error).strip().splitlines()[0]
        raise InputError(f"shape inference fails with these input shapes (see --input-shape): {first}") from None


def _static_shapes(graph: onnx.GraphProto) -> dict[str, tuple[int, ...]]:
    shapes = {tensor.name: tuple(tensor.dims) for tensor in graph.initializer}
    for value in [*graph.input, *graph.output, *graph.value_info]:
        shape = declared_dims(value)
        if shape is not None and all(isinstance(dim, int) for dim in shape):
            shapes[value.name] = shape
    return shapes


def _shape_node_value(node: onnx.NodeProto, shape: tuple[int, ...]) -> np.ndarray:
    if node.op_type == "Size":
        return np.array(math.prod(shape), dtype=np.int64)
    attributes = {attribute.name: attribute.i for attribute in node.attribute}
    start, end = attributes.get("start", 0), attributes.get("end", len(shape))
    return np.array(shape[slice(start, end)], dtype=np.int64)


def _evaluate(
    node: onnx.NodeProto, values: Mapping[str, np.ndarray], model: onnx.ModelProto
) -> list[np.ndarray] | None:
    """The node's outputs computed by the ONNX reference implementation, or None if it cannot compute them."""
    names = list(dict.fromkeys(name for name in node.input if name))
    inputs = [
        helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(values[name].dtype), values[name].shape)
        for name in names
    ]
    outputs = [helper.make_empty_tensor_value_info(name) for name in node.output if name]
    single = helper.make_model(helper.make_graph([node], "fold", inputs, outputs), opset_imports=model.opset_import)
    single.ir_version = model.ir_version
    try:
        results = ReferenceEvaluator(single).run(None, {name: values[name] for name in names})
    except Exception:  # noqa: BLE001  (an op the reference cannot run simply stays in the graph)
        return None
    if not all(isinstance(result, np.ndarray | np.generic) for result in results):
        return None  # sequences and optionals are not tensors
    return [np.asarray(result) for result in results]


def _foldable(node: onnx.NodeProto, keep: set[str]) -> bool:
    """Whether the node may be replaced by constants: a standard, deterministic op without subgraphs that
    produces none of the names in ``keep`` (graph outputs and weights)."""
    return (
        node.domain in ("", "ai.onnx")
        and node.op_type not in _NEVER_FOLD
        and not keep.intersection(node.output)
        and not any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)
    )


def _folded_value(
    node: onnx.NodeProto,
    values: Mapping[str, np.ndarray],
    shapes: Mapping[str, tuple[int, ...]],
    model: onnx.ModelProto,
) -> list[np.ndarray] | None:
    """The node's outputs if they are known before run time (from constants or static shapes), else None."""
    inputs = [name for name in node.input if name]
    if node.op_type in ("Shape", "Size") and inputs[0] in shapes:
        return [_shape_node_value(node, shapes[inputs[0]])]
    if all(name in values for name in inputs):  # weights and run-time values are never in `values`
        return _evaluate(node, values, model)
    return None


def _used_names(model: onnx.ModelProto) -> set[str]:
    """Every value a node reads (subgraphs included: they may read outer values) plus the graph outputs."""
    used = {name for node in iter_nodes(model) for name in node.input if name}
    return used | {value.name for value in model.graph.output}


def _replace_by_constants(
    model: onnx.ModelProto, folded: list[int], values: Mapping[str, np.ndarray], keep: set[str]
) -> None:
    """Remove the folded nodes, store their outputs that are still read as initializers, and drop the
    constants (initializers, ``Constant`` nodes) that only folded nodes read, except names in ``keep``."""
    graph = model.graph
    used_before = _used_names(model)
    folded_outputs = [name for index in folded for name in graph.node[index].output if name]
    for index in reversed(folded):
        del graph.node[index]
    used = _used_names(model)
    graph.initializer.extend(numpy_helper.from_array(values[name], name) for name in folded_outputs if name in used)
    orphaned = used_before - used - keep
    for index in reversed(range(len(graph.initializer))):
        if graph.initializer[index].name in orphaned:
            del graph.initializer[index]
    for index in reversed(range(len(graph.node))):
        node = graph.node[index]
        if node.op_type == "Constant" and not node.domain and node.output[0] in orphaned:
            del graph.node[index]


def _fold_once(model: onnx.ModelProto, weights: set[str]) -> int:
    """One folding sweep over the main graph in node order; returns the number of nodes folded."""
    graph = model.graph
    shapes = _static_shapes(_infer(model).graph)
    runtime = {value.name for value in graph.input}  # an initializer listed as input can be overridden
    keep = weights | runtime | {value.name for value in graph.output}
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer if t.name not in keep}
    folded: list[int] = []
    for index, node in enumerate(graph.node):
        if not _foldable(node, keep):
            continue
        results = _folded_value(node, values, shapes, model)
        if results is None or sum(result.nbytes for result in results) > MAX_FOLDED_BYTES:
            continue
        values.update(zip([name for name in node.output if name], results))
        if node.op_type != "Constant":  # Constant nodes only lend their values; they go if left unused
            folded.append(index)
    if folded:
        _replace_by_constants(model, folded, values, keep)
    return len(folded)


def _inline_small_external(model: onnx.ModelProto, model_dir: Path) -> None:
    """Read external tensors that are not weights into the graph: folding and shape inference need their values."""
    for tensor in external_tensors(model):
        if math.prod(tensor.dims) < WEIGHT_MIN_ELEMENTS:
            inline_external(tensor, model_dir)


def _dynamic_tensors(graph: onnx.GraphProto) -> list[str]:
    """Run-time inputs and node outputs of the main graph whose shape is not fully static."""
    static = _static_shapes(graph)
    produced = [name for node in graph.node for name in node.output if name]
    return [name for name in [value.name for value in runtime_inputs(graph)] + produced if name not in static]


def _check_structure(model: onnx.ModelProto) -> None:
    """``onnx.checker`` on the model; external tensors are checked as empty stand-ins (their bytes are
    copied verbatim, and the checker would otherwise look for the files relative to the working folder)."""
    if not external_tensors(model):
        onnx.checker.check_model(model)
        return
    skeleton = onnx.ModelProto()
    skeleton.CopyFrom(model)  # cheap: external tensors hold no bytes
    for tensor in external_tensors(skeleton):
        del tensor.external_data[:]
        del tensor.dims[:]
        tensor.dims.append(0)
        tensor.data_location = onnx.TensorProto.DEFAULT
    onnx.checker.check_model(skeleton)


def _make_static(model: onnx.ModelProto, source: Path, input_shapes: Mapping[str, Sequence[int]]) -> tuple[dict, int]:
    """Fix the input dims, fold until nothing changes, fold BatchNorms into their layers, fuse erf-GELU, put
    Add/Mul constants second (:func:`~pyqshare.qnn.rewrites.constants_second`) and record every inferred shape
    in the model.

    Returns the value chosen per dim name and the number of folded nodes.
    """
    weights = set(weight_sizes(model))
    _inline_small_external(model, source.parent)
    dims = _fix_dims(model, resolve_input_shapes(model, input_shapes))
    folded = 0
    while swept := _fold_once(model, weights):
        folded += swept
    # QNN runs Conv+BatchNorm as one Conv; quantizing BN's mean and variance separately ruins 8-bit models.
    fold_batch_norms(model, source.parent)
    fuse_gelu(model)
    constants_second(model)
    inferred = _infer(model)
    model.graph.value_info.extend(inferred.graph.value_info)
    for value, typed in zip(model.graph.output, inferred.graph.output, strict=True):
        value.type.CopyFrom(typed.type)
    return dims, folded


def _write_prepared(model: onnx.ModelProto, source: Path, target: Path) -> list[Path]:
    """Check the model and write it atomically, with external data beside it when the input had some (copied
    in chunks, never loaded whole) or when it would pass protobuf's 2 GiB; returns the files written."""
    _check_structure(model)
    external = external_tensors(model)
    data_path = external_data_path(target)
    if any(resolve_external(tensor, source.parent).path == data_path.resolve() for tensor in external):
        raise InputError(f"--output-path: its external data file {data_path} is the input's own data file")
    return save_model(model, target, external_data=True if external else "auto", model_dir=source.parent)


def _as_list(dims: tuple | None) -> list | None:
    return None if dims is None else list(dims)


def _model_summary(model: onnx.ModelProto) -> dict:
    return {
        "nodes": sum(1 for _ in iter_nodes(model)),
        "weight_bytes": sum(weight_sizes(model).values()),
        "input_shapes": {value.name: _as_list(declared_dims(value)) for value in runtime_inputs(model.graph)},
    }


def _placement_or_note(path: Path, provider_options: Mapping[str, object] | None) -> dict:
    """The placement report, or None and the reason (QNN missing, or no session could be created)."""
    try:
        return {"placement": placement_report(path, provider_options).to_dict()}
    except RuntimeError as error:  # QnnUnavailableError included
        return {"placement": None, "placement_note": str(error)}


def prepare_model(
    model_path: str | os.PathLike[str],
    output_path: str | os.PathLike[str],
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    *,
    placement: str = "both",
    provider_options: Mapping[str, object] | None = None,
) -> dict:
    """Fix dynamic dims, fold shape computations, write the QNN-ready model and report placement.

    Parameters
    ----------
    model_path : str or os.PathLike
        The ONNX model (external data, if any, in its folder). It is never modified.
    output_path : str or os.PathLike
        Where the prepared model goes (written atomically; external data, if any, beside it as
        ``<name>.data``). Must differ from ``model_path``.
    input_shapes : Mapping[str, Sequence[int]], optional
        Static shapes by input name; other inputs take the defaults of :data:`pyqshare.shapes.DEFAULT_DIMS`.
    placement : {"both", "prepared", "none"}
        Which models get a QNN HTP placement report (each opens a real HTP session).
    provider_options : Mapping[str, object], optional
        QNN provider options for the placement sessions (see :func:`pyqshare.qnn.ep.htp_provider_options`).

    Returns
    -------
    dict
        ``model``, ``output``, ``size_bytes`` (output on disk), ``external_data`` (file name or None),
        ``dims`` (value chosen per dim name), ``folded_nodes``, ``renamed_nodes``, ``static_shapes``,
        ``dynamic_tensors``, and for ``original`` and ``prepared``: ``nodes``, ``weight_bytes``,
        ``input_shapes`` and ``placement`` (``htp_nodes, cpu_nodes, partitions, htp_weight_bytes,
        cpu_weight_bytes, cpu_ops, fallback_reasons``; None with a ``placement_note`` when QNN is missing
        or no session could be created). The written model keeps the input's opsets (raised to 20 when a
        GELU is fused) and IR version, raised as far as those opsets need and never above what onnxruntime
        reads (:func:`pyqshare.model.supported_ir_version`).
    """
    if placement not in PLACEMENT_CHOICES:
        raise InputError(f"--placement {placement!r}: choose one of {', '.join(PLACEMENT_CHOICES)}")
    source, target = Path(model_path), Path(output_path)
    try:
        model = load_model(source)
    except InputError as error:
        raise InputError(f"--model-path: {error}") from None
    if target.resolve() == source.resolve():
        raise InputError("--output-path: must differ from --model-path (the input is never overwritten)")
    try:
        onnx.checker.check_model(str(source))
    except onnx.checker.ValidationError as error:
        raise InputError(f"--model-path: {source} fails onnx.checker: {str(error).splitlines()[0]}") from None
    original = _model_summary(model)
    dims, folded = _make_static(model, source, input_shapes or {})
    renamed = name_nodes_uniquely(model)
    dynamic = _dynamic_tensors(model.graph)
    written = _write_prepared(model, source, target)

    report = {
        "model": str(source),
        "output": str(target),
        "size_bytes": sum(path.stat().st_size for path in written),
        "external_data": written[1].name if len(written) > 1 else None,
        "dims": dims,
        "folded_nodes": folded,
        "renamed_nodes": renamed,
        "static_shapes": not dynamic,
        "dynamic_tensors": dynamic,
        "original": original,
        "prepared": _model_summary(model),
    }
    if placement != "none":
        report["prepared"].update(_placement_or_note(target, provider_options))
    if placement == "both":
        report["original"].update(_placement_or_note(source, provider_options))
    return report


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-path", required=True, help="the ONNX model to prepare")
    parser.add_argument("--output-path", required=True, help="where the prepared model goes")
    parser.add_argument(
        "--input-shape", action="append", default=[], metavar="NAME=D1,D2,...",
        help="static shape of one input (repeat per input); otherwise dims named batch take 1 and "
             "sequence/seq_len/... take 128, and any other dynamic dim is an error",
    )
    parser.add_argument(
        "--placement", choices=PLACEMENT_CHOICES, default="both",
        help="which models get a QNN HTP placement report (default: the original and the prepared one)",
    )


def run(args: argparse.Namespace) -> dict:
    return prepare_model(
        args.model_path, args.output_path, parse_input_shapes(args.input_shape), placement=args.placement
    )
