"""The quantized view of sharing and ``share harmonize``: real models written by pyqshare's methods, real files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from pyqshare.encodings import read_encodings, write_encodings
from pyqshare.errors import InputError
from pyqshare.model import load_model, save_model
from pyqshare.share.harmonize import harmonize
from pyqshare.share.quantized import (
    encoding_mismatches, float_identical_groups, identical_float_groups, load_family, predict_sharing,
)
from pyqshare.zoo import synthetic_mlp


@pytest.fixture(scope="module")
def family(tmp_path_factory, run_method) -> dict[str, Path]:
    """One float MLP quantized per channel and per tensor (GPTQ rounding, the default, and nearest rounding),
    and a fine-tune of it with five weights of w1 nudged by less than a quantization step."""
    folder = tmp_path_factory.mktemp("family")
    paths = {"float": synthetic_mlp(folder / "mlp.onnx")}
    model = load_model(paths["float"], load_weights=True)
    w1 = next(t for t in model.graph.initializer if t.name == "w1")
    values = numpy_helper.to_array(w1).copy()
    for row, column in [(1, 2), (5, 7), (9, 30), (20, 40), (31, 63)]:
        values[row, column] += 0.004  # steps are 0.003..0.009 here: one code at most
    w1.CopyFrom(numpy_helper.from_array(values, "w1"))
    paths["tuned_float"] = folder / "tuned.onnx"
    save_model(model, paths["tuned_float"])
    runs = {
        "per_channel": (paths["float"], ()),
        "per_tensor": (paths["float"], ("--weight-method", "per-tensor")),
        "per_channel_nearest": (paths["float"], ("--optimization-level", "1")),
        "per_tensor_nearest": (paths["float"], ("--weight-method", "per-tensor", "--optimization-level", "1")),
        "tuned_nearest": (paths["tuned_float"], ("--optimization-level", "1")),
    }
    for name, (source, flags) in runs.items():
        paths[name] = folder / f"{name}.onnx"
        run_method("per-channel", source, paths[name], *flags)
    return paths


def _initializers(path: Path) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in onnx.load(path).graph.initializer}


def test_identical_float_groups_needs_same_dtype_shape_and_bytes():
    a = np.arange(64, dtype=np.float32)
    tensors = [a, a.copy(), a.reshape(8, 8), a.view(np.int32), a + 1, np.asfortranarray(a.reshape(8, 8)).T.copy().T]
    groups = identical_float_groups(tensors)
    assert groups[0] == [0, 1]
    assert sorted(map(sorted, groups)) == sorted([[0, 1], [2, 5], [3], [4]])


def test_per_channel_versus_per_tensor_is_predicted_unshared_and_listed(family):
    members = load_family([family["per_channel"], family["per_tensor"]], float_models=[family["float"]] * 2)
    prediction = predict_sharing(members)
    shared = {member["tensor"] for group in prediction.groups for member in group["members"]}
    assert "w1" not in shared and "w2" not in shared
    assert "b1" in shared  # quantized per tensor at the activation width in both: identical codes
    assert prediction.predicted_combined_bytes == prediction.total_bytes - 128  # only b1's 64 uint16 codes
    groups, evidence = float_identical_groups(members)
    assert evidence == "float"
    mismatches = {m["members"][0]["tensor"]: m for m in encoding_mismatches(members, groups)}
    assert set(mismatches) == {"w1", "w2"}
    for entry in mismatches.values():
        assert {"granularity", "axis", "scale"} <= set(entry["differs"])
        assert "bitwidth" not in entry["differs"] and "symmetric" not in entry["differs"]
        assert [m["granularity"] for m in entry["members"]] == ["per_channel", "per_tensor"]


def test_harmonize_makes_the_bytes_identical_and_reports_the_sqnr(family, run_cli, tmp_path):
    out = tmp_path / "out"
    done = run_cli("share", "harmonize", family["per_channel"], family["per_tensor"], "--float-models",
                   family["float"], family["float"], "--output-dir", out, "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    changes = {(c["model"], c["tensor"]): c for c in report["changes"]}
    assert set(changes) == {(1, "w1"), (1, "w2")}  # the per-tensor model takes the finer per-channel grid
    assert changes[1, "w1"]["old"]["granularity"] == "per_tensor"
    assert changes[1, "w1"]["new"]["granularity"] == "per_channel"
    assert {"granularity", "axis", "scale"} <= set(changes[1, "w1"]["fields"])
    first, second = (_initializers(Path(o["model"])) for o in report["outputs"])
    for name in ("w1_quantized", "w1_scale", "w1_zero_point", "w2_quantized", "w2_scale"):
        assert first[name].raw_data == second[name].raw_data and first[name].dims == second[name].dims
    original = _initializers(family["per_channel"])
    assert first["w1_quantized"].raw_data == original["w1_quantized"].raw_data  # the reference is untouched
    [fidelity] = report["fidelity"]
    assert fidelity["model"] == 1 and fidelity["reference"] == str(family["float"])
    before, after = fidelity["before"]["min_sqnr_db"], fidelity["after"]["min_sqnr_db"]
    assert after > before + 1.0  # per-channel weights are finer than the per-tensor ones they replace
    assert report["after"]["predicted_combined_bytes"] == report["after"]["solo_bytes"][1]
    assert report["before"]["predicted_combined_bytes"] > report["after"]["predicted_combined_bytes"]
    assert sorted(p.name for p in out.iterdir()) == ["per_channel.encodings", "per_channel.onnx",
                                                      "per_tensor.encodings", "per_tensor.onnx"]


def test_float_identity_inferred_without_float_models(family, tmp_path):
    """Nearest rounding: per-channel and per-tensor codes are consistent with one float tensor."""
    members = load_family([family["per_channel_nearest"], family["per_tensor_nearest"]])
    groups, evidence = float_identical_groups(members)
    assert evidence == "dequantized"
    assert {entry["members"][0]["tensor"] for entry in encoding_mismatches(members, groups)} == {"w1", "w2"}
    report = harmonize([family["per_channel_nearest"], family["per_tensor_nearest"]], tmp_path / "out")
    assert {(c["model"], c["tensor"]) for c in report["changes"]} == {(1, "w1"), (1, "w2")}
    [fidelity] = report["fidelity"]
    assert fidelity["reference"] == str(family["per_tensor_nearest"]) and "before" not in fidelity
    assert 20 < fidelity["after"]["min_sqnr_db"] < 80  # against its own pre-harmonization model


def test_float_model_with_aimet_encodings_equals_the_qdq_route(family, tmp_path):
    qdq = [family["per_channel_nearest"], family["per_tensor_nearest"]]
    encodings = [path.with_suffix(".encodings") for path in qdq]
    by_qdq = load_family(qdq)
    by_float = load_family([family["float"]] * 2, encodings=encodings)
    for qdq_member, float_member in zip(by_qdq, by_float):
        assert float_member.kind == "float" and qdq_member.kind == "qdq"
        assert set(qdq_member.weights) == set(float_member.weights)
        for name, weight in qdq_member.weights.items():
            assert weight.codes.dtype == float_member.weights[name].codes.dtype
            np.testing.assert_array_equal(weight.codes, float_member.weights[name].codes)
    ignore_paths = {"models": None}
    assert predict_sharing(by_qdq).to_dict() | ignore_paths == predict_sharing(by_float).to_dict() | ignore_paths
    # An encodings file in the 0.6.1 format says the same.
    legacy = tmp_path / "legacy.encodings"
    write_encodings(legacy, read_encodings(encodings[0]), "0.6.1")
    [legacy_member] = load_family([family["float"]], encodings=[legacy])
    np.testing.assert_array_equal(legacy_member.weights["w1"].codes, by_qdq[0].weights["w1"].codes)

    report = harmonize([family["float"]] * 2, tmp_path / "out", encodings=encodings)
    assert {(c["model"], c["tensor"]) for c in report["changes"]} == {(1, "w1"), (1, "w2")}
    assert [o["model"] for o in report["outputs"]] == [str(tmp_path / "out" / f"{i}_mlp.onnx") for i in (0, 1)]
    written = [_initializers(Path(o["model"])) for o in report["outputs"]]
    reference = _initializers(family["per_channel_nearest"])
    for name in ("w1_quantized", "w2_quantized"):
        assert written[0][name].raw_data == written[1][name].raw_data == reference[name].raw_data
    [fidelity] = report["fidelity"]
    assert fidelity["after"]["min_sqnr_db"] > fidelity["before"]["min_sqnr_db"]


def test_snap_tolerance_gains_bytes_at_a_small_sqnr_cost(family, tmp_path):
    models = [family["per_channel_nearest"], family["tuned_nearest"]]
    floats = [family["float"], family["tuned_float"]]
    exact = harmonize(models, tmp_path / "exact", float_models=floats, snap_tolerance=0.0)
    assert exact["changes"] == [] and exact["snap"]["bytes_gained"] == 0
    assert exact["after"]["predicted_combined_bytes"] == exact["before"]["predicted_combined_bytes"]

    snapped = harmonize(models, tmp_path / "snap", float_models=floats, snap_tolerance=0.01)
    [change] = snapped["changes"]
    assert (change["model"], change["tensor"], change["reason"]) == (1, "w1", "snap")
    assert 1 <= change["differing_elements"] <= 5  # the nudged elements, at most
    [entry] = snapped["snap"]["models"]
    assert entry["bytes_gained"] == 32 * 64 == change["bytes"]
    assert snapped["after"]["predicted_combined_bytes"] == snapped["before"]["predicted_combined_bytes"] - 2048
    assert abs(entry["sqnr_cost_db"]) < 1.0
    base, tuned = (_initializers(Path(o["model"])) for o in snapped["outputs"])
    assert base["w1_quantized"].raw_data == tuned["w1_quantized"].raw_data
    assert base["w1_scale"].raw_data == tuned["w1_scale"].raw_data


def _bad_cases(family, tmp_path) -> dict[str, tuple[list, dict]]:
    malformed = tmp_path / "malformed.encodings"
    malformed.write_text('{"version": "1.0.0", "param_encodings": [')
    alien = tmp_path / "alien.encodings"  # names a weight the MLP does not have
    alien.write_text(family["per_channel"].with_suffix(".encodings").read_text().replace('"w1"', '"w9"'))
    wrong_channels = tmp_path / "channels.encodings"  # w2's 32 channel scales laid on w1 (64 channels)
    text = json.loads(family["per_channel"].with_suffix(".encodings").read_text())
    params = {entry["name"]: entry for entry in text["param_encodings"]}
    params["w1"] = {**params["w2"], "name": "w1"}
    text["param_encodings"] = list(params.values())
    wrong_channels.write_text(json.dumps(text))
    disagreeing = tmp_path / "disagreeing.onnx"  # a QDQ model with another model's encodings beside it
    shutil.copy(family["per_channel"], disagreeing)
    shutil.copy(family["per_tensor"].with_suffix(".encodings"), disagreeing.with_suffix(".encodings"))
    mlp = family["float"]
    return {
        "malformed": ([mlp, mlp], {"encodings": [malformed, family["per_tensor"].with_suffix(".encodings")]}),
        "alien": ([mlp, mlp], {"encodings": [alien, alien]}),
        "channels": ([mlp, mlp], {"encodings": [wrong_channels, wrong_channels]}),
        "disagreeing": ([family["per_channel"], disagreeing], {}),
        "no encodings": ([mlp, family["per_channel"]], {}),
    }


@pytest.mark.parametrize(("case", "message"), [
    ("malformed", "not valid JSON"), ("alien", "names no float weight"), ("channels", "does not fit the weight"),
    ("disagreeing", "differs from"), ("no encodings", "needs an AIMET encodings file"),
])
def test_bad_inputs_raise_input_error_and_write_nothing(family, tmp_path, run_cli, case, message):
    models, options = _bad_cases(family, tmp_path)[case]
    out = tmp_path / "out"
    with pytest.raises(InputError, match=message):
        harmonize(models, out, **options)
    assert not out.exists()
    flags = ["--encodings", *options["encodings"]] if "encodings" in options else []
    done = run_cli("share", "harmonize", *models, *flags, "--output-dir", out, "--json")
    assert done.returncode == 2 and done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_outputs_never_overwrite_inputs(family, tmp_path):
    models = [tmp_path / "a.onnx", tmp_path / "b.onnx"]
    for source, target in zip([family["per_channel"], family["per_tensor"]], models):
        shutil.copy(source, target)
        shutil.copy(source.with_suffix(".encodings"), target.with_suffix(".encodings"))
    before = [path.read_bytes() for path in models]
    with pytest.raises(InputError, match="overwrite"):
        harmonize(models, tmp_path)
    assert [path.read_bytes() for path in models] == before


def test_minilm_fine_tune_snaps_its_top_layer(minilm_onnx, run_method, tmp_path):
    """A real fine-tune: MiniLM with 2% of layer 5's MatMul weights moved by 0.3 of an int8 step."""
    model = load_model(minilm_onnx, load_weights=True)
    matrices = [t for t in model.graph.initializer if t.name.startswith("onnx::MatMul") and len(t.dims) == 2]
    rng = np.random.default_rng(0)
    for tensor in matrices[-6:]:  # six per layer, in layer order
        values = numpy_helper.to_array(tensor).copy()
        moved = rng.random(values.shape) < 0.02
        step = np.abs(values).max(axis=0, keepdims=True) / 127
        values[moved] += (0.3 * step * rng.choice([-1, 1], values.shape))[moved]
        tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))
    tuned = save_model(model, tmp_path / "tuned.onnx")[0]
    quantized = [tmp_path / "base_q.onnx", tmp_path / "tuned_q.onnx"]
    for source, target in zip([minilm_onnx, tuned], quantized):
        run_method("per-channel", source, target, "--optimization-level", "1")
    floats = [minilm_onnx, tuned]
    exact = harmonize(quantized, tmp_path / "exact", float_models=floats, snap_tolerance=0.0)
    assert exact["changes"] == [] and exact["snap"]["bytes_gained"] == 0
    snapped = harmonize(quantized, tmp_path / "snap", float_models=floats, snap_tolerance=0.01)
    layer5 = {tensor.name for tensor in matrices[-6:]}
    assert {c["tensor"] for c in snapped["changes"]} == layer5
    [entry] = snapped["snap"]["models"]
    assert entry["bytes_gained"] == sum(int(np.prod(t.dims)) for t in matrices[-6:])  # int8 codes
    before, after = snapped["before"], snapped["after"]
    assert after["predicted_combined_bytes"] == before["predicted_combined_bytes"] - entry["bytes_gained"]
    assert abs(entry["sqnr_cost_db"]) < 0.5


@pytest.mark.parametrize("min_elements", ["64", "1"])  # the small bias left alone, or harmonized itself
def test_harmonized_conv_keeps_its_int32_bias_at_input_scale_times_weight_scale(tmp_path, run_method, run_cli,
                                                                                 min_elements):
    """QNN's bias rule survives harmonize: a Conv whose weight changes scale gets its int32 bias requantized to
    input scale x new weight scale, and the model still computes the same thing."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from pyqshare.calibration import default_inputs, run_model
    from pyqshare.evaluate import summarize_outputs
    from pyqshare.zoo import synthetic_cnn

    source = synthetic_cnn(tmp_path / "cnn.onnx")
    flags = ("--optimization-level", "1", "--input-shape", "x=1,3,16,16")
    run_method("per-channel", source, tmp_path / "a.onnx", *flags)
    run_method("per-channel", source, tmp_path / "b.onnx", *flags, "--weight-method", "per-tensor")
    done = run_cli("share", "harmonize", tmp_path / "a.onnx", tmp_path / "b.onnx", "--float-models", source, source,
                   "--min-elements", min_elements, "--output-dir", tmp_path / "out", "--json")
    assert done.returncode == 0, done.stderr
    model = onnx.load(tmp_path / "out" / "b.onnx")
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    producers = {out: node for node in model.graph.node for out in node.output}
    conv = next(node for node in model.graph.node if node.op_type == "Conv" and len(node.input) > 2)
    input_scale = inits[producers[conv.input[0]].input[1]]
    weight_scale = inits[producers[conv.input[1]].input[1]]
    bias_scale = inits[producers[conv.input[2]].input[1]]
    assert weight_scale.size > 1  # b took a's per-channel grid
    np.testing.assert_allclose(bias_scale, input_scale * weight_scale, rtol=1e-6)
    samples = default_inputs(model, purpose="evaluation")
    reference = run_model(source, samples)
    assert summarize_outputs(reference, run_model(tmp_path / "out" / "b.onnx", samples))["min_sqnr_db"] > 20
