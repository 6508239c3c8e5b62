"""Tests of scale_search / quantize / dequantize against numpy references, the C++ brute force and onnxruntime."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

import pyqshare as pq
from pyqshare import _core
from pyqshare.kernels.quantization import _layout, _weight_offsets

ISAS = (0, 1, 2)  # portable, AVX2, AVX-512 (each capped at what the CPU has)


# ---------------------------------------------------------------- numpy reference of the documented rules


def code_range(bits, signed):
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)


def np_quantize(x, scale, zp, bits, signed):
    lo, hi = code_range(bits, signed)
    t = x.astype(np.float32) / np.float32(scale)
    return np.clip(np.rint(t) + zp, lo, hi).astype(np.int64)


def np_error(x, scale, zp, bits, signed, weight=None, p=2.0):
    q = np_quantize(x, scale, zp, bits, signed)
    deq = (q - zp).astype(np.float32) * np.float32(scale)
    d = np.abs(x.astype(np.float64) - deq.astype(np.float64))
    e = d * d if p == 2.0 else d**p
    return float(np.sum(e if weight is None else weight * e))


def np_candidates(x, bits, symmetric, grid):
    """The documented candidate list of one group."""
    if x.size == 0 or (x.min() == 0 and x.max() == 0):
        return [(np.float32(1.0), 0)]
    out = []
    for i in range(grid):
        r = (grid - i) / grid
        if symmetric:
            m = max(abs(float(x.min())), abs(float(x.max())))
            s = max(np.float32(r * m / ((1 << (bits - 1)) - 1)), np.finfo(np.float32).tiny)
            out.append((np.float32(s), 0))
        else:
            lo, hi = r * min(float(x.min()), 0.0), r * max(float(x.max()), 0.0)
            s = max(np.float32((hi - lo) / ((1 << bits) - 1)), np.finfo(np.float32).tiny)
            zp = int(np.clip(np.rint(-lo / float(np.float32(s))), 0, (1 << bits) - 1))
            out.append((np.float32(s), zp))
    return out


def np_search(x, bits, symmetric, grid, weight=None, p=2.0):
    """Exhaustive search: (min error, errors of every candidate, candidates)."""
    cands = np_candidates(x, bits, symmetric, grid)
    errs = [np_error(x, s, z, bits, symmetric, weight, p) for s, z in cands]
    return min(errs), errs, cands


def groups(w, axis, block_size):
    """Every group of w in C order of the scale array, as flat element arrays (documented element order)."""
    if axis is None:
        return [w.reshape(-1)]
    a = axis % w.ndim
    if block_size is None:
        return list(np.moveaxis(w, a, 0).reshape(w.shape[a], -1))
    out = []
    outer, length, inner = math.prod(w.shape[:a]), w.shape[a], math.prod(w.shape[a + 1 :])
    v = w.reshape(outer, length, inner)
    for o in range(outer):
        for j in range(-(-length // block_size)):
            for i in range(inner):
                out.append(v[o, j * block_size : (j + 1) * block_size, i])
    return out


def weight_groups(sw, w, axis, block_size):
    return groups(np.broadcast_to(sw, w.shape).copy(), axis, block_size)


def core_search(w, bits, *, axis=0, block_size=None, symmetric=True, objective=0, grid=100, p=2.0,
                sample_weight=None, num_threads=1, refine=True, isa=-1, reference=False):
    """_core.scale_search with the layout the public API would compute (for refine / isa / reference)."""
    kind, outer, length, inner, block, a, shape = _layout(w.shape, axis, block_size)
    offsets = (None, None, None)
    if sample_weight is not None:
        o = _weight_offsets(sample_weight, w.shape, a)
        if o is not None:
            offsets = o
            if kind == 0:
                outer, length, inner = 1, w.shape[0], math.prod(w.shape[1:])
    args = (w, bits, symmetric, objective, grid, p, kind, outer, length, inner, block, sample_weight, *offsets, num_threads)
    s, z = _core.scale_search(*args, refine=refine, isa=0 if reference else isa, reference=reference)
    return s.reshape(shape), z.reshape(shape)


def weights_like(shape, seed, dist="t"):
    rng = np.random.default_rng(seed)
    if dist == "t":
        return (rng.standard_t(4, size=shape) * 0.02).astype(np.float32)
    return rng.uniform(-1, 2, size=shape).astype(np.float32)


# ---------------------------------------------------------------- scale_search against the numpy reference

CASES = [
    # shape, axis, block_size
    ((37,), None, None),
    ((5, 33), 0, None),
    ((5, 33), 1, None),
    ((6, 40), 1, 16),  # last block shorter (40 = 16 + 16 + 8)
    ((17, 8), 0, 5),
    ((4, 3, 3, 3), 0, None),  # conv weight, per output channel
    ((2, 7, 3), 1, 3),
    ((300,), 0, 128),
]


@pytest.mark.parametrize("shape,axis,block_size", CASES)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_matches_exhaustive_numpy_search(shape, axis, block_size, symmetric, bits):
    w = weights_like(shape, seed=hash((shape, bits)) % 1000, dist="t" if symmetric else "u")
    grid = 40
    scale, zp = pq.scale_search(w, bits, axis=axis, block_size=block_size, symmetric=symmetric, grid=grid)
    raw_scale, raw_zp = core_search(w, bits, axis=axis, block_size=block_size, symmetric=symmetric, grid=grid, refine=False)
    assert scale.size == len(groups(w, axis, block_size))
    for k, x in enumerate(groups(w, axis, block_size)):
        best, errs, cands = np_search(x, bits, symmetric, grid)
        chosen = np_error(x, raw_scale.reshape(-1)[k], int(raw_zp.reshape(-1)[k]), bits, symmetric)
        assert chosen == pytest.approx(best, rel=1e-6, abs=1e-30)
        assert (float(raw_scale.reshape(-1)[k]), int(raw_zp.reshape(-1)[k])) in [(float(s), z) for s, z in cands]
        refined = np_error(x, scale.reshape(-1)[k], int(zp.reshape(-1)[k]), bits, symmetric)
        assert refined <= best * (1 + 1e-12)
        assert refined <= errs[0] * (1 + 1e-12)  # never worse than min-max


@pytest.mark.parametrize("bits", range(2, 17))
@pytest.mark.parametrize("symmetric", [True, False])
def test_every_width_zero_points_and_dtypes(bits, symmetric):
    w = weights_like((3, 50), seed=bits, dist="u")
    scale, zp = pq.scale_search(w, bits, symmetric=symmetric, grid=20)
    assert scale.dtype == np.float32 and (scale > 0).all() and np.isfinite(scale).all()
    signed = np.int8 if bits <= 8 else np.int16
    assert zp.dtype == (signed if symmetric else {np.int8: np.uint8, np.int16: np.uint16}[signed])
    lo, hi = code_range(bits, symmetric)
    if symmetric:
        assert (zp == 0).all()
    else:
        assert (zp >= 0).all() and (zp <= hi).all() and (zp > 0).any()
    for k, x in enumerate(groups(w, 0, None)):
        best, errs, _ = np_search(x, bits, symmetric, 20)
        assert np_error(x, scale[k], int(zp[k]), bits, symmetric) <= min(best, errs[0]) * (1 + 1e-12)
    q = pq.quantize(w, scale, zp, bits)
    assert q.min() >= lo and q.max() <= hi


def test_shapes():
    w = weights_like((4, 3, 3, 3), 1)
    assert pq.scale_search(w, 8)[0].shape == (4,)
    assert pq.scale_search(w, 8, axis=None)[0].shape == ()
    assert pq.scale_search(w, 8, axis=-1)[0].shape == (3,)
    assert pq.scale_search(w, 8, axis=1, block_size=2)[0].shape == (4, 2, 3, 3)
    w2 = weights_like((64, 130), 2)
    s, z = pq.scale_search(w2, 4, axis=1, block_size=32)
    assert s.shape == z.shape == (64, 5)
    assert pq.scale_search(weights_like((9,), 3), 4, axis=0, block_size=4)[0].shape == (3,)


def test_empty_and_zero_groups():
    s, z = pq.scale_search(np.zeros((0, 5), np.float32), 8)
    assert s.shape == (0,)
    s, z = pq.scale_search(np.zeros((3, 0), np.float32), 8)
    assert (s == 1).all() and (z == 0).all()
    w = np.zeros((2, 16), np.float32)
    w[1] = np.linspace(-1, 1, 16)
    s, z = pq.scale_search(w, 8, symmetric=False)
    assert s[0] == 1 and z[0] == 0 and s[1] != 1
    tiny = np.full((1, 4), 1e-44, np.float32)  # subnormal weights: the scale is raised to the smallest normal
    assert pq.scale_search(tiny, 8)[0][0] == np.finfo(np.float32).tiny


def test_sample_weight_changes_the_choice_as_the_weighted_reference():
    rng = np.random.default_rng(7)
    w = (rng.standard_t(3, size=(6, 64)) * 0.1).astype(np.float32)
    w[:, 0] = 3.0  # an outlier column
    heavy = np.ones(64)
    heavy[0] = 1e4  # its error dominates: clipping it becomes expensive
    light = np.ones(64)
    light[0] = 0.0  # its error is ignored: clipping it is free
    s_heavy, _ = pq.scale_search(w, 4, sample_weight=heavy, grid=50)
    s_light, _ = pq.scale_search(w, 4, sample_weight=light, grid=50)
    assert (s_heavy > s_light).all()
    for sw, scale in ((heavy, s_heavy), (light, s_light)):
        for k, x in enumerate(groups(w, 0, None)):
            best, _, _ = np_search(x, 4, True, 50, weight=sw)
            assert np_error(x, scale[k], 0, 4, True, weight=sw) <= best * (1 + 1e-9)


@pytest.mark.parametrize("sw_shape", [(3, 1, 1), (3, 5, 2), (1, 2), (4, 3, 5, 2), ()])
@pytest.mark.parametrize("axis,block_size", [(0, None), (1, 2), (None, None), (3, None)])
def test_sample_weight_broadcasting(sw_shape, axis, block_size):
    w = weights_like((4, 3, 5, 2), 11)
    sw = np.random.default_rng(1).uniform(0, 2, size=sw_shape)
    s, z = pq.scale_search(w, 4, axis=axis, block_size=block_size, sample_weight=sw, grid=30)
    raw, _ = core_search(w, 4, axis=axis, block_size=block_size, sample_weight=sw, grid=30, refine=False)
    for k, (x, wx) in enumerate(zip(groups(w, axis, block_size), weight_groups(sw, w, axis, block_size))):
        best, _, _ = np_search(x, 4, True, 30, weight=wx)
        assert np_error(x, raw.reshape(-1)[k], 0, 4, True, weight=wx) == pytest.approx(best, rel=1e-6, abs=1e-30)
        assert np_error(x, s.reshape(-1)[k], 0, 4, True, weight=wx) <= best * (1 + 1e-12)
    # float32 weights are widened, same answer
    s32, _ = pq.scale_search(w, 4, axis=axis, block_size=block_size, sample_weight=sw.astype(np.float32), grid=30)
    s64, _ = pq.scale_search(w, 4, axis=axis, block_size=block_size, sample_weight=sw.astype(np.float32).astype(np.float64), grid=30)
    np.testing.assert_array_equal(s32, s64)


@pytest.mark.parametrize("p", [1.0, 3.0, 0.5])
def test_lp_objective(p):
    w = weights_like((4, 45), 5)
    s, z = pq.scale_search(w, 4, objective="lp", p=p, grid=30)
    raw, _ = core_search(w, 4, objective=1, p=p, grid=30, refine=False)
    for k, x in enumerate(groups(w, 0, None)):
        best, _, _ = np_search(x, 4, True, 30, p=p)
        assert np_error(x, raw[k], 0, 4, True, p=p) == pytest.approx(best, rel=1e-6)
        assert np_error(x, s[k], 0, 4, True, p=p) <= best * (1 + 1e-12)
    # lp with p = 2 is mse
    np.testing.assert_array_equal(pq.scale_search(w, 4, objective="lp", p=2.0), pq.scale_search(w, 4))


def test_minmax_is_candidate_zero():
    w = weights_like((5, 20), 9, dist="u")
    for symmetric in (True, False):
        s, z = pq.scale_search(w, 8, objective="minmax", symmetric=symmetric)
        for k, x in enumerate(groups(w, 0, None)):
            cs, cz = np_candidates(x, 8, symmetric, 1)[0]
            assert s[k] == cs and z[k] == cz


def test_refinement_helps_and_is_kept_only_when_not_worse():
    w = weights_like((64, 256), 3)
    refined, _ = pq.scale_search(w, 4, grid=20)
    raw, _ = core_search(w, 4, grid=20, refine=False)
    errs_r = [np_error(x, refined[k], 0, 4, True) for k, x in enumerate(w)]
    errs_g = [np_error(x, raw[k], 0, 4, True) for k, x in enumerate(w)]
    assert all(a <= b for a, b in zip(errs_r, errs_g))
    assert sum(errs_r) < sum(errs_g)  # a coarse grid leaves room the least-squares step recovers


# ---------------------------------------------------------------- fast search == C++ brute force


@settings(max_examples=40, deadline=None)
@given(
    n=st.sampled_from([1, 2, 3, 5, 7, 8, 15, 16, 17, 31, 33, 255, 256, 257, 600]),
    rows=st.integers(1, 4),
    bits=st.integers(2, 16),
    symmetric=st.booleans(),
    grid=st.integers(1, 60),
    weighted=st.booleans(),
    objective=st.sampled_from([0, 0, 1, 2]),
    seed=st.integers(0, 2**31),
)
def test_fast_equals_reference(n, rows, bits, symmetric, grid, weighted, objective, seed):
    rng = np.random.default_rng(seed)
    w = (rng.standard_t(3, size=(rows, n)) * rng.uniform(1e-3, 10)).astype(np.float32)
    if seed % 5 == 0:
        w = np.round(w * 8) / 8  # exact grid hits and ties
    sw = rng.uniform(0, 3, size=n) if weighted else None
    p = 1.5 if objective == 1 else 2.0
    ref = core_search(w, bits, symmetric=symmetric, grid=grid, objective=objective, p=p, sample_weight=sw, reference=True)
    for isa in ISAS:
        got = core_search(w, bits, symmetric=symmetric, grid=grid, objective=objective, p=p, sample_weight=sw, isa=isa)
        np.testing.assert_array_equal(got[0], ref[0])
        np.testing.assert_array_equal(got[1], ref[1])


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("weighted", [False, True])
def test_fast_equals_reference_realistic_rows(bits, symmetric, weighted):
    """Rows long enough for every pruning stage (bounds, float32 screening, early abandoning)."""
    w = weights_like((4, 1500), bits)
    sw = np.random.default_rng(bits).gamma(0.5, size=1500) if weighted else None
    for refine in (False, True):
        want = core_search(w, bits, symmetric=symmetric, sample_weight=sw, reference=True, refine=refine)
        for isa in ISAS:
            got = core_search(w, bits, symmetric=symmetric, sample_weight=sw, isa=isa, refine=refine)
            np.testing.assert_array_equal(got[0], want[0])
            np.testing.assert_array_equal(got[1], want[1])


def binned_rows(kind, n, seed):
    """Rows for the histogram bounds (unweighted mse, n >= 64 * 2^bits): awkward value layouts."""
    rng = np.random.default_rng(seed)
    if kind == "t":
        return (rng.standard_t(4, size=(3, n)) * 0.02).astype(np.float32)
    if kind == "constant":  # every element in one bin (zero value range)
        return np.full((2, n), rng.uniform(-2, 2), np.float32)
    if kind == "two_values":
        return rng.choice(np.array([-0.3, 1.7], np.float32), size=(2, n))
    if kind == "half_steps":  # many elements exactly on (or next to) rounding boundaries, ties everywhere
        step = np.float32(1 / 14)
        w = ((rng.integers(-30, 30, size=(3, n)) + 0.5) * step).astype(np.float32)
        w[1] = np.nextafter(w[1], np.float32(np.inf))
        return w
    if kind == "outlier":  # all but one element crowd a few bins near zero
        w = (rng.standard_normal((2, n)) * 1e-3).astype(np.float32)
        w[:, rng.integers(n)] = 5.0
        return w
    if kind == "subnormal":
        return (rng.standard_normal((2, n)) * 1e-39).astype(np.float32)
    if kind == "zeros_and_row":
        w = rng.standard_normal((2, n)).astype(np.float32)
        w[0] = 0.0
        return w
    if kind == "positive":  # asymmetric ranges with a large zero point
        return rng.uniform(0.5, 3.0, size=(2, n)).astype(np.float32)
    if kind == "huge":  # scales near the float32 limit: nothing may overflow to inf or NaN
        return (rng.uniform(-1.0, 1.0, size=(2, n)) * 3e38).astype(np.float32)
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["t", "constant", "two_values", "half_steps", "outlier", "subnormal",
                                  "zeros_and_row", "positive", "huge"])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_binned_screening_equals_reference(kind, bits):
    """Groups with at least 64 elements per code take the histogram bounds: still the brute force's answer."""
    n = (64 << bits) + 37
    w = binned_rows(kind, n, bits)
    for symmetric in (True, False):
        for refine in (False, True):
            want = core_search(w, bits, symmetric=symmetric, refine=refine, reference=True)
            for isa in ISAS:
                got = core_search(w, bits, symmetric=symmetric, refine=refine, isa=isa)
                np.testing.assert_array_equal(got[0], want[0])
                np.testing.assert_array_equal(got[1], want[1])


@settings(max_examples=15, deadline=None)
@given(bits=st.integers(2, 5), extra=st.integers(0, 700), grid=st.integers(1, 120), symmetric=st.booleans(),
       lp2=st.booleans(), seed=st.integers(0, 2**31))
def test_binned_screening_property(bits, extra, grid, symmetric, lp2, seed):
    rng = np.random.default_rng(seed)
    w = (rng.standard_t(3, size=(2, (64 << bits) + extra)) * rng.uniform(1e-3, 10)).astype(np.float32)
    if seed % 3 == 0:
        w = np.round(w * 8) / 8  # exact grid hits and ties
    objective = 1 if lp2 else 0  # "lp" with p = 2 is the mse path
    want = core_search(w, bits, symmetric=symmetric, grid=grid, objective=objective, reference=True)
    for isa in ISAS:
        got = core_search(w, bits, symmetric=symmetric, grid=grid, objective=objective, isa=isa)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])


def test_large_groups_equal_reference():
    """Groups with more than 4096 elements: finer histograms (more than 2048 bins, the scalar window scan)."""
    rng = np.random.default_rng(11)
    w = (rng.standard_t(4, size=(2, 40000)) * 0.02).astype(np.float32)
    w[1] = np.round(w[1] * 64) / 64  # many exact grid hits
    for bits in (2, 4):
        for symmetric in (True, False):
            want = core_search(w, bits, symmetric=symmetric, reference=True)
            for isa in ISAS:
                got = core_search(w, bits, symmetric=symmetric, isa=isa)
                np.testing.assert_array_equal(got[0], want[0])
                np.testing.assert_array_equal(got[1], want[1])


def test_candidates_equal_reference_in_many_groups():
    """Thousands of tiny groups of all magnitudes: every candidate (scale, zero point) is made as the reference
    makes it, whichever instruction set builds them (no fused multiply-add may round differently)."""
    rng = np.random.default_rng(5)
    w = rng.standard_t(3, size=(2, 6000)) * 10.0 ** rng.uniform(-8, 8, size=6000)
    # A group where a fused r * hi - r * lo once rounded one asymmetric scale differently.
    fused = np.array([[0xC08A0109], [0x40C2E892]], np.uint32).view(np.float32)
    w = np.concatenate([w.astype(np.float32), fused], axis=1)
    for bits in (2, 3, 8):
        for symmetric in (True, False):
            want = core_search(w, bits, axis=1, symmetric=symmetric, refine=False, reference=True)
            for isa in ISAS:
                got = core_search(w, bits, axis=1, symmetric=symmetric, refine=False, isa=isa)
                np.testing.assert_array_equal(got[0], want[0])
                np.testing.assert_array_equal(got[1], want[1])


def test_binned_screening_thread_invariance():
    w = weights_like((9, 1100), 3)
    base = pq.scale_search(w, 4, num_threads=1)
    for t in (2, 3, 7):
        got = pq.scale_search(w, 4, num_threads=t)
        np.testing.assert_array_equal(got[0], base[0])
        np.testing.assert_array_equal(got[1], base[1])


def test_reciprocal_quotient_is_the_float32_quotient():
    """The SIMD paths compute x / s as float32(float64(x) * (1 / float64(s))): check it on halfway values."""
    rng = np.random.default_rng(0)
    for _ in range(20):
        s = np.float32(rng.uniform(1e-3, 1) * 2.0 ** rng.integers(-30, 30))
        k = rng.integers(-40000, 40000, size=20000)
        x = ((k + 0.5) * np.float64(s)).astype(np.float32)
        for step in (-1, 0, 1):
            xs = (x.view(np.int32) + step).view(np.float32)
            want = xs / s
            got = (xs.astype(np.float64) * (1.0 / np.float64(s))).astype(np.float32)
            np.testing.assert_array_equal(got.view(np.int32), want.view(np.int32))


# ---------------------------------------------------------------- threads


def test_thread_count_invariance():
    w = weights_like((37, 300), 4)
    sw = np.random.default_rng(2).uniform(0, 1, 300)
    for kwargs in ({}, {"symmetric": False}, {"axis": 1, "block_size": 32}, {"sample_weight": sw}, {"axis": None}):
        base = pq.scale_search(w, 4, num_threads=1, **kwargs)
        for t in (2, 3, 7):
            got = pq.scale_search(w, 4, num_threads=t, **kwargs)
            np.testing.assert_array_equal(got[0], base[0])
            np.testing.assert_array_equal(got[1], base[1])
    s, z = pq.scale_search(w, 8, axis=1, block_size=16)
    q1 = pq.quantize(w, s, z, 8, axis=1, block_size=16, num_threads=1)
    for t in (2, 3, 7):
        np.testing.assert_array_equal(pq.quantize(w, s, z, 8, axis=1, block_size=16, num_threads=t), q1)
        np.testing.assert_array_equal(
            pq.dequantize(q1, s, z, 8, axis=1, block_size=16, num_threads=t),
            pq.dequantize(q1, s, z, 8, axis=1, block_size=16, num_threads=1),
        )


def test_concurrent_python_threads():
    ws = [weights_like((64, 512), seed) for seed in range(6)]
    serial = [pq.scale_search(w, 4) for w in ws]
    with ThreadPoolExecutor(max_workers=4) as ex:
        parallel = list(ex.map(lambda w: pq.scale_search(w, 4, num_threads=2), ws))
        codes = list(ex.map(lambda a: pq.quantize(a[0], *a[1], 4), zip(ws, serial)))
    for a, b in zip(serial, parallel):
        np.testing.assert_array_equal(a[0], b[0])
    for w, (s, z), q in zip(ws, serial, codes):
        np.testing.assert_array_equal(q, pq.quantize(w, s, z, 4))


def test_worker_exception_is_carried_back():
    w = weights_like((64, 1024), 6)
    w[50, 3] = np.nan
    with pytest.raises(ValueError, match="finite"):
        pq.scale_search(w, 8, num_threads=3)
    w[50, 3] = np.inf
    with pytest.raises(ValueError, match="group 50"):
        pq.scale_search(w, 8, num_threads=3)
    q = np.zeros((64, 4096), np.int8)
    q[60, 7] = 9  # outside the 4-bit range
    with pytest.raises(ValueError, match="bits"):
        pq.dequantize(q, np.ones(64, np.float32), np.zeros(64, np.int8), 4, num_threads=3)


# ---------------------------------------------------------------- quantize / dequantize against onnxruntime

ORT_TYPES = {
    (4, True): TensorProto.INT4,
    (4, False): TensorProto.UINT4,
    (8, True): TensorProto.INT8,
    (8, False): TensorProto.UINT8,
    (16, True): TensorProto.INT16,
    (16, False): TensorProto.UINT16,
}


def ort_qdq(x, scale, zp, bits, signed, axis, block_size):
    """(codes, dequantized) from onnxruntime QuantizeLinear -> DequantizeLinear (opset 21).

    Codes are read through a second DequantizeLinear with scale 1 and zero point 0 (INT4 outputs have no
    numpy type), which is exact for codes of at most 16 bits.
    """
    attrs = {}
    if axis is not None:
        attrs["axis"] = axis
    if block_size is not None:
        attrs["block_size"] = block_size
    t = ORT_TYPES[(bits, signed)]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["y"], **attrs),
        helper.make_node("DequantizeLinear", ["y", "s", "z"], ["d"], **attrs),
        helper.make_node("DequantizeLinear", ["y", "one", "zero"], ["codes"], **attrs),
    ]
    inits = [
        helper.make_tensor("s", TensorProto.FLOAT, scale.shape, scale.reshape(-1).tolist()),
        helper.make_tensor("z", t, zp.shape, zp.reshape(-1).astype(int).tolist()),
        helper.make_tensor("one", TensorProto.FLOAT, scale.shape, [1.0] * scale.size),
        helper.make_tensor("zero", t, zp.shape, [0] * zp.size),
    ]
    graph = helper.make_graph(
        nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
        [helper.make_tensor_value_info("d", TensorProto.FLOAT, x.shape),
         helper.make_tensor_value_info("codes", TensorProto.FLOAT, x.shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    d, codes = sess.run(None, {"x": x})
    return codes, d


def awkward_values(shape, scale_hint, seed, huge=True):
    """Random values plus exact halfway points k + 0.5 (times the scale) and saturating values.

    ``huge`` adds +-1e30 and +-Inf. onnxruntime saturates them per tensor, but its per-axis INT4 path
    wraps once |x / scale| reaches 2^31 (the ONNX spec says saturate, as pyqshare does), so per-axis
    comparisons use saturating values below that.
    """
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * scale_hint * 40).astype(np.float32)
    flat = x.reshape(-1)
    n = flat.size
    flat[: n // 3] = ((rng.integers(-20, 20, n // 3) + 0.5) * scale_hint).astype(np.float32)
    far = [1e30, -1e30, np.inf, -np.inf] if huge else [1e8 * scale_hint, -1e8 * scale_hint, 3e7 * scale_hint]
    flat[n // 3 : n // 3 + len(far)] = far[: max(0, min(len(far), n - n // 3))]
    return x


@pytest.mark.parametrize("bits,signed", list(ORT_TYPES))
@pytest.mark.parametrize("shape,axis,block_size", [((7, 12), None, None), ((7, 12), 0, None), ((7, 12), 1, None),
                                                    ((6, 20), 1, 8), ((9, 4), 0, 4), ((2, 3, 10), 2, 4)])
def test_quantize_dequantize_match_onnxruntime(bits, signed, shape, axis, block_size):
    rng = np.random.default_rng(bits * 7 + len(shape))
    # Power-of-two scales make k + 0.5 exactly representable: true halfway cases.
    _, _, _, _, _, _, pshape = _layout(shape, axis, block_size)
    scale = (2.0 ** rng.integers(-6, 0, size=pshape)).astype(np.float32)
    lo, hi = code_range(bits, signed)
    zp = rng.integers(lo, hi + 1, size=pshape).astype(pq.kernels.quantization._code_dtype(bits, signed))
    x = awkward_values(shape, float(scale.min()), seed=bits, huge=axis is None)
    kwargs = {"axis": axis, "block_size": block_size}
    q = pq.quantize(x, scale, zp, bits, **kwargs)
    codes, deq_ort = ort_qdq(x, scale, zp, bits, signed, axis, block_size)
    np.testing.assert_array_equal(q.astype(np.float32), codes)
    np.testing.assert_array_equal(pq.dequantize(q, scale, zp, bits, **kwargs).view(np.int32), deq_ort.view(np.int32))
    # arbitrary (not power-of-two) scales from the search, too
    if axis is not None or block_size is None:
        w = rng.standard_normal(shape).astype(np.float32)
        s, z = pq.scale_search(w, bits, symmetric=signed, grid=10, **kwargs)
        if axis is None:
            s, z = np.asarray(s), np.asarray(z)
        codes, deq_ort = ort_qdq(w, s, z, bits, signed, axis, block_size)
        q = pq.quantize(w, s, z, bits, **kwargs)
        np.testing.assert_array_equal(q.astype(np.float32), codes)
        np.testing.assert_array_equal(pq.dequantize(q, s, z, bits, **kwargs), deq_ort)


@pytest.mark.parametrize("bits,signed", list(ORT_TYPES) + [(3, True), (12, False)])
@pytest.mark.parametrize("shape,axis,block_size", [((5, 37), 0, None), ((5, 37), 1, 8), ((6, 5, 3), 1, 2), ((41,), None, None)])
def test_quantize_simd_equals_portable(bits, signed, shape, axis, block_size):
    _, _, _, _, _, _, pshape = _layout(shape, axis, block_size)
    rng = np.random.default_rng(bits)
    scale = rng.uniform(0.01, 0.3, size=pshape).astype(np.float32)
    lo, hi = code_range(bits, signed)
    zp = rng.integers(lo, hi + 1, size=pshape).astype(pq.kernels.quantization._code_dtype(bits, signed))
    x = awkward_values(shape, 0.01, seed=bits)
    layout = _layout(shape, axis, block_size)[:5]
    args = (scale.reshape(-1), zp.reshape(-1), bits, *layout, 2)
    q = _core.quantize(x, *args)
    np.testing.assert_array_equal(q, _core.quantize(x, *args, simd=False))
    np.testing.assert_array_equal(_core.dequantize(q, *args).view(np.int32),
                                  _core.dequantize(q, *args, simd=False).view(np.int32))


@pytest.mark.parametrize("bits", [2, 3, 5, 7, 12])
def test_other_widths_follow_the_same_rules(bits):
    x = awkward_values((5, 40), 0.125, seed=bits)
    for signed in (True, False):
        lo, hi = code_range(bits, signed)
        scale = np.full(5, 0.125, np.float32)
        zp = np.linspace(lo, hi, 5).round().astype(pq.kernels.quantization._code_dtype(bits, signed))
        q = pq.quantize(x, scale, zp, bits)
        finite = np.where(np.isfinite(x), x, np.sign(x) * 1e30)
        want = np.clip(np.rint(finite / np.float32(0.125)) + zp[:, None].astype(np.int64), lo, hi)
        np.testing.assert_array_equal(q.astype(np.int64), want)
        deq = pq.dequantize(q, scale, zp, bits)
        np.testing.assert_array_equal(deq, (q.astype(np.int32) - zp[:, None]).astype(np.float32) * np.float32(0.125))


def test_error_of_scale_search_is_what_dequantize_gives():
    w = weights_like((8, 77), 12)
    s, z = pq.scale_search(w, 4, symmetric=False)
    deq = pq.dequantize(pq.quantize(w, s, z, 4), s, z, 4)
    for k, x in enumerate(w):
        assert np.sum((x.astype(np.float64) - deq[k]) ** 2) == pytest.approx(np_error(x, s[k], int(z[k]), 4, False), rel=1e-12)


# ---------------------------------------------------------------- refusals


def test_refusals():
    w = weights_like((4, 8), 0)
    with pytest.raises(TypeError, match="float32"):
        pq.scale_search(w.astype(np.float64), 8)
    with pytest.raises(TypeError, match="numpy.ndarray"):
        pq.scale_search(w.tolist(), 8)
    with pytest.raises(ValueError, match="ascontiguousarray"):
        pq.scale_search(w[:, ::2], 8)
    with pytest.raises(ValueError, match=r"bits must be in \[2, 16\]"):
        pq.scale_search(w, 1)
    with pytest.raises(ValueError, match=r"bits must be in \[2, 16\]"):
        pq.scale_search(w, 17)
    with pytest.raises(ValueError, match="grid must be >= 1"):
        pq.scale_search(w, 8, grid=0)
    with pytest.raises(ValueError, match="p must be a finite number > 0"):
        pq.scale_search(w, 8, objective="lp", p=0.0)
    with pytest.raises(ValueError, match="objective must be one of"):
        pq.scale_search(w, 8, objective="mae")
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        pq.scale_search(w, 8, axis=1, block_size=0)
    with pytest.raises(ValueError, match="block_size needs an axis"):
        pq.scale_search(w, 8, axis=None, block_size=4)
    with pytest.raises(ValueError, match="out of range"):
        pq.scale_search(w, 8, axis=2)
    with pytest.raises(ValueError, match="does not broadcast"):
        pq.scale_search(w, 8, sample_weight=np.ones(5))
    with pytest.raises(ValueError, match=">= 0"):
        pq.scale_search(w, 8, sample_weight=-np.ones(8))
    with pytest.raises(TypeError, match="float32, float64"):
        pq.scale_search(w, 8, sample_weight=np.ones(8, np.int64))
    bad = w.copy()
    bad[1, 1] = np.inf
    with pytest.raises(ValueError, match="finite"):
        pq.scale_search(bad, 8)
    s, z = pq.scale_search(w, 8)
    with pytest.raises(ValueError, match="scale shape"):
        pq.quantize(w, s[:3], z[:3], 8)
    with pytest.raises(ValueError, match="finite and > 0"):
        pq.quantize(w, np.zeros(4, np.float32), z, 8)
    with pytest.raises(TypeError, match="int16, uint16"):
        pq.quantize(w, s, z, 12)
    with pytest.raises(ValueError, match="zero_point must lie"):
        pq.quantize(w, s, np.full(4, 9, np.int8), 4)
    with pytest.raises(ValueError, match="zero_point shape"):
        pq.quantize(w, s, z[:2], 8)
    with pytest.raises(ValueError, match="NaN"):
        pq.quantize(np.full((4, 8), np.nan, np.float32), s, z, 8)
    with pytest.raises(TypeError, match="int8"):
        pq.dequantize(np.zeros((4, 8), np.int16), s, z, 8)
    with pytest.raises(ValueError, match="isa"):
        core_search(w, 8, isa=7)


def test_float16_input_is_widened():
    w = weights_like((4, 64), 1)
    s16, z16 = pq.scale_search(w.astype(np.float16), 4)
    s32, z32 = pq.scale_search(w.astype(np.float16).astype(np.float32), 4)
    np.testing.assert_array_equal(s16, s32)
