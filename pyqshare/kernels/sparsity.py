"""Sparsity kernels: N:M masks, magnitude masks and the packed N:M form.

Conventions shared by every function here:

* ``w`` is a C-contiguous ``float16``, ``float32`` or ``float64`` array (native byte order). Nothing is
  converted or copied: anything else is refused with a message saying what to pass.
* ``scores`` (optional) has ``w``'s shape and any of those three dtypes (independently of ``w``'s). With
  ``scores`` the *largest scores* are kept (signed: -3 < 1); without, the largest ``|w|``. ``-0.0`` and
  ``0.0`` compare equal.
* NaN or Inf in ``w`` or ``scores`` raises ``ValueError``.
* Ties are broken by index, deterministically: among equal keys the lower index is kept.
* Results are bit-identical for every ``num_threads``; ``None`` means :func:`pyqshare.get_num_threads`.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from pyqshare import _core
from pyqshare.kernels._common import normalize_axis, require_array, require_int, resolve_num_threads

__all__ = ["magnitude_mask", "nm_compress", "nm_decompress", "nm_mask"]

_FLOATS = (np.float16, np.float32, np.float64)
MAX_M = 65536
"""Largest supported group size ``m`` (in-group indices then fit 16 bits)."""


def _check_nm(n, m) -> tuple[int, int]:
    m = require_int(m, "m", 1, MAX_M)
    n = require_int(n, "n", 0, m)
    return n, m


def _check_axis_length(shape: tuple[int, ...], axis: int, m: int, what: str) -> None:
    length = shape[axis]
    if length % m:
        raise ValueError(
            f"{what}: the length {length} of axis {axis} is not divisible by m={m}; "
            f"pad or trim that axis to a multiple of {m}"
        )


def _check_scores(scores, w: np.ndarray) -> np.ndarray | None:
    if scores is None:
        return None
    scores = require_array(scores, "scores", _FLOATS)
    if scores.shape != w.shape:
        raise ValueError(f"scores must have the shape of w {w.shape}, got {scores.shape}")
    return scores


def _check_nm_weights(w, n, m, axis, scores, what: str) -> tuple[np.ndarray, int, int, int, np.ndarray | None]:
    """The validated arguments of an n:m selection over ``w`` (``what`` names the function in messages)."""
    w = require_array(w, "w", _FLOATS)
    n, m = _check_nm(n, m)
    if w.ndim == 0:
        raise ValueError(f"{what} needs an array with at least one dimension; pass w.reshape(1) or w.reshape(-1)")
    axis = normalize_axis(axis, w.ndim)
    _check_axis_length(w.shape, axis, m, what)
    return w, n, m, axis, _check_scores(scores, w)


def nm_mask(w, n, m, *, axis=-1, scores=None, num_threads=None) -> np.ndarray:
    """N:M structured-sparsity mask: keep the ``n`` largest of every ``m`` consecutive elements.

    Parameters
    ----------
    w : numpy.ndarray
        Weights, C-contiguous ``float16``/``float32``/``float64``, any number of dimensions (at least 1).
    n : int
        Elements kept per group, ``0 <= n <= m`` (``n=0`` keeps nothing, ``n=m`` keeps everything).
    m : int
        Group size, ``1 <= m <= 65536``. The length of ``axis`` must be a multiple of ``m``.
    axis : int, default -1
        The axis along which groups of ``m`` consecutive elements are formed; negative values count from
        the end. Any axis is handled in place (no transposed copy).
    scores : numpy.ndarray, optional
        Importance scores of ``w``'s shape (``float16``/``float32``/``float64``); the ``n`` largest scores
        are kept instead of the ``n`` largest ``|w|``.
    num_threads : int, optional
        Threads to use; ``None`` means the global default. The result does not depend on it.

    Returns
    -------
    numpy.ndarray of bool, ``w.shape``
        ``True`` where the element is kept: in every group exactly ``n`` are ``True``. Among equal
        magnitudes (or scores) the lower index wins, e.g. an all-zero group keeps its first ``n``.

    Raises
    ------
    TypeError
        ``w``/``scores`` not a numpy array of a supported dtype, or a non-integer ``n``/``m``/``axis``.
    ValueError
        Non-contiguous arrays, NaN/Inf in ``w`` or ``scores``, ``n``/``m`` out of range, ``axis`` out of
        range, or an axis length not divisible by ``m``.
    """
    w, n, m, axis, scores = _check_nm_weights(w, n, m, axis, scores, "nm_mask")
    return _core.nm_mask(w, n, m, axis, scores, resolve_num_threads(num_threads))


def magnitude_mask(w, sparsity, *, scores=None, per_row=False, num_threads=None) -> np.ndarray:
    """Unstructured magnitude-pruning mask with an exact number of zeros.

    Parameters
    ----------
    w : numpy.ndarray
        Weights, C-contiguous ``float16``/``float32``/``float64``, any shape (0-D and empty included).
    sparsity : float
        Fraction of zeros in ``[0, 1]``. Each pruned set (the tensor, or each row) of ``count`` elements
        gets exactly ``round(sparsity * count)`` zeros, with Python's :func:`round` (half to even) of the
        float64 product: e.g. 0.5 of 5 elements gives 2 zeros, 0.5 of 7 gives 4.
    scores : numpy.ndarray, optional
        Importance scores of ``w``'s shape (``float16``/``float32``/``float64``); the largest scores are kept
        instead of the largest ``|w|``.
    per_row : bool, default False
        ``False``: select over the whole tensor. ``True``: select independently in every row of the 2-D view
        ``w.reshape(w.shape[0], -1)``; a 1-D or 0-D ``w`` is a single row.
    num_threads : int, optional
        Threads to use; ``None`` means the global default. The result does not depend on it.

    Returns
    -------
    numpy.ndarray of bool, ``w.shape``
        ``True`` where kept. Every kept ``|w|`` (or score) is ``>=`` every dropped one. Ties are broken by
        the flat (row-major) index: among equal magnitudes the highest indices are zeroed first, so the
        lowest indices are kept.

    Raises
    ------
    TypeError
        ``w``/``scores`` not a numpy array of a supported dtype, or ``sparsity`` not a real number.
    ValueError
        Non-contiguous arrays, NaN/Inf in ``w`` or ``scores``, ``sparsity`` outside ``[0, 1]``.
    """
    w = require_array(w, "w", _FLOATS)
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real):
        raise TypeError(f"sparsity must be a float in [0, 1], got {sparsity!r}")
    sparsity = float(sparsity)
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    if not isinstance(per_row, (bool, np.bool_)):
        raise TypeError(f"per_row must be a bool, got {per_row!r}")
    scores = _check_scores(scores, w)
    num_threads = resolve_num_threads(num_threads)
    rows = w.shape[0] if per_row and w.ndim >= 2 else 1
    if w.size == 0:
        return np.zeros(w.shape, dtype=bool)
    zeros = round(sparsity * (w.size // rows))
    return _core.magnitude_mask(w, zeros, rows, scores, num_threads)


def nm_compress(w, n, m, axis=-1, *, scores=None, num_threads=None) -> tuple[np.ndarray, np.ndarray]:
    """Packed N:M form of ``w``: the kept values and their bit-packed in-group indices.

    The kept elements are those of :func:`nm_mask` with the same arguments.

    Parameters
    ----------
    w : numpy.ndarray
        Weights, C-contiguous ``float16``/``float32``/``float64``, at least 1-D.
    n, m : int
        Keep ``n`` of every ``m`` (``0 <= n <= m``, ``1 <= m <= 65536``); the length of ``axis`` must be a
        multiple of ``m``.
    axis : int, default -1
        The grouping axis (negative counts from the end).
    scores : numpy.ndarray, optional
        Select by the largest scores instead of the largest ``|w|``, as in :func:`nm_mask`.
    num_threads : int, optional
        Threads to use; ``None`` means the global default. The result does not depend on it.

    Returns
    -------
    values : numpy.ndarray, ``w.dtype``
        ``w.shape`` with the axis length ``L`` replaced by ``L * n // m``. Along the axis, group ``g``'s
        kept values sit at positions ``g*n .. g*n + n - 1`` in increasing in-group index order. Values are
        copied bit for bit (``-0.0`` stays ``-0.0``).
    indices : numpy.ndarray of uint8, 1-D
        ``b = ceil(log2(m))`` bits per kept element (``b = 0`` for ``m = 1``). The in-group index
        (``0 .. m-1``) of ``values.ravel()[e]`` is stored in bits ``[e*b, e*b + b)`` of a little-endian bit
        stream: stream bit ``i`` is bit ``i % 8`` (least significant first) of byte ``i // 8``, and each
        index's least significant bit comes first. Length ``ceil(values.size * b / 8)``; unused high bits
        of the last byte are zero.

    Raises
    ------
    TypeError, ValueError
        As for :func:`nm_mask`.
    """
    w, n, m, axis, scores = _check_nm_weights(w, n, m, axis, scores, "nm_compress")
    return tuple(_core.nm_compress(w, n, m, axis, scores, resolve_num_threads(num_threads)))


def nm_decompress(values, indices, n, m, shape, axis=-1, *, num_threads=None) -> np.ndarray:
    """Inverse of :func:`nm_compress`: the dense array with the dropped elements set to ``+0.0``.

    ``nm_decompress(*nm_compress(w, n, m, axis), n, m, w.shape, axis)`` equals
    ``np.where(nm_mask(w, n, m, axis=axis), w, 0)`` bit for bit (and ``w * mask`` in value: that product
    gives ``-0.0`` for dropped negative weights, which compares equal).

    Parameters
    ----------
    values : numpy.ndarray
        C-contiguous ``float16``/``float32``/``float64`` as returned by :func:`nm_compress`; its shape
        must be ``shape`` with the axis length ``L`` replaced by ``L * n // m``. Copied bit for bit (not
        checked for NaN/Inf).
    indices : numpy.ndarray of uint8
        1-D packed indices as returned by :func:`nm_compress`, exactly ``ceil(values.size * b / 8)`` bytes.
        Within each group the indices must be strictly increasing and below ``m`` (``ValueError``
        otherwise).
    n, m : int
        The ``n`` and ``m`` used to compress.
    shape : tuple of int
        Shape of the dense result (``w.shape``).
    axis : int, default -1
        The grouping axis used to compress.
    num_threads : int, optional
        Threads to use; ``None`` means the global default. The result does not depend on it.

    Returns
    -------
    numpy.ndarray of ``values.dtype`` and shape ``shape``
    """
    values = require_array(values, "values", _FLOATS)
    indices = require_array(indices, "indices", (np.uint8,))
    n, m = _check_nm(n, m)
    if isinstance(shape, (int, np.integer)) or not all(
        isinstance(d, (int, np.integer)) and not isinstance(d, bool) for d in shape
    ):
        raise TypeError(f"shape must be a tuple of ints, got {shape!r}")
    shape = tuple(int(d) for d in shape)
    if any(d < 0 for d in shape):
        raise ValueError(f"shape must not have negative dimensions, got {shape}")
    if len(shape) == 0:
        raise ValueError("nm_decompress needs a shape with at least one dimension")
    axis = normalize_axis(axis, len(shape))
    _check_axis_length(shape, axis, m, "nm_decompress")
    packed_shape = shape[:axis] + (shape[axis] // m * n,) + shape[axis + 1 :]
    if values.shape != packed_shape:
        raise ValueError(f"values must have shape {packed_shape} for shape={shape}, n={n}, m={m}, axis={axis}; "
                         f"got {values.shape}")
    bits = max(m - 1, 0).bit_length()
    expected = math.ceil(values.size * bits / 8)
    if indices.ndim != 1 or indices.size != expected:
        raise ValueError(f"indices must be 1-D with {expected} bytes (ceil({values.size} * {bits} / 8)), "
                         f"got shape {indices.shape}")
    return _core.nm_decompress(values, indices, n, m, list(shape), axis, resolve_num_threads(num_threads))
