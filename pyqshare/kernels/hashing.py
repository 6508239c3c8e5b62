"""Content hashing of weight buffers: 128-bit XXH3 digests per chunk or per whole buffer.

The hash is XXH3-128 with seed 0 and the default secret, as specified in the xxHash specification
(``doc/xxhash_spec.md`` of Cyan4973/xxHash); pyqshare implements it itself and its tests check it against
the ``xxhash`` package. It is fast, not cryptographic: a matching digest only nominates two buffers as
duplicates, and :func:`buffers_equal` (byte-by-byte) must confirm it before anything relies on it.

Any C-contiguous object supporting the buffer protocol is read in place, never copied: ``bytes``,
``bytearray``, ``memoryview``, numpy arrays of any dtype, ``mmap.mmap``. The buffer is held (cannot be
resized or closed) and the GIL is released while it is hashed.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from pyqshare import _core
from pyqshare.kernels._common import require_int, resolve_num_threads

__all__ = ["ChunkHashes", "buffers_equal", "chunk_hash", "tensor_digest"]

_METHODS = ("fixed", "cdc")
_MIN_CDC_CHUNK_SIZE = 256


class ChunkHashes(NamedTuple):
    """Digests of consecutive chunks covering a buffer, in order.

    Attributes
    ----------
    digests : numpy.ndarray of uint64, shape (n, 2)
        XXH3-128 of each chunk: ``digests[i, 0]`` is the high 64 bits and ``digests[i, 1]`` the low
        64 bits, so the integer digest is ``(int(d[0]) << 64) | int(d[1])`` (``xxhash.xxh3_128_intdigest``)
        and ``digests[i].astype(">u8").tobytes()`` is the canonical 16 bytes
        (``xxhash.xxh3_128_digest``).
    offsets : numpy.ndarray of int64, shape (n,)
        Byte offset of each chunk in the buffer.
    lengths : numpy.ndarray of int64, shape (n,)
        Byte length of each chunk; ``offsets[i] + lengths[i] == offsets[i + 1]`` and the lengths sum to
        the buffer's size. An empty buffer has no chunks (n = 0).
    """

    digests: np.ndarray
    offsets: np.ndarray
    lengths: np.ndarray


def chunk_hash(data, *, chunk_size: int = 1 << 20, method: str = "fixed", num_threads: int | None = None) -> ChunkHashes:
    """Split a buffer into chunks and return the XXH3-128 digest of each.

    Parameters
    ----------
    data : buffer
        Any C-contiguous object supporting the buffer protocol (bytes, bytearray, memoryview, numpy
        array of any dtype, mmap), hashed as raw bytes in place. Non-contiguous views are refused with a
        ``ValueError``: pass ``np.ascontiguousarray(data)`` or ``bytes(data)`` to copy explicitly.
    chunk_size : int, default 1 MiB
        ``method="fixed"``: the chunk length (>= 1); the last chunk is shorter when the size is not a
        multiple of it. ``method="cdc"``: the target average chunk length (>= 256); chunks are between
        ``chunk_size // 4`` and ``4 * chunk_size`` bytes long, except the last one, which may be shorter.
    method : {"fixed", "cdc"}, default "fixed"
        ``"fixed"`` cuts every ``chunk_size`` bytes. ``"cdc"`` is content-defined chunking: whether a
        position is a cut candidate depends only on the 16 bytes before it, so inserting or removing
        bytes changes the chunks around the edit and leaves later chunks (and their digests) unchanged.
        For a position ``e >= 16`` (a chunk ending just before byte ``e``), with ``a, b, c, d`` the
        little-endian 16-bit words at ``e-8, e-6, e-4, e-2`` and 16-bit arithmetic modulo ``2**16``::

            f = (((a * 0x9E37 + b) * 0x85EB ^ (c * 0x9E37 + d)) + 0x6A09) * 0xC2B3
            g = mix64(u64(e - 8) + mix64(u64(e - 16)))       # modulo 2**64
            H = f << 48 | g >> 16

        where ``u64(i)`` is the little-endian 64-bit word at byte ``i`` and ``mix64`` is SplitMix64's
        finaliser (``z ^= z >> 30; z *= 0xBF58476D1CE4E5B9; z ^= z >> 27; z *= 0x94D049BB133111EB;
        z ^= z >> 31``). With ``b = floor(log2(chunk_size))`` (FastCDC's normalised chunking), a chunk
        starting at ``s`` ends at the first position ``e >= s + chunk_size // 4`` where the top ``b + 2``
        bits of ``H`` are zero, if one comes before ``s + chunk_size``; else at the first position where
        the top ``b - 2`` bits are zero, up to ``s + 4 * chunk_size``; else at ``s + 4 * chunk_size``.
        The end of the buffer is never a cut: the rest becomes the last chunk once it is no longer than
        these rules allow. On random data and on real weights the mean chunk length is about
        ``1.15 * 2**b``; input with too little entropy in 16-byte windows (long runs of zeros, one value
        repeated) has no candidates and is cut every ``4 * chunk_size`` bytes.
    num_threads : int or None
        Threads to use (None: :func:`pyqshare.get_num_threads`). The result does not depend on it.

    Returns
    -------
    ChunkHashes
        ``(digests, offsets, lengths)``, see :class:`ChunkHashes`.

    Raises
    ------
    TypeError
        If ``data`` does not support the buffer protocol, or an argument has the wrong type.
    ValueError
        If ``data`` is not C-contiguous, ``method`` is unknown or ``chunk_size`` is too small.
    """
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    threads = resolve_num_threads(num_threads)
    if method == "fixed":
        size = require_int(chunk_size, "chunk_size", 1)
        digests, offsets, lengths = _core.chunk_hash_fixed(data, size, threads)
    else:
        size = require_int(chunk_size, "chunk_size", _MIN_CDC_CHUNK_SIZE)
        digests, offsets, lengths = _core.chunk_hash_cdc(data, size, threads)
    return ChunkHashes(digests, offsets, lengths)


def tensor_digest(data, *, num_threads: int | None = None) -> bytes:
    """One 128-bit digest of a whole buffer, identical for any thread count.

    Buffers of at most 1 MiB (``LEAF = 2**20`` bytes) get their plain XXH3-128 digest. Longer buffers
    are cut into ``LEAF``-byte leaves (the last one shorter), each leaf is hashed with XXH3-128 (in
    parallel), and the digest is XXH3-128 of the leaves' canonical 16-byte digests concatenated in order,
    followed by the buffer's total length as 8 little-endian bytes::

        leaves = b"".join(xxh3_128_digest(data[i:i + LEAF]) for i in range(0, len(data), LEAF))
        digest = xxh3_128_digest(leaves + len(data).to_bytes(8, "little"))

    Parameters
    ----------
    data : buffer
        Any C-contiguous object supporting the buffer protocol (bytes, bytearray, memoryview, numpy
        array of any dtype, mmap), hashed as raw bytes in place; non-contiguous views are refused with a
        ``ValueError`` (copy explicitly with ``np.ascontiguousarray(data)`` or ``bytes(data)``).
    num_threads : int or None
        Threads to use (None: :func:`pyqshare.get_num_threads`). The result does not depend on it.

    Returns
    -------
    bytes
        16 bytes, canonical (big-endian: high 64 bits first), like ``xxhash.xxh3_128_digest``.

    Raises
    ------
    TypeError
        If ``data`` does not support the buffer protocol.
    ValueError
        If ``data`` is not C-contiguous.
    """
    return _core.tensor_digest(data, resolve_num_threads(num_threads))


def buffers_equal(a, b) -> bool:
    """Whether two buffers hold the same bytes: the byte-by-byte check that confirms matching digests.

    Parameters
    ----------
    a, b : buffer
        C-contiguous objects supporting the buffer protocol; compared as raw bytes, so dtype and shape
        are ignored (compare those separately if they matter). The GIL is released while comparing.

    Returns
    -------
    bool
        True if both have the same length and the same bytes.

    Raises
    ------
    TypeError
        If either does not support the buffer protocol.
    ValueError
        If either is not C-contiguous.
    """
    return _core.buffers_equal(a, b)
