"""``pyqshare config``: the note's JSON configs, their ONNX Runtime equivalents (compiled for real), SDK command
lines and input lists."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from pyqshare.calibration import default_inputs, load_calibration_data
from pyqshare.errors import InputError
from pyqshare.qnn.config import (
    DEVICES,
    MAX_GRAPHS,
    PRESETS,
    find_device,
    graph_names,
    order_graphs,
    read_overrides,
    write_config,
)
from pyqshare.qnn.ep import KNOWN_PROVIDER_OPTIONS
from pyqshare.zoo import synthetic_mlp

# The keys of Qualcomm's weight-sharing note's two JSON examples, level by level.
NOTE_EXTENSIONS_KEYS = {"backend_extensions": {"shared_library_path", "config_file_path"},
                        "context_configs": {"is_persistent_binary", "memory_limit_hint", "enable_graphs"}}
NOTE_GRAPH_KEYS = {"vtcm_mb", "graph_names", "O", "fp16_relaxed_precision", "hvx_threads"}
NOTE_CORE_KEYS = {"core_id", "perf_profile", "rpc_control_latency"}


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("family")
    return [synthetic_mlp(folder / f"{name}.onnx", seed=seed) for seed, name in enumerate(["base", "tuned-v2"])]


def _load(folder: Path, name: str) -> dict:
    return json.loads((folder / name).read_text())


def test_writes_the_notes_json_files_in_execution_order(family, tmp_path):
    report = write_config(family, tmp_path, device="SM8650", graphs_order=["tuned_v2"])
    assert report["graphs"] == ["tuned_v2", "base"]
    extensions, config = _load(tmp_path, "htp_backend_extensions.json"), _load(tmp_path, "htp_config.json")
    assert {key: set(value) for key, value in extensions.items()} == NOTE_EXTENSIONS_KEYS
    assert extensions["context_configs"]["enable_graphs"] == ["tuned_v2", "base"]
    assert extensions["context_configs"]["is_persistent_binary"] is True
    assert extensions["backend_extensions"]["shared_library_path"].endswith("libQnnHtpNetRunExtensions.so")
    assert Path(extensions["backend_extensions"]["config_file_path"]) == tmp_path.resolve() / "htp_config.json"
    assert set(config) == {"graphs", "devices", "context"}
    [graph] = config["graphs"]
    assert set(graph) == NOTE_GRAPH_KEYS and graph["graph_names"] == ["tuned_v2", "base"]
    assert graph == {"vtcm_mb": 8, "graph_names": ["tuned_v2", "base"], "O": 3.0, "fp16_relaxed_precision": 1,
                     "hvx_threads": 4}
    [device] = config["devices"]
    assert (device["soc_id"], device["dsp_arch"]) == (57, "v75")
    [core] = device["cores"]
    assert set(core) == NOTE_CORE_KEYS and core["perf_profile"] == "burst" and core["rpc_control_latency"] == 100
    assert config["context"] == {"weight_sharing_enabled": True}
    listed = {path.relative_to(tmp_path).as_posix() for path in tmp_path.rglob("*") if path.is_file()}
    assert listed == set(report["files"])


@pytest.mark.parametrize(("device", "soc_id", "arch"), [("SM8550", 43, 73), ("sm8650", 57, 75), ("SM8750", 69, 79),
                                                        ("SC8380XP", 60, 73), ("x1e80100", 60, 73)])
def test_device_table_feeds_both_configs(family, tmp_path, device, soc_id, arch):
    report = write_config(family, tmp_path, device=device)
    [config_device] = _load(tmp_path, "htp_config.json")["devices"]
    assert (config_device["soc_id"], config_device["dsp_arch"]) == (soc_id, f"v{arch}")
    options = _load(tmp_path, "ort_options.json")["provider_options"]
    assert (options["soc_model"], options["htp_arch"]) == (str(soc_id), str(arch))
    assert report["device"]["soc_model"] == soc_id and report["device"]["sources"]


def test_unverified_vtcm_is_flagged_in_the_table():
    assert not find_device("SC8380XP").vtcm_verified and "UNVERIFIED" in find_device("SC8380XP").sources
    assert all(row.vtcm_verified for name, row in DEVICES.items() if name != "SC8380XP")


def test_ort_equivalents_and_shared_context_entries(family, tmp_path):
    write_config(family, tmp_path, device="SM8750", graphs_order=["tuned_v2", "base"])
    ort_options = _load(tmp_path, "ort_options.json")
    options = ort_options["provider_options"]
    assert set(options) <= KNOWN_PROVIDER_OPTIONS
    assert options == {"vtcm_mb": "8", "htp_graph_finalization_optimization_mode": "3",
                       "enable_htp_fp16_precision": "1", "soc_model": "69", "htp_arch": "79",
                       "htp_performance_mode": "burst", "rpc_control_latency": "100"}
    sessions = ort_options["sessions"]
    assert [Path(session["model"]).name for session in sessions] == ["tuned-v2.onnx", "base.onnx"]
    assert [session["config_entries"] for session in sessions] == [
        {"ep.share_ep_contexts": "1"}, {"ep.share_ep_contexts": "1", "ep.stop_share_ep_contexts": "1"}]
    assert "graphs.hvx_threads" in ort_options["sdk_only"]


@pytest.mark.parametrize("preset", list(PRESETS))
def test_presets_change_real_options_only(family, tmp_path, preset):
    write_config(family, tmp_path, optimize=preset)
    [core] = _load(tmp_path, "htp_config.json")["devices"][0]["cores"]
    options = _load(tmp_path, "ort_options.json")["provider_options"]
    assert set(options) <= KNOWN_PROVIDER_OPTIONS
    assert options["htp_performance_mode"] == core["perf_profile"] == PRESETS[preset]["cores"]["perf_profile"]
    assert options["rpc_control_latency"] == str(core["rpc_control_latency"])
    assert ("enable_htp_spill_fill_buffer" in options) == (preset == "memory")


def test_input_lists_hold_each_models_evaluation_inputs(family, tmp_path):
    report = write_config(family, tmp_path)
    for model, graph in zip(family, ["base", "tuned_v2"], strict=True):
        listed = tmp_path / report["input_lists"][graph]
        assert listed.parent == tmp_path / "inputs"
        samples = load_calibration_data(listed, model)
        expected = default_inputs(model, purpose="evaluation")
        assert len(samples) == len(expected) == 8
        for got, want in zip(samples, expected, strict=True):
            np.testing.assert_array_equal(got["x"], want["x"])


def test_sdk_command_lines(family, tmp_path):
    report = write_config(family, tmp_path, graphs_order=["tuned_v2"])
    by_tool = {Path(command["argv"][0]).name: command for command in report["commands"]}
    assert set(by_tool) == {"qnn-onnx-converter", "qnn-model-lib-generator", "qnn-context-binary-generator",
                            "qnn-net-run"}
    generator = by_tool["qnn-context-binary-generator"]["argv"]
    flags = dict(zip(generator[1::2], generator[2::2], strict=True))
    assert flags["--model"] == "build/libs/x86_64-linux-clang/libtuned_v2.so,build/libs/x86_64-linux-clang/libbase.so"
    assert flags["--backend"].endswith("/libQnnHtp.so") and flags["--config_file"] == "htp_backend_extensions.json"
    assert {"--binary_file", "--output_dir"} <= set(flags)
    net_run = by_tool["qnn-net-run"]
    flags = dict(zip(net_run["argv"][1::2], net_run["argv"][2::2], strict=True))
    assert flags["--retrieve_context"].endswith(".bin")
    lists = flags["--input_list"].split(",")
    assert lists == ["tuned_v2_input_list.txt", "base_input_list.txt"]
    assert all((tmp_path / net_run["cwd"] / name).is_file() for name in lists)
    assert _load(tmp_path, "commands.json") == report["commands"]
    script = tmp_path / "commands.sh"
    assert subprocess.run(["sh", "-n", script], check=False).returncode == 0
    assert '"${QNN_SDK_ROOT}"/bin/x86_64-linux-clang/qnn-context-binary-generator --model' in script.read_text()


def test_graph_names_are_unique_identifiers(tmp_path):
    paths = [tmp_path / "a" / "m.onnx", tmp_path / "b" / "m.onnx", tmp_path / "my-model.v2.onnx", tmp_path / "1st.onnx"]
    assert graph_names(paths) == ["m", "m_2", "my_model_v2", "g_1st"]
    assert order_graphs(["a", "b", "c"], ["c"]) == ["c", "a", "b"]


def _refused(call, match: str, folder: Path) -> None:
    with pytest.raises(InputError, match=match):
        call()
    assert not folder.exists() or not any(folder.iterdir())


def test_validation_refuses_before_writing(family, tmp_path):
    out = tmp_path / "out"
    _refused(lambda: write_config([family[0]] * (MAX_GRAPHS + 1), out), "at most 64 graphs", out)
    _refused(lambda: write_config(family, out, device="SM8450"), "weight sharing needs HTP v73 .* v69", out)
    _refused(lambda: write_config(family, out, device="SM9999"), "unknown device", out)
    _refused(lambda: write_config(family, out, graphs_order=["base", "nope"]), "'nope' is not among", out)
    _refused(lambda: write_config(family, out, graphs_order=["base", "base"]), "more than once", out)
    _refused(lambda: write_config(family, out, overrides={"devices": {"dsp_arch": "v69"}}), "v69", out)
    _refused(lambda: write_config(family, out, overrides={"graphs": {"vtcm_mb": 16}}), "8 MB of VTCM", out)
    _refused(lambda: write_config(family, out, overrides={"cores": {"perf_profile": "turbo"}}), "perf_profile", out)
    _refused(lambda: write_config([*family, tmp_path / "missing.onnx"], out), "no such model", out)
    # weight sharing off: a v69 device is fine, and the ORT sessions do not share a context
    write_config(family, out, device="SM8450", overrides={"context": {"weight_sharing_enabled": False}})
    assert all(not session["config_entries"] for session in _load(out, "ort_options.json")["sessions"])


@pytest.mark.parametrize(("document", "match"), [
    ({"graph": {"vtcm_mb": 4}}, "unknown section 'graph'"),
    ({"graphs": {"vtcm": 4}}, "unknown key graphs.vtcm"),
    ({"graphs": {"vtcm_mb": "4"}}, "graphs.vtcm_mb must be int, not str"),
    ({"graphs": {"hvx_threads": True}}, "graphs.hvx_threads must be int, not bool"),
    ({"context": {"weight_sharing_enabled": 1}}, "weight_sharing_enabled must be bool, not int"),
    ({"graphs": [1]}, "section 'graphs' must be an object"),
    ([1], "expected a JSON object"),
])
def test_override_schema(tmp_path, document, match):
    path = tmp_path / "overrides.json"
    path.write_text(json.dumps(document))
    with pytest.raises(InputError, match=match):
        read_overrides(path)


def test_overrides_reach_both_configs(family, tmp_path):
    path = tmp_path / "overrides.json"
    path.write_text(json.dumps({"graphs": {"vtcm_mb": 4, "O": 2}, "cores": {"rpc_control_latency": 50}}))
    write_config(family, tmp_path / "out", overrides=read_overrides(path))
    assert _load(tmp_path / "out", "htp_config.json")["graphs"][0]["O"] == 2.0
    options = _load(tmp_path / "out", "ort_options.json")["provider_options"]
    assert (options["vtcm_mb"], options["htp_graph_finalization_optimization_mode"],
            options["rpc_control_latency"]) == ("4", "2", "50")


def test_command_line(run_cli, family, tmp_path):
    done = run_cli("config", *family, "--output-dir", tmp_path / "out", "--device", "SM8550", "--optimize", "power",
                   "--graphs-order", "tuned_v2,base", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["graphs"] == ["tuned_v2", "base"] and report["provider_options"]["htp_performance_mode"] == "power_saver"
    done = run_cli("config", *family, "--output-dir", tmp_path / "bad", "--graphs-order", "base,other")
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "--graphs-order" in done.stderr
    assert not (tmp_path / "bad").exists()


# Run in a child (-P): a shared QNN context that fails leaks into the next one in the same process
# (../shared/QNN_NOTES.md). argv: ort_options.json, output folder.
_COMPILE = """
import json, sys
from pathlib import Path
import onnxruntime as ort
from pyqshare.qnn.ep import htp_session_options, native_stdout_to_stderr
config = json.loads(Path(sys.argv[1]).read_text())
for session in config["sessions"]:
    options = htp_session_options(config["provider_options"], config_entries=session["config_entries"])
    with native_stdout_to_stderr():
        ort.ModelCompiler(options, session["model"], embed_compiled_data_into_model=False).compile_to_file(
            str(Path(sys.argv[2]) / (session["graph"] + "_ctx.onnx")))
"""


def test_generated_ort_options_compile_one_shared_context_binary(require_qnn, run_method, tmp_path):
    """The provider options and share_ep_contexts entries, compiled by onnxruntime-qnn: one *_qnn.bin holds
    every graph, and it records the SoC, HTP arch, VTCM size and optimization level that config asked for."""
    models = []
    for seed in range(3):
        source = synthetic_mlp(tmp_path / f"float{seed}.onnx", seed=seed)
        run_method("per-channel", source, tmp_path / f"member{seed}.onnx")
        models.append(tmp_path / f"member{seed}.onnx")
    overrides = {"graphs": {"vtcm_mb": 4, "O": 2}}
    report = write_config(models, tmp_path / "config", device="SM8650", overrides=overrides,
                          graphs_order=["member2"])
    compiled = tmp_path / "compiled"
    compiled.mkdir()
    done = subprocess.run([sys.executable, "-P", "-c", _COMPILE, tmp_path / "config" / "ort_options.json", compiled],
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr
    [binary] = compiled.glob("*_qnn.bin")
    text = binary.read_bytes()
    contexts = [onnx.load(compiled / f"{graph}_ctx.onnx") for graph in report["graphs"]]
    graph_names_in_bin = set()
    for context in contexts:
        [node] = [node for node in context.graph.node if node.op_type == "EPContext"]
        cache = next(attribute.s for attribute in node.attribute if attribute.name == "ep_cache_context")
        assert cache.decode() == binary.name
        assert node.name.encode() in text
        graph_names_in_bin.add(node.name)
    assert len(graph_names_in_bin) == 3
    # The HTP compiler stamps its settings into every graph's blob.
    for setting in (b"soc_type=SM8650;arch=75", b"vtcm_size=4194304;", b"OpO=2;"):
        assert text.count(setting) >= 3, setting
