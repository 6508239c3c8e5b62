"""A family end to end: methods -> share harmonize -> share compile on the real QNN HTP backend.

The same float MLP quantized per channel in one model and per tensor in the other shares almost nothing;
harmonize gives the float-identical weights identical bytes, and the compiled context's shared-weights pool
then holds them, as predicted.
"""

from __future__ import annotations

import json

import pytest

from pyqshare.share.compile import POOL_PAGE_BYTES
from pyqshare.zoo import synthetic_mlp

FEATURES, HIDDEN = 256, 1024
WEIGHT_BYTES = 2 * FEATURES * HIDDEN  # w1 and w2 as int8 codes


def _within_one_percent(predicted: int, measured: int) -> bool:
    return abs(measured - predicted) <= 0.01 * measured


@pytest.fixture(scope="module")
def mismatched_family(tmp_path_factory, run_method):
    folder = tmp_path_factory.mktemp("family")
    source = synthetic_mlp(folder / "mlp.onnx", features=FEATURES, hidden=HIDDEN)
    shape = f"x=1,16,{FEATURES}"
    # Level 1 (MSE scales, nearest rounding): GPTQ would round each model against its own calibration run.
    common = ("--optimization-level", "1", "--input-shape", shape)
    run_method("per-channel", source, folder / "a.onnx", *common)
    run_method("per-channel", source, folder / "b.onnx", *common, "--weight-method", "per-tensor")
    return folder, source


def _compile(run_cli, models, output) -> dict:
    done = run_cli("share", "compile", *models, "--output-dir", output, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_harmonize_makes_a_per_channel_versus_per_tensor_pair_share(mismatched_family, run_cli, require_qnn):
    folder, source = mismatched_family
    before = _compile(run_cli, [folder / "a.onnx", folder / "b.onnx"], folder / "before")
    assert before["measured_shared_bytes"] < WEIGHT_BYTES / 4  # only the small identical tensors
    # A pool of a page or two: 1% is below its granularity, one page is the bar there.
    assert abs(before["predicted_shared_pool_bytes"] - before["measured_shared_bytes"]) <= POOL_PAGE_BYTES

    done = run_cli("share", "harmonize", folder / "a.onnx", folder / "b.onnx", "--float-models", source, source,
                   "--output-dir", folder / "harmonized", "--json")
    assert done.returncode == 0, done.stderr
    harmonized = json.loads(done.stdout)
    changed = {change["tensor"] for change in harmonized["changes"] if change["model"] == 1}
    assert {"w1", "w2"} <= changed

    after = _compile(run_cli, [folder / "harmonized" / "a.onnx", folder / "harmonized" / "b.onnx"], folder / "after")
    assert after["graphs"] == 2
    assert after["measured_shared_bytes"] >= before["measured_shared_bytes"] + WEIGHT_BYTES
    # At 16 rows the HTP compiler also stores the biases broadcast (constants the models do not hold), so the
    # models-only figure is a lower bound here; the figure calibrated on the solo binaries meets the bar.
    assert after["predicted_shared_pool_bytes"] <= after["measured_shared_bytes"]
    assert _within_one_percent(after["solo_calibrated_pool_bytes"], after["measured_shared_bytes"])
    solo_total = sum(after["solo_bytes"].values())
    assert solo_total - after["combined_bytes"] >= 0.9 * WEIGHT_BYTES  # the shared copy is stored once


# A real fine-tune: all-MiniLM-L6-v2 with its top layer trained three Adam steps (pyqshare.zoo.export_minilm).


@pytest.fixture(scope="module")
def minilm_family(minilm_onnx, tmp_path_factory, run_method):
    from pyqshare.zoo import export_minilm

    folder = tmp_path_factory.mktemp("minilm-family")
    tuned = export_minilm(folder / "tuned.onnx", finetune_layers=1)
    for name, source in (("base", minilm_onnx), ("tuned", tuned)):
        run_method("per-channel", source, folder / f"{name}.q.onnx", "--optimization-level", "1")
    return folder, minilm_onnx, tuned


@pytest.mark.slow
@pytest.mark.parametrize("snap_tolerance", [None, "0.1"], ids=["exact", "snapped"])
def test_minilm_fine_tune_shares_what_is_predicted(minilm_family, run_cli, require_qnn, tmp_path, snap_tolerance):
    folder, base, tuned = minilm_family
    models = [folder / "base.q.onnx", folder / "tuned.q.onnx"]
    gained = 0
    if snap_tolerance:
        done = run_cli("share", "harmonize", *models, "--float-models", base, tuned, "--snap-tolerance", snap_tolerance,
                       "--output-dir", tmp_path / "snapped", "--json")
        assert done.returncode == 0, done.stderr
        gained = json.loads(done.stdout)["snap"]["bytes_gained"]
        assert gained > 0
        models = [tmp_path / "snapped" / path.name for path in models]
    report = _compile(run_cli, models, tmp_path / "ctx")
    assert report["graphs"] == 2
    assert all(placement["cpu_nodes"] == 0 for placement in report["placement"].values())
    # With prepare's constants_second (biases fused, not broadcast) the models alone predict the pool.
    assert _within_one_percent(report["predicted_shared_pool_bytes"], report["measured_shared_bytes"])
    assert _within_one_percent(report["solo_calibrated_pool_bytes"], report["measured_shared_bytes"])
    if snap_tolerance:  # the snapped layer-5 weights joined the pool
        assert report["predicted_shared_bytes"] >= gained
