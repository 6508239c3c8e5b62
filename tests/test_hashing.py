"""pyqshare.kernels.hashing: XXH3-128 against the independent ``xxhash`` package, chunking and tree digest
against Python re-statements of their documented definitions, thread invariance, every ISA path, every
buffer type, refusals."""

from __future__ import annotations

import concurrent.futures
import mmap
import tracemalloc

import numpy as np
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

import pyqshare
from pyqshare import _core
from pyqshare.kernels.hashing import ChunkHashes, buffers_equal, chunk_hash, tensor_digest

LEAF = 1 << 20
MASK64 = (1 << 64) - 1
THREADS = (1, 2, 3, 7)


def random_bytes(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def rows_as_digests(digests: np.ndarray) -> list[bytes]:
    """Canonical 16-byte digests from an (n, 2) [high, low] uint64 array."""
    return [row.astype(">u8").tobytes() for row in digests]


def expected_tensor_digest(data: bytes) -> bytes:
    """The documented tree construction, computed with the xxhash package."""
    if len(data) <= LEAF:
        return xxhash.xxh3_128_digest(data)
    leaves = b"".join(xxhash.xxh3_128_digest(data[i : i + LEAF]) for i in range(0, len(data), LEAF))
    return xxhash.xxh3_128_digest(leaves + len(data).to_bytes(8, "little"))


def mix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on uint64 arrays (numpy array arithmetic wraps modulo 2**64)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def cut_hashes(data: bytes) -> np.ndarray:
    """H(e) for every position e (entries below 16 are unused), restated from the chunk_hash docstring."""
    b = np.frombuffer(data, dtype=np.uint8)
    n = len(b)
    out = np.zeros(max(n, 16), dtype=np.uint64)
    if n <= 16:
        return out
    e = np.arange(16, n)
    word = lambda at: b[at].astype(np.uint16) | (b[at + 1].astype(np.uint16) << np.uint16(8))  # noqa: E731
    k1, k2, k3, add = (np.uint16(v) for v in (0x9E37, 0x85EB, 0xC2B3, 0x6A09))
    with np.errstate(over="ignore"):
        ab = word(e - 8) * k1 + word(e - 6)
        cd = word(e - 4) * k1 + word(e - 2)
        f = (((ab * k2) ^ cd) + add) * k3
        read64 = lambda at: sum(b[at + i].astype(np.uint64) << np.uint64(8 * i) for i in range(8))  # noqa: E731
        g = mix64(read64(e - 8) + mix64(read64(e - 16)))
    out[16:] = (f.astype(np.uint64) << np.uint64(48)) | (g >> np.uint64(16))
    return out


def expected_cdc_ends(data: bytes, chunk_size: int) -> list[int]:
    """Content-defined chunk ends restated from the docstring: candidates first, then the rules per chunk."""
    b = chunk_size.bit_length() - 1
    hashes = cut_hashes(data)
    strict = (hashes >> np.uint64(64 - (b + 2))) == 0
    loose = (hashes >> np.uint64(64 - (b - 2))) == 0
    n, lo, hi = len(data), chunk_size // 4, 4 * chunk_size
    ends, start = [], 0
    while start < n:
        cut = next((e for e in range(start + lo, min(start + chunk_size, n)) if strict[e]), None)
        if cut is None:
            cut = next((e for e in range(start + chunk_size, min(start + hi + 1, n)) if loose[e]), None)
        if cut is None:
            cut = min(start + hi, n)
        ends.append(cut)
        start = cut
    return ends


@pytest.fixture(params=_core._hash_isas())
def isa(request):
    previous = _core._set_hash_isa(request.param)
    yield request.param
    _core._set_hash_isa(previous)


@pytest.fixture(params=_core._cdc_isas())
def cdc_isa(request):
    previous = _core._set_cdc_isa(request.param)
    yield request.param
    _core._set_cdc_isa(previous)


# ---- XXH3-128 itself ----


def test_isa_dispatch_picks_avx2_when_the_cpu_has_it():
    with open("/proc/cpuinfo") as f:
        flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    assert {"scalar", "sse2"} <= set(_core._hash_isas())
    if "avx2" in flags:
        assert "avx2" in _core._hash_isas()
        assert _core._hash_isa() == "avx2"
    with pytest.raises(ValueError, match="not available"):
        _core._set_hash_isa("neon")
    assert {"scalar", "sse2"} <= set(_core._cdc_isas())
    expected_scan = "avx512" if {"avx512f", "avx512bw", "bmi2"} <= set(flags) else "avx2" if "avx2" in flags else "sse2"
    assert _core._cdc_isa() == expected_scan
    with pytest.raises(ValueError, match="cdc ISA 'neon' is not available"):
        _core._set_cdc_isa("neon")


def test_every_length_0_to_2048_matches_xxhash(isa):
    data = memoryview(random_bytes(2048, seed=1))
    for n in range(2049):
        want = xxhash.xxh3_128_digest(data[:n])
        assert _core.xxh3_128(data[:n]) == want, n
        assert _core.xxh3_128_reference(data[:n]) == want, n


def test_large_and_block_boundary_lengths_match_xxhash(isa):
    data = memoryview(random_bytes(3 << 20, seed=2))
    rng = np.random.default_rng(3)
    boundaries = [k * 1024 + d for k in (1, 2, 3, 16, 17) for d in (-65, -64, -63, -1, 0, 1, 63, 64, 65)]
    for n in [*boundaries, *rng.integers(2049, len(data), 12).tolist(), len(data)]:
        assert _core.xxh3_128(data[:n]) == xxhash.xxh3_128_digest(data[:n]), n


def test_unaligned_starts_match_xxhash(isa):
    data = memoryview(random_bytes(40_000, seed=4))
    for offset in range(1, 16):
        for n in (0, 3, 8, 16, 100, 200, 241, 1023, 1025, 5000, 33_333):
            view = data[offset : offset + n]
            assert _core.xxh3_128(view) == xxhash.xxh3_128_digest(view), (offset, n)


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=3000), st.integers(1, 700))
def test_fixed_chunks_of_random_input_match_xxhash(data, chunk_size):
    result = chunk_hash(data, chunk_size=chunk_size)
    chunks = [data[i : i + chunk_size] for i in range(0, len(data), chunk_size)]
    assert rows_as_digests(result.digests) == [xxhash.xxh3_128_digest(c) for c in chunks]
    assert _core.xxh3_128(data) == xxhash.xxh3_128_digest(data)


# ---- chunk_hash, fixed ----


@pytest.mark.parametrize("size", [0, 1, 2, 3, 5, 7, 8, 15, 16, 17, 31, 33, 1000, 250_001])
@pytest.mark.parametrize("chunk_size", [1, 7, 16, 240, 241, 4096, 1 << 20])
def test_fixed_chunks_match_xxhash_per_chunk(size, chunk_size):
    data = random_bytes(size, seed=size)
    result = chunk_hash(data, chunk_size=chunk_size)
    assert isinstance(result, ChunkHashes)
    n = -(-size // chunk_size)
    assert result.digests.shape == (n, 2) and result.digests.dtype == np.uint64
    assert result.offsets.dtype == np.int64 and result.lengths.dtype == np.int64
    np.testing.assert_array_equal(result.offsets, np.arange(n) * chunk_size)
    np.testing.assert_array_equal(result.lengths, np.minimum(chunk_size, size - result.offsets))
    for (high, low), offset, length in zip(result.digests, result.offsets, result.lengths):
        want = xxhash.xxh3_128_intdigest(data[offset : offset + length])
        assert (int(high) << 64) | int(low) == want


def test_fixed_chunks_are_thread_invariant_on_every_isa(isa):
    data = random_bytes(5_000_003, seed=5)
    serial = chunk_hash(data, chunk_size=100_000, num_threads=1)
    assert rows_as_digests(serial.digests[:3]) == [xxhash.xxh3_128_digest(data[i : i + 100_000]) for i in (0, 100_000, 200_000)]
    for threads in THREADS[1:]:
        parallel = chunk_hash(data, chunk_size=100_000, num_threads=threads)
        for a, b in zip(serial, parallel):
            np.testing.assert_array_equal(a, b)
    tiny = chunk_hash(data[:100_000], chunk_size=3, num_threads=3)  # many tiny chunks per task
    np.testing.assert_array_equal(tiny.digests, chunk_hash(data[:100_000], chunk_size=3, num_threads=1).digests)


# ---- tensor_digest ----


@pytest.mark.parametrize("size", [0, 1, 17, 241, LEAF - 1, LEAF, LEAF + 1, 3 * LEAF + 5])
def test_tensor_digest_follows_the_documented_tree(size):
    data = random_bytes(size, seed=size)
    want = expected_tensor_digest(data)
    for threads in THREADS:
        assert tensor_digest(data, num_threads=threads) == want


def test_tensor_digest_is_the_same_on_every_isa(isa):
    data = random_bytes(2 * LEAF + 12_345, seed=6)
    assert tensor_digest(data, num_threads=2) == expected_tensor_digest(data)


# ---- chunk_hash, content-defined ----


@pytest.mark.parametrize(("size", "chunk_size"), [(0, 256), (1, 256), (63, 256), (64, 256), (20_000, 256), (60_000, 1000), (60_000, 4096)])
def test_cdc_matches_the_documented_definition(size, chunk_size):
    data = random_bytes(size, seed=7)
    result = chunk_hash(data, chunk_size=chunk_size, method="cdc")
    want = expected_cdc_ends(data, chunk_size)
    np.testing.assert_array_equal(result.offsets + result.lengths, want)
    np.testing.assert_array_equal(result.offsets, [0, *want[:-1]] if want else [])
    assert rows_as_digests(result.digests) == [xxhash.xxh3_128_digest(data[o : o + n]) for o, n in zip(result.offsets, result.lengths)]


@pytest.mark.parametrize("chunk_size", [256, 3000, 1 << 16, 1 << 20])
def test_cdc_scanners_match_the_one_pass_reference(chunk_size, cdc_isa):
    # Several 4 MiB scan segments, a low-entropy stretch (long runs), strict and loose tests both below and
    # above the 16 bits the vector filter decides alone; 1 thread hashes while scanning, more collect
    # candidates per segment.
    data = bytearray(random_bytes(9_000_007, seed=8))
    data[2_000_000:3_000_000] = bytes(1_000_000)
    data[5_000_000:5_400_000] = b"ab" * 200_000
    data = bytes(data)
    reference = _core.cdc_chunk_ends_reference(data, chunk_size)
    results = [chunk_hash(data, chunk_size=chunk_size, method="cdc", num_threads=t) for t in THREADS]
    np.testing.assert_array_equal(results[0].offsets + results[0].lengths, reference.astype(np.int64))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_array_equal(a, b)
    lengths = results[0].lengths
    assert lengths.sum() == len(data)
    assert lengths[:-1].min() >= chunk_size // 4 and lengths.max() <= 4 * chunk_size
    assert 0 < lengths[-1] <= 4 * chunk_size


def test_cdc_average_chunk_size_is_near_chunk_size():
    data = random_bytes(4_000_000, seed=9)
    for chunk_size in (1024, 8192, 65536):
        lengths = chunk_hash(data, chunk_size=chunk_size, method="cdc").lengths
        assert 0.9 * chunk_size < lengths[:-1].mean() < 1.4 * chunk_size


@pytest.mark.parametrize("chunk_size", [256, 1000])
def test_cdc_scanners_at_awkward_sizes_match_the_definition(chunk_size, cdc_isa):
    # Scan ranges end at every offset within and past a vector block (16, 32, 64 positions).
    for size in [0, 1, 15, 16, 17, 63, 64, 65, 127, 128, 129, 255, 256, 257, 1023, 1025, 3001, 4097, 9999]:
        data = random_bytes(size, seed=size)
        result = chunk_hash(data, chunk_size=chunk_size, method="cdc")
        assert (result.offsets + result.lengths).tolist() == expected_cdc_ends(data, chunk_size), (size, cdc_isa)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_cdc_cuts_real_looking_weights_near_chunk_size(dtype):
    # Heavy-tailed weights (Student-t) as a trained layer has them: candidates must occur at the usual
    # rate, not only on uniformly random bytes.
    weights = (0.02 * np.random.default_rng(13).standard_t(4, 3_000_000)).astype(dtype)
    for chunk_size in (4096, 65536):
        lengths = chunk_hash(weights, chunk_size=chunk_size, method="cdc").lengths[:-1]
        assert 0.9 * chunk_size < lengths.mean() < 1.4 * chunk_size, (dtype, chunk_size, lengths.mean())
        assert (lengths == 4 * chunk_size).mean() < 0.02  # max-size cuts are the low-entropy fallback


def test_cdc_low_entropy_input_falls_back_to_max_size_cuts():
    for data in (bytes(1_000_000), b"\x00\x00\x80?" * 250_000):  # zeros, float32 ones
        lengths = chunk_hash(data, chunk_size=4096, method="cdc").lengths
        assert (lengths[:-1] == 4 * 4096).all()


@pytest.mark.parametrize("edit", ["insert", "delete", "overwrite"])
def test_cdc_edits_near_the_start_leave_later_chunks_unchanged(edit):
    data = random_bytes(1_000_000, seed=10)
    at = 5_000
    edited = {
        "insert": data[:at] + b"inserted!" + data[at:],
        "delete": data[:at] + data[at + 37 :],
        "overwrite": data[:at] + b"X" * 11 + data[at + 11 :],
    }[edit]
    before = chunk_hash(data, chunk_size=4096, method="cdc")
    after = chunk_hash(edited, chunk_size=4096, method="cdc")
    old, new = set(rows_as_digests(before.digests)), set(rows_as_digests(after.digests))
    assert len(old) > 150
    assert len(old - new) <= 3  # only the chunks around the edit change
    fixed_old = set(rows_as_digests(chunk_hash(data, chunk_size=4096).digests))
    fixed_new = set(rows_as_digests(chunk_hash(edited, chunk_size=4096).digests))
    if edit != "overwrite":  # the point of CDC: fixed chunks all shift
        assert len(fixed_old & fixed_new) <= 2


def test_cdc_is_deterministic_and_covers_the_buffer():
    data = np.random.default_rng(11).standard_normal(300_000).astype(np.float32)
    a = chunk_hash(data, chunk_size=2048, method="cdc")
    b = chunk_hash(data.copy(), chunk_size=2048, method="cdc")
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert a.offsets[0] == 0 and a.lengths.sum() == data.nbytes
    np.testing.assert_array_equal(a.offsets[1:], np.cumsum(a.lengths)[:-1])


# ---- inputs ----


@pytest.fixture
def mapped_file(tmp_path):
    """A read-only mmap of a temporary file and the bytes it holds."""
    raw = np.random.default_rng(12).standard_normal((300, 7)).tobytes()
    path = tmp_path / "weights.bin"
    path.write_bytes(raw)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        yield raw, mapped


def test_every_buffer_type_hashes_its_raw_bytes(mapped_file):
    raw, mapped = mapped_file
    buffers = {
        "bytes": raw,
        "bytearray": bytearray(raw),
        "memoryview": memoryview(raw),
        "float64 2-D": np.frombuffer(raw, dtype=np.float64).reshape(300, 7),
        "float32": np.frombuffer(raw, dtype=np.float32),
        "float16": np.frombuffer(raw, dtype=np.float16),
        "int8": np.frombuffer(raw, dtype=np.int8),
        "uint64 3-D": np.frombuffer(raw, dtype=np.uint64).reshape(10, 30, 7),
        "complex128": np.frombuffer(raw, dtype=np.complex128),
        "bool": np.frombuffer(raw, dtype=np.bool_),
        "mmap": mapped,
        "memoryview of mmap": memoryview(mapped)[8:],
    }
    want_chunks = chunk_hash(raw, chunk_size=1000)
    for name, buf in buffers.items():
        expected = raw[8:] if name == "memoryview of mmap" else raw
        assert tensor_digest(buf) == xxhash.xxh3_128_digest(expected), name
        if expected is raw:
            np.testing.assert_array_equal(chunk_hash(buf, chunk_size=1000).digests, want_chunks.digests, err_msg=name)
        assert buffers_equal(buf, expected), name
    buffers["memoryview of mmap"].release()


def test_big_buffers_are_hashed_in_place():
    data = np.random.default_rng(13).integers(0, 2**63, 4 << 20, dtype=np.uint64)  # 32 MiB
    tracemalloc.start()
    try:
        tensor_digest(data, num_threads=2)
        chunk_hash(data, num_threads=2)
        chunk_hash(data, method="cdc", num_threads=2)
        buffers_equal(data, data.view(np.uint8))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20  # no copy of the 32 MiB input anywhere


def test_empty_buffers():
    for method in ("fixed", "cdc"):
        result = chunk_hash(b"", chunk_size=256, method=method)
        assert result.digests.shape == (0, 2) and result.offsets.shape == (0,) and result.lengths.shape == (0,)
    assert tensor_digest(b"") == xxhash.xxh3_128_digest(b"")
    assert tensor_digest(np.zeros((0, 5), np.float32)) == xxhash.xxh3_128_digest(b"")
    assert buffers_equal(b"", bytearray())


def test_buffers_equal_compares_bytes():
    data = random_bytes(100_000, seed=14)
    assert buffers_equal(data, np.frombuffer(data, np.uint8).copy())
    flipped = bytearray(data)
    flipped[-1] ^= 1
    assert not buffers_equal(data, flipped)
    assert not buffers_equal(data, data[:-1])


# ---- refusals ----


def test_non_contiguous_buffers_are_refused_with_a_hint():
    a = np.arange(100, dtype=np.float32)
    for bad in (a[::2], memoryview(a)[::2], np.asfortranarray(a.reshape(10, 10))):
        for call in (lambda x: chunk_hash(x), lambda x: chunk_hash(x, method="cdc"), tensor_digest, lambda x: buffers_equal(x, x)):
            with pytest.raises(ValueError, match=r"C-contiguous; pass np\.ascontiguousarray"):
                call(bad)


def test_objects_without_the_buffer_protocol_are_refused():
    for bad in ([1, 2, 3], "text", 3, None):
        with pytest.raises(TypeError, match="buffer protocol"):
            tensor_digest(bad)
        with pytest.raises(TypeError, match="buffer protocol"):
            chunk_hash(bad)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match=r"method must be one of \('fixed', 'cdc'\)"):
        chunk_hash(b"abc", method="rabin")
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        chunk_hash(b"abc", chunk_size=0)
    with pytest.raises(ValueError, match="chunk_size must be >= 256"):
        chunk_hash(b"abc", chunk_size=255, method="cdc")
    with pytest.raises(TypeError, match="chunk_size must be an int"):
        chunk_hash(b"abc", chunk_size=1.5)
    with pytest.raises(TypeError, match="chunk_size must be an int"):
        chunk_hash(b"abc", chunk_size=True)
    with pytest.raises(ValueError, match="num_threads must be >= 1"):
        tensor_digest(b"abc", num_threads=0)
    with pytest.raises(ValueError, match="num_threads must be >= 1"):
        _core.tensor_digest(b"abc", 0)  # the native layer checks too
    with pytest.raises(ValueError, match="chunk_size must be >= 256"):
        _core.chunk_hash_cdc(b"abc", 100, 1)


# ---- threads ----


def test_concurrent_python_threads_get_serial_results():
    buffers = [random_bytes(1_500_000 + 977 * k, seed=20 + k) for k in range(6)]
    serial = [(tensor_digest(b), chunk_hash(b, chunk_size=65536, method="cdc").digests) for b in buffers]

    def work(b):
        return tensor_digest(b, num_threads=2), chunk_hash(b, chunk_size=65536, method="cdc", num_threads=2).digests

    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        for (digest, chunks), (want_digest, want_chunks) in zip(pool.map(work, buffers * 2), serial * 2):
            assert digest == want_digest
            np.testing.assert_array_equal(chunks, want_chunks)


def test_default_thread_count_is_used_and_does_not_change_results():
    data = random_bytes(3 * LEAF + 1, seed=30)
    before = pyqshare.get_num_threads()
    try:
        pyqshare.set_num_threads(3)
        assert tensor_digest(data) == expected_tensor_digest(data)
    finally:
        pyqshare.set_num_threads(before)
