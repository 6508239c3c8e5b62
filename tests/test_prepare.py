"""``pyqshare prepare`` and the QNN placement report, on the real MiniLM and on tiny synthetic graphs."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from pyqshare.errors import InputError
from pyqshare.model import find_weights, load_model
from pyqshare.prepare import prepare_model
from pyqshare.qnn.placement import placement_report
from pyqshare.qnn.rewrites import fuse_gelu

OPSET = [helper.make_opsetid("", 17)]


def _save(path, nodes, inputs, outputs, initializers=(), **save_kwargs):
    model = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, list(initializers)), opset_imports=OPSET)
    model.ir_version = 8  # what onnxruntime reads (onnx writes a newer one by default)
    onnx.checker.check_model(model)
    onnx.save(model, path, **save_kwargs)
    return path


def _const(name, values, dtype=np.int64):
    return numpy_helper.from_array(np.asarray(values, dtype=dtype), name)


def _run_cpu(path, feeds):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)


def _reshape_chain_model(path):
    """x[batch, sequence, 8] -> MatMul(w) -> Shape -> Gather(0) -> Unsqueeze -> Concat([., -1]) -> Reshape,
    then a Shape of that Reshape's output feeding another Reshape."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "sequence", 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", None])
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="matmul"),
        helper.make_node("Shape", ["h"], ["s"], name="shape"),
        helper.make_node("Gather", ["s", "zero"], ["b"], name="gather", axis=0),
        helper.make_node("Unsqueeze", ["b", "axes"], ["b1"], name="unsqueeze"),
        helper.make_node("Concat", ["b1", "minus_one"], ["target"], name="concat", axis=0),
        helper.make_node("Reshape", ["h", "target"], ["flat"], name="reshape"),
        helper.make_node("Shape", ["flat"], ["s2"], name="shape2"),
        helper.make_node("Reshape", ["flat", "s2"], ["flat2"], name="reshape2"),
        helper.make_node("Relu", ["flat2"], ["y"], name="relu"),
    ]
    w = np.random.default_rng(1).standard_normal((8, 16)).astype(np.float32)
    initializers = [_const("zero", 0), _const("axes", [0]), _const("minus_one", [-1]), numpy_helper.from_array(w, "w")]
    return _save(path, nodes, [x], [y], initializers)


# --- MiniLM: the real thing -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prepared_minilm(minilm_onnx, require_qnn, tmp_path_factory):
    output = tmp_path_factory.mktemp("prepare") / "minilm-prepared.onnx"
    return prepare_model(minilm_onnx, output), output


def test_minilm_prepared_runs_whole_on_the_htp(prepared_minilm):
    report, _ = prepared_minilm
    before, after = report["original"]["placement"], report["prepared"]["placement"]
    # Dynamic axes: the QNN EP "Cannot get shape" of almost anything, and every weight stays on the CPU.
    assert before["cpu_nodes"] > 4 * before["htp_nodes"]
    assert before["htp_weight_bytes"] == 0 and before["partitions"] > 1
    assert before["cpu_ops"]["MatMul"] >= 36
    assert any("Cannot get shape" in entry["reason"] for entry in before["fallback_reasons"])
    # Prepared float model, measured: every node in one QNN partition (the GELU pattern is fused on QNN).
    assert after["cpu_nodes"] == 0 and after["fallback_reasons"] == [] and after["cpu_ops"] == {}
    assert after["partitions"] == 1 and after["htp_nodes"] > 200
    assert after["htp_weight_bytes"] == report["prepared"]["weight_bytes"] and after["cpu_weight_bytes"] == 0


def test_minilm_prepared_is_static_checked_and_keeps_weights(prepared_minilm, minilm_onnx):
    report, output = prepared_minilm
    assert report["dims"] == {"batch": 1, "sequence": 128} and report["static_shapes"]
    assert report["prepared"]["input_shapes"] == {name: [1, 128] for name in report["original"]["input_shapes"]}
    model = onnx.load(output)
    onnx.checker.check_model(model)
    original = onnx.load(minilm_onnx)
    # The input's IR version, raised only as far as the opset of the fused Gelu (20) needs.
    assert model.ir_version == max(original.ir_version, helper.find_min_ir_version_for(list(model.opset_import)))
    assert not {"Shape", "ConstantOfShape", "Range"} & {node.op_type for node in model.graph.node}
    typed = {value.name: value for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]}
    for name in [value.name for value in model.graph.input] + [out for node in model.graph.node for out in node.output]:
        dims = typed[name].type.tensor_type.shape.dim
        assert all(dim.HasField("dim_value") for dim in dims), name
    kept = {weight.name: weight.array() for weight in find_weights(load_model(output), output.parent)}
    for weight in find_weights(load_model(minilm_onnx), minilm_onnx.parent):
        np.testing.assert_array_equal(kept[weight.name], weight.array())


def test_minilm_prepared_matches_the_original_on_cpu(prepared_minilm, minilm_onnx):
    _, output = prepared_minilm
    rng = np.random.default_rng(0)
    feeds = {
        "input_ids": rng.integers(1000, 2000, size=(1, 128)),
        "attention_mask": np.ones((1, 128), np.int64),
        "token_type_ids": np.zeros((1, 128), np.int64),
    }
    for reference, prepared in zip(_run_cpu(minilm_onnx, feeds), _run_cpu(output, feeds), strict=True):
        np.testing.assert_allclose(prepared, reference, rtol=1e-5, atol=1e-5)


# --- shapes -----------------------------------------------------------------------------------------------


def test_dynamic_dim_without_default_is_refused_by_name(tmp_path):
    image = helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 3, "height", 8])
    model = _save(tmp_path / "m.onnx", [helper.make_node("Relu", ["pixels"], ["y"])], [image],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3, "height", 8])])
    with pytest.raises(InputError, match=r"'pixels' axis 2 \(dim 'height'\).*--input-shape pixels="):
        prepare_model(model, tmp_path / "out.onnx", placement="none")
    assert not (tmp_path / "out.onnx").exists()
    report = prepare_model(model, tmp_path / "out.onnx", {"pixels": [2, 3, 5, 8]}, placement="none")
    assert report["dims"] == {"batch": 2, "height": 5} and report["static_shapes"]


def test_anonymous_dynamic_dim_is_the_batch_on_axis_0_only(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, None])
    model = _save(tmp_path / "m.onnx", [helper.make_node("Relu", ["x"], ["y"])], [x],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, None])])
    with pytest.raises(InputError, match=r"input 'x' axis 1 is dynamic"):
        prepare_model(model, tmp_path / "out.onnx", placement="none")
    report = prepare_model(model, tmp_path / "out.onnx", {"x": [3, 4]}, placement="none")
    assert report["prepared"]["input_shapes"] == {"x": [3, 4]} and report["static_shapes"]



@pytest.mark.parametrize(
    ("shapes", "message"),
    [
        ({"nope": [1, 128, 8]}, "no input 'nope'"),
        ({"x": [1, 128]}, "rank 3, got 2"),
        ({"x": [1, 128, 9]}, "axis 2 is fixed at 8 .*, got 9"),
        ({"x": [1, 128, 8], "mask": [1, 64]}, "dim 'sequence' is 128 elsewhere but 64 for input 'mask' axis 1"),
    ],
)
def test_input_shapes_that_do_not_fit_the_model(tmp_path, shapes, message):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "sequence", 8])
    mask = helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["batch", "sequence"])
    nodes = [helper.make_node("Unsqueeze", ["mask", "axes"], ["m3"]), helper.make_node("Mul", ["x", "m3"], ["y"])]
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "sequence", 8])
    model = _save(tmp_path / "m.onnx", nodes, [x, mask], [y], [_const("axes", [2])])
    with pytest.raises(InputError, match=message):
        prepare_model(model, tmp_path / "out.onnx", shapes, placement="none")


# --- folding ----------------------------------------------------------------------------------------------


def test_shape_chain_is_folded_and_outputs_match(tmp_path):
    source = _reshape_chain_model(tmp_path / "m.onnx")
    report = prepare_model(source, tmp_path / "out.onnx", {"x": [2, 4, 8]}, placement="none")
    model = onnx.load(tmp_path / "out.onnx")
    assert [node.op_type for node in model.graph.node] == ["MatMul", "Reshape", "Reshape", "Relu"]
    assert report["folded_nodes"] == 5 and report["prepared"]["nodes"] == 4
    assert report["static_shapes"] and report["dims"] == {"batch": 2, "sequence": 4}
    targets = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert targets["target"].tolist() == [2, -1] and targets["s2"].tolist() == [2, 64]
    assert not {"zero", "axes", "minus_one"} & set(targets)  # constants only the folded nodes read are gone
    assert [d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim] == [2, 64]
    x = np.random.default_rng(2).standard_normal((2, 4, 8)).astype(np.float32)
    np.testing.assert_array_equal(_run_cpu(tmp_path / "out.onnx", {"x": x})[0], _run_cpu(source, {"x": x})[0])


def test_add_and_mul_constants_go_second_with_the_same_outputs(tmp_path):
    """PyTorch's ``bias + x @ W`` is Add(bias, x): QNN then stores the bias broadcast over every row (3 MB of
    MiniLM's binary), so prepare swaps the operands; an Add of two activations stays as it is."""
    rng = np.random.default_rng(4)
    inits = [numpy_helper.from_array(rng.standard_normal(v).astype(np.float32), n)
             for n, v in (("w", (8, 16)), ("bias", (16,)), ("gain", (16,)))]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
             helper.make_node("Add", ["bias", "h"], ["a"], name="add_bias"),
             helper.make_node("Mul", ["gain", "a"], ["m"], name="mul_gain"),
             helper.make_node("Add", ["m", "h"], ["y"], name="add_two")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4, 16])], inits)
    source = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), source)
    prepare_model(source, tmp_path / "out.onnx", {}, placement="none")
    inputs = {node.name: list(node.input) for node in onnx.load(tmp_path / "out.onnx").graph.node}
    assert inputs["add_bias"] == ["h", "bias"] and inputs["mul_gain"] == ["a", "gain"]
    assert inputs["add_two"] == ["m", "h"]
    x = rng.standard_normal((2, 4, 8)).astype(np.float32)
    np.testing.assert_array_equal(_run_cpu(tmp_path / "out.onnx", {"x": x})[0], _run_cpu(source, {"x": x})[0])


def test_weights_and_their_consumers_are_never_folded(tmp_path):
    # onnxruntime's basic optimization would fold Transpose(w) into a second copy of w; prepare keeps it.
    w = np.arange(256, dtype=np.float32).reshape(16, 16)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])
    nodes = [
        helper.make_node("Transpose", ["w"], ["wt"], name="transpose", perm=[1, 0]),
        helper.make_node("MatMul", ["x", "wt"], ["y"], name="matmul"),
    ]
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 16])
    source = _save(tmp_path / "m.onnx", nodes, [x], [y], [numpy_helper.from_array(w, "w")])
    report = prepare_model(source, tmp_path / "out.onnx", placement="none")
    model = onnx.load(tmp_path / "out.onnx")
    assert report["folded_nodes"] == 0 and [n.op_type for n in model.graph.node] == ["Transpose", "MatMul"]
    assert [t.name for t in model.graph.initializer] == ["w"]
    np.testing.assert_array_equal(numpy_helper.to_array(model.graph.initializer[0]), w)
    assert report["original"]["weight_bytes"] == report["prepared"]["weight_bytes"] == w.nbytes


def test_subgraphs_are_kept_and_unnamed_nodes_named(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 64])

    def branch(op, weight):  # a branch reading the outer x and its own 64-element weight
        return helper.make_graph(
            [helper.make_node(op, ["x", weight], ["r"])], f"{op}_branch", [],
            [helper.make_tensor_value_info("r", TensorProto.FLOAT, ["batch", 64])],
            [numpy_helper.from_array(np.full(64, 2.0, np.float32), weight)],
        )

    nodes = [
        helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0),
        helper.make_node("Greater", ["total", "zero"], ["positive"]),
        helper.make_node("If", ["positive"], ["y"], then_branch=branch("Mul", "two"), else_branch=branch("Add", "b")),
    ]
    source = _save(tmp_path / "m.onnx", nodes, [x], [out], [_const("zero", 0.0, np.float32)])
    report = prepare_model(source, tmp_path / "out.onnx", placement="none")
    assert report["renamed_nodes"] == 5  # three top-level nodes and one per branch
    model = onnx.load(tmp_path / "out.onnx")
    branches = {a.name: a.g for a in model.graph.node[2].attribute}
    assert [n.op_type for n in branches["then_branch"].node] == ["Mul"]
    assert report["prepared"]["weight_bytes"] == 2 * 64 * 4
    for sign in (1.0, -1.0):
        feed = {"x": np.full((1, 64), sign, np.float32)}
        np.testing.assert_array_equal(_run_cpu(tmp_path / "out.onnx", feed)[0], _run_cpu(source, feed)[0])


def test_erf_gelu_becomes_gelu_and_constants_read_by_subgraphs_stay(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 64])

    def branch(op):  # reads the GELU output and w, both from the outer graph only
        return helper.make_graph([helper.make_node(op, ["g", "w"], ["r"])], op, [],
                                 [helper.make_tensor_value_info("r", TensorProto.FLOAT, [1, 64])])

    nodes = [
        helper.make_node("Div", ["x", "sqrt2"], ["d"]),
        helper.make_node("Erf", ["d"], ["e"], name="erf"),
        helper.make_node("Add", ["e", "one"], ["a"]),
        helper.make_node("Mul", ["x", "a"], ["p"]),
        helper.make_node("Mul", ["p", "half"], ["g"]),
        helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0),
        helper.make_node("Greater", ["total", "zero"], ["positive"]),
        helper.make_node("If", ["positive"], ["z"], then_branch=branch("Mul"), else_branch=branch("Add")),
    ]
    scalars = {"sqrt2": np.sqrt(2.0), "one": 1.0, "half": 0.5, "zero": 0.0}
    initializers = [_const(name, value, np.float32) for name, value in scalars.items()]
    initializers.append(numpy_helper.from_array(np.linspace(-1, 1, 64, dtype=np.float32), "w"))
    source = _save(tmp_path / "m.onnx", nodes, [x], [z], initializers)
    model = onnx.load(source)
    assert fuse_gelu(model) == 1
    assert [n.op_type for n in model.graph.node] == ["Gelu", "ReduceSum", "Greater", "If"]
    assert {t.name for t in model.graph.initializer} == {"zero", "w"}
    onnx.save(model, tmp_path / "fused.onnx")
    for sign in (1.0, -1.0):
        feed = {"x": sign * np.linspace(-3, 3, 64, dtype=np.float32).reshape(1, 64)}
        np.testing.assert_allclose(_run_cpu(tmp_path / "fused.onnx", feed)[0], _run_cpu(source, feed)[0], atol=1e-6)


# --- files ------------------------------------------------------------------------------------------------


def test_external_data_is_copied_beside_the_output(tmp_path):
    reference = _reshape_chain_model(tmp_path / "reference.onnx")
    (tmp_path / "in").mkdir()
    source = tmp_path / "in" / "m.onnx"
    # Every tensor external, even the shape constants (onnxruntime itself cannot load that; prepare can).
    onnx.save(onnx.load(reference), source, save_as_external_data=True, location="m.weights", size_threshold=0)
    report = prepare_model(source, tmp_path / "out" / "p.onnx", placement="none")
    assert report["external_data"] == "p.onnx.data"
    data = tmp_path / "out" / "p.onnx.data"
    assert report["size_bytes"] == (tmp_path / "out" / "p.onnx").stat().st_size + data.stat().st_size
    onnx.checker.check_model(str(tmp_path / "out" / "p.onnx"))
    x = np.random.default_rng(3).standard_normal((1, 128, 8)).astype(np.float32)
    np.testing.assert_array_equal(_run_cpu(tmp_path / "out" / "p.onnx", {"x": x})[0], _run_cpu(reference, {"x": x})[0])


def test_external_data_escaping_the_model_folder_is_refused(tmp_path):
    (tmp_path / "in").mkdir()
    source = _reshape_chain_model(tmp_path / "in" / "m.onnx")
    onnx.save(onnx.load(source), source, save_as_external_data=True, location="m.weights", size_threshold=0)
    model = onnx.load(source, load_external_data=False)
    (tmp_path / "m.weights").write_bytes((tmp_path / "in" / "m.weights").read_bytes())
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../m.weights"
    onnx.save(model, source)
    with pytest.raises(InputError, match=r"--model-path: .*'\.\./m\.weights' contains '\.\.'"):
        prepare_model(source, tmp_path / "out.onnx", placement="none")
    assert not (tmp_path / "out.onnx").exists()


def test_output_whose_data_file_is_the_inputs_is_refused(tmp_path):
    source = _reshape_chain_model(tmp_path / "m.onnx")
    onnx.save(onnx.load(source), source, save_as_external_data=True, location="p.onnx.data", size_threshold=0)
    data = (tmp_path / "p.onnx.data").read_bytes()
    with pytest.raises(InputError, match="--output-path: .*p.onnx.data is the input's own data file"):
        prepare_model(source, tmp_path / "p.onnx", placement="none")
    assert (tmp_path / "p.onnx.data").read_bytes() == data and not (tmp_path / "p.onnx").exists()


def test_bad_files_are_input_errors(tmp_path):
    source = _reshape_chain_model(tmp_path / "m.onnx")
    with pytest.raises(InputError, match="must differ"):
        prepare_model(source, source, placement="none")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(InputError, match="not an ONNX model"):
        prepare_model(tmp_path / "junk.onnx", tmp_path / "out.onnx", placement="none")
    with pytest.raises(InputError, match="--placement"):
        prepare_model(source, tmp_path / "out.onnx", placement="all")


# --- placement on a tiny graph ----------------------------------------------------------------------------


def _mod_model(path, names=("first", "mod", "add", "second"), **save_kwargs):
    """MatMul(w1) -> Mod(b, fmod=1) -> Add(b) -> MatMul(w2): QNN takes Mod only with fmod=0, so the Mod falls
    back and splits the graph in two partitions; b feeds both sides."""
    rng = np.random.default_rng(4)
    w1, w2 = (numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), n) for n in ("w1", "w2"))
    b = numpy_helper.from_array(np.full(64, 3.0, np.float32), "b")
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name=names[0]),
        helper.make_node("Mod", ["h", "b"], ["m"], name=names[1], fmod=1),
        helper.make_node("Add", ["m", "b"], ["a"], name=names[2]),
        helper.make_node("MatMul", ["a", "w2"], ["y"], name=names[3]),
    ]
    return _save(path, nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])], [w1, w2, b], **save_kwargs)


def test_placement_counts_nodes_partitions_weights_and_reasons(tmp_path, require_qnn):
    placement = placement_report(_mod_model(tmp_path / "m.onnx"))
    assert (placement.htp_nodes, placement.cpu_nodes, placement.partitions) == (3, 1, 2)
    assert placement.htp_weight_bytes == 2 * 64 * 64 * 4 + 64 * 4 and placement.cpu_weight_bytes == 64 * 4
    assert placement.cpu_ops == {"Mod": 1}
    (fallback,) = placement.fallback_reasons
    assert fallback["node"] == "mod" and fallback["op_type"] == "Mod" and "fmod" in fallback["reason"]
    assert set(placement.to_dict()) >= {"htp_nodes", "cpu_nodes", "partitions", "htp_weight_bytes",
                                        "cpu_weight_bytes", "cpu_ops", "fallback_reasons"}


def test_placement_of_unnamed_nodes_with_external_data(tmp_path, require_qnn):
    # Nodes get names in a temporary copy whose weights stay in the model's folder (read from there).
    model = _mod_model(tmp_path / "m.onnx", names=("", "", "", ""), save_as_external_data=True, location="m.data")
    placement = placement_report(model)
    assert (placement.htp_nodes, placement.cpu_nodes, placement.partitions) == (3, 1, 2)
    assert placement.htp_weight_bytes == 2 * 64 * 64 * 4 + 64 * 4 and placement.cpu_weight_bytes == 64 * 4
    assert [entry["node"] for entry in placement.fallback_reasons] == ["Mod_1"]
    assert not any(tmp_path.glob("*named*"))  # the copy lived in a temporary folder


# --- the command line -------------------------------------------------------------------------------------


def test_cli_json_is_one_object_and_placement_logs_stay_off_stdout(tmp_path, require_qnn, run_cli):
    source = _reshape_chain_model(tmp_path / "m.onnx")
    done = run_cli("prepare", "--model-path", source, "--output-path", tmp_path / "out.onnx",
                   "--input-shape", "x=1,4,8", "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert isinstance(report, dict) and done.stdout.count("\n") == 1
    assert report["prepared"]["placement"]["cpu_nodes"] == 0
    assert report["original"]["placement"]["cpu_nodes"] > 0


def test_cli_missing_model_exits_2_with_one_line(tmp_path, run_cli):
    done = run_cli("prepare", "--model-path", tmp_path / "absent.onnx", "--output-path", tmp_path / "out.onnx",
                   "--json", cwd=tmp_path)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "--model-path" in done.stderr and "absent.onnx" in done.stderr
