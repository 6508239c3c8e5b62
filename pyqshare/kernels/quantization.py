"""Weight quantization for ONNX QuantizeLinear / DequantizeLinear: scale search, quantize, dequantize.

Layouts follow ONNX QuantizeLinear (opset 21):

* ``axis=None``: one scale for the whole tensor (0-d ``scale`` and ``zero_point``).
* ``axis=a``: one scale per index along ``a`` (shape ``(w.shape[a],)``); channel ``c``'s scale is computed
  from every element whose index along ``a`` is ``c`` (the reduction runs over all other axes).
* ``axis=a, block_size=B``: blocks of ``B`` consecutive indices along ``a``, every other index fixed;
  ``scale.shape`` is ``w.shape`` with ``w.shape[a]`` replaced by ``ceil(w.shape[a] / B)`` (the last block
  may be shorter). Per-channel-per-block on an ``(O, I)`` MatMul/Gemm weight is ``axis=1, block_size=B``.

Codes: ``symmetric=True`` uses signed codes ``[-2^(bits-1), 2^(bits-1) - 1]`` with ``zero_point == 0``;
``symmetric=False`` unsigned codes ``[0, 2^bits - 1]``. Codes and zero points are stored in int8/uint8 for
``bits <= 8`` and int16/uint16 above (4-bit values fit ONNX INT4/UINT4 once packed by the caller).
"""

from __future__ import annotations

import math

import numpy as np

from pyqshare import _core
from pyqshare.kernels._common import normalize_axis, require_array, require_int, resolve_num_threads

__all__ = ["scale_search", "quantize", "dequantize"]

_OBJECTIVES = {"mse": 0, "lp": 1, "minmax": 2}
_PER_TENSOR, _PER_AXIS, _BLOCKED = 0, 1, 2


def _code_dtype(bits: int, symmetric: bool) -> np.dtype:
    """The numpy dtype holding ``bits``-bit codes and zero points (signed when ``symmetric``)."""
    if bits <= 8:
        return np.dtype(np.int8 if symmetric else np.uint8)
    return np.dtype(np.int16 if symmetric else np.uint16)


def _layout(shape: tuple[int, ...], axis, block_size) -> tuple[int, int, int, int, int, int | None, tuple]:
    """(kind, outer, length, inner, block, axis, scale shape) of a validated layout request."""
    if block_size is not None:
        block_size = require_int(block_size, "block_size", 1)
        if axis is None:
            raise ValueError("block_size needs an axis: pass axis=a (blocks run along it) or block_size=None")
    if axis is None:
        return _PER_TENSOR, 1, 1, math.prod(shape), 1, None, ()
    if len(shape) == 0:
        raise ValueError("a 0-d array has no axis: pass axis=None")
    a = normalize_axis(axis, len(shape))
    outer, length, inner = math.prod(shape[:a]), shape[a], math.prod(shape[a + 1 :])
    if block_size is None:
        return _PER_AXIS, outer, length, inner, 1, a, (length,)
    n_blocks = -(-length // block_size)
    return _BLOCKED, outer, length, inner, block_size, a, shape[:a] + (n_blocks,) + shape[a + 1 :]


def _weight_offsets(sw: np.ndarray, shape: tuple[int, ...], axis: int | None):
    """Offset tables that broadcast ``sw`` to ``shape`` without copying it (None: same shape as w)."""
    if sw.shape == shape:
        return None
    if sw.ndim > len(shape):
        raise ValueError(f"sample_weight with shape {sw.shape} does not broadcast to w's shape {shape}")
    padded = (1,) * (len(shape) - sw.ndim) + sw.shape
    strides = []
    step = 1
    for dim in reversed(range(len(shape))):
        if padded[dim] not in (1, shape[dim]):
            raise ValueError(f"sample_weight with shape {sw.shape} does not broadcast to w's shape {shape}")
        strides.append(0 if padded[dim] == 1 else step)
        step *= padded[dim]
    strides.reverse()

    def table(dims: range) -> np.ndarray:
        off = np.zeros((), dtype=np.int64)
        for d in dims:
            off = np.add.outer(off, np.arange(shape[d], dtype=np.int64) * strides[d])
        return np.ascontiguousarray(off.reshape(-1))

    a = 0 if axis is None else axis
    if len(shape) == 0:
        zero = np.zeros(1, dtype=np.int64)
        return zero, zero, zero
    return table(range(a)), table(range(a, a + 1)), table(range(a + 1, len(shape)))


def _float32_weights(w, name: str) -> np.ndarray:
    w = require_array(w, name, (np.float32, np.float16))
    if w.dtype == np.float16:
        w = w.astype(np.float32)  # explicit widening copy: the kernels work on float32
    return w


def scale_search(
    w: np.ndarray,
    bits: int,
    *,
    axis: int | None = 0,
    block_size: int | None = None,
    symmetric: bool = True,
    objective: str = "mse",
    grid: int = 100,
    p: float = 2.0,
    sample_weight: np.ndarray | None = None,
    num_threads: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Choose ONNX QuantizeLinear ``(scale, zero_point)`` minimizing the quantization error of ``w``.

    For every group (the tensor, a channel or a block, see the module docstring) the search tries ``grid``
    clipping candidates and keeps the one whose quantize -> dequantize error is smallest, then tries the
    closed-form least-squares scale for the winner's codes and keeps it when its error is not larger.
    The result is exactly that of an exhaustive search over the same candidates (pruning only skips
    candidates proven worse), so its error is never worse than min-max (candidate 0).

    Parameters
    ----------
    w : numpy.ndarray
        C-contiguous float32 or float16 weights, finite (NaN or Inf raise ValueError). float16 is widened to
        float32 first (a visible copy); the search and the returned scales are for the float32 values.
    bits : int
        Code width, 2 to 16.
    axis : int or None, default 0
        ``None``: one scale for the tensor. ``a``: one scale per index along ``a`` (per channel).
    block_size : int or None, default None
        With ``axis=a``: blocks of ``block_size`` (>= 1) consecutive indices along ``a``; the last block may
        be shorter. Not allowed with ``axis=None``.
    symmetric : bool, default True
        True: signed codes ``[-2^(bits-1), 2^(bits-1)-1]``, ``zero_point = 0``. False: unsigned codes
        ``[0, 2^bits-1]`` with a zero point in that range.
    objective : {"mse", "lp", "minmax"}, default "mse"
        ``"mse"``: sum of ``sample_weight * d**2``; ``"lp"``: sum of ``sample_weight * |d|**p`` (``"lp"``
        with ``p=2`` is ``"mse"``); ``"minmax"``: candidate 0 (no clipping), no search, no refinement.
        ``d = float64(w) - float64(dequantize(quantize(w)))`` with the exact rules of :func:`quantize`.
    grid : int, default 100
        Number of candidates (>= 1). Candidate ``i`` in ``[0, grid)`` clips at ratio
        ``r = (grid - i) / grid`` (float64):

        * symmetric: ``scale = float32(r * M / (2^(bits-1) - 1))`` with ``M = max|w|`` over the group;
        * asymmetric: ``lo = r * min(min w, 0)``, ``hi = r * max(max w, 0)``,
          ``scale = float32((hi - lo) / (2^bits - 1))``,
          ``zero_point = clip(rint(-lo / scale), 0, 2^bits - 1)`` (``rint`` rounds half to even, float64).

        A scale below the smallest normal float32 (``2^-126``) is raised to it. A group whose elements are
        all zero (or an empty group) gets ``scale = 1``, ``zero_point = 0``.
    p : float, default 2.0
        Exponent of the ``"lp"`` objective, finite and > 0.
    sample_weight : numpy.ndarray or None
        Non-negative finite float32/float64 weights of each element's error, broadcastable to ``w.shape``
        (numpy rules) and not copied: e.g. shape ``(I,)`` weighs input feature ``j`` of an ``(O, I)`` weight by
        its activation energy; ``(I, 1, 1)`` does the same for an ``(O, I, kh, kw)`` convolution. float32
        weights are widened to float64 first (a visible copy). None: every weight is 1.
    num_threads : int or None
        Threads to use (default: :func:`pyqshare.set_num_threads`). Results do not depend on it.

    Returns
    -------
    scale : numpy.ndarray
        float32, positive and finite: 0-d for ``axis=None``, ``(w.shape[axis],)`` per axis, and ``w.shape``
        with ``w.shape[axis]`` replaced by ``ceil(w.shape[axis] / block_size)`` for blocks.
    zero_point : numpy.ndarray
        Same shape; int8/int16 zeros when symmetric, uint8/uint16 otherwise (8- or 16-bit storage by ``bits``).

    Notes
    -----
    The error of a candidate is accumulated in float64 in a fixed order (element ``k`` into lane
    ``k mod 16``, lanes added as a fixed tree; see csrc/scale_search.hpp), so ties and results are
    reproducible; ties go to the smaller candidate index. The refinement uses the winner's codes ``q``
    (code minus zero point), ``s* = sum(sw * w * q) / sum(sw * q * q)`` in float64 with the zero point kept,
    and replaces the winner by ``float32(s*)`` when the objective is not larger.
    """
    w = _float32_weights(w, "w")
    bits = require_int(bits, "bits", 2, 16)
    grid = require_int(grid, "grid", 1)
    if objective not in _OBJECTIVES:
        raise ValueError(f"objective must be one of {sorted(_OBJECTIVES)}, got {objective!r}")
    if not isinstance(symmetric, (bool, np.bool_)):
        raise TypeError(f"symmetric must be a bool, got {symmetric!r}")
    if isinstance(p, bool) or not isinstance(p, (int, float, np.integer, np.floating)) or not (0 < p < math.inf):
        raise ValueError(f"p must be a finite number > 0, got {p!r}")
    kind, outer, length, inner, block, a, scale_shape = _layout(w.shape, axis, block_size)
    sw = offsets = None
    if sample_weight is not None:
        sw = require_array(sample_weight, "sample_weight", (np.float32, np.float64))
        if sw.dtype == np.float32:
            sw = sw.astype(np.float64)  # explicit widening copy: errors are weighted in float64
        if not np.isfinite(sw).all() or (sw < 0).any():
            raise ValueError("sample_weight must be finite and >= 0 (use 0 to ignore an element)")
        if sw.size == 0 and w.size != 0:
            raise ValueError(f"sample_weight with shape {sw.shape} does not broadcast to w's shape {w.shape}")
        offsets = _weight_offsets(sw, w.shape, a)
        if offsets is not None and kind == _PER_TENSOR:
            # Per tensor uses the axis-0 view for the offset tables; same groups, same element order.
            shape = w.shape if w.ndim else (1,)
            outer, length, inner = 1, shape[0], math.prod(shape[1:])
            kind = _PER_TENSOR
    threads = resolve_num_threads(num_threads)
    scale, zp = _core.scale_search(
        w, bits, bool(symmetric), _OBJECTIVES[objective], grid, float(p), kind, outer, length, inner, block,
        sw, *(offsets if offsets is not None else (None, None, None)), threads,
    )
    return scale.reshape(scale_shape), zp.astype(_code_dtype(bits, bool(symmetric))).reshape(scale_shape)


def _check_params(x_shape, scale, zero_point, bits: int, axis, block_size):
    """Validate scale / zero_point against x's shape; returns the layout tuple for _core."""
    # numpy scalars (e.g. np.float32) are accepted as 0-d per-tensor parameters; dtypes are still checked.
    scale = np.asarray(scale) if isinstance(scale, np.generic) else scale
    zero_point = np.asarray(zero_point) if isinstance(zero_point, np.generic) else zero_point
    scale = require_array(scale, "scale", (np.float32,))
    dtypes = (np.int8, np.uint8) if bits <= 8 else (np.int16, np.uint16)
    zero_point = require_array(zero_point, "zero_point", dtypes)
    if zero_point.shape != scale.shape:
        raise ValueError(f"zero_point shape {zero_point.shape} must equal scale shape {scale.shape}")
    if scale.ndim == 0:
        if block_size is not None:
            raise ValueError("block_size needs a per-block scale (same rank as x), got a 0-d scale")
        axis = None  # a scalar scale is per tensor whatever the axis, as in ONNX
    kind, outer, length, inner, block, _, expected = _layout(x_shape, axis, block_size)
    if scale.shape != expected:
        raise ValueError(
            f"scale shape {scale.shape} does not match x shape {x_shape} with axis={axis}, "
            f"block_size={block_size}: expected {expected}"
        )
    if not (np.isfinite(scale).all() and (scale > 0).all()):
        raise ValueError("scale must be finite and > 0")
    signed = zero_point.dtype.kind == "i"
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    if zero_point.size and (zero_point.min() < lo or zero_point.max() > hi):
        raise ValueError(f"zero_point must lie in [{lo}, {hi}] for {bits}-bit {'signed' if signed else 'unsigned'} codes")
    return scale, zero_point, (kind, outer, length, inner, block)


def quantize(
    x: np.ndarray,
    scale: np.ndarray,
    zero_point: np.ndarray,
    bits: int,
    *,
    axis: int | None = 0,
    block_size: int | None = None,
    num_threads: int | None = None,
) -> np.ndarray:
    """ONNX QuantizeLinear: ``saturate(round_half_even(x / scale) + zero_point)``.

    ``x / scale`` is the float32 division (as onnxruntime computes it); saturation clips to the ``bits``-bit
    range of ``zero_point``'s signedness; ``+-Inf`` saturate. Matches onnxruntime bit for bit at 4, 8 and 16
    bits; other widths follow the same rules.

    Parameters
    ----------
    x : numpy.ndarray
        C-contiguous float32 values without NaN (NaN raises ValueError).
    scale : numpy.ndarray
        float32, finite and > 0: 0-d or a numpy float32 scalar (per tensor, ``axis`` is then ignored as in
        ONNX), ``(x.shape[axis],)``
        (per axis) or ``x.shape`` with ``x.shape[axis]`` replaced by ``ceil(x.shape[axis] / block_size)``.
    zero_point : numpy.ndarray
        Same shape as ``scale``; int8/uint8 for ``bits <= 8``, int16/uint16 above; its signedness picks the
        code range (signed ``[-2^(bits-1), 2^(bits-1)-1]``, unsigned ``[0, 2^bits-1]``) and must hold it.
    bits : int
        Code width, 2 to 16.
    axis : int or None, default 0
        Axis of per-axis or blocked scales (as returned by :func:`scale_search` with the same arguments).
    block_size : int or None, default None
        Block length along ``axis`` for blocked scales.
    num_threads : int or None
        Threads to use (default: :func:`pyqshare.set_num_threads`). Results do not depend on it.

    Returns
    -------
    numpy.ndarray
        Codes with ``x``'s shape and ``zero_point``'s dtype.
    """
    x = require_array(x, "x", (np.float32,))
    bits = require_int(bits, "bits", 2, 16)
    scale, zero_point, layout = _check_params(x.shape, scale, zero_point, bits, axis, block_size)
    return _core.quantize(x, scale.reshape(-1), zero_point.reshape(-1), bits, *layout, resolve_num_threads(num_threads))


def dequantize(
    q: np.ndarray,
    scale: np.ndarray,
    zero_point: np.ndarray,
    bits: int,
    *,
    axis: int | None = 0,
    block_size: int | None = None,
    num_threads: int | None = None,
) -> np.ndarray:
    """ONNX DequantizeLinear: ``float32(q - zero_point) * scale`` (float32 product, as onnxruntime).

    Parameters
    ----------
    q : numpy.ndarray
        C-contiguous codes with ``zero_point``'s dtype, within the ``bits``-bit range (else ValueError).
    scale, zero_point, bits, axis, block_size, num_threads
        As for :func:`quantize`.

    Returns
    -------
    numpy.ndarray
        float32 values with ``q``'s shape.
    """
    bits = require_int(bits, "bits", 2, 16)
    if not isinstance(q, np.ndarray):
        raise TypeError(f"q must be a numpy.ndarray, got {type(q).__name__}")
    scale, zero_point, layout = _check_params(q.shape, scale, zero_point, bits, axis, block_size)
    q = require_array(q, "q", (zero_point.dtype,))
    return _core.dequantize(q, scale.reshape(-1), zero_point.reshape(-1), bits, *layout, resolve_num_threads(num_threads))
