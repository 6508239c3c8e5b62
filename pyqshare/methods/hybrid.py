"""``pyqshare hybrid``: a precision per layer (fp16, int16, int8, int4), by component or by sensitivity.

Every linear layer and embedding table gets a precision:

1. from ``--layer-wise-config`` (JSON ``{layer name or regular expression: precision}``; a key equal to one of
   the layer's names wins over regular expressions, which must match a whole name and are tried in file
   order; the names are the weight's, the layer's and its consumer nodes', see
   :class:`pyqshare.quantization.components.LayerComponent`);
2. else from its component's flag (``--attention-precision``, ``--feedforward-precision``,
   ``--embedding-precision``, ``--conv-precision``, ``--output-precision``, ``--other-precision``), components
   being detected from the graph (:mod:`pyqshare.quantization.components`);
3. else from the Guide's "Recommended Configurations" for the ``--model-type`` (:data:`RECOMMENDED`: text,
   text_generation and multimodal models are transformers, vision models CNNs).

With ``--sensitivity-analysis``, layers that neither the config nor an explicit component flag pins, and
that are weights by ../shared/CLI.md's definition (``--min-elements``, 64, elements or more; smaller ones keep
their component's precision and stay out of budgets), are chosen instead: each is quantized alone at each ``--candidate-precisions`` entry and the float model's
output SQNR measured with onnxruntime on calibration samples; then the precisions that fit
``--target-bits`` (average bits per weight over these layers, weighted by element count, pinned layers
included; default: the recommended configuration's average) with the least predicted loss are chosen by an
exact multiple-choice knapsack (:mod:`pyqshare.quantization.mixed_precision`). The table goes into the summary
(per layer ``sensitivity_sqnr_db``, and ``output_sqnr_db`` at the chosen precision), with the prediction.

The analysis quantizes with the written model's own quantizer, GPTQ rounding included (``--rounding``), so
that the table measures the weights the model will hold; it runs each (layer, precision) pair once per
sample, on ``--sensitivity-samples`` of the calibration samples (default 2: 256 tokens for a 128-token text
model). Measured on all-MiniLM-L6-v2 (seq 128, 8 evaluation samples, a 2-core machine shared with other
jobs at load average 5 to 11, which slows everything several-fold and makes times vary):

=================================================  ===========  ===========  ==========
configuration                                      bits/weight  min SQNR dB  analysis s
=================================================  ===========  ===========  ==========
recommended: attention int8, FFN int4,             7.06         12.1         -
embeddings int8, output fp16
--sensitivity-analysis (the same 7.06 budget)      7.05         18.1         109 to 248
the same, choosing from a nearest-rounding table   7.04         13.5         86
--sensitivity-analysis --target-bits 6             5.99         13.4         122 to 231
the same, --rounding nearest                       5.99         13.1         58
--sensitivity-samples 1
=================================================  ===========  ===========  ==========

The word embeddings hold 52% of MiniLM's weights and stay per tensor (below), so at 6 bits they must take
int4 (18.5 dB on their own); GPTQ (two of three candidates for 36 layers) is most of the analysis' time.
With 8 analysis samples instead of 2, the table moves by 0.19 dB (median over layers), 34 of 39 layers keep
their precision and the model reaches 17.8 dB (analysis 330 s): 2 samples are enough to rank layers. The
recommended and the analysed 7.06-bit models both run on the HTP simulator in one partition (724 and 725
nodes, none on the CPU), 0.04 and 0.33 dB from their CPU SQNR on one sample.

What QNN's HTP does with each precision (onnxruntime-qnn 2.7.0 simulator, measured):

* int4/int8 weights run with 8- or 16-bit activations, int16 weights with 16-bit activations only
  (refused otherwise under ``--target qnn``); int4 is symmetric per channel.
* fp16: the weight stays float (values rounded to float16) between quantized activations. The EP turns the
  layer into Dequantize -> float FullyConnected -> Quantize and keeps the model in one HTP partition with
  CPU fallback disabled, with or without ``enable_htp_fp16_precision``; the context binary stores the
  weight at 2 bytes per element (same size as int16).
* Embedding tables: the EP dequantizes the table and runs a float Gather, so any per-tensor table works
  (int4 to int16 or float), but a per-row DequantizeLinear is refused, and the context binary holds the
  table at 16 bits whatever its codes: an embedding's precision changes accuracy and the ONNX file, not
  the HTP's memory.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction

from pyqshare.errors import InputError
from pyqshare.evaluate import sqnr_db
from pyqshare.methods.common import MethodContext, add_common_arguments, load_layer_map, run_method
from pyqshare.methods.per_channel import DEFAULT_ACTIVATION_BITS, DEFAULT_ACTIVATION_METHOD
from pyqshare.model import Weight, find_weights, replace_weight
from pyqshare.quantization.components import COMPONENTS, LayerComponent, detect_components
from pyqshare.quantization.mixed_precision import (
    PRECISION_BITS,
    allocate,
    float16_values,
    measure_sensitivity,
    noise_power,
    weight_scheme,
)
from pyqshare.quantization.layers import layer_input_grams
from pyqshare.quantization.pipeline import QuantizedModel, quantize_model
from pyqshare.quantization.scheme import ACTIVATION_BITS, QuantScheme

RECOMMENDED = {
    "transformer": {"attention": "int8", "feed-forward": "int4", "embedding": "int8", "conv": "int8",
                    "output": "fp16", "other": "int8"},
    "cnn": {"attention": "int8", "feed-forward": "int8", "embedding": "int8", "conv": "int8", "output": "fp16",
            "other": "int8"},
    "audio": {"attention": "int8", "feed-forward": "int4", "embedding": "int8", "conv": "int8", "output": "int8",
              "other": "int8"},
}
"""The Guide's table by model family; its N/A cells (attention in CNNs, conv in transformers) get int8, and
CNN conv layers ("INT8/FP16") int8."""

FAMILIES = {"text": "transformer", "text_generation": "transformer", "multimodal": "transformer", "vision": "cnn",
            "audio": "audio"}

DEFAULT_SENSITIVITY_SAMPLES = 2
"""Samples the sensitivity analysis runs by default (see the module docstring)."""

COMPONENT_FLAGS = {"attention": "attention_precision", "feed-forward": "feedforward_precision",
                   "embedding": "embedding_precision", "conv": "conv_precision", "output": "output_precision",
                   "other": "other_precision"}


def configure(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    precisions = tuple(PRECISION_BITS)
    for component, dest in COMPONENT_FLAGS.items():
        flag = "--" + dest.replace("_", "-")
        parser.add_argument(flag, dest=dest, choices=precisions,
                            help=f"precision of {component} layers (default by --model-type, module docstring)")
    parser.add_argument("--layer-wise-config", help="JSON {layer name or regular expression: precision}")
    parser.add_argument("--sensitivity-analysis", action="store_true",
                        help="choose the precisions of layers not pinned by the config or a component flag by "
                             "measured output SQNR within --target-bits")
    parser.add_argument("--target-bits", type=float, help="average bits per weight over the layers given "
                        "precisions (default: that of the recommended configuration)")
    parser.add_argument("--candidate-precisions", help="comma-separated precisions the analysis may choose "
                        "(default int4,int8,int16; int4,int8 with 8-bit activations)")
    parser.add_argument("--sensitivity-samples", type=int, help="calibration samples the analysis runs "
                        f"(default {DEFAULT_SENSITIVITY_SAMPLES}; module docstring)")
    parser.add_argument("--activation-bits", type=int, choices=ACTIVATION_BITS,
                        help="default by --model-type: 16 for text, text_generation and multimodal, else 8")
    parser.add_argument("--activation-method", choices=("minmax", "percentile", "mse"),
                        help="activation range calibration (default: minmax at 16 bits, percentile at 8)")
    parser.add_argument("--rounding", choices=("gptq", "nearest"), default="gptq",
                        help="rounding of integer linear-layer weights (gptq: against calibration inputs)")


@dataclass
class HybridLayer:
    """One weight's entry in the summary: component, precision, fidelity and (if measured) sensitivity."""

    component: LayerComponent
    precision: str
    elements: int
    weight_sqnr_db: float
    sensitivity: Mapping[str, float] | None = None

    def to_dict(self) -> dict:
        entry = {**self.component.to_dict(), "precision": self.precision, "bits": PRECISION_BITS[self.precision],
                 "elements": self.elements, "weight_sqnr_db": round(self.weight_sqnr_db, 3)}
        if self.sensitivity is not None:
            entry["sensitivity_sqnr_db"] = {p: round(v, 3) for p, v in self.sensitivity.items()}
            if self.precision in self.sensitivity:
                entry["output_sqnr_db"] = entry["sensitivity_sqnr_db"][self.precision]
        return entry


def _precision(value: object, where: str) -> str:
    if value not in PRECISION_BITS:
        raise InputError(f"{where}: unknown precision {value!r}; choose from {', '.join(PRECISION_BITS)}")
    return str(value)


def load_layer_config(path: str | None) -> list[tuple[str, str]]:
    """``(key, precision)`` pairs of a ``--layer-wise-config`` file, in file order.

    Parameters
    ----------
    path
        The JSON file, or None (no config).
    """
    if path is None:
        return []
    return load_layer_map(path, "--layer-wise-config", _precision)


def _configured(
    config: Sequence[tuple[str, str]], layers: Mapping[str, LayerComponent], path: str | None
) -> dict[str, str]:
    """Weight name -> precision for the layers the config names (exact names first, then regexes in order)."""
    chosen: dict[str, str] = {}
    used: set[str] = set()
    for name, layer in layers.items():
        exact = next(((key, p) for key, p in config if key in layer.names), None)
        match = exact or next(
            ((key, p) for key, p in config if any(re.fullmatch(key, n) for n in layer.names)), None)
        if match:
            chosen[name] = match[1]
            used.add(match[0])
    unused = [key for key, _ in config if key not in used]
    if unused:
        raise InputError(f"--layer-wise-config {path}: {unused} match no layer (names are weight names, layer names "
                         "like encoder.layer.0.attention.self.query, and node names)")
    return chosen


def _candidates(args: argparse.Namespace, activation_bits: int) -> list[str]:
    if args.candidate_precisions is None:
        return ["int4", "int8", "int16"] if activation_bits == 16 else ["int4", "int8"]
    words = [word.strip() for word in args.candidate_precisions.split(",") if word.strip()]
    if not words:
        raise InputError("--candidate-precisions: name at least one precision")
    return list(dict.fromkeys(_precision(word, "--candidate-precisions") for word in words))


def _check_early(args: argparse.Namespace) -> None:
    """Refuse bad flag combinations before the model is prepared."""
    if args.target_bits is not None and not args.sensitivity_analysis:
        raise InputError("--target-bits needs --sensitivity-analysis")
    if args.sensitivity_samples is not None and args.sensitivity_samples < 1:
        raise InputError(f"--sensitivity-samples must be at least 1, not {args.sensitivity_samples}")
    lowest = min(PRECISION_BITS.values())
    if args.target_bits is not None and not lowest <= args.target_bits < math.inf:
        raise InputError(f"--target-bits {args.target_bits}: must be finite and at least {lowest}, the fewest bits "
                         "per weight any precision takes")


def _bits_per_weight(layers: Sequence[Weight], precisions: Mapping[str, str]) -> float:
    total = sum(w.size for w in layers)
    return sum(w.size * PRECISION_BITS[precisions[w.name]] for w in layers) / total if total else 0.0


def _choose_by_sensitivity(
    context: MethodContext,
    layers: Sequence[Weight],
    pinned: Mapping[str, str],
    candidates: Sequence[str],
    target_bits: float,
) -> tuple[dict[str, str], dict[str, dict[str, float]], dict]:
    """Precisions of the unpinned layers, the sensitivity table, and the analysis' report."""
    free = [w for w in layers if w.name not in pinned]
    samples = context.calibration[: context.args.sensitivity_samples or DEFAULT_SENSITIVITY_SAMPLES]
    started = time.perf_counter()
    print(f"hybrid: sensitivity of {len(free)} layers x {len(candidates)} precisions on {len(samples)} samples",
          file=sys.stderr, flush=True)
    # GPTQ's Gram matrices over all calibration samples, as the pipeline computes them: the table then
    # measures exactly the weights the written model will hold.
    rounding = context.args.rounding
    grams = {} if rounding == "nearest" else layer_input_grams(
        context.model, context.calibration, free, model_dir=context.model_dir)
    table = measure_sensitivity(context.model, samples, [(w, candidates) for w in free], rounding=rounding,
                                grams=grams, model_dir=context.model_dir)
    seconds = time.perf_counter() - started

    sizes = [w.size for w in layers]
    options = [
        [(PRECISION_BITS[pinned[w.name]], 0.0)] if w.name in pinned
        else [(PRECISION_BITS[p], noise_power(table[w.name][p])) for p in candidates]
        for w in layers
    ]
    try:
        allocation = allocate(sizes, options, math.floor(Fraction(target_bits) * sum(sizes)))
    except ValueError:
        lowest = sum(size * min(bits for bits, _ in row) for size, row in zip(sizes, options, strict=True)) / sum(sizes)
        raise InputError(f"--target-bits {target_bits}: below {lowest:.4f}, the fewest bits per weight these layers "
                         "can take (pinned layers included)") from None
    chosen = {w.name: candidates[pick] for w, pick in zip(layers, allocation.choice, strict=True)
              if w.name not in pinned}
    report = {
        "target_bits": target_bits,
        "candidates": list(candidates),
        "samples": len(samples),
        "layers_measured": len(free),
        "seconds": round(seconds, 3),
        "predicted_sqnr_db": -10 * math.log10(allocation.loss) if allocation.loss > 0 else math.inf,
        "exact": allocation.exact,
    }
    return chosen, table, report


def _quantize(
    context: MethodContext,
    layers: Sequence[Weight],
    entries: Mapping[str, HybridLayer],
    activation_bits: int,
    activation_method: str,
) -> QuantizedModel:
    """Write each layer at its precision (fp16: float16 values, no Q/DQ) and report every layer's entry."""
    args = context.args
    overrides, float_weights = {}, []
    for weight in layers:
        entry = entries[weight.name]
        scheme = weight_scheme(weight, entry.precision, args.rounding)
        if scheme is None:
            rounded = float16_values(weight)
            entry.weight_sqnr_db = sqnr_db([weight.array()], [rounded])
            replace_weight(context.model, weight, rounded)
            float_weights.append(weight.name)
        else:
            overrides[weight.name] = scheme
    scheme = QuantScheme(activation_bits=activation_bits, activation_method=activation_method)  # every layer overrides
    quantized = quantize_model(context.model, context.calibration, scheme, model_dir=context.model_dir,
                               overrides=overrides, min_elements=args.min_elements, float_weights=float_weights)
    for name, entry in entries.items():
        if name in overrides:
            entry.weight_sqnr_db = quantized.layers[name].weight_sqnr_db
        quantized.layers[name] = entry
    return quantized


def run(args: argparse.Namespace) -> dict:
    _check_early(args)
    config = load_layer_config(args.layer_wise_config)
    parameters: dict[str, object] = {"layer_wise_config": args.layer_wise_config,
                                     "sensitivity_analysis": args.sensitivity_analysis, "rounding": args.rounding}

    def quantize(context: MethodContext) -> QuantizedModel:
        family = FAMILIES[context.model_type]
        explicit = {c: getattr(args, dest) for c, dest in COMPONENT_FLAGS.items() if getattr(args, dest)}
        by_component = {**RECOMMENDED[family], **explicit}
        activation_bits = args.activation_bits or DEFAULT_ACTIVATION_BITS[context.model_type]
        activation_method = args.activation_method or DEFAULT_ACTIVATION_METHOD[activation_bits]

        weights = find_weights(context.model, context.model_dir, min_elements=1)
        components = detect_components(context.model, weights)
        layers = [w for w in weights if w.name in components]
        counted = [w for w in layers if w.size >= args.min_elements]
        infos = {w.name: components[w.name] for w in layers}
        configured = _configured(config, infos, args.layer_wise_config)
        precisions = {w.name: configured.get(w.name, by_component[infos[w.name].component]) for w in layers}
        table: dict[str, dict[str, float]] = {}
        if args.sensitivity_analysis:
            pinned = {n: p for n, p in precisions.items() if n in configured or infos[n].component in explicit}
            target = args.target_bits if args.target_bits is not None else _bits_per_weight(counted, precisions)
            chosen, table, parameters["sensitivity"] = _choose_by_sensitivity(
                context, counted, pinned, _candidates(args, activation_bits), target)
            precisions.update(chosen)
        wide = sorted(name for name, p in precisions.items() if p == "int16")
        if args.target == "qnn" and activation_bits == 8 and wide:
            raise InputError(f"int16 weights ({len(wide)} layers, e.g. {wide[0]!r}) need 16-bit activations on "
                             "the QNN HTP: pass --activation-bits 16, or choose another precision")

        entries = {w.name: HybridLayer(infos[w.name], precisions[w.name], w.size, math.nan, table.get(w.name))
                   for w in layers}
        parameters.update(
            model_family=family,
            precisions=by_component,
            activation_bits=activation_bits,
            activation_method=activation_method,
            assigned_bits_per_weight=round(_bits_per_weight(counted, precisions), 4),
            components={c: sum(1 for info in infos.values() if info.component == c) for c in COMPONENTS},
        )
        return _quantize(context, layers, entries, activation_bits, activation_method)

    return run_method("hybrid", args, quantize, parameters=parameters)
