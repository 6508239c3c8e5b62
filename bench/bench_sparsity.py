"""Sparsity benchmarks: pyqshare against numpy and torch peers on the same data, in the same run.

Throughput (the table's GB/s) counts bytes read + written: for ``nm_mask`` the float32 input plus the
one-byte-per-element bool mask; for the copy peer (``memcpy (numpy copyto)``, the single-thread bandwidth
reference) the array read plus the array written. So "nm_mask GB/s / copy GB/s" is the fraction of copy
bandwidth the kernel reaches.

Data is standard-normal float32. Torch's ``topk``/``kthvalue`` do not promise which of equal values wins, so
torch results are compared only on groups (rows) without tied magnitudes; every other peer breaks ties like
pyqshare (lowest index kept) and must agree everywhere.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pyqshare import _core
from pyqshare.kernels import magnitude_mask, nm_compress, nm_decompress, nm_mask

NM_SHAPES = {"4096x4096": (4096, 4096), "11008x4096": (11008, 4096)}
NM_PATTERNS = [(2, 4), (4, 8)]
MASK_PEERS = ["pyqshare", "pyqshare 2 threads", "memcpy (numpy copyto)", "numpy rank comparison", "numpy argsort",
              "torch topk"]

_data: dict = {}


def weights(shape):
    """Standard-normal float32, generated once per shape and shared by every implementation."""
    if shape not in _data:
        _data.clear()  # keep at most one large array alive
        _data[shape] = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    return _data[shape]


# ----- peers ---------------------------------------------------------------------------------------------


def numpy_rank_mask(w, n, m):
    """Per element, count the group members that beat it (larger, or equal at a lower index), column-wise."""
    a = np.abs(w).reshape(-1, m)
    keep = np.empty(a.shape, dtype=bool)
    for i in range(m):
        rank = np.zeros(a.shape[0], dtype=np.int32)
        for j in range(m):
            if j != i:
                rank += (a[:, j] >= a[:, i]) if j < i else (a[:, j] > a[:, i])
        keep[:, i] = rank < n
    return keep.reshape(w.shape)


def numpy_argsort_mask(w, n, m):
    a = np.abs(w).reshape(-1, m)
    order = np.argsort(-a, axis=1, kind="stable")
    keep = np.zeros(a.shape, dtype=bool)
    np.put_along_axis(keep, order[:, :n], True, axis=1)
    return keep.reshape(w.shape)


def torch_topk_mask(w, n, m):
    a = torch.from_numpy(w).abs().view(-1, m)
    keep = torch.zeros(a.shape, dtype=torch.bool)
    keep.scatter_(1, a.topk(n, dim=1).indices, True)
    return keep.view(w.shape).numpy()


def rows_without_ties(values_2d):
    s = np.sort(values_2d, axis=1)
    return ~(s[:, 1:] == s[:, :-1]).any(axis=1)


class one_torch_thread:
    def __enter__(self):
        self.before = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.before)


# ----- nm_mask -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", MASK_PEERS)
@pytest.mark.parametrize(("n", "m"), NM_PATTERNS, ids=[f"{n}:{m}" for n, m in NM_PATTERNS])
@pytest.mark.parametrize("size", list(NM_SHAPES))
def test_nm_mask(benchmark, run_once, scaled, size, n, m, impl):
    w = weights(scaled(NM_SHAPES[size], (64, 256)))
    benchmark.group = f"nm_mask {n}:{m} {'x'.join(map(str, w.shape))} float32 axis=-1"
    benchmark.extra_info["impl"] = impl
    benchmark.extra_info["bytes"] = w.nbytes + w.size
    expected = _core.nm_mask_reference(w, n, m, 1) if w.size <= 1 << 16 else numpy_rank_mask(w, n, m)
    if impl == "pyqshare":
        got = benchmark(nm_mask, w, n, m, num_threads=1)
    elif impl == "pyqshare 2 threads":
        got = benchmark(nm_mask, w, n, m, num_threads=2)
    elif impl == "memcpy (numpy copyto)":
        dst = np.empty_like(w)
        benchmark(np.copyto, dst, w)
        benchmark.extra_info["bytes"] = 2 * w.nbytes
        benchmark.extra_info["note"] = "bandwidth reference: bytes = array read + written"
        assert np.array_equal(dst, w)
        return
    elif impl == "numpy rank comparison":
        got = run_once(numpy_rank_mask, w, n, m)
    elif impl == "numpy argsort":
        got = run_once(numpy_argsort_mask, w, n, m)
    else:
        with one_torch_thread():
            got = run_once(torch_topk_mask, w, n, m)
        untied = rows_without_ties(np.abs(w).reshape(-1, m))
        benchmark.extra_info["note"] = f"1 torch thread; compared on the {untied.mean():.6%} of groups without ties"
        assert np.array_equal(got.reshape(-1, m)[untied], expected.reshape(-1, m)[untied])
        return
    assert np.array_equal(got, expected)


# ----- magnitude_mask ------------------------------------------------------------------------------------


def numpy_magnitude_mask(w, sparsity, per_row):
    a = np.abs(w).reshape(w.shape[0] if per_row else 1, -1)
    k = round(sparsity * a.shape[1])
    drop = np.argpartition(a, k - 1, axis=1)[:, :k]
    keep = np.ones(a.shape, dtype=bool)
    np.put_along_axis(keep, drop, False, axis=1)
    return keep.reshape(w.shape)


def torch_magnitude_mask(w, sparsity, per_row):
    a = torch.from_numpy(w).abs().view(w.shape[0] if per_row else 1, -1)
    k = round(sparsity * a.shape[1])
    threshold = a.kthvalue(k, dim=1, keepdim=True).values
    return (a > threshold).view(w.shape).numpy()


@pytest.mark.parametrize("impl", ["pyqshare", "pyqshare 2 threads", "numpy argpartition", "torch kthvalue"])
@pytest.mark.parametrize("per_row", [False, True], ids=["per tensor", "per row"])
def test_magnitude_mask(benchmark, run_once, scaled, per_row, impl):
    w = weights(scaled((4096, 4096), (64, 256)))
    benchmark.group = f"magnitude_mask 50% {'per row' if per_row else 'per tensor'} {w.shape[0]}x{w.shape[1]} float32"
    benchmark.extra_info["impl"] = impl
    benchmark.extra_info["bytes"] = w.nbytes + w.size
    if impl.startswith("pyqshare"):
        threads = 2 if "2" in impl else 1
        got = benchmark(magnitude_mask, w, 0.5, per_row=per_row, num_threads=threads)
    elif impl == "numpy argpartition":
        got = run_once(numpy_magnitude_mask, w, 0.5, per_row)
    else:
        with one_torch_thread():
            got = run_once(torch_magnitude_mask, w, 0.5, per_row)
        benchmark.extra_info["note"] = "1 torch thread"
    # Equal magnitudes at the threshold may be split differently by the peers: compare everything else.
    rows = w.shape[0] if per_row else 1
    a = np.abs(w).reshape(rows, -1)
    ours = magnitude_mask(w, 0.5, per_row=per_row).reshape(rows, -1)
    threshold = np.where(ours, -np.inf, a).max(axis=1, keepdims=True)  # largest dropped magnitude
    away = a != threshold
    assert np.array_equal(got.reshape(rows, -1)[away], ours[away])
    if impl != "torch kthvalue":  # kthvalue's `> threshold` drops every tie at the threshold
        assert ((~got.reshape(rows, -1)).sum(axis=1) == round(0.5 * a.shape[1])).all()


# ----- nm_compress / nm_decompress -----------------------------------------------------------------------


def numpy_compress_2_4(w):
    """2:4 packed form with numpy: rank mask, gather of kept values, 2-bit indices packed 4 per byte."""
    mask = numpy_rank_mask(w, 2, 4).reshape(-1, 4)
    idx = np.nonzero(mask)[1].astype(np.uint8).reshape(-1, 4)  # in-group index, 4 kept elements per byte
    values = w.reshape(-1, 4)[mask].reshape(w.shape[0], -1)
    packed = idx[:, 0] | (idx[:, 1] << 2) | (idx[:, 2] << 4) | (idx[:, 3] << 6)
    return values, packed


def numpy_decompress_2_4(values, packed, shape):
    idx = np.stack([(packed >> s) & 3 for s in (0, 2, 4, 6)], axis=1).reshape(-1, 2).astype(np.intp)
    out = np.zeros((idx.shape[0], 4), dtype=values.dtype)
    np.put_along_axis(out, idx, values.reshape(-1, 2), axis=1)
    return out.reshape(shape)


@pytest.mark.parametrize("impl", ["pyqshare", "pyqshare 2 threads", "numpy"])
@pytest.mark.parametrize("direction", ["compress", "decompress"])
def test_nm_packed(benchmark, run_once, scaled, direction, impl):
    w = weights(scaled((4096, 4096), (64, 256)))
    benchmark.group = f"nm_{direction} 2:4 {w.shape[0]}x{w.shape[1]} float32"
    benchmark.extra_info["impl"] = impl
    values, indices = nm_compress(w, 2, 4)
    benchmark.extra_info["bytes"] = w.nbytes + values.nbytes + indices.nbytes
    threads = 2 if "2" in impl else 1
    if direction == "compress":
        if impl == "numpy":
            got_v, got_i = run_once(numpy_compress_2_4, w)
        else:
            got_v, got_i = benchmark(nm_compress, w, 2, 4, num_threads=threads)
        assert np.array_equal(got_v, values) and np.array_equal(got_i, indices)
        assert np.array_equal(np.where(nm_mask(w, 2, 4), w, 0), nm_decompress(got_v, got_i, 2, 4, w.shape))
    else:
        if impl == "numpy":
            got = run_once(numpy_decompress_2_4, values, indices, w.shape)
        else:
            got = benchmark(nm_decompress, values, indices, 2, 4, w.shape, num_threads=threads)
        assert np.array_equal(got, np.where(numpy_rank_mask(w, 2, 4), w, np.float32(0)))
