"""Reading and writing ONNX models safely: external data validated before use, atomic writes, one copy in memory.

``load_model`` parses the graph without pulling external data into memory and refuses hostile external-data
locations (see :mod:`pyqshare.model.external`). ``save_model`` writes the model (and its external data file,
when one is needed) atomically, with an IR version onnxruntime accepts, and leaves the in-memory model as
it found it.
"""

from __future__ import annotations

import os
from contextlib import ExitStack
from pathlib import Path
from typing import BinaryIO, Literal

import onnx
from google.protobuf.message import DecodeError
from onnx import TensorProto, helper, numpy_helper

from pyqshare._atomic import atomic_output, atomic_write_bytes
from pyqshare.errors import InputError
from pyqshare.model.external import (
    copy_external,
    external_tensors,
    inline_external,
    is_external,
    map_external,
    resolve_external,
    set_external,
    set_raw,
    tensor_data_nbytes,
)
from pyqshare.model.graph import iter_tensors

__all__ = ["PROTOBUF_LIMIT", "external_data_path", "load_model", "save_model", "supported_ir_version"]

PROTOBUF_LIMIT = 2**31 - 1
"""The largest serialized model protobuf can write (bytes): anything bigger needs external data."""

# onnxruntime 1.31 reads IR versions up to 13, but IR 10 is what opset 21 needs and what every runtime of the
# last years reads; a higher IR is written only when an opset requires it.
_IR_CEILING = 10
# Tensors smaller than this stay inside the model file even when it uses external data (as onnx does).
_EXTERNAL_MIN_BYTES = 1024
# Large tensors start on a page boundary so that readers can memory-map them; the rest on 64 bytes.
_PAGE_ALIGNED_FROM = 1 << 20
_PAGE, _SMALL_ALIGN = 4096, 64


def load_model(path: str | os.PathLike[str], *, load_weights: bool = False) -> onnx.ModelProto:
    """Parse an ONNX model, validating every external-data location before anything reads it.

    Parameters
    ----------
    path
        The ``.onnx`` file. External data is resolved relative to its folder.
    load_weights
        False (default): external tensors stay on disk (read them through :meth:`Weight.array`, which
        memory-maps them). True: copy them into the model, so that it can be serialized or handed to
        onnxruntime as bytes.

    Raises
    ------
    InputError
        If the file is missing, unreadable or not an ONNX model (no graph), or if any tensor's external data
        is absolute, contains ``..``, resolves outside the model's folder through a symbolic link, is not a
        regular file, or has an offset or length outside the file (the message names the tensor and the
        location). Refused locations are never opened.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such model file")
    try:
        model = onnx.load(path, load_external_data=False)
    except DecodeError as error:
        raise InputError(f"{path}: not an ONNX model ({error})") from None
    except OSError as error:
        raise InputError(f"{path}: cannot read it ({error.strerror})") from None
    if not model.HasField("graph"):  # protobuf parses some non-models (an empty file) as an empty message
        raise InputError(f"{path}: not an ONNX model (no graph)")
    external = external_tensors(model)
    for tensor in external:  # every location is checked before any is read
        resolve_external(tensor, path.parent)
    if load_weights:
        for tensor in external:
            inline_external(tensor, path.parent)
    return model


def supported_ir_version(model: onnx.ModelProto) -> int:
    """The IR version to write: at least what the model's opsets need, and above 10 only if they need it.

    A model's own IR version is kept when it lies in that range (onnx >= 1.23 stamps new models with IR 14,
    which onnxruntime 1.31 refuses; opset 21 needs IR 10).
    """
    needed = helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
    return min(max(model.ir_version, needed), max(needed, _IR_CEILING))


def save_model(
    model: onnx.ModelProto,
    path: str | os.PathLike[str],
    *,
    external_data: bool | Literal["auto"] = "auto",
    model_dir: str | os.PathLike[str] | None = None,
    external_data_threshold: int = PROTOBUF_LIMIT,
) -> list[Path]:
    """Write ``model`` to ``path`` atomically; return the files written (the model, then its data file).

    Sets ``model.ir_version`` to :func:`supported_ir_version`; nothing else in the model changes (nodes,
    attributes, metadata, value_info and doc strings are written as they are, and in-memory tensors stay in
    memory afterwards).

    Parameters
    ----------
    model
        The model. Tensors may live in memory or in external data (as :func:`load_model` leaves them).
    path
        The output ``.onnx`` file. External data goes next to it, into ``<name>.data`` (``q.onnx`` ->
        ``q.onnx.data``), with every tensor of at least 1 KiB; smaller ones stay in the model file.
    external_data
        ``"auto"``: external data when the model with every tensor inline would exceed
        ``external_data_threshold`` bytes; True: always; False: never (InputError if the model cannot fit
        in protobuf's 2 GiB).
    model_dir
        The folder the model was loaded from. Needed when tensors still live in external data: they are
        re-validated there and copied into the output in 16 MiB chunks (never loaded whole).
    external_data_threshold
        Serialized size in bytes above which ``"auto"`` switches to external data (default: protobuf's
        limit, 2 GiB - 1). Tests lower it to exercise the external path on small models.

    Notes
    -----
    Each file is written to a temporary sibling, synced, and renamed; the data file is renamed just before
    the model file, once both are complete, so an exception leaves the previous files untouched (only a
    crash between the two renames could pair a new data file with the old model). When the output lands
    in ``model_dir``, external tensors are left pointing at the new data file (it may just have replaced
    theirs); otherwise they keep pointing at their source.

    Peak memory is the model plus one tensor (and, for a model written inline, its serialized bytes).
    """
    if external_data not in ("auto", True, False):
        raise ValueError(f"external_data must be 'auto', True or False, not {external_data!r}")
    path = Path(path)
    model.ir_version = supported_ir_version(model)
    tensors = [tensor for _, tensor in iter_tensors(model)]
    external = [tensor for tensor in tensors if is_external(tensor)]
    if external and model_dir is None:
        raise ValueError(f"tensor {external[0].name!r} lives in external data: pass model_dir (the model's folder)")
    inline_size = model.ByteSize() + sum(resolve_external(tensor, model_dir).length for tensor in external)
    use_external = external_data is True or (external_data == "auto" and inline_size > external_data_threshold)
    if not use_external and inline_size > PROTOBUF_LIMIT:
        raise InputError(f"{path}: the model needs {inline_size} bytes, over protobuf's 2 GiB limit: use external data")
    if use_external:
        return _save_external(model, path, tensors, model_dir)
    _save_inline(model, path, external, model_dir)
    return [path]


def _save_inline(model: onnx.ModelProto, path: Path, external: list[onnx.TensorProto], model_dir) -> None:
    originals = [_copy(tensor) for tensor in external]
    try:
        for tensor in external:
            inline_external(tensor, model_dir)
        atomic_write_bytes(path, model.SerializeToString())
    finally:
        for tensor, original in zip(external, originals):
            tensor.CopyFrom(original)


def _save_external(model: onnx.ModelProto, path: Path, tensors: list[onnx.TensorProto], model_dir) -> list[Path]:
    data_path = external_data_path(path)
    keep_written = model_dir is not None and os.path.realpath(model_dir) == os.path.realpath(path.parent)
    originals: list[tuple[onnx.TensorProto, onnx.TensorProto]] = []  # (tensor, its state before the write)
    written = False
    try:
        with ExitStack() as stack:
            # Entered model first, so the data file (exited first) is renamed into place before the model.
            model_file = stack.enter_context(atomic_output(path))
            data_file = stack.enter_context(atomic_output(data_path))
            for tensor in tensors:
                if is_external(tensor):
                    source = resolve_external(tensor, model_dir)
                    originals.append((tensor, _copy(tensor)))
                    if source.length < _EXTERNAL_MIN_BYTES:
                        set_raw(tensor, bytes(map_external(source)))
                    else:
                        offset = _align(data_file, source.length)
                        copy_external(source, data_file)
                        set_external(tensor, _entries(data_path.name, offset, source.length))
                elif tensor.data_type != TensorProto.STRING and tensor_data_nbytes(tensor) >= _EXTERNAL_MIN_BYTES:
                    original = _copy(tensor)
                    originals.append((tensor, original))
                    length = tensor_data_nbytes(tensor)
                    offset = _align(data_file, length)
                    set_external(tensor, _entries(data_path.name, offset, length))  # frees the in-model bytes
                    data_file.write(_raw_bytes(original, length))
            model_file.write(model.SerializeToString())
        written = True
    finally:
        for tensor, original in originals:
            # External tensors now point at the new data file when it replaced theirs in the same folder.
            if not (written and keep_written and is_external(original)):
                tensor.CopyFrom(original)
    return [path, data_path]


def external_data_path(path: str | os.PathLike[str]) -> Path:
    """The external data file :func:`save_model` writes beside the model ``path``: ``<name>.data``."""
    path = Path(path)
    return path.with_name(f"{path.name}.data")


def _align(data_file: BinaryIO, length: int) -> int:
    """Pad the data file so that a tensor of ``length`` bytes starts aligned; return that offset."""
    align = _PAGE if length >= _PAGE_ALIGNED_FROM else _SMALL_ALIGN
    padding = -data_file.tell() % align
    data_file.write(b"\0" * padding)
    return data_file.tell()


def _entries(location: str, offset: int, length: int) -> list[tuple[str, str]]:
    return [("location", location), ("offset", str(offset)), ("length", str(length))]


def _raw_bytes(tensor: onnx.TensorProto, length: int) -> bytes:
    """The tensor's little-endian raw data, converting typed fields (float_data, int32_data, ...) if needed."""
    if tensor.HasField("raw_data"):
        raw = tensor.raw_data
    else:
        raw = numpy_helper.from_array(numpy_helper.to_array(tensor)).raw_data
    if len(raw) != length:
        raise InputError(f"tensor {tensor.name!r} holds {len(raw)} bytes, but shape {list(tensor.dims)} needs {length}")
    return raw


def _copy(tensor: onnx.TensorProto) -> onnx.TensorProto:
    duplicate = onnx.TensorProto()
    duplicate.CopyFrom(tensor)
    return duplicate
