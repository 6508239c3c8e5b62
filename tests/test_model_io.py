"""ONNX I/O on real files and real onnxruntime: weight discovery and roles, hostile external data, atomic
writes with and without external data, opset upgrades, and QDQ insertion at every integer type."""

from __future__ import annotations

import contextlib
import inspect
import mmap
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import convert_model_to_external_data

from pyqshare.errors import InputError
from pyqshare.model import (
    default_opset,
    ensure_opset,
    find_graph,
    find_weights,
    insert_activation_qdq,
    iter_graphs,
    load_model,
    quantize_bias_in_place,
    quantize_weight_in_place,
    replace_weight,
    save_model,
    supported_ir_version,
)
from pyqshare.model.graph import iter_tensors

RNG = np.random.default_rng(20240611)
CODE_TYPES = [
    TensorProto.INT4,
    TensorProto.UINT4,
    TensorProto.INT8,
    TensorProto.UINT8,
    TensorProto.INT16,
    TensorProto.UINT16,
]
CODE_RANGES = {
    TensorProto.INT4: (-8, 7),
    TensorProto.UINT4: (0, 15),
    TensorProto.INT8: (-128, 127),
    TensorProto.UINT8: (0, 255),
    TensorProto.INT16: (-32768, 32767),
    TensorProto.UINT16: (0, 65535),
}


# ----------------------------------------------------------------------------------------------- builders


def rand(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def init(name: str, array) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def value(name: str, shape, elem_type: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem_type, shape)


def make_model(nodes, inputs, outputs, initializers=(), *, opset: int = 21, ir_version: int = 10) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version)


# onnxruntime's CPU provider fuses DequantizeLinear(int4/int8/uint8 weight) + MatMul into MatMulNBits with
# accuracy level 4, which quantizes the activations to int8 on the fly; level 0 keeps QDQ's exact meaning.
EXACT_QDQ = {"session.qdq_matmulnbits_accuracy_level": "0"}


def run(model: onnx.ModelProto | Path, feeds: dict, config: dict | None = EXACT_QDQ) -> list[np.ndarray]:
    options = ort.SessionOptions()
    for key, entry in (config or {}).items():
        options.add_session_config_entry(key, entry)
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"]).run(None, feeds)


def check_written(path: Path) -> None:
    """Every written model passes the full checker (with its external data) and loads in onnxruntime."""
    onnx.checker.check_model(str(path), full_check=True)
    ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def by_name(weights) -> dict:
    return {weight.name: weight for weight in weights}


def backed_by_mmap(array: np.ndarray) -> bool:
    base = array
    while base is not None:
        if isinstance(base, memoryview):
            base = base.obj
        if isinstance(base, mmap.mmap):
            return True
        base = getattr(base, "base", None)
    return False


# Python's audit hooks see every open() and os.open(): the proof that refused files are never opened.
_OPENS: list[str] | None = None


def _record_opens(event: str, args: tuple) -> None:
    if event == "open" and _OPENS is not None:
        _OPENS.append(os.fsdecode(args[0]) if isinstance(args[0], (str, bytes, os.PathLike)) else str(args[0]))


sys.addaudithook(_record_opens)


@contextlib.contextmanager
def recorded_opens():
    global _OPENS
    _OPENS = []
    try:
        yield _OPENS
    finally:
        _OPENS = None


# ----------------------------------------------------------------------------------------------- roles


def linear_model():
    """x @ W1 (+ b1 after) -> (b2 before +) h @ W2: the MatMul+Add pattern of transformer exports; beside it
    x @ x^T + mask, attention's pattern, whose mask is no bias."""
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"),
        helper.make_node("Add", ["h", "b1"], ["h1"], name="add1"),
        helper.make_node("MatMul", ["h1", "W2"], ["h2"], name="mm2"),
        helper.make_node("Add", ["b2", "h2"], ["y"], name="add2"),
        helper.make_node("Add", ["x", "other"], ["z"], name="add_input"),
        helper.make_node("Transpose", ["x"], ["xT"]),
        helper.make_node("MatMul", ["x", "xT"], ["scores"], name="scores"),
        helper.make_node("Add", ["scores", "mask"], ["attention"], name="add_mask"),
    ]
    inits = [
        init("W1", rand(16, 32)),
        init("b1", rand(32)),
        init("W2", rand(32, 8)),
        init("b2", rand(8)),
        init("other", rand(16)),
        init("mask", rand(2)),
    ]
    outputs = [value("y", [2, 8]), value("z", [2, 16]), value("attention", [2, 2])]
    model = make_model(nodes, [value("x", [2, 16])], outputs, inits)
    expected = {
        "W1": ("matmul", 1, 0, None),
        "b1": ("bias", 0, None, "W1"),
        "W2": ("matmul", 1, 0, None),
        "b2": ("bias", 0, None, "W2"),
        "other": ("other", None, None, None),
        "mask": ("other", None, None, None),
    }
    return model, {"x": rand(2, 16)}, expected


def matmul_lhs_model():
    nodes = [helper.make_node("MatMul", ["W", "x"], ["y"], name="mm")]
    model = make_model(nodes, [value("x", [16, 4])], [value("y", [32, 4])], [init("W", rand(32, 16))])
    return model, {"x": rand(16, 4)}, {"W": ("matmul_lhs", 0, 1, None)}


def gemm_model():
    nodes = [
        helper.make_node("Gemm", ["x", "B0", "C0"], ["y0"], name="gemm0", transB=0),
        helper.make_node("Gemm", ["x", "B1", "C1"], ["y1"], name="gemm1", transB=1),
        helper.make_node("Gemm", ["A", "x8"], ["y2"], name="gemm_lhs", transA=1),
    ]
    inits = [
        init("B0", rand(16, 32)),
        init("C0", rand(32)),
        init("B1", rand(24, 16)),
        init("C1", rand(24)),
        init("A", rand(16, 12)),
    ]
    model = make_model(
        nodes,
        [value("x", [2, 16]), value("x8", [16, 8])],
        [value("y0", [2, 32]), value("y1", [2, 24]), value("y2", [12, 8])],
        inits,
    )
    expected = {
        "B0": ("matmul", 1, 0, None),
        "C0": ("bias", 0, None, "B0"),
        "B1": ("matmul", 0, 1, None),
        "C1": ("bias", 0, None, "B1"),
        "A": ("matmul_lhs", 1, 0, None),
    }
    return model, {"x": rand(2, 16), "x8": rand(16, 8)}, expected


def conv_model():
    nodes = [
        helper.make_node("Conv", ["x", "W", "B"], ["y"], name="conv", pads=[1, 1, 1, 1], group=2),
        helper.make_node("ConvTranspose", ["x", "WT", "BT"], ["z"], name="convT", group=2),
    ]
    inits = [init("W", rand(8, 2, 3, 3)), init("B", rand(8)), init("WT", rand(4, 3, 3, 3)), init("BT", rand(6))]
    model = make_model(nodes, [value("x", [1, 4, 5, 5])], [value("y", [1, 8, 5, 5]), value("z", [1, 6, 7, 7])], inits)
    expected = {
        "W": ("conv", 0, 1, None),
        "B": ("bias", 0, None, "W"),
        "WT": ("conv", 1, 0, None),
        "BT": ("bias", 0, None, "WT"),
    }
    return model, {"x": rand(1, 4, 5, 5)}, expected


def rnn_model():
    hidden, features = 4, 8
    nodes = [
        helper.make_node("LSTM", ["x", "LW", "LR", "LB"], ["ly"], name="lstm", hidden_size=hidden),
        helper.make_node("GRU", ["x", "GW", "GR", "GB"], ["gy"], name="gru", hidden_size=hidden),
    ]
    inits = [
        init("LW", rand(1, 4 * hidden, features)),
        init("LR", rand(1, 4 * hidden, hidden)),
        init("LB", rand(1, 8 * hidden)),
        init("GW", rand(1, 3 * hidden, features)),
        init("GR", rand(1, 3 * hidden, hidden)),
        init("GB", rand(1, 6 * hidden)),
    ]
    model = make_model(
        nodes, [value("x", [5, 1, features])], [value("ly", [5, 1, 1, hidden]), value("gy", [5, 1, 1, hidden])], inits
    )
    expected = {
        "LW": ("rnn_w", 1, 2, None),
        "LR": ("rnn_r", 1, 2, None),
        "LB": ("rnn_b", 1, None, None),
        "GW": ("rnn_w", 1, 2, None),
        "GR": ("rnn_r", 1, 2, None),
        "GB": ("rnn_b", 1, None, None),
    }
    return model, {"x": rand(5, 1, features)}, expected


def embedding_and_norm_model():
    """Gather embedding, a tied output projection (Gemm transB=1 on the same table), LayerNorm and
    BatchNorm parameters, a float Resize scales input and an int64 tensor (neither is a weight)."""
    nodes = [
        helper.make_node("Gather", ["E", "ids"], ["emb"], name="gather"),
        helper.make_node("LayerNormalization", ["emb", "ln_scale", "ln_bias"], ["h"], name="ln", axis=-1),
        helper.make_node("Reshape", ["h", "shape"], ["h2"], name="flatten"),
        helper.make_node("Gemm", ["h2", "E"], ["logits"], name="lm_head", transB=1),
        helper.make_node("BatchNormalization", ["img", "bn_s", "bn_b", "bn_m", "bn_v"], ["bn"], name="bn"),
        helper.make_node("Resize", ["bn", "", "scales"], ["up"], name="resize"),
    ]
    inits = [
        init("E", rand(50, 16)),
        init("ln_scale", rand(16)),
        init("ln_bias", rand(16)),
        init("shape", np.array([-1, 16], np.int64)),
        init("bn_s", rand(4)),
        init("bn_b", rand(4)),
        init("bn_m", rand(4)),
        init("bn_v", np.abs(rand(4)) + 1),
        init("scales", np.array([1, 1, 2, 2], np.float32)),
        init("token_table", np.arange(100, dtype=np.int64)),
    ]
    model = make_model(
        nodes,
        [value("ids", [2, 3], TensorProto.INT64), value("img", [1, 4, 2, 2])],
        [value("logits", [6, 50]), value("up", [1, 4, 4, 4])],
        inits,
    )
    expected = {
        "E": ("matmul", 0, 1, None),
        "ln_scale": ("norm", 0, None, None),
        "ln_bias": ("norm", 0, None, None),
        **{name: ("norm", 0, None, None) for name in ("bn_s", "bn_b", "bn_m", "bn_v")},
    }
    feeds = {"ids": RNG.integers(0, 50, (2, 3)).astype(np.int64), "img": rand(1, 4, 2, 2)}
    return model, feeds, expected


ROLE_MODELS = [linear_model, matmul_lhs_model, gemm_model, conv_model, rnn_model, embedding_and_norm_model]


@pytest.mark.parametrize("build", ROLE_MODELS, ids=lambda build: build.__name__)
def test_roles_and_axes_follow_the_consumer(build):
    model, feeds, expected = build()
    run(model, feeds)  # the graph is valid and its shapes agree
    weights = by_name(find_weights(model, None, min_elements=1))
    assert set(weights) == set(expected), "integer tensors and Resize scales are not weights"
    for name, (role, channel, reduction, bias_of) in expected.items():
        weight = weights[name]
        assert (weight.role, weight.channel_axis, weight.reduction_axis, weight.bias_of) == (
            role,
            channel,
            reduction,
            bias_of,
        ), name
        assert weight.location == "initializer" and weight.graph == ""
        assert weight.nbytes == weight.size * 4 and weight.dtype == np.float32


def test_a_tied_embedding_takes_the_strongest_role_and_lists_every_consumer():
    model, _, _ = embedding_and_norm_model()
    table = by_name(find_weights(model, None))["E"]
    assert table.role == "matmul" and table.channel_axis == 0
    assert sorted(table.consumers) == [("gather", "Gather", 0), ("lm_head", "Gemm", 1)]
    alone = make_model(
        [helper.make_node("Gather", ["E", "ids"], ["emb"])],
        [value("ids", [3], TensorProto.INT64)],
        [value("emb", [3, 16])],
        [init("E", rand(50, 16))],
    )
    (embedding,) = find_weights(alone, None)
    assert (embedding.role, embedding.channel_axis) == ("embedding", None)


def test_min_elements_is_the_weight_threshold():
    model, _, _ = linear_model()
    sizes = {weight.name: weight.size for weight in find_weights(model, None)}
    assert sizes == {"W1": 512, "W2": 256}  # biases (32, 8, 16 elements) fall under the default 64
    assert "b1" in by_name(find_weights(model, None, min_elements=32))


# Where a perturbed weight channel shows up in the node's output: (output index, output axis, channels hit).
CHANNEL_CASES = [
    (linear_model, "W2", 0, -1, lambda c: {c}),
    (matmul_lhs_model, "W", 0, 0, lambda c: {c}),
    (gemm_model, "B0", 0, 1, lambda c: {c}),
    (gemm_model, "B1", 1, 1, lambda c: {c}),
    (gemm_model, "A", 2, 0, lambda c: {c}),
    (conv_model, "W", 0, 1, lambda c: {c}),
    # ConvTranspose with group=2: weight slot c of the 3 per group feeds output channels c and 3 + c.
    (conv_model, "WT", 1, 1, lambda c: {c, 3 + c}),
]


@pytest.mark.parametrize(
    "build, name, output, axis, hit", CHANNEL_CASES, ids=[f"{case[0].__name__}-{case[1]}" for case in CHANNEL_CASES]
)
def test_the_channel_axis_indexes_output_channels(build, name, output, axis, hit):
    """Changing one slice of a weight along its channel_axis changes exactly the matching output channels."""
    model, feeds, _ = build()
    weight = by_name(find_weights(model, None))[name]
    before = run(model, feeds)[output]
    channel = 1
    changed = weight.array().copy()
    np.moveaxis(changed, weight.channel_axis, 0)[channel] += 1.0
    replace_weight(model, weight, changed)
    np.testing.assert_array_equal(weight.array(), changed)
    after = run(model, feeds)[output]
    differs = np.moveaxis(np.abs(after - before) > 1e-4, axis, 0).reshape(before.shape[axis], -1).any(axis=1)
    assert set(np.flatnonzero(differs)) == hit(channel)


# ----------------------------------------------------------------------------------------------- locations


def locations_model() -> tuple[onnx.ModelProto, dict]:
    """Weights in every place exporters put them: initializers, Constant nodes (tensor and value_floats), If
    branches (local initializer, local Constant, and an outer-scope read), a Loop body with an If nested in
    it, and a Scan body."""
    d = 16
    then_branch = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W_then"], ["t0"], name="then_mm"),
            helper.make_node("MatMul", ["t0", "W_main"], ["t"], name="then_outer_mm"),
        ],
        "then",
        [],
        [value("t", [2, d])],
        [init("W_then", rand(d, d))],
    )
    else_branch = helper.make_graph(
        [
            helper.make_node("Constant", [], ["W_else"], name="else_const", value=init("W_else_value", rand(d, d))),
            helper.make_node("MatMul", ["x", "W_else"], ["e"], name="else_mm"),
        ],
        "else",
        [],
        [value("e", [2, d])],
    )
    inner_then = helper.make_graph(
        [helper.make_node("MatMul", ["h_in", "W_nested"], ["n"], name="nested_mm")],
        "inner_then",
        [],
        [value("n", [2, d])],
        [init("W_nested", rand(d, d))],
    )
    inner_else = helper.make_graph(
        [helper.make_node("Identity", ["h_in"], ["m"])], "inner_else", [], [value("m", [2, d])]
    )
    loop_body = helper.make_graph(
        [
            helper.make_node("MatMul", ["h_in", "W_loop"], ["l0"], name="loop_mm"),
            helper.make_node("If", ["cond_in"], ["l1"], name="inner", then_branch=inner_then, else_branch=inner_else),
            helper.make_node("Add", ["l0", "l1"], ["h_out"]),
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
        ],
        "body",
        [value("i", [], TensorProto.INT64), value("cond_in", [], TensorProto.BOOL), value("h_in", [2, d])],
        [value("cond_out", [], TensorProto.BOOL), value("h_out", [2, d])],
        [init("W_loop", rand(d, d))],
    )
    scan_body = helper.make_graph(
        [
            helper.make_node("Constant", [], ["W_scan"], name="scan_const", value=init("W_scan_value", rand(d, d))),
            helper.make_node("MatMul", ["row", "W_scan"], ["r"], name="scan_mm"),
            helper.make_node("Add", ["s_in", "r"], ["s_out"]),
            helper.make_node("Identity", ["s_out"], ["row_out"]),
        ],
        "scan_body",
        [value("s_in", [d]), value("row", [d])],
        [value("s_out", [d]), value("row_out", [d])],
    )
    nodes = [
        helper.make_node("MatMul", ["x", "W_main"], ["a"], name="main_mm"),
        helper.make_node("Constant", [], ["W_const"], name="const", value=init("W_const_value", rand(d, d))),
        helper.make_node("Constant", [], ["b_floats"], name="floats", value_floats=rand(d * 4).tolist()),
        helper.make_node("MatMul", ["a", "W_const"], ["a2"], name="const_mm"),
        helper.make_node("Reshape", ["a2", "flat"], ["a3"]),
        helper.make_node("Concat", ["a3", "a3"], ["a3x2"], axis=0),
        helper.make_node("Add", ["a3x2", "b_floats"], ["a4"], name="floats_add"),
        helper.make_node(
            "If", ["cond"], ["branch_out"], name="branch", then_branch=then_branch, else_branch=else_branch
        ),
        helper.make_node("Loop", ["trip", "cond", "x"], ["loop_out"], name="loop", body=loop_body),
        helper.make_node(
            "Scan", ["s0", "xs"], ["scan_state", "scan_rows"], name="scan", body=scan_body, num_scan_inputs=1
        ),
    ]
    model = make_model(
        nodes,
        [value("x", [2, d]), value("cond", [], TensorProto.BOOL), value("s0", [d]), value("xs", [3, d])],
        [
            value("a4", [d * 4]),
            value("branch_out", [2, d]),
            value("loop_out", [2, d]),
            value("scan_state", [d]),
            value("scan_rows", [3, d]),
        ],
        [init("W_main", rand(d, d)), init("trip", np.array(2, np.int64)), init("flat", np.array([-1], np.int64))],
    )
    model.metadata_props.add(key="exporter", value="test")
    model.doc_string = "every weight location"
    model.graph.value_info.extend([value("a", [2, d]), value("a3x2", [d * 4])])
    feeds = {"x": rand(2, d), "cond": np.array(True), "s0": rand(d), "xs": rand(3, d)}
    return model, feeds


LOCATIONS = {  # name -> (location, graph)
    "W_main": ("initializer", ""),
    "W_const": ("constant", ""),
    "b_floats": ("constant", ""),
    "W_then": ("initializer", "branch/then_branch"),
    "W_else": ("constant", "branch/else_branch"),
    "W_loop": ("initializer", "loop/body"),
    "W_nested": ("initializer", "loop/body/inner/then_branch"),
    "W_scan": ("constant", "scan/body"),
}


def test_weights_are_found_in_every_location_and_subgraph():
    model, _ = locations_model()
    weights = by_name(find_weights(model, None))
    assert {name: (w.location, w.graph) for name, w in weights.items()} == LOCATIONS
    assert weights["W_main"].consumers == [("main_mm", "MatMul", 1), ("then_outer_mm", "MatMul", 1)]
    assert weights["W_main"].role == "matmul" and weights["W_nested"].role == "matmul"
    assert weights["b_floats"].shape == (64,) and weights["b_floats"].role == "other"
    assert weights["W_else"].consumers == [("else_mm", "MatMul", 1)]
    for weight in weights.values():
        graph = find_graph(model, weight.graph)
        stored = {t.name for t in graph.initializer} | {n.output[0] for n in graph.node if n.op_type == "Constant"}
        assert weight.name in stored
    const_node = next(node for node in model.graph.node if node.name == "const")
    np.testing.assert_array_equal(weights["W_const"].array(), numpy_helper.to_array(const_node.attribute[0].t))
    # An unnamed node is named by its first output in graph paths.
    next(node for node in model.graph.node if node.name == "branch").name = ""
    assert by_name(find_weights(model, None))["W_then"].graph == "branch_out/then_branch"


def save_with_external(model: onnx.ModelProto, folder: Path, name: str = "m.onnx") -> Path:
    """Written the way exporters write big models: onnx's own external-data writer (Constant values too)."""
    folder.mkdir(parents=True, exist_ok=True)
    model = onnx.ModelProto.FromString(model.SerializeToString())  # onnx converts the model it is given
    convert_model_to_external_data(model, location="weights.bin", size_threshold=256, convert_attribute=True)
    onnx.save(model, folder / name)
    return folder / name


def test_external_weights_are_memory_mapped_and_never_loaded(tmp_path):
    model, feeds = locations_model()
    expected = {w.name: w.array().copy() for w in find_weights(model, None)}
    path = save_with_external(model, tmp_path)
    loaded = load_model(path)
    external = [t for g in (loaded.graph,) for t in g.initializer if t.data_location == TensorProto.EXTERNAL]
    assert external and all(not t.raw_data for t in external), "load_model leaves external data on disk"
    weights = by_name(find_weights(loaded, tmp_path))
    assert weights["W_main"].location == "external" and weights["W_then"].location == "external"
    assert weights["W_const"].location == "constant"  # a Constant whose value lives in the external file
    for name, array in expected.items():
        got = weights[name].array()
        np.testing.assert_array_equal(got, array)
        assert not got.flags.writeable
    assert backed_by_mmap(weights["W_main"].array()) and backed_by_mmap(weights["W_const"].array())
    with pytest.raises(ValueError, match="model_dir"):
        find_weights(loaded, None)
    np.testing.assert_array_equal(run(load_model(path, load_weights=True), feeds)[1], run(model, feeds)[1])


# ----------------------------------------------------------------------------------------------- hostile data


def external_model(
    folder: Path, location: str, *, offset: int = 0, length: int | None = None, name: str = "m.onnx", rows: int = 16
) -> Path:
    """x @ W with W (rows x 16) given an external-data entry by hand (the data file is not touched here)."""
    weight = onnx.TensorProto(
        name="W", data_type=TensorProto.FLOAT, dims=[rows, 16], data_location=TensorProto.EXTERNAL
    )
    entries = {"location": location, "offset": str(offset), "length": str(rows * 16 * 4 if length is None else length)}
    for key, entry in entries.items():
        weight.external_data.add(key=key, value=entry)
    model = make_model(
        [helper.make_node("MatMul", ["x", "W"], ["y"])], [value("x", [2, 16])], [value("y", [2, 16])], [weight]
    )
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model, folder / name)
    return folder / name


@pytest.fixture
def hostile_setup(tmp_path):
    """A model folder with a valid data file, a link to a file outside, a link to a folder outside, and a
    FIFO (whose opening would block); and the secret outside."""
    folder, outside = tmp_path / "model", tmp_path / "outside"
    folder.mkdir()
    outside.mkdir()
    data = rand(16, 16).tobytes()
    (folder / "w.bin").write_bytes(data)
    (outside / "secret.bin").write_bytes(data)
    (folder / "link.bin").symlink_to(outside / "secret.bin")
    (folder / "linkdir").symlink_to(outside, target_is_directory=True)
    os.mkfifo(folder / "pipe")
    return folder, outside


SIZE = 16 * 16 * 4
HOSTILE = {  # case -> (external_model arguments, expected message fragment)
    "absolute": ({"location": "{outside}/secret.bin"}, "absolute path"),
    "dotdot": ({"location": "../outside/secret.bin"}, "'..'"),
    "dotdot_inside": ({"location": "sub/../../outside/secret.bin"}, "'..'"),
    "symlinked_file": ({"location": "link.bin"}, "symbolic link"),
    "symlinked_parent": ({"location": "linkdir/secret.bin"}, "symbolic link"),
    "offset_past_end": ({"location": "w.bin", "offset": SIZE + 8}, "outside the"),
    "length_past_end": ({"location": "w.bin", "offset": 8}, "outside the"),
    "negative_offset": ({"location": "w.bin", "offset": -4}, "outside the"),
    "length_mismatch": ({"location": "w.bin", "length": SIZE - 4}, "needs 1024"),
    "missing": ({"location": "absent.bin"}, "no such file"),
    "fifo": ({"location": "pipe"}, "not a regular file"),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_external_data_is_refused_and_never_opened(hostile_setup, case):
    folder, outside = hostile_setup
    arguments, fragment = HOSTILE[case]
    arguments = {**arguments, "location": arguments["location"].format(outside=outside)}
    path = external_model(folder, **arguments, name=f"{case}.onnx")
    with recorded_opens() as opened, pytest.raises(InputError) as refused:
        load_model(path)
    message = str(refused.value)
    assert "'W'" in message and arguments["location"] in message and fragment in message, message
    assert opened == [str(path)], f"only the model file itself may be opened, not {opened}"
    # A model parsed elsewhere is validated again before any weight is read.
    unchecked = onnx.load(path, load_external_data=False)
    with recorded_opens() as opened, pytest.raises(InputError, match=fragment):
        find_weights(unchecked, folder)
    assert opened == []


def test_links_that_stay_inside_the_folder_are_fine(hostile_setup):
    folder, _ = hostile_setup
    (folder / "sub").mkdir()
    (folder / "sub" / "alias.bin").symlink_to(folder / "w.bin")
    path = external_model(folder, "sub/alias.bin")
    (weight,) = find_weights(load_model(path), folder)
    np.testing.assert_array_equal(
        weight.array(), np.frombuffer((folder / "w.bin").read_bytes(), np.float32).reshape(16, 16)
    )


def test_reading_revalidates_a_location_changed_after_loading(hostile_setup):
    folder, outside = hostile_setup
    path = external_model(folder, "w.bin")
    (weight,) = find_weights(load_model(path), folder)
    (folder / "w.bin").unlink()
    (folder / "w.bin").symlink_to(outside / "secret.bin")
    with recorded_opens() as opened, pytest.raises(InputError, match="symbolic link"):
        weight.array()
    assert opened == []


def test_broken_model_files_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="no such model file"):
        load_model(tmp_path / "absent.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"\xff\xff\xff\xff not protobuf")
    with pytest.raises(InputError, match="not an ONNX model"):
        load_model(tmp_path / "junk.onnx")


# ----------------------------------------------------------------------------------------------- saving


def test_inline_round_trip_keeps_the_model_and_its_outputs(tmp_path):
    model, feeds = locations_model()
    model.ir_version = 14  # what onnx >= 1.23 stamps by default; onnxruntime 1.31 refuses it
    original = onnx.ModelProto.FromString(model.SerializeToString())
    (path,) = save_model(model, tmp_path / "out.onnx")
    check_written(path)
    reloaded = load_model(path)
    assert reloaded.ir_version == 10
    original.ir_version = 10
    assert reloaded == original, "nodes, attributes, metadata, value_info and doc strings are written unchanged"
    for before, after in zip(run(original, feeds), run(path, feeds)):
        np.testing.assert_array_equal(before, after)


def test_external_data_via_the_threshold(tmp_path):
    model, feeds = locations_model()
    snapshot = model.SerializeToString()
    paths = save_model(model, tmp_path / "q.onnx", external_data_threshold=4096)
    assert paths == [tmp_path / "q.onnx", tmp_path / "q.onnx.data"]
    assert model.SerializeToString() == snapshot, "the in-memory model is left as it was"
    check_written(paths[0])
    written = onnx.load(paths[0], load_external_data=False)
    tensors = [tensor for _, tensor in iter_tensors(written)]
    entries = [{e.key: e.value for e in t.external_data} for t in tensors if t.data_location == TensorProto.EXTERNAL]
    assert len(entries) == 7, "the 16x16 weights: 4 initializers (3 in subgraphs) and 3 Constant values"
    assert all(e["location"] == "q.onnx.data" and int(e["offset"]) % 64 == 0 for e in entries)
    assert all(len(t.raw_data) < 1024 for t in tensors if t.data_location != TensorProto.EXTERNAL)
    assert os.path.getsize(paths[1]) == 7 * 1024 and os.path.getsize(paths[0]) < 4096
    assert load_model(paths[0], load_weights=True) == model, "everything but the tensors' storage is kept"
    for before, after in zip(run(model, feeds), run(paths[0], feeds)):
        np.testing.assert_array_equal(before, after)
    small = save_model(model, tmp_path / "auto.onnx")  # below the 2 GiB default: one file
    assert small == [tmp_path / "auto.onnx"] and not (tmp_path / "auto.onnx.data").exists()


def test_external_models_stream_into_new_files_and_back_inline(tmp_path):
    model, feeds = locations_model()
    reference = run(model, feeds)
    source = save_with_external(model, tmp_path / "src")
    loaded = load_model(source)
    with pytest.raises(ValueError, match="model_dir"):
        save_model(loaded, tmp_path / "x.onnx")
    moved = save_model(loaded, tmp_path / "moved" / "m.onnx", external_data=True, model_dir=source.parent)
    inline = save_model(loaded, tmp_path / "inline.onnx", external_data=False, model_dir=source.parent)
    assert inline == [tmp_path / "inline.onnx"]
    for path in (moved[0], inline[0]):
        check_written(path)
        for before, after in zip(reference, run(path, feeds)):
            np.testing.assert_array_equal(before, after)
    # The loaded model still reads its weights from the source folder.
    weights = by_name(find_weights(loaded, source.parent))
    assert weights["W_main"].location == "external"
    np.testing.assert_array_equal(weights["W_main"].array(), by_name(find_weights(model, None))["W_main"].array())


def test_overwriting_the_source_model_in_place(tmp_path):
    model, feeds = locations_model()
    folder = tmp_path / "m"
    paths = save_model(model, folder / "m.onnx", external_data=True)
    loaded = load_model(paths[0])
    weights = by_name(find_weights(loaded, folder))
    doubled = weights["W_loop"].array() * 2
    replace_weight(loaded, weights["W_loop"], doubled)
    save_model(loaded, folder / "m.onnx", external_data=True, model_dir=folder)
    check_written(folder / "m.onnx")
    expected_model = onnx.ModelProto.FromString(model.SerializeToString())
    replace_weight(expected_model, by_name(find_weights(expected_model, None))["W_loop"], doubled)
    for before, after in zip(run(expected_model, feeds), run(folder / "m.onnx", feeds)):
        np.testing.assert_array_equal(before, after)
    # The in-memory model now points into the rewritten data file, and reads the right values.
    for weight in find_weights(loaded, folder):
        np.testing.assert_array_equal(weight.array(), by_name(find_weights(expected_model, None))[weight.name].array())


def test_a_failed_write_leaves_the_previous_files_untouched(tmp_path):
    model, _ = locations_model()
    folder = tmp_path / "out"
    save_model(model, folder / "m.onnx", external_data=True)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    loaded = load_model(folder / "m.onnx")
    # The last initializer of the Loop body turns hostile after loading: the write fails midway, after
    # earlier tensors went into the temporary data file.
    body = find_graph(loaded, "loop/body")
    entry = next(e for e in body.initializer[0].external_data if e.key == "location")
    entry.value = "../escape.bin"
    for external_data in (True, False):
        with pytest.raises(InputError, match="escape"):
            save_model(loaded, folder / "m.onnx", external_data=external_data, model_dir=folder)
        assert {p.name: p.read_bytes() for p in folder.iterdir()} == before, "no partial or temporary files"


def test_a_model_over_2_gib_without_external_data_is_refused(tmp_path):
    # A sparse file: 2 GiB of zeros that take no disk space.
    size = 2**31
    with open(tmp_path / "w.bin", "wb") as handle:
        handle.truncate(size)
    path = external_model(tmp_path, "w.bin", rows=size // 64)
    model = load_model(path)
    with pytest.raises(InputError, match="2 GiB"):
        save_model(model, tmp_path / "inline.onnx", external_data=False, model_dir=tmp_path)
    assert not (tmp_path / "inline.onnx").exists()


def test_a_model_over_2_gib_streams_through_flat_memory(tmp_path):
    """save_model chooses external data by itself past 2 GiB and copies the data in chunks: measured peak
    memory of the writing process stays far below the model's size. (Writes 2.1 GB: 5 to 14 s here.)"""
    size = 2**31 + 2**26
    free = os.statvfs(tmp_path)
    if free.f_bavail * free.f_frsize < 3 * size:
        pytest.skip("needs 6.6 GB of free disk")
    script = textwrap.dedent(f"""
        import resource, sys
        from pathlib import Path
        import onnx
        from onnx import TensorProto, helper
        from pyqshare.model import load_model, save_model
        folder = Path(sys.argv[1])
        with open(folder / "w.bin", "wb") as handle:
            handle.truncate({size})  # sparse: 2.1 GB of zeros that take no disk space
        weight = onnx.TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[{size // 4}, 1],
                                  data_location=TensorProto.EXTERNAL)
        for key, value in (("location", "w.bin"), ("offset", "0"), ("length", "{size}")):
            weight.external_data.add(key=key, value=value)
        graph = helper.make_graph([helper.make_node("ReduceSum", ["w"], ["y"], keepdims=0)], "big", [],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])], [weight])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
        onnx.save(model, folder / "m.onnx")
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        model = load_model(folder / "m.onnx")
        paths = save_model(model, folder / "out" / "big.onnx", model_dir=folder)
        print(len(paths), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
    """)
    result = subprocess.run(
        [sys.executable, "-P", "-c", script, str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
    )
    files, growth_kib = map(int, result.stdout.split())
    assert files == 2, "past 2 GiB the model goes to external data without being asked"
    assert growth_kib < 256 * 1024, f"peak memory grew by {growth_kib} KiB while writing a {size}-byte model"
    data = tmp_path / "out" / "big.onnx.data"
    assert data.stat().st_size == size and (tmp_path / "out" / "big.onnx").stat().st_size < 1024
    (weight,) = find_weights(load_model(tmp_path / "out" / "big.onnx"), tmp_path / "out")
    assert weight.nbytes == size and backed_by_mmap(weight.array()) and weight.array()[-1, 0] == 0
    data.unlink()


@pytest.mark.parametrize(
    "opset, ir_in, ir_out", [(21, 14, 10), (21, 8, 10), (17, 8, 8), (17, 3, 8), (17, 9, 9), (23, 14, 11)]
)
def test_ir_version_is_what_onnxruntime_reads(opset, ir_in, ir_out):
    model = make_model(
        [helper.make_node("Relu", ["x"], ["y"])], [value("x", [2])], [value("y", [2])], opset=opset, ir_version=ir_in
    )
    assert supported_ir_version(model) == ir_out


# ----------------------------------------------------------------------------------------------- opset


def test_opset_is_raised_by_the_import_when_every_op_keeps_its_meaning(tmp_path):
    model, feeds = locations_model()
    model.opset_import[0].version = 17
    reference = run(model, feeds)
    nodes_before = [node.SerializeToString() for node in model.graph.node]
    assert ensure_opset(model) == "import"
    assert default_opset(model) == 21 and [node.SerializeToString() for node in model.graph.node] == nodes_before
    (path,) = save_model(model, tmp_path / "m.onnx")
    check_written(path)
    for before, after in zip(reference, run(path, feeds)):
        np.testing.assert_array_equal(before, after)
    assert ensure_opset(model) == "kept"


@pytest.mark.parametrize(
    "opset, node",
    [
        (13, helper.make_node("ReduceMean", ["x"], ["y"], axes=[1], keepdims=1)),  # axes became an input in 18
        (11, helper.make_node("Softmax", ["x"], ["y"], axis=1)),  # 13 changed what axis means
    ],
)
def test_opset_changes_that_alter_nodes_go_through_the_converter(tmp_path, opset, node):
    x = rand(2, 3, 4)
    shape = [2, 1, 4] if node.op_type == "ReduceMean" else [2, 3, 4]
    model = make_model([node], [value("x", [2, 3, 4])], [value("y", shape)], opset=opset, ir_version=7)
    reference = run(model, {"x": x})[0]
    assert ensure_opset(model) == "converter" and default_opset(model) == 21
    (path,) = save_model(model, tmp_path / "m.onnx")
    check_written(path)
    np.testing.assert_allclose(run(path, {"x": x})[0], reference, rtol=1e-6)


# ----------------------------------------------------------------------------------------------- QDQ


def dequantized(codes, scale, zero_point, axis, block_size) -> np.ndarray:
    """numpy's DequantizeLinear: (codes - zero_point) * scale, scales broadcast per tensor, axis or block."""
    codes, scale, zero_point = (np.asarray(a, np.float64) for a in (codes, scale, zero_point))
    if axis is None:
        return (codes - zero_point) * scale
    if block_size is None:
        shape = [-1 if a == axis else 1 for a in range(codes.ndim)]
        return (codes - zero_point.reshape(shape)) * scale.reshape(shape)
    length = codes.shape[axis]
    expand = lambda a: np.repeat(a, block_size, axis=axis).take(np.arange(length), axis=axis)  # noqa: E731
    return (codes - expand(zero_point)) * expand(scale)


def random_codes(shape, elem_type, axis, block_size):
    low, high = CODE_RANGES[elem_type]
    codes = RNG.integers(low, high + 1, shape)
    if axis is None:
        scale_shape = ()
    elif block_size is None:
        scale_shape = (shape[axis],)
    else:
        scale_shape = tuple(-(-n // block_size) if a == axis else n for a, n in enumerate(shape))
    scale = (RNG.uniform(0.5, 2.0, scale_shape) * 4.0 / (high - low)).astype(np.float32)
    zero_point = RNG.integers(low, high + 1, scale_shape)
    return codes, scale, zero_point


GRANULARITIES = {"per_tensor": (None, None), "per_axis": (1, None), "blocked": (0, 4)}


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("elem_type", CODE_TYPES, ids=TensorProto.DataType.Name)
def test_quantized_weights_compute_what_numpy_dequantizes(tmp_path, elem_type, granularity):
    axis, block_size = GRANULARITIES[granularity]
    shape = (15, 33)  # odd sizes: a partial last block and an odd number of packed int4 values
    model = make_model(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")],
        [value("x", [3, 15])],
        [value("y", [3, 33])],
        [init("W", rand(*shape))],
        opset=17,
        ir_version=8,
    )
    (weight,) = find_weights(model, None)
    codes, scale, zero_point = random_codes(shape, elem_type, axis, block_size)
    stored = quantize_weight_in_place(
        model, weight, codes, scale, zero_point, elem_type, axis=axis, block_size=block_size
    )
    assert default_opset(model) == 21
    (path,) = save_model(model, tmp_path / "q.onnx")
    check_written(path)
    written = {t.name: t for t in onnx.load(path).graph.initializer}
    assert written[stored].data_type == elem_type
    if elem_type in (TensorProto.INT4, TensorProto.UINT4):
        assert len(written[stored].raw_data) == (codes.size + 1) // 2, "two 4-bit codes per byte"
    assert not find_weights(onnx.load(path), None), "no float weight is left, and scales are not weights"
    x = rand(3, 15)
    expected = x.astype(np.float64) @ dequantized(codes, scale, zero_point, axis, block_size)
    np.testing.assert_allclose(run(path, {"x": x})[0], expected, rtol=1e-5, atol=1e-5)


def test_onnxruntime_cpu_approximates_int8_weight_matmuls_unless_told_not_to():
    """A measured fact the evaluation code must know: by default onnxruntime (1.31) runs int8-weight QDQ
    MatMuls as MatMulNBits with int8 activations, so CPU outputs are not the QDQ model's exact meaning."""
    model = make_model(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        [value("x", [4, 64])],
        [value("y", [4, 32])],
        [init("W", rand(64, 32))],
    )
    (weight,) = find_weights(model, None)
    codes, scale, zero_point = random_codes(weight.shape, TensorProto.INT8, 1, None)
    quantize_weight_in_place(model, weight, codes, scale, zero_point, TensorProto.INT8, axis=1)
    x = rand(4, 64)
    expected = x.astype(np.float64) @ dequantized(codes, scale, zero_point, 1, None)
    exact = np.abs(run(model, {"x": x})[0] - expected).max()
    default = np.abs(run(model, {"x": x}, config=None)[0] - expected).max()
    assert exact < 1e-4 < default


def test_weights_are_quantized_in_every_location(tmp_path):
    """Initializer, external data, Constant node, If/Loop/Scan bodies: each weight behind its own
    DequantizeLinear, and onnxruntime computes the same as the float model with numpy's dequantized values."""
    model, feeds = locations_model()
    path = save_with_external(model, tmp_path / "src")
    loaded = load_model(path)
    reference = onnx.ModelProto.FromString(model.SerializeToString())
    for index, weight in enumerate(find_weights(loaded, path.parent)):
        if weight.role not in ("matmul", "other"):
            continue
        elem_type = CODE_TYPES[index % len(CODE_TYPES)]
        axis, block_size = list(GRANULARITIES.values())[index % 3] if weight.shape == (16, 16) else (None, None)
        codes, scale, zero_point = random_codes(weight.shape, elem_type, axis, block_size)
        quantize_weight_in_place(loaded, weight, codes, scale, zero_point, elem_type, axis=axis, block_size=block_size)
        values = dequantized(codes, scale, zero_point, axis, block_size)
        replace_weight(reference, by_name(find_weights(reference, None))[weight.name], values)
    assert find_weights(loaded, path.parent) == []
    constants = [
        node.output[0] for _, graph in iter_graphs(loaded) for node in graph.node if node.op_type == "Constant"
    ]
    assert not [name for name in constants if name.startswith(("W_", "b_"))], "Constant weights became DequantizeLinear"
    paths = save_model(loaded, tmp_path / "q" / "q.onnx", external_data=True, model_dir=path.parent)
    check_written(paths[0])
    for cond in (True, False):
        feeds["cond"] = np.array(cond)
        for expected, got in zip(run(reference, feeds), run(paths[0], feeds)):
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def fake_quantized(x: np.ndarray, scale: float, zero_point: int, elem_type: int) -> np.ndarray:
    low, high = CODE_RANGES[elem_type]
    codes = np.clip(np.rint(x / np.float32(scale)) + zero_point, low, high)
    return ((codes - zero_point) * np.float32(scale)).astype(np.float32)


@pytest.mark.parametrize(
    "elem_type",
    [TensorProto.UINT8, TensorProto.INT8, TensorProto.UINT16, TensorProto.INT16],
    ids=TensorProto.DataType.Name,
)
def test_activation_qdq_on_inputs_intermediates_and_outputs(tmp_path, elem_type):
    w = rand(16, 8)
    model = make_model(
        [
            helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
            helper.make_node("Relu", ["h"], ["y"], name="relu"),
            helper.make_node("Sigmoid", ["h"], ["h_out"], name="sig"),
        ],
        [value("x", [4, 16])],
        [value("y", [4, 8]), value("h_out", [4, 8])],
        [init("W", w)],
    )
    low, high = CODE_RANGES[elem_type]
    params = {
        name: (float(RNG.uniform(6, 10)) / (high - low), int(RNG.integers(low, high + 1) // 4 + (high + low) // 2))
        for name in ("x", "h", "y")
    }
    assert insert_activation_qdq(model, "x", *params["x"], elem_type) == "x_dequantized"
    assert insert_activation_qdq(model, "h", *params["h"], elem_type) == "h"
    assert insert_activation_qdq(model, "y", *params["y"], elem_type) == "y"
    assert [o.name for o in model.graph.output] == ["y", "h_out"] and [i.name for i in model.graph.input] == ["x"]
    producers = {out: node.op_type for node in model.graph.node for out in node.output}
    assert producers["y"] == producers["h"] == "DequantizeLinear"
    (path,) = save_model(model, tmp_path / "q.onnx")
    check_written(path)
    x = rand(4, 16) * 2
    h = fake_quantized(fake_quantized(x, *params["x"], elem_type) @ w, *params["h"], elem_type)
    y, h_out = run(path, {"x": x})
    np.testing.assert_allclose(y, fake_quantized(np.maximum(h, 0), *params["y"], elem_type), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(h_out, 1 / (1 + np.exp(-h)), rtol=1e-5, atol=1e-6)


def test_activation_qdq_inside_a_subgraph(tmp_path):
    model, feeds = locations_model()
    expected = run(model, feeds)[1]
    then_graph = "branch/then_branch"
    assert insert_activation_qdq(model, "t", 0.05, 0, TensorProto.INT16, graph=then_graph) == "t"
    assert insert_activation_qdq(model, "h_in", 0.05, 0, TensorProto.INT16, graph="loop/body") == "h_in_dequantized"
    with pytest.raises(ValueError, match="neither"):
        insert_activation_qdq(model, "t", 0.05, 0, TensorProto.INT16)  # not in the main graph
    (path,) = save_model(model, tmp_path / "q.onnx")
    check_written(path)
    np.testing.assert_allclose(run(path, feeds)[1], fake_quantized(expected, 0.05, 0, TensorProto.INT16), atol=1e-6)


def bias_models():
    conv = make_model(
        [helper.make_node("Conv", ["x", "W", "B"], ["y"], pads=[1, 1, 1, 1])],
        [value("x", [1, 4, 6, 6])],
        [value("y", [1, 8, 6, 6])],
        [init("W", rand(8, 4, 3, 3)), init("B", rand(8))],
    )
    gemm = make_model(
        [helper.make_node("Gemm", ["x", "W", "B"], ["y"], transB=1)],
        [value("x", [2, 16])],
        [value("y", [2, 8])],
        [init("W", rand(8, 16)), init("B", rand(8))],
    )
    linear = linear_model()[0]
    return [
        ("conv", conv, {"x": rand(1, 4, 6, 6)}, True),
        ("gemm", gemm, {"x": rand(2, 16)}, False),
        ("matmul_add", linear, {"x": rand(2, 16)}, True),
    ]


@pytest.mark.parametrize("case", bias_models(), ids=lambda case: case[0])
def test_int32_bias_with_input_times_weight_scale(tmp_path, case):
    _, model, feeds, per_channel = case
    reference = onnx.ModelProto.FromString(model.SerializeToString())
    weights = by_name(find_weights(model, None, min_elements=1))
    biases = [w for w in weights.values() if w.role == "bias"]
    input_scale = 0.02
    for bias in biases:
        weight = weights[bias.bias_of]
        values = weight.array()
        axis = weight.channel_axis if per_channel else None
        reduce = tuple(a for a in range(values.ndim) if a != axis) if per_channel else None
        scale = (np.abs(values).max(axis=reduce) / 127).astype(np.float32)
        shaped = scale.reshape([-1 if a == axis else 1 for a in range(values.ndim)]) if per_channel else scale
        codes = np.clip(np.rint(values / shaped), -127, 127).astype(np.int8)
        quantize_weight_in_place(model, weight, codes, scale, 0, TensorProto.INT8, axis=axis)
        bias_scale = quantize_bias_in_place(model, bias, input_scale, scale)
        np.testing.assert_allclose(bias_scale, input_scale * scale, rtol=1e-6)
        bias_codes = np.rint(bias.array() / bias_scale)
        stored = next(t for t in model.graph.initializer if t.name == f"{bias.name}_quantized")
        assert stored.data_type == TensorProto.INT32
        np.testing.assert_array_equal(numpy_helper.to_array(stored), bias_codes)
        ref_weights = by_name(find_weights(reference, None, min_elements=1))
        replace_weight(reference, ref_weights[weight.name], dequantized(codes, scale, np.zeros_like(scale), axis, None))
        replace_weight(reference, ref_weights[bias.name], bias_codes * bias_scale)
    (path,) = save_model(model, tmp_path / "q.onnx")
    check_written(path)
    for expected, got in zip(run(reference, feeds), run(path, feeds)):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_bad_quantization_requests_are_refused():
    model, _, _ = linear_model()
    weight = by_name(find_weights(model, None))["W1"]
    codes = np.zeros(weight.shape, np.int64)
    with pytest.raises(ValueError, match="outside INT4"):
        quantize_weight_in_place(model, weight, codes + 8, 0.1, 0, TensorProto.INT4)
    with pytest.raises(ValueError, match="scales of shape"):
        quantize_weight_in_place(model, weight, codes, np.ones(3), 0, TensorProto.INT8, axis=1)
    with pytest.raises(ValueError, match="integers"):
        quantize_weight_in_place(model, weight, codes.astype(np.float32), 0.1, 0, TensorProto.INT8)
    with pytest.raises(ValueError, match="not 'bias'"):
        quantize_bias_in_place(model, weight, 0.1, 0.1)
    quantize_weight_in_place(model, weight, codes, 0.1, 0, TensorProto.INT8)
    with pytest.raises(ValueError, match="no longer stored"):
        quantize_weight_in_place(model, weight, codes, 0.1, 0, TensorProto.INT8)


def test_every_public_function_documents_its_arguments():
    import pyqshare.model

    for name in pyqshare.model.__all__:
        function = getattr(pyqshare.model, name)
        if inspect.isfunction(function):
            doc = inspect.getdoc(function) or ""
            missing = [p for p in inspect.signature(function).parameters if not re.search(rf"\b{p}\b", doc)]
            assert not missing, f"{name} docstring does not describe {missing}"


# ----------------------------------------------------------------------------------------------- MiniLM


def test_minilm_weights_roles_and_axes(minilm_onnx):
    model = load_model(minilm_onnx)
    weights = find_weights(model, Path(minilm_onnx).parent)
    stored = {t.name for t in model.graph.initializer}
    linear = {node.input[1] for node in model.graph.node if node.op_type == "MatMul" and node.input[1] in stored}
    assert len(linear) == 36  # 6 layers x (query, key, value, attention output, intermediate, output)
    matmuls = {w.name: w for w in weights if w.role == "matmul"}
    assert set(matmuls) == linear
    assert all(w.channel_axis == 1 and w.reduction_axis == 0 for w in matmuls.values())
    assert sorted({w.shape for w in matmuls.values()}) == [(384, 384), (384, 1536), (1536, 384)]
    embeddings = {w.name: w for w in weights if w.role == "embedding"}
    assert embeddings["encoder.embeddings.word_embeddings.weight"].shape == (30522, 384)
    biases = [w for w in weights if w.role == "bias"]
    assert len(biases) == 36 and {w.bias_of for w in biases} == linear
    assert all(w.role == "norm" for w in weights if "LayerNorm" in w.name)
    assert sum(w.nbytes for w in matmuls.values()) == 6 * (4 * 384 * 384 + 2 * 384 * 1536) * 4


def test_minilm_opset_17_to_21_by_the_import(tmp_path, minilm_onnx):
    model = load_model(minilm_onnx)
    assert default_opset(model) == 17
    feeds = {
        "input_ids": RNG.integers(1000, 2000, (1, 16)).astype(np.int64),
        "attention_mask": np.ones((1, 16), np.int64),
        "token_type_ids": np.zeros((1, 16), np.int64),
    }
    reference = run(Path(minilm_onnx), feeds)
    assert ensure_opset(model) == "import"
    (path,) = save_model(model, tmp_path / "m21.onnx")
    check_written(path)
    for before, after in zip(reference, run(path, feeds)):
        np.testing.assert_array_equal(before, after)
