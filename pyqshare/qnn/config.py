"""``pyqshare config``: QNN HTP configuration for a weight-shared model family, for the SDK tools and for ONNX Runtime.

Qualcomm's weight-sharing note (../shared/seeds/000_6befe6d0f721cb7f.txt) asks the user to hand-write two JSON
files and the tool command lines. :func:`write_config` writes them from the models, a device and a preset:

- ``htp_backend_extensions.json`` (``backend_extensions``: the HTP net-run extensions library and the path of
  ``htp_config.json``; ``context_configs``: ``is_persistent_binary``, ``memory_limit_hint``, ``enable_graphs``
  in execution order) and ``htp_config.json`` (``graphs``: ``vtcm_mb``, ``graph_names``, ``O``,
  ``fp16_relaxed_precision``, ``hvx_threads``; ``devices``: ``soc_id``, ``dsp_arch``, ``cores`` with
  ``core_id``, ``perf_profile``, ``rpc_control_latency``; ``context``: ``weight_sharing_enabled``), with
  the note's field names and layout;
- ``ort_options.json``: the same settings as onnxruntime-qnn provider options plus, per model, the session
  config entries that put every graph into one context binary (``ep.share_ep_contexts``, and
  ``ep.stop_share_ep_contexts`` on the last model), checked by :func:`pyqshare.qnn.ep.check_provider_options`;
- ``commands.json`` (argv arrays) and ``commands.sh``: qnn-onnx-converter and qnn-model-lib-generator per
  model, qnn-context-binary-generator with every model library in one ``--model a.so,b.so``, and the
  qnn-net-run line for the target (``--retrieve_context``, comma-separated ``--input_list``);
- ``inputs/<graph>_input_list.txt`` with the raw files of each model's default evaluation inputs
  (:func:`pyqshare.calibration.default_inputs`), all in one folder because qnn-net-run resolves the lists'
  relative paths from its working folder.

Graph names are the model file names without ``.onnx``, made C identifiers (qnn-onnx-converter names the
graph after its ``--output_path``, which becomes C++ code) and unique. ONNX Runtime names its graphs itself
(``QNNExecutionProvider_QNNExecutionProvider_<hash>_1_0``, measured with onnxruntime-qnn 2.7.0; the session
entry ``ep.context_node_name_prefix`` does not change them): with ORT, a model's graph is the name of the
EPContext node in its ``*_ctx.onnx``.

Every input is checked before anything is written: more than :data:`MAX_GRAPHS` graphs (the device's limit;
the compiler accepts more, ../shared/QNN_NOTES.md), weight sharing on an HTP older than v73 (the note,
section 6), an unknown device, an unknown graph in ``--graphs-order``, and unknown keys or wrongly typed
values in ``--config-overrides`` (``{section: {key: value}}``, sections and types in :data:`OVERRIDE_SCHEMA`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from pyqshare._atomic import atomic_write_text
from pyqshare.calibration import default_inputs, write_input_list
from pyqshare.errors import InputError
from pyqshare.qnn.ep import check_provider_options
from pyqshare.shapes import input_signature, parse_input_shapes

MAX_GRAPHS = 64  # graphs per weight-shared context binary (the note, section 2)
MIN_WEIGHT_SHARING_ARCH = 73  # "Feature enabled for NPU's with Hexagon v73 or later" (the note, section 6)

# Where the device figures come from (the search tool's public corpora, read 2026-11):
_ORT_SOC_TABLE = "onnxruntime/onnxruntime-qnn onnxruntime/core/providers/qnn/soc_utility/soc_table.h (PR #830)"
_EXECUTORCH_TABLE = "pytorch/executorch backends/qualcomm/serialization/qc_schema.py _soc_info_table (vtcm_size_in_mb)"


@dataclass(frozen=True)
class Device:
    """One Snapdragon SoC: what QNN calls it and how much VTCM its HTP has.

    ``vtcm_verified`` is False when no first-party or Qualcomm-maintained source states the VTCM size;
    ``sources`` says where every figure comes from.
    """

    name: str
    product: str
    soc_model: int
    htp_arch: int
    vtcm_mb: int
    vtcm_verified: bool
    sources: str


DEVICES: dict[str, Device] = {device.name: device for device in (
    # Below v73: listed so that weight sharing on it is refused with a reason, not as an unknown device.
    Device("SM8450", "Snapdragon 8 Gen 1", 36, 69, 8, True, f"soc_model, arch: {_ORT_SOC_TABLE}; VTCM: {_EXECUTORCH_TABLE}"),
    Device("SM8550", "Snapdragon 8 Gen 2", 43, 73, 8, True, f"soc_model, arch: {_ORT_SOC_TABLE}; VTCM: {_EXECUTORCH_TABLE}"),
    Device("SM8650", "Snapdragon 8 Gen 3", 57, 75, 8, True, f"soc_model, arch: {_ORT_SOC_TABLE}; VTCM: {_EXECUTORCH_TABLE}"),
    Device("SM8750", "Snapdragon 8 Elite", 69, 79, 8, True, f"soc_model, arch: {_ORT_SOC_TABLE}; VTCM: {_EXECUTORCH_TABLE}"),
    Device("SC8380XP", "Snapdragon X Elite", 60, 73, 8, False,
           f"soc_model, arch: {_ORT_SOC_TABLE}; VTCM UNVERIFIED: absent from the onnxruntime-qnn and ExecuTorch tables; "
           "Qualcomm's weight-sharing note uses vtcm_mb 8 with soc_id 60 / v73 (a value it accepts, not a stated "
           "maximum) and a third-party table (a ggml-qnn fork citing QAIRT 2.31 docs) lists 8 MB"),
)}
DEVICE_ALIASES = {"X1E80100": "SC8380XP", "X-ELITE": "SC8380XP", "X_ELITE": "SC8380XP"}  # X1E80100: renamed part
DEFAULT_DEVICE = "SM8550"

# htp_performance_mode values of the QNN EP; the SDK's perf_profile takes the same names.
PERF_PROFILES = ("burst", "balanced", "default", "high_performance", "high_power_saver", "low_balanced",
                 "extreme_power_saver", "low_power_saver", "power_saver", "sustained_high_performance")

# Presets change only real options. latency is the note's own example (O 3, burst, RPC control latency
# 100 us, 4 HVX threads, fp16 relaxed precision, graph switching with memory_limit_hint 1000) with the
# device's whole VTCM. memory adds the QNN EP's spill-fill buffer sharing (enable_htp_spill_fill_buffer:
# one spill-fill buffer for all graphs of a context instead of one each; onnxruntime PR "Enable QNN HTP
# spill fill buffer setting to save RAM usage"; no field of the note's JSON does this) and votes balanced
# instead of burst. power votes power_saver and no RPC control latency (0: QNN's default; QNN's HTP
# performance guide recommends 0-200 us votes for latency-critical clients only, as they keep the CPU out
# of low-power modes).
PRESETS: dict[str, dict[str, dict[str, object]]] = {
    "latency": {"cores": {"perf_profile": "burst", "rpc_control_latency": 100}},
    "memory": {"cores": {"perf_profile": "balanced", "rpc_control_latency": 100},
               "provider_options": {"enable_htp_spill_fill_buffer": 1}},
    "power": {"cores": {"perf_profile": "power_saver", "rpc_control_latency": 0}},
}

# section -> key -> JSON type, for --config-overrides. "float" accepts integers; bools are never numbers.
OVERRIDE_SCHEMA: dict[str, dict[str, str]] = {
    "backend_extensions": {"shared_library_path": "str"},
    "context_configs": {"is_persistent_binary": "bool", "memory_limit_hint": "int"},
    "graphs": {"vtcm_mb": "int", "O": "float", "fp16_relaxed_precision": "int", "hvx_threads": "int"},
    "devices": {"soc_id": "int", "dsp_arch": "str"},
    "cores": {"core_id": "int", "perf_profile": "str", "rpc_control_latency": "int"},
    "context": {"weight_sharing_enabled": "bool"},
}
_JSON_TYPES = {"str": (str,), "bool": (bool,), "int": (int,), "float": (int, float)}

# Settings of the note's JSON that no QNN EP option carries (../shared/QNN_NOTES.md, last table).
SDK_ONLY_SETTINGS = ("backend_extensions.*", "context_configs.is_persistent_binary",
                     "context_configs.memory_limit_hint", "context_configs.enable_graphs", "graphs.graph_names",
                     "graphs.hvx_threads", "cores.core_id")

SDK_HOST = "x86_64-linux-clang"  # weight-shared context binaries are prepared on x86 Linux only (the note, section 6)
SDK_ROOT = "${QNN_SDK_ROOT}"
COMBINED_BINARY = "context_binary_combined"


def find_device(name: str) -> Device:
    """The :data:`DEVICES` row for a SoC name (``SM8650``) or alias (``X1E80100``), case-insensitive.

    Parameters
    ----------
    name
        The ``--device`` value.
    """
    key = name.strip().upper()
    key = DEVICE_ALIASES.get(key, key)
    if key not in DEVICES:
        known = ", ".join([*(f"{row.name} ({row.product})" for row in DEVICES.values()), *DEVICE_ALIASES])
        raise InputError(f"--device {name!r}: unknown device; known: {known}")
    return DEVICES[key]


def graph_names(models: Sequence[str | os.PathLike[str]]) -> list[str]:
    """One graph name per model: its file name without ``.onnx``, as a unique C identifier.

    Parameters
    ----------
    models
        Model paths, in the order given.
    """
    names: list[str] = []
    for model in models:
        stem = Path(model).name.removesuffix(".onnx")
        name = re.sub(r"[^A-Za-z0-9_]", "_", stem)
        if not name or name[0].isdigit():
            name = f"g_{name}"
        unique, counter = name, 2
        while unique in names:
            unique, counter = f"{name}_{counter}", counter + 1
        names.append(unique)
    return names


def order_graphs(names: Sequence[str], order: Sequence[str] | None) -> list[str]:
    """Execution order: the graphs ``order`` names first, in that order, then the others as given.

    Parameters
    ----------
    names
        Every graph, in model order.
    order
        ``--graphs-order`` split at commas, or None.
    """
    if not order:
        return list(names)
    unknown = [name for name in order if name not in names]
    if unknown:
        raise InputError(f"--graphs-order: {', '.join(map(repr, unknown))} is not among the models' graphs "
                         f"{', '.join(names)}")
    repeated = sorted({name for name in order if list(order).count(name) > 1})
    if repeated:
        raise InputError(f"--graphs-order names {', '.join(map(repr, repeated))} more than once")
    return [*order, *(name for name in names if name not in order)]


def read_overrides(path: str | os.PathLike[str]) -> dict[str, dict[str, object]]:
    """Read and check ``--config-overrides``: a JSON object ``{section: {key: value}}`` (:data:`OVERRIDE_SCHEMA`).

    Parameters
    ----------
    path
        The JSON file.
    """
    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"--config-overrides {path}: not a readable JSON file ({error})") from None
    if not isinstance(document, dict):
        raise InputError(f"--config-overrides {path}: expected a JSON object {{section: {{key: value}}}}")
    for section, values in document.items():
        if section not in OVERRIDE_SCHEMA:
            raise InputError(f"--config-overrides {path}: unknown section {section!r}; known: {', '.join(OVERRIDE_SCHEMA)}")
        if not isinstance(values, dict):
            raise InputError(f"--config-overrides {path}: section {section!r} must be an object of key: value")
        for key, value in values.items():
            expected = OVERRIDE_SCHEMA[section].get(key)
            if expected is None:
                raise InputError(f"--config-overrides {path}: unknown key {section}.{key}; known in {section}: "
                                 f"{', '.join(OVERRIDE_SCHEMA[section])}")
            if isinstance(value, bool) != (expected == "bool") or not isinstance(value, _JSON_TYPES[expected]):
                raise InputError(f"--config-overrides {path}: {section}.{key} must be {expected}, "
                                 f"not {type(value).__name__} {value!r}")
    return document


def htp_settings(
    device: Device, optimize: str = "latency", overrides: Mapping[str, Mapping[str, object]] | None = None
) -> dict[str, dict[str, object]]:
    """The note's settings, by section, for ``device`` and a preset, with overrides applied and checked.

    Parameters
    ----------
    device
        The target SoC (:func:`find_device`).
    optimize
        A :data:`PRESETS` name.
    overrides
        ``{section: {key: value}}`` from :func:`read_overrides`; they win over the device and the preset.
    """
    if optimize not in PRESETS:
        raise InputError(f"--optimize {optimize!r}: choose one of {', '.join(PRESETS)}")
    settings: dict[str, dict[str, object]] = {
        "backend_extensions": {"shared_library_path": f"{_sdk_root()}/lib/{SDK_HOST}/libQnnHtpNetRunExtensions.so"},
        "context_configs": {"is_persistent_binary": True, "memory_limit_hint": 1000},
        "graphs": {"vtcm_mb": device.vtcm_mb, "O": 3.0, "fp16_relaxed_precision": 1, "hvx_threads": 4},
        "devices": {"soc_id": device.soc_model, "dsp_arch": f"v{device.htp_arch}"},
        "cores": {"core_id": 0},
        "context": {"weight_sharing_enabled": True},
        "provider_options": {},
    }
    for layer in (PRESETS[optimize], overrides or {}):
        for section, values in layer.items():
            settings[section].update(values)
    _check_settings(settings, device)
    return settings


def _check_settings(settings: Mapping[str, Mapping[str, object]], device: Device) -> None:
    graphs, devices, cores = settings["graphs"], settings["devices"], settings["cores"]
    match = re.fullmatch(r"v(\d+)", str(devices["dsp_arch"]))
    if not match:
        raise InputError(f"devices.dsp_arch {devices['dsp_arch']!r}: expected v<arch>, e.g. v73")
    arch = int(match.group(1))
    if settings["context"]["weight_sharing_enabled"] and arch < MIN_WEIGHT_SHARING_ARCH:
        raise InputError(f"weight sharing needs HTP v{MIN_WEIGHT_SHARING_ARCH} or later; the target is v{arch} "
                         f"({device.name} {device.product} unless overridden)")
    if not 0 < graphs["vtcm_mb"] <= device.vtcm_mb:
        raise InputError(f"graphs.vtcm_mb {graphs['vtcm_mb']}: {device.name} has {device.vtcm_mb} MB of VTCM")
    if graphs["O"] not in (1, 2, 3):
        raise InputError(f"graphs.O {graphs['O']}: the optimization level is 1, 2 or 3")
    if graphs["fp16_relaxed_precision"] not in (0, 1):
        raise InputError(f"graphs.fp16_relaxed_precision {graphs['fp16_relaxed_precision']}: 0 or 1")
    for section, key in (("graphs", "hvx_threads"), ("devices", "soc_id")):
        if settings[section][key] < 1:
            raise InputError(f"{section}.{key} {settings[section][key]}: must be positive")
    for section, key in (("context_configs", "memory_limit_hint"), ("cores", "core_id"), ("cores", "rpc_control_latency")):
        if settings[section][key] < 0:
            raise InputError(f"{section}.{key} {settings[section][key]}: must not be negative")
    if cores["perf_profile"] not in PERF_PROFILES:
        raise InputError(f"cores.perf_profile {cores['perf_profile']!r}: choose one of {', '.join(PERF_PROFILES)}")


def htp_config_files(
    settings: Mapping[str, Mapping[str, object]], graphs: Sequence[str], config_path: str | os.PathLike[str]
) -> tuple[dict, dict]:
    """``(htp_backend_extensions.json, htp_config.json)`` as the note lays them out.

    Parameters
    ----------
    settings
        From :func:`htp_settings`.
    graphs
        Graph names in execution order.
    config_path
        Where ``htp_config.json`` will be (the note asks for its full path).
    """
    extensions = {
        "backend_extensions": {**settings["backend_extensions"], "config_file_path": os.fspath(config_path)},
        "context_configs": {**settings["context_configs"], "enable_graphs": list(graphs)},
    }
    graph_settings = settings["graphs"]
    config = {
        "graphs": [{"vtcm_mb": graph_settings["vtcm_mb"], "graph_names": list(graphs), "O": float(graph_settings["O"]),
                    "fp16_relaxed_precision": graph_settings["fp16_relaxed_precision"],
                    "hvx_threads": graph_settings["hvx_threads"]}],
        "devices": [{**settings["devices"], "cores": [dict(settings["cores"])]}],
        "context": dict(settings["context"]),
    }
    return extensions, config


def ort_equivalents(
    settings: Mapping[str, Mapping[str, object]], models: Sequence[str | os.PathLike[str]]
) -> tuple[dict[str, str], list[dict[str, str]]]:
    """The QNN EP provider options and, per model in compile order, the session config entries.

    Parameters
    ----------
    settings
        From :func:`htp_settings`.
    models
        The models in the order they are compiled (the last one closes the shared context).
    """
    graphs, devices, cores = settings["graphs"], settings["devices"], settings["cores"]
    options = check_provider_options({
        "vtcm_mb": graphs["vtcm_mb"],
        "htp_graph_finalization_optimization_mode": int(graphs["O"]),
        "enable_htp_fp16_precision": graphs["fp16_relaxed_precision"],
        "soc_model": devices["soc_id"],
        "htp_arch": str(devices["dsp_arch"]).removeprefix("v"),
        "htp_performance_mode": cores["perf_profile"],
        "rpc_control_latency": cores["rpc_control_latency"],
        **settings["provider_options"],
    })
    entries: list[dict[str, str]] = [{} for _ in models]
    if settings["context"]["weight_sharing_enabled"]:
        for entry in entries:
            entry["ep.share_ep_contexts"] = "1"
        entries[-1]["ep.stop_share_ep_contexts"] = "1"
    return options, entries


def sdk_commands(models: Sequence[Path], graphs: Sequence[str], order: Sequence[str]) -> list[dict]:
    """The SDK tool runs, each ``{"step", "where", "cwd", "argv"}``; paths are relative to the output folder.

    Parameters
    ----------
    models
        Model paths (absolute), one per graph.
    graphs
        Graph names, in model order.
    order
        Graph names in execution order.
    """
    tool = f"{SDK_ROOT}/bin/{SDK_HOST}"
    commands = []
    for model, graph in zip(models, graphs, strict=True):
        commands.append({"step": f"convert {graph}", "where": "host", "cwd": ".", "argv": [
            f"{tool}/qnn-onnx-converter", "--input_network", os.fspath(model), "--output_path", f"build/{graph}.cpp"]})
        commands.append({"step": f"model library {graph}", "where": "host", "cwd": ".", "argv": [
            f"{tool}/qnn-model-lib-generator", "-c", f"build/{graph}.cpp", "-b", f"build/{graph}.bin",
            "-o", "build/libs", "-t", SDK_HOST]})
    libraries = ",".join(f"build/libs/{SDK_HOST}/lib{graph}.so" for graph in order)
    commands.append({"step": "weight-shared context binary", "where": "host", "cwd": ".", "argv": [
        f"{tool}/qnn-context-binary-generator", "--model", libraries,
        "--backend", f"{SDK_ROOT}/lib/{SDK_HOST}/libQnnHtp.so", "--config_file", "htp_backend_extensions.json",
        "--binary_file", COMBINED_BINARY, "--output_dir", "context"]})
    # A multi-graph binary does not load on the x86 simulator (../shared/QNN_NOTES.md): this runs on the device,
    # with the target's libQnnHtp.so and an extensions JSON naming the target's libQnnHtpNetRunExtensions.
    commands.append({"step": "run every graph", "where": "target", "cwd": "inputs", "argv": [
        "qnn-net-run", "--retrieve_context", f"../context/{COMBINED_BINARY}.bin", "--backend", "libQnnHtp.so",
        "--input_list", ",".join(f"{graph}_input_list.txt" for graph in order),
        "--config_file", "../htp_backend_extensions.json", "--output_dir", "../output"]})
    return commands


def shell_script(commands: Sequence[Mapping]) -> str:
    """``commands.sh``: the host steps, then the target step as a comment.

    Parameters
    ----------
    commands
        From :func:`sdk_commands`.
    """
    lines = ["#!/bin/sh", "# Written by pyqshare config: QNN SDK steps for one weight-shared context binary.",
             "set -eu", ': "${QNN_SDK_ROOT:?set QNN_SDK_ROOT to the QNN SDK folder}"', 'cd "$(dirname "$0")"',
             "mkdir -p build context"]
    for command in commands:
        words = " ".join(map(_shell_word, command["argv"]))
        line = f"(cd {shlex.quote(command['cwd'])} && {words})" if command["cwd"] != "." else words
        if command["where"] == "target":
            lines.append("# On the target, with context/, inputs/ and the JSON files pushed:")
            line = f"# {line}"
        lines.append(f"# {command['step']}")
        lines.append(line)
    return "\n".join(lines) + "\n"


def _shell_word(word: str) -> str:
    """Quote a word, leaving a leading ``${QNN_SDK_ROOT}`` for the shell to expand."""
    if word.startswith(SDK_ROOT):
        return f'"{SDK_ROOT}"{shlex.quote(word.removeprefix(SDK_ROOT))}'
    return shlex.quote(word)


def _sdk_root() -> str:
    return os.environ.get("QNN_SDK_ROOT") or SDK_ROOT


def write_config(
    models: Sequence[str | os.PathLike[str]],
    output_dir: str | os.PathLike[str],
    *,
    device: str = DEFAULT_DEVICE,
    optimize: str = "latency",
    graphs_order: Sequence[str] | None = None,
    overrides: Mapping[str, Mapping[str, object]] | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
) -> dict:
    """Write the QNN configs, ORT options, SDK command lines and input lists for a family (module docstring).

    Everything is checked and every sample computed before the first file is written; each file is written
    atomically.

    Parameters
    ----------
    models
        ONNX models, one graph each (1 to :data:`MAX_GRAPHS`).
    output_dir
        The folder to write into (created if needed).
    device
        A :data:`DEVICES` name or alias.
    optimize
        A :data:`PRESETS` name.
    graphs_order
        Graph names to execute first, in this order; the others follow in model order.
    overrides
        ``{section: {key: value}}`` (:func:`read_overrides`).
    input_shapes
        ``{input name: shape}`` for dynamic dims of the models that have that input.

    Returns
    -------
    dict
        The report: files written, graphs in execution order, provider options, session entries, commands.
    """
    if not models:
        raise InputError("config needs at least one model")
    if len(models) > MAX_GRAPHS:
        raise InputError(f"{len(models)} models: one context binary holds at most {MAX_GRAPHS} graphs")
    paths = [Path(model).absolute() for model in models]  # not resolve(): a symlink's own name names its graph
    for model, path in zip(models, paths, strict=True):
        if not path.is_file():
            raise InputError(f"{model}: no such model file")
    target = find_device(device)
    settings = htp_settings(target, optimize, overrides)
    names = graph_names(paths)
    order = order_graphs(names, graphs_order)
    model_of = dict(zip(names, paths, strict=True))
    samples = _evaluation_inputs(paths, names, input_shapes or {})

    folder = Path(output_dir).resolve()
    extensions, htp_config = htp_config_files(settings, order, folder / "htp_config.json")
    provider_options, entries = ort_equivalents(settings, [model_of[graph] for graph in order])
    sessions = [{"model": os.fspath(model_of[graph]), "graph": graph, "config_entries": entry}
                for graph, entry in zip(order, entries, strict=True)]
    commands = sdk_commands(paths, names, order)
    ort_options = {"provider_options": provider_options, "sessions": sessions, "sdk_only": list(SDK_ONLY_SETTINGS)}

    written = [write_input_list(samples[graph], folder / "inputs", list_name=f"{graph}_input_list.txt",
                                file_prefix=f"{graph}_") for graph in order]
    documents = {"htp_config.json": htp_config, "htp_backend_extensions.json": extensions,
                 "ort_options.json": ort_options, "commands.json": commands}
    for name, document in documents.items():
        atomic_write_text(folder / name, json.dumps(document, indent=2) + "\n")
    atomic_write_text(folder / "commands.sh", shell_script(commands))
    (folder / "commands.sh").chmod(0o755)
    raw_files = [f"inputs/{entry.partition(':=')[2]}" for path in written
                 for entry in path.read_text(encoding="utf-8").split()]
    return {
        "models": [os.fspath(model) for model in models],
        "output_dir": os.fspath(folder),
        "device": asdict(target),
        "optimize": optimize,
        "graphs": order,
        "graph_of_model": {os.fspath(model): name for model, name in zip(models, names, strict=True)},
        "files": [*documents, "commands.sh", *(f"inputs/{path.name}" for path in written), *raw_files],
        "input_lists": {graph: os.fspath(path.relative_to(folder)) for graph, path in zip(order, written, strict=True)},
        "provider_options": provider_options,
        "sessions": sessions,
        "commands": commands,
    }


def _evaluation_inputs(paths: Sequence[Path], names: Sequence[str], input_shapes: Mapping[str, Sequence[int]]) -> dict:
    """``{graph: samples}``: each model's default evaluation inputs, with the shapes of the inputs it has."""
    inputs = {path: {spec.name for spec in input_signature(path)} for path in paths}
    unused = set(input_shapes) - set().union(*inputs.values())
    if unused:
        raise InputError(f"--input-shape: no model has an input {sorted(unused)[0]!r}")
    return {name: default_inputs(path, purpose="evaluation",
                                 input_shapes={key: shape for key, shape in input_shapes.items() if key in inputs[path]})
            for path, name in zip(paths, names, strict=True)}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("models", nargs="+", metavar="MODEL", help="ONNX models, one graph each (at most 64)")
    parser.add_argument("--output-dir", required=True, help="folder for the configs, command lines and input lists")
    parser.add_argument("--device", default=DEFAULT_DEVICE,
                        help=f"target SoC: {', '.join(DEVICES)} (or X1E80100); default {DEFAULT_DEVICE}")
    parser.add_argument("--optimize", choices=tuple(PRESETS), default="latency",
                        help="preset: latency (the note's settings), memory (shared spill-fill buffer), power "
                             "(power_saver, no RPC latency vote)")
    parser.add_argument("--graphs-order", metavar="A,B,...",
                        help="graph names in execution order (graphs not named follow in model order)")
    parser.add_argument("--config-overrides", metavar="FILE",
                        help="JSON {section: {key: value}} overriding the note's fields, e.g. "
                             '{"graphs": {"vtcm_mb": 4}}')
    parser.add_argument("--input-shape", action="append", default=[], metavar="NAME=D1,D2,...",
                        help="static shape of one input for the input lists (repeat per input); defaults: batch 1, "
                             "sequence 128")


def run(args: argparse.Namespace) -> dict:
    order = None
    if args.graphs_order is not None:
        order = [name.strip() for name in args.graphs_order.split(",")]
        if not all(order):
            raise InputError(f"--graphs-order {args.graphs_order!r}: empty graph name")
    return write_config(
        args.models, args.output_dir, device=args.device, optimize=args.optimize, graphs_order=order,
        overrides=read_overrides(args.config_overrides) if args.config_overrides else None,
        input_shapes=parse_input_shapes(args.input_shape),
    )
