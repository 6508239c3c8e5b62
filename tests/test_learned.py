"""``pyqshare learned``: BatchNorm folding, AdaRound, bias correction, the command, MiniLM and the HTP."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from pyqshare import kernels
from pyqshare.calibration import default_inputs, run_model
from pyqshare.evaluate import evaluate
from pyqshare.model import find_weights
from pyqshare.quantization.adaround import adaround
from pyqshare.quantization.bias_correction import BiasCorrection, add_missing_biases
from pyqshare.quantization.folding import fold_batch_norms
from pyqshare.quantization.pipeline import quantize_model
from pyqshare.quantization.rounding import gptq_assign, gptq_round, inverse_upper_cholesky
from pyqshare.quantization.scheme import QuantScheme, WeightScheme


# ------------------------------------------------------------------------------------------------ model builders


class Graph:
    """A small ONNX graph under construction, with seeded random initializers."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def init(self, name: str, values) -> str:
        self.initializers.append(numpy_helper.from_array(np.asarray(values, dtype=np.float32), name))
        return name

    def node(self, op: str, inputs: list[str], output: str, **attrs) -> str:
        self.nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output

    def bn(self, x: str, channels: int, output: str) -> str:
        r = self.rng
        params = [self.init(f"{output}.{key}", values) for key, values in (
            ("scale", r.uniform(0.5, 2.0, channels)), ("bias", r.normal(0, 0.5, channels)),
            ("mean", r.normal(0, 0.5, channels)), ("var", r.uniform(0.2, 2.0, channels)))]
        return self.node("BatchNormalization", [x, *params], output, epsilon=1e-3)

    def model(self, inputs: dict[str, list[int]], outputs: list[str]) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, "g",
            [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in inputs.items()],
            [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in outputs],
            self.initializers,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
        model.ir_version = 10
        return onnx.shape_inference.infer_shapes(model)


def small_cnn(path: Path) -> Path:
    """Conv+BN+Relu, Conv(bias, stride 2)+BN+Relu, pooling, Gemm without bias: a vision model to quantize."""
    g = Graph(seed=1)
    r = g.rng
    x = g.node("Conv", ["image", g.init("conv1.w", r.normal(0, 0.3, (8, 3, 3, 3)))], "conv1", pads=[1, 1, 1, 1])
    x = g.node("Relu", [g.bn(x, 8, "bn1")], "relu1")
    x = g.node("Conv", [x, g.init("conv2.w", r.normal(0, 0.2, (16, 8, 3, 3))), g.init("conv2.b", r.normal(0, 0.1, 16))],
               "conv2", pads=[1, 1, 1, 1], strides=[2, 2])
    x = g.node("Relu", [g.bn(x, 16, "bn2")], "relu2")
    x = g.node("Flatten", [g.node("GlobalAveragePool", [x], "pool")], "flatten")
    g.node("Gemm", [x, g.init("fc.w", r.normal(0, 0.3, (10, 16)))], "logits", transB=1)
    onnx.save(g.model({"image": [1, 3, 16, 16]}, ["logits"]), path)
    return path


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


# ---------------------------------------------------------------------------------------------- BatchNorm folding


def foldable_model() -> onnx.ModelProto:
    """Every folded pattern: Conv+BN+Relu (its weight in a Constant node), grouped ConvTranspose+BN, Gemm (transB,
    alpha, beta, C)+BN, Gemm with beta 0+BN, Gemm without C+BN, 2-D MatMul+BN."""
    g = Graph()
    r = g.rng
    x = g.node("Conv", ["image", g.init("cw", r.normal(size=(8, 3, 3, 3)))], "conv", pads=[1, 1, 1, 1])
    x = g.node("Relu", [g.bn(x, 8, "bn_conv")], "relu")
    x = g.node("ConvTranspose", [x, g.init("tw", r.normal(size=(8, 3, 3, 3))), g.init("tb", r.normal(size=6))],
               "deconv", group=2, strides=[2, 2])
    g.bn(x, 6, "y_deconv")
    x = g.node("Gemm", ["v", g.init("gw", r.normal(size=(5, 16))), g.init("gc", r.normal(size=5))], "gemm",
               transB=1, alpha=0.7, beta=0.3)
    g.bn(x, 5, "y_gemm")
    x = g.node("Gemm", ["v", g.init("gw0", r.normal(size=(16, 4))), g.init("gc0", r.normal(size=1))], "gemm_beta0",
               beta=0.0)
    g.bn(x, 4, "y_gemm_beta0")
    x = g.node("Gemm", ["v", g.init("gw1", r.normal(size=(16, 3)))], "gemm_no_c")
    g.bn(x, 3, "y_gemm_no_c")
    x = g.node("MatMul", ["v", g.init("mw", r.normal(size=(16, 4)))], "matmul")
    g.bn(x, 4, "y_matmul")
    conv_weight = g.initializers.pop(0)
    g.nodes.insert(0, helper.make_node("Constant", [], [conv_weight.name], value=conv_weight))
    return g.model({"image": [2, 3, 8, 8], "v": [3, 16]},
                   ["y_deconv", "y_gemm", "y_gemm_beta0", "y_gemm_no_c", "y_matmul"])


def test_batchnorm_folding_is_exact_through_onnxruntime():
    model = foldable_model()
    rng = np.random.default_rng(7)
    feeds = {"image": rng.normal(size=(2, 3, 8, 8)).astype(np.float32),
             "v": rng.normal(size=(3, 16)).astype(np.float32)}
    reference = run(model, feeds)
    folded = onnx.ModelProto()
    folded.CopyFrom(model)
    names = fold_batch_norms(folded)
    assert names == ["bn_conv", "y_deconv", "y_gemm", "y_gemm_beta0", "y_gemm_no_c", "y_matmul"]
    onnx.checker.check_model(folded, full_check=True)
    ops = [node.op_type for node in folded.graph.node]
    assert "BatchNormalization" not in ops and ops.count("Add") == 1  # the MatMul's BN became its bias
    assert ops.count("Constant") == 1  # the Conv's weight, folded where it lives
    kept = {t.name for t in folded.graph.initializer}
    assert not [name for name in kept if ".scale" in name or ".var" in name]
    assert "gc0" not in kept  # beta 0: the Gemm got a fresh per-channel C; the [1] one it ignored is gone
    for expected, actual in zip(reference, run(folded, feeds), strict=True):
        np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5 * float(np.abs(expected).max()))
    # The MatMul + Add it left is a bias that quantization recognizes.
    roles = {w.name: (w.role, w.bias_of) for w in find_weights(folded, None, min_elements=1)}
    assert roles["y_matmul.folded_shift"] == ("bias", "mw")


def test_unfoldable_pairs_are_left_alone():
    g = Graph()
    r = g.rng
    x = g.node("Conv", ["image", g.init("cw", r.normal(size=(4, 3, 3, 3)))], "conv")
    g.bn(x, 4, "y_bn")
    g.node("Relu", [x], "y_also")  # the conv's output has a second reader
    x = g.node("MatMul", ["seq", g.init("mw", r.normal(size=(16, 4)))], "matmul")
    g.bn(x, 5, "y_seq")  # 3-D product: BN's axis 1 is the sequence, not the MatMul's output channel
    model = g.model({"image": [1, 3, 8, 8], "seq": [1, 5, 16]}, ["y_bn", "y_also", "y_seq"])
    before = model.SerializeToString()
    assert fold_batch_norms(model) == []
    assert model.SerializeToString() == before


# ------------------------------------------------------------------------------------------------------ AdaRound


def correlated_layer(seed: int, rows: int = 512, inputs: int = 48, outputs: int = 24):
    """A layer weight and inputs with correlated features of uneven energy (like real activations)."""
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(inputs, inputs)) * rng.uniform(0.2, 3.0, size=inputs)
    x = rng.normal(size=(rows, inputs)) @ mixing + rng.normal(size=inputs)
    weight = (rng.standard_t(5, size=(inputs, outputs)) * 0.05).astype(np.float32)
    return weight, x


def output_error(x: np.ndarray, weight: np.ndarray, codes: np.ndarray, scale: np.ndarray) -> float:
    return float(np.sum((x @ (weight - codes * scale.astype(np.float64))) ** 2))


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("seed", [0, 1])
def test_adaround_beats_nearest_rounding_on_calibration_outputs(bits, seed):
    weight, x = correlated_layer(seed)
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    scale, zero_point = kernels.scale_search(weight, bits, axis=1, symmetric=True, objective="mse")
    codes = adaround(weight, scale, zero_point, qmin, qmax, x.T @ x)
    assert codes.dtype == np.int32 and codes.min() >= qmin and codes.max() <= qmax
    scaled = weight / scale.astype(np.float64)
    # Only floor or ceil of each weight (or its clipped code): AdaRound chooses the direction, nothing else.
    assert np.all((codes == np.clip(np.floor(scaled), qmin, qmax)) | (codes == np.clip(np.ceil(scaled), qmin, qmax)))
    nearest = np.clip(np.rint(scaled), qmin, qmax)
    learned_error, nearest_error = output_error(x, weight, codes, scale), output_error(x, weight, nearest, scale)
    assert learned_error < 0.7 * nearest_error, (learned_error, nearest_error)


def test_adaround_is_never_worse_than_nearest_and_zero_iterations_is_nearest():
    weight, x = correlated_layer(3)
    scale, zero_point = kernels.scale_search(weight, 8, axis=1, symmetric=True, objective="mse")
    nearest = kernels.quantize(weight, scale, zero_point, 8, axis=1)
    np.testing.assert_array_equal(adaround(weight, scale, zero_point, -128, 127, x.T @ x, iterations=0), nearest)
    for iterations in (1, 3, 10):  # too few steps to harden: the guard keeps nearest rounding's error or better
        codes = adaround(weight, scale, zero_point, -128, 127, x.T @ x, iterations=iterations)
        assert output_error(x, weight, codes, scale) <= output_error(x, weight, nearest, scale)


def test_adaround_respects_asymmetric_grids_and_clipped_weights():
    weight, x = correlated_layer(4)
    weight[0, :] = 1.0  # far outside the grid below: clipped to qmax whatever the rounding
    scale = np.full(weight.shape[1], 0.002, dtype=np.float32)
    zero_point = np.full(weight.shape[1], 100, dtype=np.uint8)
    codes = adaround(weight, scale, zero_point, 0, 255, x.T @ x)
    assert codes.min() >= 0 and codes.max() <= 255 and np.all(codes[0] == 255)


def test_adaround_and_gptq_on_the_same_layer():
    """Both beat nearest rounding; GPTQ, free to move codes by more than one step, wins here as on MiniLM."""
    weight, x = correlated_layer(5)
    scale, zero_point = kernels.scale_search(weight, 4, axis=1, symmetric=True, objective="mse")
    gram = x.T @ x
    nearest = kernels.quantize(weight, scale, zero_point, 4, axis=1).astype(np.float64)
    errors = {
        "nearest": output_error(x, weight, nearest, scale),
        "adaround": output_error(x, weight, adaround(weight, scale, zero_point, -8, 7, gram), scale),
        "gptq": output_error(x, weight, gptq_round(weight, scale, zero_point.astype(np.float64), -8, 7, gram), scale),
    }
    assert errors["gptq"] < errors["adaround"] < errors["nearest"], errors


@pytest.mark.parametrize(("rows", "columns"), [(1, 1), (2, 7), (127, 3), (128, 1), (129, 17), (300, 40)])
def test_gptq_block_step_in_cpp_gives_the_numpy_reference_codes(rows, columns):
    """Grid and look-up-table snapping (one codebook, one per channel), across block boundaries, with exact
    ties (values on a midpoint or half a step) and clipped values."""
    rng = np.random.default_rng(rows * 1000 + columns)
    x = rng.standard_normal((rows + 5, rows))
    gram = x.T @ x
    gram[0] = gram[:, 0] = 0.0  # a dead input
    weight = np.round(rng.standard_t(4, (rows, columns)) * 8) / 16  # many values exactly on ties
    scale = np.full(columns, 0.125)
    zero_point = rng.integers(-2, 3, columns).astype(np.float64)
    np.testing.assert_array_equal(gptq_round(weight, scale, zero_point, -8, 7, gram),
                                  gptq_round(weight, scale, zero_point, -8, 7, gram, reference=True))
    for codebooks in (np.array([[-0.5, -0.25, 0.0, 0.25, 1.0]]), np.sort(rng.normal(0, 0.4, (columns, 4)), axis=1)):
        np.testing.assert_array_equal(gptq_assign(weight, codebooks, gram),
                                      gptq_assign(weight, codebooks, gram, reference=True))


def test_gptq_block_step_refuses_what_would_read_or_write_out_of_bounds():
    from pyqshare import _core

    work, upper = np.zeros((4, 3)), np.eye(4)
    codes, errors = np.zeros((4, 3), np.int32), np.zeros((4, 3))
    books, midpoints = np.array([[0.0, 1.0]]), np.array([[0.5]])
    with pytest.raises(TypeError, match="float64"):
        _core.gptq_block_codebook(work.astype(np.float32), upper, 0, 4, books, midpoints, codes, errors)
    with pytest.raises(ValueError, match="C-contiguous"):
        _core.gptq_block_codebook(np.zeros((3, 4)).T, upper, 0, 4, books, midpoints, codes, errors)
    with pytest.raises(ValueError, match="start <= stop <= rows"):
        _core.gptq_block_codebook(work, upper, 2, 5, books, midpoints, codes, errors)
    with pytest.raises(ValueError, match="upper"):
        _core.gptq_block_codebook(work, np.eye(3), 0, 4, books, midpoints, codes, errors)
    with pytest.raises(ValueError, match="midpoints"):
        _core.gptq_block_codebook(work, upper, 0, 4, books, np.zeros((1, 2)), codes, errors)
    with pytest.raises(ValueError, match="one value per column"):
        _core.gptq_block_grid(work, upper, 0, 4, np.ones(2), np.zeros(3), -8.0, 7.0, codes, errors)


@pytest.mark.parametrize("size", [1, 2, 3, 127, 128, 129, 300, 515])
def test_gptq_factor_is_the_upper_cholesky_factor_of_the_inverse(size):
    """The blocked triangular route gives what the textbook cholesky(inv(H)).T gives, across block splits."""
    rng = np.random.default_rng(size)
    x = rng.standard_normal((size + 7, size)) * rng.uniform(0.01, 10.0, size)
    gram = x.T @ x + 1e-3 * np.eye(size)
    upper = inverse_upper_cholesky(gram)
    assert np.array_equal(upper, np.triu(upper)) and np.all(np.diag(upper) > 0)
    expected = np.linalg.cholesky(np.linalg.inv(gram)).T
    np.testing.assert_allclose(upper, expected, rtol=0, atol=1e-9 * np.abs(expected).max())


# ------------------------------------------------------------------------------------------------ bias correction


def biased_layers_model() -> onnx.ModelProto:
    """MatMul + Add, Gemm (transB, alpha, beta), and a strided, padded, dilated, grouped Conv without bias, fed
    inputs with non-zero means (the case bias correction is for)."""
    g = Graph(seed=2)
    r = g.rng
    g.node("Add", [g.node("MatMul", ["seq", g.init("mw", r.normal(0, 0.2, (32, 16)))], "mm"),
                   g.init("mb", r.normal(size=16))], "y_matmul")
    g.node("Gemm", ["v", g.init("gw", r.normal(0, 0.2, (12, 32))), g.init("gc", r.normal(size=12))], "y_gemm",
           transB=1, alpha=0.5, beta=2.0)
    g.node("Conv", ["image", g.init("cw", r.normal(0, 0.2, (8, 2, 3, 3)))], "y_conv",
           pads=[2, 1, 0, 2], strides=[2, 1], dilations=[1, 2], group=2)
    return g.model({"seq": [1, 20, 32], "v": [64, 32], "image": [2, 4, 9, 10]}, ["y_matmul", "y_gemm", "y_conv"])


def biased_samples(count: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"seq": rng.normal(1.5, 1.0, (1, 20, 32)).astype(np.float32),
             "v": rng.normal(-1.0, 1.0, (64, 32)).astype(np.float32),
             "image": rng.uniform(0.0, 3.0, (2, 4, 9, 10)).astype(np.float32)} for _ in range(count)]


def channel_mean_errors(reference: list[dict], candidate: list[dict]) -> dict[str, np.ndarray]:
    """Per output: the mean error of each output channel (the last axis, axis 1 for the Conv) over samples."""
    errors = {}
    for name in reference[0]:
        axis = 1 if name == "y_conv" else -1
        diff = np.stack([c[name] - r[name] for r, c in zip(reference, candidate, strict=True)]).astype(np.float64)
        diff = np.moveaxis(diff, axis if axis < 0 else axis + 1, -1)
        errors[name] = diff.reshape(-1, diff.shape[-1]).mean(axis=0)
    return errors


def test_bias_correction_predicts_the_mean_shift_exactly():
    """The shift it removes equals the float model's mean output change for the weight change, for every layer
    geometry (a model with W + delta, run through onnxruntime)."""
    model = biased_layers_model()
    assert add_missing_biases(model) == ["y_conv"]
    samples = biased_samples(3, seed=0)
    corrector = BiasCorrection(model, samples)
    before = run_model(model.SerializeToString(), samples)
    weights = {w.name: w for w in find_weights(model, None, min_elements=1)}
    rng = np.random.default_rng(1)
    deltas = {name: rng.normal(0, 0.05, weights[name].shape) for name in ("mw", "gw", "cw")}
    perturbed = onnx.ModelProto()
    perturbed.CopyFrom(model)
    for tensor in perturbed.graph.initializer:
        if tensor.name in deltas:
            moved = numpy_helper.to_array(tensor) + deltas[tensor.name].astype(np.float32)
            tensor.CopyFrom(numpy_helper.from_array(moved, tensor.name))
    shifted = channel_mean_errors(before, run_model(perturbed.SerializeToString(), samples))
    conv_bias = next(t.name for t in model.graph.initializer if t.name.startswith("y_conv"))
    biases = {"mw": "mb", "gw": "gc", "cw": conv_bias}
    for weight_name, output in (("mw", "y_matmul"), ("gw", "y_gemm"), ("cw", "y_conv")):
        weight = weights[weight_name]
        old_bias = np.array(weights[biases[weight_name]].array(), dtype=np.float64)
        corrector(weight, np.array(weight.array()), np.array(weight.array()) + deltas[weight_name])
        new_bias = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == biases[weight_name]))
        scale = 2.0 if weight_name == "gw" else 1.0  # Gemm: beta * C moves the output
        np.testing.assert_allclose(scale * (old_bias - new_bias), shifted[output], rtol=1e-4, atol=1e-5)
    assert set(corrector.corrected) == {"mw", "gw", "cw"}


@pytest.mark.parametrize("bits", [4, 8])
def test_bias_correction_reduces_the_quantized_models_mean_output_error(bits):
    samples = biased_samples(8, seed=3)
    evaluation = biased_samples(8, seed=4)
    scheme = QuantScheme(weights=WeightScheme(bits=bits, rounding="nearest"), activation_bits=16)
    reference = run_model(biased_layers_model().SerializeToString(), evaluation)
    errors = {}
    for corrected in (False, True):
        model = biased_layers_model()
        hook = None
        if corrected:
            add_missing_biases(model)
            hook = BiasCorrection(model, samples)
        quantized = quantize_model(model, samples, scheme, on_weight_quantized=hook)
        errors[corrected] = channel_mean_errors(reference, run_model(quantized.model.SerializeToString(), evaluation))
    for name in ("y_matmul", "y_gemm", "y_conv"):
        plain, fixed = np.abs(errors[False][name]).mean(), np.abs(errors[True][name]).mean()
        assert fixed < 0.5 * plain, (name, plain, fixed)


# ---------------------------------------------------------------------------------------------------- the command


def test_cli_json_is_one_object_and_records_everything(tmp_path, run_method):
    model = small_cnn(tmp_path / "cnn.onnx")
    output = tmp_path / "q.onnx"
    # --target cpu: learned folds the BatchNorms itself (with --target qnn, prepare has folded them already).
    # run_method parses the whole of stdout as one JSON object.
    report = run_method("learned", model, output, "--epochs", "3", "--learning-rate", "5e-5", "--target", "cpu")
    parameters = report["parameters"]
    assert parameters["folded_batchnorms"] == 2 and parameters["added_biases"] == 1  # the Gemm had no C
    assert parameters["bias_corrected_layers"] == 3 and parameters["rounding"] == "adaround"
    assert parameters["training_flags_ignored"] == {"epochs": 3, "learning_rate": 5e-5}
    assert parameters["activation_bits"] == 8 and report["model_type"] == "vision"
    quantized = onnx.load(output)
    onnx.checker.check_model(quantized, full_check=True)
    assert "BatchNormalization" not in {node.op_type for node in quantized.graph.node}
    assert report["min_sqnr_db"] > 35.0  # measured 44 dB
    assert json.loads((tmp_path / "q.summary.json").read_text())["parameters"] == parameters
    assert (tmp_path / "q.encodings").is_file()


@pytest.mark.parametrize(("flags", "rounding"), [(["--iterations", "0"], "nearest"), (["--rounding", "gptq"], "gptq")])
def test_cli_switches_off_folding_and_bias_correction(tmp_path, run_method, flags, rounding):
    model = small_cnn(tmp_path / "cnn.onnx")
    parameters = run_method("learned", model, tmp_path / "q.onnx", "--no-fold-bn", "--no-bias-correction",
                            "--weight-bits", "4", "--target", "cpu", *flags)["parameters"]
    assert parameters["folded_batchnorms"] == 0 and parameters["bias_corrected_layers"] == 0
    assert parameters["rounding"] == rounding and parameters["weight_bits"] == 4
    assert "BatchNormalization" in {node.op_type for node in onnx.load(tmp_path / "q.onnx").graph.node}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--train-dataset", "glue/mrpc"], "--train-dataset: pyqshare does no training"),
        (["--iterations", "-1"], "--iterations must be at least 0"),
        (["--epochs", "0"], "--epochs must be at least 1"),
        (["--batch-size", "-4"], "--batch-size must be at least 1"),
        (["--learning-rate", "nan"], "--learning-rate must be a positive number"),
    ],
)
def test_cli_refusals_exit_2_and_write_nothing(tmp_path, run_cli, args, message):
    model = small_cnn(tmp_path / "cnn.onnx")
    result = run_cli("learned", "--model-path", model, "--output-path", tmp_path / "q.onnx", *args, "--json")
    assert result.returncode == 2
    assert result.stdout == "" and message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert sorted(path.name for path in tmp_path.iterdir()) == ["cnn.onnx"]


@pytest.mark.parametrize("flag", [["--weight-bits", "16"], ["--rounding", "stochastic"], ["--epochs", "three"]])
def test_cli_usage_errors_exit_2(tmp_path, run_cli, flag):
    model = small_cnn(tmp_path / "cnn.onnx")
    result = run_cli("learned", "--model-path", model, "--output-path", tmp_path / "q.onnx", *flag)
    assert result.returncode == 2 and flag[0] in result.stderr


# ------------------------------------------------------------------------------------------ real models and the HTP


def test_minilm(minilm_onnx, tmp_path, run_method):
    """all-MiniLM-L6-v2 end to end, at 20 AdaRound iterations to keep the test short. Measured (min over outputs):
    nearest rounding 24.3 dB, nearest + bias correction 25.8, AdaRound 20 iterations + bias correction 26.1,
    the default 100 iterations 28.2; per-channel's GPTQ 32.8."""
    output = tmp_path / "minilm-learned.onnx"
    report = run_method("learned", minilm_onnx, output, "--iterations", "20")
    assert report["parameters"]["folded_batchnorms"] == 0  # a transformer has none
    assert report["parameters"]["bias_corrected_layers"] == 36  # every MatMul + Add of the six layers
    assert report["parameters"]["activation_bits"] == 16
    assert report["min_sqnr_db"] > 25.5  # measured 26.1 dB


def test_learned_model_runs_on_the_htp_simulator(tmp_path, require_qnn, run_method):
    model = small_cnn(tmp_path / "cnn.onnx")
    output = tmp_path / "q.onnx"
    run_method("learned", model, output)
    sample = default_inputs(onnx.load(model), count=1, purpose="evaluation")
    report = evaluate(model, output, samples=sample, qnn=True)  # CPU fallback disabled: all of it on the HTP
    assert report["qnn"]["min_sqnr_db"] > 35.0  # measured 47 dB
    assert report["qnn"]["against_cpu_candidate"]["logits"]["sqnr_db"] > 35.0
