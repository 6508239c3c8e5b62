"""QDQ insertion primitives (opset 21): quantized weights behind DequantizeLinear, activations through
QuantizeLinear -> DequantizeLinear, and int32 biases.

Naming keeps the float model's tensor names meaningful in the quantized one:

* A quantized weight ``w`` becomes the initializers ``w_quantized`` (codes), ``w_scale`` and
  ``w_zero_point``, and a ``DequantizeLinear`` whose output is named ``w`` again: every consumer, in this
  graph or in a subgraph reading it from the outer scope, reads the dequantized weight unchanged.
* An activation ``t`` produced by a node: the producer's output is renamed ``t_float``, and
  ``QuantizeLinear(t_float) -> DequantizeLinear`` produces ``t``. Every consumer reads the quantized value,
  and a graph output keeps its name while being the DequantizeLinear's output (QNN's convention: outputs
  are QDQ'd too). A graph input cannot be renamed, so its consumers are rewired to a new ``t_dequantized``.

Every helper works in subgraphs, and raises the model's opset to 21 first (see
:func:`pyqshare.model.ensure_opset`). Fresh names get a ``_1``, ``_2``... suffix if taken.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from pyqshare.model.graph import NameFactory, declared_type, find_graph, producer_index, readers
from pyqshare.model.opset import ensure_opset
from pyqshare.model.weights import Weight, locate

__all__ = ["QUANTIZED_TYPES", "insert_activation_qdq", "quantize_bias_in_place", "quantize_weight_in_place"]

QUANTIZED_TYPES = {
    TensorProto.INT4: (-8, 7),
    TensorProto.UINT4: (0, 15),
    TensorProto.INT8: (-128, 127),
    TensorProto.UINT8: (0, 255),
    TensorProto.INT16: (-32768, 32767),
    TensorProto.UINT16: (0, 65535),
    TensorProto.INT32: (-(2**31), 2**31 - 1),
}
"""ONNX element type -> (lowest, highest) code, for the types DequantizeLinear-21 takes."""

_SCALE_TYPES = {np.dtype(np.float32), np.dtype(np.float16), helper.tensor_dtype_to_np_dtype(TensorProto.BFLOAT16)}


def _codes(values, onnx_elem_type: int, what: str) -> np.ndarray:
    """``values`` as an array of ``onnx_elem_type`` (int4/uint4 as ml_dtypes arrays that onnx packs)."""
    if onnx_elem_type not in QUANTIZED_TYPES:
        names = ", ".join(TensorProto.DataType.Name(t) for t in QUANTIZED_TYPES)
        raise ValueError(f"onnx_elem_type {onnx_elem_type} is not one of {names}")
    values = np.asarray(values)
    if not np.issubdtype(values.dtype, np.integer):
        raise ValueError(f"{what} must hold integers, not {values.dtype}")
    low, high = QUANTIZED_TYPES[onnx_elem_type]
    if values.size and (values.min() < low or values.max() > high):
        name = TensorProto.DataType.Name(onnx_elem_type)
        raise ValueError(f"{what} spans [{values.min()}, {values.max()}], outside {name}'s [{low}, {high}]")
    return values.astype(helper.tensor_dtype_to_np_dtype(onnx_elem_type))


def _scale_shape(shape: tuple[int, ...], axis: int | None, block_size: int | None) -> tuple[int, ...]:
    if axis is None:
        if block_size is not None:
            raise ValueError("block_size needs an axis")
        return ()
    if block_size is None:
        return (shape[axis],)
    if block_size < 1:
        raise ValueError(f"block_size must be positive, not {block_size}")
    return shape[:axis] + (-(-shape[axis] // block_size),) + shape[axis + 1 :]


def quantize_weight_in_place(
    model: onnx.ModelProto,
    weight: Weight,
    q_array: np.ndarray,
    scale: np.ndarray | float,
    zero_point: np.ndarray | int | None,
    onnx_elem_type: int,
    *,
    axis: int | None = None,
    block_size: int | None = None,
    names: NameFactory | None = None,
) -> str:
    """Store ``weight`` as integer codes behind a DequantizeLinear whose output keeps the weight's name.

    Parameters
    ----------
    model
        Modified in place (its opset raised to 21 if lower).
    weight
        As :func:`pyqshare.model.find_weights` returned it; the float tensor (initializer, external data or
        Constant node, in any graph) is removed.
    q_array
        Integer codes, the weight's shape, within ``onnx_elem_type``'s range.
    scale
        Float scale(s): one value (per tensor), ``shape[axis]`` values (per axis), or the weight's shape with
        ``shape[axis]`` replaced by ``ceil(shape[axis] / block_size)`` (blocks). Stored in the weight's
        float type, which is also what DequantizeLinear then outputs.
    zero_point
        Integer zero point(s) shaped like ``scale``, or one value for all; None means zero.
    onnx_elem_type
        ``TensorProto.INT4``, ``UINT4``, ``INT8``, ``UINT8``, ``INT16``, ``UINT16`` or ``INT32`` (biases).
        4-bit codes are packed two per byte, low nibble first, as ONNX specifies.
    axis
        None for per-tensor, else the axis the scales run along (negative counts from the end).
    block_size
        With ``axis``: the number of consecutive elements along ``axis`` sharing a scale.
    names
        A :class:`~pyqshare.model.graph.NameFactory` of ``model`` shared by many calls (building one scans
        the whole model); None builds one.

    Returns
    -------
    str
        The name of the initializer holding the codes.
    """
    if weight.dtype not in _SCALE_TYPES:
        raise ValueError(f"weight {weight.name!r} is {weight.dtype}: DequantizeLinear outputs float32/16, bfloat16")
    codes = _codes(q_array, onnx_elem_type, f"codes of {weight.name!r}")
    if codes.shape != weight.shape:
        raise ValueError(f"codes of {weight.name!r} have shape {codes.shape}, the weight {weight.shape}")
    if axis is not None:
        if not -len(weight.shape) <= axis < len(weight.shape):
            raise ValueError(f"axis {axis} is out of range for weight {weight.name!r} of shape {weight.shape}")
        axis %= len(weight.shape)
    expected = _scale_shape(weight.shape, axis, block_size)
    scale = np.asarray(scale, dtype=weight.dtype)
    if scale.size != max(1, int(np.prod(expected))):
        raise ValueError(f"weight {weight.name!r} needs scales of shape {expected}, got {scale.shape}")
    scale = scale.reshape(expected)
    zero_point = _codes(0 if zero_point is None else zero_point, onnx_elem_type, "zero_point")
    if zero_point.size == 1:
        zero_point = np.full(expected, zero_point.ravel()[0])
    elif zero_point.size != scale.size:
        raise ValueError(f"zero_point of {weight.name!r} must be one value or shaped like its scale {expected}")
    zero_point = zero_point.reshape(expected)

    ensure_opset(model)
    graph, initializer, constant = locate(model, weight)
    names = names or NameFactory(model)
    inputs = [names(f"{weight.name}_quantized"), names(f"{weight.name}_scale"), names(f"{weight.name}_zero_point")]
    attributes = {} if axis is None else {"axis": axis}
    if block_size is not None:
        attributes["block_size"] = block_size
    dequantize = helper.make_node(
        "DequantizeLinear", inputs, [weight.name], name=names(f"{weight.name}_DequantizeLinear"), **attributes
    )
    if initializer is not None:
        del graph.initializer[initializer]
        graph.node.insert(0, dequantize)
    else:
        graph.node[constant].CopyFrom(dequantize)
    for array, name in zip((codes, scale, zero_point), inputs):
        graph.initializer.append(numpy_helper.from_array(array, name))
    # An initializer listed as a graph input (IR < 4 style) was an overridable default; it is now computed.
    for index, value in enumerate(graph.input):
        if value.name == weight.name:
            del graph.input[index]
            break
    return inputs[0]


def quantize_bias_in_place(
    model: onnx.ModelProto, weight: Weight, input_scale: float, weight_scale: np.ndarray | float, *,
    names: NameFactory | None = None,
) -> np.ndarray:
    """Store a bias as int32 with scale ``input_scale * weight_scale`` and zero point 0 (QNN's bias format).

    Parameters
    ----------
    model
        Modified in place.
    weight
        A weight with role ``"bias"`` (Conv/ConvTranspose/Gemm bias, or the Add after a MatMul).
    input_scale
        The activation scale of the layer's input.
    weight_scale
        The scale of the layer's weight (``weight.bias_of``): one value, or one per output channel when
        the weight is quantized per channel; the bias is then quantized per channel along its
        ``channel_axis``.
    names
        As for :func:`quantize_weight_in_place`.

    Returns
    -------
    np.ndarray
        The bias scale as stored (0-d, or one per channel).
    """
    if weight.role != "bias":
        raise ValueError(f"weight {weight.name!r} has role {weight.role!r}, not 'bias'")
    weight_scale = np.asarray(weight_scale, dtype=np.float64)
    axis = None if weight_scale.size == 1 else weight.channel_axis
    if axis is not None and weight_scale.size != weight.shape[axis]:
        raise ValueError(f"bias {weight.name!r} has {weight.shape[axis]} channels, {weight_scale.size} weight scales")
    scale = (float(input_scale) * weight_scale.reshape(() if axis is None else (-1,))).astype(weight.dtype)
    broadcast = scale if axis is None else scale.reshape([-1 if a == axis else 1 for a in range(len(weight.shape))])
    values = weight.array().astype(np.float64)
    codes = np.divide(values, broadcast, out=np.zeros_like(values), where=broadcast != 0)
    low, high = QUANTIZED_TYPES[TensorProto.INT32]
    codes = np.clip(np.rint(codes), low, high).astype(np.int32)
    quantize_weight_in_place(model, weight, codes, scale, None, TensorProto.INT32, axis=axis, names=names)
    return scale


def insert_activation_qdq(
    model: onnx.ModelProto,
    tensor_name: str,
    scale: float,
    zero_point: int,
    onnx_elem_type: int,
    *,
    graph: str = "",
    names: NameFactory | None = None,
) -> str:
    """Route activation ``tensor_name`` through QuantizeLinear -> DequantizeLinear (per tensor).

    Parameters
    ----------
    model
        Modified in place (its opset raised to 21 if lower).
    tensor_name
        A tensor produced by a node, or a graph input, of the graph at path ``graph``.
    scale, zero_point
        The activation's quantization parameters.
    onnx_elem_type
        ``TensorProto.UINT8``, ``INT8``, ``UINT16``, ``INT16`` (or 4-bit types).
    graph
        Path of the graph defining the tensor (``""``: the main graph; see :mod:`pyqshare.model.graph`).
    names
        A :class:`~pyqshare.model.graph.NameFactory` of ``model`` shared by many calls (building one scans
        the whole model); None builds one.

    Returns
    -------
    str
        The name consumers now read: ``tensor_name`` itself for a node output (the producer's output is
        renamed ``<tensor_name>_float``), ``<tensor_name>_dequantized`` for a graph input.
    """
    zero_point = _codes(zero_point, onnx_elem_type, "zero_point").reshape(())
    ensure_opset(model)
    owner = find_graph(model, graph)
    declared = declared_type(owner, tensor_name)
    known = declared is not None and declared.HasField("tensor_type")
    float_type = declared.tensor_type.elem_type if known else TensorProto.FLOAT
    scale = np.asarray(scale, dtype=helper.tensor_dtype_to_np_dtype(float_type)).reshape(())
    names = names or NameFactory(model)
    scale_name, zero_name = names(f"{tensor_name}_scale"), names(f"{tensor_name}_zero_point")
    quantized = names(f"{tensor_name}_quantized")
    producer = producer_index(owner, tensor_name)
    if producer is not None:
        source, result, position = names(f"{tensor_name}_float"), tensor_name, producer + 1
        outputs = owner.node[producer].output
        outputs[list(outputs).index(tensor_name)] = source
    elif any(value.name == tensor_name for value in owner.input):
        source, result, position = tensor_name, names(f"{tensor_name}_dequantized"), 0
        for node, index, _ in readers(owner).get(tensor_name, []):
            node.input[index] = result
    else:
        where = f"graph {graph!r}" if graph else "the main graph"
        raise ValueError(f"{tensor_name!r} is neither a node output nor an input of {where}")
    owner.node.insert(position, helper.make_node(
        "QuantizeLinear", [source, scale_name, zero_name], [quantized], name=names(f"{tensor_name}_QuantizeLinear")
    ))
    owner.node.insert(position + 1, helper.make_node(
        "DequantizeLinear", [quantized, scale_name, zero_name], [result], name=names(f"{tensor_name}_DequantizeLinear")
    ))
    owner.initializer.append(numpy_helper.from_array(scale, scale_name))
    owner.initializer.append(numpy_helper.from_array(zero_point, zero_name))
    return result
