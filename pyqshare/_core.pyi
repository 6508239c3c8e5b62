"""Typed stub for the compiled module pyqshare._core. Use pyqshare.kernels: it validates arguments."""

import numpy as np
import numpy.typing as npt

# --- clustering ---
def kmeans1d(
    x: npt.NDArray[np.float32] | npt.NDArray[np.float64],
    k: int,
    outer: int,
    length: int,
    inner: int,
    sample_weight: npt.NDArray[np.float32] | npt.NDArray[np.float64] | None,
    optimal: bool,
    num_threads: int,
) -> tuple[
    npt.NDArray[np.float32] | npt.NDArray[np.float64],
    npt.NDArray[np.uint8] | npt.NDArray[np.uint16],
    npt.NDArray[np.float64],
]: ...
def kmeans1d_reference(
    values: npt.NDArray[np.float64], weights: npt.NDArray[np.float64] | None, k: int
) -> tuple[npt.NDArray[np.float64], float]: ...
