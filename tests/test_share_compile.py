"""Real QNN compilation of model families: weight-shared context binaries, their inspection through
libQnnSystem, the lint, and ``pyqshare share compile`` end to end (onnxruntime-qnn's HTP backend, no mocks).

The families are small hand-built QDQ models (x -> MatMul chain -> y, int8 weights, uint8 activations) whose
shared weights are large enough (256 KiB to 1 MiB) that the HTP's page per pooled tensor stays under 1% of
the shared bytes; each compile group takes about a second.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from pyqshare.errors import InputError
from pyqshare.qnn.compile import MAX_GRAPHS, compile_context, compile_family
from pyqshare.qnn.context_binary import (
    HEADER_BYTES,
    MALFORMED_BINARY,
    graph_names_from_records,
    inspect_context_binary,
    parse_graph_blob,
)
from pyqshare.qnn.lint import lint_qdq_model
from pyqshare.qnn.placement import placement_report
from pyqshare.share.compile import POOL_PAGE_BYTES, predict_shared_bytes_from_qdq

MIB = 1 << 20


def _codes(seed: int, shape: tuple[int, ...], dtype=np.int8, high: int = 127) -> np.ndarray:
    return np.random.default_rng(seed).integers(-high, high + 1, shape).astype(dtype)


def _qdq_chain(path: Path, weights: list[tuple], width: int, *, tail: str | None = None) -> Path:
    """x [1, width] -> Q/DQ -> (MatMul with DQ(weight) -> Q/DQ)* -> y. ``weights``: ``(name, codes, scale,
    zero_point=0, axis=None, block_size=None)``; ``tail`` appends a float op after the last DQ."""
    inits = [numpy_helper.from_array(np.array(0.01, np.float32), "in_scale"),
             numpy_helper.from_array(np.array(0, np.uint8), "in_zero")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "in_scale", "in_zero"], ["x_q"]),
             helper.make_node("DequantizeLinear", ["x_q", "in_scale", "in_zero"], ["h0"])]
    current = "h0"
    for index, (name, codes, scale, *rest) in enumerate(weights):
        zero_point, axis, block_size = (list(rest) + [0, None, None])[:3]
        scale = np.asarray(scale, np.float32)
        inits += [numpy_helper.from_array(codes, name), numpy_helper.from_array(scale, f"{name}_scale"),
                  numpy_helper.from_array(np.full(scale.shape, zero_point).astype(codes.dtype), f"{name}_zero")]
        attributes = {key: value for key, value in (("axis", axis), ("block_size", block_size)) if value is not None}
        nodes.append(helper.make_node("DequantizeLinear", [name, f"{name}_scale", f"{name}_zero"], [f"{name}_dq"],
                                      **attributes))
        nodes.append(helper.make_node("MatMul", [current, f"{name}_dq"], [f"mm{index}"]))
        inits += [numpy_helper.from_array(np.array(0.05, np.float32), f"act{index}_scale"),
                  numpy_helper.from_array(np.array(128, np.uint8), f"act{index}_zero")]
        out = "y" if index == len(weights) - 1 and tail is None else f"h{index + 1}"
        activation = [f"act{index}_scale", f"act{index}_zero"]
        nodes.append(helper.make_node("QuantizeLinear", [f"mm{index}", *activation], [f"q{index}"]))
        nodes.append(helper.make_node("DequantizeLinear", [f"q{index}", *activation], [out]))
        current = out
    if tail is not None:
        nodes.append(helper.make_node(tail, [current], ["y"]))
    for index, node in enumerate(nodes):
        node.name = f"node{index}_{node.op_type}"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, width])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, width])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10), path)
    return path


def _family(folder: Path, members: list[list[tuple]], width: int, **kwargs) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return [_qdq_chain(folder / f"m{index}.onnx", weights, width, **kwargs) for index, weights in enumerate(members)]


def _within_one_percent(predicted: int, measured: int) -> bool:
    return abs(measured - predicted) <= 0.01 * measured


# -------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def notes_family(tmp_path_factory, run_cli, require_qnn):
    """QNN_NOTES' family: 3 models sharing a 1 MiB int8 weight, each with a private 1 MiB one, compiled by
    ``pyqshare share compile --json``."""
    root = tmp_path_factory.mktemp("notes")
    shared = _codes(1, (1024, 1024))
    models = _family(root / "models", [[("shared", shared, 0.001), ("private", _codes(10 + i, (1024, 1024)), 0.001)]
                                       for i in range(3)], 1024)
    done = run_cli("share", "compile", *models, "--output-dir", root / "out", "--json")
    assert done.returncode == 0, done.stderr
    return models, root / "out", json.loads(done.stdout)


def test_exact_copies_share_one_pool(notes_family):
    models, out, report = notes_family
    assert report["graphs"] == 3
    assert report["predicted_shared_bytes"] == MIB
    assert _within_one_percent(report["predicted_shared_bytes"], report["measured_shared_bytes"])
    assert report["measured_shared_bytes"] == report["predicted_shared_pool_bytes"]
    # QNN_NOTES measured 2,170,880 B solo and 4,362,240 B shared on a similar family: the shared context
    # saves the two extra copies of the shared MiB, give or take a few pages.
    solo = list(report["solo_bytes"].values())
    assert len(set(solo)) == 1 and 2 * MIB < solo[0] < 2 * MIB + 128 * 1024
    saved = sum(solo) - report["combined_bytes"]
    assert abs(saved - 2 * MIB) < 64 * 1024, saved
    assert report["shared_groups"] == [{"bytes": MIB, "dtype": "int8", "shape": [1024, 1024],
                                        "members": [{"model": i, "tensor": "shared_dq"} for i in range(3)]}]


def test_compile_report_placement_fidelity_and_graph_names(notes_family):
    models, out, report = notes_family
    for model in map(str, models):
        assert report["placement"][model]["cpu_nodes"] == 0
        assert report["placement"][model]["partitions"] == 1
        fidelity = report["fidelity"][model]
        assert fidelity["min_sqnr_db"] > 30, fidelity  # HTP simulator against the CPU provider
    assert report["lint"] == []
    binary = Path(report["binary"])
    assert binary.parent == out / "shared" and binary.is_file()
    info = inspect_context_binary(binary)
    expected = [name for model in map(str, models) for name in report["graph_names"][model]]
    assert info.graph_names == expected  # compile order
    assert graph_names_from_records(binary) == expected  # the pure-Python cross-check agrees
    for graph in info.graphs:
        assert [(t.name, t.data_type, t.shape) for t in graph.inputs] == [("x", "float32", (1, 1024))]
        assert [(t.name, t.data_type, t.shape) for t in graph.outputs] == [("y", "float32", (1, 1024))]
        assert graph.memory.shared_weights_bytes == report["measured_shared_bytes"]
        assert MIB <= graph.memory.const_bytes < MIB + 4 * POOL_PAGE_BYTES  # the private weight only
    assert sorted(p.name for p in (out / "solo").iterdir()) == ["m0", "m1", "m2"]
    assert not [p for p in out.rglob(".pyqshare-compile-*")]  # staging folders are gone


# ------------------------------------------------------------------------------------- sharing families


def test_renamed_copies_with_other_scales_share(tmp_path, require_qnn):
    """Names and scales do not matter, only the quantized bytes."""
    shared = _codes(1, (512, 1024))
    models = _family(tmp_path, [[(f"w_model{i}", shared, 0.001 * (i + 1)), (f"p{i}", _codes(20 + i, (1024, 512)), 0.002)]
                                for i in range(2)], 512)
    prediction = predict_shared_bytes_from_qdq(models)
    assert prediction.shared_bytes == 512 * 1024
    assert [member["tensor"] for member in prediction.groups[0]["members"]] == ["w_model0_dq", "w_model1_dq"]
    family = compile_family(models, tmp_path / "out")
    assert len(family.shared.info.graphs) == 2
    assert _within_one_percent(prediction.shared_bytes, family.shared_weights_bytes)
    assert family.shared_weights_bytes == prediction.pool_bytes
    assert sum(family.solo_bytes) - family.combined_bytes > 0.9 * prediction.shared_bytes


def test_per_channel_versus_per_tensor_is_not_shared(tmp_path, require_qnn):
    """The same float weight quantized per channel and per tensor gives other bytes: nothing is shared."""
    weight = np.random.default_rng(3).standard_normal((512, 512)).astype(np.float32) * np.linspace(0.2, 2, 512)
    per_tensor_scale = np.abs(weight).max() / 127
    per_channel_scale = np.abs(weight).max(axis=0) / 127
    per_tensor = np.round(weight / per_tensor_scale).astype(np.int8)
    per_channel = np.round(weight / per_channel_scale).astype(np.int8)
    models = _family(tmp_path, [[("w", per_tensor, per_tensor_scale)],
                                [("w", per_channel, per_channel_scale, 0, 1)]], 512)
    prediction = predict_shared_bytes_from_qdq(models)
    assert prediction.shared_bytes == 0 and prediction.groups == []
    family = compile_family(models, tmp_path / "out")
    assert family.shared_weights_bytes == POOL_PAGE_BYTES == prediction.pool_bytes  # an empty pool: one page
    assert family.combined_bytes >= 0.95 * sum(family.solo_bytes)


def test_inspection_of_several_inputs_and_outputs(tmp_path, require_qnn):
    """A graph with two inputs and two outputs checks the Qnn_Tensor_t array stride (144 bytes)."""
    width = 256
    nodes = [helper.make_node("Add", ["left", "right"], ["sum"], name="add"),
             helper.make_node("Mul", ["left", "right"], ["product"], name="mul")]
    graph = helper.make_graph(nodes, "two", [helper.make_tensor_value_info("left", TensorProto.FLOAT, [1, width]),
                                             helper.make_tensor_value_info("right", TensorProto.FLOAT, [1, width])],
                              [helper.make_tensor_value_info("sum", TensorProto.FLOAT, [1, width]),
                               helper.make_tensor_value_info("product", TensorProto.FLOAT, [1, width])])
    model = tmp_path / "two.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10), model)
    context = compile_context([model], tmp_path / "out")
    (graph_info,) = context.info.graphs
    assert [(t.name, t.shape) for t in graph_info.inputs] == [("left", (1, width)), ("right", (1, width))]
    assert [(t.name, t.shape) for t in graph_info.outputs] == [("sum", (1, width)), ("product", (1, width))]
    assert graph_info.memory.shared_weights_bytes == 0 and graph_info.memory.io_tensor_bytes > 0
    assert context.info.build_id.startswith("v2.")


def test_graph_blob_records():
    """Record 1 (V1, 40 B) then record 2 (V2, 72 B), as QAIRT 2.51 writes them; unknown versions give None."""
    v1 = struct.pack("<I4xQIIB7xQ", 1, 4096, 0, 0, 0, 0)
    fields = [256, 64, 0, 16384, 6400, 2109440, 0, 1052672]
    v2 = struct.pack("<I4xQQI4xQQQQQ", 2, *fields)
    memory = parse_graph_blob(v1 + v2)
    assert (memory.const_bytes, memory.shared_weights_bytes, memory.op_data_bytes, memory.io_tensor_bytes,
            memory.spill_fill_bytes) == (2109440, 1052672, 6400, 16384, 4096)
    assert parse_graph_blob(v1) is None
    assert parse_graph_blob((7).to_bytes(4, "little") + bytes(36)) is None


# ------------------------------------------------------------------------------------------------- limits


def test_more_than_64_graphs_refused_before_compiling(tmp_path):
    models = [tmp_path / f"m{i}.onnx" for i in range(MAX_GRAPHS + 1)]
    with pytest.raises(InputError, match="at most 64"):
        compile_context(models, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_require_full_offload_fails_on_a_cpu_node(tmp_path, run_cli, require_qnn):
    models = _family(tmp_path / "models", [[("w", _codes(1, (256, 256)), 0.001)]] * 2, 256, tail="Sinh")
    placement = placement_report(models[0])
    lint = lint_qdq_model(models[0], placement)
    assert [(finding.rule, finding.severity) for finding in lint] == [("cpu-fallback", "warning")]
    assert "Sinh" in lint[0].message
    done = run_cli("share", "compile", *models, "--output-dir", tmp_path / "out", "--require-full-offload", "--json")
    assert done.returncode == 1
    assert "--require-full-offload" in done.stderr and "Sinh" in done.stderr and done.stdout == ""
    assert not (tmp_path / "out" / "shared").exists()


def test_dry_run_prints_the_commands_and_writes_nothing(tmp_path, run_cli):
    models = _family(tmp_path / "models", [[("w", _codes(1, (256, 256)), 0.001)]] * 2, 256)
    env_sdk = os.environ.get("QNN_SDK_ROOT")
    done = run_cli("share", "compile", *models, "--output-dir", tmp_path / "out", "--dry-run", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["dry_run"] is True and report["predicted_shared_bytes"] == 256 * 256
    assert not (tmp_path / "out").exists()
    if env_sdk:
        assert any("qnn-context-binary-generator" in command for command in report["commands"])
    else:
        compiles = [step for step in report["steps"] if step["step"] == "compile"]
        assert [Path(step["output_dir"]).name for step in compiles] == ["shared", "m0", "m1"]
        assert all(step["argv"][:3] == [step["argv"][0], "-P", "-c"] for step in compiles)


def test_the_sdk_route_plans_config_commands_and_names_a_missing_tool(tmp_path, monkeypatch):
    """With QNN_SDK_ROOT set the SDK tools are the backend: the dry run lists the host commands that
    ``pyqshare config`` writes, and a real run refuses an SDK folder without the tools, before writing anything."""
    from pyqshare.share.compile import share_compile

    models = _family(tmp_path / "models", [[("w", _codes(1, (256, 256)), 0.001)]] * 2, 256)
    monkeypatch.setenv("QNN_SDK_ROOT", str(tmp_path / "sdk"))
    plan = share_compile(models, tmp_path / "out", require_full_offload=False, dry_run=True)
    assert plan["backend"] == "qnn-sdk" and plan["dry_run"] is True
    generator = next(command for command in plan["commands"] if "qnn-context-binary-generator" in command)
    assert "build/libs/x86_64-linux-clang/libm0.so,build/libs/x86_64-linux-clang/libm1.so" in generator
    with pytest.raises(InputError, match="qnn-onnx-converter"):
        share_compile(models, tmp_path / "out", require_full_offload=False, dry_run=False)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------------ lint


def test_lint_flags_asymmetric_int4_and_blockwise_with_8bit_activations(tmp_path):
    int4 = _codes(1, (64, 64), ml_dtypes.int4, high=7)
    asymmetric = _qdq_chain(tmp_path / "asym.onnx", [("w", int4, 0.01, 3)], 64)
    symmetric = _qdq_chain(tmp_path / "sym.onnx", [("w", int4, 0.01, 0)], 64)
    blockwise = _qdq_chain(tmp_path / "block.onnx", [("w", int4, np.full((2, 64), 0.01), 0, 0, 32)], 64)
    assert [(f.rule, f.severity) for f in lint_qdq_model(asymmetric)] == [("asymmetric-int4", "error")]
    assert lint_qdq_model(symmetric) == []
    assert [f.rule for f in lint_qdq_model(blockwise)] == ["blockwise-8bit-activations"]


def test_compile_refuses_what_the_htp_computes_wrongly_unless_allowed(tmp_path, run_cli, require_qnn):
    """Asymmetric int4 weights give wrong answers on the HTP (QNN_NOTES): a lint error stops the compile
    before anything is built; --allow-lint-errors compiles anyway and still reports the finding."""
    int4 = _codes(1, (64, 64), ml_dtypes.int4, high=7)
    models = [_qdq_chain(tmp_path / f"m{i}.onnx", [("w", int4, 0.01, 3)], 64) for i in range(2)]
    refused = run_cli("share", "compile", *models, "--output-dir", tmp_path / "out", "--json")
    assert refused.returncode == 2 and "asymmetric" in refused.stderr.lower() and refused.stdout == ""
    assert not (tmp_path / "out" / "shared").exists()
    done = run_cli("share", "compile", *models, "--output-dir", tmp_path / "out", "--allow-lint-errors", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert {finding["rule"] for finding in report["lint"]} == {"asymmetric-int4"} and report["graphs"] == 2


# --------------------------------------------------------------------------------------------------- hostile


def test_truncated_and_garbage_binaries_are_input_errors(notes_family, tmp_path):
    _, out, report = notes_family
    data = Path(report["binary"]).read_bytes()
    truncated = tmp_path / "truncated.bin"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=str(MALFORMED_BINARY)):
        inspect_context_binary(truncated)
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(np.random.default_rng(0).bytes(64 * 1024))
    with pytest.raises(InputError, match="malformed"):
        inspect_context_binary(garbage)
    with pytest.raises(InputError, match="no graph records"):
        graph_names_from_records(garbage)
    tiny = tmp_path / "tiny.bin"
    tiny.write_bytes(data[:HEADER_BYTES])
    with pytest.raises(InputError, match="too short"):
        inspect_context_binary(tiny)


def test_zero_byte_model_is_refused_and_nothing_is_written(tmp_path, run_cli):
    good = _qdq_chain(tmp_path / "good.onnx", [("w", _codes(1, (64, 64)), 0.01)], 64)
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    done = run_cli("share", "compile", good, empty, "--output-dir", tmp_path / "out", "--json")
    assert done.returncode == 2
    assert "empty.onnx" in done.stderr and done.stdout == ""
    assert not (tmp_path / "out").exists()


# -------------------------------------------------------------------------------------- pool storage rules


def _bias_first_model(path: Path, weight: np.ndarray, bias: np.ndarray, rows: int) -> Path:
    """x [1, rows, K] -> Q/DQ (uint16) -> MatMul(DQ(int8 per-channel weight)) -> Q/DQ -> Add(DQ(uint16 bias),
    that) -> Q/DQ -> y: the bias is the Add's first input, as PyTorch exports ``bias + x @ W``."""
    inits, nodes = [], []

    def quantized(tensor: str, scale: float, zero_point: int) -> str:
        names = [f"{tensor}_scale", f"{tensor}_zero"]
        inits.extend([numpy_helper.from_array(np.array(scale, np.float32), names[0]),
                      numpy_helper.from_array(np.array(zero_point, np.uint16), names[1])])
        nodes.extend([helper.make_node("QuantizeLinear", [tensor, *names], [f"{tensor}_q"]),
                      helper.make_node("DequantizeLinear", [f"{tensor}_q", *names], [f"{tensor}_dq"])])
        return f"{tensor}_dq"

    channels = weight.shape[1]
    inits += [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(np.full(channels, 0.01, np.float32), "w_scale"),
              numpy_helper.from_array(np.zeros(channels, np.int8), "w_zero"), numpy_helper.from_array(bias, "b"),
              numpy_helper.from_array(np.array(1e-4, np.float32), "b_scale"),
              numpy_helper.from_array(np.array(32768, np.uint16), "b_zero")]
    nodes += [helper.make_node("DequantizeLinear", ["w", "w_scale", "w_zero"], ["w_dq"], axis=1),
              helper.make_node("DequantizeLinear", ["b", "b_scale", "b_zero"], ["b_dq"])]
    nodes.append(helper.make_node("MatMul", [quantized("x", 0.001, 32768), "w_dq"], ["mm"]))
    nodes.append(helper.make_node("Add", ["b_dq", quantized("mm", 0.05, 32768)], ["sum"]))
    nodes.append(helper.make_node("Identity", [quantized("sum", 0.05, 32768)], ["y"]))
    for index, node in enumerate(nodes):
        node.name = f"node{index}_{node.op_type}"
    graph = helper.make_graph(nodes, "bias_first",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, rows, weight.shape[0]])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, rows, channels])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10), path)
    return path


def test_pool_packs_shared_tensors_in_pages(tmp_path, require_qnn):
    """Rule 1: shared tensors are packed, then rounded down to whole pages plus one; per-channel scales stay out
    of the pool. Four 9,216-byte weights (9 pages together, 2.25 each) fill 10 pages, not 4 x 3; one weight of
    30.25 pages fills 31."""
    width = 96
    members = [[(f"s{k}", _codes(k, (width, width)), np.full(width, 0.001), 0, 1) for k in range(4)]] * 2
    odd = 352  # 11 x 32 output channels: no tile padding; 352 * 352 B is 30.25 pages
    for folder, models, pages in ((tmp_path / "four", _family(tmp_path / "four", members, width), 10),
                                  (tmp_path / "odd", _family(tmp_path / "odd", [[("s", _codes(1, (odd, odd)), 0.001)]] * 2,
                                                                               odd), 31)):
        prediction = predict_shared_bytes_from_qdq(models)
        assert prediction.pool_bytes == pages * POOL_PAGE_BYTES and prediction.private_bytes == [0, 0]
        family = compile_family(models, folder / "out")
        assert family.shared_weights_bytes == prediction.pool_bytes
        assert prediction.pool_from_solo([solo.info.const_bytes for solo in family.solos]) == family.shared_weights_bytes


def test_pool_holds_the_broadcast_a_bias_first_add_materialises(tmp_path, require_qnn):
    """Rule 3: with 16-bit activations, ``Add(bias, x)`` (the constant first) makes the HTP store the bias
    broadcast over the rows, shared like any constant: the models alone do not show it, their solo binaries do."""
    rows, channels = 128, 1536
    weight, bias = _codes(1, (64, channels)), np.random.default_rng(2).integers(0, 1 << 16, channels).astype(np.uint16)
    models = [_bias_first_model(tmp_path / f"m{i}.onnx", weight, bias, rows) for i in range(2)]
    prediction = predict_shared_bytes_from_qdq(models)
    family = compile_family(models, tmp_path / "out")
    materialised = family.shared_weights_bytes - prediction.pool_bytes
    # the broadcast bias (rows x channels uint16) and a few pages of the Add's own (measured: 6)
    assert rows * channels * 2 <= materialised <= rows * channels * 2 + 8 * POOL_PAGE_BYTES, materialised
    from_solo = prediction.pool_from_solo([solo.info.const_bytes for solo in family.solos])
    assert _within_one_percent(from_solo, family.shared_weights_bytes)
