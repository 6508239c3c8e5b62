"""Argument handling shared by every kernel wrapper: thread counts, dtype and layout checks, axes."""

from __future__ import annotations

import math
import os
import threading

import numpy as np

_default_num_threads = 1
_lock = threading.Lock()


def set_num_threads(n: int) -> None:
    """Set the thread count kernels use when called with ``num_threads=None`` (default 1).

    Results never depend on it: every kernel is bit-identical for any thread count.
    """
    global _default_num_threads
    n = _check_thread_count(n)
    with _lock:
        _default_num_threads = n


def get_num_threads() -> int:
    """The thread count kernels use when called with ``num_threads=None``."""
    return _default_num_threads


def available_cores() -> int:
    """Cores this process may run on (a sensible value for ``set_num_threads``)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _check_thread_count(n) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"num_threads must be a positive int, got {n!r}")
    if n < 1:
        raise ValueError(f"num_threads must be >= 1, got {n}")
    return int(n)


def resolve_num_threads(num_threads: int | None) -> int:
    """``num_threads`` if given (validated), else the global default."""
    return _default_num_threads if num_threads is None else _check_thread_count(num_threads)


def require_array(x, name: str, dtypes: tuple, *, allow_empty: bool = True) -> np.ndarray:
    """Return ``x`` if it is a C-contiguous ndarray of one of ``dtypes``; raise saying what to pass otherwise.

    Nothing is converted here: a conversion would be a hidden copy of a possibly huge weight.
    """
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(x).__name__}")
    if x.dtype not in dtypes:
        wanted = ", ".join(np.dtype(d).name for d in dtypes)
        raise TypeError(f"{name} must have dtype {wanted}; got {x.dtype} (convert explicitly with .astype)")
    if not x.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous; pass np.ascontiguousarray({name}) to copy it explicitly")
    if not allow_empty and x.size == 0:
        raise ValueError(f"{name} must not be empty")
    return x


def normalize_axis(axis, ndim: int, name: str = "axis") -> int:
    """A non-negative axis index for an array of ``ndim`` dimensions."""
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {axis!r}")
    if not -ndim <= axis < ndim:
        raise ValueError(f"{name}={axis} is out of range for an array with {ndim} dimension(s)")
    return int(axis) % ndim


def split_shape(shape: tuple[int, ...], axis: int) -> tuple[int, int, int]:
    """View a C-contiguous array as (outer, length, inner) around ``axis``: no copy needed for any axis."""
    outer = math.prod(shape[:axis])
    inner = math.prod(shape[axis + 1 :])
    return outer, shape[axis], inner


def require_int(value, name: str, lo: int, hi: int | None = None) -> int:
    """An int in [lo, hi], or a clear error."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        bound = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return int(value)
