"""``pyqshare per-channel``: per-channel (or per-block) weights through ``scale_search``, calibrated activations.

Search effort by ``--optimization-level``:
0. scales from min-max, nearest rounding;
1. scales minimising the weight's squared error (``scale_search``), nearest rounding;
2. (default) level 1's scales, then GPTQ rounding against each linear layer's calibration inputs;
3. level 2, with activation ranges that minimise their quantization error (``--activation-method mse``)
   unless another method is given.

Activation ranges otherwise default to min-max at 16 bits and the 99.99th percentile at 8 bits.
"""

from __future__ import annotations

import argparse

from pyqshare.errors import InputError
from pyqshare.methods.common import MethodContext, add_common_arguments, run_method
from pyqshare.quantization.pipeline import QuantizedModel, quantize_model
from pyqshare.quantization.scheme import ACTIVATION_BITS, WEIGHT_BITS, QuantScheme, WeightScheme

# 16-bit activations for transformer-style models, as QNN deployments of transformers do.
DEFAULT_ACTIVATION_BITS = {"text": 16, "text_generation": 16, "multimodal": 16, "vision": 8, "audio": 8}
# 16 bits resolve any calibrated range finely, so clipping only hurts; at 8 bits, clipping the 0.01% tails
# buys resolution (PP-OCR's classifier: 23.6 dB with percentile ranges, 18.5 dB with min-max).
DEFAULT_ACTIVATION_METHOD = {16: "minmax", 8: "percentile"}


def configure(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument("--weight-method", choices=("per-channel", "per-tensor"), default="per-channel")
    parser.add_argument("--block-size", type=int, help="per-block weights: input features per scale "
                        "(on the QNN HTP: 4-bit weights with 16-bit activations only)")
    parser.add_argument("--weight-bits", type=int, choices=WEIGHT_BITS, default=8)
    parser.add_argument("--activation-bits", type=int, choices=ACTIVATION_BITS,
                        help="default by --model-type: 16 for text, text_generation and multimodal, else 8")
    parser.add_argument("--activation-method", choices=("minmax", "percentile", "mse"),
                        help="activation range calibration (default: minmax for 16-bit activations, percentile for "
                        "8-bit; mse at --optimization-level 3)")
    parser.add_argument("--optimize-zero-points", action="store_true",
                        help="asymmetric weights with searched zero points (not for 4-bit weights)")
    parser.add_argument("--optimization-level", type=int, choices=range(4), default=2, metavar="{0,1,2,3}",
                        help="search effort (module docstring); default 2")


def scheme_for(args: argparse.Namespace, model_type: str) -> QuantScheme:
    level = args.optimization_level
    if args.optimize_zero_points and args.weight_bits == 4:
        raise InputError("--optimize-zero-points: 4-bit weights are always symmetric "
                         "(QNN's HTP computes asymmetric int4 wrongly)")
    granularity = "per-block" if args.block_size is not None else args.weight_method
    activation_bits = args.activation_bits or DEFAULT_ACTIVATION_BITS[model_type]
    if granularity == "per-block" and args.target == "qnn" and (args.weight_bits != 4 or activation_bits != 16):
        raise InputError("--block-size: the QNN HTP runs block-wise weights only as 4-bit weights with 16-bit "
                         "activations (use --weight-bits 4 --activation-bits 16, or --target cpu)")
    weights = WeightScheme(
        bits=args.weight_bits,
        granularity=granularity,
        block_size=args.block_size,
        symmetric=not args.optimize_zero_points,
        search="minmax" if level == 0 else "mse",
        rounding="gptq" if level >= 2 else "nearest",
    )
    activation_method = args.activation_method or ("mse" if level == 3 else DEFAULT_ACTIVATION_METHOD[activation_bits])
    return QuantScheme(weights=weights, activation_bits=activation_bits, activation_method=activation_method)


def run(args: argparse.Namespace) -> dict:
    parameters = {key: getattr(args, key) for key in (
        "weight_method", "block_size", "weight_bits", "optimize_zero_points", "optimization_level")}

    def quantize(context: MethodContext) -> QuantizedModel:
        scheme = scheme_for(args, context.model_type)
        parameters.update(activation_bits=scheme.activation_bits, activation_method=scheme.activation_method)
        return quantize_model(context.model, context.calibration, scheme, model_dir=context.model_dir,
                              min_elements=args.min_elements)

    return run_method("per-channel", args, quantize, parameters=parameters)
