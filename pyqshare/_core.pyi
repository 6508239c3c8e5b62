"""Typed stub for the compiled module pyqshare._core. Use pyqshare.kernels: it validates arguments."""

import numpy as np
import numpy.typing as npt

# --- hashing ---
# Buffers: any C-contiguous buffer-protocol object (bytes, bytearray, memoryview, ndarray, mmap), read in place.
# Digests: canonical 16 bytes (big-endian, high half first); digest arrays are (n, 2) uint64 [high, low].

def xxh3_128(data: object) -> bytes: ...
def xxh3_128_reference(data: object) -> bytes: ...
def chunk_hash_fixed(
    data: object, chunk_size: int, num_threads: int
) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.int64], npt.NDArray[np.int64]]: ...
def chunk_hash_cdc(
    data: object, chunk_size: int, num_threads: int
) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.int64], npt.NDArray[np.int64]]: ...
def cdc_chunk_ends_reference(data: object, chunk_size: int) -> npt.NDArray[np.uint64]: ...
def tensor_digest(data: object, num_threads: int) -> bytes: ...
def buffers_equal(a: object, b: object) -> bool: ...
def _set_hash_isa(name: str) -> str: ...
def _hash_isa() -> str: ...
def _hash_isas() -> list[str]: ...
def _set_cdc_isa(name: str) -> str: ...
def _cdc_isa() -> str: ...
def _cdc_isas() -> list[str]: ...

# --- quantization ---
# Layout arguments: kind 0 per tensor, 1 per axis, 2 blocked; (outer, length, inner) is the C-order view
# of the array around the quantization axis; block is the block length (kind 2).

def scale_search(
    w: npt.NDArray[np.float32],
    bits: int,
    symmetric: bool,
    objective: int,
    grid: int,
    p: float,
    kind: int,
    outer: int,
    length: int,
    inner: int,
    block: int,
    sample_weight: npt.NDArray[np.float64] | None,
    outer_off: npt.NDArray[np.int64] | None,
    length_off: npt.NDArray[np.int64] | None,
    inner_off: npt.NDArray[np.int64] | None,
    num_threads: int,
    refine: bool = True,
    isa: int = -1,
    reference: bool = False,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int32]]:
    """Flat (scale, zero_point) per group; objective 0 mse, 1 lp, 2 minmax; isa -1 auto, 0 portable, 1 AVX2, 2 AVX-512;
    reference: the scalar brute force over every candidate, the specification the fast search reproduces bit for bit."""

def quantize(
    x: npt.NDArray[np.float32],
    scale: npt.NDArray[np.float32],
    zero_point: npt.NDArray[np.int8 | np.uint8 | np.int16 | np.uint16],
    bits: int,
    kind: int,
    outer: int,
    length: int,
    inner: int,
    block: int,
    num_threads: int,
    simd: bool = True,
) -> npt.NDArray[np.int8 | np.uint8 | np.int16 | np.uint16]:
    """ONNX QuantizeLinear; codes take zero_point's dtype and x's shape; simd=False: portable loop."""

def dequantize(
    q: npt.NDArray[np.int8 | np.uint8 | np.int16 | np.uint16],
    scale: npt.NDArray[np.float32],
    zero_point: npt.NDArray[np.int8 | np.uint8 | np.int16 | np.uint16],
    bits: int,
    kind: int,
    outer: int,
    length: int,
    inner: int,
    block: int,
    num_threads: int,
    simd: bool = True,
) -> npt.NDArray[np.float32]:
    """ONNX DequantizeLinear; float32 with q's shape; simd=False: portable loop."""

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

# --- rounding (GPTQ's in-block step; pyqshare.quantization.rounding calls these) ---
def gptq_block_grid(
    work: npt.NDArray[np.float64], upper: npt.NDArray[np.float64], start: int, stop: int,
    scale: npt.NDArray[np.float64], zero_point: npt.NDArray[np.float64], qmin: float, qmax: float,
    codes: npt.NDArray[np.int32], errors: npt.NDArray[np.float64],
) -> None: ...
def gptq_block_codebook(
    work: npt.NDArray[np.float64], upper: npt.NDArray[np.float64], start: int, stop: int,
    codebooks: npt.NDArray[np.float64], midpoints: npt.NDArray[np.float64],
    codes: npt.NDArray[np.int32], errors: npt.NDArray[np.float64],
) -> None: ...
