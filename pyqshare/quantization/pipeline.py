"""Float ONNX model + calibration samples + a QuantScheme -> a QDQ model QNN's HTP validates end to end.

Every float tensor goes through QuantizeLinear/DequantizeLinear, as QNN's HTP requires of a quantized graph:
- linear-layer weights (MatMul, Gemm, Conv, ConvTranspose, RNN W/R) get the scheme's integer codes and scales,
  searched with ``scale_search`` and optionally rounded with GPTQ or AdaRound against the layer's calibration
  inputs (MatMul and Gemm weights: the rounding needs the Gram matrix of the layer's 2-D inputs);
- Gemm/Conv biases become int32 with scale ``input_scale * weight_scale`` (QNN's bias format);
- all other float data (norm parameters, the bias of a MatMul+Add, embedding tables, scalars) is quantized
  per tensor at the activation bit width, as onnxruntime's QNN recipe does: an embedding table's codes are
  what its Gather outputs, so they follow the activations;
- every float activation gets a per-tensor uint8/uint16 pair from the calibrated range.

Mixed precision changes single weights: ``overrides`` gives a linear layer its own scheme (or an embedding
table a per-tensor one), ``float_weights`` leaves weights float (QNN's HTP then runs that layer in float:
measured, see :mod:`pyqshare.methods.hybrid`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import onnx

from pyqshare import kernels
from pyqshare._blas import single_threaded_blas
from pyqshare.calibration import collect_activation_ranges
from pyqshare.model import Weight, find_weights
from pyqshare.model.graph import NameFactory
from pyqshare.model.qdq import insert_activation_qdq, quantize_bias_in_place, quantize_weight_in_place
from pyqshare.quantization.adaround import adaround
from pyqshare.quantization.layers import GramAccumulator, gram_input, layer_input
from pyqshare.quantization.rounding import gptq_round
from pyqshare.quantization.scheme import LINEAR_ROLES, QuantScheme, WeightScheme

Sample = Mapping[str, np.ndarray]

_INT32_BIAS_LIMIT = 2**31 - 2**12  # below the int32 maximum by more than float32 rounding of the bias scale

# Outputs with a known range get the power-of-two grid over it, not a calibrated one: QNN's HTP requires
# these encodings for Sigmoid and Tanh (onnxruntime's QNN recipe fixes them the same way), and onnxruntime's
# CPU QLinearSoftmax assumes scale 2^-bits (with a calibrated range it returned 0 for the larger of two class
# probabilities).
def _unit_interval(bits: int) -> tuple[float, int]:
    return 2.0**-bits, 0


def _symmetric_unit(bits: int) -> tuple[float, int]:
    return 2.0 ** (1 - bits), 1 << (bits - 1)


FIXED_OUTPUT_QPARAMS = {"Softmax": _unit_interval, "Sigmoid": _unit_interval, "HardSigmoid": _unit_interval,
                        "Tanh": _symmetric_unit}


@dataclass
class LayerResult:
    """One quantized linear-layer weight: its scheme and how well its codes reproduce it."""

    scheme: WeightScheme
    elements: int
    weight_sqnr_db: float
    packed_bits: int  # codes plus scales and zero points
    details: dict[str, object] = field(default_factory=dict)  # a method's own figures for the summary

    def to_dict(self) -> dict:
        return {"bits": self.scheme.bits, "granularity": self.scheme.granularity,
                "weight_sqnr_db": round(self.weight_sqnr_db, 3), "elements": self.elements, **self.details}


@dataclass
class QuantizedModel:
    model: onnx.ModelProto
    layers: dict[str, LayerResult] = field(default_factory=dict)
    packed_bytes: int = 0  # every initializer of the written model at its packed width
    weight_elements: int = 0  # elements of weights (>= min_elements) that were quantized
    weight_bits: int = 0  # their packed bits, scales included
    report: dict[str, object] = field(default_factory=dict)  # a method's own top-level summary keys

    @property
    def bits_per_weight(self) -> float:
        return self.weight_bits / self.weight_elements if self.weight_elements else 0.0


def quantize_model(
    model: onnx.ModelProto,
    samples: Sequence[Sample],
    scheme: QuantScheme,
    *,
    model_dir: str | Path | None = None,
    overrides: Mapping[str, WeightScheme] | None = None,
    min_elements: int = 64,
    on_weight_quantized: Callable[[Weight, np.ndarray, np.ndarray], None] | None = None,
    fixed_scales: Mapping[str, np.ndarray] | None = None,
    float_weights: Collection[str] = (),
) -> QuantizedModel:
    """Quantize ``model`` in place into QDQ form and return it with per-layer results.

    Parameters
    ----------
    model
        A float model with static shapes (run :func:`pyqshare.prepare.prepare_model` first for QNN).
        Modified in place.
    samples
        Calibration samples ``{input name: array}``.
    scheme
        Default weight scheme and activation settings.
    model_dir
        Folder of the model's external data.
    overrides
        Weight scheme per weight name, replacing the default (mixed precision). A weight that is not a linear
        layer's (an embedding table) takes a per-tensor scheme in place of the activation-width quantization
        of static data.
    min_elements
        Tensors with fewer elements are not counted as weights in the size figures (../shared/CLI.md).
    on_weight_quantized
        Called as ``(weight, float values, dequantized values)`` after each linear-layer weight is quantized
        and before any bias is: a method may still change the float biases (bias correction).
    fixed_scales
        Fixed scales for some linear-layer weights (symmetric schemes), shaped for their granularity (0-d per
        tensor, one per channel): no scale search, the codes are the nearest points of that grid. Weight
        clustering uses it to write weights that already lie on a grid exactly.
    float_weights
        Names of weights (any role) left as float tensors, without Q/DQ; counted at 16 bits in the size
        figures, as QNN's HTP stores float weights in fp16 (measured: a float MatMul weight adds 2 bytes per
        element to the context binary).
    """
    overrides = dict(overrides or {})
    fixed_scales = dict(fixed_scales or {})
    float_weights = set(float_weights)
    found = find_weights(model, model_dir, min_elements=1)
    kept_float = [w for w in found if w.name in float_weights]
    weights = [w for w in found if w.name not in float_weights]
    linear = [w for w in weights if (w.role in LINEAR_ROLES and w.channel_axis is not None) or w.name in overrides]
    for weight in linear:
        if weight.role not in LINEAR_ROLES and overrides[weight.name].granularity != "per-tensor":
            raise ValueError(f"{weight.name!r} ({weight.role}) takes per-tensor schemes only")
    schemes = {w.name: overrides.get(w.name, scheme.weights) for w in linear}
    rounded = [w for w in linear if schemes[w.name].rounding != "nearest"]
    # GPTQ/AdaRound's Gram matrices come from the same onnxruntime pass as the activation ranges.
    gram_inputs = {w.name: tensor for w in rounded if (tensor := gram_input(model, w)) is not None}
    accumulator = GramAccumulator(gram_inputs.values())
    ranges = collect_activation_ranges(
        model, samples, method=scheme.activation_method, bits=scheme.activation_bits, model_dir=model_dir,
        on_activation=accumulator.observe,
    )
    tensor_grams = accumulator.grams()
    grams = {name: tensor_grams[tensor] for name, tensor in gram_inputs.items()}

    result = QuantizedModel(model)
    names = NameFactory(model)  # one for every Q/DQ inserted below: building one scans the whole model
    int32_biases = _int32_biases(model, weights, linear, schemes, ranges, scheme.activation_bits)
    bias_of_layer = {bias.bias_of: (bias, input_scale) for bias, input_scale in int32_biases.values()}
    weight_scales: dict[str, np.ndarray] = {}
    for weight in linear:
        chosen = schemes[weight.name]
        values = np.asarray(weight.array(), dtype=np.float32)
        bias = bias_of_layer.get(weight.name)
        min_scale = _scale_floor_for_int32_bias(weight, *bias) if bias else None
        codes, scale, zero_point, axis, block_size = _quantize_linear(
            values, weight, chosen, grams.get(weight.name), fixed_scales.get(weight.name), min_scale
        )
        dequantized = kernels.dequantize(codes, scale, zero_point, chosen.bits, axis=axis, block_size=block_size)
        quantize_weight_in_place(
            model, weight, codes, scale, zero_point, chosen.elem_type, axis=axis, block_size=block_size, names=names
        )
        weight_scales[weight.name] = scale
        if on_weight_quantized is not None:
            on_weight_quantized(weight, values, dequantized)
        packed = weight.size * chosen.bits + scale.size * (32 + chosen.bits)
        result.layers[weight.name] = LayerResult(chosen, weight.size, _sqnr_db(values, dequantized), packed)
        if weight.size >= min_elements:
            result.weight_elements += weight.size
            result.weight_bits += packed

    linear_names = {w.name for w in linear}
    for weight in weights:
        if weight.name in linear_names:
            continue
        if weight.name in int32_biases:
            _, input_scale = int32_biases[weight.name]
            bias_scale = _per_bias_channel(weight_scales[weight.bias_of], weight)
            quantize_bias_in_place(model, weight, input_scale, bias_scale, names=names)
            bits = 32
        else:
            _quantize_static(model, weight, scheme.activation_bits, scheme.activation_elem_type, names)
            bits = scheme.activation_bits
        if weight.size >= min_elements:
            result.weight_elements += weight.size
            result.weight_bits += weight.size * bits + 32 + bits

    for weight in kept_float:
        if weight.size >= min_elements:
            result.weight_elements += weight.size
            result.weight_bits += weight.size * 16

    producers = {output: node.op_type for node in model.graph.node for output in node.output}
    for name, (low, high) in ranges.items():
        fixed = FIXED_OUTPUT_QPARAMS.get(producers.get(name, ""))
        bits = scheme.activation_bits
        scale, zero_point = fixed(bits) if fixed else _activation_qparams(low, high, bits)
        insert_activation_qdq(model, name, scale, zero_point, scheme.activation_elem_type, names=names)

    result.packed_bytes = math.ceil(result.weight_bits / 8)
    return result


def _quantize_linear(
    values: np.ndarray,
    weight: Weight,
    scheme: WeightScheme,
    gram: np.ndarray | None,
    fixed_scale: np.ndarray | None = None,
    min_scale: np.ndarray | None = None,
):
    """(codes, scale, zero_point, DequantizeLinear axis, block_size) for one linear-layer weight; ``min_scale``
    (per channel, or one value) raises scales that its int32 bias would overflow."""
    if scheme.granularity == "per-tensor":
        axis, block_size = None, None
    elif scheme.granularity == "per-channel":
        axis, block_size = weight.channel_axis, None
    else:
        axis, block_size = weight.reduction_axis, scheme.block_size
    if fixed_scale is not None:
        if not scheme.symmetric:
            raise ValueError(f"weight {weight.name!r}: fixed scales need a symmetric scheme (zero point 0)")
        scale = np.asarray(fixed_scale, dtype=np.float32)
        zero_point = np.zeros(scale.shape, np.int8 if scheme.bits <= 8 else np.int16)
    else:
        objective = "minmax" if scheme.search == "minmax" else "mse"
        scale, zero_point = kernels.scale_search(
            values, scheme.bits, axis=axis, block_size=block_size, symmetric=scheme.symmetric, objective=objective
        )
    if min_scale is not None:
        floor = min_scale.max() if scale.ndim == 0 else min_scale.reshape(scale.shape)
        scale = np.maximum(scale, floor.astype(scale.dtype))
    if gram is not None and scheme.granularity != "per-block":
        # GPTQ works on the (inputs, outputs) view: rows are input features, columns output channels.
        transposed = weight.channel_axis == 0
        view = values.T if transposed else values
        columns = view.shape[1]
        rounding = gptq_round if scheme.rounding == "gptq" else partial(adaround, iterations=scheme.iterations)
        with single_threaded_blas():  # many small row updates: BLAS threads only spin
            codes = rounding(
                view,
                np.broadcast_to(scale, (columns,)),
                np.broadcast_to(zero_point.astype(np.float64), (columns,)),
                *scheme.code_range,
                gram,
            )
        codes = np.ascontiguousarray(codes.T if transposed else codes, dtype=zero_point.dtype)
    else:
        codes = kernels.quantize(values, scale, zero_point, scheme.bits, axis=axis, block_size=block_size)
    return codes, scale, zero_point, axis, block_size


def _int32_biases(
    model: onnx.ModelProto, weights: Sequence[Weight], linear: Sequence[Weight], schemes: Mapping[str, WeightScheme],
    ranges: Mapping[str, tuple[float, float]], activation_bits: int,
) -> dict[str, tuple[Weight, float]]:
    """``{bias name: (bias, input scale)}`` for the Gemm/Conv/ConvTranspose biases QNN takes as int32 at scale
    ``input_scale * weight_scale``: those whose weight is quantized per tensor or per channel (a per-block
    weight has no single scale per output) and whose layer input has a calibrated range."""
    linear_by_name = {w.name: w for w in linear}
    biases = {}
    for weight in weights:
        layer = linear_by_name.get(weight.bias_of) if weight.role == "bias" else None
        if layer is None or schemes[layer.name].granularity == "per-block":
            continue
        if not all(op in ("Gemm", "Conv", "ConvTranspose") for _, op, _ in weight.consumers):
            continue
        tensor = layer_input(model, layer)
        if tensor in ranges:
            biases[weight.name] = (weight, _activation_qparams(*ranges[tensor], activation_bits)[0])
    return biases


def _per_bias_channel(weight_scale: np.ndarray, bias: Weight) -> np.ndarray:
    """A weight's scales laid out per bias entry: a grouped ConvTranspose's weight has one channel per slot of
    ``O / group``, shared by the groups (output ``o`` uses slot ``o % (O / group)``)."""
    if weight_scale.size in (1, bias.size):
        return weight_scale
    if bias.size % weight_scale.size:
        raise ValueError(f"bias {bias.name!r}: {bias.size} entries for {weight_scale.size} weight scales")
    return np.tile(weight_scale.ravel(), bias.size // weight_scale.size)


def _scale_floor_for_int32_bias(weight: Weight, bias: Weight, input_scale: float) -> np.ndarray:
    """The smallest weight scales (0-d for per-tensor use, else one per weight channel) at which the bias still
    fits int32 at ``input_scale * weight_scale``: 16-bit activations have scales near 1e-5, so a channel with
    small weights and a large bias would otherwise saturate (onnxruntime's QDQ quantizer widens the weight
    scale the same way)."""
    channels = weight.shape[weight.channel_axis] if weight.channel_axis is not None else 1
    magnitude = np.abs(bias.array().astype(np.float64)).reshape(-1, channels).max(axis=0)
    return magnitude / (input_scale * _INT32_BIAS_LIMIT)


def _activation_qparams(low: float, high: float, bits: int) -> tuple[float, int]:
    """Asymmetric unsigned per-tensor parameters whose grid contains 0 exactly."""
    levels = (1 << bits) - 1
    low, high = min(low, 0.0), max(high, 0.0)
    scale = (high - low) / levels if high > low else 1.0
    zero_point = int(np.clip(round(-low / scale), 0, levels))
    return float(np.float32(scale)), zero_point


def _quantize_static(model: onnx.ModelProto, weight: Weight, bits: int, elem_type: int, names: NameFactory) -> None:
    values = np.asarray(weight.array(), dtype=np.float32).reshape(weight.shape)
    finite = values[np.isfinite(values)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    scale, zero_point = _activation_qparams(low, high, bits)
    clipped = np.array(np.clip(values, np.float32(low), np.float32(high)))  # +-inf land on the range ends
    unsigned = np.uint16 if bits == 16 else np.uint8
    codes = kernels.quantize(clipped, np.float32(scale), np.array(zero_point, unsigned), bits)
    quantize_weight_in_place(model, weight, codes, scale, zero_point, elem_type, names=names)


def fake_quantize_linear(weight: Weight, scheme: WeightScheme, gram: np.ndarray | None = None) -> np.ndarray:
    """The values a weight takes when :func:`quantize_model` quantizes it with ``scheme``, dequantized.

    Parameters
    ----------
    weight
        A linear-layer weight, or any weight with a per-tensor scheme.
    scheme
        Bits, granularity, symmetry, scale search and rounding.
    gram
        The layer's input Gram matrix (:func:`pyqshare.quantization.layers.layer_input_grams`) for GPTQ or
        AdaRound; without it, or with ``scheme.rounding == "nearest"``, weights round to nearest.
    """
    values = np.asarray(weight.array(), dtype=np.float32)
    gram = gram if scheme.rounding != "nearest" else None
    codes, scale, zero_point, axis, block_size = _quantize_linear(values, weight, scheme, gram)
    return kernels.dequantize(codes, scale, zero_point, scheme.bits, axis=axis, block_size=block_size)


def _sqnr_db(reference: np.ndarray, approximation: np.ndarray) -> float:
    noise = float(np.sum((reference.astype(np.float64) - approximation) ** 2))
    signal = float(np.sum(reference.astype(np.float64) ** 2))
    return math.inf if noise == 0 else 10 * math.log10(signal / noise) if signal > 0 else -math.inf
