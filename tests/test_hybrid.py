"""``pyqshare hybrid``: component detection, per-layer precisions, sensitivity analysis and the bit-budget
knapsack, on tiny synthetic transformer blocks and on the real MiniLM."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from pyqshare.calibration import default_inputs, run_model
from pyqshare.cli import main
from pyqshare.evaluate import sqnr_db
from pyqshare.model import find_weights, replace_weight
from pyqshare.quantization.components import detect_components
from pyqshare.quantization.mixed_precision import (
    PRECISION_BITS,
    allocate,
    fake_quantize,
    measure_sensitivity,
    noise_power,
)
from pyqshare.quantization.layers import layer_input_grams

SEQUENCE = 8  # the HTP simulator computes LayerNorm -> MatMul wrongly at sequence 16 with 16-bit activations


def _model(nodes, inputs, outputs, initializers) -> onnx.ModelProto:
    model = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, initializers),
                              opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10  # onnxruntime 1.31 reads IR <= 13; onnx writes a newer one by default
    onnx.checker.check_model(model, full_check=True)
    return model


def tiny_block(*, opaque: bool = False, vocab: int = 2048, dim: int = 32, heads: int = 2, classes: int = 24,
               seed: int = 0) -> onnx.ModelProto:
    """Embedding Gather -> Q/K/V MatMuls -> softmax attention -> output projection + residual -> LayerNorm
    -> MatMul, Gelu, MatMul + residual -> final linear. With ``opaque`` the weights are named p0, p1, ...
    and the nodes are unnamed, so only the structure tells the components apart."""
    rng = np.random.default_rng(seed)
    roles = ["tok_table", "wq", "wk", "wv", "wo", "w1", "w2", "w_out"]
    name = {role: f"p{i}" if opaque else role for i, role in enumerate(roles)}
    shapes = {"tok_table": (vocab, dim), "wq": (dim, dim), "wk": (dim, dim), "wv": (dim, dim), "wo": (dim, dim),
              "w1": (dim, 4 * dim), "w2": (4 * dim, dim), "w_out": (dim, classes)}
    initializers = [
        numpy_helper.from_array((rng.standard_normal(shape) / (1 if role == "tok_table" else math.sqrt(shape[0])))
                                .astype(np.float32), name[role])
        for role, shape in shapes.items()
    ]
    for bias, size in (("bq", dim), ("bk", dim), ("bv", dim), ("bo", dim), ("b1", 4 * dim), ("b2", dim)):
        initializers.append(numpy_helper.from_array((0.1 * rng.standard_normal(size)).astype(np.float32), bias))
    initializers += [
        numpy_helper.from_array((1 + 0.1 * rng.standard_normal(dim)).astype(np.float32), "ln_g"),
        numpy_helper.from_array((0.1 * rng.standard_normal(dim)).astype(np.float32), "ln_b"),
        numpy_helper.from_array(np.array([1, SEQUENCE, heads, dim // heads], np.int64), "heads_shape"),
        numpy_helper.from_array(np.array([1, SEQUENCE, dim], np.int64), "merge_shape"),
        numpy_helper.from_array(np.array(1 / math.sqrt(dim // heads), np.float32), "att_scale"),
    ]

    def node(op, inputs, outputs, label, **attrs):
        return helper.make_node(op, inputs, outputs, name=None if opaque else label, **attrs)

    nodes = [node("Gather", [name["tok_table"], "input_ids"], ["x"], "embed")]
    for head, perm in (("q", [0, 2, 1, 3]), ("k", [0, 2, 3, 1]), ("v", [0, 2, 1, 3])):
        nodes += [
            node("MatMul", ["x", name[f"w{head}"]], [f"{head}0"], f"{head}_proj"),
            node("Add", [f"{head}0", f"b{head}"], [f"{head}1"], f"{head}_bias"),
            node("Reshape", [f"{head}1", "heads_shape"], [f"{head}2"], f"{head}_split_heads"),
            node("Transpose", [f"{head}2"], [f"{head}3"], f"{head}_transpose", perm=perm),
        ]
    nodes += [
        node("MatMul", ["q3", "k3"], ["s0"], "scores"),
        node("Mul", ["s0", "att_scale"], ["s1"], "scale"),
        node("Softmax", ["s1"], ["probs"], "softmax", axis=-1),
        node("MatMul", ["probs", "v3"], ["c0"], "context"),
        node("Transpose", ["c0"], ["c1"], "merge_transpose", perm=[0, 2, 1, 3]),
        node("Reshape", ["c1", "merge_shape"], ["c2"], "merge_heads"),
        node("MatMul", ["c2", name["wo"]], ["o0"], "o_proj"),
        node("Add", ["o0", "bo"], ["o1"], "o_bias"),
        node("Add", ["o1", "x"], ["r1"], "residual1"),
        node("LayerNormalization", ["r1", "ln_g", "ln_b"], ["h"], "norm", axis=-1),
        node("MatMul", ["h", name["w1"]], ["f0"], "ffn_up"),
        node("Add", ["f0", "b1"], ["f1"], "ffn_up_bias"),
        node("Gelu", ["f1"], ["f2"], "gelu"),
        node("MatMul", ["f2", name["w2"]], ["f3"], "ffn_down"),
        node("Add", ["f3", "b2"], ["f4"], "ffn_down_bias"),
        node("Add", ["f4", "h"], ["r2"], "residual2"),
        node("MatMul", ["r2", name["w_out"]], ["logits"], "head"),
    ]
    return _model(nodes, [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, SEQUENCE])],
                  [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, SEQUENCE, classes])], initializers)


BLOCK_COMPONENTS = {"tok_table": "embedding", "wq": "attention", "wk": "attention", "wv": "attention",
                    "wo": "attention", "w1": "feed-forward", "w2": "feed-forward", "w_out": "output"}


def _components(model):
    return detect_components(model, find_weights(model, None, min_elements=1))


def _weight(name, *shape, seed=0):
    values = np.random.default_rng(seed).standard_normal(shape) / math.sqrt(shape[0])
    return numpy_helper.from_array(values.astype(np.float32), name)


# --- component detection ----------------------------------------------------------------------------------


def test_components_come_from_the_graph_when_names_say_nothing():
    found = _components(tiny_block(opaque=True))
    roles = list(BLOCK_COMPONENTS)
    assert {name: (c.component, c.detected_by) for name, c in found.items()} == {
        f"p{i}": (BLOCK_COMPONENTS[role], "graph") for i, role in enumerate(roles)
    }


def test_gated_feed_forward_and_convolutions():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 16])
    swiglu = _model([  # silu(x @ gate) * (x @ up) @ down, SiLU written out as x * sigmoid(x)
        helper.make_node("MatMul", ["x", "gate"], ["g"]),
        helper.make_node("Sigmoid", ["g"], ["sg"]),
        helper.make_node("Mul", ["g", "sg"], ["silu"]),
        helper.make_node("MatMul", ["x", "up"], ["u"]),
        helper.make_node("Mul", ["silu", "u"], ["hidden"]),
        helper.make_node("MatMul", ["hidden", "down"], ["d"]),
        helper.make_node("Add", ["d", "x"], ["r"]),
        helper.make_node("MatMul", ["r", "head"], ["y"]),
    ], [x], [y], [_weight("gate", 16, 64), _weight("up", 16, 64, seed=1), _weight("down", 64, 16, seed=2),
                  _weight("head", 16, 16, seed=3)])
    assert {n: c.component for n, c in _components(swiglu).items()} == {
        "gate": "feed-forward", "up": "feed-forward", "down": "feed-forward", "head": "output"}

    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 8, 8])
    scores = helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 10])
    cnn = _model([
        helper.make_node("Conv", ["image", "c1"], ["a"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["b"]),
        helper.make_node("Conv", ["b", "c2"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["c"], ["d"]),
        helper.make_node("Flatten", ["d"], ["e"]),
        helper.make_node("Gemm", ["e", "fc"], ["scores"], transB=1),
    ], [image], [scores], [_weight("c1", 8, 3, 3, 3), _weight("c2", 8, 8, 3, 3, seed=1), _weight("fc", 10, 8, seed=2)])
    assert {n: c.component for n, c in _components(cnn).items()} == {"c1": "conv", "c2": "conv", "fc": "output"}


def test_names_are_the_fallback_and_the_rest_is_other():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 16])
    chain = _model([  # plain MatMul chains: no softmax, no activation, so the structure says nothing
        helper.make_node("MatMul", ["x", "blocks.0.attn.q_proj.weight"], ["a"], name="/blocks.0/attn/q_proj/MatMul"),
        helper.make_node("MatMul", ["a", "mystery"], ["b"]),
        helper.make_node("MatMul", ["b", "last"], ["y"]),
    ], [x], [y], [_weight("blocks.0.attn.q_proj.weight", 16, 16), _weight("mystery", 16, 16, seed=1),
                  _weight("last", 16, 16, seed=2)])
    found = _components(chain)
    assert (found["blocks.0.attn.q_proj.weight"].component, found["blocks.0.attn.q_proj.weight"].detected_by) == (
        "attention", "name")
    assert found["blocks.0.attn.q_proj.weight"].layer == "blocks.0.attn.q_proj"
    assert (found["mystery"].component, found["mystery"].detected_by) == ("other", "none")
    assert (found["last"].component, found["last"].detected_by) == ("output", "graph")


# --- the knapsack -----------------------------------------------------------------------------------------


def _brute_force(sizes, options, budget):
    best = math.inf
    for choice in itertools.product(*(range(len(row)) for row in options)):
        bits = sum(size * options[i][o][0] for i, (size, o) in enumerate(zip(sizes, choice)))
        if bits <= budget:
            best = min(best, sum(options[i][o][1] for i, o in enumerate(choice)))
    return best


def test_allocation_is_optimal_against_brute_force():
    rng = np.random.default_rng(7)
    for _ in range(300):
        items = int(rng.integers(1, 6))
        sizes = [int(rng.integers(1, 60)) for _ in range(items)]
        options = [[(int(bits), float(rng.exponential())) for bits in rng.choice([2, 4, 8, 16], rng.integers(1, 5),
                                                                                 replace=False)]
                   for _ in range(items)]
        low = sum(s * min(b for b, _ in row) for s, row in zip(sizes, options))
        high = sum(s * max(b for b, _ in row) for s, row in zip(sizes, options))
        budget = int(rng.integers(low, high + 1))
        result = allocate(sizes, options, budget)
        assert result.exact
        assert result.bits <= budget
        assert result.bits == sum(s * options[i][c][0] for i, (s, c) in enumerate(zip(sizes, result.choice)))
        assert result.loss == pytest.approx(_brute_force(sizes, options, budget), rel=1e-12, abs=1e-12)


def test_coarse_allocation_still_fits_the_budget():
    rng = np.random.default_rng(8)
    for _ in range(50):
        sizes = [int(rng.integers(1000, 100000)) + 1 for _ in range(6)]
        options = [[(4, 1.0 + rng.random()), (8, rng.random() / 10), (16, rng.random() / 1000)] for _ in sizes]
        budget = int(sum(sizes) * rng.uniform(4, 16))
        result = allocate(sizes, options, budget, max_cells=6 * 40)
        assert not result.exact and result.bits <= budget
        # Rounding costs up can only lose budget, never the optimum of a looser problem.
        assert result.loss >= _brute_force(sizes, options, budget) - 1e-12


def test_budget_is_met_exactly_when_it_can_be():
    # Two equal layers, 6 bits on average: one int4 and one int8, the int8 where it buys more.
    result = allocate([100, 100], [[(4, 1.0), (8, 0.1)], [(4, 3.0), (8, 0.2)]], 1200)
    assert result.choice == [0, 1] and result.bits == 1200 and result.loss == pytest.approx(1.2)
    with pytest.raises(ValueError, match="over the budget"):
        allocate([100, 100], [[(4, 1.0)], [(8, 1.0)]], 1100)


def test_noise_power():
    assert noise_power(20.0) == pytest.approx(0.01)
    assert noise_power(math.inf) == 0.0
    assert noise_power(-math.inf) == noise_power(math.nan) == 1e12


# --- sensitivity --------------------------------------------------------------------------------------------


def test_sensitivity_matches_quantizing_each_layer_by_hand():
    model = tiny_block()
    # wq as a Constant node cannot be fed to the session: it takes the replace-and-rerun path.
    wq = next(t for t in model.graph.initializer if t.name == "wq")
    model.graph.node.insert(0, helper.make_node("Constant", [], ["wq"], value=wq))
    model.graph.initializer.remove(wq)
    samples = default_inputs(model, count=2)
    weights = {w.name: w for w in find_weights(model, None)}
    before = model.SerializeToString()
    table = measure_sensitivity(model, samples, [(weights["wq"], ["int4", "fp16"]), (weights["w1"], ["int4", "int8"]),
                                                 (weights["tok_table"], ["int8"])])
    assert model.SerializeToString() == before  # inputs added for the session are gone again
    reference = run_model(model, samples)
    for name, row in table.items():
        for precision, measured in row.items():
            changed = onnx.ModelProto.FromString(before)
            weight = next(w for w in find_weights(changed, None) if w.name == name)
            replace_weight(changed, weight, fake_quantize(weight, precision))
            outputs = run_model(changed, samples)
            assert measured == sqnr_db([r["logits"] for r in reference], [o["logits"] for o in outputs])
    assert table["w1"]["int8"] > table["w1"]["int4"] + 15
    assert table["wq"]["fp16"] > table["wq"]["int4"] + 30


# --- the command ------------------------------------------------------------------------------------------


@pytest.fixture
def block_path(tmp_path):
    path = tmp_path / "block.onnx"
    onnx.save(tiny_block(), path)
    return path


def _hybrid(block_path, tmp_path, *flags, name="out.onnx"):
    output = tmp_path / name
    assert main(["hybrid", "--model-path", str(block_path), "--output-path", str(output), *map(str, flags)]) == 0
    return json.loads(output.with_suffix(".summary.json").read_text()), onnx.load(output)


def _weight_storage(model: onnx.ModelProto) -> dict[str, tuple[str, int | None]]:
    """Weight name -> (stored element type, DequantizeLinear axis or None) in a written QDQ model."""
    initializers = {t.name: t for t in model.graph.initializer}
    storage = {}
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in initializers:
            axis = next((a.i for a in node.attribute if a.name == "axis"), None)
            storage[node.output[0]] = (TensorProto.DataType.Name(initializers[node.input[0]].data_type), axis)
    for name, tensor in initializers.items():
        if tensor.data_type == TensorProto.FLOAT and tensor.name not in storage:
            storage[name] = ("FLOAT", None)
    return storage


def test_recommended_precisions_are_written(block_path, tmp_path):
    summary, model = _hybrid(block_path, tmp_path)
    storage = _weight_storage(model)
    # Transformer defaults: attention int8, feed-forward int4, embeddings int8, output fp16 (a float weight).
    for name in ("wq", "wk", "wv", "wo"):
        assert storage[name] == ("INT8", 1)
    assert storage["w1"] == storage["w2"] == ("INT4", 1)
    assert storage["tok_table"] == ("INT8", None)  # per tensor: QNN refuses per-row scales on a Gather table
    assert storage["w_out"] == ("FLOAT", None)
    w_out = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "w_out"))
    assert np.array_equal(w_out, w_out.astype(np.float16).astype(np.float32))  # rounded to float16
    activations = {numpy_helper.to_array(t).dtype for t in model.graph.initializer if t.name.endswith("_zero_point")
                   and t.name.replace("_zero_point", "") in {"x", "q0", "f2", "logits"}}
    assert activations == {np.dtype(np.uint16)}
    layers = summary["layers"]
    assert {name: layers[name]["component"] for name in BLOCK_COMPONENTS} == BLOCK_COMPONENTS
    assert {layers[name]["precision"] for name in ("w1", "w2")} == {"int4"}
    assert layers["w_out"]["precision"] == "fp16" and layers["w_out"]["weight_sqnr_db"] > 60
    sizes = {name: layers[name]["elements"] for name in BLOCK_COMPONENTS}
    expected_bits = sum(sizes[n] * PRECISION_BITS[layers[n]["precision"]] for n in sizes) / sum(sizes.values())
    assert summary["parameters"]["assigned_bits_per_weight"] == pytest.approx(expected_bits, abs=1e-4)
    assert summary["min_sqnr_db"] > 15


def test_flags_and_layer_wise_config_override_the_defaults(block_path, tmp_path):
    config = tmp_path / "layers.json"
    # An exact name beats a regular expression that also matches it.
    config.write_text(json.dumps({"w.": "int16", "wq": "fp16", "tok_.*": "int4"}))
    _, model = _hybrid(block_path, tmp_path, "--layer-wise-config", config, "--feedforward-precision", "int8",
                       "--output-precision", "int4", "--rounding", "nearest")
    storage = _weight_storage(model)
    assert storage["wq"] == ("FLOAT", None)
    assert storage["wk"] == storage["wv"] == storage["wo"] == storage["w1"] == storage["w2"] == ("INT16", 1)
    assert storage["tok_table"] == ("INT4", None)
    assert storage["w_out"] == ("INT4", 1)
    float_weights = {w.name: w for w in find_weights(tiny_block(), None)}
    assert np.array_equal(_dequantized(model, "w_out"), fake_quantize(float_weights["w_out"], "int4"))


def test_written_weights_are_those_the_analysis_measures(block_path, tmp_path):
    # GPTQ rounding against the calibration inputs, as the sensitivity analysis fake-quantizes.
    _, model = _hybrid(block_path, tmp_path, "--target", "cpu")
    block = tiny_block()
    weights = {w.name: w for w in find_weights(block, None)}
    grams = layer_input_grams(block, default_inputs(block), [weights["w1"], weights["wq"]])
    assert np.array_equal(_dequantized(model, "w1"), fake_quantize(weights["w1"], "int4", "gptq", grams["w1"]))
    assert np.array_equal(_dequantized(model, "wq"), fake_quantize(weights["wq"], "int8", "gptq", grams["wq"]))
    assert not np.array_equal(_dequantized(model, "w1"), fake_quantize(weights["w1"], "int4"))
    assert np.array_equal(_dequantized(model, "tok_table"), fake_quantize(weights["tok_table"], "int8"))


def _dequantized(model: onnx.ModelProto, name: str) -> np.ndarray:
    node = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.output[0] == name)
    graph = helper.make_graph([node], "dq", [], [helper.make_tensor_value_info(name, TensorProto.FLOAT, None)],
                              [t for t in model.graph.initializer if t.name in node.input])
    single = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    single.ir_version = 10
    return run_model(single, [{}])[0][name]


def test_sensitivity_analysis_meets_the_budget_with_the_least_loss(block_path, tmp_path):
    summary, _ = _hybrid(block_path, tmp_path, "--sensitivity-analysis", "--target-bits", 9,
                         "--attention-precision", "int8", "--sensitivity-samples", 8)
    layers = summary["layers"]
    report = summary["parameters"]["sensitivity"]
    assert report["exact"] and report["layers_measured"] == 4  # attention is pinned by its flag
    assert {layers[n]["precision"] for n in ("wq", "wk", "wv", "wo")} == {"int8"}
    free = ["tok_table", "w1", "w2", "w_out"]
    assert all(set(layers[n]["sensitivity_sqnr_db"]) == {"int4", "int8", "int16"} for n in free)
    sizes = {n: layers[n]["elements"] for n in layers}
    budget = math.floor(9 * sum(sizes.values()))
    pinned_bits = sum(sizes[n] * 8 for n in ("wq", "wk", "wv", "wo"))
    assert summary["parameters"]["assigned_bits_per_weight"] <= 9
    # Brute force over the recorded table: no other choice within the budget loses less.
    options = [[(PRECISION_BITS[p], noise_power(s)) for p, s in layers[n]["sensitivity_sqnr_db"].items()] for n in free]
    best = _brute_force([sizes[n] for n in free], options, budget - pinned_bits)
    chosen = sum(noise_power(layers[n]["output_sqnr_db"]) for n in free)
    assert chosen == pytest.approx(best, rel=1e-9)
    assert report["predicted_sqnr_db"] == pytest.approx(-10 * math.log10(best), abs=1e-2)


def test_default_budget_is_the_recommended_configurations(block_path, tmp_path):
    recommended, _ = _hybrid(block_path, tmp_path, name="recommended.onnx")
    # 8 samples of 8 tokens: the default 2 are too few tokens for this tiny block.
    analysed, _ = _hybrid(block_path, tmp_path, "--sensitivity-analysis", "--sensitivity-samples", 8,
                          name="analysed.onnx")
    target = analysed["parameters"]["sensitivity"]["target_bits"]
    assert target == pytest.approx(recommended["parameters"]["assigned_bits_per_weight"], abs=1e-4)
    assert analysed["parameters"]["assigned_bits_per_weight"] <= target
    # Same bits, spent where the measurements say: the output is at least as good.
    assert analysed["min_sqnr_db"] > recommended["min_sqnr_db"]


@pytest.mark.parametrize(("flags", "message"), [
    (["--target-bits", "6"], "--target-bits needs --sensitivity-analysis"),
    (["--sensitivity-analysis", "--target-bits", "3"], "at least 4"),
    (["--sensitivity-analysis", "--target-bits", "nan"], "at least 4"),
    (["--sensitivity-analysis", "--candidate-precisions", "int8,int16", "--target-bits", "7"], "below 8.0000"),
    (["--sensitivity-analysis", "--target-bits", "4.5", "--output-precision", "fp16", "--embedding-precision",
      "int16"], "fewest bits per weight these layers"),
    (["--layer-wise-config", "{bad json"], "not valid JSON"),
    (["--layer-wise-config", '{"wq": "int3"}'], "unknown precision 'int3'"),
    (["--layer-wise-config", '{"nothing.*": "int8"}'], "match no layer"),
    (["--layer-wise-config", '["wq"]'], "must be a JSON object"),
    (["--activation-bits", "8", "--attention-precision", "int16"], "need 16-bit activations"),
    (["--sensitivity-analysis", "--candidate-precisions", "int8,float8"], "unknown precision 'float8'"),
])
def test_refusals_exit_2_and_write_nothing(block_path, tmp_path, capsys, flags, message):
    flags = list(flags)
    if "--layer-wise-config" in flags:
        index = flags.index("--layer-wise-config") + 1
        config = tmp_path / "config.json"
        config.write_text(flags[index])
        flags[index] = str(config)
    output = tmp_path / "out.onnx"
    assert main(["hybrid", "--model-path", str(block_path), "--output-path", str(output), *flags]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("pyqshare hybrid: ") and message in error
    assert not output.exists() and not output.with_suffix(".summary.json").exists()


def test_unknown_precision_flag_is_a_usage_error(block_path, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["hybrid", "--model-path", str(block_path), "--output-path", str(tmp_path / "o.onnx"),
              "--attention-precision", "int2"])
    assert exit_info.value.code == 2


def test_cli_json_is_one_object(block_path, tmp_path, run_cli):
    output = tmp_path / "cli.onnx"
    done = run_cli("hybrid", "--model-path", block_path, "--output-path", output, "--sensitivity-analysis", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["method"] == "hybrid" and report["output"] == str(output)
    assert report == json.loads(output.with_suffix(".summary.json").read_text())


# --- QNN HTP simulator ------------------------------------------------------------------------------------


def test_mixed_precision_block_runs_on_the_htp_without_cpu_fallback(block_path, tmp_path, require_qnn):
    from pyqshare.qnn.ep import create_htp_session
    from pyqshare.qnn.placement import placement_report

    _, model = _hybrid(block_path, tmp_path, "--feedforward-precision", "int4", "--attention-precision", "int16",
                       "--output-precision", "fp16", "--embedding-precision", "int8")
    storage = _weight_storage(model)
    assert {storage[n][0] for n in ("w1", "wq", "w_out", "tok_table")} == {"INT4", "INT16", "FLOAT", "INT8"}
    sample = default_inputs(model, count=1, purpose="evaluation")
    session = create_htp_session(str(tmp_path / "out.onnx"))  # CPU fallback disabled: any CPU node fails here
    htp = session.run(None, sample[0])[0]
    cpu = run_model(tmp_path / "out.onnx", sample)[0]["logits"]
    assert sqnr_db([cpu], [htp]) > 40  # measured 47.8 dB
    # The float (fp16) layer does not split the graph: QNN runs Dequantize -> float FullyConnected -> Quantize.
    placement = placement_report(tmp_path / "out.onnx")
    assert placement.partitions == 1 and placement.cpu_nodes == 0


# --- MiniLM -------------------------------------------------------------------------------------------------


def test_minilm_sensitivity_analysis_at_six_bits(minilm_onnx, tmp_path):
    # Nearest rounding and one analysis sample keep this affordable (measured 89 s on a loaded 2-core machine,
    # 58 s of it the analysis); the default GPTQ analysis on 2 samples is in the module docstring of hybrid.
    output = tmp_path / "minilm-hybrid.onnx"
    assert main(["hybrid", "--model-path", str(minilm_onnx), "--output-path", str(output), "--sensitivity-analysis",
                 "--target-bits", "6", "--rounding", "nearest", "--sensitivity-samples", "1", "--json"]) == 0
    summary = json.loads(output.with_suffix(".summary.json").read_text())
    layers = summary["layers"]
    assert summary["parameters"]["components"] == {"attention": 24, "feed-forward": 11, "embedding": 3, "conv": 0,
                                                   "output": 1, "other": 0}
    assert all(entry["detected_by"] == "graph" for entry in layers.values())
    assert all(set(entry["sensitivity_sqnr_db"]) == {"int4", "int8", "int16"} for entry in layers.values())
    # The word embeddings hold 52% of the weights: at 6 bits they must take int4 (per tensor, 18.5 dB).
    assert layers["encoder.embeddings.word_embeddings.weight"]["precision"] == "int4"
    assert 5.98 < summary["parameters"]["assigned_bits_per_weight"] <= 6.0
    assert summary["parameters"]["sensitivity"]["exact"]
    assert summary["min_sqnr_db"] > 12  # measured 13.1 dB (predicted by the additive model: 13.8 dB)


def test_real_cnn_conv_layers_and_classifier(ppocr_cls_onnx, tmp_path):
    output = tmp_path / "cls-hybrid.onnx"
    assert main(["hybrid", "--model-path", str(ppocr_cls_onnx), "--output-path", str(output), "--model-type", "vision",
                 "--input-shape", "x=1,3,48,192", "--json"]) == 0
    summary = json.loads(output.with_suffix(".summary.json").read_text())
    layers = summary["layers"]
    outputs = [name for name, entry in layers.items() if entry["component"] == "output"]
    assert len(outputs) == 1 and layers[outputs[0]]["precision"] == "fp16"  # the CNN column: output FP16
    assert all(entry["component"] == "conv" and entry["precision"] == "int8" for name, entry in layers.items()
               if name not in outputs)
    assert any(entry["elements"] < 64 for entry in layers.values())  # tiny SE convolutions are reported too
    assert summary["parameters"]["activation_bits"] == 8
    # Measured 22.8 dB, as per-channel int8 (the classifier is all conv but its last layer, 400 weights).
    assert summary["min_sqnr_db"] > 20 and summary["outputs"]["save_infer_model/scale_0.tmp_1"]["top1_agreement"] == 1
