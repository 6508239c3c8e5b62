"""The int8/int4/per-channel methods and the QDQ pipeline, on synthetic graphs and on real models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

from pyqshare.calibration import default_inputs, run_model
from pyqshare.encodings import read_encodings
from pyqshare.evaluate import evaluate, summarize_outputs
from pyqshare.methods.peers import onnxruntime_quantize_static
from pyqshare.model import load_model
from pyqshare.zoo import synthetic_cnn as conv_model
from pyqshare.zoo import synthetic_mlp as mlp_model

QDQ = {"QuantizeLinear", "DequantizeLinear"}


def dequantized_weights(path: Path) -> dict[str, tuple[onnx.NodeProto, dict]]:
    """DequantizeLinear nodes reading an initializer: {output name: (node, {input name: array})}."""
    model = onnx.load(path)
    inits = {t.name: t for t in model.graph.initializer}
    return {
        node.output[0]: (node, {name: numpy_helper.to_array(inits[name]) for name in node.input if name in inits})
        for node in model.graph.node
        if node.op_type == "DequantizeLinear" and node.input[0] in inits
    }


@pytest.mark.parametrize("build", [mlp_model, conv_model])
def test_every_float_tensor_a_node_reads_comes_through_dequantize(tmp_path, run_method, build):
    source = build(tmp_path / "float.onnx")
    shape = "x=1," + ("16,32" if build is mlp_model else "3,16,16")
    run_method("per-channel", source, tmp_path / "q.onnx", "--input-shape", shape)
    model = onnx.load(tmp_path / "q.onnx")
    produced_by = {out: node for node in model.graph.node for out in node.output}
    inits = {t.name for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type in QDQ:
            continue
        for name in node.input:
            assert name not in inits, f"{node.name} reads float initializer {name}"
            producer = produced_by.get(name)
            assert producer is not None and producer.op_type == "DequantizeLinear", (node.name, name)
    assert {o.name for o in model.graph.output} <= {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}


def test_int8_baseline_is_per_tensor_symmetric_min_max(tmp_path, run_method):
    source = mlp_model(tmp_path / "float.onnx")
    summary = run_method("int8", source, tmp_path / "q.onnx", "--input-shape", "x=1,16,32")
    weights = dequantized_weights(tmp_path / "q.onnx")
    node, arrays = weights["w1"]
    codes, scale, zero = (arrays[name] for name in node.input)
    original = numpy_helper.to_array(onnx.load(source).graph.initializer[0])
    assert codes.dtype == np.int8 and scale.shape == () and zero == 0
    np.testing.assert_allclose(scale, np.abs(original).max() / 127, rtol=1e-6)
    assert summary["parameters"] == {"weight_bits": 8, "activation_bits": 8}
    # 8-bit activations: every activation QuantizeLinear produces uint8.
    model = onnx.load(tmp_path / "q.onnx")
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert {inits[n.input[2]].dtype for n in model.graph.node if n.op_type == "QuantizeLinear"} == {np.dtype(np.uint8)}


def test_int4_baseline_packs_signed_4_bit_weights(tmp_path, run_method):
    source = mlp_model(tmp_path / "float.onnx")
    run_method("int4", source, tmp_path / "q.onnx", "--input-shape", "x=1,16,32")
    model = onnx.load(tmp_path / "q.onnx")
    assert {t.data_type for t in model.graph.initializer if t.name == "w1_quantized"} == {TensorProto.INT4}


def test_per_channel_levels_each_improve_the_output(tmp_path, run_method):
    source = mlp_model(tmp_path / "float.onnx", features=64, hidden=128)
    sqnr = {}
    for level in (0, 1, 2):
        summary = run_method("per-channel", source, tmp_path / f"q{level}.onnx", "--input-shape", "x=1,16,64",
                             "--weight-bits", "4", "--optimization-level", level)
        sqnr[level] = summary["min_sqnr_db"]
        assert summary["parameters"]["optimization_level"] == level
    # MSE scales beat min-max, and GPTQ rounding beats nearest rounding by a clear margin at 4 bits.
    assert sqnr[1] > sqnr[0]
    assert sqnr[2] > sqnr[1] + 1.0


def test_per_channel_scales_run_along_output_channels(tmp_path, run_method):
    source = conv_model(tmp_path / "float.onnx")
    run_method("per-channel", source, tmp_path / "q.onnx", "--input-shape", "x=1,3,16,16")
    weights = dequantized_weights(tmp_path / "q.onnx")
    conv, arrays = weights["c1"]
    assert next(a.i for a in conv.attribute if a.name == "axis") == 0 and arrays[conv.input[1]].shape == (16,)
    gemm, arrays = weights["fc"]  # transB=1: [out, in], channels on axis 0
    assert next(a.i for a in gemm.attribute if a.name == "axis") == 0 and arrays[gemm.input[1]].shape == (10,)
    bias, arrays = weights["c1b"]  # Conv bias: int32 at input_scale * weight_scale
    assert arrays[bias.input[0]].dtype == np.int32


def test_summary_encodings_and_json_agree(tmp_path, run_method):
    source = mlp_model(tmp_path / "float.onnx")
    out = tmp_path / "q.onnx"
    summary = run_method("per-channel", source, out, "--input-shape", "x=1,16,32", "--encodings-version", "0.6.1")
    assert json.loads((tmp_path / "q.summary.json").read_text()) == summary
    for key in ("method", "model", "output", "size_bytes", "packed_bytes", "bits_per_weight", "calibration",
                "outputs", "layers"):
        assert key in summary
    assert summary["size_bytes"] == out.stat().st_size
    assert set(summary["layers"]) == {"w1", "w2"}
    encodings = read_encodings(tmp_path / "q.encodings")
    assert {"w1", "w2"} <= set(encodings.params)
    assert encodings.params["w1"].bitwidth == 8 and encodings.activations["y"].bitwidth == 16


@pytest.mark.parametrize(
    "flags, message",
    [
        (("--block-size", "32"), "block-wise"),
        (("--weight-bits", "4", "--optimize-zero-points"), "symmetric"),
        (("--weight-bits", "5"), "invalid choice"),
        (("--num-threads", "0"), "--num-threads: num_threads must be >= 1"),
    ],
)
def test_refusals_exit_2_with_a_reason(tmp_path, run_cli, flags, message):
    source = mlp_model(tmp_path / "float.onnx")
    done = run_cli("per-channel", "--model-path", source, "--output-path", tmp_path / "q.onnx", "--input-shape",
                   "x=1,16,32", *flags, cwd=tmp_path)
    assert done.returncode == 2 and message in done.stderr
    assert not (tmp_path / "q.onnx").exists()


def test_a_missing_model_exits_2(tmp_path, run_cli):
    done = run_cli("int8", "--model-path", tmp_path / "none.onnx", "--output-path", tmp_path / "q.onnx", cwd=tmp_path)
    assert done.returncode == 2 and "none.onnx" in done.stderr


# ---------------------------------------------------------------------------------------------- real models


@pytest.fixture(scope="module")
def minilm_per_channel(minilm_onnx, tmp_path_factory, run_method):
    folder = tmp_path_factory.mktemp("minilm")
    summary = run_method("per-channel", minilm_onnx, folder / "q.onnx")
    return folder / "q.onnx", summary


def test_minilm_per_channel_reaches_30_db(minilm_per_channel):
    _, summary = minilm_per_channel
    assert summary["parameters"]["activation_bits"] == 16 and summary["parameters"]["weight_bits"] == 8
    assert summary["min_sqnr_db"] >= 30.0, summary["outputs"]


@pytest.mark.filterwarnings("ignore::UserWarning")  # onnxruntime's quantizer suggests its own pre-processing
def test_minilm_per_channel_beats_onnxruntime_quantize_static(minilm_onnx, minilm_per_channel, tmp_path):
    from pyqshare.prepare import prepare_model

    _, summary = minilm_per_channel
    prepare_model(minilm_onnx, tmp_path / "prepared.onnx", placement="none")
    prepared = load_model(tmp_path / "prepared.onnx")
    onnxruntime_quantize_static(tmp_path / "prepared.onnx", tmp_path / "ort.onnx",
                         default_inputs(prepared, purpose="calibration"), 16)
    evaluation = default_inputs(load_model(minilm_onnx), purpose="evaluation")
    ort = summarize_outputs(run_model(minilm_onnx, evaluation), run_model(tmp_path / "ort.onnx", evaluation))
    assert summary["min_sqnr_db"] > ort["min_sqnr_db"]


def test_minilm_per_channel_runs_whole_on_the_htp(minilm_onnx, minilm_per_channel, require_qnn):
    from pyqshare.qnn.placement import placement_report

    path, _ = minilm_per_channel
    placement = placement_report(path)
    assert placement.cpu_nodes == 0 and placement.partitions == 1, placement.to_dict()
    # With CPU fallback disabled the simulated HTP runs it; its fixed-point arithmetic loses ~3 dB (measured 29.2).
    report = evaluate(minilm_onnx, path, samples=default_inputs(load_model(path), purpose="evaluation", count=1), qnn=True)
    assert report["qnn"]["min_sqnr_db"] > 25.0, report["qnn"]


@pytest.mark.filterwarnings("ignore::UserWarning")  # onnxruntime's quantizer suggests its own pre-processing
def test_real_cnn_per_channel_beats_onnxruntime_and_runs_on_the_htp(ppocr_cls_onnx, tmp_path, require_qnn, run_method):
    """PP-OCR's MobileNetV3 classifier (Conv+BN, hard-swish, SE blocks, Softmax), 8-bit activations."""
    from pyqshare.prepare import prepare_model
    from pyqshare.qnn.placement import placement_report

    shape = {"x": (1, 3, 48, 192)}
    summary = run_method("per-channel", ppocr_cls_onnx, tmp_path / "q.onnx", "--input-shape", "x=1,3,48,192")
    assert summary["model_type"] == "vision" and summary["parameters"]["activation_bits"] == 8
    prepare_model(ppocr_cls_onnx, tmp_path / "prepared.onnx", shape, placement="none")
    prepared = load_model(tmp_path / "prepared.onnx")
    onnxruntime_quantize_static(tmp_path / "prepared.onnx", tmp_path / "ort.onnx",
                         default_inputs(prepared, purpose="calibration"), 8)
    evaluation = default_inputs(prepared, purpose="evaluation")
    ort = summarize_outputs(run_model(ppocr_cls_onnx, evaluation), run_model(tmp_path / "ort.onnx", evaluation))
    assert summary["min_sqnr_db"] > ort["min_sqnr_db"], (summary["outputs"], ort["outputs"])
    placement = placement_report(tmp_path / "q.onnx")
    assert placement.cpu_nodes == 0 and placement.partitions == 1, placement.to_dict()


def _quantized_vs_float(model: onnx.ModelProto, bits: int = 8) -> tuple[onnx.ModelProto, float]:
    """(the QDQ model, its output SQNR against the float model) under the per-channel pipeline."""
    from pyqshare.quantization.pipeline import quantize_model
    from pyqshare.quantization.scheme import QuantScheme, WeightScheme

    reference = run_model(model, default_inputs(model, purpose="evaluation"))
    quantized = onnx.ModelProto()
    quantized.CopyFrom(model)
    scheme = QuantScheme(weights=WeightScheme(bits=8), activation_bits=bits)
    quantize_model(quantized, default_inputs(model, purpose="calibration"), scheme)
    candidate = run_model(quantized, default_inputs(model, purpose="evaluation"))
    return quantized, summarize_outputs(reference, candidate)["min_sqnr_db"]


def _single_node_model(node: onnx.NodeProto, x_shape, initializers) -> onnx.ModelProto:
    graph = onnx.helper.make_graph(
        [node], "g", [onnx.helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [onnx.helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.asarray(v, np.float32), name) for name, v in initializers.items()],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 21)])
    model.ir_version = 10
    return onnx.shape_inference.infer_shapes(model)


def test_grouped_conv_transpose_bias_is_int32_per_output_channel():
    """A grouped ConvTranspose's weight has O/g channels shared by the groups; its bias has O entries, each at
    input scale times the scale of its slot (output o uses slot o % (O/g))."""
    rng = np.random.default_rng(0)
    weight, bias = rng.normal(0, 0.3, (4, 3, 3, 3)), rng.normal(0, 0.5, 6)
    node = onnx.helper.make_node("ConvTranspose", ["x", "w", "b"], ["y"], name="convT", group=2)
    quantized, sqnr = _quantized_vs_float(_single_node_model(node, [1, 4, 5, 5], {"w": weight, "b": bias}))
    assert sqnr > 30.0
    dq = dequantized_weights_of(quantized)
    _, bias_inputs = dq["b"]
    codes, bias_scale = bias_inputs["b_quantized"], bias_inputs["b_scale"]
    weight_scale = dq["w"][1]["w_scale"]
    assert codes.dtype == np.int32 and bias_scale.shape == (6,) and weight_scale.shape == (3,)
    np.testing.assert_allclose(bias_scale[:3] / weight_scale, bias_scale[3:] / weight_scale, rtol=1e-6)


def test_a_large_bias_on_small_weights_widens_the_weight_scale_instead_of_saturating_int32():
    """16-bit activations give input scales near 1e-5: bias 50 over weights of 1e-6 would need codes far past
    int32. The weight scale of that channel is raised so that the bias fits; the output stays exact."""
    rng = np.random.default_rng(1)
    weight = rng.normal(0, 0.3, (4, 8))
    weight[0] = rng.normal(0, 1e-6, 8)
    bias = np.array([50.0, 0.1, -0.2, 0.3])
    node = onnx.helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc", transB=1)
    quantized, sqnr = _quantized_vs_float(_single_node_model(node, [2, 8], {"w": weight, "b": bias}), bits=16)
    codes = dequantized_weights_of(quantized)["b"][1]["b_quantized"]
    assert np.abs(codes.astype(np.int64)).max() < 2**31 - 1
    assert sqnr > 40.0


def dequantized_weights_of(model: onnx.ModelProto) -> dict[str, tuple[onnx.NodeProto, dict]]:
    """As :func:`dequantized_weights`, keyed by the float tensor each DequantizeLinear replaces."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return {
        node.output[0].removesuffix("_dequantized"): (node, {n: inits[n] for n in node.input if n in inits})
        for node in model.graph.node
        if node.op_type == "DequantizeLinear" and node.input[0] in inits
    }
