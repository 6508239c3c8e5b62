"""External tensor data: validate a location before anything touches it, then memory-map it read-only.

A location is trusted only when it is a relative path without ``..`` whose real path (every symbolic link
resolved, in the file name and in each parent folder) lies inside the model's real folder, names a regular
file, and whose offset and length fit inside that file and match the tensor's size. Validation uses only
``realpath`` and ``stat``; a refused location is never opened.
"""

from __future__ import annotations

import math
import mmap
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import BinaryIO

import numpy as np
import onnx
from onnx import TensorProto, helper

from pyqshare.errors import InputError
from pyqshare.model.graph import iter_tensors

__all__ = [
    "ExternalData",
    "copy_external",
    "external_array",
    "external_tensors",
    "inline_external",
    "is_external",
    "map_external",
    "resolve_external",
    "set_external",
    "set_raw",
    "tensor_data_nbytes",
]

_FOUR_BIT = {TensorProto.INT4, TensorProto.UINT4, TensorProto.FLOAT4E2M1}


@dataclass(frozen=True)
class ExternalData:
    """A validated external-data location: the real file path, and the tensor's byte range in it."""

    path: Path
    offset: int
    length: int


def is_external(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == TensorProto.EXTERNAL


def external_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    """Every tensor of ``model`` (any graph, initializers and node attributes) whose data is external."""
    return [tensor for _, tensor in iter_tensors(model) if is_external(tensor)]


def tensor_data_nbytes(tensor: onnx.TensorProto) -> int:
    """Bytes of the tensor's raw little-endian data (4-bit types pack two values per byte)."""
    count = math.prod(tensor.dims)
    if tensor.data_type in _FOUR_BIT:
        return (count + 1) // 2
    if tensor.data_type in (TensorProto.STRING, TensorProto.UNDEFINED):
        raise InputError(f"tensor {tensor.name!r}: type {tensor.data_type} cannot live in external data")
    return count * helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


def _is_absolute(location: str) -> bool:
    windows = PureWindowsPath(location)
    return PurePosixPath(location).is_absolute() or windows.is_absolute() or bool(windows.drive or windows.root)


def resolve_external(tensor: onnx.TensorProto, model_dir: str | os.PathLike[str]) -> ExternalData:
    """Validate ``tensor``'s external-data entry against ``model_dir`` (the folder holding the model file).

    Raises
    ------
    InputError
        Naming the tensor and the location, when the location is missing, absolute, contains ``..``,
        resolves outside ``model_dir`` through a symbolic link, is not a regular file, or when the offset or
        length are not integers, fall outside the file, or disagree with the tensor's shape and type.
    """
    info = {entry.key: entry.value for entry in tensor.external_data}
    location = info.get("location", "")
    where = f"tensor {tensor.name!r}: external data location {location!r}"
    if not location or "\0" in location:
        raise InputError(f"tensor {tensor.name!r}: external data without a valid location ({location!r})")
    if _is_absolute(location):
        raise InputError(f"{where} is an absolute path; only paths inside the model's folder are read")
    if ".." in re.split(r"[\\/]", location):
        raise InputError(f"{where} contains '..'; only paths inside the model's folder are read")
    base = os.path.realpath(model_dir)
    target = os.path.realpath(os.path.join(model_dir, location))
    if os.path.commonpath([base, target]) != base:
        raise InputError(f"{where} resolves to {target} through a symbolic link, outside the model's folder {base}")
    try:
        status = os.stat(target)
    except FileNotFoundError:
        raise InputError(f"{where}: no such file in {base}") from None
    except OSError as error:
        raise InputError(f"{where}: {error.strerror}") from None
    if not stat.S_ISREG(status.st_mode):
        raise InputError(f"{where} is not a regular file")
    try:
        offset = int(info.get("offset", "0"))
        length = int(info["length"]) if "length" in info else status.st_size - offset
    except ValueError:
        numbers = f"offset {info.get('offset')!r} and length {info.get('length')!r}"
        raise InputError(f"{where}: {numbers} must be integers") from None
    if offset < 0 or length < 0 or offset + length > status.st_size:
        raise InputError(f"{where}: bytes [{offset}, {offset + length}) fall outside the {status.st_size}-byte file")
    expected = tensor_data_nbytes(tensor)
    if length != expected:
        raise InputError(f"{where}: length {length} bytes, but shape {list(tensor.dims)} needs {expected}")
    return ExternalData(Path(target), offset, length)


def _open_validated(data: ExternalData) -> int:
    """Open the validated file without following a final symbolic link, and check its size again, so that
    a file swapped or truncated since validation is refused rather than read past its end."""
    try:
        fd = os.open(data.path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except OSError as error:
        raise InputError(f"{data.path}: {error.strerror}") from None
    size = os.fstat(fd).st_size
    if data.offset + data.length > size:
        os.close(fd)
        raise InputError(f"{data.path}: the file shrank to {size} bytes since it was validated")
    return fd


def map_external(data: ExternalData) -> memoryview:
    """A read-only memory map of the validated byte range (the map stays open while the view lives)."""
    if data.length == 0:
        return memoryview(b"")
    fd = _open_validated(data)
    try:
        mapped = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
    finally:
        os.close(fd)
    return memoryview(mapped)[data.offset : data.offset + data.length]


def copy_external(data: ExternalData, out: BinaryIO, chunk: int = 1 << 24) -> None:
    """Stream the validated byte range into ``out`` in ``chunk``-byte reads (memory stays flat)."""
    fd = _open_validated(data)
    try:
        position, end = data.offset, data.offset + data.length
        while position < end:
            block = os.pread(fd, min(chunk, end - position), position)
            if not block:
                raise InputError(f"{data.path}: the file shrank while it was read")
            out.write(block)
            position += len(block)
    finally:
        os.close(fd)


def external_array(tensor: onnx.TensorProto, model_dir: str | os.PathLike[str]) -> np.ndarray:
    """The tensor's values as a read-only array over a memory map of its external file (no copy)."""
    dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
    if tensor.data_type in _FOUR_BIT:
        raise InputError(f"tensor {tensor.name!r}: 4-bit external tensors are read as bytes, not arrays")
    view = map_external(resolve_external(tensor, model_dir))
    return np.frombuffer(view, dtype=dtype.newbyteorder("<")).reshape(tuple(tensor.dims))


_DATA_FIELDS = ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data")


def _clear_data(tensor: onnx.TensorProto) -> None:
    for name in _DATA_FIELDS:
        tensor.ClearField(name)
    del tensor.external_data[:]


def set_raw(tensor: onnx.TensorProto, raw: bytes) -> None:
    """Make ``tensor`` hold ``raw`` (little-endian bytes) in memory, dropping any external-data reference."""
    _clear_data(tensor)
    tensor.ClearField("data_location")  # DEFAULT, and unset as in tensors that never were external
    tensor.raw_data = raw


def inline_external(tensor: onnx.TensorProto, model_dir: str | os.PathLike[str]) -> None:
    """Read ``tensor``'s external data (validated against ``model_dir``, the model's folder) into the tensor."""
    set_raw(tensor, bytes(map_external(resolve_external(tensor, model_dir))))


def set_external(tensor: onnx.TensorProto, entries: list[tuple[str, str]]) -> None:
    """Make ``tensor`` refer to the external data described by ``entries``, dropping in-memory data."""
    _clear_data(tensor)
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in entries:
        tensor.external_data.add(key=key, value=value)
