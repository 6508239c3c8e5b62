"""``pyqshare cluster``: k-means weight clustering, cluster-aware refinement, grid alignment, QDQ for QNN."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from pyqshare import kernels
from pyqshare.calibration import cpu_session, default_inputs, run_model, run_session
from pyqshare.evaluate import evaluate
from pyqshare.methods.cluster import Clustering, LayerInputs, cluster_model, refit_codebooks
from pyqshare.model import find_weights, load_model
from pyqshare.quantization.rounding import gptq_assign, gptq_round
from pyqshare.quantization.scheme import LINEAR_ROLES
from pyqshare.zoo import synthetic_cnn as cnn_model
from pyqshare.zoo import synthetic_mlp as mlp_model

SHAPES = {mlp_model: "x=1,16,32", cnn_model: "x=1,3,16,16"}


def linear_views(model: onnx.ModelProto, model_dir: Path) -> dict[str, np.ndarray]:
    """Every linear-layer weight as (rows, channels): channel axis last."""
    return {
        w.name: np.moveaxis(np.asarray(w.array()), w.channel_axis, -1).reshape(-1, w.shape[w.channel_axis])
        for w in find_weights(model, model_dir)
        if w.role in LINEAR_ROLES and w.channel_axis is not None
    }


def distinct_counts(view: np.ndarray, per_channel: bool) -> list[int]:
    if per_channel:
        return [np.unique(view[:, channel]).size for channel in range(view.shape[1])]
    return [np.unique(view).size]


def clustered(build, folder: Path, **options) -> tuple[onnx.ModelProto, dict]:
    model = load_model(build(folder / "float.onnx"), load_weights=True)
    layers = cluster_model(model, default_inputs(model, purpose="calibration"), model_dir=folder, **options)
    return model, layers


# ------------------------------------------------------------------------------------------ the clustering


@pytest.mark.parametrize("build", [mlp_model, cnn_model])
@pytest.mark.parametrize("per_channel, k", [(False, 8), (True, 4)])
@pytest.mark.parametrize("grid_aligned", [False, True])
def test_every_linear_weight_takes_exactly_k_values(tmp_path, build, per_channel, k, grid_aligned):
    model, layers = clustered(build, tmp_path, clusters=k, per_channel=per_channel, grid_aligned=grid_aligned)
    views = linear_views(model, tmp_path)
    assert set(layers) == set(views) == ({"w1", "w2"} if build is mlp_model else {"c1", "c2", "fc"})
    for name, view in views.items():
        assert distinct_counts(view, per_channel) == [k] * (view.shape[1] if per_channel else 1), name
        assert layers[name].distinct_values == k


def test_conv_and_gemm_weights_cluster_along_their_output_channels(tmp_path):
    model, _ = clustered(cnn_model, tmp_path, clusters=3, per_channel=True, refine_rounds=0)
    weights = {w.name: np.asarray(w.array()) for w in find_weights(model, tmp_path)}
    for channel in weights["c2"]:  # Conv [out, in, kh, kw]: channel axis 0
        assert np.unique(channel).size == 3
    for channel in weights["fc"]:  # Gemm transB=1 [out, in]: channel axis 0
        assert np.unique(channel).size == 3


def _single_matmul(path: Path, weight: np.ndarray) -> Path:
    """x [1, rows, in] @ w [in, out]: the layer's calibration inputs are the model's inputs."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "one_matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64, weight.shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64, weight.shape[1]])],
        [numpy_helper.from_array(weight.astype(np.float32), "w")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10), path)
    return path


def _skewed_inputs(features: int, count: int, seed: int) -> list[dict[str, np.ndarray]]:
    """Correlated inputs whose features span three orders of magnitude (like a transformer's outlier dims)."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((features, features)) / np.sqrt(features)
    gains = np.logspace(-1.5, 1.5, features)
    return [{"x": ((rng.standard_normal((1, 64, features)) @ mix) * gains).astype(np.float32)} for _ in range(count)]


def _output_sqnr_db(inputs: np.ndarray, weight: np.ndarray, approximation: np.ndarray) -> float:
    reference = inputs.astype(np.float64) @ weight
    return 10 * math.log10(np.sum(reference**2) / np.sum((reference - inputs.astype(np.float64) @ approximation) ** 2))


@pytest.mark.parametrize("per_channel", [False, True])
def test_refinement_raises_the_layer_output_sqnr_where_input_energy_is_skewed(tmp_path, per_channel):
    # The energetic inputs' weights are bounded, the quiet inputs' heavy-tailed: k-means centroids follow the
    # tails, while the output is made by the bounded weights. The least-squares refit weighs by input energy.
    rng = np.random.default_rng(3)
    gains = np.logspace(-1.5, 1.5, 24)
    weight = np.where((gains > 1)[:, None], rng.uniform(-1, 1, (24, 48)), rng.standard_t(2, (24, 48)))
    weight = weight.astype(np.float32)
    source = _single_matmul(tmp_path / "mm.onnx", weight)
    samples = _skewed_inputs(24, 8, seed=4)
    stacked = np.concatenate([s["x"].reshape(-1, 24) for s in samples])
    sqnr, written = {}, {}
    for rounds in (0, 1, 2):
        model = load_model(source, load_weights=True)
        (layer,) = cluster_model(model, samples, clusters=4, per_channel=per_channel, refine_rounds=rounds,
                                 model_dir=tmp_path).values()
        written[rounds] = numpy_helper.to_array(model.graph.initializer[0]).astype(np.float64)
        # The reported layer-output SQNR is X @ W against X @ W_clustered on the calibration inputs.
        assert layer.output_sqnr_db == pytest.approx(_output_sqnr_db(stacked, weight, written[rounds]), abs=1e-3)
        assert distinct_counts(written[rounds], per_channel) == [4] * (48 if per_channel else 1)
        assert layer.output_sqnr_db >= layer.output_sqnr_db_unrefined
        sqnr[rounds] = layer.output_sqnr_db
    # Measured: per tensor 0.9 -> 5.6 -> 6.6 dB, per channel 5.4 -> 9.1 -> 9.6 dB.
    assert sqnr[1] > sqnr[0] + 2.0
    assert sqnr[2] >= sqnr[1]
    # ... and the gain holds on inputs the refinement never saw.
    held_out = np.concatenate([s["x"].reshape(-1, 24) for s in _skewed_inputs(24, 8, seed=5)])
    assert _output_sqnr_db(held_out, weight, written[2]) > _output_sqnr_db(held_out, weight, written[0]) + 2.0


@pytest.mark.parametrize("build", [mlp_model, cnn_model])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("grid_aligned", [False, True])
def test_refinement_never_lowers_a_layers_output_sqnr(tmp_path, build, per_channel, grid_aligned):
    _, layers = clustered(build, tmp_path, clusters=4, per_channel=per_channel, grid_aligned=grid_aligned,
                          refine_rounds=3)
    with_inputs = [layer for layer in layers.values() if layer.output_sqnr_db is not None]
    assert with_inputs  # MatMul and Gemm layers have calibration inputs; Conv layers do not
    for layer in with_inputs:
        assert layer.output_sqnr_db >= layer.output_sqnr_db_unrefined
    for name in ("c1", "c2"):
        if name in layers:
            conv = layers[name]
            assert conv.output_sqnr_db is None and conv.weight_sqnr_db == conv.weight_sqnr_db_unrefined


@pytest.mark.parametrize("per_channel", [False, True])
def test_layers_clustered_in_parallel_give_the_serial_result(tmp_path, per_channel):
    serial, serial_layers = clustered(mlp_model, tmp_path, clusters=4, per_channel=per_channel, num_threads=1)
    parallel, parallel_layers = clustered(mlp_model, tmp_path, clusters=4, per_channel=per_channel, num_threads=3)
    assert [layer.to_dict() for layer in serial_layers.values()] == [layer.to_dict() for layer in parallel_layers.values()]
    for a, b in zip(find_weights(serial, tmp_path), find_weights(parallel, tmp_path), strict=True):
        assert a.name == b.name and np.array_equal(a.array(), b.array())


@pytest.mark.parametrize("per_channel", [False, True])
def test_the_codebook_refit_is_the_least_squares_solution(per_channel):
    rng = np.random.default_rng(7)
    inputs = rng.standard_normal((300, 12)) * np.logspace(-1, 1, 12)  # 12 features: the Gram enters exactly
    weight = rng.standard_normal((12, 5)).astype(np.float32)
    k = 3
    centroids, labels, _ = kernels.kmeans1d(weight, k, axis=1 if per_channel else None)
    start = Clustering(centroids.reshape(-1, k), labels.astype(np.int32))
    refit = refit_codebooks(start, weight, LayerInputs(inputs.T @ inputs))
    # The same problem as an explicit least-squares system: one column per codebook value.
    groups = 5 if per_channel else 1
    design = np.zeros((300, 5, groups, k))
    for row in range(12):
        for channel in range(5):
            design[:, channel, channel if per_channel else 0, labels[row, channel]] += inputs[:, row]
    solution, *_ = np.linalg.lstsq(design.reshape(300 * 5, groups * k), (inputs @ weight).ravel(), rcond=None)
    expected = np.take_along_axis(solution.reshape(groups, k).T, labels.astype(np.int64), axis=0) if per_channel \
        else solution[labels]
    # Equal up to the small ridge towards the k-means codebook (1e-6 of the mean diagonal).
    np.testing.assert_allclose(refit.weights(), expected, rtol=1e-3, atol=1e-5)
    error = np.sum((inputs @ (weight - refit.weights())) ** 2)
    assert error <= np.sum((inputs @ (weight - expected)) ** 2) * (1 + 1e-6)


def test_gptq_assign_on_an_integer_grid_codebook_is_gptq_rounding():
    rng = np.random.default_rng(11)
    inputs = rng.standard_normal((200, 40)) @ rng.standard_normal((40, 40))
    weight = rng.standard_normal((40, 6))
    scale = np.abs(weight).max(axis=0) / 7
    codes = gptq_round(weight, scale, np.zeros(6), -8, 7, inputs.T @ inputs)
    grid = np.arange(-8, 8)[None, :] * scale[:, None]  # one codebook per channel: its 16 grid points
    labels = gptq_assign(weight, grid, inputs.T @ inputs)
    np.testing.assert_array_equal(labels - 8, codes)
    # One shared codebook: every channel takes its values from the same table.
    shared = gptq_assign(weight, np.linspace(-2, 2, 9)[None, :], inputs.T @ inputs)
    assert shared.min() >= 0 and shared.max() <= 8 and len(np.unique(shared)) > 4


def test_adaptive_centroids_pick_the_smallest_k_that_meets_the_target(tmp_path):
    for build in (mlp_model, cnn_model):
        folder = tmp_path / build.__name__
        folder.mkdir()
        _, layers = clustered(build, folder, clusters=64, min_sqnr_db=24.0)
        for name, layer in layers.items():
            achieved = layer.weight_sqnr_db if layer.output_sqnr_db is None else layer.output_sqnr_db
            assert layer.meets_min_sqnr and achieved >= 24.0 and layer.clusters in (2, 4, 8, 16, 32, 64)
            if layer.clusters > 2:  # half the clusters misses the target (weight SQNR for the Conv layers)
                _, smaller = clustered(build, folder, clusters=layer.clusters // 2)
                fewer = smaller[name]
                assert (fewer.weight_sqnr_db if fewer.output_sqnr_db is None else fewer.output_sqnr_db) < 24.0, name


def test_adaptive_centroids_report_a_layer_that_cannot_meet_the_target(tmp_path):
    _, layers = clustered(mlp_model, tmp_path, clusters=4, min_sqnr_db=200.0)
    assert all(layer.clusters == 4 and layer.meets_min_sqnr is False for layer in layers.values())


# ------------------------------------------------------------------------------------------ the written model


def _dequantized_weights(path: Path, names: list[str], sample: dict) -> dict[str, np.ndarray]:
    """The weights as onnxruntime computes them (DequantizeLinear outputs keep the weight names)."""
    with cpu_session(path, extra_outputs=names) as session:
        (outputs,) = run_session(session, [sample], names)
    return outputs


@pytest.mark.parametrize("build", [mlp_model, cnn_model])
@pytest.mark.parametrize("per_channel", [False, True])
def test_grid_aligned_int8_model_holds_exactly_the_clustered_weights(tmp_path, run_method, build, per_channel):
    source = build(tmp_path / "float.onnx")
    flags = ["--input-shape", SHAPES[build], "--clusters", 4, "--grid-aligned", *(["--per-channel"] * per_channel)]
    summary = run_method("cluster", source, tmp_path / "q.onnx", *flags)
    run_method("cluster", source, tmp_path / "f.onnx", *flags, "--no-quantize")
    float_model = load_model(tmp_path / "f.onnx", load_weights=True)
    assert not {n.op_type for n in float_model.graph.node} & {"QuantizeLinear", "DequantizeLinear"}
    floats = {w.name: np.asarray(w.array()) for w in find_weights(float_model, tmp_path)}
    quantized = onnx.load(tmp_path / "q.onnx")
    dequantize = {n.output[0]: n for n in quantized.graph.node if n.op_type == "DequantizeLinear"}
    sample = default_inputs(float_model, purpose="evaluation", count=1)[0]
    through_ort = _dequantized_weights(tmp_path / "q.onnx", sorted(summary["layers"]), sample)
    inits = {t.name: numpy_helper.to_array(t) for t in quantized.graph.initializer}
    for name, values in through_ort.items():
        np.testing.assert_array_equal(values, floats[name], err_msg=name)
        axis = 0 if name in ("c1", "c2", "fc") else 1  # Conv and Gemm(transB) [out, in, ...]; MatMul [in, out]
        codes, scale = (inits[input_name] for input_name in dequantize[name].input[:2])
        # Per-tensor clustering is written with one int8 scale, per-channel clustering with one per channel.
        assert codes.dtype == np.int8 and scale.size == (values.shape[axis] if per_channel else 1)
        view = np.moveaxis(values, axis, -1).reshape(-1, values.shape[axis])
        assert distinct_counts(view, per_channel) == [4] * (view.shape[1] if per_channel else 1)
        assert summary["layers"][name]["int8_sqnr_db"] is None
        assert summary["layers"][name]["int8_sqnr_db_nonfinite"] == "inf"


def test_without_grid_alignment_int8_rounding_moves_the_codebook_a_little(tmp_path, run_method):
    source = mlp_model(tmp_path / "float.onnx")
    summary = run_method("cluster", source, tmp_path / "q.onnx", "--input-shape", SHAPES[mlp_model], "--clusters", 8)
    for layer in summary["layers"].values():
        assert 30.0 < layer["int8_sqnr_db"] < math.inf


def test_summary_json_sizes_and_layers(tmp_path, run_method):
    source = cnn_model(tmp_path / "float.onnx")
    out = tmp_path / "q.onnx"
    small = run_method("cluster", source, out, "--input-shape", SHAPES[cnn_model], "--clusters", 4)
    assert json.loads((tmp_path / "q.summary.json").read_text()) == small
    assert small["method"] == "cluster" and small["parameters"]["clusters"] == 4
    assert small["model_type"] == "vision" and small["parameters"]["activation_bits"] == 8
    layers = small["layers"]
    assert set(layers) == {"c1", "c2", "fc"}
    assert layers["c2"]["output_sqnr_db"] is None and layers["fc"]["output_sqnr_db"] is not None
    # Index bits plus float32 codebooks: 2 bits per value and 4 values per tensor at k=4.
    assert layers["c2"]["bits_per_weight"] == pytest.approx((4608 * 2 + 4 * 32) / 4608, abs=1e-4)
    large = run_method("cluster", source, tmp_path / "q16.onnx", "--input-shape", SHAPES[cnn_model], "--clusters", 16)
    elements = sum(layer["elements"] for layer in layers.values())
    expected_growth = (elements * (4 - 2) + 3 * (16 - 4) * 32) / 8
    assert abs(large["packed_bytes"] - small["packed_bytes"] - expected_growth) <= 1
    # The Guide's table: vision models default to 16 clusters.
    default = run_method("cluster", source, tmp_path / "qd.onnx", "--input-shape", SHAPES[cnn_model])
    assert default["parameters"]["clusters"] == 16 and default["packed_bytes"] == large["packed_bytes"]


@pytest.mark.parametrize(
    "flags, message",
    [
        (("--clusters", "0"), "--clusters"),
        (("--clusters", "65537"), "--clusters"),
        (("--min-sqnr", "20"), "--adaptive-centroids"),
        (("--adaptive-centroids", "--clusters", "1"), "--clusters"),
        (("--refine-rounds", "-1"), "--refine-rounds"),
        (("--clusters", "many"), "invalid int"),
    ],
)
def test_bad_flags_exit_2_and_write_nothing(tmp_path, run_cli, flags, message):
    source = mlp_model(tmp_path / "float.onnx")
    done = run_cli("cluster", "--model-path", source, "--output-path", tmp_path / "q.onnx", "--input-shape",
                   SHAPES[mlp_model], *flags, cwd=tmp_path)
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["float.onnx"]


def test_clustered_qdq_model_runs_whole_on_the_htp(tmp_path, require_qnn, run_method):
    source = mlp_model(tmp_path / "float.onnx")
    out = tmp_path / "q.onnx"
    summary = run_method("cluster", source, out, "--input-shape", SHAPES[mlp_model], "--clusters", 16,
                         "--per-channel", "--grid-aligned")
    report = evaluate(source, out, samples=default_inputs(load_model(out), purpose="evaluation", count=1), qnn=True)
    # CPU fallback is disabled: a result means the HTP ran every node; it agrees with the CPU run.
    assert report["qnn"]["min_sqnr_db"] > summary["min_sqnr_db"] - 3.0, report["qnn"]


# ------------------------------------------------------------------------------------------ a real model


def test_minilm_clustered_to_16_values_per_tensor(minilm_onnx, tmp_path, run_method):
    out = tmp_path / "q.onnx"
    summary = run_method("cluster", minilm_onnx, out, "--clusters", 16)
    layers = summary["layers"]
    assert len(layers) == 36 and {layer["distinct_values"] for layer in layers.values()} == {16}
    # Refinement lifts every layer's output on the calibration data (measured: 19.8 -> 31.6 dB on average).
    assert all(layer["output_sqnr_db"] >= layer["output_sqnr_db_unrefined"] for layer in layers.values())
    # 4-bit look-up tables per tensor are coarse for MiniLM: measured 11.9 dB (plain k-means alone: 0.8 dB).
    assert summary["min_sqnr_db"] > 10.0, summary["outputs"]
    outputs = run_model(out, default_inputs(load_model(out), purpose="evaluation", count=1))
    assert np.isfinite(outputs[0]["sentence_embedding"]).all()
