"""Typed stub for the compiled module pyqshare._core. Use pyqshare.kernels: it validates arguments."""

import numpy as np
import numpy.typing as npt

# --- sparsity ---
def nm_mask(
    w: npt.NDArray[np.floating],
    n: int,
    m: int,
    axis: int,
    scores: npt.NDArray[np.floating] | None = None,
    num_threads: int = 1,
    isa: str = "auto",
) -> npt.NDArray[np.bool_]: ...
def nm_mask_reference(
    w: npt.NDArray[np.floating], n: int, m: int, axis: int, scores: npt.NDArray[np.floating] | None = None
) -> npt.NDArray[np.bool_]: ...
def magnitude_mask(
    w: npt.NDArray[np.floating],
    k: int,
    rows: int,
    scores: npt.NDArray[np.floating] | None = None,
    num_threads: int = 1,
) -> npt.NDArray[np.bool_]: ...
def magnitude_mask_reference(
    w: npt.NDArray[np.floating], k: int, rows: int, scores: npt.NDArray[np.floating] | None = None
) -> npt.NDArray[np.bool_]: ...
def nm_compress(
    w: npt.NDArray[np.floating],
    n: int,
    m: int,
    axis: int,
    scores: npt.NDArray[np.floating] | None = None,
    num_threads: int = 1,
    isa: str = "auto",
) -> tuple[npt.NDArray[np.floating], npt.NDArray[np.uint8]]: ...
def nm_decompress(
    values: npt.NDArray[np.floating],
    indices: npt.NDArray[np.uint8],
    n: int,
    m: int,
    shape: list[int],
    axis: int,
    num_threads: int = 1,
) -> npt.NDArray[np.floating]: ...
def sparsity_best_isa() -> str: ...
