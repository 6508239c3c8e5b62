"""Error-compensating rounding of linear-layer weights (GPTQ / Optimal Brain Quantization).

Rounding each weight to its nearest grid point ignores that the layer's inputs are correlated. With the Gram
matrix ``H = X^T X`` of the layer's calibration inputs, the rounding error of one input row can be pushed onto
the rows not yet rounded so that the layer's *output* error ``||X (W - Q)||`` shrinks (Frantar et al., GPTQ,
ICLR 2023; the row update is OBQ's closed form). Rows go in order of decreasing input energy ("act-order").
On all-MiniLM-L6-v2 this lifts int8 per-channel output SQNR by about 7 dB over nearest rounding.

:func:`gptq_round` snaps to an integer grid; :func:`gptq_assign` to a look-up table (weight clustering).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import numpy as np

from pyqshare import _core

_BLOCK = 128  # rows updated eagerly inside a block; the rest of the matrix gets one matrix product per block
_TRIANGULAR_BLOCK = 128  # below this size a triangular inverse is one LAPACK call


def gptq_round(
    weight: np.ndarray,
    scale: np.ndarray,
    zero_point: np.ndarray,
    qmin: int,
    qmax: int,
    gram: np.ndarray,
    *,
    damping: float = 0.01,
    reference: bool = False,
) -> np.ndarray:
    """Integer codes for ``weight`` on a fixed per-channel grid, chosen to minimise the layer's output error.

    Parameters
    ----------
    weight
        (I, O) float array: I input features (the reduction axis) by O output channels.
    scale, zero_point
        (O,) grid per output channel: value = (code - zero_point) * scale.
    qmin, qmax
        The code range (e.g. -128, 127).
    gram
        (I, I) Gram matrix ``X^T X`` of the layer's inputs over the calibration data.
    damping
        Fraction of the mean diagonal added to ``gram`` so that it is safely invertible.
    reference
        Run the in-block step in numpy (the reference the C++ step reproduces exactly) instead of C++.

    Returns
    -------
    np.ndarray
        (I, O) int32 codes.
    """
    scale = np.ascontiguousarray(np.broadcast_to(scale, weight.shape[1:]), dtype=np.float64)
    zero_point = np.ascontiguousarray(np.broadcast_to(zero_point, weight.shape[1:]), dtype=np.float64)

    def snap(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        code = np.clip(np.rint(values / scale) + zero_point, qmin, qmax)
        return code, (code - zero_point) * scale

    def step(work, upper, start, stop, codes, errors) -> None:
        _core.gptq_block_grid(work, upper, start, stop, scale, zero_point, float(qmin), float(qmax), codes, errors)

    return _compensated(weight, gram, partial(_snap_block, snap) if reference else step, damping)


def gptq_assign(
    weight: np.ndarray, codebooks: np.ndarray, gram: np.ndarray, *, damping: float = 0.01, reference: bool = False
) -> np.ndarray:
    """Codebook indices for ``weight`` (weight clustering), chosen to minimise the layer's output error.

    GPTQ with a look-up table in place of the integer grid: each row takes the nearest codebook value and
    its error is pushed onto the rows not yet assigned, as in :func:`gptq_round`.

    Parameters
    ----------
    weight
        (I, O) float array: I input features by O output channels.
    codebooks
        (1, k): one codebook for the whole weight, or (O, k): one per output channel; each row ascending.
    gram
        (I, I) Gram matrix ``X^T X`` of the layer's inputs over the calibration data.
    damping
        Fraction of the mean diagonal added to ``gram`` so that it is safely invertible.
    reference
        Run the in-block step in numpy (the reference the C++ step reproduces exactly) instead of C++.

    Returns
    -------
    np.ndarray
        (I, O) int32 indices into the codebook of each value's channel (ties go to the lower index).
    """
    codebooks = np.ascontiguousarray(codebooks, dtype=np.float64)
    midpoints = np.ascontiguousarray((codebooks[:, 1:] + codebooks[:, :-1]) / 2)
    channels = np.arange(weight.shape[1])

    def snap(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if len(codebooks) == 1:
            index = np.searchsorted(midpoints[0], values, side="left")
            return index, codebooks[0, index]
        index = np.sum(values[:, None] > midpoints, axis=1)
        return index, codebooks[channels, index]

    def step(work, upper, start, stop, codes, errors) -> None:
        _core.gptq_block_codebook(work, upper, start, stop, codebooks, midpoints, codes, errors)

    return _compensated(weight, gram, partial(_snap_block, snap) if reference else step, damping)


def inverse_upper_cholesky(h: np.ndarray) -> np.ndarray:
    """The upper-triangular ``U`` with ``U^T U = h^-1`` for a symmetric positive definite ``h``.

    ``U = J L^-1 J`` with ``L`` the Cholesky factor of ``J h J`` (``J`` reverses the order), so one Cholesky
    and one triangular inverse replace inverting ``h`` and factoring the inverse: 3x faster at 1536 x 1536.
    """
    reversed_factor = np.linalg.cholesky(h[::-1, ::-1])
    return _lower_triangular_inverse(reversed_factor)[::-1, ::-1]


def _lower_triangular_inverse(lower: np.ndarray) -> np.ndarray:
    """Inverse of a lower-triangular matrix by 2 x 2 blocks (numpy has no LAPACK trtri): two half-size
    inverses and two matrix products, a third of the work of a general inverse."""
    size = len(lower)
    if size <= _TRIANGULAR_BLOCK:
        return np.tril(np.linalg.inv(lower))  # pivoting leaves rounding dust above the diagonal
    half = size // 2
    top, bottom = _lower_triangular_inverse(lower[:half, :half]), _lower_triangular_inverse(lower[half:, half:])
    result = np.zeros_like(lower)
    result[:half, :half] = top
    result[half:, half:] = bottom
    result[half:, :half] = -bottom @ (lower[half:, :half] @ top)
    return result


def _snap_block(
    snap: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
    work: np.ndarray, upper: np.ndarray, start: int, stop: int, codes: np.ndarray, errors: np.ndarray,
) -> None:
    """The in-block step in numpy (the reference of ``_core.gptq_block_*``): snap rows ``start:stop`` of
    ``work`` one by one with ``snap(row) -> (codes, values)``, spreading each row's error onto the block's
    later rows."""
    for row in range(start, stop):
        codes[row], values = snap(work[row])
        error = (work[row] - values) / upper[row, row]
        errors[row - start] = error
        work[row + 1 : stop] -= np.outer(upper[row, row + 1 : stop], error)


BlockStep = Callable[[np.ndarray, np.ndarray, int, int, np.ndarray, np.ndarray], None]


def _compensated(weight: np.ndarray, gram: np.ndarray, step: BlockStep, damping: float) -> np.ndarray:
    """Snap ``weight`` row by row, compensating each row's error: ``step`` does the rows of one block, one
    matrix product per block carries their errors to the rows below.

    Returns the (I, O) int32 codes.
    """
    n_in = weight.shape[0]
    h = np.array(gram, dtype=np.float64)
    dead = np.diag(h) == 0  # inputs that never fire: their weights do not matter, round them plainly
    h[dead, dead] = 1.0
    order = np.argsort(-np.diag(h), kind="stable")
    h = h[np.ix_(order, order)]
    h[np.diag_indices(n_in)] += damping * float(np.mean(np.diag(h)))
    # Upper Cholesky factor of H^-1: row i holds the update that spreads row i's error onto rows > i.
    upper = np.ascontiguousarray(inverse_upper_cholesky(h))
    work = np.array(weight[order], dtype=np.float64)
    codes = np.empty(work.shape, dtype=np.int32)
    errors = np.empty((min(_BLOCK, n_in), work.shape[1]))
    for start in range(0, n_in, _BLOCK):
        stop = min(n_in, start + _BLOCK)
        step(work, upper, start, stop, codes, errors)
        work[stop:] -= upper[start:stop, stop:].T @ errors[: stop - start]
    result = np.empty_like(codes)
    result[order] = codes
    return result
