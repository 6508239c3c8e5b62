"""pyqshare sparse: masks in the written QDQ model, the least-squares re-fit, schedules, importance scores,
layer-wise JSON, refusals, the command line, MiniLM and the HTP simulator. Models and runtimes are real."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from pyqshare.calibration import default_inputs
from pyqshare.cli import main
from pyqshare.methods import sparse
from pyqshare.methods.sparse import PruningConfig, prune_model, refit_weights, schedule_targets
from pyqshare.model import load_model


# --- models ---------------------------------------------------------------------------------------------------


def save(model: onnx.ModelProto, path: Path) -> Path:
    model.ir_version = 10
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def mlp(path: Path, *, head: bool = False, seed: int = 0) -> Path:
    """x[16,64] -> Gemm(W1[128,64], transB) -> Relu -> MatMul(W2[128,32]) [-> MatMul(W3[32,32])], torch-style
    node names. Reduction axes: W1 1, W2 0, W3 0."""
    rng = np.random.default_rng(seed)
    weights = {"W1": rng.standard_normal((128, 64)), "W2": rng.standard_normal((128, 32))}
    nodes = [helper.make_node("Gemm", ["x", "W1"], ["h"], name="/enc/fc1/Gemm", transB=1),
             helper.make_node("Relu", ["h"], ["r"], name="/enc/act/Relu"),
             helper.make_node("MatMul", ["r", "W2"], ["z" if head else "y"], name="/enc/fc2/MatMul")]
    if head:
        weights["W3"] = rng.standard_normal((32, 32))
        nodes.append(helper.make_node("MatMul", ["z", "W3"], ["y"], name="/head/MatMul"))
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [16, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [16, 32])],
        [numpy_helper.from_array(w.astype(np.float32), name) for name, w in weights.items()])
    return save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), path)


def convnet(path: Path, *, seed: int = 0) -> Path:
    """x[1,8,6,6] -> Conv(C1[16,8,3,3], pad 1) -> Relu -> Conv(C2[8,16,1,1]). Reduction axis 1 (input channels)."""
    rng = np.random.default_rng(seed)
    weights = {"C1": rng.standard_normal((16, 8, 3, 3)), "C2": rng.standard_normal((8, 16, 1, 1))}
    nodes = [helper.make_node("Conv", ["x", "C1"], ["h"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "C2"], ["y"], name="conv2")]
    graph = helper.make_graph(
        nodes, "convnet", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 6, 6])],
        [numpy_helper.from_array(w.astype(np.float32), name) for name, w in weights.items()])
    return save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), path)


REDUCTION_AXIS = {"W1": 1, "W2": 0, "W3": 0, "C1": 1, "C2": 1}
OUTPUT_AXIS = {"W1": 0, "W2": 1, "W3": 1, "C1": 0, "C2": 0}


def initializers(path: Path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(path).graph.initializer}


def written_weights(path: Path, names) -> dict[str, np.ndarray]:
    """The weights as onnxruntime dequantizes them in the written model (exposed as extra outputs)."""
    model = onnx.load(path)
    model.graph.output.extend(onnx.ValueInfoProto(name=name) for name in names)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (feed,) = default_inputs(model, count=1)
    return dict(zip(names, session.run(list(names), feed)))


def nm_reference_keep(weight: np.ndarray, n: int, m: int, axis: int) -> np.ndarray:
    """Keep the n largest |w| of every m consecutive elements along axis (numpy, independent of the kernel)."""
    moved = np.moveaxis(np.abs(weight), axis, -1)
    groups = moved.reshape(-1, m)
    ranks = np.argsort(np.argsort(-groups, axis=1, kind="stable"), axis=1, kind="stable")
    return np.moveaxis((ranks < n).reshape(moved.shape), -1, axis)


def run_in_process(capsys, *args) -> tuple[int, dict | None, str]:
    """``pyqshare sparse ... --json`` through the CLI's entry point: (exit status, report, stderr)."""
    status = main(["sparse", *map(str, args), "--json"])
    captured = capsys.readouterr()
    return status, json.loads(captured.out) if captured.out else None, captured.err


# --- masks in the written model ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("build", "pattern", "bits"),
                         [(mlp, "2:4", 8), (mlp, "4:8", 4), (convnet, "2:4", 8), (mlp, "2:4", 16)])
def test_nm_structure_and_exact_zeros_in_the_written_model(tmp_path, capsys, build, pattern, bits):
    source = build(tmp_path / "m.onnx")
    original = initializers(source)
    out = tmp_path / "q.onnx"
    status, report, _ = run_in_process(capsys, "--model-path", source, "--output-path", out, "--pruning-method",
                                       "structured", "--structured-pattern", pattern, "--weight-bits", bits,
                                       "--no-refit")
    assert status == 0
    n, m = map(int, pattern.split(":"))
    written = written_weights(out, list(original))
    stored = {t.name: t for t in onnx.load(out).graph.initializer}
    packed_bits = 0
    for name, weight in original.items():
        keep = nm_reference_keep(weight, n, m, REDUCTION_AXIS[name])
        assert np.all(written[name][~keep] == 0.0)  # pruned weights are exactly zero after DequantizeLinear
        grouped = np.moveaxis(written[name] != 0, REDUCTION_AXIS[name], -1).reshape(-1, m)
        if bits == 4:  # a kept weight may round to zero on the int4 grid: never more than n non-zeros
            assert np.all(grouped.sum(axis=1) <= n)
        else:
            assert np.all(grouped.sum(axis=1) == n) and np.all(written[name][keep] != 0.0)
        codes = stored[f"{name}_quantized"]
        assert codes.data_type == {4: TensorProto.INT4, 8: TensorProto.INT8, 16: TensorProto.INT16}[bits]
        assert not np.any(numpy_helper.to_array(stored[f"{name}_zero_point"]).astype(np.int32))
        layer = report["layers"][name]
        assert layer["pattern"] == pattern and layer["format"] == pattern
        assert layer["sparsity"] == pytest.approx(np.mean(written[name] == 0), abs=1e-6)
        channels = weight.shape[OUTPUT_AXIS[name]]
        kept = weight.size * n // m
        packed_bits += kept * bits + math.ceil(kept * math.ceil(math.log2(m)) / 8) * 8 + channels * (32 + bits)
    assert report["packed_bytes"] == math.ceil(packed_bits / 8)
    zeros = sum(int(np.sum(w == 0)) for w in written.values())
    assert report["sparsity"]["zero_weights"] == zeros and report["sparsity"]["weights"] == sum(
        w.size for w in original.values())
    assert report["sparsity"]["achieved"] >= 1 - n / m


def test_unstructured_counts_are_exact_and_packed_as_a_bitmap(tmp_path, capsys):
    source = mlp(tmp_path / "m.onnx")
    original = initializers(source)
    out = tmp_path / "q.onnx"
    status, report, _ = run_in_process(capsys, "--model-path", source, "--output-path", out, "--sparsity", "0.75",
                                       "--no-refit")
    assert status == 0
    written = written_weights(out, list(original))
    packed_bits = 0
    for name, weight in original.items():
        zeros = round(0.75 * weight.size)
        threshold = np.sort(np.abs(weight).ravel())[zeros]
        assert np.array_equal(written[name] == 0, np.abs(weight) < threshold)  # the smallest |w|, exactly
        assert report["layers"][name]["format"] == "bitmap"
        packed_bits += (weight.size - zeros) * 8 + weight.size + weight.shape[OUTPUT_AXIS[name]] * 40
    assert report["packed_bytes"] == math.ceil(packed_bits / 8)
    assert report["sparsity"]["achieved"] == 0.75 and report["parameters"]["mask_scope"] == "layer"


# --- the re-fit -------------------------------------------------------------------------------------------------


def output_error(x: np.ndarray, original: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    return np.sum((x @ (original - candidate)) ** 2, axis=0)


@pytest.mark.parametrize("rows", [10, 80])  # fewer calibration rows than features: a rank-deficient Gram
@pytest.mark.parametrize("solve_elements", [None, 300])  # one batch, or many padded batches
def test_refit_is_the_damped_least_squares_optimum_and_never_worse(monkeypatch, rows, solve_elements):
    if solve_elements:
        monkeypatch.setattr(sparse, "_SOLVE_ELEMENTS", solve_elements)
    rng = np.random.default_rng(rows)
    n_in, n_out = 24, 40
    x = rng.standard_normal((rows, n_in)) @ rng.standard_normal((n_in, n_in))  # correlated features
    x[:, 5] = 0.0  # an input that never fires
    gram = x.T @ x
    weight = rng.standard_normal((n_in, n_out))
    keep = rng.random((n_in, n_out)) < np.linspace(0.0, 1.0, n_out)  # 0 .. all kept: primal and dual forms
    fitted = refit_weights(weight, keep, gram)
    damping = 0.01 * np.mean(np.diag(gram))
    for j in range(n_out):
        kept = np.flatnonzero(keep[:, j])
        assert np.all(fitted[~keep[:, j], j] == 0.0)
        if kept.size == 0:
            continue
        system = np.vstack([x[:, kept], np.sqrt(damping) * np.eye(kept.size)])
        target = np.concatenate([x @ weight[:, j], np.sqrt(damping) * weight[kept, j]])
        expected = np.linalg.lstsq(system, target, rcond=None)[0]
        np.testing.assert_allclose(fitted[kept, j], expected, rtol=1e-7, atol=1e-9)
    assert np.array_equal(fitted[:, keep.all(axis=0)], weight[:, keep.all(axis=0)])
    plain = np.where(keep, weight, 0.0)
    assert np.all(output_error(x, weight, fitted) <= output_error(x, weight, plain) * (1 + 1e-9) + 1e-12)


def test_refit_recovers_a_pruned_weight_through_a_correlated_input():
    # Feature 1 copies feature 0: pruning w0 loses its contribution, the re-fit moves it onto w1.
    rng = np.random.default_rng(3)
    x = rng.standard_normal((200, 4))
    x[:, 1] = x[:, 0]
    weight = np.array([[1.0], [0.2], [0.5], [-0.7]])
    keep = np.array([[False], [True], [True], [True]])
    fitted = refit_weights(weight, keep, x.T @ x)
    plain = np.where(keep, weight, 0.0)
    assert output_error(x, weight, fitted)[0] < 1e-3 * output_error(x, weight, plain)[0]
    assert fitted[1, 0] == pytest.approx(1.2, abs=0.02)


def test_refit_on_a_model_improves_every_layer_on_calibration_data(tmp_path, capsys):
    source = mlp(tmp_path / "m.onnx")
    status, report, _ = run_in_process(capsys, "--model-path", source, "--output-path", tmp_path / "q.onnx",
                                       "--pruning-method", "structured")
    assert status == 0 and report["parameters"]["refit"] is True
    for layer in report["layers"].values():
        assert layer["pruning_output_sqnr_db"] > layer["plain_pruning_output_sqnr_db"] + 3.0
        assert layer["output_sqnr_db"] <= layer["pruning_output_sqnr_db"] + 0.01  # quantization adds error
    status, plain, _ = run_in_process(capsys, "--model-path", source, "--output-path", tmp_path / "p.onnx",
                                      "--pruning-method", "structured", "--no-refit")
    assert status == 0 and report["min_sqnr_db"] > plain["min_sqnr_db"]  # evaluation data, not calibration


# --- schedules --------------------------------------------------------------------------------------------------


def test_schedule_targets_follow_the_documented_formulas():
    s, n = 0.6, 5
    u = np.arange(1, n + 1) / n
    np.testing.assert_allclose(schedule_targets(s, "linear", n), s * u)
    np.testing.assert_allclose(schedule_targets(s, "cubic", n), s * (1 - (1 - u) ** 3))
    exponential = np.array(schedule_targets(s, "exponential", n))
    np.testing.assert_allclose(exponential, 1 - (1 - s) ** u)
    kept = np.concatenate([[1.0], 1 - exponential])
    np.testing.assert_allclose(kept[1:] / kept[:-1], (1 - s) ** (1 / n))  # the same fraction removed per step
    for schedule in ("linear", "cubic", "exponential"):
        targets = schedule_targets(s, schedule, n)
        assert targets[-1] == pytest.approx(s) and all(a < b for a, b in zip(targets, targets[1:]))
    assert schedule_targets(s, None, 1) == [s]


@pytest.mark.parametrize("schedule", ["linear", "cubic", "exponential"])
@pytest.mark.parametrize(("pattern", "scope"), [(None, "layer"), (None, "channel"), ((2, 4), "layer")])
def test_scheduled_pruning_reaches_each_step_target(tmp_path, schedule, pattern, scope):
    source = mlp(tmp_path / "m.onnx")
    model = load_model(source)
    sparsity = 0.5 if pattern else 0.7
    config = PruningConfig(sparsity=sparsity, pattern=pattern, scope=scope, schedule=schedule, steps=3)
    layers, _ = prune_model(model, default_inputs(model), config)
    targets = schedule_targets(sparsity, schedule, 3)
    for name, layer in layers.items():
        size = layer.keep.size
        if pattern:  # round(s_t / (1 - n/m) * groups) groups in the 2:4 pattern, each pruning 2 of 4
            groups = size // 4
            expected = [round(t / 0.5 * groups) * 2 / size for t in targets]
        elif scope == "layer":
            expected = [round(t * size) / size for t in targets]
        else:
            rows = layer.keep.shape[OUTPUT_AXIS[name]]
            expected = [round(t * (size // rows)) * rows / size for t in targets]
        assert layer.step_sparsity == pytest.approx(expected, abs=1e-12)
        assert np.mean(~layer.keep) == pytest.approx(expected[-1])
        pruned = onnx.numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))
        assert np.array_equal(pruned == 0, ~layer.keep)
        if pattern:
            grouped = np.moveaxis(layer.keep, REDUCTION_AXIS[name], -1).reshape(-1, 4)
            assert np.all(grouped.sum(axis=1) == 2)
        if scope == "channel":
            per_channel = np.moveaxis(~layer.keep, OUTPUT_AXIS[name], 0).reshape(rows, -1).sum(axis=1)
            assert np.all(per_channel == round(sparsity * (size // rows)))


# --- importance ------------------------------------------------------------------------------------------------


def keep_masks(model_path: Path, samples, criterion: str, scope: str = "layer") -> dict[str, np.ndarray]:
    config = PruningConfig(sparsity=0.5, criterion=criterion, scope=scope, refit=False)
    layers, _ = prune_model(load_model(model_path), samples, config)
    return {name: layer.keep for name, layer in layers.items()}


def test_weight_importance_follows_skewed_activations(tmp_path):
    source = mlp(tmp_path / "m.onnx")
    rng = np.random.default_rng(5)
    loud = np.where(np.arange(64) < 8, 20.0, 1.0)
    skewed = [{"x": (rng.random((16, 64)) * loud).astype(np.float32)} for _ in range(4)]
    magnitude = keep_masks(source, skewed, "magnitude")
    importance = keep_masks(source, skewed, "weight_importance")
    # W1 reads x directly: weights of the 8 loud inputs (columns of the [out, in] Gemm weight) are kept more.
    assert importance["W1"][:, :8].mean() > magnitude["W1"][:, :8].mean() + 0.3
    assert importance["W1"].sum() == magnitude["W1"].sum()  # same count, different choice
    # Inputs of equal L2 norm (every entry +-1): importance ranks exactly as magnitude does.
    signs = [{"x": rng.choice([-1.0, 1.0], size=(16, 64)).astype(np.float32)} for _ in range(4)]
    assert np.array_equal(keep_masks(source, signs, "weight_importance")["W1"],
                          keep_masks(source, signs, "magnitude")["W1"])


def test_weight_importance_on_convolutions_uses_input_channel_norms(tmp_path):
    source = convnet(tmp_path / "m.onnx")
    rng = np.random.default_rng(6)
    loud = np.where(np.arange(8) < 2, 20.0, 1.0)[None, :, None, None]
    samples = [{"x": (rng.random((1, 8, 6, 6)) * loud).astype(np.float32)} for _ in range(4)]
    magnitude = keep_masks(source, samples, "magnitude", "channel")
    importance = keep_masks(source, samples, "weight_importance", "channel")
    assert importance["C1"][:, :2].mean() > magnitude["C1"][:, :2].mean() + 0.3
    assert np.all(importance["C1"].reshape(16, -1).sum(axis=1) == 36)  # half of each output channel's 72


# --- layer-wise JSON -------------------------------------------------------------------------------------------


def test_layer_wise_json_exact_names_and_regexes(tmp_path, capsys):
    source = mlp(tmp_path / "m.onnx", head=True)
    original = initializers(source)
    table = tmp_path / "layers.json"
    # W1: its node name exactly (beats the regex below, which matches its module path "enc.fc1");
    # W2: the regex on the module path "enc.fc2"; W3: by tensor name, left dense; one key matches nothing.
    table.write_text(json.dumps({"enc\\.fc\\d": 0.75, "/enc/fc1/Gemm": 0.25, "W3": 0, "decoder\\..*": 0.5}))
    out = tmp_path / "q.onnx"
    status, report, stderr = run_in_process(capsys, "--model-path", source, "--output-path", out,
                                            "--layer-wise-sparsity", table, "--no-refit")
    assert status == 0
    written = written_weights(out, list(original))
    assert np.sum(written["W1"] == 0) == round(0.25 * original["W1"].size)
    assert np.sum(written["W2"] == 0) == round(0.75 * original["W2"].size)
    assert np.mean(written["W3"] == 0) < 0.01 and "target_sparsity" not in report["layers"]["W3"]  # int8 rounding
    assert report["layers"]["W1"]["target_sparsity"] == 0.25 and report["layers"]["W2"]["target_sparsity"] == 0.75
    assert report["unmatched_layer_keys"] == ["decoder\\..*"] and "decoder" in stderr
    assert report["sparsity"]["pruned_layers"] == 2


# --- defaults -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("model_type", "flags", "sparsity", "pattern"), [
    ("vision", [], 0.5, None),
    ("text", ["--pruning-method", "structured"], 0.5, (2, 4)),
    ("audio", [], 0.4, None),
    ("audio", ["--pruning-method", "structured"], 0.5, (4, 8)),
    ("text_generation", [], 0.3, None),
    ("text_generation", ["--pruning-method", "weight_importance", "--structured-pattern", "2:4"], 0.5, (2, 4)),
    ("multimodal", ["--sparsity", "0.2"], 0.2, None),
])
def test_model_type_defaults(model_type, flags, sparsity, pattern):
    parser = argparse.ArgumentParser()
    sparse.configure(parser)
    args = parser.parse_args(["--model-path", "m.onnx", "--output-path", "q.onnx", *flags])
    config = sparse.config_for(args, model_type)
    assert (config.sparsity, config.pattern) == (pytest.approx(sparsity), pattern)
    assert (config.schedule, config.steps, config.refit) == (None, 1, True)


# --- refusals --------------------------------------------------------------------------------------------------


BAD_TABLES = {
    "not_json": "{\"W1\": 0.5,",
    "list": "[0.5]",
    "too_sparse": "{\"W1\": 1.0}",
    "string": "{\"W1\": \"0.5\"}",
    "bad_regex": "{\"(enc\": 0.5}",
    "duplicate": "{\"W1\": 0.1, \"W1\": 0.2}",
    "off_pattern": "{\"W1\": 0.3}",
}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--pruning-method", "structured", "--structured-pattern", "2:5"], "W1 (64), W2 (128) are not a multiple"),
        (["--structured-pattern", "4:4"], "1 <= n < m"),
        (["--structured-pattern", "6:4"], "1 <= n < m"),
        (["--structured-pattern", "0:4"], "1 <= n < m"),
        (["--structured-pattern", "two:four"], "must look like n:m"),
        (["--sparsity", "1.0"], "--sparsity: sparsity must be a number in [0, 1)"),
        (["--sparsity", "-0.1"], "--sparsity: sparsity must be a number in [0, 1)"),
        (["--pruning-method", "structured", "--sparsity", "0.3"], "2:4 pattern"),
        (["--steps", "3"], "--steps goes with --pruning-schedule"),
        (["--pruning-schedule", "cubic", "--steps", "0"], "--steps"),
        (["--layer-wise-sparsity", "{absent}"], "absent.json: cannot read"),
        (["--layer-wise-sparsity", "{not_json}"], "not_json.json: not valid JSON"),
        (["--layer-wise-sparsity", "{list}"], "list.json: must be a JSON object"),
        (["--layer-wise-sparsity", "{too_sparse}"], "too_sparse.json: key 'W1'"),
        (["--layer-wise-sparsity", "{string}"], "string.json: key 'W1'"),
        (["--layer-wise-sparsity", "{bad_regex}"], "bad_regex.json: key '(enc' is not a valid regular expression"),
        (["--layer-wise-sparsity", "{duplicate}"], "duplicate.json: duplicate key 'W1'"),
        (["--pruning-method", "structured", "--layer-wise-sparsity", "{off_pattern}"], "key 'W1': sparsity 0.3"),
    ],
)
def test_refusals_exit_2_and_write_nothing(tmp_path, capsys, args, message):
    source = mlp(tmp_path / "m.onnx")
    paths = {"absent": tmp_path / "absent.json"}
    for name, text in BAD_TABLES.items():
        paths[name] = tmp_path / f"{name}.json"
        paths[name].write_text(text)
    out = tmp_path / "q.onnx"
    status, report, stderr = run_in_process(capsys, "--model-path", source, "--output-path", out,
                                            *[arg.format(**paths) for arg in args])
    assert status == 2 and report is None
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("pyqshare sparse: ") and message in last
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["m.onnx", *(f"{n}.json" for n in BAD_TABLES)])


def test_cli_exit_2_and_json_is_one_object(tmp_path, run_cli):
    source = mlp(tmp_path / "m.onnx")
    refused = run_cli("sparse", "--model-path", source, "--output-path", tmp_path / "bad.onnx", "--structured-pattern",
                      "4:2", "--json")
    assert refused.returncode == 2 and refused.stdout == "" and refused.stderr.count("\n") == 1
    done = run_cli("sparse", "--model-path", source, "--output-path", tmp_path / "q.onnx", "--pruning-method",
                   "weight_importance", "--pruning-schedule", "exponential", "--steps", "2", "--json")
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("\n") == 1
    report = json.loads(done.stdout)
    assert report["method"] == "sparse" and report["parameters"]["criterion"] == "weight_importance"
    assert report["parameters"]["mask_scope"] == "channel" and report["parameters"]["steps"] == 2
    assert json.loads((tmp_path / "q.summary.json").read_text()) == report
    assert (tmp_path / "q.encodings").is_file() and "sparse:" in done.stderr


# --- real models and the HTP -----------------------------------------------------------------------------------


def test_minilm_2_4_output_sqnr(tmp_path, capsys, minilm_onnx):
    # The FFN down-projections (1536 inputs) stay dense to keep this test short: their exact re-fit solves a
    # 768 x 768 system per output channel (about 6 s of CPU per layer). Measured on the whole model (all 36
    # layers 2:4): 6.6 dB last_hidden_state, 8.2 dB sentence_embedding; without the re-fit -3.3 and -5.7 dB.
    table = tmp_path / "layers.json"
    table.write_text(json.dumps({r"encoder\.encoder\.layer\.\d+\.output\.dense": 0}))
    out = tmp_path / "minilm-sparse.onnx"
    status, report, _ = run_in_process(capsys, "--model-path", minilm_onnx, "--output-path", out,
                                       "--pruning-method", "structured", "--layer-wise-sparsity", table)
    assert status == 0
    pruned = {name: layer for name, layer in report["layers"].items() if "target_sparsity" in layer}
    assert len(pruned) == 30 and all(layer["format"] == "2:4" for layer in pruned.values())
    assert all(layer["pruning_output_sqnr_db"] > layer["plain_pruning_output_sqnr_db"] + 3 for layer in pruned.values())
    stored = initializers(out)
    for name, layer in pruned.items():
        codes = stored[f"{name}_quantized"]  # MatMul B [in, out]: groups of 4 input features
        assert np.all((codes.reshape(-1, 4, codes.shape[1]) == 0).sum(axis=1) >= 2)
        assert layer["sparsity"] == pytest.approx(np.mean(codes == 0), abs=1e-6)
    # Measured: 7.1 dB last_hidden_state, 8.4 dB sentence_embedding (cosine 0.929).
    assert report["min_sqnr_db"] >= 6.0
    assert report["outputs"]["sentence_embedding"]["cosine"] >= 0.9


def test_sparse_model_runs_on_the_htp_without_fallback(tmp_path, capsys, require_qnn):
    from pyqshare.qnn import create_htp_session

    source = mlp(tmp_path / "m.onnx")
    out = tmp_path / "q.onnx"
    status, _, _ = run_in_process(capsys, "--model-path", source, "--output-path", out, "--pruning-method",
                                  "structured", "--model-type", "vision")  # uint8 activations
    assert status == 0
    samples = default_inputs(onnx.load(out), count=2, purpose="evaluation")
    cpu = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    htp = create_htp_session(out)  # session.disable_cpu_ep_fallback=1: every node on the HTP or an error
    output_scale = float(initializers(out)["y_scale"])
    for sample in samples:
        (expected,), (actual,) = cpu.run(None, sample), htp.run(None, sample)
        assert np.max(np.abs(actual - expected)) <= 2 * output_scale
