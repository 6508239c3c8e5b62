"""The weight tensors of one model, whatever form it comes in, read in place without copying.

Forms (:func:`open_model` tells them apart: a folder, then the file's first bytes, then its suffix):

* **ONNX** (``.onnx``): every float weight :func:`pyqshare.model.find_weights` reports (initializers,
  external data, ``Constant`` nodes, subgraphs), so external data is validated exactly as
  :func:`pyqshare.model.load_model` does. External data, and main-graph initializers stored as raw bytes in
  the ``.onnx`` file, are memory-mapped (Constant nodes, subgraph and typed-field tensors stay parsed).
* **A folder of raw weight files**, as ``tar xf`` extracts a qnn-onnx-converter ``.bin``: one file per
  tensor, named by its path relative to the folder. Raw files carry no dtype or shape: each is bytes, shape
  ``(nbytes,)``. Symbolic links and special files are refused (nothing outside the folder is read).
* **A ``.bin`` tar archive** (the converter's output itself), read in place: member headers are parsed with
  :mod:`tarfile`, and each regular member's data is memory-mapped at its offset in the archive. Nothing is
  extracted. Links (symbolic or hard), absolute names, ``..`` components, devices, FIFOs, sparse members,
  repeated names and members that run past the end of the file are refused; so is a compressed archive.
* **safetensors**: the 8-byte little-endian header length and the JSON header are parsed and validated here
  (dtype, shape, offsets inside the data region, sizes that match, no overlaps); tensors are memory-mapped.

Memory: a file-backed tensor is mapped only while the array :meth:`SourceTensor.array` returns is alive, so
reading a family tensor by tensor keeps the resident set to about one tensor (plus what stays parsed).
Every problem with an input is an :class:`~pyqshare.errors.InputError` naming the file.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import re
import stat
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import ml_dtypes
import numpy as np

from pyqshare.errors import InputError
from pyqshare.model import WEIGHT_MIN_ELEMENTS, find_weights, load_model
from pyqshare.model.external import ExternalData, map_external

__all__ = ["FORMATS", "GateLayout", "ModelSource", "SourceTensor", "open_model"]

FORMATS = ("onnx", "raw", "tar", "safetensors")

_SAFETENSORS_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U64": np.dtype(np.uint64), "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
# The safetensors format caps its header at 100 MB; a larger claimed length is a corrupt or hostile file.
_SAFETENSORS_MAX_HEADER = 100_000_000
_TAR_BLOCK = 512
# PyTorch's recurrent parameters: weight_ih_l0, bias_hh_l1_reverse, ... (gates stacked along axis 0).
_TORCH_RNN_NAME = re.compile(r"(^|[./_])(weight|bias)_(ih|hh)_l\d+(_reverse)?$")
_ONNX_RNN_GATES = {"LSTM": 4, "GRU": 3}


@dataclass(frozen=True)
class GateLayout:
    """How a recurrent weight stacks its gates, so that a copy with another gate order can be recognised.

    The tensor's bytes, in C order, are ``outer`` consecutive stacks of ``gates`` equal blocks, one per gate.

    Attributes
    ----------
    gates
        4 for an LSTM, 3 for a GRU.
    outer
        Independent stacks: the directions for ONNX ``W`` and ``R`` (``[D, G*H, I]``), twice that for ONNX
        ``B`` (``[D, 2*G*H]``: input then recurrence biases), 1 for a PyTorch parameter (``[G*H, ...]``).
    order
        ``"onnx"`` (LSTM ``i o f c``, GRU ``z r h``) or ``"torch"`` (LSTM ``i f g o``, GRU ``r z n``).
    """

    gates: int
    outer: int
    order: str


@dataclass(frozen=True)
class SourceTensor:
    """One weight tensor of one model.

    Attributes
    ----------
    model
        Index of the model in the analysed family.
    name
        Its name: the ONNX tensor name, the raw file's or tar member's relative path, the safetensors key.
    dtype, shape
        numpy dtype and shape; raw files and tar members are ``uint8`` of shape ``(nbytes,)``.
    nbytes
        Bytes of its data.
    gate_layouts
        Recurrent gate layouts it may have (empty for anything that is not an LSTM/GRU weight); a PyTorch
        parameter whose first axis divides by 12 may be either.
    """

    model: int
    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    nbytes: int
    gate_layouts: tuple[GateLayout, ...] = ()
    _read: Callable[[], np.ndarray] = field(default=None, repr=False, compare=False)

    @property
    def size(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)

    def array(self) -> np.ndarray:
        """The values as a read-only, C-contiguous array of ``shape`` and ``dtype`` (no copy for file-backed
        data: a memory map that lives as long as the array)."""
        return self._read()


@dataclass
class ModelSource:
    """One input model and its tensors.

    Attributes
    ----------
    path
        The path as given.
    form
        One of :data:`FORMATS`.
    tensors
        Its weights, in the model's order (ONNX graph order, sorted file names, tar order, safetensors header
        order sorted by offset).
    """

    path: Path
    form: str
    tensors: list[SourceTensor]


def open_model(path: str | os.PathLike[str], model: int = 0, *, min_elements: int = WEIGHT_MIN_ELEMENTS) -> ModelSource:
    """Read the tensor list of one model (no tensor data is read yet).

    Parameters
    ----------
    path
        An ONNX file, a folder of raw weight files, a tar ``.bin`` or a safetensors file (module docstring).
    model
        The index recorded in each :class:`SourceTensor`.
    min_elements
        Smallest tensor kept (../shared/CLI.md's weight definition); raw files count bytes as elements.

    Raises
    ------
    InputError
        If the path is missing, empty, of no known form, malformed, truncated or hostile (module docstring);
        the message names the file.
    """
    path = Path(path)
    if path.is_dir():
        return ModelSource(path, "raw", _raw_folder(path, model, min_elements))
    try:
        status = path.stat()
    except FileNotFoundError:
        raise InputError(f"{path}: no such model file or folder") from None
    except OSError as error:
        raise InputError(f"{path}: cannot read it ({error.strerror})") from None
    if not stat.S_ISREG(status.st_mode):
        raise InputError(f"{path}: not a regular file or a folder")
    if status.st_size == 0:
        raise InputError(f"{path}: empty file (zero bytes), not a model")
    form = _sniff(path, status.st_size)
    if form == "tar":
        tensors = _tar_archive(path, status.st_size, model, min_elements)
    elif form == "safetensors":
        tensors = _safetensors(path, status.st_size, model, min_elements)
    else:
        tensors = _onnx(path, model, min_elements)
    return ModelSource(path, form, tensors)


def _sniff(path: Path, size: int) -> str:
    """The form of a non-empty file, from its first bytes (a tar header's checksum and magic, a safetensors
    header length followed by ``{``), else from its suffix; anything else is taken for ONNX."""
    with path.open("rb") as handle:
        head = handle.read(_TAR_BLOCK)
    if len(head) == _TAR_BLOCK and _is_tar_header(head):
        return "tar"
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") <= size - 8:
        return "safetensors"
    if path.suffix == ".safetensors":
        return "safetensors"  # let the parser say what is wrong with it
    if path.suffix in (".bin", ".tar"):
        raise InputError(f"{path}: a .bin that is not an uncompressed tar archive (a qnn-onnx-converter .bin is one)")
    return "onnx"


def _is_tar_header(block: bytes) -> bool:
    try:
        tarfile.nti(block[148:156])  # the checksum field
    except tarfile.InvalidHeaderError:
        return False
    return tarfile.calc_chksums(block)[0] == tarfile.nti(block[148:156]) and block[257:262] == b"ustar"


def _mapped(path: Path, offset: int, nbytes: int, dtype: np.dtype, shape: tuple[int, ...]) -> Callable[[], np.ndarray]:
    """A reader mapping ``nbytes`` at ``offset`` of a validated file as an array (the map lives with it)."""
    location = ExternalData(path, offset, nbytes)

    def read() -> np.ndarray:
        values = np.frombuffer(map_external(location), dtype=dtype.newbyteorder("<")).reshape(shape)
        values.flags.writeable = False
        return values

    return read


def _onnx(path: Path, model: int, min_elements: int) -> list[SourceTensor]:
    """The model's weights; main-graph initializers stored as raw bytes in the file are memory-mapped at their
    offset (:func:`_raw_data_offsets`), so the parsed model can be dropped: a family of inline ONNX files is
    read with about one model resident, as are the other forms."""
    try:
        onnx_model = load_model(path)
        weights = find_weights(onnx_model, path.parent, min_elements=min_elements)
    except InputError as error:  # external-data refusals name the tensor; name the model too
        if str(path) in str(error):
            raise
        raise InputError(f"{path}: {error}") from None
    offsets = _raw_data_offsets(path) if any(w.location == "initializer" and not w.graph for w in weights) else {}
    tensors = []
    for weight in weights:
        layouts = ()
        if weight.role in ("rnn_w", "rnn_r", "rnn_b"):
            gates = next((_ONNX_RNN_GATES[op] for _, op, _ in weight.consumers if op in _ONNX_RNN_GATES), None)
            if gates is not None:
                outer = weight.shape[0] * (2 if weight.role == "rnn_b" else 1)
                layouts = (GateLayout(gates, outer, "onnx"),)
        dtype, shape = np.dtype(weight.dtype), tuple(weight.shape)
        offset, length = offsets.get(weight.name, (None, None)) if weight.location == "initializer" and not weight.graph \
            else (None, None)
        read = _mapped(path, offset, length, dtype, shape) if length == weight.nbytes else weight.array
        tensors.append(SourceTensor(model, weight.name, dtype, shape, weight.nbytes, layouts, read))
    return tensors


def _raw_data_offsets(path: Path) -> dict[str, tuple[int, int]]:
    """``{initializer name: (offset, length)}`` of the ``raw_data`` of every main-graph initializer of an ONNX
    file, found by walking the protobuf wire format (ModelProto.graph = field 7, GraphProto.initializer = 5,
    TensorProto.name = 8, raw_data = 9); length-delimited fields are skipped without reading them. The file
    was parsed by onnx already, so it is well formed; a walk that leaves the bounds finds nothing."""
    found: dict[str, tuple[int, int]] = {}
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
        try:
            for field, start, end in _fields(data, 0, len(data)):
                if field != 7:
                    continue
                for entry, tensor_start, tensor_end in _fields(data, start, end):
                    if entry != 5:
                        continue
                    name, raw = None, None
                    for part, part_start, part_end in _fields(data, tensor_start, tensor_end):
                        if part == 8:
                            name = bytes(data[part_start:part_end]).decode("utf-8")
                        elif part == 9:
                            raw = (part_start, part_end - part_start)
                    if name is not None and raw is not None:
                        found[name] = raw
        except (IndexError, ValueError):
            return {}
    return found


def _fields(data, start: int, end: int):
    """``(field number, start, end)`` of every length-delimited field in ``data[start:end]``."""
    position = start
    while position < end:
        key, position = _varint(data, position)
        wire_type = key & 7
        if wire_type == 0:
            _, position = _varint(data, position)
        elif wire_type == 1:
            position += 8
        elif wire_type == 5:
            position += 4
        elif wire_type == 2:
            length, position = _varint(data, position)
            if position + length > end:
                raise ValueError("field past its message")
            yield key >> 3, position, position + length
            position += length
        else:
            raise ValueError(f"wire type {wire_type}")


def _varint(data, position: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, position
        shift += 7


def _torch_gate_layouts(name: str, shape: tuple[int, ...]) -> tuple[GateLayout, ...]:
    if not shape or not _TORCH_RNN_NAME.search(name):
        return ()
    return tuple(GateLayout(gates, 1, "torch") for gates in (4, 3) if shape[0] % gates == 0)


def _raw_folder(folder: Path, model: int, min_elements: int) -> list[SourceTensor]:
    """Every regular file under ``folder``; links and special files are refused, never followed."""
    real = Path(os.path.realpath(folder))
    found: list[tuple[str, Path, int]] = []
    for root, dirs, files in os.walk(real, followlinks=False):
        for entry in sorted(dirs) + sorted(files):
            full = Path(root) / entry
            name = full.relative_to(real).as_posix()
            status = full.lstat()
            if stat.S_ISLNK(status.st_mode):
                raise InputError(f"{folder}: {name} is a symbolic link; raw weight folders must hold regular files only")
            if entry in files and not stat.S_ISREG(status.st_mode):
                raise InputError(f"{folder}: {name} is not a regular file (a device, FIFO or socket)")
            if entry in files:
                found.append((name, full, status.st_size))
    if not found:
        raise InputError(f"{folder}: an empty folder, not a folder of raw weight files")
    return [
        SourceTensor(model, name, np.dtype(np.uint8), (size,), size, (), _mapped(full, 0, size, np.dtype(np.uint8), (size,)))
        for name, full, size in sorted(found)
        if size >= min_elements
    ]


def _member_name(archive: Path, member: tarfile.TarInfo) -> str:
    """The member's name, refused when hostile or not plain data."""
    name = member.name
    what = f"{archive}: member {name!r}"
    if member.issym() or member.islnk():
        kind = "symbolic" if member.issym() else "hard"
        raise InputError(f"{what} is a {kind} link (to {member.linkname!r}); links are refused")
    if member.ischr() or member.isblk() or member.isfifo():
        raise InputError(f"{what} is a device or FIFO; only regular files are read")
    if member.issparse():
        raise InputError(f"{what} is a sparse file; only regular files are read")
    pure = PurePosixPath(name)
    if name.startswith(("/", "\\")) or pure.is_absolute() or re.match(r"^[A-Za-z]:", name):
        raise InputError(f"{what} has an absolute path; refused")
    if ".." in re.split(r"[\\/]", name):
        raise InputError(f"{what} contains '..'; refused")
    if "\0" in name:
        raise InputError(f"{what} contains a NUL byte; refused")
    return pure.as_posix().removeprefix("./")


def _tar_archive(path: Path, size: int, model: int, min_elements: int) -> list[SourceTensor]:
    """Members of an uncompressed tar, by their data offsets; headers only are read, nothing is extracted."""
    real = Path(os.path.realpath(path))
    members: dict[str, tuple[int, int]] = {}
    try:
        with tarfile.open(real, mode="r:") as archive:
            for member in archive:
                name = _member_name(path, member)
                if member.isdir():
                    continue
                if not member.isreg():
                    raise InputError(f"{path}: member {member.name!r} has unsupported type {member.type!r}")
                if member.offset_data + member.size > size:
                    raise InputError(f"{path}: truncated archive: member {name!r} needs bytes up to "
                                     f"{member.offset_data + member.size}, the file has {size}")
                if name in members:
                    raise InputError(f"{path}: member {name!r} appears twice; refused as ambiguous")
                members[name] = (member.offset_data, member.size)
            end = archive.offset
    except tarfile.TarError as error:
        raise InputError(f"{path}: not a readable uncompressed tar archive ({error})") from None
    # tarfile stops quietly at a cut-off or garbled header; a complete archive ends with a zero block there.
    with real.open("rb") as handle:
        handle.seek(end)
        tail = handle.read(_TAR_BLOCK)
    if len(tail) < _TAR_BLOCK or tail.count(0) != _TAR_BLOCK:
        raise InputError(f"{path}: truncated or corrupt archive: no end-of-archive block at byte {end} of {size}")
    uint8 = np.dtype(np.uint8)
    return [
        SourceTensor(model, name, uint8, (nbytes,), nbytes, (), _mapped(real, offset, nbytes, uint8, (nbytes,)))
        for name, (offset, nbytes) in members.items()
        if nbytes >= min_elements
    ]


def _safetensors(path: Path, size: int, model: int, min_elements: int) -> list[SourceTensor]:
    real = Path(os.path.realpath(path))
    with real.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise InputError(f"{path}: truncated safetensors file ({size} bytes, no header length)")
        header_len = int.from_bytes(prefix, "little")
        if header_len == 0 or header_len > _SAFETENSORS_MAX_HEADER or 8 + header_len > size:
            raise InputError(f"{path}: safetensors header length {header_len} does not fit the {size}-byte file")
        raw_header = handle.read(header_len)
    try:
        header = json.loads(raw_header.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"{path}: malformed safetensors header ({error})") from None
    if not isinstance(header, dict):
        raise InputError(f"{path}: malformed safetensors header (not a JSON object)")
    data_start, data_len = 8 + header_len, size - 8 - header_len
    entries = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        entries.append((name, *_safetensors_entry(path, name, entry, data_len)))
    entries.sort(key=lambda found: found[3])
    for (name, _, _, _, end), (next_name, _, _, begin, _) in zip(entries, entries[1:]):
        if begin < end:
            raise InputError(f"{path}: tensors {name!r} and {next_name!r} overlap in the data region")
    return [
        SourceTensor(model, name, dtype, shape, end - begin, _torch_gate_layouts(name, shape),
                     _mapped(real, data_start + begin, end - begin, dtype, shape))
        for name, dtype, shape, begin, end in entries
        if math.prod(shape) >= min_elements
    ]


def _safetensors_entry(path: Path, name: str, entry: object, data_len: int) -> tuple[np.dtype, tuple[int, ...], int, int]:
    """``(dtype, shape, begin, end)`` of one header entry, validated against the data region's length."""
    what = f"{path}: tensor {name!r}"
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise InputError(f"{what}: a header entry needs dtype, shape and data_offsets")
    dtype = _SAFETENSORS_DTYPES.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
    if dtype is None:
        raise InputError(f"{what}: unknown dtype {entry['dtype']!r}")
    shape, offsets = entry["shape"], entry["data_offsets"]
    if not isinstance(shape, list) or not all(type(dim) is int and dim >= 0 for dim in shape):
        raise InputError(f"{what}: shape {shape!r} must be a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(type(value) is int for value in offsets):
        raise InputError(f"{what}: data_offsets {offsets!r} must be two integers")
    begin, end = offsets
    if not 0 <= begin <= end <= data_len:
        raise InputError(f"{what}: data_offsets [{begin}, {end}) fall outside the {data_len}-byte data region")
    expected = math.prod(shape) * dtype.itemsize
    if end - begin != expected:
        raise InputError(f"{what}: {end - begin} bytes, but {entry['dtype']} {shape} needs {expected}")
    return dtype, tuple(shape), begin, end
