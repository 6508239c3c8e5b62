"""``pyqshare int8`` and ``pyqshare int4``: the baselines of ../shared/CLI.md, with no search and no tricks.

Weights per tensor, symmetric, scale from min-max; activations per tensor from min-max, 8 bits.
"""

from __future__ import annotations

import argparse

from pyqshare.methods.common import MethodContext, add_common_arguments, run_method
from pyqshare.quantization.pipeline import QuantizedModel, quantize_model
from pyqshare.quantization.scheme import QuantScheme, WeightScheme


def baseline_scheme(bits: int) -> QuantScheme:
    weights = WeightScheme(bits=bits, granularity="per-tensor", symmetric=True, search="minmax", rounding="nearest")
    return QuantScheme(weights=weights, activation_bits=8, activation_method="minmax")


def configure(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)


def _run(bits: int, args: argparse.Namespace) -> dict:
    scheme = baseline_scheme(bits)

    def quantize(context: MethodContext) -> QuantizedModel:
        return quantize_model(context.model, context.calibration, scheme, model_dir=context.model_dir,
                              min_elements=args.min_elements)

    return run_method(f"int{bits}", args, quantize, parameters={"weight_bits": bits, "activation_bits": 8})


def run_int8(args: argparse.Namespace) -> dict:
    return _run(8, args)


def run_int4(args: argparse.Namespace) -> dict:
    return _run(4, args)
