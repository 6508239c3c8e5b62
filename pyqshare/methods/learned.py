"""``pyqshare learned``: the Guide's QAT row ("learned quantization parameters"), done without a training
framework. Nothing is trained: the parameters that quantization-aware training would adjust are fitted to
calibration data, layer by layer, in numpy.

1. BatchNorm folding (``--fold-bn``, default on; :mod:`pyqshare.quantization.folding`): every Conv,
   ConvTranspose, Gemm or 2-D MatMul followed by an inference-form BatchNormalization becomes one layer with
   folded weight and bias, exactly in float, so the BN's scale is quantized with the weight, not after it.
2. Weights per output channel, symmetric, scales from ``scale_search`` (``--weight-bits 8`` by default, or 4),
   rounded by AdaRound (:mod:`pyqshare.quantization.adaround`): per weight, up or down as learned against the
   layer's calibration inputs, ``--iterations`` Adam steps per layer (0: nearest rounding). AdaRound needs
   the Gram matrix of a layer's 2-D inputs, so it applies to MatMul and Gemm weights; Conv and ConvTranspose
   weights round to nearest (an im2col Gram of ``C * kh * kw`` squared per layer was not worth its cost).
3. Bias correction (``--bias-correction``, default on; :mod:`pyqshare.quantization.bias_correction`): each
   layer's bias absorbs the mean output shift its quantized weight causes on calibration data,
   ``b' = b - E[x] (W_q - W)``; Gemm and Conv layers without a bias get a zero one first.
4. Activations per tensor from min-max calibration through onnxruntime, 16-bit for text models and 8-bit
   otherwise (``--activation-bits``), as ``per-channel`` does.

The Guide's training flags, mapped:

==================  ====================================================================================
``--train-dataset``  refused (exit 2): pyqshare trains nothing; calibration inputs come from
                     ``--calibration-data`` (or the seeded defaults)
``--epochs``         recorded, no effect: the optimisation is per layer, ``--iterations`` Adam steps
``--learning-rate``  recorded, no effect: a fine-tuning rate for weights (the Guide's 5e-5) would not move
                     AdaRound's rounding variables; their step size is fixed (0.02, measured on MiniLM)
``--batch-size``     recorded, no effect: every calibration sample enters the Gram matrix at once, so
                     each step's gradient is exact
``--fold-bn``        as the Guide (default on; ``--no-fold-bn`` to keep BatchNormalization nodes)
==================  ====================================================================================

``--rounding gptq`` swaps AdaRound for per-channel's GPTQ (steps 1, 3 and 4 unchanged), which wins on
transformers. Measured on all-MiniLM-L6-v2 (prepared for QNN, seq 128, int8 weights per channel, uint16
activations, default calibration and evaluation inputs, onnxruntime CPU), output SQNR in dB:

==========================================  =================  ==================
rounding, bias correction                   last_hidden_state  sentence_embedding
==========================================  =================  ==================
nearest, off (= per-channel level 1)        24.3               25.2
nearest, on                                 25.8               30.0
AdaRound 20 iterations, on                  26.1               30.3
AdaRound 100 iterations (default), off      28.0               30.4
AdaRound 100 iterations (default), on       28.2               31.4
GPTQ, off (= per-channel default)           32.8               34.6
GPTQ, on                                    32.9               34.8
==========================================  =================  ==================

Per layer (geometric mean over MiniLM's 36 MatMul weights, ``bench/bench_learned.py``), AdaRound's 100 steps
leave 0.34 of nearest rounding's output error at int8 and 0.38 at int4, GPTQ 0.08 and 0.07: with a few input
features carrying most of the energy, the best codes lie more than one step from the weight, where GPTQ can
go and AdaRound, choosing between floor and ceil, cannot. AdaRound also costs more: each step multiplies by
every layer's ``I x I`` Gram matrix; for the 36 layers at 100 steps, 79 s of one core against 11 s for GPTQ
(single-threaded BLAS; 102 s against 70 s in the bench's run on a loaded 2-core machine).
"""

from __future__ import annotations

import argparse
import math

from pyqshare.errors import InputError
from pyqshare.methods.common import MethodContext, add_common_arguments, run_method
from pyqshare.methods.per_channel import DEFAULT_ACTIVATION_BITS
from pyqshare.quantization.adaround import DEFAULT_ITERATIONS
from pyqshare.quantization.bias_correction import BiasCorrection, add_missing_biases
from pyqshare.quantization.folding import fold_batch_norms
from pyqshare.quantization.pipeline import QuantizedModel, quantize_model
from pyqshare.quantization.scheme import ACTIVATION_BITS, QuantScheme, WeightScheme

LEARNED_WEIGHT_BITS = (4, 8)


def configure(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument("--weight-bits", type=int, choices=LEARNED_WEIGHT_BITS, default=8)
    parser.add_argument("--activation-bits", type=int, choices=ACTIVATION_BITS,
                        help="default by --model-type: 16 for text, text_generation and multimodal, else 8")
    parser.add_argument("--rounding", choices=("adaround", "gptq", "nearest"), default="adaround",
                        help="adaround (default): learned up-or-down rounding; gptq: per-channel's "
                             "error-compensating rounding; nearest")
    parser.add_argument("--iterations", type=int, default=DEFAULT_ITERATIONS,
                        help=f"AdaRound's Adam steps per MatMul/Gemm layer (default {DEFAULT_ITERATIONS}; "
                             "0 rounds to nearest)")
    parser.add_argument("--fold-bn", action=argparse.BooleanOptionalAction, default=True,
                        help="fold BatchNormalization into the layer before it (default on)")
    parser.add_argument("--bias-correction", action=argparse.BooleanOptionalAction, default=True,
                        help="move each bias by the mean output shift quantization causes (default on)")
    guide = parser.add_argument_group("the Guide's QAT training flags (module docstring: what each maps to)")
    guide.add_argument("--train-dataset", help="refused: pyqshare does no training; use --calibration-data")
    guide.add_argument("--epochs", type=int, help="recorded; no effect (see --iterations)")
    guide.add_argument("--learning-rate", type=float, help="recorded; no effect")
    guide.add_argument("--batch-size", type=int, help="recorded; no effect (all calibration samples at once)")


def _check_flags(args: argparse.Namespace) -> None:
    if args.train_dataset is not None:
        raise InputError("--train-dataset: pyqshare does no training; pass calibration inputs with "
                         "--calibration-data (an .npz keyed by input name, or a QNN input list)")
    if args.iterations < 0:
        raise InputError(f"--iterations must be at least 0, not {args.iterations}")
    for flag, value in (("--epochs", args.epochs), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            raise InputError(f"{flag} must be at least 1, not {value}")
    if args.learning_rate is not None and not (math.isfinite(args.learning_rate) and args.learning_rate > 0):
        raise InputError(f"--learning-rate must be a positive number, not {args.learning_rate}")


def learned_scheme(args: argparse.Namespace, model_type: str) -> QuantScheme:
    """The weight and activation scheme of ``learned`` for these flags and model type."""
    weights = WeightScheme(
        bits=args.weight_bits,
        granularity="per-channel",
        symmetric=True,
        search="mse",
        rounding="nearest" if args.rounding == "adaround" and args.iterations == 0 else args.rounding,
        iterations=args.iterations,
    )
    activation_bits = args.activation_bits or DEFAULT_ACTIVATION_BITS[model_type]
    return QuantScheme(weights=weights, activation_bits=activation_bits, activation_method="minmax")


def run(args: argparse.Namespace) -> dict:
    _check_flags(args)
    parameters: dict[str, object] = {
        key: getattr(args, key) for key in ("weight_bits", "rounding", "iterations", "fold_bn", "bias_correction")
    }
    ignored = {key: getattr(args, key) for key in ("epochs", "learning_rate", "batch_size")}
    parameters["training_flags_ignored"] = {key: value for key, value in ignored.items() if value is not None}

    def quantize(context: MethodContext) -> QuantizedModel:
        scheme = learned_scheme(args, context.model_type)
        model = context.model
        folded = fold_batch_norms(model, context.model_dir) if args.fold_bn else []
        added = add_missing_biases(model) if args.bias_correction else []
        correction = BiasCorrection(model, context.calibration, context.model_dir) if args.bias_correction else None
        quantized = quantize_model(model, context.calibration, scheme, model_dir=context.model_dir,
                                   min_elements=args.min_elements, on_weight_quantized=correction)
        parameters.update(
            rounding=scheme.weights.rounding,
            activation_bits=scheme.activation_bits,
            activation_method=scheme.activation_method,
            folded_batchnorms=len(folded),
            added_biases=len(added),
            bias_corrected_layers=len(correction.corrected) if correction else 0,
        )
        return quantized

    return run_method("learned", args, quantize, parameters=parameters)
