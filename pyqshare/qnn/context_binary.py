"""What a QNN context binary holds: graphs, their inputs and outputs, and the HTP's per-graph memory sizes.

:func:`inspect_context_binary` asks ``libQnnSystem.so`` (shipped in the onnxruntime-qnn wheel) through its
system interface (``QnnSystemInterface_getProviders`` -> ``systemContextCreate`` ->
``systemContextGetMetaData`` -> ``systemContextFree``). There are no QNN headers here, so the C structs are
declared below with ctypes, which lays them out by the platform C ABI exactly as a compiler would; the
field lists follow Qualcomm's public headers (System/QnnSystemInterface.h, System/QnnSystemContext.h,
QnnTypes.h, HTP/QnnHtpSystemContext.h, QAIRT 2.x). Every versioned struct is read through its version field
first, and versions this module does not know are refused, never guessed.

Layouts (x86-64 / aarch64, LP64; offsets in bytes):

* ``QnnSystemInterface_t``: backendId u32 @0, providerName char* @8, systemApiVersion {u32 major, minor,
  patch} @16, then the function table @32: systemContextCreate @32, systemContextGetBinaryInfo @40,
  systemContextGetMetaData @48, systemContextFree @56 (only these four are used).
* ``QnnSystemContext_BinaryInfo_t`` (144 B): version u32 @0, union @8. V3: backendId u32 @+0, buildId
  char* @+8, coreApiVersion @+16, backendApiVersion @+28, socVersion char* @+40, contextBlobVersion @+48,
  contextBlobSize u64 @+64, numContextTensors u32 @+72, contextTensors @+80, numGraphs u32 @+88, graphs
  @+96, platformInfo @+104, contextMetadataSize u32 @+112, contextMetadata @+120, socModel u32 @+128.
  V1 and V2 carry hwInfoBlobVersion @+48 and hwInfoBlobSize/hwInfoBlob before contextBlobSize @+88, so
  numGraphs @+112 and graphs @+120.
* ``QnnSystemContext_GraphInfo_t`` (88 B, the array stride): version u32 @0, union @8. V1: graphName @+0,
  numGraphInputs u32 @+8, graphInputs @+16, numGraphOutputs u32 @+24, graphOutputs @+32; V2 adds
  numUpdateableTensors @+40, updateableTensors @+48; V3 adds graphBlobInfoSize u32 @+56, graphBlobInfo @+64,
  startOpIndex @+72, endOpIndex @+76.
* ``Qnn_Tensor_t`` (144 B, the array stride; V2 is the larger member): version u32 @0, union @8. V1 and V2
  share the leading fields used here: id u32 @+0, name char* @+8, type u32 @+16, dataFormat @+20,
  dataType @+24, quantizeParams (40 B) @+32, rank u32 @+72, dimensions u32* @+80.
* The HTP graph blob (``graphBlobInfo``, 112 B as written by QAIRT 2.51) is a sequence of records, each
  starting with its u32 version: record 1 is ``QnnHtpSystemContext_GraphBlobInfo_t`` V1 (40 B:
  spillFillBufferSize u64 @8, vtcmSize u32 @16, optimizationLevel u32 @20, htpDlbc u8 @24, numHvxThreads
  u64 @32); record 2 is ``QnnHtpSystemContext_GraphBlobInfoV2_t`` (72 B: nativeKChannelSize u64 @8,
  nativeVChannelSize u64 @16, isSafeShareIO u32 @24, ioTensorSize u64 @32, opDataSize u64 @40, constSize
  u64 @48, ddrTensorSize u64 @56, sharedWeightsSize u64 @64). The sizes reported come from record 2.

How they were checked (tests/test_share_compile.py repeats the checks): compiled binaries give the graph
names onnxruntime wrote into the EPContext nodes, the input and output names, shapes and float32 type of
the ONNX models, a solo binary's constSize within a page of its weights' bytes and sharedWeightsSize 0,
and a weight-shared binary's sharedWeightsSize within 1% of the bytes of the weights shared; truncated or
random files give QNN_SYSTEM_CONTEXT_ERROR_MALFORMED_BINARY (30010).

The native call runs in a child process (``python -P -c ...``), so a crash inside the library on a hostile
file cannot take the caller down: it becomes an :class:`~pyqshare.errors.InputError`.
:func:`graph_names_from_records` is a cheap pure-Python cross-check: the binary's record table, right after
its 4,096-byte header, names each graph's serialized program ``PICKLE/<index>/<graph name>``.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import mmap
import os
import re
import signal
import struct
import subprocess
import sys
from pathlib import Path

from pyqshare.errors import InputError
from pyqshare.qnn.ep import QnnUnavailableError, _qnn_module, child_process_env, native_stdout_to_stderr

HEADER_BYTES = 4096
"""A context binary starts with a header of this size (its record table follows)."""

MALFORMED_BINARY = 30010
"""QNN_SYSTEM_CONTEXT_ERROR_MALFORMED_BINARY (QNN_MIN_ERROR_SYSTEM 30000 + 10): truncated or not a binary."""

_QNN_ERRORS = {
    30001: "invalid handle or empty buffer", 30002: "unsupported feature", 30003: "invalid argument",
    30004: "operation failed", MALFORMED_BINARY: "malformed context binary",
}

# Qnn_DataType_t -> name (QnnTypes.h).
DATA_TYPES = {
    0x0008: "int8", 0x0016: "int16", 0x0032: "int32", 0x0064: "int64",
    0x0108: "uint8", 0x0116: "uint16", 0x0132: "uint32", 0x0164: "uint64",
    0x0216: "float16", 0x0226: "bfloat16", 0x0232: "float32", 0x0264: "float64",
    0x0304: "sfixed_point4", 0x0308: "sfixed_point8", 0x0316: "sfixed_point16", 0x0332: "sfixed_point32",
    0x0404: "ufixed_point4", 0x0408: "ufixed_point8", 0x0416: "ufixed_point16", 0x0432: "ufixed_point32",
    0x0508: "bool8", 0x0608: "string",
}

_CHILD = "from pyqshare.qnn.context_binary import _child_main; _child_main()"
_RECORD = re.compile(rb"PICKLE/(\d+)/([\x21-\x7e]{1,1024})\x00")


# --------------------------------------------------------------------------------------------- C structures


class _Version(ctypes.Structure):
    _fields_ = [("major", ctypes.c_uint32), ("minor", ctypes.c_uint32), ("patch", ctypes.c_uint32)]


class _SystemFunctions(ctypes.Structure):
    _fields_ = [("context_create", ctypes.c_void_p), ("context_get_binary_info", ctypes.c_void_p),
                ("context_get_metadata", ctypes.c_void_p), ("context_free", ctypes.c_void_p)]


class _SystemInterface(ctypes.Structure):
    _fields_ = [("backend_id", ctypes.c_uint32), ("provider_name", ctypes.c_char_p),
                ("system_api_version", _Version), ("functions", _SystemFunctions)]


class _BwAxisScaleOffset(ctypes.Structure):  # the largest member of the quantize-params union (32 B)
    _fields_ = [("bitwidth", ctypes.c_uint32), ("axis", ctypes.c_int32), ("num_elements", ctypes.c_uint32),
                ("scales", ctypes.c_void_p), ("offsets", ctypes.c_void_p)]


class _QuantizeParams(ctypes.Structure):
    _fields_ = [("encoding_definition", ctypes.c_uint32), ("quantization_encoding", ctypes.c_uint32),
                ("encoding", _BwAxisScaleOffset)]


class _ClientBuffer(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("data_size", ctypes.c_uint32)]


class _SparseParams(ctypes.Structure):
    _fields_ = [("type", ctypes.c_uint32), ("num_specified_elements", ctypes.c_uint32),
                ("num_sparse_dimensions", ctypes.c_uint32)]


class _TensorV2(ctypes.Structure):  # V1 is the prefix up to client_buffer
    _fields_ = [("id", ctypes.c_uint32), ("name", ctypes.c_char_p), ("type", ctypes.c_uint32),
                ("data_format", ctypes.c_uint32), ("data_type", ctypes.c_uint32), ("quantize_params", _QuantizeParams),
                ("rank", ctypes.c_uint32), ("dimensions", ctypes.POINTER(ctypes.c_uint32)),
                ("mem_type", ctypes.c_uint32), ("client_buffer", _ClientBuffer),
                ("is_dynamic_dimensions", ctypes.c_void_p), ("sparse_params", _SparseParams),
                ("is_produced", ctypes.c_uint8)]


class _Tensor(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("v", _TensorV2)]


class _GraphInfoV3(ctypes.Structure):  # V1 is the prefix up to graph_outputs, V2 up to updateable_tensors
    _fields_ = [("graph_name", ctypes.c_char_p), ("num_graph_inputs", ctypes.c_uint32),
                ("graph_inputs", ctypes.POINTER(_Tensor)), ("num_graph_outputs", ctypes.c_uint32),
                ("graph_outputs", ctypes.POINTER(_Tensor)), ("num_updateable_tensors", ctypes.c_uint32),
                ("updateable_tensors", ctypes.c_void_p), ("graph_blob_info_size", ctypes.c_uint32),
                ("graph_blob_info", ctypes.c_void_p), ("start_op_index", ctypes.c_uint32),
                ("end_op_index", ctypes.c_uint32)]


class _GraphInfo(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("v", _GraphInfoV3)]


class _BinaryInfoV1(ctypes.Structure):  # V2 appends platform_info
    _fields_ = [("backend_id", ctypes.c_uint32), ("build_id", ctypes.c_char_p), ("core_api_version", _Version),
                ("backend_api_version", _Version), ("soc_version", ctypes.c_char_p),
                ("hw_info_blob_version", _Version), ("context_blob_version", _Version),
                ("hw_info_blob_size", ctypes.c_uint32), ("hw_info_blob", ctypes.c_void_p),
                ("context_blob_size", ctypes.c_uint64), ("num_context_tensors", ctypes.c_uint32),
                ("context_tensors", ctypes.c_void_p), ("num_graphs", ctypes.c_uint32),
                ("graphs", ctypes.POINTER(_GraphInfo)), ("platform_info", ctypes.c_void_p)]


class _BinaryInfoV3(ctypes.Structure):
    _fields_ = [("backend_id", ctypes.c_uint32), ("build_id", ctypes.c_char_p), ("core_api_version", _Version),
                ("backend_api_version", _Version), ("soc_version", ctypes.c_char_p),
                ("context_blob_version", _Version), ("context_blob_size", ctypes.c_uint64),
                ("num_context_tensors", ctypes.c_uint32), ("context_tensors", ctypes.c_void_p),
                ("num_graphs", ctypes.c_uint32), ("graphs", ctypes.POINTER(_GraphInfo)),
                ("platform_info", ctypes.c_void_p), ("context_metadata_size", ctypes.c_uint32),
                ("context_metadata", ctypes.c_void_p), ("soc_model", ctypes.c_uint32)]


class _BinaryInfoUnion(ctypes.Union):
    _fields_ = [("v1", _BinaryInfoV1), ("v3", _BinaryInfoV3)]


class _BinaryInfo(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("v", _BinaryInfoUnion)]


_ERROR = ctypes.c_uint64  # Qnn_ErrorHandle_t
_CreateFn = ctypes.CFUNCTYPE(_ERROR, ctypes.POINTER(ctypes.c_void_p))
_GetMetadataFn = ctypes.CFUNCTYPE(_ERROR, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint64,
                                  ctypes.POINTER(ctypes.POINTER(_BinaryInfo)))
_FreeFn = ctypes.CFUNCTYPE(_ERROR, ctypes.c_void_p)

# HTP graph blob records: version -> (struct format after the version, size in bytes).
_BLOB_V1 = struct.Struct("<I4xQIIB7xQ")
_BLOB_V2 = struct.Struct("<I4xQQI4xQQQQQ")


# ------------------------------------------------------------------------------------------------- results


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """A graph input or output as the binary declares it.

    Attributes
    ----------
    name : str
        The tensor name (the ONNX input/output name for onnxruntime-made binaries).
    data_type : str
        The QNN data type (``float32``, ``ufixed_point8``, ...; ``0x...`` if unknown).
    shape : tuple[int, ...]
        Dimensions.
    """

    name: str
    data_type: str
    shape: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class GraphMemory:
    """The HTP's memory plan for one graph (QnnHtpSystemContext_GraphBlobInfoV2_t), in bytes.

    Attributes
    ----------
    const_bytes : int
        Constant data owned by this graph alone (its unshared weights).
    shared_weights_bytes : int
        The context's shared-weights pool (every graph of a context reports the same pool).
    op_data_bytes : int
        Op metadata such as run lists.
    io_tensor_bytes : int
        Graph input and output tensors.
    ddr_tensor_bytes : int
        Tensors kept in DDR.
    spill_fill_bytes : int
        The spill-fill buffer (from the V1 record).
    """

    const_bytes: int
    shared_weights_bytes: int
    op_data_bytes: int
    io_tensor_bytes: int
    ddr_tensor_bytes: int
    spill_fill_bytes: int


@dataclasses.dataclass(frozen=True)
class GraphInfo:
    """One graph of a context binary.

    Attributes
    ----------
    name : str
        The graph name (for onnxruntime: the EPContext node's name).
    inputs, outputs : tuple[TensorInfo, ...]
        Graph inputs and outputs.
    memory : GraphMemory or None
        The HTP memory plan; None when the binary carries no HTP graph blob (non-HTP or older binaries).
    """

    name: str
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    memory: GraphMemory | None


@dataclasses.dataclass(frozen=True)
class ContextBinaryInfo:
    """What :func:`inspect_context_binary` reports about one context binary.

    Attributes
    ----------
    path : str
        The file.
    file_bytes : int
        Its size on disk.
    build_id : str
        The QNN SDK build that wrote it (e.g. ``v2.51.0.260929181845``).
    soc_model : int or None
        The SoC model it was prepared for (binary info V3 only).
    context_blob_bytes : int
        The size of the backend's opaque context blob.
    graphs : tuple[GraphInfo, ...]
        Its graphs, in the binary's order.
    """

    path: str
    file_bytes: int
    build_id: str
    soc_model: int | None
    context_blob_bytes: int
    graphs: tuple[GraphInfo, ...]

    @property
    def graph_names(self) -> list[str]:
        """The graph names, in order."""
        return [graph.name for graph in self.graphs]

    @property
    def shared_weights_bytes(self) -> int:
        """The context's shared-weights pool (one per context: the largest any graph reports, 0 if none)."""
        return max((graph.memory.shared_weights_bytes for graph in self.graphs if graph.memory), default=0)

    @property
    def const_bytes(self) -> int:
        """Constant bytes owned by single graphs, summed over graphs."""
        return sum(graph.memory.const_bytes for graph in self.graphs if graph.memory)

    def to_dict(self) -> dict:
        """The JSON form, with ``shared_weights_bytes`` and ``const_bytes`` added."""
        return {**dataclasses.asdict(self), "shared_weights_bytes": self.shared_weights_bytes,
                "const_bytes": self.const_bytes}

    @classmethod
    def from_dict(cls, data: dict) -> ContextBinaryInfo:
        """The inverse of :meth:`to_dict` (extra keys ignored).

        Parameters
        ----------
        data : dict
            A dict as written by :meth:`to_dict`.
        """
        graphs = tuple(
            GraphInfo(
                name=graph["name"],
                inputs=tuple(TensorInfo(t["name"], t["data_type"], tuple(t["shape"])) for t in graph["inputs"]),
                outputs=tuple(TensorInfo(t["name"], t["data_type"], tuple(t["shape"])) for t in graph["outputs"]),
                memory=GraphMemory(**graph["memory"]) if graph["memory"] is not None else None,
            )
            for graph in data["graphs"]
        )
        return cls(data["path"], data["file_bytes"], data["build_id"], data["soc_model"],
                   data["context_blob_bytes"], graphs)


# ------------------------------------------------------------------------------------------- the inspection


def system_library_path() -> Path:
    """``libQnnSystem.so`` of the installed onnxruntime-qnn wheel (beside its HTP backend)."""
    path = Path(_qnn_module().get_qnn_htp_path()).with_name("libQnnSystem.so")
    if not path.is_file():
        raise QnnUnavailableError(f"onnxruntime-qnn ships no libQnnSystem.so at {path}")
    return path


def _checked_file(path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such context binary")
    size = path.stat().st_size
    if size <= HEADER_BYTES:
        raise InputError(f"{path}: {size} bytes is too short for a QNN context binary (its header alone is {HEADER_BYTES})")
    return path


def inspect_context_binary(path: str | os.PathLike[str], *, timeout: float = 300.0) -> ContextBinaryInfo:
    """Read a context binary's graphs and HTP memory sizes through libQnnSystem, in a child process.

    Parameters
    ----------
    path : str or os.PathLike
        A QNN context binary (``*_qnn.bin`` from onnxruntime, or qnn-context-binary-generator's output).
    timeout : float
        Seconds before the child is stopped (the library maps the file and parses its metadata; it takes
        well under a second for binaries of gigabytes).

    Returns
    -------
    ContextBinaryInfo
        Graph names, inputs, outputs and per-graph memory plan.

    Raises
    ------
    InputError
        The file is missing, too short, malformed (QNN error 30010) or crashes the library.
    QnnUnavailableError
        onnxruntime-qnn (and so libQnnSystem) is not installed.
    """
    path = _checked_file(path)
    library = system_library_path()
    try:
        done = subprocess.run([sys.executable, "-P", "-c", _CHILD, str(library), str(path)], env=child_process_env(),
                              stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"libQnnSystem did not finish reading {path} within {timeout:g} s") from None
    if done.returncode < 0:
        name = signal.Signals(-done.returncode).name
        raise InputError(f"{path}: libQnnSystem crashed reading it ({name}): not a context binary this QNN can read")
    try:
        report = json.loads(done.stdout)
    except json.JSONDecodeError:
        stderr = done.stderr.decode(errors="replace").strip().splitlines()
        raise RuntimeError(f"inspecting {path} failed (exit {done.returncode}): {stderr[-1] if stderr else ''}") from None
    if "error" in report:
        if report.get("input_error"):
            raise InputError(f"{path}: {report['error']}")
        raise RuntimeError(f"inspecting {path} failed: {report['error']}")
    return ContextBinaryInfo.from_dict(report)


def _child_main() -> None:
    """Child process: ``python -P -c _CHILD LIBRARY PATH`` prints one JSON object on stdout."""
    library, path = sys.argv[1], sys.argv[2]
    out = sys.stdout
    with native_stdout_to_stderr():  # the QNN libraries print to fd 1
        try:
            report = _read_binary(library, path)
        except _QnnError as error:
            report = {"error": str(error), "input_error": error.input_error}
    json.dump(report, out)
    out.flush()


class _QnnError(Exception):
    def __init__(self, message: str, *, input_error: bool) -> None:
        super().__init__(message)
        self.input_error = input_error


def _read_binary(library: str, path: str) -> dict:
    interface = _system_interface(ctypes.CDLL(library))
    functions = interface.functions
    if not (functions.context_create and functions.context_get_metadata and functions.context_free):
        raise _QnnError("libQnnSystem offers no context metadata functions", input_error=False)
    handle = ctypes.c_void_p()
    status = _CreateFn(functions.context_create)(ctypes.byref(handle))
    if status:
        raise _QnnError(f"systemContextCreate failed with QNN error {status}", input_error=False)
    try:
        with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY) as mapped:
            anchor = ctypes.c_char.from_buffer(mapped)  # copy-on-write pages: no copy unless written
            try:
                info = ctypes.POINTER(_BinaryInfo)()
                status = _GetMetadataFn(functions.context_get_metadata)(
                    handle, ctypes.addressof(anchor), len(mapped), ctypes.byref(info))
                if status:
                    reason = _QNN_ERRORS.get(status, "unknown error")
                    raise _QnnError(f"libQnnSystem refused it: QNN error {status} ({reason})",
                                    input_error=status in (MALFORMED_BINARY, 30001, 30003))
                return _binary_report(info.contents, path)
            finally:
                del anchor  # release the exported buffer before the map closes
    finally:
        _FreeFn(functions.context_free)(handle)


def _system_interface(library: ctypes.CDLL) -> _SystemInterface:
    get_providers = library.QnnSystemInterface_getProviders
    get_providers.restype = _ERROR
    providers = ctypes.POINTER(ctypes.POINTER(_SystemInterface))()
    count = ctypes.c_uint32()
    status = get_providers(ctypes.byref(providers), ctypes.byref(count))
    if status or not count.value:
        raise _QnnError(f"QnnSystemInterface_getProviders failed (QNN error {status}, {count.value} providers)",
                        input_error=False)
    interface = providers[0].contents
    if interface.system_api_version.major != 1:  # the layout above is system API 1.x
        version = interface.system_api_version
        raise _QnnError(f"unsupported QNN system API {version.major}.{version.minor}", input_error=False)
    return interface


def _text(value: bytes | None) -> str:
    return value.decode("utf-8", errors="replace") if value else ""


def _binary_report(info: _BinaryInfo, path: str) -> dict:
    if info.version == 3:
        body = info.v.v3
        soc_model: int | None = body.soc_model
    elif info.version in (1, 2):
        body, soc_model = info.v.v1, None
    else:
        raise _QnnError(f"unsupported context binary info version {info.version}", input_error=True)
    graphs = [_graph_report(body.graphs[index]) for index in range(body.num_graphs)]
    report = ContextBinaryInfo(path=path, file_bytes=os.path.getsize(path), build_id=_text(body.build_id),
                               soc_model=soc_model, context_blob_bytes=body.context_blob_size, graphs=tuple(graphs))
    return report.to_dict()


def _graph_report(graph: _GraphInfo) -> GraphInfo:
    if graph.version not in (1, 2, 3):
        raise _QnnError(f"unsupported graph info version {graph.version}", input_error=True)
    body = graph.v
    memory = None
    if graph.version == 3 and body.graph_blob_info and body.graph_blob_info_size:
        memory = parse_graph_blob(ctypes.string_at(body.graph_blob_info, body.graph_blob_info_size))
    return GraphInfo(
        name=_text(body.graph_name),
        inputs=tuple(_tensor(body.graph_inputs[i]) for i in range(body.num_graph_inputs)),
        outputs=tuple(_tensor(body.graph_outputs[i]) for i in range(body.num_graph_outputs)),
        memory=memory,
    )


def _tensor(tensor: _Tensor) -> TensorInfo:
    if tensor.version not in (1, 2):
        raise _QnnError(f"unsupported tensor version {tensor.version}", input_error=True)
    body = tensor.v
    shape = tuple(body.dimensions[i] for i in range(body.rank)) if body.dimensions else ()
    return TensorInfo(_text(body.name), DATA_TYPES.get(body.data_type, hex(body.data_type)), shape)


def parse_graph_blob(blob: bytes) -> GraphMemory | None:
    """The HTP memory plan from a graph's backend blob (module docstring), or None without a V2 record.

    Parameters
    ----------
    blob : bytes
        ``graphBlobInfo`` of a V3 graph info, ``graphBlobInfoSize`` bytes.
    """
    spill_fill = 0
    offset = 0
    while offset + 4 <= len(blob):
        (version,) = struct.unpack_from("<I", blob, offset)
        record = {1: _BLOB_V1, 2: _BLOB_V2}.get(version)
        if record is None or offset + record.size > len(blob):
            return None
        fields = record.unpack_from(blob, offset)
        if version == 1:
            spill_fill = fields[1]
        else:
            _, _, _, _, io_tensor, op_data, const, ddr_tensor, shared_weights = fields
            return GraphMemory(const_bytes=const, shared_weights_bytes=shared_weights, op_data_bytes=op_data,
                               io_tensor_bytes=io_tensor, ddr_tensor_bytes=ddr_tensor, spill_fill_bytes=spill_fill)
        offset += record.size
    return None


# --------------------------------------------------------------------------------- pure-Python cross-check


def graph_names_from_records(path: str | os.PathLike[str], *, scan_bytes: int = 1 << 20) -> list[str]:
    """Graph names read from the binary's record table, without QNN (a cross-check of the inspection).

    The table follows the 4,096-byte header and names each graph's program ``PICKLE/<index>/<name>``; only
    the first ``scan_bytes`` of the file are read.

    Parameters
    ----------
    path : str or os.PathLike
        A QNN context binary.
    scan_bytes : int
        How much of the file to read (the table of 64 graphs takes a few KiB).

    Returns
    -------
    list[str]
        Graph names ordered by their record index (the order of the binary info's graph list is not
        guaranteed to match).

    Raises
    ------
    InputError
        The file is missing, too short or holds no graph record.
    """
    path = _checked_file(path)
    with open(path, "rb") as file:
        head = file.read(scan_bytes)
    records = {int(index): name.decode("ascii") for index, name in _RECORD.findall(head, HEADER_BYTES)}
    if not records:
        raise InputError(f"{path}: no graph records after its {HEADER_BYTES}-byte header: not a QNN context binary")
    return [records[index] for index in sorted(records)]

