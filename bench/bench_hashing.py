"""Hashing throughput over one big random buffer (1 GiB at full size): pyqshare's chunk_hash (fixed and
content-defined, 1 MiB chunks) and tensor_digest on one and two threads, against hashlib md5 and sha256,
blake3 on one thread, the xxhash package's xxh3_128 and a single-threaded numpy read of the same memory
(the bandwidth ceiling for one thread). Every workload group runs the same peers on the same buffer."""

from __future__ import annotations

import hashlib

import blake3
import numpy as np
import pytest
import xxhash

from pyqshare import _core
from pyqshare.kernels.hashing import chunk_hash, tensor_digest

CHUNK = 1 << 20
LEAF = 1 << 20
WORKLOADS = {
    "fixed": "hash a buffer: chunk_hash fixed, 1 MiB chunks",
    "digest": "hash a buffer: tensor_digest",
    "cdc": "hash a buffer: chunk_hash cdc, 1 MiB average",
}


@pytest.fixture(scope="module")
def data(scaled):
    size = scaled(1 << 30, (4 << 20) + 123)
    words = np.random.default_rng(0).integers(0, 2**64, size // 8 + 1, dtype=np.uint64, endpoint=False)
    return words.view(np.uint8)[:size]


def xxh3_chunks(view: memoryview, offsets, lengths) -> np.ndarray:
    ints = [xxhash.xxh3_128_intdigest(view[o : o + n]) for o, n in zip(offsets.tolist(), lengths.tolist())]
    return np.array([[d >> 64, d & ((1 << 64) - 1)] for d in ints], dtype=np.uint64).reshape(-1, 2)


def tree_digest_with_xxhash(view: memoryview) -> bytes:
    if len(view) <= LEAF:
        return xxhash.xxh3_128_digest(view)
    leaves = b"".join(xxhash.xxh3_128_digest(view[i : i + LEAF]) for i in range(0, len(view), LEAF))
    return xxhash.xxh3_128_digest(leaves + len(view).to_bytes(8, "little"))


PEERS = {
    "numpy read (sum uint64)": lambda d: d.view(np.uint64).sum(),
    "xxhash xxh3_128": xxhash.xxh3_128_digest,
    "blake3 (1 thread)": lambda d: blake3.blake3(d, max_threads=1).digest(),
    "hashlib sha256": lambda d: hashlib.sha256(d).digest(),
    "hashlib md5": lambda d: hashlib.md5(d).digest(),
}
SLOW_PEERS = {"hashlib md5", "hashlib sha256"}
OURS = {"pyqshare": 1, "pyqshare 2 threads": 2}


def cases():
    """Every (workload, implementation) pair, a group's runs back to back: the machine's load drifts, and
    ratios are only meaningful between runs close in time."""
    return [
        pytest.param(workload, impl, id=f"{workload}-{impl}", marks=pytest.mark.benchmark(group=group))
        for workload, group in WORKLOADS.items()
        for impl in [*OURS, *PEERS]
    ]


@pytest.mark.parametrize(("workload", "impl"), cases())
def test_hashing(benchmark, run_once, data, workload, impl):
    benchmark.extra_info["impl"] = impl
    benchmark.extra_info["bytes"] = data.nbytes
    if impl in OURS:
        isa = _core._hash_isa() if workload != "cdc" else f"{_core._hash_isa()}, cut scan {_core._cdc_isa()}"
        benchmark.extra_info["note"] = f"{data.nbytes / 2**20:.0f} MiB random, ISA {isa}"
        run_pyqshare(benchmark, data, workload, OURS[impl])
    else:
        run_peer(benchmark, run_once, data, impl)


def run_pyqshare(benchmark, data, workload, threads):
    view = memoryview(data)
    if workload == "digest":
        result = benchmark(tensor_digest, data, num_threads=threads)
        assert result == tree_digest_with_xxhash(view)
        return
    result = benchmark(chunk_hash, data, chunk_size=CHUNK, method=workload, num_threads=threads)
    assert int(result.lengths.sum()) == data.nbytes
    np.testing.assert_array_equal(result.digests, xxh3_chunks(view, result.offsets, result.lengths))
    if workload == "cdc":
        ends = _core.cdc_chunk_ends_reference(data, CHUNK)
        np.testing.assert_array_equal(result.offsets + result.lengths, ends.astype(np.int64))


def run_peer(benchmark, run_once, data, peer):
    words = data[: data.nbytes // 8 * 8]  # the numpy read needs whole uint64 words
    target = words if peer.startswith("numpy") else data
    fn = PEERS[peer]
    result = run_once(fn, target) if peer in SLOW_PEERS else benchmark(fn, target)
    if peer == "xxhash xxh3_128":
        assert result == _core.xxh3_128(data)
    elif peer.startswith("numpy"):
        u = words.view(np.uint64)
        assert int(result) == (int(u[0::2].sum()) + int(u[1::2].sum())) % 2**64  # the same sum, read another way
    else:
        assert len(result) == {"hashlib md5": 16}.get(peer, 32)
