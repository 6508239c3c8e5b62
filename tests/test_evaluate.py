"""pyqshare evaluate: output metrics against numpy, real onnxruntime runs, the HTP simulator, the command line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from pyqshare.calibration import default_inputs, run_model, write_input_list
from pyqshare.errors import InputError
from pyqshare.evaluate import compare_outputs, evaluate, min_sqnr_db, sqnr_db, summarize_outputs


def classifier(path: Path, *, noise: float = 0.0, batch: int | str = 4, seed: int = 1) -> Path:
    """x[batch,16] -> MatMul -> Add -> logits[batch,10], plus an embedding-like output; weights perturbed by noise."""
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((16, 10)).astype(np.float32)
    bias = rng.standard_normal(10).astype(np.float32)
    perturb = np.random.default_rng(99)
    weight = weight + noise * perturb.standard_normal(weight.shape).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["mm"]),
             helper.make_node("Add", ["mm", "b"], ["logits"]),
             helper.make_node("Tanh", ["mm"], ["pooled_embedding"])]
    graph = helper.make_graph(
        nodes, "classifier", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 10]),
         helper.make_tensor_value_info("pooled_embedding", TensorProto.FLOAT, [batch, 10])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def pooled_sqnr(reference: list[np.ndarray], candidate: list[np.ndarray]) -> float:
    ref = np.concatenate([r.ravel() for r in reference]).astype(np.float64)
    cand = np.concatenate([c.ravel() for c in candidate]).astype(np.float64)
    return 10 * np.log10(np.sum(ref**2) / np.sum((ref - cand) ** 2))


def test_identical_models_have_infinite_sqnr_in_json_safe_form(tmp_path):
    model = classifier(tmp_path / "m.onnx")
    report = evaluate(model, model)
    assert report["inputs"] == "random:8" and report["samples"] == 8
    for entry in report["outputs"].values():
        assert entry["sqnr_db"] is None and entry["sqnr_db_nonfinite"] == "inf"
        assert entry["identical"] is True and entry["cosine"] == 1.0 and entry["max_abs_error"] == 0.0
    assert report["min_sqnr_db"] is None and report["min_sqnr_db_nonfinite"] == "inf"
    json.dumps(report, allow_nan=False)  # strict JSON: no Infinity or NaN anywhere


def evaluated_with_outputs(tmp_path: Path, noise: float) -> tuple[dict, list, list]:
    """evaluate() of a classifier against a copy with noisy weights, and both models' outputs on the
    evaluation samples, run separately."""
    reference = classifier(tmp_path / "ref.onnx")
    candidate = classifier(tmp_path / "cand.onnx", noise=noise)
    samples = default_inputs(onnx.load(reference), purpose="evaluation")
    return evaluate(reference, candidate), run_model(reference, samples), run_model(candidate, samples)


def test_perturbed_model_metrics_equal_numpy(tmp_path):
    report, ref_out, cand_out = evaluated_with_outputs(tmp_path, noise=0.05)
    for name in ("logits", "pooled_embedding"):
        ref = [out[name] for out in ref_out]
        cand = [out[name] for out in cand_out]
        entry = report["outputs"][name]
        assert entry["sqnr_db"] == pytest.approx(pooled_sqnr(ref, cand), rel=1e-12)
        assert entry["sqnr_db"] == pytest.approx(sqnr_db(ref, cand), rel=1e-12)
        flat_ref = np.concatenate([r.ravel() for r in ref]).astype(np.float64)
        flat_cand = np.concatenate([c.ravel() for c in cand]).astype(np.float64)
        cosine = flat_ref @ flat_cand / np.linalg.norm(flat_ref) / np.linalg.norm(flat_cand)
        assert entry["cosine"] == pytest.approx(cosine, rel=1e-12)
        assert entry["max_abs_error"] == float(np.abs(flat_ref - flat_cand).max())
        assert entry["identical"] is False
    assert report["min_sqnr_db"] == min(e["sqnr_db"] for e in report["outputs"].values())
    assert 10.0 < report["min_sqnr_db"] < 60.0


def test_top1_agreement_only_for_class_scores(tmp_path):
    rng = np.random.default_rng(0)
    reference = [{"logits": rng.standard_normal((4, 10)).astype(np.float32),
                  "sentence_embedding": rng.standard_normal((4, 10)).astype(np.float32),
                  "hidden": rng.standard_normal((4, 3, 10)).astype(np.float32)} for _ in range(3)]
    candidate = [{name: value.copy() for name, value in sample.items()} for sample in reference]
    # Make exactly 3 of the 12 rows pick another class: raise a non-arg-max entry above the maximum.
    for sample, row in [(candidate[0], 0), (candidate[1], 2), (candidate[2], 3)]:
        logits = sample["logits"][row]
        other = (int(logits.argmax()) + 1) % 10
        logits[other] = logits.max() + 1.0
    metrics = compare_outputs(reference, candidate)
    assert metrics["logits"]["top1_agreement"] == pytest.approx(9 / 12)
    assert "top1_agreement" not in metrics["sentence_embedding"] and "top1_agreement" not in metrics["hidden"]
    explicit = compare_outputs(reference, candidate, class_scores={"sentence_embedding"})
    assert explicit["sentence_embedding"]["top1_agreement"] == 1.0 and "top1_agreement" not in explicit["logits"]


def test_classifier_model_reports_top1(tmp_path):
    report, ref_out, cand_out = evaluated_with_outputs(tmp_path, noise=0.3)
    agree = np.mean([np.mean(r["logits"].argmax(-1) == c["logits"].argmax(-1))
                     for r, c in zip(ref_out, cand_out, strict=True)])
    assert report["outputs"]["logits"]["top1_agreement"] == pytest.approx(agree)
    assert "top1_agreement" not in report["outputs"]["pooled_embedding"]


def test_non_finite_sqnr_cases():
    zeros = [{"out": np.zeros((2, 3), np.float32)}]
    ones = [{"out": np.ones((2, 3), np.float32)}]
    nans = [{"out": np.full((2, 3), np.nan, np.float32)}]
    both_zero = compare_outputs(zeros, zeros)["out"]
    assert both_zero["sqnr_db_nonfinite"] == "inf" and both_zero["cosine"] == 1.0
    zero_reference = compare_outputs(zeros, ones)["out"]
    assert zero_reference["sqnr_db"] is None and zero_reference["sqnr_db_nonfinite"] == "-inf"
    assert zero_reference["cosine"] == 0.0 and zero_reference["identical"] is False
    broken = summarize_outputs(ones, nans)
    entry = broken["outputs"]["out"]
    assert entry["sqnr_db_nonfinite"] == "nan" and entry["cosine"] is None and entry["max_abs_error"] is None
    assert broken["min_sqnr_db"] is None and broken["min_sqnr_db_nonfinite"] == "nan"
    json.dumps(broken, allow_nan=False)
    mixed = {"a": {"sqnr_db": 12.5}, "b": {"sqnr_db": None, "sqnr_db_nonfinite": "inf"}}
    assert min_sqnr_db(mixed) == {"min_sqnr_db": 12.5}
    mixed["c"] = {"sqnr_db": None, "sqnr_db_nonfinite": "-inf"}
    assert min_sqnr_db(mixed) == {"min_sqnr_db": None, "min_sqnr_db_nonfinite": "-inf"}


def test_compare_refusals():
    one = [{"out": np.ones((2, 3), np.float32)}]
    with pytest.raises(InputError, match="lacks the output 'out'"):
        compare_outputs(one, [{"other": np.ones((2, 3), np.float32)}])
    with pytest.raises(InputError, match="shapes differ"):
        compare_outputs(one, [{"out": np.ones((3, 2), np.float32)}])
    with pytest.raises(InputError, match="1 reference samples but 2"):
        compare_outputs(one, one * 2)


def rename_input(source: Path, target: Path, new_name: str, elem_type=TensorProto.FLOAT) -> Path:
    model = onnx.load(source)
    model.graph.input[0].name = new_name
    model.graph.input[0].type.tensor_type.elem_type = elem_type
    for node in model.graph.node:
        node.input[:] = [new_name if name == "x" else name for name in node.input]
    if elem_type != TensorProto.FLOAT:
        model.graph.node.insert(0, helper.make_node("Cast", [new_name], ["x_float"], to=TensorProto.FLOAT))
        for node in model.graph.node[1:]:
            node.input[:] = ["x_float" if name == new_name else name for name in node.input]
    onnx.save(model, target)
    return target


def test_input_and_output_mismatches_are_input_errors(tmp_path):
    reference = classifier(tmp_path / "ref.onnx")
    with pytest.raises(InputError, match=r"takes inputs \(y:float32\) but .*ref.onnx takes \(x:float32\)"):
        evaluate(reference, rename_input(reference, tmp_path / "renamed.onnx", "y"))
    with pytest.raises(InputError, match=r"\(x:float64\)"):
        evaluate(reference, rename_input(reference, tmp_path / "double.onnx", "x", TensorProto.DOUBLE))
    fewer = onnx.load(reference)
    del fewer.graph.output[1]
    onnx.save(fewer, tmp_path / "fewer.onnx")
    with pytest.raises(InputError, match=r"lacks the reference outputs \['pooled_embedding'\]"):
        evaluate(reference, tmp_path / "fewer.onnx")
    with pytest.raises(InputError, match="no such model file"):
        evaluate(reference, tmp_path / "absent.onnx")


def test_inputs_from_files_and_static_candidate_shapes(tmp_path):
    reference = classifier(tmp_path / "ref.onnx", batch="batch")
    candidate = classifier(tmp_path / "cand.onnx", batch=2, noise=0.01)  # a "prepared" model: static batch 2
    report = evaluate(reference, candidate)
    assert report["samples"] == 8 and report["outputs"]["logits"]["sqnr_db"] > 20
    samples = default_inputs(onnx.load(candidate), count=3, purpose="evaluation")
    listing = write_input_list(samples, tmp_path / "inputs")
    from_list = evaluate(reference, candidate, inputs_path=listing)
    assert from_list["inputs"] == f"{listing}:3" and from_list["samples"] == 3
    npz = tmp_path / "inputs.npz"
    np.savez(npz, x=np.stack([s["x"] for s in samples]))
    from_npz = evaluate(reference, candidate, inputs_path=npz)
    assert from_npz["outputs"]["logits"]["sqnr_db"] == from_list["outputs"]["logits"]["sqnr_db"]
    given = evaluate(reference, candidate, samples=samples)
    assert given["outputs"]["logits"]["sqnr_db"] == from_list["outputs"]["logits"]["sqnr_db"]
    with pytest.raises(InputError, match="static shape"):
        evaluate(reference, candidate, input_shapes={"x": (3, 16)})


def test_qnn_runs_the_candidate_on_the_htp_simulator(tmp_path, require_qnn):
    reference = classifier(tmp_path / "ref.onnx", batch=1)
    report = evaluate(reference, reference, qnn=True)
    qnn = report["qnn"]
    # The float32 model runs on the HTP (CPU fallback disabled), in reduced precision: close, not identical.
    for name in ("logits", "pooled_embedding"):
        assert qnn["outputs"][name]["identical"] is False
        assert qnn["outputs"][name]["sqnr_db"] > 30.0
        assert qnn["against_cpu_candidate"][name]["sqnr_db"] == qnn["outputs"][name]["sqnr_db"]
    assert report["min_sqnr_db"] is None  # the CPU comparison of a model with itself
    json.dumps(report, allow_nan=False)


def test_qnn_refuses_a_model_the_htp_cannot_run_whole(tmp_path, require_qnn):
    dynamic = classifier(tmp_path / "dynamic.onnx", batch="batch")
    with pytest.raises(RuntimeError, match="does not run entirely on the QNN HTP.*pyqshare prepare"):
        evaluate(dynamic, dynamic, qnn=True)


def test_cli_json_is_one_object(tmp_path, run_cli):
    reference = classifier(tmp_path / "ref.onnx", batch="batch")
    candidate = classifier(tmp_path / "cand.onnx", batch="batch", noise=0.05)
    result = run_cli("evaluate", "--reference", reference, "--candidate", candidate, "--input-shape", "x=2,16",
                     "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)  # the whole of stdout is one JSON object
    assert isinstance(report, dict) and report["candidate"] == str(candidate)
    assert report["outputs"]["logits"]["sqnr_db"] == pytest.approx(
        evaluate(reference, candidate, input_shapes={"x": (2, 16)})["outputs"]["logits"]["sqnr_db"])


def test_cli_qnn_json_keeps_native_prints_off_stdout(tmp_path, require_qnn, run_cli):
    model = classifier(tmp_path / "m.onnx", batch=1)
    result = run_cli("evaluate", "--reference", model, "--candidate", model, "--qnn", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)  # the QNN libraries' own prints ("# LIBNATIVE: ...") went to stderr
    assert report["qnn"]["min_sqnr_db"] > 30.0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--candidate", "{absent}"], "absent.onnx: no such model file"),
        (["--candidate", "{model}", "--inputs", "{absent_inputs}"], "no such calibration data file"),
        (["--candidate", "{model}", "--input-shape", "x=two"], "--input-shape 'x=two'"),
    ],
)
def test_cli_bad_input_exits_2(tmp_path, run_cli, args, message):
    model = classifier(tmp_path / "m.onnx")
    paths = {"absent": tmp_path / "absent.onnx", "model": model, "absent_inputs": tmp_path / "absent.npz"}
    result = run_cli("evaluate", "--reference", model, *[arg.format(**paths) for arg in args], "--json")
    assert result.returncode == 2
    assert result.stdout == "" and message in result.stderr and len(result.stderr.strip().splitlines()) == 1
