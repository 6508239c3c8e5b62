"""Sessions on the QNN HTP execution provider (a plugin EP in onnxruntime >= 1.23).

Two traps the EP sets, handled here: unknown provider-option keys are silently ignored (so keys are validated
against the documented list), and a session whose EP cannot be created silently runs on the CPU (so
``session.disable_cpu_ep_fallback`` is on by default when proof that QNN ran matters).
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import os
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import onnxruntime as ort

from pyqshare.errors import InputError

EP_NAME = "QNNExecutionProvider"

# Provider options of the QNN EP that pyqshare passes through (the EP ignores misspelt keys silently).
KNOWN_PROVIDER_OPTIONS = frozenset({
    "backend_path", "backend_type", "profiling_level", "profiling_file_path", "rpc_control_latency",
    "vtcm_mb", "htp_performance_mode", "qnn_saver_path", "qnn_context_priority",
    "htp_graph_finalization_optimization_mode", "soc_model", "htp_arch", "device_id",
    "enable_htp_fp16_precision", "offload_graph_io_quantization", "enable_htp_spill_fill_buffer",
    "enable_htp_shared_memory_allocator", "dump_json_qnn_graph", "json_qnn_graph_dir", "op_packages",
    "skip_qnn_version_check", "htp_bf16_enable", "enable_vtcm_backup_buffer_sharing",
})

# Snapdragon 8 Gen 2 (SM8550): soc_model 43, HTP v73. The x86 simulator needs soc_model for fp16 graphs.
# offload_graph_io_quantization=0: the HTP also runs the graph's input Q and output DQ nodes; by default the
# EP leaves them to the CPU provider, so a fully quantized model would never run with CPU fallback disabled.
DEFAULT_HTP_OPTIONS: dict[str, str] = {"soc_model": "43", "htp_arch": "73", "offload_graph_io_quantization": "0"}

_registered = False


class QnnUnavailableError(RuntimeError):
    """onnxruntime-qnn is not installed (``pip install "pyqshare[qnn]"``)."""


def qnn_available() -> bool:
    return importlib.util.find_spec("onnxruntime_qnn") is not None


def _qnn_module():
    if not qnn_available():
        raise QnnUnavailableError('the QNN HTP backend needs onnxruntime-qnn: pip install "pyqshare[qnn]"')
    import onnxruntime_qnn

    return onnxruntime_qnn


def _ep_devices() -> list:
    global _registered
    qnn = _qnn_module()
    if not _registered:
        ort.register_execution_provider_library(EP_NAME, qnn.get_library_path())
        _registered = True
    return [device for device in ort.get_ep_devices() if device.ep_name == EP_NAME]


@contextlib.contextmanager
def native_stdout_to_stderr() -> Iterator[None]:
    """Send file descriptor 1 to stderr: the QNN libraries print to it ("# LIBNATIVE: ..."), and with --json
    stdout must hold the report alone. libc's buffers are flushed before fd 1 comes back, or a pipe's buffered
    text would reach stdout at exit."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        sys.stdout.flush()
        ctypes.CDLL(None).fflush(None)
        os.dup2(saved, 1)
        os.close(saved)


def child_process_env() -> dict[str, str]:
    """This process's environment with this pyqshare's folder first on PYTHONPATH, for ``python -P`` children
    (compiles, probes) that must import the same package from any working folder."""
    env = dict(os.environ)
    package_root = os.fspath(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    return env


def check_provider_options(options: Mapping[str, object]) -> dict[str, str]:
    """``options`` with every key checked against :data:`KNOWN_PROVIDER_OPTIONS` and values as strings.

    Needs no onnxruntime-qnn, so configurations for another machine can be validated here.

    Parameters
    ----------
    options
        QNN EP provider options, ``{key: value}``.
    """
    for key in options:
        if key not in KNOWN_PROVIDER_OPTIONS:
            raise InputError(f"unknown QNN provider option {key!r}; known: {', '.join(sorted(KNOWN_PROVIDER_OPTIONS))}")
    return {key: str(value) for key, value in options.items()}


def htp_provider_options(options: Mapping[str, object] | None = None) -> dict[str, str]:
    """The HTP backend path and defaults, overridden by ``options`` (every key checked, values as strings)."""
    return {"backend_path": _qnn_module().get_qnn_htp_path(), **DEFAULT_HTP_OPTIONS,
            **check_provider_options(options or {})}


def htp_session_options(
    provider_options: Mapping[str, object] | None = None,
    *,
    disable_cpu_fallback: bool = True,
    config_entries: Mapping[str, str] | None = None,
    log_severity: int | None = None,
) -> ort.SessionOptions:
    """SessionOptions that put the QNN HTP EP first; with ``disable_cpu_fallback`` a node QNN rejects is an error."""
    devices = _ep_devices()
    if not devices:
        raise QnnUnavailableError("onnxruntime-qnn is installed but exposes no QNN device")
    session_options = ort.SessionOptions()
    session_options.add_provider_for_devices(devices, htp_provider_options(provider_options))
    if disable_cpu_fallback:
        session_options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    for key, value in (config_entries or {}).items():
        session_options.add_session_config_entry(key, value)
    if log_severity is not None:
        session_options.log_severity_level = log_severity
    return session_options


def create_htp_session(
    model: str | os.PathLike[str] | bytes,
    provider_options: Mapping[str, object] | None = None,
    *,
    disable_cpu_fallback: bool = True,
    config_entries: Mapping[str, str] | None = None,
) -> ort.InferenceSession:
    """An InferenceSession on the QNN HTP backend (the x86-64 simulator here, the NPU on a device)."""
    session_options = htp_session_options(
        provider_options, disable_cpu_fallback=disable_cpu_fallback, config_entries=config_entries
    )
    with native_stdout_to_stderr():
        return ort.InferenceSession(os.fspath(model) if not isinstance(model, bytes) else model, session_options)
