"""Tests of the sparsity kernels against plain numpy references and the C++ scalar references."""

from __future__ import annotations

import concurrent.futures
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pyqshare
from pyqshare import _core
from pyqshare.kernels import magnitude_mask, nm_compress, nm_decompress, nm_mask

FLOATS = (np.float16, np.float32, np.float64)
ISAS = ["generic", "sse2", "avx2"]
AVAILABLE_ISAS = {"avx2": ISAS, "sse2": ISAS[:2], "generic": ISAS[:1]}[_core.sparsity_best_isa()]
AWKWARD = [0, 1, 2, 3, 5, 7, 8, 15, 16, 17, 31, 33]


# ----------------------------------------------------------------------------------------------------------
# numpy references


def selection_key(w, scores):
    """The value selection ranks by, in float64 (exact for every supported dtype)."""
    return np.abs(w.astype(np.float64)) if scores is None else scores.astype(np.float64)


def ref_nm_mask(w, n, m, axis=-1, scores=None):
    """Stable argsort per group: the n largest keys, ties to the lower index."""
    key = np.moveaxis(selection_key(w, scores), axis, -1)
    groups = key.reshape(-1, m)
    order = np.argsort(-groups, axis=1, kind="stable")
    keep = np.zeros(groups.shape, dtype=bool)
    np.put_along_axis(keep, order[:, :n], True, axis=1)
    return np.moveaxis(keep.reshape(key.shape), -1, axis)


def ref_magnitude_mask(w, sparsity, per_row=False, scores=None):
    """Drop the round(sparsity * count) smallest keys per row, among equal keys the highest index first."""
    if w.size == 0:
        return np.zeros(w.shape, dtype=bool)
    rows = w.shape[0] if per_row and w.ndim >= 2 else 1
    key = selection_key(w, scores).reshape(rows, -1)
    zeros = round(sparsity * key.shape[1])
    # A stable sort of the reversed rows puts equal keys highest-original-index first.
    order = key.shape[1] - 1 - np.argsort(key[:, ::-1], axis=1, kind="stable")
    keep = np.ones(key.shape, dtype=bool)
    np.put_along_axis(keep, order[:, :zeros], False, axis=1)
    return keep.reshape(w.shape)


def ref_pack_indices(w, n, m, axis, mask):
    """values and packed indices following the documented layout, in plain Python."""
    wm = np.moveaxis(w, axis, -1)
    km = np.moveaxis(mask, axis, -1)
    groups = wm.shape[-1] // m
    groups_w = wm.reshape(*wm.shape[:-1], groups, m)
    groups_k = km.reshape(*km.shape[:-1], groups, m)
    idx = np.nonzero(groups_k.reshape(-1, m))[1].reshape(*groups_k.shape[:-1], n)
    values = np.take_along_axis(groups_w, idx, axis=-1).reshape(*wm.shape[:-1], groups * n)
    values = np.moveaxis(values, -1, axis)
    idx_in_values_order = np.moveaxis(idx.reshape(*km.shape[:-1], groups * n), -1, axis).ravel()
    bits = (m - 1).bit_length()
    stream = [(int(j) >> b) & 1 for j in idx_in_values_order for b in range(bits)]
    stream += [0] * (-len(stream) % 8)
    packed = np.array(
        [sum(stream[i + b] << b for b in range(8)) for i in range(0, len(stream), 8)], dtype=np.uint8
    )
    return np.ascontiguousarray(values), packed


def tie_heavy(rng, shape, dtype, kind):
    """Weights with many exact ties (small integers, both zeros) or continuous values."""
    if kind == "ties":
        w = rng.integers(-2, 3, size=shape).astype(dtype)
        w[rng.random(shape) < 0.2] = -0.0
        return w
    if kind == "extremes":
        info = np.finfo(dtype)
        choices = np.array([0.0, -0.0, info.tiny, -info.smallest_subnormal, info.max, -info.max, 1.0, -1.0], dtype)
        return rng.choice(choices, size=shape)
    return rng.standard_normal(shape).astype(dtype)


def bits_of(a):
    return a.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[a.itemsize])


# ----------------------------------------------------------------------------------------------------------
# nm_mask


@st.composite
def nm_cases(draw, scores_dtype):
    """``(m, n, axis, w, scores)``: tie-heavy weights of an awkward shape, and scores of ``scores_dtype`` or None."""
    m = draw(st.sampled_from([1, 2, 3, 4, 5, 7, 8, 16, 17, 33]))
    n = draw(st.integers(0, m))
    ndim = draw(st.integers(1, 3))
    axis = draw(st.integers(-ndim, ndim - 1))
    shape = [draw(st.sampled_from(AWKWARD[:8])) for _ in range(ndim)]
    shape[axis] = m * draw(st.sampled_from([0, 1, 2, 3, 5, 9]))
    dtype = draw(st.sampled_from(FLOATS))
    kind = draw(st.sampled_from(["ties", "normal", "extremes"]))
    with_scores = draw(st.booleans())
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    w = tie_heavy(rng, tuple(shape), dtype, kind)
    scores = tie_heavy(rng, w.shape, scores_dtype, kind) if with_scores else None
    return m, n, axis, w, scores


@settings(max_examples=150, deadline=None)
@given(nm_cases(np.float32))
def test_nm_mask_matches_numpy_reference(case):
    m, n, axis, w, scores = case
    expected = ref_nm_mask(w, n, m, axis, scores)
    got = nm_mask(w, n, m, axis=axis, scores=scores)
    assert got.dtype == np.bool_ and got.shape == w.shape
    np.testing.assert_array_equal(got, expected)
    per_group = np.moveaxis(got, axis, -1).reshape(-1, m).sum(axis=1)
    assert (per_group == n).all()
    for isa in AVAILABLE_ISAS:
        np.testing.assert_array_equal(_core.nm_mask(w, n, m, axis % w.ndim, scores, 2, isa), expected)
    np.testing.assert_array_equal(_core.nm_mask_reference(w, n, m, axis % w.ndim, scores), expected)


@pytest.mark.parametrize("isa", AVAILABLE_ISAS)
@pytest.mark.parametrize(("n", "m"), [(0, 4), (1, 4), (2, 4), (3, 4), (4, 4), (1, 8), (4, 8), (7, 8), (8, 8)])
@pytest.mark.parametrize("kind", ["ties", "normal", "extremes"])
def test_simd_paths_match_scalar_reference(isa, n, m, kind):
    """The hand-written kernels (float32, contiguous groups of 4/8) against the C++ reference, with tails."""
    rng = np.random.default_rng(n * 100 + m)
    for groups in [1, 3, 4, 7, 8, 9, 31, 33, 100]:
        w = tie_heavy(rng, (3, groups * m), np.float32, kind)
        scores = tie_heavy(rng, w.shape, np.float32, kind)
        np.testing.assert_array_equal(_core.nm_mask(w, n, m, 1, None, 1, isa), _core.nm_mask_reference(w, n, m, 1))
        np.testing.assert_array_equal(
            _core.nm_mask(w, n, m, 1, scores, 1, isa), _core.nm_mask_reference(w, n, m, 1, scores)
        )


def test_ties_go_to_the_lowest_index():
    w = np.zeros((2, 8), np.float32)
    np.testing.assert_array_equal(nm_mask(w, 2, 4), np.tile([True, True, False, False], (2, 2)))
    w = np.array([[1.0, -3.0, 3.0, -0.0, 0.0, 2.0, -2.0, 2.0]], np.float32)
    np.testing.assert_array_equal(nm_mask(w, 2, 4)[0], [False, True, True, False, False, True, True, False])
    # Scores are signed: -3 is the smallest, and -0.0 ties with 0.0.
    scores = np.array([[-3.0, 1.0, 1.0, -0.0, 0.0, -0.0, 0.0, 5.0]], np.float64)
    np.testing.assert_array_equal(
        nm_mask(w, 2, 4, scores=scores)[0], [False, True, True, False, True, False, False, True]
    )
    np.testing.assert_array_equal(nm_mask(np.ones((4, 3), np.float16), 1, 2, axis=0), [[True] * 3, [False] * 3] * 2)


def test_large_m_uses_selection():
    rng = np.random.default_rng(5)
    w = tie_heavy(rng, (3, 2 * 300, 2), np.float32, "ties")
    for n in [0, 1, 150, 299, 300]:
        np.testing.assert_array_equal(nm_mask(w, n, 300, axis=1), ref_nm_mask(w, n, 300, 1))
    assert nm_mask(np.zeros((1, 65536), np.float16), 3, 65536).sum() == 3


def test_indivisible_axis_length_is_refused():
    w = np.zeros((3, 10), np.float32)
    with pytest.raises(ValueError, match=r"length 10 .*not divisible by m=4"):
        nm_mask(w, 2, 4)
    with pytest.raises(ValueError, match=r"length 3 .*not divisible by m=2"):
        nm_mask(w, 1, 2, axis=0)
    with pytest.raises(ValueError, match="m=4"):
        nm_compress(w, 2, 4)
    with pytest.raises(ValueError, match="m=4"):
        nm_decompress(np.zeros((3, 5), np.float32), np.zeros(4, np.uint8), 2, 4, (3, 10))
    with pytest.raises(ValueError, match="not divisible by m=4"):
        _core.nm_mask(w, 2, 4, 1)


@pytest.mark.parametrize("fn", ["nm_mask", "nm_compress"])
def test_refusals(fn):
    call = {"nm_mask": lambda w, *a, **k: nm_mask(w, *a, **k), "nm_compress": nm_compress}[fn]
    w = np.ones((4, 8), np.float32)
    with pytest.raises(TypeError, match="float16, float32, float64"):
        call(w.astype(np.int32), 2, 4)
    with pytest.raises(TypeError, match="float16, float32, float64"):
        call(w.astype(">f4"), 2, 4)
    with pytest.raises(TypeError, match="numpy.ndarray"):
        call(w.tolist(), 2, 4)
    with pytest.raises(ValueError, match="ascontiguousarray"):
        call(np.ones((4, 16), np.float32)[:, ::2], 2, 4)
    with pytest.raises(ValueError, match=r"n must be in \[0, 4\]"):
        call(w, 5, 4)
    with pytest.raises(ValueError, match=r"n must be in \[0, 4\]"):
        call(w, -1, 4)
    with pytest.raises(ValueError, match=r"m must be in \[1, 65536\]"):
        call(w, 0, 0)
    with pytest.raises(ValueError, match=r"m must be in \[1, 65536\]"):
        call(np.ones((1, 65537 * 2), np.float32), 1, 65537)
    with pytest.raises(TypeError, match="m must be an int"):
        call(w, 2, 4.0)
    with pytest.raises(ValueError, match="out of range"):
        call(w, 2, 4, axis=2)
    with pytest.raises(ValueError, match="at least one dimension"):
        call(np.ones((), np.float32), 1, 1)
    with pytest.raises(ValueError, match="scores must have the shape of w"):
        call(w, 2, 4, scores=np.ones((4, 4), np.float32))
    with pytest.raises(TypeError, match="scores must have dtype"):
        call(w, 2, 4, scores=np.ones((4, 8), np.int64))
    for bad in [np.nan, np.inf, -np.inf]:
        for dtype in FLOATS:
            v = np.ones((4, 8), dtype)
            v[2, 5] = bad
            with pytest.raises(ValueError, match="w contains NaN or Inf"):
                call(v, 2, 4)
            with pytest.raises(ValueError, match="scores contains NaN or Inf"):
                call(w, 2, 4, scores=v)
            with pytest.raises(ValueError, match="w contains NaN or Inf"):
                call(v, 2, 4, scores=w)


def test_unknown_isa_is_refused():
    with pytest.raises(ValueError, match="isa must be"):
        _core.nm_mask(np.ones(8, np.float32), 2, 4, 0, None, 1, "neon")


def test_empty_arrays():
    for shape in [(0, 8), (4, 0), (0,), (3, 0, 2)]:
        w = np.zeros(shape, np.float32)
        assert nm_mask(w, 1, 2).shape == shape
        assert nm_mask(w, 1, 1, axis=0).shape == shape
        assert magnitude_mask(w, 0.5).shape == shape
        assert magnitude_mask(w, 0.5, per_row=True).shape == shape
        values, indices = nm_compress(w, 1, 2)
        assert values.size == 0 and indices.size == 0
        np.testing.assert_array_equal(nm_decompress(values, indices, 1, 2, shape), w)


def big_weights(seed=0, shape=(64, 4096), dtype=np.float32):
    """Large enough for several parallel tasks (65536 elements each), with ties across task boundaries."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape).astype(dtype)
    w[rng.random(shape) < 0.3] = 0.5
    return w


def test_thread_count_invariance():
    w = big_weights()
    w3 = big_weights(1, (24, 3 * 700, 5), np.float64)
    for threads in [2, 3, 7]:
        np.testing.assert_array_equal(nm_mask(w, 2, 4, num_threads=threads), nm_mask(w, 2, 4, num_threads=1))
        np.testing.assert_array_equal(nm_mask(w, 3, 8, axis=0, num_threads=threads), nm_mask(w, 3, 8, axis=0))
        np.testing.assert_array_equal(nm_mask(w3, 2, 3, axis=1, num_threads=threads), nm_mask(w3, 2, 3, axis=1))
        for per_row in [False, True]:
            np.testing.assert_array_equal(
                magnitude_mask(w, 0.5, per_row=per_row, num_threads=threads), magnitude_mask(w, 0.5, per_row=per_row)
            )
        for n, m, axis in [(2, 4, -1), (3, 7, 1), (1, 3, 1)]:
            ww = w if m in (4,) else w3
            v1, i1 = nm_compress(ww, n, m, axis)
            vt, it = nm_compress(ww, n, m, axis, num_threads=threads)
            assert bits_of(v1).tobytes() == bits_of(vt).tobytes() and i1.tobytes() == it.tobytes()
            d1 = nm_decompress(v1, i1, n, m, ww.shape, axis)
            assert d1.tobytes() == nm_decompress(v1, i1, n, m, ww.shape, axis, num_threads=threads).tobytes()


def test_global_default_thread_count_is_used():
    w = big_weights()
    before = pyqshare.get_num_threads()
    try:
        pyqshare.set_num_threads(3)
        np.testing.assert_array_equal(nm_mask(w, 2, 4), nm_mask(w, 2, 4, num_threads=1))
    finally:
        pyqshare.set_num_threads(before)


def test_concurrent_python_threads():
    arrays = [big_weights(seed) for seed in range(6)]
    jobs = [
        lambda w: nm_mask(w, 2, 4, num_threads=2),
        lambda w: magnitude_mask(w, 0.6),
        lambda w: magnitude_mask(w, 0.3, per_row=True, num_threads=2),
        lambda w: nm_decompress(*nm_compress(w, 4, 8), 4, 8, w.shape),
    ]
    serial = [[job(w) for w in arrays] for job in jobs]
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        futures = [[pool.submit(job, w) for w in arrays] for job in jobs]
        for row_serial, row_futures in zip(serial, futures):
            for expected, future in zip(row_serial, row_futures):
                np.testing.assert_array_equal(future.result(), expected)


def test_worker_exceptions_are_carried_back():
    """A NaN in one parallel task (others run normally) surfaces as ValueError from every kernel."""
    w = big_weights()
    w[40, 17] = np.nan
    for call in [
        lambda: nm_mask(w, 2, 4, num_threads=3),
        lambda: nm_mask(w, 2, 4, axis=0, num_threads=3),
        lambda: magnitude_mask(w, 0.5, num_threads=3),
        lambda: magnitude_mask(w, 0.5, per_row=True, num_threads=3),
        lambda: nm_compress(w, 2, 4, num_threads=3),
    ]:
        with pytest.raises(ValueError, match="NaN or Inf"):
            call()
    good = big_weights()
    values, indices = nm_compress(good, 2, 4)
    indices = indices.copy()
    indices[len(indices) // 2 + 3] = 0  # both indices of some groups become 0: not strictly increasing
    with pytest.raises(ValueError, match="strictly increasing"):
        nm_decompress(values, indices, 2, 4, good.shape, num_threads=3)


# ----------------------------------------------------------------------------------------------------------
# magnitude_mask


@st.composite
def magnitude_cases(draw):
    ndim = draw(st.integers(0, 3))
    shape = tuple(draw(st.sampled_from(AWKWARD)) for _ in range(ndim))
    dtype = draw(st.sampled_from(FLOATS))
    sparsity = draw(st.one_of(st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0]), st.floats(0, 1)))
    return shape, dtype, sparsity, draw(st.booleans()), draw(st.sampled_from(["ties", "normal", "extremes"])), \
        draw(st.booleans()), draw(st.integers(0, 2**32 - 1))


@settings(max_examples=150, deadline=None)
@given(magnitude_cases())
def test_magnitude_mask_matches_numpy_reference(case):
    shape, dtype, sparsity, per_row, kind, with_scores, seed = case
    rng = np.random.default_rng(seed)
    w = tie_heavy(rng, shape, dtype, kind)
    scores = tie_heavy(rng, shape, np.float64, kind) if with_scores else None
    got = magnitude_mask(w, sparsity, scores=scores, per_row=per_row, num_threads=2)
    np.testing.assert_array_equal(got, ref_magnitude_mask(w, sparsity, per_row, scores))
    rows = shape[0] if per_row and len(shape) >= 2 else 1
    if w.size:
        key = selection_key(w, scores).reshape(rows, -1)
        kept = got.reshape(rows, -1)
        assert ((~kept).sum(axis=1) == round(sparsity * key.shape[1])).all()
        for r in range(rows):
            if kept[r].any() and (~kept[r]).any():
                assert key[r][kept[r]].min() >= key[r][~kept[r]].max()
        np.testing.assert_array_equal(
            _core.magnitude_mask(w, round(sparsity * key.shape[1]), rows, scores),
            _core.magnitude_mask_reference(w, round(sparsity * key.shape[1]), rows, scores),
        )


def test_magnitude_mask_rounding_and_ties():
    w = np.arange(1, 6, dtype=np.float32)
    assert (~magnitude_mask(w, 0.5)).sum() == 2  # round(2.5) == 2
    assert (~magnitude_mask(np.ones(7, np.float32), 0.5)).sum() == 4  # round(3.5) == 4
    np.testing.assert_array_equal(magnitude_mask(np.ones(6, np.float16), 0.5), [True] * 3 + [False] * 3)
    np.testing.assert_array_equal(magnitude_mask(np.zeros((2, 3)), 2 / 3, per_row=True), [[True, False, False]] * 2)
    np.testing.assert_array_equal(magnitude_mask(np.array(-2.0), 1.0), np.array(False))
    np.testing.assert_array_equal(magnitude_mask(np.array(-2.0), 0.5, per_row=True), np.array(True))


def test_magnitude_mask_large_partial_tie():
    """Many equal keys at the threshold spread over several parallel chunks: the lowest indices are kept."""
    w = big_weights(3)
    w[:, :] = np.where(np.abs(w) < 0.8, 0.25, w)
    for sparsity in [0.3, 0.5, 0.61]:
        expected = ref_magnitude_mask(w, sparsity)
        for threads in [1, 2, 7]:
            np.testing.assert_array_equal(magnitude_mask(w, sparsity, num_threads=threads), expected)
    np.testing.assert_array_equal(magnitude_mask(w, 0.5, per_row=True), ref_magnitude_mask(w, 0.5, True))


def test_magnitude_mask_refusals():
    w = np.ones((4, 8), np.float32)
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\]"):
        magnitude_mask(w, 1.5)
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\]"):
        magnitude_mask(w, float("nan"))
    with pytest.raises(TypeError, match="sparsity must be a float"):
        magnitude_mask(w, True)
    with pytest.raises(TypeError, match="sparsity must be a float"):
        magnitude_mask(w, "0.5")
    with pytest.raises(TypeError, match="per_row must be a bool"):
        magnitude_mask(w, 0.5, per_row=1)
    with pytest.raises(TypeError, match="float16, float32, float64"):
        magnitude_mask(w.astype(np.int8), 0.5)
    with pytest.raises(ValueError, match="ascontiguousarray"):
        magnitude_mask(w.T, 0.5)
    with pytest.raises(ValueError, match="scores must have the shape"):
        magnitude_mask(w, 0.5, scores=np.ones(32, np.float32))
    with pytest.raises(TypeError, match="num_threads"):
        magnitude_mask(w, 0.5, num_threads=1.5)
    with pytest.raises(ValueError, match="num_threads must be >= 1"):
        magnitude_mask(w, 0.5, num_threads=0)
    for sparsity in [0.0, 0.5, 1.0]:
        bad = w.copy()
        bad[1, 1] = np.inf
        with pytest.raises(ValueError, match="w contains NaN or Inf"):
            magnitude_mask(bad, sparsity)
        with pytest.raises(ValueError, match="scores contains NaN or Inf"):
            magnitude_mask(w, sparsity, scores=bad, per_row=True)


# ----------------------------------------------------------------------------------------------------------
# nm_compress / nm_decompress


@settings(max_examples=120, deadline=None)
@given(nm_cases(np.float16))
def test_compress_round_trip_and_layout(case):
    m, n, axis, w, scores = case
    values, indices = nm_compress(w, n, m, axis, scores=scores)
    mask = ref_nm_mask(w, n, m, axis, scores)
    expected_values, expected_indices = ref_pack_indices(w, n, m, axis, mask)
    assert values.dtype == w.dtype and indices.dtype == np.uint8 and indices.ndim == 1
    assert values.shape == expected_values.shape
    assert bits_of(values).tobytes() == bits_of(expected_values).tobytes()
    assert indices.tobytes() == expected_indices.tobytes()
    for isa in AVAILABLE_ISAS:
        v, i = _core.nm_compress(w, n, m, axis % w.ndim, scores, 1, isa)
        assert bits_of(v).tobytes() == bits_of(values).tobytes() and i.tobytes() == indices.tobytes()
    dense = nm_decompress(values, indices, n, m, w.shape, axis)
    assert dense.dtype == w.dtype and dense.shape == w.shape
    # Bit-exact against np.where(mask, w, 0): kept -0.0 stays -0.0, dropped entries are +0.0.
    assert bits_of(dense).tobytes() == bits_of(np.where(mask, w, w.dtype.type(0))).tobytes()
    np.testing.assert_array_equal(dense, w * mask)


@pytest.mark.parametrize(("n", "m"), [(0, 1), (1, 1), (0, 4), (4, 4), (3, 7), (2, 3), (5, 17), (17, 33), (9, 16)])
def test_compress_edge_n_m(n, m):
    w = big_weights(n + m, (6, m * 11, 3), np.float32)
    for axis in [0, 1, -1] if m <= 3 else [1]:
        if w.shape[axis] % m:
            continue
        values, indices = nm_compress(w, n, m, axis)
        assert indices.size == math.ceil(values.size * (m - 1).bit_length() / 8)
        dense = nm_decompress(values, indices, n, m, w.shape, axis)
        expected = np.where(nm_mask(w, n, m, axis=axis), w, np.float32(0))
        assert bits_of(dense).tobytes() == bits_of(expected).tobytes()


def test_decompress_refusals():
    w = np.arange(1, 33, dtype=np.float32).reshape(4, 8)
    values, indices = nm_compress(w, 2, 4)
    with pytest.raises(ValueError, match=r"values must have shape \(4, 4\)"):
        nm_decompress(values[:, :2].copy(), indices, 2, 4, (4, 8))
    with pytest.raises(ValueError, match="indices must be 1-D with 4 bytes"):
        nm_decompress(values, indices[:3].copy(), 2, 4, (4, 8))
    with pytest.raises(TypeError, match="indices must have dtype uint8"):
        nm_decompress(values, indices.astype(np.int8), 2, 4, (4, 8))
    with pytest.raises(TypeError, match="shape must be a tuple of ints"):
        nm_decompress(values, indices, 2, 4, 32)
    with pytest.raises(ValueError, match="negative"):
        nm_decompress(values, indices, 2, 4, (-4, 8))
    with pytest.raises(ValueError, match="ascontiguousarray"):
        nm_decompress(np.ones((4, 8), np.float32)[:, ::2], indices, 2, 4, (4, 8))
    bad = indices.copy()
    bad[0] = 0b00_00_11_10  # group 0 indices (2, 3), group 1 indices (0, 0): repeated
    with pytest.raises(ValueError, match="strictly increasing"):
        nm_decompress(values, bad, 2, 4, (4, 8))
    bad[0] = 0b00_01_10_11  # group 0 indices (3, 2): decreasing
    with pytest.raises(ValueError, match="strictly increasing"):
        nm_decompress(values, bad, 2, 4, (4, 8))
    v3, i3 = nm_compress(np.ones((1, 3), np.float32), 1, 3)
    with pytest.raises(ValueError, match="< m"):
        nm_decompress(v3, np.array([3], np.uint8), 1, 3, (1, 3))  # index 3 fits 2 bits but not m=3
    np.testing.assert_array_equal(nm_decompress(v3, i3, 1, 3, (1, 3)), [[1, 0, 0]])
