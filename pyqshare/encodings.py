"""AIMET quantization encodings (file formats 0.6.1 and 1.0.0) and their ONNX QuantizeLinear equivalents.

The format is Qualcomm's (``Docs/techniques/encoding_spec.rst`` in the aimet repository); where the spec is
silent, AIMET's own exporter decides (``aimet_onnx/_encoding.py``). In AIMET's conventions:

* **Grid**: ``x = (q + offset) * scale`` with ``q`` the *unsigned* code in ``[0, 2**bitwidth - 1]``, in both
  formats. Offsets are integers in ``[-(2**bitwidth - 1), 0]``; a symmetric 8-bit grid has offset -128.
  ``min = offset * scale`` and ``max = (offset + 2**bitwidth - 1) * scale``.
* **symmetric** (``is_symmetric``: the string "True"/"False" in 0.6.1; ``is_sym``: a bool in 1.0.0) means the
  codes are stored signed, as AIMET's exporter and importer read it. With offset ``-2**(bitwidth - 1)`` it is
  the symmetric grid (signed zero point 0); AIMET also writes it for signed codes with another zero point.
* **Per-channel**: one scale and offset per output channel, shape ``(C,)``. **Per-block**: ``(C, n_blocks)``,
  blocks running along the input channels; 1.0.0 flattens it channel-major whatever the tensor's layout (an
  ``[in, out]`` MatMul weight too). 0.6.1 writes a per-channel entry as a list of one dict per channel and
  cannot express blocks.
* **LPBQ** (1.0.0 only): weight codes of ``compressed_bitwidth`` bits, signed with zero point 0; block
  ``(c, k)`` has scale ``per_block_int_scale[c, k] * scale[c]`` with integers in
  ``[1, 2**(bitwidth - compressed_bitwidth)]``. ``bitwidth`` is the decompressed width, ``scale`` the per-channel
  float scale, ``offset`` is ``-2**(bitwidth - 1)`` per channel (the decompressed symmetric grid).
* **Float**: ``dtype="float"`` and a bitwidth (16 is fp16), nothing else.

ONNX ``DequantizeLinear`` computes ``x = (q - zero_point) * scale`` with ``q`` in the zero point's type.
Unsigned types: ``q`` is AIMET's code and ``zero_point = -offset``. Signed types: ``q = q_unsigned -
2**(b - 1)`` and ``zero_point = -offset - 2**(b - 1)``. The files record no axes: :func:`read_encodings`
leaves ``axis`` and ``block_axis`` None; set them (``dataclasses.replace``) before :meth:`TensorEncoding.to_qdq`.
"""

from __future__ import annotations

import enum
import json
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from pyqshare._atomic import atomic_write_text
from pyqshare.errors import InputError
from pyqshare.model.graph import iter_graphs

__all__ = [
    "EncodingKind",
    "Encodings",
    "LpbqQdqParams",
    "QdqParams",
    "TensorEncoding",
    "encodings_from_qdq_model",
    "read_encodings",
    "write_encodings",
]

VERSIONS = ("0.6.1", "1.0.0")
# Bit widths each file format allows (spec: 0.6.1 "bitwidth >=4 and <=32", 1.0.0 "bw >=2 and <= 32").
_FILE_BITWIDTHS = {"0.6.1": (4, 32), "1.0.0": (2, 32)}
_FLOAT_BITWIDTHS = (16, 32)

# ONNX integer types QuantizeLinear/DequantizeLinear use in opset 21 -> (bits, signed). int32 is
# DequantizeLinear-only (biases) and has no zero point but 0.
_ONNX_INT_TYPES: dict[int, tuple[int, bool]] = {
    TensorProto.INT4: (4, True),
    TensorProto.UINT4: (4, False),
    TensorProto.INT8: (8, True),
    TensorProto.UINT8: (8, False),
    TensorProto.INT16: (16, True),
    TensorProto.UINT16: (16, False),
    TensorProto.INT32: (32, True),
}
_ONNX_TYPE_OF = {v: k for k, v in _ONNX_INT_TYPES.items()}
_INT4_DTYPES = {np.dtype(helper.tensor_dtype_to_np_dtype(t)) for t in (TensorProto.INT4, TensorProto.UINT4)}


class EncodingKind(enum.StrEnum):
    """Granularity of an encoding; the values are 1.0.0's ``enc_type`` strings."""

    PER_TENSOR = "PER_TENSOR"
    PER_CHANNEL = "PER_CHANNEL"
    PER_BLOCK = "PER_BLOCK"
    LPBQ = "LPBQ"


class QdqParams(NamedTuple):
    """Inputs and attributes of one ONNX QuantizeLinear/DequantizeLinear pair (opset 21).

    ``scale`` is float32 and ``zero_point`` has the numpy dtype of ``elem_type`` (ml_dtypes int4/uint4 for
    4 bits); both are 0-d (per-tensor), ``(C,)`` along ``axis`` (per-channel) or the tensor's shape with
    ``axis`` divided into blocks of ``block_size`` (blocked; ``axis`` is the blocked axis).
    """

    scale: np.ndarray
    zero_point: np.ndarray
    elem_type: int
    axis: int | None
    block_size: int | None


class LpbqQdqParams(NamedTuple):
    """LPBQ as two ONNX DequantizeLinear nodes: ``block_scale = DQ(per_block_int_scale, per_channel_scale,
    axis=channel_axis)`` then ``w = DQ(codes, block_scale, zero_point, axis=axis, block_size=block_size)``.

    ``per_block_int_scale`` (uint8, or uint16 when an integer exceeds 255) has the blocked layout of the weight;
    ``per_channel_scale`` is float32 ``(C,)``; ``zero_point`` is zeros of ``elem_type`` in the blocked layout.
    """

    per_block_int_scale: np.ndarray
    per_channel_scale: np.ndarray
    channel_axis: int
    zero_point: np.ndarray
    elem_type: int
    axis: int
    block_size: int


@dataclass(frozen=True, eq=False, kw_only=True)
class TensorEncoding:
    """The quantization encoding of one tensor, in AIMET's conventions (see the module docstring).

    Parameters
    ----------
    name : str
        Tensor name (AIMET keys params by parameter name and activations by tensor name).
    dtype : {"int", "float"}
        Integer grid or plain float (then only ``bitwidth`` is set, 16 or 32).
    bitwidth : int
        Bits of the integer codes, 1..32 (for LPBQ, the decompressed width AIMET calls ``bw``).
    symmetric : bool
        AIMET's ``is_sym``/``is_symmetric``: codes stored signed. Always True for LPBQ.
    scale : numpy.ndarray or None
        Float scales, shape ``()`` per-tensor, ``(C,)`` per-channel and LPBQ (the per-channel float scale),
        ``(C, n_blocks)`` per-block. Finite and positive. Stored read-only in float32, the spec's type and the
        type ONNX Runtime and QNN compute with, so that conversions to and from ONNX are exact.
    offset : numpy.ndarray or None
        Integer offsets of the same shape, each in ``[-(2**bitwidth - 1), 0]``. Stored as read-only int64.
    axis : int or None
        Channel axis in the ONNX tensor (non-negative); None for per-tensor, or unknown (files do not record it).
    block_axis : int or None
        Per-block and LPBQ: the ONNX axis the blocks run along; None if unknown.
    block_size : int or None
        Per-block and LPBQ: elements per block along ``block_axis``.
    compressed_bitwidth : int or None
        LPBQ only: bits of the stored weight codes (AIMET's ``compressed_bw``), below ``bitwidth``.
    per_block_int_scale : numpy.ndarray or None
        LPBQ only: ``(C, n_blocks)`` integers in ``[1, 2**(bitwidth - compressed_bitwidth)]``.

    Raises
    ------
    InputError
        If any field is malformed or the fields are inconsistent.
    """

    name: str
    dtype: str = "int"
    bitwidth: int
    symmetric: bool = False
    scale: np.ndarray | None = None
    offset: np.ndarray | None = None
    axis: int | None = None
    block_axis: int | None = None
    block_size: int | None = None
    compressed_bitwidth: int | None = None
    per_block_int_scale: np.ndarray | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise InputError(f"encoding name must be a non-empty string, got {self.name!r}")
        where = f"encoding {self.name!r}"
        if self.dtype not in ("int", "float"):
            raise InputError(f"{where}: dtype must be 'int' or 'float', got {self.dtype!r}")
        object.__setattr__(self, "bitwidth", _checked_int(self.bitwidth, f"{where}: bitwidth", 1, 32))
        if not isinstance(self.symmetric, (bool, np.bool_)):
            raise InputError(f"{where}: symmetric must be a bool, got {self.symmetric!r}")
        object.__setattr__(self, "symmetric", bool(self.symmetric))
        if self.dtype == "float":
            self._check_float(where)
        else:
            self._check_int(where)

    def _check_float(self, where: str) -> None:
        if self.bitwidth not in _FLOAT_BITWIDTHS:
            raise InputError(f"{where}: a float encoding has bitwidth 16 or 32, got {self.bitwidth}")
        integer_only = ("scale", "offset", "axis", "block_axis", "block_size", "compressed_bitwidth",
                        "per_block_int_scale")
        set_fields = [f for f in integer_only if getattr(self, f) is not None] + ["symmetric"] * self.symmetric
        if set_fields:
            raise InputError(f"{where}: a float encoding has only a bitwidth, but {', '.join(set_fields)} is set")

    def _check_int(self, where: str) -> None:
        scale = _float_array(self.scale, f"{where}: scale")
        offset = _integer_array(self.offset, f"{where}: offset")
        if scale.shape != offset.shape:
            raise InputError(f"{where}: scale shape {scale.shape} differs from offset shape {offset.shape}")
        if scale.ndim > 2:
            raise InputError(f"{where}: scale must be 0-d, (C,) or (C, n_blocks); got shape {scale.shape}")
        if scale.size == 0:
            raise InputError(f"{where}: scale is empty")
        _check_scales(scale, f"{where}: scale")
        lowest = -(2**self.bitwidth - 1)
        if np.any(offset > 0) or np.any(offset < lowest):
            raise InputError(
                f"{where}: offsets must lie in [{lowest}, 0] (AIMET's unsigned-code offsets, bitwidth "
                f"{self.bitwidth}); got {offset.min()}..{offset.max()}"
            )
        for attr in ("axis", "block_axis"):
            value = getattr(self, attr)
            if value is not None:
                object.__setattr__(self, attr, _checked_int(value, f"{where}: {attr}", 0, 2**31))
        if self.block_size is not None:
            object.__setattr__(self, "block_size", _checked_int(self.block_size, f"{where}: block_size", 1, 2**31))

        lpbq = self.per_block_int_scale is not None
        if lpbq:
            self._check_lpbq(where, scale, offset)
        elif self.compressed_bitwidth is not None:
            raise InputError(f"{where}: compressed_bitwidth is for LPBQ; per_block_int_scale is missing")
        blocked = lpbq or scale.ndim == 2
        if blocked:
            if self.block_size is None:
                raise InputError(f"{where}: a per-block encoding needs block_size")
            if self.axis is not None and self.axis == self.block_axis:
                raise InputError(f"{where}: channel axis and block axis are both {self.axis}")
        elif self.block_size is not None or self.block_axis is not None:
            raise InputError(f"{where}: block_size/block_axis need (C, n_blocks) scales; got shape {scale.shape}")
        if scale.ndim == 0 and self.axis is not None:
            raise InputError(f"{where}: a per-tensor encoding has no axis (got axis={self.axis})")
        object.__setattr__(self, "scale", _read_only(scale.astype(np.float32)))
        object.__setattr__(self, "offset", _read_only(offset))

    def _check_lpbq(self, where: str, scale: np.ndarray, offset: np.ndarray) -> None:
        ints = _integer_array(self.per_block_int_scale, f"{where}: per_block_int_scale")
        if scale.ndim != 1 or ints.ndim != 2 or ints.shape[0] != scale.shape[0]:
            raise InputError(
                f"{where}: LPBQ needs a (C,) per-channel scale and (C, n_blocks) per_block_int_scale; got "
                f"{scale.shape} and {ints.shape}"
            )
        compressed = _checked_int(self.compressed_bitwidth, f"{where}: compressed_bitwidth", 1, self.bitwidth - 1)
        if not self.symmetric:
            raise InputError(f"{where}: LPBQ encodings are symmetric")
        if np.any(offset != -(2 ** (self.bitwidth - 1))):
            raise InputError(f"{where}: LPBQ offsets are -2**(bitwidth-1) = {-(2 ** (self.bitwidth - 1))}")
        top = 2 ** (self.bitwidth - compressed)
        if ints.size == 0 or np.any(ints < 1) or np.any(ints > top):
            raise InputError(f"{where}: per_block_int_scale must lie in [1, {top}] = [1, 2**(bitwidth - compressed)]")
        object.__setattr__(self, "compressed_bitwidth", compressed)
        object.__setattr__(self, "per_block_int_scale", _read_only(ints))

    # Identity ------------------------------------------------------------------------------------------------

    def _identity(self) -> tuple:
        def key(a: np.ndarray | None):
            return None if a is None else (a.shape, a.tobytes())

        return (self.name, self.dtype, self.bitwidth, self.symmetric, key(self.scale), key(self.offset), self.axis,
                self.block_axis, self.block_size, self.compressed_bitwidth, key(self.per_block_int_scale))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TensorEncoding):
            return NotImplemented
        return self._identity() == other._identity()

    def __hash__(self) -> int:
        return hash(self._identity())

    # Derived values ------------------------------------------------------------------------------------------

    @property
    def kind(self) -> EncodingKind:
        """PER_TENSOR (float encodings too), PER_CHANNEL, PER_BLOCK or LPBQ."""
        if self.per_block_int_scale is not None:
            return EncodingKind.LPBQ
        if self.scale is None or self.scale.ndim == 0:
            return EncodingKind.PER_TENSOR
        return EncodingKind.PER_CHANNEL if self.scale.ndim == 1 else EncodingKind.PER_BLOCK

    @property
    def min(self) -> np.ndarray:
        """``offset * scale`` (for LPBQ, the per-channel decompressed range). Integer encodings only."""
        self._require_int("min")
        return self.offset * self.scale.astype(np.float64)

    @property
    def max(self) -> np.ndarray:
        """``(offset + 2**bitwidth - 1) * scale``. Integer encodings only."""
        self._require_int("max")
        return (self.offset + (2**self.bitwidth - 1)) * self.scale.astype(np.float64)

    @property
    def block_scale(self) -> np.ndarray:
        """The float32 scale each stored code is multiplied by: ``scale``, or for LPBQ the ``(C, n_blocks)``
        product ``per_block_int_scale * scale`` as ONNX Runtime's DequantizeLinear computes it."""
        self._require_int("block_scale")
        if self.per_block_int_scale is None:
            return self.scale
        return self.per_block_int_scale.astype(np.float32) * self.scale[:, None]

    def _require_int(self, what: str) -> None:
        if self.dtype != "int":
            raise InputError(f"encoding {self.name!r}: a float encoding has no {what}")

    # ONNX ----------------------------------------------------------------------------------------------------

    @classmethod
    def from_qdq(
        cls,
        name: str,
        scale: np.ndarray,
        zero_point: np.ndarray | None,
        onnx_elem_type: int,
        axis: int | None = None,
        block_size: int | None = None,
    ) -> TensorEncoding:
        """The encoding of an ONNX QuantizeLinear/DequantizeLinear with these inputs and attributes.

        Parameters
        ----------
        name : str
            Tensor name for the encoding.
        scale : numpy.ndarray
            ``y_scale``/``x_scale``: 0-d or one element (per-tensor), 1-D with ``axis`` (per-channel), or the
            blocked layout with ``axis`` and ``block_size``.
        zero_point : numpy.ndarray or None
            Zero points of ``scale``'s shape (integers in the type's range); None means zeros.
        onnx_elem_type : int
            ``onnx.TensorProto`` type of the codes: INT4, UINT4, INT8, UINT8, INT16, UINT16, or INT32 (symmetric).
        axis : int or None
            The node's ``axis``: the channel axis (per-channel; non-negative, as the tensor's rank is unknown
            here) or the blocked axis (blocked; may be negative).
        block_size : int or None
            The node's ``block_size``; None or 0 when not blocked.

        Returns
        -------
        TensorEncoding
            ``symmetric`` is True for signed types. Per-block results have ``axis`` = the channel axis: the only
            other axis of the scales longer than 1, else 0 (1 when blocks run along axis 0).

        Raises
        ------
        InputError
            If the parameters are malformed or AIMET cannot express them (scales varying along a third axis).
        """
        where = f"encoding {name!r}"
        bits, signed = _onnx_int_type(onnx_elem_type, where)
        scale = _float_array(scale, f"{where}: scale")
        codes = _zero_points(zero_point, scale.shape, onnx_elem_type, where)
        offset = -codes - (2 ** (bits - 1) if signed else 0)
        common = {"name": name, "bitwidth": bits, "symmetric": signed}
        if block_size:
            if axis is None:
                raise InputError(f"{where}: blocked quantization needs the blocked axis")
            block_axis = _normalize_axis(axis, scale.ndim, where)
            (scale, offset), channel_axis = _from_blocked_layout([scale, offset], block_axis, where)
            return cls(**common, scale=scale, offset=offset, axis=channel_axis, block_axis=block_axis,
                       block_size=block_size)
        if scale.ndim == 0 or (scale.ndim == 1 and scale.size == 1 and axis is None):
            return cls(**common, scale=scale.reshape(()), offset=offset.reshape(()))
        if scale.ndim != 1 or axis is None:
            raise InputError(f"{where}: scale of shape {scale.shape} needs axis (per-channel) or block_size")
        if isinstance(axis, (int, np.integer)) and axis < 0:
            raise InputError(f"{where}: pass a non-negative channel axis (normalize {axis} with the tensor's rank)")
        return cls(**common, scale=scale, offset=offset, axis=axis)

    @classmethod
    def from_lpbq_qdq(
        cls,
        name: str,
        per_block_int_scale: np.ndarray,
        per_channel_scale: np.ndarray,
        onnx_elem_type: int,
        axis: int,
        block_size: int,
        bitwidth: int | None = None,
    ) -> TensorEncoding:
        """The LPBQ encoding of the two DequantizeLinear nodes described in :class:`LpbqQdqParams`.

        Parameters
        ----------
        name : str
            Tensor name for the encoding.
        per_block_int_scale : numpy.ndarray
            Integer block scales in the weight's blocked layout (input of the first DequantizeLinear).
        per_channel_scale : numpy.ndarray
            Its scale: ``(C,)`` along the channel axis, or one value shared by every channel.
        onnx_elem_type : int
            Signed type of the weight codes (INT4, INT8 or INT16); the weight's zero point must be 0.
        axis : int
            Blocked axis of the weight's DequantizeLinear.
        block_size : int
            Its ``block_size``.
        bitwidth : int or None
            Decompressed bit width; None means twice the codes' width (AIMET's default, 8 for int4).

        Returns
        -------
        TensorEncoding
            Kind LPBQ.

        Raises
        ------
        InputError
            If the parameters are malformed or not LPBQ.
        """
        where = f"encoding {name!r}"
        bits, signed = _onnx_int_type(onnx_elem_type, where)
        if not signed:
            raise InputError(f"{where}: LPBQ weight codes are signed; got an unsigned type")
        ints = _integer_array(per_block_int_scale, f"{where}: per_block_int_scale")
        block_axis = _normalize_axis(axis, ints.ndim, where)
        (ints,), channel_axis = _from_blocked_layout([ints], block_axis, where)
        channel_scale = _float_array(per_channel_scale, f"{where}: per-channel scale").reshape(-1)
        if channel_scale.size == 1:
            channel_scale = np.repeat(channel_scale, ints.shape[0])
        if channel_scale.shape != (ints.shape[0],):
            raise InputError(f"{where}: {channel_scale.size} per-channel scales for {ints.shape[0]} channels")
        bitwidth = 2 * bits if bitwidth is None else bitwidth
        return cls(name=name, bitwidth=bitwidth, symmetric=True, scale=channel_scale,
                   offset=np.full(ints.shape[0], -(2 ** (bitwidth - 1))), axis=channel_axis, block_axis=block_axis,
                   block_size=block_size, compressed_bitwidth=bits, per_block_int_scale=ints)

    def to_qdq(self, shape: Sequence[int] | None = None) -> QdqParams:
        """ONNX QuantizeLinear/DequantizeLinear parameters that dequantize exactly as this encoding.

        LPBQ gives the single-level equivalent (float32 block scales, see :attr:`block_scale`); use
        :meth:`to_lpbq_qdq` to keep the integer block scales.

        Parameters
        ----------
        shape : sequence of int or None
            Shape of the quantized tensor. Needed only for blocked encodings of tensors with more than two
            dimensions (ONNX repeats the scales along the other axes); when given, it is checked.

        Returns
        -------
        QdqParams

        Raises
        ------
        InputError
            For float encodings, bit widths ONNX has no type for (4, 8 and 16 bits; 32 signed with zero point
            0), and when an axis needed for the layout is unknown.
        """
        where = f"encoding {self.name!r}"
        self._require_int("QuantizeLinear form")
        if self.per_block_int_scale is not None:
            bits, signed, scale = self.compressed_bitwidth, True, self.block_scale
            codes = np.zeros(scale.shape, dtype=np.int64)
        else:
            bits, signed, scale = self.bitwidth, self.symmetric, np.array(self.scale)
            codes = -self.offset - (2 ** (bits - 1) if signed else 0)
        elem_type = _ONNX_TYPE_OF.get((bits, signed))
        if elem_type is None or (bits == 32 and np.any(codes != 0)):
            kind = "signed" if signed else "unsigned"
            raise InputError(
                f"{where}: ONNX has no type for {kind} {bits}-bit codes with these zero points "
                "(int4/uint4/int8/uint8/int16/uint16, or int32 with zero point 0)"
            )
        np_type = helper.tensor_dtype_to_np_dtype(elem_type)
        if self.kind == EncodingKind.PER_TENSOR:
            return QdqParams(scale, codes.astype(np_type), elem_type, None, None)
        if self.kind == EncodingKind.PER_CHANNEL:
            if self.axis is None:
                raise InputError(f"{where}: channel axis unknown (files do not record it); set axis first")
            if shape is not None and (self.axis >= len(shape) or shape[self.axis] != scale.shape[0]):
                raise InputError(
                    f"{where}: {scale.shape[0]} channels on axis {self.axis} do not fit shape {tuple(shape)}"
                )
            return QdqParams(scale, codes.astype(np_type), elem_type, self.axis, None)
        scale, codes = (self._to_blocked_layout(a, shape, where) for a in (scale, codes))
        return QdqParams(scale, codes.astype(np_type), elem_type, self.block_axis, self.block_size)

    def to_lpbq_qdq(self, shape: Sequence[int] | None = None) -> LpbqQdqParams:
        """The two-DequantizeLinear form of an LPBQ encoding (integer block scales kept as integers).

        Parameters
        ----------
        shape : sequence of int or None
            Shape of the weight; needed only when it has more than two dimensions.

        Returns
        -------
        LpbqQdqParams

        Raises
        ------
        InputError
            If this is not an LPBQ encoding or an axis is unknown.
        """
        where = f"encoding {self.name!r}"
        if self.kind != EncodingKind.LPBQ:
            raise InputError(f"{where}: {self.kind} encoding is not LPBQ")
        qdq = self.to_qdq(shape)
        int_type = np.uint8 if self.per_block_int_scale.max() <= 255 else np.uint16
        ints = self._to_blocked_layout(self.per_block_int_scale, shape, where).astype(int_type)
        return LpbqQdqParams(ints, np.array(self.scale), self.axis, qdq.zero_point, qdq.elem_type,
                             self.block_axis, self.block_size)

    def _to_blocked_layout(self, values: np.ndarray, shape: Sequence[int] | None, where: str) -> np.ndarray:
        """``(C, n_blocks)`` values in ONNX's blocked layout: the tensor's shape, blocked axis divided."""
        channel_axis, block_axis = self.axis, self.block_axis
        if channel_axis is None or block_axis is None:
            raise InputError(
                f"{where}: per-block encodings need axis (channel) and block_axis for ONNX; files do not "
                "record them, set them first"
            )
        channels, n_blocks = values.shape
        if shape is None:
            if {channel_axis, block_axis} != {0, 1}:
                raise InputError(f"{where}: pass the tensor's shape (axes {channel_axis}, {block_axis} imply rank > 2)")
            shape = [0, 0]
            shape[channel_axis], shape[block_axis] = channels, n_blocks * self.block_size
        shape = tuple(shape)
        if max(channel_axis, block_axis) >= len(shape) or shape[channel_axis] != channels or (
            -(-shape[block_axis] // self.block_size) != n_blocks
        ):
            raise InputError(
                f"{where}: {channels} channels x {n_blocks} blocks of {self.block_size} (axes {channel_axis}, "
                f"{block_axis}) do not fit shape {shape}"
            )
        ordered = values if channel_axis < block_axis else values.T
        others = tuple(d for d in range(len(shape)) if d not in (channel_axis, block_axis))
        target = tuple(n_blocks if d == block_axis else shape[d] for d in range(len(shape)))
        return np.ascontiguousarray(np.broadcast_to(np.expand_dims(ordered, others), target))


@dataclass
class Encodings:
    """The contents of an AIMET encodings file.

    Parameters
    ----------
    params : dict of str to TensorEncoding
        Parameter encodings keyed by parameter name (each key equals its encoding's ``name``).
    activations : dict of str to TensorEncoding
        Activation encodings keyed by tensor name.
    quantizer_args : dict or None
        The spec's ``quantizer_args`` (how the encodings were computed). Its ``is_symmetric`` and
        ``per_channel_quantization`` are bools here, written as "True"/"False" strings in 0.6.1.
    excluded_layers : list or None
        The spec's ``excluded_layers``.
    extra : dict
        Any other top-level keys of a file read, written back unchanged.
    """

    params: dict[str, TensorEncoding] = field(default_factory=dict)
    activations: dict[str, TensorEncoding] = field(default_factory=dict)
    quantizer_args: dict[str, Any] | None = None
    excluded_layers: list[Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


# Writing -------------------------------------------------------------------------------------------------------

_QUANTIZER_ARGS_BOOLS = ("is_symmetric", "per_channel_quantization")
_SECTIONS = (("activation_encodings", "activations"), ("param_encodings", "params"))


def write_encodings(path: str | os.PathLike[str], encodings: Encodings, version: str = "1.0.0") -> None:
    """Write ``encodings`` as an AIMET encodings file, atomically.

    Parameters
    ----------
    path : str or os.PathLike
        Output file (conventionally ``*.encodings``).
    encodings : Encodings
        What to write.
    version : {"1.0.0", "0.6.1"}
        File format. 0.6.1 cannot express per-block or LPBQ entries.

    Raises
    ------
    InputError
        For an unknown version, an entry the version cannot express (the message says to use 1.0.0 for
        blocks), or a key that differs from its entry's name. Nothing is written then.
    """
    if version not in VERSIONS:
        raise InputError(f"{path}: unknown encodings version {version!r} (supported: {', '.join(VERSIONS)})")
    document: dict[str, Any] = {"version": version}
    for section, attr in _SECTIONS:
        entries = getattr(encodings, attr)
        if version == "0.6.1":
            document[section] = {name: _entry_0_6_1(enc, _where(path, section, name)) for name, enc in
                                 _named(entries, path, section)}
        else:
            document[section] = [_entry_1_0_0(enc, _where(path, section, name)) for name, enc in
                                 _named(entries, path, section)]
    if encodings.quantizer_args is not None:
        document["quantizer_args"] = {
            key: str(value) if version == "0.6.1" and key in _QUANTIZER_ARGS_BOOLS and isinstance(value, bool)
            else value
            for key, value in encodings.quantizer_args.items()
        }
    if encodings.excluded_layers is not None:
        document["excluded_layers"] = list(encodings.excluded_layers)
    for key, value in encodings.extra.items():
        if key in document:
            raise InputError(f"{path}: extra top-level key {key!r} collides with a key the format defines")
        document[key] = value
    try:
        text = json.dumps(document, indent=2, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{path}: quantizer_args/excluded_layers/extra are not JSON data: {exc}") from None
    atomic_write_text(path, text + "\n")


def _named(entries: Mapping[str, TensorEncoding], path, section: str) -> Iterator[tuple[str, TensorEncoding]]:
    for name, enc in entries.items():
        if not isinstance(enc, TensorEncoding) or enc.name != name:
            raise InputError(f"{_where(path, section, name)}: must be a TensorEncoding named {name!r}")
        yield name, enc


def _check_file_bitwidth(enc: TensorEncoding, version: str, where: str) -> None:
    low, high = _FILE_BITWIDTHS[version]
    if enc.dtype == "int" and not low <= enc.bitwidth <= high:
        raise InputError(f"{where}: version {version} allows bit widths {low}..{high}, got {enc.bitwidth}")


def _entry_0_6_1(enc: TensorEncoding, where: str) -> list[dict[str, Any]]:
    if enc.dtype == "float":
        return [{"bitwidth": enc.bitwidth, "dtype": "float"}]
    if enc.kind in (EncodingKind.PER_BLOCK, EncodingKind.LPBQ):
        raise InputError(f"{where}: version 0.6.1 cannot express {enc.kind} encodings; write version 1.0.0")
    _check_file_bitwidth(enc, "0.6.1", where)
    return [
        {"bitwidth": enc.bitwidth, "dtype": "int", "is_symmetric": str(enc.symmetric), "max": hi, "min": lo,
         "offset": off, "scale": s}
        for s, off, lo, hi in zip(*(a.reshape(-1).tolist() for a in (enc.scale, enc.offset, enc.min, enc.max)))
    ]


def _entry_1_0_0(enc: TensorEncoding, where: str) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": enc.name, "dtype": enc.dtype.upper(), "enc_type": str(enc.kind),
                             "bw": enc.bitwidth}
    if enc.dtype == "float":
        return entry
    _check_file_bitwidth(enc, "1.0.0", where)
    entry["is_sym"] = enc.symmetric
    entry["scale"] = enc.scale.reshape(-1).tolist()
    entry["offset"] = enc.offset.reshape(-1).tolist()
    if enc.block_size is not None:
        entry["block_size"] = enc.block_size
    if enc.kind == EncodingKind.LPBQ:
        entry["compressed_bw"] = enc.compressed_bitwidth
        entry["per_block_int_scale"] = enc.per_block_int_scale.reshape(-1).tolist()
    return entry


# Reading -------------------------------------------------------------------------------------------------------

_KEYS_0_6_1_INT = {"bitwidth", "dtype", "is_symmetric", "max", "min", "offset", "scale"}
_KEYS_0_6_1_FLOAT = {"bitwidth", "dtype"}
_KEYS_1_0_0_FLOAT = {"name", "dtype", "enc_type", "bw"}


def read_encodings(path: str | os.PathLike[str], block_channels: Mapping[str, int] | None = None) -> Encodings:
    """Read an AIMET encodings file of version 0.6.1 or 1.0.0 (detected from its ``version``).

    Parameters
    ----------
    path : str or os.PathLike
        The file.
    block_channels : mapping of str to int, optional
        Output-channel count of each PER_BLOCK tensor: 1.0.0 flattens ``(C, n_blocks)`` scales and records
        neither dimension, so a PER_BLOCK entry missing from this mapping is refused. LPBQ entries need
        nothing (their per-channel scale gives C).

    Returns
    -------
    Encodings
        Entries have ``axis`` and ``block_axis`` None (files do not record them). A 0.6.1 entry with one
        dict is per-tensor, with several per-channel.

    Raises
    ------
    InputError
        Naming the file and the entry, for unreadable or malformed JSON, NaN or infinite numbers, missing or
        unknown keys, wrong types, inconsistent values, an unknown version or duplicate names.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read encodings file: {exc}") from None
    try:
        # NaN and Infinity literals parse as floats, so that the entry holding one is named when refused.
        document = json.loads(text, object_pairs_hook=_unique_keys)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise InputError(f"{path}: not valid JSON: {exc}") from None
    except InputError as exc:
        raise InputError(f"{path}: {exc}") from None
    if not isinstance(document, dict):
        raise InputError(f"{path}: the top level must be a JSON object, got {type(document).__name__}")
    version = document.get("version")
    if version not in VERSIONS:
        raise InputError(f"{path}: unsupported encodings version {version!r} (supported: {', '.join(VERSIONS)})")
    block_channels = dict(block_channels or {})
    result = Encodings()
    for section, attr in _SECTIONS:
        if section not in document:
            raise InputError(f"{path}: missing {section!r}")
        entries = document[section]
        target = getattr(result, attr)
        if version == "0.6.1":
            if not isinstance(entries, dict):
                raise InputError(f"{path}: {section} must be an object mapping names to lists in 0.6.1")
            for name, entry in entries.items():
                target[name] = _parse_0_6_1(name, entry, _where(path, section, name))
        else:
            if not isinstance(entries, list):
                raise InputError(f"{path}: {section} must be a list of encodings in 1.0.0")
            for index, entry in enumerate(entries):
                name = entry.get("name") if isinstance(entry, dict) else None
                where = _where(path, section, name if isinstance(name, str) else f"#{index}")
                enc = _parse_1_0_0(entry, block_channels, where)
                if enc.name in target:
                    raise InputError(f"{where}: duplicate name")
                target[enc.name] = enc
    if "quantizer_args" in document:
        args = document["quantizer_args"]
        if not isinstance(args, dict):
            raise InputError(f"{path}: quantizer_args must be an object")
        result.quantizer_args = {
            key: value == "True" if key in _QUANTIZER_ARGS_BOOLS and value in ("True", "False") else value
            for key, value in args.items()
        }
    if "excluded_layers" in document:
        if not isinstance(document["excluded_layers"], list):
            raise InputError(f"{path}: excluded_layers must be a list")
        result.excluded_layers = document["excluded_layers"]
    known = {"version", "quantizer_args", "excluded_layers"} | {section for section, _ in _SECTIONS}
    result.extra = {key: value for key, value in document.items() if key not in known}
    return result


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise InputError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _where(path, section: str, name: str) -> str:
    return f"{path}: {section} {name!r}"


def _parse_0_6_1(name: str, channels: Any, where: str) -> TensorEncoding:
    if not isinstance(channels, list) or not channels or not all(isinstance(c, dict) for c in channels):
        raise InputError(f"{where}: must be a non-empty list of encoding objects")
    dtype = channels[0].get("dtype")
    if dtype == "float":
        if len(channels) != 1:
            raise InputError(f"{where}: a float encoding is a single object")
        entry = channels[0]
        _check_keys(entry, _KEYS_0_6_1_FLOAT, _KEYS_0_6_1_FLOAT, where)
        return _build(where, name=name, dtype="float", bitwidth=entry["bitwidth"])
    if dtype != "int":
        raise InputError(f"{where}: dtype must be 'int' or 'float', got {dtype!r}")
    for entry in channels:
        _check_keys(entry, _KEYS_0_6_1_INT, _KEYS_0_6_1_INT, where)
        for key in ("min", "max"):
            _number(entry[key], f"{where}: {key}")
    first = channels[0]
    for key in ("dtype", "bitwidth", "is_symmetric"):
        if any(entry[key] != first[key] for entry in channels):
            raise InputError(f"{where}: every channel must have the same {key}")
    if first["is_symmetric"] not in ("True", "False"):
        raise InputError(f"{where}: is_symmetric must be the string 'True' or 'False', got {first['is_symmetric']!r}")
    scale = [_number(entry["scale"], f"{where}: scale") for entry in channels]
    offset = [_integral(entry["offset"], f"{where}: offset") for entry in channels]
    shape = () if len(channels) == 1 else (len(channels),)
    enc = _build(where, name=name, bitwidth=first["bitwidth"], symmetric=first["is_symmetric"] == "True",
                 scale=np.reshape(scale, shape), offset=np.reshape(offset, shape))
    _check_file_bitwidth(enc, "0.6.1", where)
    return enc


def _parse_1_0_0(entry: Any, block_channels: dict[str, int], where: str) -> TensorEncoding:
    if not isinstance(entry, dict):
        raise InputError(f"{where}: must be an encoding object")
    if entry.get("dtype") == "FLOAT":
        _check_keys(entry, _KEYS_1_0_0_FLOAT, _KEYS_1_0_0_FLOAT, where)
        if entry["enc_type"] != EncodingKind.PER_TENSOR:
            raise InputError(f"{where}: a FLOAT encoding is PER_TENSOR, got {entry['enc_type']!r}")
        return _build(where, name=entry["name"], dtype="float", bitwidth=entry["bw"])
    if entry.get("dtype") != "INT":
        raise InputError(f"{where}: dtype must be 'INT' or 'FLOAT', got {entry.get('dtype')!r}")
    kind = entry.get("enc_type")
    if kind not in list(EncodingKind):
        raise InputError(f"{where}: enc_type must be one of {', '.join(EncodingKind)}, got {kind!r}")
    required = {"name", "dtype", "enc_type", "bw", "is_sym", "scale", "offset"}
    if kind in (EncodingKind.PER_BLOCK, EncodingKind.LPBQ):
        required.add("block_size")
    if kind == EncodingKind.LPBQ:
        required |= {"compressed_bw", "per_block_int_scale"}
    _check_keys(entry, required, required | {"zero_point_shift"}, where)
    name = entry["name"]
    if not isinstance(name, str):
        raise InputError(f"{where}: name must be a string, got {name!r}")
    if not isinstance(entry["is_sym"], bool):
        raise InputError(f"{where}: is_sym must be true or false, got {entry['is_sym']!r}")
    scale = _number_list(entry["scale"], f"{where}: scale", _number)
    offset = _number_list(entry["offset"], f"{where}: offset", _integral)
    shift = _number_list(entry.get("zero_point_shift", [0.0] * len(offset)), f"{where}: zero_point_shift", _number)
    if any(shift):
        raise InputError(f"{where}: fractional zero points (zero_point_shift) are not supported")
    if len(scale) != len(offset):
        raise InputError(f"{where}: {len(scale)} scales but {len(offset)} offsets")
    fields: dict[str, Any] = {"name": name, "bitwidth": entry["bw"], "symmetric": entry["is_sym"]}
    if kind == EncodingKind.PER_TENSOR:
        if len(scale) != 1:
            raise InputError(f"{where}: PER_TENSOR has one scale, got {len(scale)}")
        fields.update(scale=np.array(scale[0]), offset=np.array(offset[0]))
    elif kind == EncodingKind.PER_CHANNEL:
        fields.update(scale=np.array(scale), offset=np.array(offset))
    elif kind == EncodingKind.PER_BLOCK:
        channels = block_channels.get(name)
        if channels is None:
            raise InputError(f"{where}: 1.0.0 does not record the channel count of PER_BLOCK scales; pass it in "
                             "block_channels")
        if not isinstance(channels, int) or channels < 1 or len(scale) % channels:
            raise InputError(f"{where}: {len(scale)} block scales do not split into {channels!r} channels")
        fields.update(scale=np.reshape(scale, (channels, -1)), offset=np.reshape(offset, (channels, -1)),
                      block_size=entry["block_size"])
    else:
        ints = _number_list(entry["per_block_int_scale"], f"{where}: per_block_int_scale", _integral)
        if len(ints) % len(scale):
            raise InputError(f"{where}: {len(ints)} per_block_int_scale values for {len(scale)} channels")
        fields.update(scale=np.array(scale), offset=np.array(offset), block_size=entry["block_size"],
                      compressed_bitwidth=entry["compressed_bw"],
                      per_block_int_scale=np.reshape(ints, (len(scale), -1)))
    enc = _build(where, **fields)
    _check_file_bitwidth(enc, "1.0.0", where)
    return enc


def _build(where: str, **fields: Any) -> TensorEncoding:
    """A TensorEncoding, its validation errors prefixed with the file and entry."""
    try:
        return TensorEncoding(**fields)
    except InputError as exc:
        message = str(exc)
        prefix = f"encoding {fields.get('name')!r}: "
        raise InputError(f"{where}: {message.removeprefix(prefix)}") from None


def _check_keys(entry: dict, required: set[str], allowed: set[str], where: str) -> None:
    missing = sorted(required - entry.keys())
    if missing:
        raise InputError(f"{where}: missing {', '.join(missing)}")
    unknown = sorted(entry.keys() - allowed)
    if unknown:
        raise InputError(f"{where}: unknown key(s) {', '.join(unknown)}")


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(f"{what} must be a finite number, got {value!r}")
    return value


def _integral(value: Any, what: str) -> int:
    number = _number(value, what)
    if number != int(number):
        raise InputError(f"{what} must be an integer, got {value!r}")
    return int(number)


def _number_list(values: Any, what: str, convert: Callable[[Any, str], float]) -> list:
    if not isinstance(values, list) or not values:
        raise InputError(f"{what} must be a non-empty list of numbers")
    return [convert(v, what) for v in values]


# Arrays --------------------------------------------------------------------------------------------------------


def _checked_int(value: Any, what: str, low: int, high: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or not low <= value <= high:
        raise InputError(f"{what} must be an integer in {low}..{high}, got {value!r}")
    return int(value)


def _as_array(value: Any) -> np.ndarray | None:
    try:
        return None if value is None else np.asarray(value)
    except (ValueError, TypeError):  # ragged or otherwise not an array
        return None


def _float_array(value: Any, what: str) -> np.ndarray:
    array = _as_array(value)
    if array is None or array.dtype.kind not in "iuf":
        raise InputError(f"{what} must be an array of numbers, got {value!r}")
    return array.astype(np.float64)


def _integer_array(value: Any, what: str) -> np.ndarray:
    array = _as_array(value)
    if array is not None and array.dtype in _INT4_DTYPES:
        array = array.astype(np.int64)
    if array is None or array.dtype.kind not in "iuf":
        raise InputError(f"{what} must be an array of integers, got {value!r}")
    if array.dtype.kind == "f" and not np.all(np.isfinite(array) & (array == np.round(array))):
        raise InputError(f"{what} must hold integers")
    return array.astype(np.int64)


def _check_scales(scale: np.ndarray, what: str) -> None:
    with np.errstate(over="ignore"):
        as_float32 = scale.astype(np.float32)
    if not (np.all(np.isfinite(scale)) and np.all(scale > 0) and np.all(np.isfinite(as_float32))
            and np.all(as_float32 > 0)):
        raise InputError(f"{what} must be finite and positive (in float32 too)")


def _read_only(array: np.ndarray) -> np.ndarray:
    array = np.array(array)  # a private copy nobody else can write through
    array.setflags(write=False)
    return array


def _onnx_int_type(elem_type: int, where: str) -> tuple[int, bool]:
    if elem_type not in _ONNX_INT_TYPES:
        names = ", ".join(TensorProto.DataType.Name(t) for t in _ONNX_INT_TYPES)
        raise InputError(f"{where}: quantized type {elem_type!r} is not one of {names}")
    return _ONNX_INT_TYPES[elem_type]


def _zero_points(zero_point: Any, shape: tuple[int, ...], elem_type: int, where: str) -> np.ndarray:
    if zero_point is None:
        return np.zeros(shape, dtype=np.int64)
    codes = _integer_array(zero_point, f"{where}: zero_point")
    if codes.shape != shape:
        raise InputError(f"{where}: zero_point shape {codes.shape} differs from scale shape {shape}")
    bits, signed = _ONNX_INT_TYPES[elem_type]
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    if elem_type == TensorProto.INT32:
        low = high = 0
    if codes.size and (codes.min() < low or codes.max() > high):
        raise InputError(f"{where}: zero points must lie in [{low}, {high}] for this type")
    return codes


def _normalize_axis(axis: Any, rank: int, where: str) -> int:
    if rank == 0:
        raise InputError(f"{where}: a 0-d scale has no axis")
    return _checked_int(axis, f"{where}: axis", -rank, rank - 1) % rank


def _from_blocked_layout(arrays: list[np.ndarray], block_axis: int, where: str) -> tuple[list[np.ndarray], int]:
    """``(C, n_blocks)`` views of arrays in ONNX's blocked layout, and the channel axis.

    The channel axis is the only other axis of size > 1, else 0 (1 when blocks run along axis 0); the
    arrays must be constant along every remaining axis, which AIMET's (C, n_blocks) cannot tell apart.
    """
    shape = arrays[0].shape
    if len(shape) < 2:
        raise InputError(f"{where}: blocked scales need at least two dimensions, got shape {shape}")
    others = [d for d in range(len(shape)) if d != block_axis]
    wide = [d for d in others if shape[d] > 1]
    channel_axis = wide[0] if len(wide) == 1 else (0 if block_axis != 0 else 1)
    result = []
    for array in arrays:
        moved = np.moveaxis(array, (channel_axis, block_axis), (0, 1))
        moved = moved.reshape(shape[channel_axis], shape[block_axis], -1)
        if not np.array_equal(moved, np.broadcast_to(moved[:, :, :1], moved.shape)):
            raise InputError(
                f"{where}: blocked scales vary along an axis other than channel {channel_axis} and block "
                f"{block_axis}; AIMET's (C, n_blocks) cannot express that"
            )
        result.append(np.ascontiguousarray(moved[:, :, 0]))
    return result, channel_axis


# QDQ models ----------------------------------------------------------------------------------------------------

_QDQ_DOMAINS = ("", "ai.onnx", "com.microsoft")
_QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


def encodings_from_qdq_model(model: onnx.ModelProto) -> Encodings:
    """The encodings of every QuantizeLinear/DequantizeLinear in a QDQ model, subgraphs included.

    Naming (AIMET keys params by parameter name and activations by tensor name):

    * A QuantizeLinear on a float constant (initializer or ``Constant``) is a param named after that constant.
    * A DequantizeLinear on an integer constant is a param named after the float weight it stands for: the
      constant's name without onnxruntime's ``_quantized`` suffix when it has one (``W_quantized`` -> ``W``),
      else the DequantizeLinear's output, the float tensor its consumers read.
    * A QuantizeLinear on any other tensor is an activation named after that tensor (the tensor before
      quantization), unless its DequantizeLinear produces a graph output: then after that output, the name
      the float model had (quantizers rename the tensor before, e.g. ``y_QuantizeLinear_Input``). The
      DequantizeLinear after a QuantizeLinear adds nothing. A DequantizeLinear on a non-constant tensor that
      no QuantizeLinear produced (a quantized graph input) is an activation named after its output.
    * A blocked DequantizeLinear whose scale is itself a DequantizeLinear of constants is LPBQ.

    Parameters
    ----------
    model : onnx.ModelProto
        The QDQ model (weights may stay in external files: only scales and zero points are read).

    Returns
    -------
    Encodings
        Per-channel and per-block entries carry their axes.

    Raises
    ------
    InputError
        For non-constant scales or zero points, layouts AIMET cannot express, or two different encodings
        for one name.
    """
    index = _ModelIndex(model)
    result = Encodings()
    origin: dict[tuple[str, str], str] = {}
    for node in index.nodes:
        if node.domain not in _QDQ_DOMAINS or node.op_type not in _QDQ_OPS:
            continue
        found = _node_encoding(node, index)
        if found is None:
            continue
        section, enc = found
        target = getattr(result, section)
        if enc.name in target and target[enc.name] != enc:
            raise InputError(
                f"{section} {enc.name!r}: nodes {origin[section, enc.name]!r} and {node.name!r} quantize it "
                "differently; an encodings file holds one encoding per tensor"
            )
        target[enc.name] = enc
        origin.setdefault((section, enc.name), node.name)
    return result


class _ModelIndex:
    """Every node of a model and its subgraphs, with constants, producers, element types and ranks by name."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.constants: dict[str, TensorProto] = {}
        self.producers: dict[str, onnx.NodeProto] = {}
        self.types: dict[str, int] = {}
        self.ranks: dict[str, int] = {}
        self.scales: set[str] = set()  # scale inputs of QuantizeLinear/DequantizeLinear nodes
        self.dequantized: dict[str, list[str]] = {}  # QuantizeLinear output -> outputs of DequantizeLinear on it
        self.graph_outputs = {info.name for info in model.graph.output}
        for _, graph in iter_graphs(model):
            for tensor in graph.initializer:
                self.constants[tensor.name] = tensor
            for info in [*graph.input, *graph.output, *graph.value_info]:
                tensor_type = info.type.tensor_type
                if tensor_type.elem_type:
                    self.types[info.name] = tensor_type.elem_type
                if tensor_type.HasField("shape"):
                    self.ranks[info.name] = len(tensor_type.shape.dim)
            for node in graph.node:
                self.nodes.append(node)
                for output in node.output:
                    self.producers[output] = node
                if node.op_type in _QDQ_OPS and node.domain in _QDQ_DOMAINS and len(node.input) > 1:
                    self.scales.add(node.input[1])
                    if node.op_type == "DequantizeLinear":
                        self.dequantized.setdefault(node.input[0], []).append(node.output[0])
                if node.op_type == "Constant" and node.domain in _QDQ_DOMAINS:
                    self.constants[node.output[0]] = _constant_value(node)
        for name, tensor in self.constants.items():
            self.types[name] = tensor.data_type
            self.ranks[name] = len(tensor.dims)

    def array(self, name: str, where: str) -> np.ndarray:
        """The value of a constant (scales and zero points must be constants)."""
        if name not in self.constants:
            raise InputError(f"{where}: {name!r} is not a constant; scales and zero points must be")
        try:
            return numpy_helper.to_array(self.constants[name])
        except (ValueError, TypeError, OSError) as exc:
            raise InputError(f"{where}: cannot read constant {name!r}: {exc}") from None

    def produced_by(self, name: str, op_type: str) -> onnx.NodeProto | None:
        node = self.producers.get(name)
        return node if node is not None and node.op_type == op_type and node.domain in _QDQ_DOMAINS else None


def _constant_value(node: onnx.NodeProto) -> TensorProto:
    """The value of a Constant node as a tensor (any of its numeric value attributes)."""
    for attribute in node.attribute:
        if attribute.name == "value":
            return attribute.t
        if attribute.name in ("value_float", "value_floats", "value_int", "value_ints"):
            value = np.array(helper.get_attribute_value(attribute),
                             dtype=np.float32 if "float" in attribute.name else np.int64)
            return numpy_helper.from_array(value, node.output[0])
    raise InputError(f"Constant node {node.name!r}: no numeric value (sparse and string constants are not scales)")


def param_name(quantized: str, dequantized: str) -> str:
    """The float weight's name for a DequantizeLinear from constant ``quantized`` to ``dequantized``."""
    stem = quantized.removesuffix("_quantized")
    return stem if stem and stem != quantized else dequantized


def _node_encoding(node: onnx.NodeProto, index: _ModelIndex) -> tuple[str, TensorEncoding] | None:
    """(section, encoding) of one QuantizeLinear/DequantizeLinear; None for a DequantizeLinear after a
    QuantizeLinear (which holds the same parameters) or one that makes another's scale (LPBQ's first level)."""
    x = node.input[0]
    where = f"{node.op_type} {node.name!r}"
    quantize = node.op_type == "QuantizeLinear"
    if not quantize and (index.produced_by(x, "QuantizeLinear") is not None or node.output[0] in index.scales):
        return None
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    block_size = attributes.get("block_size", 0)
    has_zero_point = len(node.input) > 2 and bool(node.input[2])
    zero_point = index.array(node.input[2], where) if has_zero_point else None
    if has_zero_point:
        elem_type = index.types[node.input[2]]
    elif quantize:
        elem_type = attributes.get("output_dtype", 0) or TensorProto.UINT8
    elif x in index.types:
        elem_type = index.types[x]
    else:
        raise InputError(f"{where}: {x!r} has no zero point and no declared type; its quantized type is unknown")
    if quantize and x in index.constants:
        section, name = "params", x
    elif quantize:
        exported = [out for out in index.dequantized.get(node.output[0], []) if out in index.graph_outputs]
        section, name = "activations", exported[0] if exported else x
    elif x in index.constants:
        section, name = "params", param_name(x, node.output[0])
    else:
        section, name = "activations", node.output[0]
    try:
        inner = index.produced_by(node.input[1], "DequantizeLinear")
        if inner is not None and node.input[1] not in index.constants:
            return section, _lpbq_encoding(name, inner, zero_point, elem_type, attributes, index)
        scale = index.array(node.input[1], where)
        axis = attributes.get("axis", 1)
        per_channel = not block_size and scale.ndim == 1 and scale.size > 1
        if per_channel and axis < 0:
            if x not in index.ranks:
                raise InputError(f"negative axis {axis} on {x!r}, whose rank is unknown")
            axis += index.ranks[x]
        axis = axis if block_size or per_channel else None
        return section, TensorEncoding.from_qdq(name, scale, zero_point, elem_type, axis, block_size or None)
    except InputError as exc:
        raise InputError(f"{where}: {exc}") from None


def _lpbq_encoding(
    name: str, inner: onnx.NodeProto, zero_point: np.ndarray | None, elem_type: int, attributes: dict,
    index: _ModelIndex,
) -> TensorEncoding:
    """LPBQ from a blocked DequantizeLinear whose scale is DequantizeLinear(int block scales, channel scales)."""
    if not attributes.get("block_size"):
        raise InputError("a dequantized scale is supported only for LPBQ (a blocked DequantizeLinear)")
    if zero_point is not None and np.any(zero_point.astype(np.int64) != 0):
        raise InputError("LPBQ weights have zero point 0")
    inner_where = f"DequantizeLinear {inner.name!r}"
    if len(inner.input) > 2 and inner.input[2]:
        if np.any(index.array(inner.input[2], inner_where).astype(np.int64) != 0):
            raise InputError(f"{inner_where}: LPBQ block scales have zero point 0")
    ints = index.array(inner.input[0], inner_where)
    channel_scale = index.array(inner.input[1], inner_where)
    return TensorEncoding.from_lpbq_qdq(name, ints, channel_scale, elem_type, attributes.get("axis", 1),
                                        attributes["block_size"])
