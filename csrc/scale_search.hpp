// Scale search for ONNX QuantizeLinear: per group (tensor, channel or block) pick, among `grid` clipping
// candidates, the (scale, zero_point) whose quantize -> dequantize error is smallest, then try the
// closed-form least-squares scale for the winner's codes.
//
// Definitions (the Python docstring and the tests' numpy reference follow them exactly):
//   candidate i in [0, grid): r = (grid - i) / grid (float64)
//     symmetric:  M = max|x|, scale = f32(r * M / (2^(b-1) - 1)), zero_point = 0, codes [-2^(b-1), 2^(b-1)-1]
//     asymmetric: lo = min(min x, 0), hi = max(max x, 0), scale = f32((r*hi - r*lo) / (2^b - 1)),
//                 zero_point = clamp(rint(-(r*lo) / scale), 0, 2^b - 1), codes [0, 2^b - 1]
//     a scale below the smallest normal float32 is raised to it; a group with M == 0 (or lo == hi == 0)
//     gets scale 1, zero_point 0 without a search.
//   error of an element: d = f64(x) - f64(dequantize(quantize(x))) with the exact ONNX rules of
//     quantize.hpp; mse: w * d * d, lp: w * |d|^p (w = sample weight, 1 without one).
//   error of a candidate: element k accumulates into lane k mod 16 (mse: lane = fma(w*d, d, lane);
//     lp: lane += w*|d|^p), then lanes are added as a fixed tree (reduce_lanes). Every implementation
//     (scalar reference, portable, AVX2, AVX-512) produces these bits exactly.
//   winner: the smallest (error, i) pair; "minmax" is candidate 0 without search or refinement.
//   refinement: k = code - zero_point of the winner, s* = sum(w x k) / sum(w k k) (zero point kept);
//     f32(s*) replaces the winner when its error is not larger.
//
// The fast search returns exactly the reference's answer: a candidate is dropped only when it is provably
// worse than another: by an exact lower bound from the largest elements (with a rounding margin), by a
// float32 screening pass whose prefix sums bound the exact error from below (ScreenBound), by early
// abandoning of the exact sum (its partial sums can only grow), and for groups with many elements per
// code by two-sided bounds from a histogram of the group (HistogramGroup), carried to neighbouring
// candidates (ShiftBound), after which exact windows (resolve_windows) usually decide the winner and its
// refinement without any full evaluation. Exact evaluations use a float32 fast path that is exact where it
// runs (FastCandidate*); the refinement is often decided from the winner's sums (refined_not_worse).
#pragma once

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <numeric>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define PYQSHARE_QUANT_X86 1
#endif

#include "parallel.hpp"
#include "quantize.hpp"

namespace pyqshare::quant {

enum class Objective { kMse = 0, kLp = 1, kMinMax = 2 };
enum class Isa { kAuto = -1, kPortable = 0, kAvx2 = 1, kAvx512 = 2 };

struct SearchConfig {
  int bits = 8;
  bool symmetric = true;
  Objective objective = Objective::kMse;
  int grid = 100;
  double p = 2.0;
  bool refine = true;
  bool squared() const { return objective != Objective::kLp || p == 2.0; }
};

// One (scale, zero point) and the clamp bounds of x / scale it implies: [qmin - zp, qmax - zp].
struct Candidate {
  float scale = 1.0f;
  int32_t zero_point = 0;
  float lo = 0.0f, hi = 0.0f;
};

struct GroupResult {
  float scale = 1.0f;
  int32_t zero_point = 0;
};

// The elements of one group in their defined order, and optional weights.
struct GroupData {
  const float* x = nullptr;
  const double* w = nullptr;  // nullptr: every weight is 1
  std::size_t n = 0;
};

constexpr std::size_t kLanes = 16;

// Cache lines of the next group, asked for a slice at a time while the current group is searched: a
// group's first pass otherwise waits for memory, and one burst of requests is mostly dropped. With
// `to_l2` they go to L2 only (locality 2): in L1 they would push out the current group's histogram.
struct Prefetch {
  const float* next = nullptr;
  std::size_t left = 0;  // floats not asked for yet
  bool to_l2 = false;
  void step(std::size_t count) {
    count = std::min(count, left);
    if (to_l2) {
      for (std::size_t k = 0; k < count; k += 16) __builtin_prefetch(next + k, 0, 2);
    } else {
      for (std::size_t k = 0; k < count; k += 16) __builtin_prefetch(next + k);
    }
    next += count;
    left -= count;
  }
};
constexpr std::size_t kCheckEvery = 256;  // elements between early-abandon checks (a multiple of kLanes)

inline double reduce_lanes(const double* lane) {
  double t[8], u[4];
  for (int j = 0; j < 8; ++j) t[j] = lane[j] + lane[j + 8];
  for (int j = 0; j < 4; ++j) u[j] = t[j] + t[j + 4];
  const double v0 = u[0] + u[2], v1 = u[1] + u[3];
  return v0 + v1;
}

// Clipping ratio of candidate i: (grid - i) / grid in float64.
inline double clip_ratio(const SearchConfig& cfg, int i) { return static_cast<double>(cfg.grid - i) / cfg.grid; }

inline Candidate make_candidate(const SearchConfig& cfg, double xmin, double xmax, double r) {
  const CodeRange range = code_range(cfg.bits, cfg.symmetric);
  Candidate c;
  if (cfg.symmetric) {
    const double m = std::max(std::fabs(xmin), std::fabs(xmax));
    c.scale = std::max(static_cast<float>(r * m / range.qmax), FLT_MIN);
    c.zero_point = 0;
  } else {
    const double lo = r * std::min(xmin, 0.0), hi = r * std::max(xmax, 0.0);
    c.scale = std::max(static_cast<float>((hi - lo) / range.qmax), FLT_MIN);
    const double zp = std::nearbyint(-lo / static_cast<double>(c.scale));
    c.zero_point = static_cast<int32_t>(std::min<double>(std::max(zp, 0.0), range.qmax));
  }
  c.lo = static_cast<float>(range.qmin - c.zero_point);
  c.hi = static_cast<float>(range.qmax - c.zero_point);
  return c;
}

inline Candidate with_scale(Candidate c, float scale) {
  c.scale = scale;
  return c;
}

// x / scale clamped and rounded: the code minus the zero point, as quantize() computes it.
inline float offset_code(float x, const Candidate& c) {
  const float t = std::min(std::max(x / c.scale, c.lo), c.hi);
  return round_half_even_small(t);
}

inline double element_diff(float x, const Candidate& c) {
  const float deq = offset_code(x, c) * c.scale;
  return static_cast<double>(x) - static_cast<double>(deq);
}

// At least one element's screening difference squared, as the screening kernels compute it: their code is
// x * f32(1 / scale) rounded to even (here in float64: exact and without a library call) and their
// difference the float32 rounding of x - code * scale.
inline double screen_term_upper(float x, const Candidate& c) {
  const double t = static_cast<double>(x * (1.0f / c.scale));
  const double q = (t + 0x1.8p52) - 0x1.8p52;  // |t| < 2^51: rounds at the units
  const double d = static_cast<double>(x) - q * static_cast<double>(c.scale);
  return d * d * (1.0 + 0x1p-22);
}

// Lane sums of w*q*x and w*q*q of one candidate (q: its offset codes), as refine_sums_scalar defines them.
struct RefineSums {
  double num = 0.0, den = 0.0;
  bool valid = false;
};

struct EvalResult {
  double error;
  bool complete;  // false: abandoned, the error is known to lose against the bound
};

// Abandon when the partial sum proves the final error loses: it exceeds `bound`, or equals it while a
// tie loses (`ties_lose`: the candidate's index is larger than the best one's).
inline bool loses(double partial, double bound, bool ties_lose) {
  return partial > bound || (ties_lose && partial >= bound);
}

// Scalar evaluation with the lane structure: the reference, the portable path and the lp path.
inline EvalResult eval_scalar(const GroupData& g, const Candidate& c, double p, bool squared, double bound,
                              bool ties_lose) {
  double lane[kLanes] = {};
  for (std::size_t k = 0; k < g.n; ++k) {
    const double d = element_diff(g.x[k], c);
    double& acc = lane[k % kLanes];
    if (squared) {
      acc = std::fma(g.w ? g.w[k] * d : d, d, acc);
    } else {
      const double e = std::pow(std::fabs(d), p);
      acc += g.w ? g.w[k] * e : e;
    }
    if ((k + 1) % kCheckEvery == 0 && k + 1 < g.n && loses(reduce_lanes(lane), bound, ties_lose)) {
      return {reduce_lanes(lane), false};
    }
  }
  return {reduce_lanes(lane), true};
}

#ifdef PYQSHARE_QUANT_X86
// The SIMD kernels compute x / scale in one of two ways, both giving the reference's code and difference:
// - exact path: f32(f64(x) * f64(1 / scale)) is the correctly rounded float32 quotient (the exact quotient
//   is never within 2^-49 relative of a float32 rounding boundary, and the float64 product is within
//   2^-52 of it), several times cheaper than a float32 division;
// - fast path (FastCandidate): t = x * f32(1 / scale) in float32 is within 1.5 * 2^-23 |x / scale| of the
//   correctly rounded quotient, so its clamped, rounded code is the reference's unless t lies within
//   2^-21 (hmax + 1) of a half-integer (hmax = max(|lo|, |hi|)); then |t - code| <= limit < 1/2 also
//   makes x and code * scale differ by at most a factor of two (or the product is zero), so the float32
//   difference x - code * scale is exact (Sterbenz). Elements failing |t - code| <= limit (near a half,
//   clipped far beyond the range, or a subnormal 1 / scale) take the exact path.
// Lambdas are avoided: they do not inherit the target attribute.
#define PYQSHARE_AVX2 __attribute__((target("avx2,fma")))
#define PYQSHARE_AVX512 __attribute__((target("avx512f,avx512dq,avx2,fma")))

// Threshold of the fast path: |t - code| above it sends an element to the exact path.
inline float fast_path_limit(const Candidate& c) {
  const float inv = 1.0f / c.scale;
  if (!(inv >= FLT_MIN)) return -1.0f;  // subnormal reciprocal: its relative error is unbounded
  return 0.5f - 0x1p-21f * (std::max(std::fabs(c.lo), std::fabs(c.hi)) + 1.0f);
}

PYQSHARE_AVX2 inline double lanes_sum_avx2(const __m256d* acc) {
  alignas(32) double lane[kLanes];
  for (int j = 0; j < 4; ++j) _mm256_store_pd(lane + 4 * j, acc[j]);
  return reduce_lanes(lane);
}

// x / scale clamped and rounded, for four elements given as float64 (the exact path).
PYQSHARE_AVX2 inline __m128 offset_code_avx2(__m256d xv, __m256d inv, __m128 lo, __m128 hi) {
  const __m128 t = _mm_min_ps(_mm_max_ps(_mm256_cvtpd_ps(_mm256_mul_pd(xv, inv)), lo), hi);
  return _mm_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

struct FastCandidateAvx2 {
  __m256 inv, scale, lo, hi, limit;
  __m256d inv_exact;
};

PYQSHARE_AVX2 inline FastCandidateAvx2 fast_candidate_avx2(const Candidate& c) {
  return {_mm256_set1_ps(1.0f / c.scale), _mm256_set1_ps(c.scale), _mm256_set1_ps(c.lo), _mm256_set1_ps(c.hi),
          _mm256_set1_ps(fast_path_limit(c)), _mm256_set1_pd(1.0 / static_cast<double>(c.scale))};
}

// Differences (as float64, elements 0-3 and 4-7) and offset codes of eight elements.
PYQSHARE_AVX2 inline void diff8_avx2(__m256 x, const FastCandidateAvx2& f, __m256d& d0, __m256d& d1, __m256& q) {
  const __m256 t = _mm256_mul_ps(x, f.inv);
  q = _mm256_round_ps(_mm256_min_ps(_mm256_max_ps(t, f.lo), f.hi), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 off = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), _mm256_sub_ps(t, q));
  if (__builtin_expect(_mm256_movemask_ps(_mm256_cmp_ps(off, f.limit, _CMP_NLE_UQ)) == 0, 1)) {
    __m256 deq = _mm256_mul_ps(q, f.scale);
    asm("" : "+x"(deq));  // a rounded product: the compiler must not fuse it into the subtraction
    const __m256 d = _mm256_sub_ps(x, deq);
    d0 = _mm256_cvtps_pd(_mm256_castps256_ps128(d));
    d1 = _mm256_cvtps_pd(_mm256_extractf128_ps(d, 1));
    return;
  }
  const __m128 lo = _mm256_castps256_ps128(f.lo), hi = _mm256_castps256_ps128(f.hi);
  const __m128 scale = _mm256_castps256_ps128(f.scale);
  const __m256d x0 = _mm256_cvtps_pd(_mm256_castps256_ps128(x)), x1 = _mm256_cvtps_pd(_mm256_extractf128_ps(x, 1));
  const __m128 q0 = offset_code_avx2(x0, f.inv_exact, lo, hi), q1 = offset_code_avx2(x1, f.inv_exact, lo, hi);
  d0 = _mm256_sub_pd(x0, _mm256_cvtps_pd(_mm_mul_ps(q0, scale)));
  d1 = _mm256_sub_pd(x1, _mm256_cvtps_pd(_mm_mul_ps(q1, scale)));
  q = _mm256_insertf128_ps(_mm256_castps128_ps256(q0), q1, 1);
}

// Four elements (d, codes q, x as float32 lanes of a float64 conversion) into one lane vector; with kSums
// also into the refinement lane sums.
template <bool kSums>
PYQSHARE_AVX2 inline __m256d mse_lanes_avx2(__m256d d, __m128 q, __m128 x, const double* w, __m256d acc, __m256d& num,
                                            __m256d& den) {
  const __m256d wv = w ? _mm256_loadu_pd(w) : _mm256_setzero_pd();
  if (kSums) {
    const __m256d qd = _mm256_cvtps_pd(q);
    const __m256d wq = w ? _mm256_mul_pd(wv, qd) : qd;
    num = _mm256_fmadd_pd(wq, _mm256_cvtps_pd(x), num);
    den = _mm256_fmadd_pd(wq, qd, den);
  }
  return _mm256_fmadd_pd(w ? _mm256_mul_pd(wv, d) : d, d, acc);
}

// Sixteen elements into the four lane vectors.
template <bool kSums>
PYQSHARE_AVX2 inline void mse_step16_avx2(const float* x, const double* w, const FastCandidateAvx2& f, __m256d* acc,
                                          __m256d* num, __m256d* den) {
  for (int h = 0; h < 2; ++h) {
    const __m256 xv = _mm256_loadu_ps(x + 8 * h);
    __m256d d0, d1;
    __m256 q;
    diff8_avx2(xv, f, d0, d1, q);
    const double* wh = w ? w + 8 * h : nullptr;
    acc[2 * h] = mse_lanes_avx2<kSums>(d0, _mm256_castps256_ps128(q), _mm256_castps256_ps128(xv), wh, acc[2 * h],
                                       num[2 * h], den[2 * h]);
    acc[2 * h + 1] = mse_lanes_avx2<kSums>(d1, _mm256_extractf128_ps(q, 1), _mm256_extractf128_ps(xv, 1),
                                           wh ? wh + 4 : nullptr, acc[2 * h + 1], num[2 * h + 1], den[2 * h + 1]);
  }
}

// With kSums, a complete evaluation also leaves the candidate's refinement sums (see eval_mse_avx512).
template <bool kSums>
PYQSHARE_AVX2 inline EvalResult eval_mse_avx2(const GroupData& g, const Candidate& c, double bound, bool ties_lose,
                                              RefineSums* sums) {
  const FastCandidateAvx2 f = fast_candidate_avx2(c);
  __m256d acc[4], num[4], den[4];
  for (int j = 0; j < 4; ++j) acc[j] = num[j] = den[j] = _mm256_setzero_pd();
  const std::size_t n16 = g.n - g.n % kLanes;
  std::size_t k = 0;
  while (k < n16) {
    const std::size_t stop = std::min(n16, k + kCheckEvery);
    for (; k < stop; k += kLanes) mse_step16_avx2<kSums>(g.x + k, g.w ? g.w + k : nullptr, f, acc, num, den);
    if (k < g.n) {
      const double partial = lanes_sum_avx2(acc);
      if (loses(partial, bound, ties_lose)) return {partial, false};
    }
  }
  if (k < g.n) {
    // The tail goes through zero-padded copies: padding contributes exactly +0 to its lanes.
    alignas(32) float xt[kLanes] = {};
    alignas(32) double wt[kLanes] = {};
    for (std::size_t j = 0; k + j < g.n; ++j) {
      xt[j] = g.x[k + j];
      if (g.w) wt[j] = g.w[k + j];
    }
    mse_step16_avx2<kSums>(xt, g.w ? wt : nullptr, f, acc, num, den);
  }
  if (kSums) {
    sums->num = lanes_sum_avx2(num);
    sums->den = lanes_sum_avx2(den);
    sums->valid = true;
  }
  return {lanes_sum_avx2(acc), true};
}

PYQSHARE_AVX512 inline double lanes_sum_avx512(__m512d acc0, __m512d acc1) {
  alignas(64) double lane[kLanes];
  _mm512_store_pd(lane, acc0);
  _mm512_store_pd(lane + 8, acc1);
  return reduce_lanes(lane);
}

PYQSHARE_AVX512 inline __m256 offset_code_avx512(__m512d xv, __m512d inv, __m256 lo, __m256 hi) {
  const __m256 t = _mm256_min_ps(_mm256_max_ps(_mm512_cvtpd_ps(_mm512_mul_pd(xv, inv)), lo), hi);
  return _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

struct FastCandidateAvx512 {
  __m512 inv, scale, lo, hi, limit;
  __m512d inv_exact;
};

PYQSHARE_AVX512 inline FastCandidateAvx512 fast_candidate_avx512(const Candidate& c) {
  return {_mm512_set1_ps(1.0f / c.scale), _mm512_set1_ps(c.scale), _mm512_set1_ps(c.lo), _mm512_set1_ps(c.hi),
          _mm512_set1_ps(fast_path_limit(c)), _mm512_set1_pd(1.0 / static_cast<double>(c.scale))};
}

// Differences (as float64, elements 0-7 and 8-15) and offset codes of sixteen elements.
PYQSHARE_AVX512 inline void diff16_avx512(__m512 x, const FastCandidateAvx512& f, __m512d& d0, __m512d& d1,
                                          __m512& q) {
  const __m512 t = _mm512_mul_ps(x, f.inv);
  q = _mm512_roundscale_ps(_mm512_min_ps(_mm512_max_ps(t, f.lo), f.hi), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  if (__builtin_expect(_mm512_cmp_ps_mask(_mm512_abs_ps(_mm512_sub_ps(t, q)), f.limit, _CMP_NLE_UQ) == 0, 1)) {
    __m512 deq = _mm512_mul_ps(q, f.scale);
    asm("" : "+v"(deq));  // a rounded product: the compiler must not fuse it into the subtraction
    const __m512 d = _mm512_sub_ps(x, deq);
    d0 = _mm512_cvtps_pd(_mm512_castps512_ps256(d));
    d1 = _mm512_cvtps_pd(_mm512_extractf32x8_ps(d, 1));
    return;
  }
  const __m256 lo = _mm512_castps512_ps256(f.lo), hi = _mm512_castps512_ps256(f.hi);
  const __m256 scale = _mm512_castps512_ps256(f.scale);
  const __m512d x0 = _mm512_cvtps_pd(_mm512_castps512_ps256(x)), x1 = _mm512_cvtps_pd(_mm512_extractf32x8_ps(x, 1));
  const __m256 q0 = offset_code_avx512(x0, f.inv_exact, lo, hi), q1 = offset_code_avx512(x1, f.inv_exact, lo, hi);
  d0 = _mm512_sub_pd(x0, _mm512_cvtps_pd(_mm256_mul_ps(q0, scale)));
  d1 = _mm512_sub_pd(x1, _mm512_cvtps_pd(_mm256_mul_ps(q1, scale)));
  q = _mm512_insertf32x8(_mm512_castps256_ps512(q0), q1, 1);
}

// Eight elements (in mask m; d, codes q, x) into one lane vector; with kSums also into the refinement sums.
template <bool kSums>
PYQSHARE_AVX512 inline __m512d mse_lanes_avx512(__m512d d, __m256 q, __m256 x, const double* w, __mmask8 m,
                                                __m512d acc, __m512d& num, __m512d& den) {
  const __m512d wv = w ? _mm512_maskz_loadu_pd(m, w) : _mm512_setzero_pd();
  if (kSums) {
    const __m512d qd = _mm512_cvtps_pd(q);
    const __m512d wq = w ? _mm512_mul_pd(wv, qd) : qd;
    num = _mm512_fmadd_pd(wq, _mm512_cvtps_pd(x), num);
    den = _mm512_fmadd_pd(wq, qd, den);
  }
  return _mm512_fmadd_pd(w ? _mm512_mul_pd(wv, d) : d, d, acc);
}

// Sixteen elements (those in mask m) into the two lane vectors; masked-out elements are loaded as 0,
// whose code is 0 and difference +0: they add exactly nothing.
template <bool kSums>
PYQSHARE_AVX512 inline void mse_step16_avx512(const float* x, const double* w, __mmask16 m,
                                              const FastCandidateAvx512& f, __m512d& acc0, __m512d& acc1,
                                              __m512d& n0, __m512d& n1, __m512d& d0, __m512d& d1) {
  const __m512 xv = _mm512_maskz_loadu_ps(m, x);
  __m512d e0, e1;
  __m512 q;
  diff16_avx512(xv, f, e0, e1, q);
  acc0 = mse_lanes_avx512<kSums>(e0, _mm512_castps512_ps256(q), _mm512_castps512_ps256(xv), w,
                                 static_cast<__mmask8>(m), acc0, n0, d0);
  acc1 = mse_lanes_avx512<kSums>(e1, _mm512_extractf32x8_ps(q, 1), _mm512_extractf32x8_ps(xv, 1), w ? w + 8 : nullptr,
                                 static_cast<__mmask8>(m >> 8), acc1, n1, d1);
}

// With kSums, a complete evaluation also leaves the candidate's refinement sums: no second pass for them.
template <bool kSums>
PYQSHARE_AVX512 inline EvalResult eval_mse_avx512(const GroupData& g, const Candidate& c, double bound,
                                                  bool ties_lose, RefineSums* sums) {
  const FastCandidateAvx512 f = fast_candidate_avx512(c);
  __m512d acc0 = _mm512_setzero_pd(), acc1 = acc0, n0 = acc0, n1 = acc0, d0 = acc0, d1 = acc0;
  const std::size_t n16 = g.n - g.n % kLanes;
  std::size_t k = 0;
  while (k < n16) {
    const std::size_t stop = std::min(n16, k + kCheckEvery);
    for (; k < stop; k += kLanes) {
      mse_step16_avx512<kSums>(g.x + k, g.w ? g.w + k : nullptr, 0xFFFF, f, acc0, acc1, n0, n1, d0, d1);
    }
    if (k < g.n) {
      const double partial = lanes_sum_avx512(acc0, acc1);
      if (loses(partial, bound, ties_lose)) return {partial, false};
    }
  }
  if (k < g.n) {
    const __mmask16 m = static_cast<__mmask16>((1u << (g.n - k)) - 1);
    mse_step16_avx512<kSums>(g.x + k, g.w ? g.w + k : nullptr, m, f, acc0, acc1, n0, n1, d0, d1);
  }
  if (kSums) {
    sums->num = lanes_sum_avx512(n0, n1);
    sums->den = lanes_sum_avx512(d0, d1);
    sums->valid = true;
  }
  return {lanes_sum_avx512(acc0, acc1), true};
}

// Errors of n_cand candidates on a few elements (squared objective), eight candidates per vector. Each
// element's difference is the one eval_mse_avx512 computes; only the summation order differs.
PYQSHARE_AVX512 inline void top_errors_avx512(const GroupData& g, const Candidate* cand, int n_cand, double* out) {
  for (int c0 = 0; c0 < n_cand; c0 += 8) {
    alignas(64) double inv_l[8];
    alignas(32) float scale_l[8], lo_l[8], hi_l[8];
    for (int j = 0; j < 8; ++j) {
      const Candidate& c = cand[std::min(c0 + j, n_cand - 1)];
      inv_l[j] = 1.0 / static_cast<double>(c.scale);
      scale_l[j] = c.scale;
      lo_l[j] = c.lo;
      hi_l[j] = c.hi;
    }
    const __m512d inv = _mm512_load_pd(inv_l);
    const __m256 scale = _mm256_load_ps(scale_l), lo = _mm256_load_ps(lo_l), hi = _mm256_load_ps(hi_l);
    __m512d acc = _mm512_setzero_pd();
    for (std::size_t k = 0; k < g.n; ++k) {
      const __m512d xv = _mm512_set1_pd(g.x[k]);
      const __m512d d = _mm512_sub_pd(xv, _mm512_cvtps_pd(_mm256_mul_ps(offset_code_avx512(xv, inv, lo, hi), scale)));
      acc = _mm512_fmadd_pd(g.w ? _mm512_mul_pd(_mm512_set1_pd(g.w[k]), d) : d, d, acc);
    }
    alignas(64) double sum[8];
    _mm512_store_pd(sum, acc);
    for (int j = 0; j < 8 && c0 + j < n_cand; ++j) out[c0 + j] = sum[j];
  }
}

// Screening: a float32 version of the mse sum (x * (1/scale) in float32, fused x - q*scale, float32
// lanes) that is several times cheaper than the exact sum. Codes are not clamped: an element beyond the
// range then counts at most s / 2, no more than its real difference, so the sum stays a lower bound (the
// clipping of the largest elements is added back through the threshold, see search_group_fast). It only
// decides abandonment: it returns true once its prefix sum exceeds `threshold`, which proves the exact
// error exceeds the best one (see ScreenBound). A candidate that survives is then evaluated exactly.
// Sixteen screening terms (elements in mask m) into one accumulator.
PYQSHARE_AVX512 inline __m512 screen_step_avx512(const float* x, const float* w32, __mmask16 m, __m512 inv,
                                                 __m512 scale, __m512 acc) {
  const __m512 v = _mm512_maskz_loadu_ps(m, x);
  const __m512 d = _mm512_fnmadd_ps(_mm512_roundscale_ps(_mm512_mul_ps(v, inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC),
                                    scale, v);
  return _mm512_fmadd_ps(w32 ? _mm512_mul_ps(_mm512_maskz_loadu_ps(m, w32), d) : d, d, acc);
}

PYQSHARE_AVX512 inline bool screen_mse_avx512(const GroupData& g, const float* w32, const Candidate& c,
                                              double threshold) {
  const __m512 inv = _mm512_set1_ps(1.0f / c.scale), scale = _mm512_set1_ps(c.scale);
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  std::size_t k = 0;
  while (k < g.n) {
    const std::size_t stop = std::min(g.n, k + kCheckEvery);
    for (; k + 32 <= stop; k += 32) {
      acc0 = screen_step_avx512(g.x + k, w32 ? w32 + k : nullptr, 0xFFFF, inv, scale, acc0);
      acc1 = screen_step_avx512(g.x + k + 16, w32 ? w32 + k + 16 : nullptr, 0xFFFF, inv, scale, acc1);
    }
    for (; k < stop; k += 16) {  // only at the very end
      const std::size_t rest = std::min<std::size_t>(stop - k, 16);
      acc0 = screen_step_avx512(g.x + k, w32 ? w32 + k : nullptr, static_cast<__mmask16>(rest >= 16 ? 0xFFFF : (1u << rest) - 1),
                                inv, scale, acc0);
    }
    if (static_cast<double>(_mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1))) > threshold) return true;
  }
  return false;
}

// The screening terms of at most sixteen elements, exactly as the screening kernels compute them
// (weighted by w32 when given), summed in float64.
PYQSHARE_AVX512 inline double screen_terms_avx512(const float* x, const float* w32, std::size_t m, const Candidate& c) {
  const __mmask16 mask = static_cast<__mmask16>((1u << m) - 1);
  const __m512 v = _mm512_maskz_loadu_ps(mask, x);
  const __m512 d = _mm512_fnmadd_ps(_mm512_roundscale_ps(_mm512_mul_ps(v, _mm512_set1_ps(1.0f / c.scale)),
                                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC),
                                    _mm512_set1_ps(c.scale), v);
  const __m512d d0 = _mm512_cvtps_pd(_mm512_castps512_ps256(d)), d1 = _mm512_cvtps_pd(_mm512_extractf32x8_ps(d, 1));
  __m512d sq0 = _mm512_mul_pd(d0, d0), sq1 = _mm512_mul_pd(d1, d1);
  if (w32) {
    const __m512 w = _mm512_maskz_loadu_ps(mask, w32);
    sq0 = _mm512_mul_pd(sq0, _mm512_cvtps_pd(_mm512_castps512_ps256(w)));
    sq1 = _mm512_mul_pd(sq1, _mm512_cvtps_pd(_mm512_extractf32x8_ps(w, 1)));
  }
  return _mm512_reduce_add_pd(_mm512_add_pd(sq0, sq1));
}

PYQSHARE_AVX2 inline bool screen_mse_avx2(const GroupData& g, const float* w32, const Candidate& c,
                                          double threshold) {
  const __m256 inv = _mm256_set1_ps(1.0f / c.scale), scale = _mm256_set1_ps(c.scale);
  __m256 acc = _mm256_setzero_ps();
  std::size_t k = 0;
  while (k < g.n) {
    const std::size_t stop = std::min(g.n, k + kCheckEvery);
    for (; k + 8 <= stop; k += 8) {
      const __m256 x = _mm256_loadu_ps(g.x + k);
      const __m256 q = _mm256_round_ps(_mm256_mul_ps(x, inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      const __m256 d = _mm256_fnmadd_ps(q, scale, x);
      acc = _mm256_fmadd_ps(w32 ? _mm256_mul_ps(_mm256_loadu_ps(w32 + k), d) : d, d, acc);
    }
    alignas(32) float lane[8];
    _mm256_store_ps(lane, acc);
    float partial = 0.0f;
    for (float v : lane) partial += v;
    for (; k < stop; ++k) {  // at most 7 elements, only at the very end
      const float d = std::fma(-std::nearbyint(g.x[k] * (1.0f / c.scale)), c.scale, g.x[k]);
      partial = std::fma(w32 ? w32[k] * d : d, d, partial);
    }
    if (static_cast<double>(partial) > threshold) return true;
  }
  return false;
}

PYQSHARE_AVX2 inline __m256 screen_term_avx2(__m256 x, __m256 inv, __m256 lo, __m256 hi, __m256 scale) {
  const __m256 q = _mm256_round_ps(_mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(x, inv), lo), hi),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return _mm256_fnmadd_ps(q, scale, x);
}

// Screening of eight candidates at once (one per lane) over a whole small group: out[j] is the float32
// screening sum of candidate j, bounded as in ScreenBound. Small groups (blocks) have too few elements
// for per-candidate pruning to pay off; this evaluates every candidate cheaply instead.
PYQSHARE_AVX2 inline void screen_candidates_avx2(const GroupData& g, const float* w32, const Candidate* cand,
                                                 int n_cand, float* out) {
  for (int c0 = 0; c0 < n_cand; c0 += 8) {
    alignas(32) float inv_l[8], scale_l[8], lo_l[8], hi_l[8];
    for (int j = 0; j < 8; ++j) {
      const Candidate& c = cand[std::min(c0 + j, n_cand - 1)];
      inv_l[j] = 1.0f / c.scale;
      scale_l[j] = c.scale;
      lo_l[j] = c.lo;
      hi_l[j] = c.hi;
    }
    const __m256 inv = _mm256_load_ps(inv_l), scale = _mm256_load_ps(scale_l);
    const __m256 lo = _mm256_load_ps(lo_l), hi = _mm256_load_ps(hi_l);
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    std::size_t k = 0;
    for (; k + 2 <= g.n; k += 2) {
      const __m256 d0 = screen_term_avx2(_mm256_set1_ps(g.x[k]), inv, lo, hi, scale);
      const __m256 d1 = screen_term_avx2(_mm256_set1_ps(g.x[k + 1]), inv, lo, hi, scale);
      acc0 = _mm256_fmadd_ps(w32 ? _mm256_mul_ps(_mm256_set1_ps(w32[k]), d0) : d0, d0, acc0);
      acc1 = _mm256_fmadd_ps(w32 ? _mm256_mul_ps(_mm256_set1_ps(w32[k + 1]), d1) : d1, d1, acc1);
    }
    if (k < g.n) {
      const __m256 d0 = screen_term_avx2(_mm256_set1_ps(g.x[k]), inv, lo, hi, scale);
      acc0 = _mm256_fmadd_ps(w32 ? _mm256_mul_ps(_mm256_set1_ps(w32[k]), d0) : d0, d0, acc0);
    }
    alignas(32) float sum[8];
    _mm256_store_ps(sum, _mm256_add_ps(acc0, acc1));
    for (int j = 0; j < 8 && c0 + j < n_cand; ++j) out[c0 + j] = sum[j];
  }
}

// screen_candidates_avx2 with sixteen candidates per vector (the same accumulation: two lanes per
// candidate, alternate elements).
PYQSHARE_AVX512 inline void screen_candidates_avx512(const GroupData& g, const float* w32, const Candidate* cand,
                                                     int n_cand, float* out) {
  for (int c0 = 0; c0 < n_cand; c0 += 16) {
    alignas(64) float scale_l[16], lo_l[16], hi_l[16];
    for (int j = 0; j < 16; ++j) {
      const Candidate& c = cand[std::min(c0 + j, n_cand - 1)];
      scale_l[j] = c.scale;
      lo_l[j] = c.lo;
      hi_l[j] = c.hi;
    }
    const __m512 scale = _mm512_load_ps(scale_l), inv = _mm512_div_ps(_mm512_set1_ps(1.0f), scale);
    const __m512 lo = _mm512_load_ps(lo_l), hi = _mm512_load_ps(hi_l);
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    std::size_t k = 0;
    for (; k + 2 <= g.n; k += 2) {
      const __m512 x0 = _mm512_set1_ps(g.x[k]), x1 = _mm512_set1_ps(g.x[k + 1]);
      const __m512 q0 = _mm512_roundscale_ps(_mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(x0, inv), lo), hi),
                                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      const __m512 q1 = _mm512_roundscale_ps(_mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(x1, inv), lo), hi),
                                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      const __m512 d0 = _mm512_fnmadd_ps(q0, scale, x0), d1 = _mm512_fnmadd_ps(q1, scale, x1);
      acc0 = _mm512_fmadd_ps(w32 ? _mm512_mul_ps(_mm512_set1_ps(w32[k]), d0) : d0, d0, acc0);
      acc1 = _mm512_fmadd_ps(w32 ? _mm512_mul_ps(_mm512_set1_ps(w32[k + 1]), d1) : d1, d1, acc1);
    }
    if (k < g.n) {
      const __m512 x0 = _mm512_set1_ps(g.x[k]);
      const __m512 q0 = _mm512_roundscale_ps(_mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(x0, inv), lo), hi),
                                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      const __m512 d0 = _mm512_fnmadd_ps(q0, scale, x0);
      acc0 = _mm512_fmadd_ps(w32 ? _mm512_mul_ps(_mm512_set1_ps(w32[k]), d0) : d0, d0, acc0);
    }
    alignas(64) float sum[16];
    _mm512_store_ps(sum, _mm512_add_ps(acc0, acc1));
    for (int j = 0; j < 16 && c0 + j < n_cand; ++j) out[c0 + j] = sum[j];
  }
}

// Minimum, maximum, finiteness and (float32, at most n / 16 + 16 roundings) sum of |x| (sixteen
// elements per step, independent chains).
PYQSHARE_AVX2 inline bool range_avx2(const float* x, std::size_t n, float& lo_out, float& hi_out, double& abs_sum) {
  __m256 lo[2], hi[2], bad = _mm256_setzero_ps(), total[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
  const __m256 sign = _mm256_set1_ps(-0.0f);
  for (int j = 0; j < 2; ++j) lo[j] = hi[j] = _mm256_set1_ps(x[0]);
  std::size_t k = 0;
  for (; k + 16 <= n; k += 16) {
    for (int j = 0; j < 2; ++j) {
      const __m256 v = _mm256_loadu_ps(x + k + 8 * j);
      lo[j] = _mm256_min_ps(lo[j], v);
      hi[j] = _mm256_max_ps(hi[j], v);
      bad = _mm256_or_ps(bad, _mm256_cmp_ps(_mm256_sub_ps(v, v), _mm256_setzero_ps(), _CMP_NEQ_UQ));
      total[j] = _mm256_add_ps(total[j], _mm256_andnot_ps(sign, v));
    }
  }
  alignas(32) float l[8], h[8], t[8];
  _mm256_store_ps(l, _mm256_min_ps(lo[0], lo[1]));
  _mm256_store_ps(h, _mm256_max_ps(hi[0], hi[1]));
  _mm256_store_ps(t, _mm256_add_ps(total[0], total[1]));
  bool finite = _mm256_movemask_ps(bad) == 0;
  abs_sum = 0.0;
  for (int j = 0; j < 8; ++j) {
    lo_out = std::min(lo_out, l[j]);
    hi_out = std::max(hi_out, h[j]);
    abs_sum += t[j];
  }
  for (; k < n; ++k) {
    finite &= std::isfinite(x[k]);
    lo_out = std::min(lo_out, x[k]);
    hi_out = std::max(hi_out, x[k]);
    abs_sum += std::fabs(x[k]);
  }
  return finite;
}

// Sum of squares of x in float64 (sixteen elements per step, independent chains).
PYQSHARE_AVX2 inline double sum_of_squares_avx2(const float* x, std::size_t n) {
  __m256d sq[4];
  for (int j = 0; j < 4; ++j) sq[j] = _mm256_setzero_pd();
  std::size_t k = 0;
  for (; k + 16 <= n; k += 16) {
    for (int j = 0; j < 4; ++j) {
      const __m256d v = _mm256_cvtps_pd(_mm_loadu_ps(x + k + 4 * j));
      sq[j] = _mm256_fmadd_pd(v, v, sq[j]);
    }
  }
  alignas(32) double lane[4];
  _mm256_store_pd(lane, _mm256_add_pd(_mm256_add_pd(sq[0], sq[1]), _mm256_add_pd(sq[2], sq[3])));
  double total = (lane[0] + lane[1]) + (lane[2] + lane[3]);
  for (; k < n; ++k) total += static_cast<double>(x[k]) * x[k];
  return total;
}
#endif

inline double sum_of_squares(const float* x, std::size_t n, Isa isa) {
#ifdef PYQSHARE_QUANT_X86
  if (isa != Isa::kPortable) return sum_of_squares_avx2(x, n);
#endif
  (void)isa;
  double total = 0.0;
  for (std::size_t k = 0; k < n; ++k) total += static_cast<double>(x[k]) * x[k];
  return total;
}

inline bool screen_mse(const GroupData& g, const float* w32, const Candidate& c, double threshold, Isa isa) {
#ifdef PYQSHARE_QUANT_X86
  if (isa == Isa::kAvx512) return screen_mse_avx512(g, w32, c, threshold);
  if (isa == Isa::kAvx2) return screen_mse_avx2(g, w32, c, threshold);
#endif
  return false;
}

#ifdef PYQSHARE_QUANT_X86
// make_candidate for eight ratios at a time: the same float64 operations (IEEE division and rounding, no
// fused multiply-adds), so the same candidates bit for bit.
PYQSHARE_AVX512 inline void make_candidates_avx512(const SearchConfig& cfg, double xmin, double xmax,
                                                   const double* ratio, int n, Candidate* out) {
  const CodeRange range = code_range(cfg.bits, cfg.symmetric);
  const __m512d qmax = _mm512_set1_pd(range.qmax), tiny = _mm512_set1_pd(FLT_MIN), zero = _mm512_setzero_pd();
  const double m = std::max(std::fabs(xmin), std::fabs(xmax)), lo0 = std::min(xmin, 0.0), hi0 = std::max(xmax, 0.0);
  for (int i0 = 0; i0 < n; i0 += 8) {
    const __mmask8 valid = static_cast<__mmask8>(n - i0 >= 8 ? 0xFF : (1u << (n - i0)) - 1);
    const __m512d r = _mm512_maskz_loadu_pd(valid, ratio + i0);
    alignas(64) double scale[8], zp[8];
    if (cfg.symmetric) {
      const __m512d s = _mm512_div_pd(_mm512_mul_pd(r, _mm512_set1_pd(m)), qmax);
      _mm512_store_pd(scale, _mm512_max_pd(_mm512_cvtps_pd(_mm512_cvtpd_ps(s)), tiny));
      _mm512_store_pd(zp, zero);
    } else {
      __m512d lo = _mm512_mul_pd(r, _mm512_set1_pd(lo0)), hi = _mm512_mul_pd(r, _mm512_set1_pd(hi0));
      asm("" : "+v"(lo), "+v"(hi));  // rounded products: the compiler must not fuse them into hi - lo
      const __m512d s = _mm512_max_pd(_mm512_cvtps_pd(_mm512_cvtpd_ps(_mm512_div_pd(_mm512_sub_pd(hi, lo), qmax))), tiny);
      _mm512_store_pd(scale, s);
      const __m512d z = _mm512_roundscale_pd(_mm512_div_pd(_mm512_sub_pd(zero, lo), s), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      _mm512_store_pd(zp, _mm512_min_pd(_mm512_max_pd(z, zero), qmax));
    }
    for (int j = 0; j < 8 && i0 + j < n; ++j) {
      Candidate& c = out[i0 + j];
      c.scale = static_cast<float>(scale[j]);
      c.zero_point = static_cast<int32_t>(zp[j]);
      c.lo = static_cast<float>(range.qmin - c.zero_point);
      c.hi = static_cast<float>(range.qmax - c.zero_point);
    }
  }
}
#endif

inline Isa detect_isa() {
#ifdef PYQSHARE_QUANT_X86
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq")) return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
  return Isa::kPortable;
}

// The best available instruction set no better than `requested` (kAuto: the best this CPU has).
inline Isa resolve_isa(Isa requested) {
  const Isa best = detect_isa();
  if (requested == Isa::kAuto) return best;
  return static_cast<int>(requested) <= static_cast<int>(best) ? requested : best;
}

// `sums` (optional) receives the candidate's refinement sums where the kernel computes them on the way.
inline EvalResult evaluate(const GroupData& g, const Candidate& c, const SearchConfig& cfg, Isa isa,
                           double bound = std::numeric_limits<double>::infinity(), bool ties_lose = false,
                           RefineSums* sums = nullptr) {
  if (sums) sums->valid = false;
  if (cfg.squared()) {
#ifdef PYQSHARE_QUANT_X86
    if (isa == Isa::kAvx512) {
      return sums ? eval_mse_avx512<true>(g, c, bound, ties_lose, sums)
                  : eval_mse_avx512<false>(g, c, bound, ties_lose, nullptr);
    }
    if (isa == Isa::kAvx2) {
      return sums ? eval_mse_avx2<true>(g, c, bound, ties_lose, sums)
                  : eval_mse_avx2<false>(g, c, bound, ties_lose, nullptr);
    }
#endif
  }
  return eval_scalar(g, c, cfg.p, cfg.squared(), bound, ties_lose);
}

// Bins around the boundary between codes q and q + 1 (q_half = q + 1/2): a real y < t - |t| 2^-20
// (t = q_half s) has f32(y / s) < q + 1/2 (the margin covers the roundings), so code <= q, and
// y > t + |t| 2^-20 has code >= q + 1. Thresholds a little further out (whose float32 roundings stay
// beyond those bounds) are binned: elements in bins below the lower one's bin have code <= q, those
// above the upper one's bin code >= q + 1.
inline void cell_thresholds(double q_half, double s, float& lower_f, float& upper_f) {
  const double t = q_half * s, margin = std::fabs(t) * 0x1p-19 + 0x1p-148;
  lower_f = static_cast<float>(std::min(t - margin, static_cast<double>(FLT_MAX)));
  const double upper = std::max(t + margin, -static_cast<double>(FLT_MAX));
  upper_f = upper > FLT_MAX ? HUGE_VALF : static_cast<float>(upper);
}


// Histogram bounds (unweighted mse, many elements per code). The group's values are counted into nbins
// equal bins over [xmin, xmax] once (count and sum of every bin, as prefix sums). With Sxx = sum y^2, the
// error of a candidate is Sxx + sum over elements of (D^2 - 2 D y), D = f32(code * scale) the element's
// dequantized value, so a run of whole bins with one code costs O(1). cell_thresholds() gives, for each
// boundary between codes q and q + 1, the bins [bl, bu] that may hold either code ("window"); the bins
// strictly between two windows hold one code. A window's elements have code q or q + 1 (the windows are
// disjoint, else no bounds), and with a = (y - D_q)^2, b = (y - D_q1)^2, delta = D_q1 - D_q, m their midpoint:
// min(a, b) = (a + b) / 2 - delta |y - m|. The reference's code is the nearer one except within
// mu = 2^-20 (|q| + 2) s of m (a rounding of y / s or of D; it then costs at most 2 delta mu more), so a
// window's error lies in [(A + B) / 2 - delta N W, min(A, B) + 2 delta mu N], min(A, B) being
// (A + B) / 2 - delta |S - N m| (A, B: sums of a, b from the window's count N and sum S; W >= |y - m| from
// the bins' value ranges). A computed radius covers the roundings of these sums, of the fixed-point
// element values and of the reference's own lane sums. With two elements per bin the bounds are a few
// 1e-4 relative wide: they leave one or two candidates, which resolve_windows then separates.
struct ErrorBounds {
  double lower = 0.0, upper = HUGE_VAL;
};

struct HistogramGroup {
  // An element y counts as round(y * fix) / fix (|error| <= 0.5 / fix); the prefix sums pack the count of
  // the elements below a bin (times 2^kCountShift) and the sum of their fixed-point values, exactly.
  static constexpr int kCountShift = 42;
  std::size_t n = 0, nbins = 0;
  bool valid = false;  // false: a zero or subnormal value range (one bin would hold everything)
  float origin = 0.0f, inv_width = 0.0f;
  double width = 0.0, xmin = 0.0, xmax = 0.0, sum_sq = 0.0, fix = 1.0, unfix = 1.0;
  double unit_error = 0.0;  // bound on the fixed-point error of one element (0.5 / fix)
  // finish_bounds' per-group parts: max |y|, the rounding of Sxx, and 1 -+ g where the reference's lane
  // sums differ from the real sum by at most g = (n / 16 + 4) u of it (1e-12 covers differences rounded
  // in float64, exact unless x and its dequantized value are 2^29 apart).
  double abs_max = 0.0, radius_base = 0.0, shrink = 1.0, grow = 1.0;
  std::vector<int64_t> prefix;    // nbins + 1 entries
  std::vector<uint16_t> bin_of;  // the bin of every element

  // Monotone in v (a float32 subtraction, a product by a non-negative constant, a clamp, truncation),
  // so every element of bin b is <= every element of bin b + 1, and bin(y) < bin(t) implies y < t.
  uint32_t bin(float v) const {
    float f = (v - origin) * inv_width;
    f = f > 0.0f ? f : 0.0f;  // NaN (0 * inf) goes to bin 0 too
    f = std::min(f, static_cast<float>(nbins - 1));
    return static_cast<uint32_t>(static_cast<int32_t>(f));
  }
  // Number and sum of the elements in bins below b.
  double count_below(int64_t b) const {
    return static_cast<double>((prefix[b] + (int64_t{1} << (kCountShift - 1))) >> kCountShift);
  }
  double sum_below(int64_t b) const {
    const int64_t count = (prefix[b] + (int64_t{1} << (kCountShift - 1))) >> kCountShift;
    return static_cast<double>(prefix[b] - (count << kCountShift)) * unfix;
  }
  // Every element of bin b lies in [lowest(b), highest(b)]: bin() has at most three float32 roundings.
  double lowest(int64_t b) const {
    return std::max(xmin, origin + static_cast<double>(b) * width * (1.0 - 0x1p-20) - slack());
  }
  double highest(int64_t b) const {
    return std::min(xmax, origin + static_cast<double>(b + 1) * width * (1.0 + 0x1p-20) + slack());
  }
  double slack() const { return 0x1p-50 * std::fabs(static_cast<double>(origin)) + 0x1p-140; }

  // Also appends to `big` the indices of the elements with |x| >= big_threshold (in index order).
  void build(const float* x, std::size_t count_in, float lo, float hi, double abs_sum, Isa isa, Prefetch& prefetch,
             float big_threshold, std::vector<std::size_t>& big);
};

// About two elements per bin while the packed prefix sums (8 bytes per bin) fit a 16 KB cache budget
// (the histogram's read-modify-writes slow down sharply beyond it); large groups get finer bins, which
// leave fewer candidates for their expensive exact evaluation.
inline std::size_t bin_count(std::size_t n) {
  return std::min<std::size_t>(std::max<std::size_t>(16, std::min(n / 2, std::max<std::size_t>(2048, n / 8))), 1 << 16);
}

// v rounded to the nearest integer (ties to even), for |v| < 2^51: the addition rounds at the units.
inline int64_t round_to_int64(double v) {
  const double t = v + 0x1.8p52;
  int64_t bits;
  std::memcpy(&bits, &t, sizeof bits);
  return bits - int64_t{0x4338000000000000};
}

#ifdef PYQSHARE_QUANT_X86
// round_to_int64 of four float64 values (|v| < 2^51).
PYQSHARE_AVX2 inline __m256i round_to_int64_avx2(__m256d v) {
  const __m256d magic = _mm256_set1_pd(0x1.8p52);
  return _mm256_sub_epi64(_mm256_castpd_si256(_mm256_add_pd(v, magic)), _mm256_castpd_si256(magic));
}

// The bin() and packed value (one count plus the fixed-point value) of n elements, eight per step; returns
// the sum of their squares. Indices (plus `base`) of elements with |x| >= big_threshold go to `big` (few:
// one test per step).
PYQSHARE_AVX2 inline double pack_elements_avx2(const float* x, std::size_t n, float origin, float inv_width,
                                               float top, double fix, uint16_t* bins, int64_t* values,
                                               float big_threshold, std::size_t base, std::vector<std::size_t>& big) {
  const __m256 o = _mm256_set1_ps(origin), inv = _mm256_set1_ps(inv_width), t = _mm256_set1_ps(top);
  const __m256 zero = _mm256_setzero_ps(), big_t = _mm256_set1_ps(big_threshold), sign = _mm256_set1_ps(-0.0f);
  const __m256d scale = _mm256_set1_pd(fix);
  const __m256i one = _mm256_set1_epi64x(int64_t{1} << HistogramGroup::kCountShift);
  __m256d sq0 = _mm256_setzero_pd(), sq1 = sq0;
  std::size_t k = 0;
  for (; k + 8 <= n; k += 8) {
    const __m256 v = _mm256_loadu_ps(x + k);
    for (unsigned mask = static_cast<unsigned>(_mm256_movemask_ps(_mm256_cmp_ps(_mm256_andnot_ps(sign, v), big_t, _CMP_GE_OQ)));
         mask; mask &= mask - 1) {
      big.push_back(base + k + static_cast<std::size_t>(__builtin_ctz(mask)));
    }
    // max_ps returns its second operand (0) for NaN, as bin() does.
    const __m256 f = _mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(_mm256_sub_ps(v, o), inv), zero), t);
    const __m256i b = _mm256_cvttps_epi32(f);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(bins + k), _mm_packus_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1)));
    const __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v)), hi = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
    sq0 = _mm256_fmadd_pd(lo, lo, sq0);
    sq1 = _mm256_fmadd_pd(hi, hi, sq1);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(values + k),
                        _mm256_add_epi64(one, round_to_int64_avx2(_mm256_mul_pd(lo, scale))));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(values + k + 4),
                        _mm256_add_epi64(one, round_to_int64_avx2(_mm256_mul_pd(hi, scale))));
  }
  alignas(32) double lane[4];
  _mm256_store_pd(lane, _mm256_add_pd(sq0, sq1));
  double squares = (lane[0] + lane[1]) + (lane[2] + lane[3]);
  for (; k < n; ++k) {
    if (std::fabs(x[k]) >= big_threshold) big.push_back(base + k);
    float f = (x[k] - origin) * inv_width;
    f = f > 0.0f ? f : 0.0f;
    bins[k] = static_cast<uint16_t>(static_cast<int32_t>(std::min(f, top)));
    values[k] = (int64_t{1} << HistogramGroup::kCountShift) + round_to_int64(static_cast<double>(x[k]) * fix);
    squares += static_cast<double>(x[k]) * x[k];
  }
  return squares;
}

// pack_elements_avx2 sixteen elements per step.
PYQSHARE_AVX512 inline double pack_elements_avx512(const float* x, std::size_t n, float origin, float inv_width,
                                                   float top, double fix, uint16_t* bins, int64_t* values,
                                                   float big_threshold, std::size_t base, std::vector<std::size_t>& big) {
  const __m512 o = _mm512_set1_ps(origin), inv = _mm512_set1_ps(inv_width), t = _mm512_set1_ps(top);
  const __m512 big_t = _mm512_set1_ps(big_threshold);
  const __m512 zero = _mm512_setzero_ps();
  const __m512d scale = _mm512_set1_pd(fix), magic = _mm512_set1_pd(0x1.8p52);
  const __m512i one = _mm512_sub_epi64(_mm512_set1_epi64(int64_t{1} << HistogramGroup::kCountShift),
                                       _mm512_castpd_si512(magic));
  __m512d sq0 = _mm512_setzero_pd(), sq1 = sq0;
  std::size_t k = 0;
  for (; k + 16 <= n; k += 16) {
    const __m512 v = _mm512_loadu_ps(x + k);
    for (unsigned mask = _mm512_cmp_ps_mask(_mm512_abs_ps(v), big_t, _CMP_GE_OQ); mask; mask &= mask - 1) {
      big.push_back(base + k + static_cast<std::size_t>(__builtin_ctz(mask)));
    }
    // max_ps returns its second operand (0) for NaN, as bin() does.
    const __m512 f = _mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(_mm512_sub_ps(v, o), inv), zero), t);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(bins + k), _mm512_cvtepi32_epi16(_mm512_cvttps_epi32(f)));
    const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(v)), hi = _mm512_cvtps_pd(_mm512_extractf32x8_ps(v, 1));
    sq0 = _mm512_fmadd_pd(lo, lo, sq0);
    sq1 = _mm512_fmadd_pd(hi, hi, sq1);
    // round_to_int64 plus one count: the magic constant's bits come off with the count added.
    _mm512_storeu_si512(values + k, _mm512_add_epi64(_mm512_castpd_si512(_mm512_add_pd(_mm512_mul_pd(lo, scale), magic)), one));
    _mm512_storeu_si512(values + k + 8, _mm512_add_epi64(_mm512_castpd_si512(_mm512_add_pd(_mm512_mul_pd(hi, scale), magic)), one));
  }
  double squares = _mm512_reduce_add_pd(_mm512_add_pd(sq0, sq1));
  for (; k < n; ++k) {
    if (std::fabs(x[k]) >= big_threshold) big.push_back(base + k);
    float f = (x[k] - origin) * inv_width;
    f = f > 0.0f ? f : 0.0f;
    bins[k] = static_cast<uint16_t>(static_cast<int32_t>(std::min(f, top)));
    values[k] = (int64_t{1} << HistogramGroup::kCountShift) + round_to_int64(static_cast<double>(x[k]) * fix);
    squares += static_cast<double>(x[k]) * x[k];
  }
  return squares;
}

#endif


inline void HistogramGroup::build(const float* x, std::size_t count_in, float lo, float hi, double abs_sum, Isa isa,
                                  Prefetch& prefetch, float big_threshold, std::vector<std::size_t>& big) {
  n = count_in;
  nbins = bin_count(n);
  origin = lo;
  xmin = lo;
  xmax = hi;
  inv_width = static_cast<float>(static_cast<double>(nbins) / (static_cast<double>(hi) - lo));
  valid = std::isfinite(inv_width) && inv_width > 0.0f;
  if (!valid) {
    sum_sq = sum_of_squares(x, n, isa);
    return;
  }
  width = 1.0 / static_cast<double>(inv_width);
  // |round(y * fix)| summed over all elements stays below 2^(kCountShift - 1): fix = 2^k with
  // fix sum |y| <= 2^40 (sum |y| known within 1%, and at most n max|y|).
  int exponent = 0;
  const double abs_bound = std::min(abs_sum * 1.01, static_cast<double>(n) * std::max(std::fabs(xmin), std::fabs(xmax)));
  std::frexp(std::max(abs_bound, DBL_MIN), &exponent);
  fix = std::ldexp(1.0, 40 - exponent);
  unfix = std::ldexp(1.0, exponent - 40);
  unit_error = 0.5 * unfix;
  prefix.resize(nbins + 1);
  std::fill(prefix.begin(), prefix.end(), int64_t{0});
  // Blocks of bins and packed values (small buffers); local pointers: stores through them could otherwise
  // alias the members.
  constexpr std::size_t kBlock = 512;
  bin_of.resize(n);
  int64_t values[kBlock];
  int64_t* __restrict p = prefix.data() + 1;
  const float o = origin, inv = inv_width, top = static_cast<float>(nbins - 1);
  double squares = 0.0;
  for (std::size_t k0 = 0; k0 < n; k0 += kBlock) {
    const std::size_t m = std::min(kBlock, n - k0);
    const float* xb = x + k0;
    uint16_t* __restrict bins = bin_of.data() + k0;
#ifdef PYQSHARE_QUANT_X86
    if (isa == Isa::kAvx512) {
      squares += pack_elements_avx512(xb, m, o, inv, top, fix, bins, values, big_threshold, k0, big);
    } else if (isa != Isa::kPortable) {
      squares += pack_elements_avx2(xb, m, o, inv, top, fix, bins, values, big_threshold, k0, big);
    } else
#endif
    {
      for (std::size_t k = 0; k < m; ++k) {
        if (std::fabs(xb[k]) >= big_threshold) big.push_back(k0 + k);
        float f = (xb[k] - o) * inv;  // as bin()
        f = f > 0.0f ? f : 0.0f;
        bins[k] = static_cast<uint16_t>(static_cast<int32_t>(std::min(f, top)));
        values[k] = (int64_t{1} << kCountShift) + round_to_int64(static_cast<double>(xb[k]) * fix);
        squares += static_cast<double>(xb[k]) * xb[k];
      }
    }
    for (std::size_t k = 0; k < m; ++k) p[bins[k]] += values[k];
    prefetch.step(m);
  }
  // Inclusive prefix sums over four interleaved quarters (independent chains in registers), then each
  // quarter shifted by the totals before it. Integer sums: exact in any order.
  int64_t* __restrict q = prefix.data();
  const std::size_t len = nbins + 1, quarter = len / 4;
  int64_t* __restrict q0 = q;
  int64_t* __restrict q1 = q + quarter;
  int64_t* __restrict q2 = q + 2 * quarter;
  int64_t* __restrict q3 = q + 3 * quarter;
  int64_t r0 = 0, r1 = 0, r2 = 0, r3 = 0;
  for (std::size_t j = 0; j < quarter; ++j) {
    q0[j] = r0 += q0[j];
    q1[j] = r1 += q1[j];
    q2[j] = r2 += q2[j];
    q3[j] = r3 += q3[j];
  }
  r1 += r0;
  r2 += r1;
  for (std::size_t j = 0; j < quarter; ++j) {
    q1[j] += r0;
    q2[j] += r1;
    q3[j] += r2;
  }
  for (std::size_t j = 4 * quarter; j < len; ++j) q[j] += q[j - 1];
  sum_sq = squares;
  const double g = 1.01 * 0x1p-53 * (static_cast<double>(n) / kLanes + 16.0) + 1e-12;
  abs_max = std::max(std::fabs(xmin), std::fabs(xmax));
  radius_base = 1.01 * 0x1p-53 * (static_cast<double>(n) + 2.0) * sum_sq;
  shrink = 1.0 - g;
  grow = 1.0 + g;
}

// The bounds from the sums of the bound's parts (see HistogramGroup), which exclude Sxx.
inline ErrorBounds finish_bounds(const HistogramGroup& h, const Candidate& c, double partial_lower,
                                 double partial_upper) {
  constexpr double u = 0x1p-53;
  const double n = static_cast<double>(h.n), n_cells = static_cast<double>(c.hi - c.lo) + 1.0;
  // Every term is at most (|D| + |y|)^2 per element of its bins and every element enters at most two cell
  // or window terms of at most six parts: 16 n (Dmax + Xmax)^2 bounds the sum of their magnitudes.
  const double d_max = static_cast<double>(std::max(std::fabs(c.lo), std::fabs(c.hi))) * c.scale * (1.0 + 0x1p-22);
  const double reach = d_max + h.abs_max;
  const double mag = 16.0 * n * reach * reach;
  // Sxx: n roundings (radius_base); the terms: a few roundings each plus their summation; the fixed-point
  // values: an element's error enters its cell (factor 2 |D|) and at most one window (factor
  // 2 |D_q| + 2 |D_q1| + delta).
  const double radius = h.radius_base + 1.01 * u * (4.0 * n_cells + 8.0) * mag + 8.0 * n * d_max * h.unit_error;
  ErrorBounds r;
  r.lower = (h.sum_sq + partial_lower - radius) * h.shrink;
  r.upper = (h.sum_sq + partial_upper + radius) * h.grow;
  if (!(r.lower <= r.upper)) return ErrorBounds();  // NaN from an overflow: no bounds
  return r;
}

// A cell's part of the bound: the bins [from, to) all hold code q (dequantized value dq).
inline void add_cell(const HistogramGroup& h, int64_t from, int64_t to, double dq, double& lower, double& upper) {
  const double nc = h.count_below(to) - h.count_below(from), sc = h.sum_below(to) - h.sum_below(from);
  const double term = dq * dq * nc - 2.0 * dq * sc;
  lower += term;
  upper += term;
}

// The window bins of boundary (q, threshold q_half * s): [bl, bu], empty (bu = bl - 1) past either end.
inline void window_bins(const HistogramGroup& h, double q_half, double s, int64_t& bl, int64_t& bu) {
  float lower_f, upper_f;
  cell_thresholds(q_half, s, lower_f, upper_f);
  if (upper_f < static_cast<float>(h.xmin)) {  // every element has a code above q
    bl = 0;
    bu = -1;
  } else if (lower_f > static_cast<float>(h.xmax)) {  // every element has code q or below
    bl = static_cast<int64_t>(h.nbins);
    bu = bl - 1;
  } else {
    bl = h.bin(lower_f);
    bu = h.bin(upper_f);
  }
}

inline ErrorBounds histogram_bounds_scalar(const HistogramGroup& h, const Candidate& c) {
  if (!h.valid) return ErrorBounds();
  const double s = c.scale;
  const std::size_t n_cells = static_cast<std::size_t>(c.hi - c.lo) + 1, n_bounds = n_cells - 1;
  double lower = 0.0, upper = 0.0;
  int64_t cell_from = 0;  // first bin of the current cell
  double dq = static_cast<double>(c.lo * c.scale);
  for (std::size_t j = 0; j < n_bounds; ++j) {
    const float q = c.lo + static_cast<float>(j);
    const double dq1 = static_cast<double>((q + 1.0f) * c.scale);
    if (!std::isfinite(dq) || !std::isfinite(dq1)) return ErrorBounds();
    int64_t bl, bu;
    window_bins(h, static_cast<double>(q) + 0.5, s, bl, bu);
    if (bl < cell_from) return ErrorBounds();  // windows touch: a bin may hold three codes
    add_cell(h, cell_from, bl, dq, lower, upper);
    const double nw = h.count_below(bu + 1) - h.count_below(bl), sw = h.sum_below(bu + 1) - h.sum_below(bl);
    const double a = dq * dq * nw - 2.0 * dq * sw, b = dq1 * dq1 * nw - 2.0 * dq1 * sw;
    const double delta = dq1 - dq, mid = 0.5 * (dq + dq1);
    const double reach = std::max(std::max(mid - h.lowest(bl), h.highest(bu) - mid), 0.0);
    const double mu = 0x1p-20 * (std::fabs(static_cast<double>(q)) + 2.0) * s;
    lower += 0.5 * (a + b) - delta * nw * reach;
    upper += std::min(std::min(a, b), 0.5 * (a + b) - delta * std::fabs(sw - nw * mid)) + 2.0 * delta * mu * nw;
    cell_from = bu + 1;
    dq = dq1;
  }
  if (!std::isfinite(dq)) return ErrorBounds();
  add_cell(h, cell_from, static_cast<int64_t>(h.nbins), dq, lower, upper);
  return finish_bounds(h, c, lower, upper);
}

#ifdef PYQSHARE_QUANT_X86
// Half k of sixteen int32 lanes.
PYQSHARE_AVX512 inline __m256i half_epi32(int k, __m512i v) {
  return k ? _mm512_extracti64x4_epi64(v, 1) : _mm512_castsi512_si256(v);
}

// Count and sum (as float32) of the elements between two packed prefix values (eight lanes).
PYQSHARE_AVX512 inline void unpack_difference_avx512(__m512i high, __m512i low, __m512i round_count, __m256& count,
                                                     __m256& sum) {
  const __m512i packed = _mm512_sub_epi64(high, low);
  const __m512i n = _mm512_srai_epi64(_mm512_add_epi64(packed, round_count), HistogramGroup::kCountShift);
  count = _mm512_cvtepi64_ps(n);
  sum = _mm512_cvtepi64_ps(_mm512_sub_epi64(packed, _mm512_slli_epi64(n, HistogramGroup::kCountShift)));
}

PYQSHARE_AVX512 inline __m512 join_ps(__m256 lo, __m256 hi) {
  return _mm512_insertf32x8(_mm512_castps256_ps512(lo), hi, 1);
}

// histogram_bounds_scalar with sixteen boundaries per vector in float32. The cell before boundary j starts
// where the window of boundary j - 1 ends: those prefix values move up one lane (the previous block's
// last lane enters lane 0), so two gathers per half serve both the cells and the windows. Float32 rounds
// each part by at most a few 2^-24 of its magnitude; the parts' magnitudes are summed alongside and
// widen the bounds by 2^-21 of that sum (a few roundings per part, the conversions and the reduction).
// Thresholds: t = f32((q + 1/2) s) is within 2^-24 |t| of the real one, so t -+ |t| 2^-17 (rounded) lies
// beyond t -+ |t| 2^-20 as cell_thresholds requires. Groups whose values could overflow float32 take the
// float64 version.
PYQSHARE_AVX512 inline ErrorBounds histogram_bounds_avx512(const HistogramGroup& h, const Candidate& c) {
  if (!h.valid) return ErrorBounds();
  const std::size_t n_cells = static_cast<std::size_t>(c.hi - c.lo) + 1, n_bounds = n_cells - 1;
  const double d_max = static_cast<double>(std::max(std::fabs(c.lo), std::fabs(c.hi))) * c.scale;
  const double reach_max = d_max + std::max(std::fabs(h.xmin), std::fabs(h.xmax));
  if (!(static_cast<double>(h.n) * reach_max * reach_max < 0x1p100)) return histogram_bounds_scalar(h, c);
  const __m512 s = _mm512_set1_ps(c.scale), half = _mm512_set1_ps(0.5f), one = _mm512_set1_ps(1.0f);
  const __m512 rel = _mm512_set1_ps(0x1p-17f), tiny = _mm512_set1_ps(0x1p-140f), zero = _mm512_setzero_ps();
  const __m512 origin = _mm512_set1_ps(h.origin), inv = _mm512_set1_ps(h.inv_width);
  const __m512 top = _mm512_set1_ps(static_cast<float>(h.nbins - 1)), finite_max = _mm512_set1_ps(FLT_MAX);
  const __m512 xmin_f = _mm512_set1_ps(static_cast<float>(h.xmin)), xmax_f = _mm512_set1_ps(static_cast<float>(h.xmax));
  const __m512 lanes = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  // lowest() and highest() in float32 (their margins 2^-20 of b width cover the float32 roundings here,
  // the slack those of origin), without the clamps to [xmin, xmax].
  const double origin_slack = h.slack() + 0x1p-22 * std::fabs(static_cast<double>(h.origin));
  const __m512 origin_lo = _mm512_set1_ps(static_cast<float>(h.origin - origin_slack));
  const __m512 origin_hi = _mm512_set1_ps(static_cast<float>(h.origin + origin_slack));
  const __m512 w_lo = _mm512_set1_ps(static_cast<float>(h.width * (1.0 - 0x1p-19)));
  const __m512 w_hi = _mm512_set1_ps(static_cast<float>(h.width * (1.0 + 0x1p-19)));
  // Twice the window's misrounding reach mu (per candidate: the largest code's).
  const __m512 mu2 = _mm512_set1_ps(static_cast<float>(2.0 * 0x1p-20 * (d_max + 2.0 * c.scale)));
  const __m512 unfix = _mm512_set1_ps(static_cast<float>(h.unfix));
  // Lane 0 takes the second table's last lane, lane L > 0 the first table's lane L - 1.
  const __m512i up_one = _mm512_setr_epi32(31, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14);
  const __m512i up_one_q = _mm512_setr_epi64(15, 0, 1, 2, 3, 4, 5, 6);
  const __m512i minus_one = _mm512_set1_epi32(-1), nbins = _mm512_set1_epi32(static_cast<int32_t>(h.nbins));
  const __m512i round_count = _mm512_set1_epi64(int64_t{1} << (HistogramGroup::kCountShift - 1));
  const long long* prefix = reinterpret_cast<const long long*>(h.prefix.data());
  __m512 lower = zero, upper = zero, mag = zero;
  __m512i carry_from = _mm512_setzero_si512(), carry_prefix = _mm512_setzero_si512();  // lane 15 / 7
  int32_t cell_from = 0;
  for (std::size_t j0 = 0; j0 < n_bounds; j0 += 16) {
    const std::size_t left = n_bounds - j0;
    const __mmask16 active = static_cast<__mmask16>(left >= 16 ? 0xFFFF : (1u << left) - 1);
    const __m512 q = _mm512_add_ps(_mm512_set1_ps(c.lo + static_cast<float>(j0)), lanes);
    const __m512 dq = _mm512_mul_ps(q, s), dq1 = _mm512_mul_ps(_mm512_add_ps(q, one), s);
    const __mmask16 finite = _mm512_cmp_ps_mask(_mm512_abs_ps(dq), finite_max, _CMP_LE_OQ) &
                             _mm512_cmp_ps_mask(_mm512_abs_ps(dq1), finite_max, _CMP_LE_OQ);
    if (active & ~finite) return ErrorBounds();
    const __m512 t = _mm512_mul_ps(_mm512_add_ps(q, half), s);
    const __m512 margin = _mm512_fmadd_ps(_mm512_abs_ps(t), rel, tiny);
    const __m512 lw = _mm512_sub_ps(t, margin), uw = _mm512_add_ps(t, margin);
    // bin(): max_ps returns its second operand (0) for NaN, as bin() does.
    __m512i bl = _mm512_cvttps_epi32(_mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(_mm512_sub_ps(lw, origin), inv), zero), top));
    __m512i bu = _mm512_cvttps_epi32(_mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(_mm512_sub_ps(uw, origin), inv), zero), top));
    const __mmask16 below = _mm512_cmp_ps_mask(uw, xmin_f, _CMP_LT_OQ), above = _mm512_cmp_ps_mask(lw, xmax_f, _CMP_GT_OQ);
    bl = _mm512_mask_mov_epi32(_mm512_mask_mov_epi32(bl, below, _mm512_setzero_si512()), above, nbins);
    bu = _mm512_mask_mov_epi32(_mm512_mask_mov_epi32(bu, below, minus_one), above, _mm512_add_epi32(nbins, minus_one));
    const __m512i bu1 = _mm512_sub_epi32(bu, minus_one);
    const __m512i from = _mm512_permutex2var_epi32(bu1, up_one, carry_from);
    if (_mm512_mask_cmplt_epi32_mask(active, bl, from)) return ErrorBounds();  // windows touch
    __m256 nc[2], sc[2], nw[2], sw[2];
    __m512i p_bu1[2] = {_mm512_setzero_si512(), _mm512_setzero_si512()};
    for (int k = 0; k < 2; ++k) {
      if (!(active >> (8 * k) & 0xFF)) {
        nc[k] = sc[k] = nw[k] = sw[k] = _mm256_setzero_ps();
        continue;
      }
      const __m512i p_bl = _mm512_i32gather_epi64(half_epi32(k, bl), prefix, 8);
      p_bu1[k] = _mm512_i32gather_epi64(half_epi32(k, bu1), prefix, 8);
      const __m512i p_from = _mm512_permutex2var_epi64(p_bu1[k], up_one_q, k ? p_bu1[0] : carry_prefix);
      unpack_difference_avx512(p_bl, p_from, round_count, nc[k], sc[k]);
      unpack_difference_avx512(p_bu1[k], p_bl, round_count, nw[k], sw[k]);
    }
    const __m512 n_cell = join_ps(nc[0], nc[1]), n_window = join_ps(nw[0], nw[1]);
    const __m512 s_cell = _mm512_mul_ps(join_ps(sc[0], sc[1]), unfix), s_window = _mm512_mul_ps(join_ps(sw[0], sw[1]), unfix);
    // Cell: D^2 N - 2 D S. Window: (A + B) / 2 = h2 N - 2 m S with h2 = (D_q^2 + D_q1^2) / 2, and
    // A, B = (A + B) / 2 +- delta (S - N m).
    const __m512 two_sc = _mm512_add_ps(s_cell, s_cell);
    const __m512 cell = _mm512_mul_ps(dq, _mm512_fmsub_ps(dq, n_cell, two_sc));
    const __m512 delta = _mm512_sub_ps(dq1, dq), mid = _mm512_mul_ps(half, _mm512_add_ps(dq, dq1));
    const __m512 h2 = _mm512_mul_ps(half, _mm512_fmadd_ps(dq, dq, _mm512_mul_ps(dq1, dq1)));
    const __m512 two_m_sw = _mm512_mul_ps(_mm512_add_ps(mid, mid), s_window);
    const __m512 avg = _mm512_fmsub_ps(h2, n_window, two_m_sw);
    const __m512 dev = _mm512_mul_ps(delta, _mm512_abs_ps(_mm512_fnmadd_ps(n_window, mid, s_window)));
    const __m512 lowest = _mm512_fmadd_ps(_mm512_cvtepi32_ps(bl), w_lo, origin_lo);
    const __m512 highest = _mm512_fmadd_ps(_mm512_cvtepi32_ps(bu1), w_hi, origin_hi);
    const __m512 reach = _mm512_max_ps(_mm512_max_ps(_mm512_sub_ps(mid, lowest), _mm512_sub_ps(highest, mid)), zero);
    const __m512 dn = _mm512_mul_ps(delta, n_window);
    lower = _mm512_mask_add_ps(lower, active, lower, _mm512_add_ps(cell, _mm512_fnmadd_ps(dn, reach, avg)));
    upper = _mm512_mask_add_ps(upper, active, upper, _mm512_add_ps(cell, _mm512_fmadd_ps(dn, mu2, _mm512_sub_ps(avg, dev))));
    // Magnitudes of the parts: |D| (|D| N + 2 |S|) for the cell; h2 N + |2 m S| + dev + delta N (reach + mu2).
    const __m512 cell_mag = _mm512_mul_ps(_mm512_abs_ps(dq), _mm512_fmadd_ps(_mm512_abs_ps(dq), n_cell, _mm512_abs_ps(two_sc)));
    const __m512 window_mag = _mm512_add_ps(_mm512_fmadd_ps(h2, n_window, _mm512_abs_ps(two_m_sw)),
                                            _mm512_fmadd_ps(dn, _mm512_add_ps(reach, mu2), dev));
    mag = _mm512_mask_add_ps(mag, active, mag, _mm512_add_ps(cell_mag, window_mag));
    if (left > 16) {
      carry_from = bu1;
      carry_prefix = p_bu1[1];
    } else {
      alignas(64) int32_t ends[16];
      _mm512_store_si512(ends, bu1);
      cell_from = ends[left - 1];
    }
  }
  const double float_error = 0x1p-21 * static_cast<double>(_mm512_reduce_add_ps(mag)) * 1.01 + 0x1p-130;
  double low = static_cast<double>(_mm512_reduce_add_ps(lower)) - float_error;
  double up = static_cast<double>(_mm512_reduce_add_ps(upper)) + float_error;
  add_cell(h, cell_from, static_cast<int64_t>(h.nbins), static_cast<double>(c.hi * c.scale), low, up);
  return finish_bounds(h, c, low, up);
}

// Count (as int32) and sum (as float32) of the elements between two packed prefix values (four lanes;
// the difference is non-negative after adding half a count unit, see HistogramGroup).
PYQSHARE_AVX2 inline void unpack_difference_avx2(__m256i high, __m256i low, __m128i& count, __m128& sum) {
  const __m256i packed = _mm256_sub_epi64(high, low);
  const __m256i n = _mm256_srli_epi64(_mm256_add_epi64(packed, _mm256_set1_epi64x(int64_t{1} << (HistogramGroup::kCountShift - 1))),
                                      HistogramGroup::kCountShift);
  count = _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(n, _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6)));
  // int64 to float64 for |v| < 2^51: the bits of v + 1.5 * 2^52.
  const __m256d magic = _mm256_set1_pd(0x1.8p52);
  const __m256i v = _mm256_sub_epi64(packed, _mm256_slli_epi64(n, HistogramGroup::kCountShift));
  sum = _mm256_cvtpd_ps(_mm256_sub_pd(_mm256_castsi256_pd(_mm256_add_epi64(v, _mm256_castpd_si256(magic))), magic));
}

// Lane L of v moved to lane L + 1 (four int64 lanes), lane 0 taking `last`'s lane 3.
PYQSHARE_AVX2 inline __m256i up_one_epi64(__m256i v, __m256i last) {
  return _mm256_blend_epi32(_mm256_permute4x64_epi64(v, _MM_SHUFFLE(2, 1, 0, 3)),
                            _mm256_permute4x64_epi64(last, _MM_SHUFFLE(3, 3, 3, 3)), 0x03);
}

// histogram_bounds_avx512 with eight boundaries per vector (AVX2: blends for masks, four-lane gathers).
PYQSHARE_AVX2 inline ErrorBounds histogram_bounds_avx2(const HistogramGroup& h, const Candidate& c) {
  if (!h.valid) return ErrorBounds();
  const std::size_t n_cells = static_cast<std::size_t>(c.hi - c.lo) + 1, n_bounds = n_cells - 1;
  const double d_max = static_cast<double>(std::max(std::fabs(c.lo), std::fabs(c.hi))) * c.scale;
  const double reach_max = d_max + h.abs_max;
  if (!(static_cast<double>(h.n) * reach_max * reach_max < 0x1p100)) return histogram_bounds_scalar(h, c);
  const __m256 s = _mm256_set1_ps(c.scale), half = _mm256_set1_ps(0.5f), one = _mm256_set1_ps(1.0f);
  const __m256 rel = _mm256_set1_ps(0x1p-17f), tiny = _mm256_set1_ps(0x1p-140f), zero = _mm256_setzero_ps();
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256 origin = _mm256_set1_ps(h.origin), inv = _mm256_set1_ps(h.inv_width);
  const __m256 top = _mm256_set1_ps(static_cast<float>(h.nbins - 1)), finite_max = _mm256_set1_ps(FLT_MAX);
  const __m256 xmin_f = _mm256_set1_ps(static_cast<float>(h.xmin)), xmax_f = _mm256_set1_ps(static_cast<float>(h.xmax));
  const __m256 lanes = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7);
  const double origin_slack = h.slack() + 0x1p-22 * std::fabs(static_cast<double>(h.origin));
  const __m256 origin_lo = _mm256_set1_ps(static_cast<float>(h.origin - origin_slack));
  const __m256 origin_hi = _mm256_set1_ps(static_cast<float>(h.origin + origin_slack));
  const __m256 w_lo = _mm256_set1_ps(static_cast<float>(h.width * (1.0 - 0x1p-19)));
  const __m256 w_hi = _mm256_set1_ps(static_cast<float>(h.width * (1.0 + 0x1p-19)));
  const __m256 mu2 = _mm256_set1_ps(static_cast<float>(2.0 * 0x1p-20 * (d_max + 2.0 * c.scale)));
  const __m256 unfix = _mm256_set1_ps(static_cast<float>(h.unfix));
  const __m256i up_one = _mm256_setr_epi32(7, 0, 1, 2, 3, 4, 5, 6);
  const __m256i minus_one = _mm256_set1_epi32(-1), nbins = _mm256_set1_epi32(static_cast<int32_t>(h.nbins));
  const long long* prefix = reinterpret_cast<const long long*>(h.prefix.data());
  __m256 lower = zero, upper = zero, mag = zero;
  __m256i carry_from = _mm256_setzero_si256(), carry_prefix = _mm256_setzero_si256();  // lane 7 / 3
  int32_t cell_from = 0;
  for (std::size_t j0 = 0; j0 < n_bounds; j0 += 8) {
    const std::size_t left = n_bounds - j0;
    const __m256 active = _mm256_cmp_ps(lanes, _mm256_set1_ps(static_cast<float>(std::min<std::size_t>(left, 8))), _CMP_LT_OQ);
    const __m256 q = _mm256_add_ps(_mm256_set1_ps(c.lo + static_cast<float>(j0)), lanes);
    const __m256 dq = _mm256_mul_ps(q, s), dq1 = _mm256_mul_ps(_mm256_add_ps(q, one), s);
    const __m256 finite = _mm256_and_ps(_mm256_cmp_ps(_mm256_andnot_ps(sign, dq), finite_max, _CMP_LE_OQ),
                                        _mm256_cmp_ps(_mm256_andnot_ps(sign, dq1), finite_max, _CMP_LE_OQ));
    if (_mm256_movemask_ps(_mm256_andnot_ps(finite, active))) return ErrorBounds();
    const __m256 t = _mm256_mul_ps(_mm256_add_ps(q, half), s);
    const __m256 margin = _mm256_fmadd_ps(_mm256_andnot_ps(sign, t), rel, tiny);
    const __m256 lw = _mm256_sub_ps(t, margin), uw = _mm256_add_ps(t, margin);
    // bin(): max_ps returns its second operand (0) for NaN, as bin() does.
    __m256i bl = _mm256_cvttps_epi32(_mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(_mm256_sub_ps(lw, origin), inv), zero), top));
    __m256i bu = _mm256_cvttps_epi32(_mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(_mm256_sub_ps(uw, origin), inv), zero), top));
    const __m256i below = _mm256_castps_si256(_mm256_cmp_ps(uw, xmin_f, _CMP_LT_OQ));
    const __m256i above = _mm256_castps_si256(_mm256_cmp_ps(lw, xmax_f, _CMP_GT_OQ));
    bl = _mm256_blendv_epi8(_mm256_blendv_epi8(bl, _mm256_setzero_si256(), below), nbins, above);
    bu = _mm256_blendv_epi8(_mm256_blendv_epi8(bu, minus_one, below), _mm256_add_epi32(nbins, minus_one), above);
    const __m256i bu1 = _mm256_sub_epi32(bu, minus_one);
    const __m256i from = _mm256_blend_epi32(_mm256_permutevar8x32_epi32(bu1, up_one),
                                            _mm256_permutevar8x32_epi32(carry_from, _mm256_set1_epi32(7)), 0x01);
    if (_mm256_movemask_ps(_mm256_and_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(from, bl)), active))) {
      return ErrorBounds();  // windows touch
    }
    __m128i n_c[2], n_w[2];
    __m128 s_c[2], s_w[2];
    __m256i p_bu1[2];
    for (int k = 0; k < 2; ++k) {
      const __m128i bl4 = k ? _mm256_extracti128_si256(bl, 1) : _mm256_castsi256_si128(bl);
      const __m128i bu14 = k ? _mm256_extracti128_si256(bu1, 1) : _mm256_castsi256_si128(bu1);
      const __m256i p_bl = _mm256_i32gather_epi64(prefix, bl4, 8);
      p_bu1[k] = _mm256_i32gather_epi64(prefix, bu14, 8);
      const __m256i p_from = up_one_epi64(p_bu1[k], k ? p_bu1[0] : carry_prefix);
      unpack_difference_avx2(p_bl, p_from, n_c[k], s_c[k]);
      unpack_difference_avx2(p_bu1[k], p_bl, n_w[k], s_w[k]);
    }
    const __m256 n_cell = _mm256_cvtepi32_ps(_mm256_set_m128i(n_c[1], n_c[0]));
    const __m256 n_window = _mm256_cvtepi32_ps(_mm256_set_m128i(n_w[1], n_w[0]));
    const __m256 s_cell = _mm256_mul_ps(_mm256_set_m128(s_c[1], s_c[0]), unfix);
    const __m256 s_window = _mm256_mul_ps(_mm256_set_m128(s_w[1], s_w[0]), unfix);
    const __m256 two_sc = _mm256_add_ps(s_cell, s_cell);
    const __m256 cell = _mm256_mul_ps(dq, _mm256_fmsub_ps(dq, n_cell, two_sc));
    const __m256 delta = _mm256_sub_ps(dq1, dq), mid = _mm256_mul_ps(half, _mm256_add_ps(dq, dq1));
    const __m256 h2 = _mm256_mul_ps(half, _mm256_fmadd_ps(dq, dq, _mm256_mul_ps(dq1, dq1)));
    const __m256 two_m_sw = _mm256_mul_ps(_mm256_add_ps(mid, mid), s_window);
    const __m256 avg = _mm256_fmsub_ps(h2, n_window, two_m_sw);
    const __m256 dev = _mm256_mul_ps(delta, _mm256_andnot_ps(sign, _mm256_fnmadd_ps(n_window, mid, s_window)));
    const __m256 lowest = _mm256_fmadd_ps(_mm256_cvtepi32_ps(bl), w_lo, origin_lo);
    const __m256 highest = _mm256_fmadd_ps(_mm256_cvtepi32_ps(bu1), w_hi, origin_hi);
    const __m256 reach = _mm256_max_ps(_mm256_max_ps(_mm256_sub_ps(mid, lowest), _mm256_sub_ps(highest, mid)), zero);
    const __m256 dn = _mm256_mul_ps(delta, n_window);
    lower = _mm256_add_ps(lower, _mm256_and_ps(active, _mm256_add_ps(cell, _mm256_fnmadd_ps(dn, reach, avg))));
    upper = _mm256_add_ps(upper, _mm256_and_ps(active, _mm256_add_ps(cell, _mm256_fmadd_ps(dn, mu2, _mm256_sub_ps(avg, dev)))));
    const __m256 cell_mag = _mm256_mul_ps(_mm256_andnot_ps(sign, dq),
                                          _mm256_fmadd_ps(_mm256_andnot_ps(sign, dq), n_cell, _mm256_andnot_ps(sign, two_sc)));
    const __m256 window_mag = _mm256_add_ps(_mm256_fmadd_ps(h2, n_window, _mm256_andnot_ps(sign, two_m_sw)),
                                            _mm256_fmadd_ps(dn, _mm256_add_ps(reach, mu2), dev));
    mag = _mm256_add_ps(mag, _mm256_and_ps(active, _mm256_add_ps(cell_mag, window_mag)));
    if (left > 8) {
      carry_from = bu1;
      carry_prefix = p_bu1[1];
    } else {
      alignas(32) int32_t ends[8];
      _mm256_store_si256(reinterpret_cast<__m256i*>(ends), bu1);
      cell_from = ends[left - 1];
    }
  }
  alignas(32) float lo_l[8], up_l[8], mag_l[8];
  _mm256_store_ps(lo_l, lower);
  _mm256_store_ps(up_l, upper);
  _mm256_store_ps(mag_l, mag);
  double low = 0.0, up = 0.0, mag_sum = 0.0;
  for (int j = 0; j < 8; ++j) {
    low += lo_l[j];
    up += up_l[j];
    mag_sum += mag_l[j];
  }
  const double float_error = 0x1p-21 * mag_sum * 1.01 + 0x1p-130;
  low -= float_error;
  up += float_error;
  add_cell(h, cell_from, static_cast<int64_t>(h.nbins), static_cast<double>(c.hi * c.scale), low, up);
  return finish_bounds(h, c, low, up);
}
#endif

inline ErrorBounds histogram_bounds(const HistogramGroup& h, const Candidate& c, Isa isa) {
#ifdef PYQSHARE_QUANT_X86
  if (isa == Isa::kAvx512) return histogram_bounds_avx512(h, c);
  if (isa == Isa::kAvx2) return histogram_bounds_avx2(h, c);
#endif
  (void)isa;
  return histogram_bounds_scalar(h, c);
}

// Carrying a lower bound on candidate i's computed error over to a neighbour j (j's code range within
// i's). Element by element, with q the code j gives x: |x - D_i(x)| <= |x - q s_i| + eta_x (the reference
// code is the nearest up to a rounding of x / s_i, and D = f32(q s) rounds) <= |x - D_j(x)| + |q| |s_i - s_j|
// + eta_x + 2^-24 |q s_j|; by Minkowski sqrt(E_i) <= sqrt(E_j) + |s_i - s_j| sqrt(sum q^2) + eta, with
// |q| <= min(|x| / s_j + 1/2, hmax_j). A bound far above the best one thus rules out several neighbours.
// (Comparisons use squares: no square root or division per neighbour.)
struct ShiftBound {
  double g = 0.0, shrink = 0.0;
  // Per candidate: its eta part as the source (HUGE_VAL: its dequantized values may overflow) and as the
  // target, and (sum q^2) s^2 as the target.
  std::vector<double> eta_from, eta_to, q2s2;

  // `abs_sum`: sum |x| within 1%.
  void prepare(const HistogramGroup& h, double abs_sum_estimate, const std::vector<Candidate>& cand) {
    const double n = static_cast<double>(h.n);
    g = 1.01 * 0x1p-53 * (n / kLanes + 16.0) + 1e-12;  // computed vs real error, as finish_bounds
    shrink = (1.0 - 1e-12) / std::sqrt(1.0 + g);
    const double sum_sq = h.sum_sq * (1.0 + 1e-9) * (1.0 + 0x1p-22);  // computed with at most 2^20 roundings
    const double abs_sum = std::min(abs_sum_estimate * 1.01, std::sqrt(n * sum_sq));  // also <= sqrt(n sum x^2)
    const double eta_x = 0x1p-23 * std::sqrt(sum_sq), eta_d = 0x1p-23 * std::sqrt(n);
    const std::size_t m = cand.size();
    eta_from.resize(m);
    eta_to.resize(m);
    q2s2.resize(m);
    for (std::size_t j = 0; j < m; ++j) {
      const float h_f = std::max(std::fabs(cand[j].lo), std::fabs(cand[j].hi));
      const double s = cand[j].scale, hs = static_cast<double>(h_f) * s;
      eta_from[j] = std::isfinite(h_f * cand[j].scale) ? (eta_x + eta_d * hs) * (1.0 + 1e-12) : HUGE_VAL;
      eta_to[j] = eta_d * hs * (1.0 + 1e-12);
      q2s2[j] = std::min(sum_sq + abs_sum * s + 0.25 * n * s * s, n * hs * hs) * (1.0 + 1e-12);
    }
  }
  // sqrt of the real error of a candidate whose computed error is at least `lower`, rounded down.
  double root(double lower) const { return lower > 0.0 ? std::sqrt(lower) * shrink : 0.0; }
  // A root above this makes the computed error exceed `best_upper`.
  double threshold(double best_upper) const { return std::sqrt(best_upper / ((1.0 - g) * (1.0 - 1e-12))) * (1.0 + 1e-12); }
  // Whether sqrt(E_j) > `thr`, given root(lower bound of E_i) = `root_i`.
  bool rules_out(const std::vector<Candidate>& cand, int i, double root_i, int j, double thr) const {
    const Candidate &ci = cand[i], &cj = cand[j];
    if (cj.lo < ci.lo || cj.hi > ci.hi) return false;
    const double slack = root_i - eta_from[i] - eta_to[j] - thr;  // what |s_i - s_j| sqrt(sum q^2) may take
    const double sj = cj.scale, shift = static_cast<double>(ci.scale) - sj;
    return slack > 0.0 && shift * shift * q2s2[j] < (slack * sj) * (slack * sj) * (1.0 - 1e-12);
  }
};

// sum(w q x) and sum(w q q) over the offset codes q, with the lane structure of the error sums.
inline void refine_sums_scalar(const GroupData& g, const Candidate& c, double& num, double& den) {
  double num_lane[kLanes] = {}, den_lane[kLanes] = {};
  for (std::size_t k = 0; k < g.n; ++k) {
    const double q = offset_code(g.x[k], c);
    const double wq = g.w ? g.w[k] * q : q;
    num_lane[k % kLanes] = std::fma(wq, static_cast<double>(g.x[k]), num_lane[k % kLanes]);
    den_lane[k % kLanes] = std::fma(wq, q, den_lane[k % kLanes]);
  }
  num = reduce_lanes(num_lane);
  den = reduce_lanes(den_lane);
}

// What the fast search knows of a group, to decide the refinement without evaluating it when it can.
struct RefineHint {
  double weighted_sum_sq = 0.0;  // sum w x^2
  double weight_sum = 0.0;       // sum w
  const HistogramGroup* hist = nullptr;
};

// Whether candidate c (the winner's zero point, scale s) provably has a computed error of at most
// `best_error`, from the winner's sums. With the winner's codes q, F(s) = sum w (x - q s)^2 =
// Sxx - 2 s num + s^2 den; the reference's codes at s are the nearest up to a rounding of x / s, and
// D = f32(q' s) rounds (|q' s| <= |x| + s), so per element |d| <= |x - q s| + 2^-23 |x| + 2^-24 (|x| + s)
// and, by Minkowski, sqrt(E) <= sqrt(F(s)) + 1.5 2^-23 sqrt(sum w x^2) + 2^-24 s sqrt(sum w). F carries
// the rounding of num and den (lane sums: (n / 16 + 8) u of their magnitudes, sum |w q x| <= sqrt(den Sxx))
// and of its own terms. (The refinement nearly always lowers F by far more than these margins.)
// `num_error`: a bound on |num - the computed num| when num is only an estimate.
inline bool refined_not_worse(double num, double den, const RefineHint& hint, std::size_t n, const Candidate& c,
                              double best_error, double num_error = 0.0) {
  constexpr double u = 0x1p-53;
  const double s = c.scale, sxx = hint.weighted_sum_sq * (1.0 + 1e-9);  // at most 2^20 roundings
  const double gamma = 1.01 * u * (static_cast<double>(n) / kLanes + 8.0);
  const double f = sxx - 2.0 * s * num + s * s * den;
  const double f_error = 8.0 * u * (sxx + 2.0 * s * std::fabs(num) + s * s * den) +
                         gamma * (2.0 * s * std::sqrt(den * sxx) + s * s * den) + 2.0 * s * num_error;
  const float hmax = std::max(std::fabs(c.lo), std::fabs(c.hi));
  if (!std::isfinite(hmax * c.scale)) return false;  // dequantized values may overflow
  const double eta = 1.5 * 0x1p-23 * std::sqrt(sxx) + 0x1p-24 * s * std::sqrt(hint.weight_sum);
  const double root = std::sqrt(std::max(f + f_error, 0.0)) + eta;
  const double g = 1.01 * u * (static_cast<double>(n) / kLanes + 16.0) + 1e-12;  // computed vs real error
  return root * root * (1.0 + g) * (1.0 + 1e-12) <= best_error;
}

// Least-squares scale for the winner's codes with its zero point kept; replaces it when not worse.
// `known`: the winner's sums when its evaluation produced them (equal to refine_sums_scalar's);
// `hint` (the fast search): facts that often decide without an exact evaluation.
inline Candidate refine(const GroupData& g, const Candidate& best, double best_error, const SearchConfig& cfg,
                        Isa isa, const RefineSums& known = RefineSums(), const RefineHint* hint = nullptr) {
  double num = known.num, den = known.den;
  if (!known.valid) refine_sums_scalar(g, best, num, den);
  if (!(den > 0.0)) return best;
  const double s = num / den;
  if (!(s > 0.0) || !std::isfinite(s)) return best;
  const float scale = std::max(static_cast<float>(std::min(s, static_cast<double>(FLT_MAX))), FLT_MIN);
  if (scale == best.scale) return best;
  const Candidate c = with_scale(best, scale);
  if (hint) {
    if (cfg.squared() && refined_not_worse(num, den, *hint, g.n, c, best_error)) return c;
    if (hint->hist) {
      const ErrorBounds b = histogram_bounds(*hint->hist, c, isa);
      if (b.upper <= best_error) return c;
      if (b.lower > best_error) return best;
    }
  }
  const EvalResult r = evaluate(g, c, cfg, isa, best_error, false);
  return (r.complete && r.error <= best_error) ? c : best;
}

struct GroupStats {
  double xmin = 0.0, xmax = 0.0, weight_sum = 0.0;
  double weighted_sum_sq = -1.0;  // sum(w x^2), filled for weighted groups (-1: not known yet)
  double abs_sum = 0.0;          // sum |x| within 1% (float32 sums)
};

// When a screening prefix sum P proves a candidate's exact error E exceeds the best error B.
// Screening's d' differs from the exact d by at most a rounding of the quotient near a half-integer
// (|d'| <= |d| + 2^-21 |x|) and float32 roundings (relative 2^-23 each), so per element
// |d'| <= (1 + 2^-22)(|d| + 2^-19 (|x| + s)); by the triangle inequality in the weighted 2-norm
// sqrt(sum w d'^2) <= (1 + 2^-22)(sqrt(E) + 2^-19 (sqrt(sum w x^2) + s sqrt(sum w))), and the float32
// prefix sum is at most (1 + gamma) times its exact value: gamma = (m + 64) 2^-23 covers a kernel's
// float32 accumulation of at most m terms per lane, then a short reduction (m = n / 2 for all candidates
// at once, n / 32 for the AVX-512 and n / 8 for the AVX2 screening of one candidate).
// Hence P > (1 + gamma) (1 + 2^-22)^2 (sqrt(B (1 + 1e-9)) + slack)^2 implies E > B.
// Float32 must not overflow: screening runs only for |x| <= 1e15 and n <= 65536.
struct ScreenBound {
  bool enabled = false;
  double xnorm = 0.0, wroot = 0.0, gamma = 0.0;
  // root(B) = sqrt(B (1 + 1e-9)): one square root per best error, not per candidate.
  static double root(double best_error) { return std::sqrt(best_error * (1.0 + 1e-9)); }
  double threshold_from_root(double best_root, float scale) const {
    const double slack = 0x1p-19 * (1.0 + 1e-9) * (xnorm + static_cast<double>(scale) * wroot);
    const double r = best_root + slack;
    return (1.0 + gamma) * (1.0 + 0x1p-20) * r * r;
  }
  double threshold(double best_error, float scale) const { return threshold_from_root(root(best_error), scale); }
};

inline bool degenerate(const GroupStats& s) { return s.xmin == 0.0 && s.xmax == 0.0; }

// Brute force over every candidate: the specification the fast search must reproduce bit for bit.
inline GroupResult search_group_reference(const GroupData& g, const GroupStats& st, const SearchConfig& cfg) {
  if (degenerate(st)) return {};
  Candidate best = make_candidate(cfg, st.xmin, st.xmax, clip_ratio(cfg, 0));
  if (cfg.objective == Objective::kMinMax) return {best.scale, best.zero_point};
  double best_error = eval_scalar(g, best, cfg.p, cfg.squared(), HUGE_VAL, false).error;
  for (int i = 1; i < cfg.grid; ++i) {
    const Candidate c = make_candidate(cfg, st.xmin, st.xmax, clip_ratio(cfg, i));
    const double e = eval_scalar(g, c, cfg.p, cfg.squared(), HUGE_VAL, false).error;
    if (e < best_error) {
      best = c;
      best_error = e;
    }
  }
  if (cfg.refine) best = refine(g, best, best_error, cfg, Isa::kPortable);
  return {best.scale, best.zero_point};
}


// Per-task scratch reused across the groups of a task (no allocation per group once grown).
struct SearchScratch {
  std::vector<Candidate> cand;
  std::vector<float> w32_buf;
  const float* w32 = nullptr;  // float32 weights for screening (nullptr: unweighted)
  std::vector<double> bound, estimate, ratio;
  std::vector<double> top_error;  // the exact error on the largest elements (a part of `bound`'s sum)
  std::vector<float> screen_sum;
  std::vector<int> order;
  std::vector<std::size_t> top;
  HistogramGroup hist;
  ShiftBound shift;
  std::vector<ErrorBounds> bounds;
  std::vector<char> ruled_out;
  std::vector<uint8_t> window_mark;  // per bin: which resolved candidates have a window there
  std::vector<uint32_t> window_index;
  std::vector<float> window_x;
  std::vector<uint8_t> window_bits;
  float top_x[kLanes], top_w32[kLanes];
  double top_w[kLanes];
  Prefetch prefetch;  // of the next group
};

// Exact windows: the error of a few candidates from the histogram's cells and the elements of their
// windows taken one by one (found in one pass over the elements' bins), so that only rounding is left:
// bounds about 1e-9 wide, and the refinement sums (the reference's lane sums within num_error).
constexpr std::size_t kResolveMax = 8;

struct Resolved {
  double lower = 0.0, upper = HUGE_VAL;  // bounds on the computed error
  double num = 0.0, num_error = HUGE_VAL, den = 0.0;
};

// The window elements' part for one candidate: sum (d^2 - y^2), sum q y, sum q^2 and sum (d^2 + y^2),
// sum |q y| (magnitudes for the rounding), over the elements whose bits hold `bit`.
inline void window_sums(const float* y, const uint8_t* bits, std::size_t m, unsigned bit, const Candidate& c,
                        double* out) {
  double e = 0.0, num = 0.0, den = 0.0, e_mag = 0.0, num_mag = 0.0;
  for (std::size_t i = 0; i < m; ++i) {
    if (!(bits[i] >> bit & 1u)) continue;
    const double q = offset_code(y[i], c), d = element_diff(y[i], c), v = y[i];
    e += d * d - v * v;
    e_mag += d * d + v * v;
    num += q * v;
    num_mag += std::fabs(q * v);
    den += q * q;
  }
  out[0] = e;
  out[1] = num;
  out[2] = den;
  out[3] = e_mag;
  out[4] = num_mag;
}

#ifdef PYQSHARE_QUANT_X86
// The indices of the elements whose bin is set in `bits` (one bit per bin, at most 2048 bins), sixteen
// per step: the bit is fetched by two table permutes and a shift; returns their number (after the first
// n16 = n - n % 16 elements, the caller takes the rest).
PYQSHARE_AVX512 inline std::size_t marked_elements_avx512(const uint16_t* bin_of, std::size_t n16, const uint32_t* bits,
                                                         uint32_t* index) {
  const __m512i t0 = _mm512_loadu_si512(bits), t1 = _mm512_loadu_si512(bits + 16);
  const __m512i t2 = _mm512_loadu_si512(bits + 32), t3 = _mm512_loadu_si512(bits + 48);
  const __m512i step = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i low5 = _mm512_set1_epi32(31), one = _mm512_set1_epi32(1), bit5 = _mm512_set1_epi32(32);
  std::size_t m = 0;
  for (std::size_t i = 0; i < n16; i += 16) {
    const __m512i b = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(bin_of + i)));
    const __m512i word = _mm512_srli_epi32(b, 5);
    const __m512i lo = _mm512_permutex2var_epi32(t0, word, t1), hi = _mm512_permutex2var_epi32(t2, word, t3);
    const __m512i w = _mm512_mask_blend_epi32(_mm512_test_epi32_mask(word, bit5), lo, hi);
    const __mmask16 hit = _mm512_test_epi32_mask(_mm512_srlv_epi32(w, _mm512_and_si512(b, low5)), one);
    // Without a branch: about half the steps hold a window element, at random.
    _mm512_storeu_si512(index + m, _mm512_maskz_compress_epi32(hit, _mm512_add_epi32(step, _mm512_set1_epi32(static_cast<int32_t>(i)))));
    m += static_cast<std::size_t>(__builtin_popcount(hit));
  }
  return m;
}
#endif

#ifdef PYQSHARE_QUANT_X86
// window_sums sixteen elements per step (the exact differences of eval_mse_avx512; elements without the
// bit are zeroed: code 0, difference 0).
PYQSHARE_AVX512 inline void window_sums_avx512(const float* y, const uint8_t* bits, std::size_t m, unsigned bit,
                                               const Candidate& c, double* out) {
  const FastCandidateAvx512 f = fast_candidate_avx512(c);
  const __m128i want = _mm_set1_epi8(static_cast<char>(1u << bit));
  __m512d e = _mm512_setzero_pd(), num = e, den = e, e_mag = e, num_mag = e;
  for (std::size_t i = 0; i < m; i += 16) {
    const __mmask16 valid = static_cast<__mmask16>(m - i >= 16 ? 0xFFFF : (1u << (m - i)) - 1);
    alignas(16) uint8_t b[16] = {};
    for (std::size_t j = 0; j < 16 && i + j < m; ++j) b[j] = bits[i + j];
    const __m128i hit_bytes = _mm_cmpeq_epi8(_mm_and_si128(_mm_load_si128(reinterpret_cast<const __m128i*>(b)), want), want);
    const __mmask16 use = valid & static_cast<__mmask16>(_mm_movemask_epi8(hit_bytes));
    const __m512 x = _mm512_maskz_loadu_ps(use, y + i);
    __m512d d[2];
    __m512 q;
    diff16_avx512(x, f, d[0], d[1], q);
    for (int h = 0; h < 2; ++h) {
      const __m512d xv = _mm512_cvtps_pd(h ? _mm512_extractf32x8_ps(x, 1) : _mm512_castps512_ps256(x));
      const __m512d qv = _mm512_cvtps_pd(h ? _mm512_extractf32x8_ps(q, 1) : _mm512_castps512_ps256(q));
      const __m512d d2 = _mm512_mul_pd(d[h], d[h]), x2 = _mm512_mul_pd(xv, xv), qx = _mm512_mul_pd(qv, xv);
      e = _mm512_add_pd(e, _mm512_sub_pd(d2, x2));
      e_mag = _mm512_add_pd(e_mag, _mm512_add_pd(d2, x2));
      num = _mm512_add_pd(num, qx);
      num_mag = _mm512_add_pd(num_mag, _mm512_abs_pd(qx));
      den = _mm512_fmadd_pd(qv, qv, den);
    }
  }
  out[0] = _mm512_reduce_add_pd(e);
  out[1] = _mm512_reduce_add_pd(num);
  out[2] = _mm512_reduce_add_pd(den);
  out[3] = _mm512_reduce_add_pd(e_mag);
  out[4] = _mm512_reduce_add_pd(num_mag);
}
#endif

inline bool resolve_windows(const GroupData& g, const HistogramGroup& h, const Candidate* cand, std::size_t k,
                            Isa isa, SearchScratch& sc, Resolved* out) {
  constexpr double u = 0x1p-53;
  const std::size_t n = h.n;
  sc.window_mark.assign(h.nbins, 0);
  uint8_t* mark = sc.window_mark.data();
  uint32_t bits[64] = {};  // the marked bins as bits, for the vector scan (at most 2048 bins)
  struct Cells {
    double e = 0.0, e_mag = 0.0, e_unit = 0.0, num = 0.0, num_mag = 0.0, num_unit = 0.0, den = 0.0;
  } cells[kResolveMax];
  for (std::size_t t = 0; t < k; ++t) {
    const Candidate& c = cand[t];
    Cells& a = cells[t];
    const std::size_t n_bounds = static_cast<std::size_t>(c.hi - c.lo);
    int64_t from = 0;
    for (std::size_t j = 0; j <= n_bounds; ++j) {
      const float q = c.lo + static_cast<float>(j);
      int64_t bl = static_cast<int64_t>(h.nbins), bu = bl - 1;  // the last cell runs to the end
      if (j < n_bounds) {
        window_bins(h, static_cast<double>(q) + 0.5, c.scale, bl, bu);
        if (bl < from) return false;  // windows touch
      }
      const double dq = static_cast<double>(q * c.scale), qd = q;
      if (!std::isfinite(dq)) return false;
      const double nc = h.count_below(bl) - h.count_below(from), s_c = h.sum_below(bl) - h.sum_below(from);
      a.e += dq * (dq * nc - 2.0 * s_c);
      a.e_mag += dq * dq * nc + 2.0 * std::fabs(dq * s_c);
      a.e_unit += 2.0 * std::fabs(dq) * nc;
      a.num += qd * s_c;
      a.num_mag += std::fabs(qd * s_c);
      a.num_unit += std::fabs(qd) * nc;
      a.den += qd * qd * nc;
      for (int64_t b = bl; b <= bu; ++b) {
        mark[b] |= static_cast<uint8_t>(1u << t);
        if (b < 2048) bits[b >> 5] |= 1u << (b & 31);
      }
      from = bu + 1;
    }
  }
  // The elements in any window.
  sc.window_index.resize(n + 16);
  uint32_t* index = sc.window_index.data();
  const uint16_t* bin_of = h.bin_of.data();
  std::size_t m = 0, i = 0;
#ifdef PYQSHARE_QUANT_X86
  if (isa == Isa::kAvx512 && h.nbins <= 2048) {
    i = n - n % 16;
    m = marked_elements_avx512(bin_of, i, bits, index);
  }
#endif
  for (; i < n; ++i) {
    index[m] = static_cast<uint32_t>(i);
    m += mark[bin_of[i]] != 0;
  }
  sc.window_x.resize(m);
  sc.window_bits.resize(m);
  for (std::size_t i = 0; i < m; ++i) {
    sc.window_x[i] = g.x[index[i]];
    sc.window_bits[i] = mark[bin_of[index[i]]];
  }
  const double sxx = h.sum_sq, nn = static_cast<double>(n);
  const double g_ref = 1.01 * u * (nn / kLanes + 16.0) + 1e-12;  // computed vs real error
  const double gamma = 1.01 * u * (nn / kLanes + 8.0);          // computed vs real refinement sums
  for (std::size_t t = 0; t < k; ++t) {
    const Candidate& c = cand[t];
    double w[5];
#ifdef PYQSHARE_QUANT_X86
    if (isa == Isa::kAvx512) {
      window_sums_avx512(sc.window_x.data(), sc.window_bits.data(), m, static_cast<unsigned>(t), c, w);
    } else
#endif
    {
      window_sums(sc.window_x.data(), sc.window_bits.data(), m, static_cast<unsigned>(t), c, w);
    }
    const Cells& a = cells[t];
    const double n_cells = static_cast<double>(c.hi - c.lo) + 1.0, terms = n_cells + static_cast<double>(m) + 8.0;
    const double e = sxx + a.e + w[0];
    const double radius = a.e_unit * h.unit_error + 1.01 * u * ((nn + 2.0) * sxx + terms * (a.e_mag + w[3]));
    out[t].lower = (e - radius) * (1.0 - g_ref);
    out[t].upper = (e + radius) * (1.0 + g_ref);
    out[t].num = a.num + w[1];
    out[t].den = a.den + w[2];
    out[t].num_error = a.num_unit * h.unit_error + 1.01 * u * terms * (a.num_mag + w[4]) +
                       gamma * std::sqrt(out[t].den * sxx * (1.0 + 1e-9));
    if (!(out[t].lower <= out[t].upper)) return false;
  }
  return true;
}

// The search's result from exact windows of the surviving candidates (sc.order), when they decide it: one
// candidate's upper bound below all others' lower bounds, the refined scale unambiguous from the sums'
// bounds (as refine() computes it), and the refinement provably better or worse. Otherwise false.
inline bool decide_by_windows(const GroupData& g, const SearchConfig& cfg, Isa isa, SearchScratch& sc,
                              const RefineHint& hint, GroupResult& result) {
  const std::size_t k = sc.order.size();
  Candidate survivors[kResolveMax];
  for (std::size_t t = 0; t < k; ++t) survivors[t] = sc.cand[sc.order[t]];
  Resolved res[kResolveMax];
  if (!resolve_windows(g, sc.hist, survivors, k, isa, sc, res)) return false;
  std::size_t w = 0;
  for (std::size_t t = 1; t < k; ++t) {
    if (res[t].upper < res[w].upper) w = t;
  }
  for (std::size_t t = 0; t < k; ++t) {
    if (t != w && !(res[w].upper < res[t].lower)) return false;
  }
  const Candidate& best = sc.cand[sc.order[w]];
  result = {best.scale, best.zero_point};
  const Resolved& r = res[w];
  if (!cfg.refine || !(r.den > 0.0)) return true;
  // refine(): s = num / den (monotone in num), kept only when positive, as max(f32(min(s, FLT_MAX)), FLT_MIN).
  const double s_lo = (r.num - r.num_error) / r.den, s_hi = (r.num + r.num_error) / r.den;
  if (!std::isfinite(s_lo) || !std::isfinite(s_hi)) return false;
  if (!(s_hi > 0.0)) return true;
  if (!(s_lo > 0.0)) return false;
  const auto to_scale = [](double v) {
    return std::max(static_cast<float>(std::min(v, static_cast<double>(FLT_MAX))), FLT_MIN);
  };
  const float scale = to_scale(s_lo);
  if (to_scale(s_hi) != scale) return false;
  if (scale == best.scale) return true;
  const Candidate c = with_scale(best, scale);
  if (refined_not_worse(r.num, r.den, hint, g.n, c, r.lower, r.num_error)) {
    result = {c.scale, c.zero_point};
    return true;
  }
  if (histogram_bounds(sc.hist, c, isa).lower > r.upper) return true;
  // A near tie: the refined candidate's own exact windows.
  Resolved refined;
  if (!resolve_windows(g, sc.hist, &c, 1, isa, sc, &refined)) return false;
  if (refined.upper <= r.lower) {
    result = {c.scale, c.zero_point};
    return true;
  }
  return refined.lower > r.upper;
}

#ifdef PYQSHARE_QUANT_X86
// Appends the indices k with |x[k]| >= threshold (few: the scan tests 32 elements per branch).
PYQSHARE_AVX2 inline void indices_at_least_avx2(const float* x, std::size_t n, float threshold,
                                                std::vector<std::size_t>& out) {
  const __m256 t = _mm256_set1_ps(threshold), sign = _mm256_set1_ps(-0.0f);
  std::size_t k = 0;
  for (; k + 32 <= n; k += 32) {
    __m256 hit[4];
    for (int j = 0; j < 4; ++j) {
      hit[j] = _mm256_cmp_ps(_mm256_andnot_ps(sign, _mm256_loadu_ps(x + k + 8 * j)), t, _CMP_GE_OQ);
    }
    if (_mm256_testz_ps(_mm256_or_ps(_mm256_or_ps(hit[0], hit[1]), _mm256_or_ps(hit[2], hit[3])),
                        _mm256_castsi256_ps(_mm256_set1_epi32(-1)))) {
      continue;
    }
    for (int j = 0; j < 4; ++j) {
      for (unsigned mask = static_cast<unsigned>(_mm256_movemask_ps(hit[j])); mask; mask &= mask - 1) {
        out.push_back(k + 8 * j + static_cast<std::size_t>(__builtin_ctz(mask)));
      }
    }
  }
  for (; k < n; ++k) {
    if (std::fabs(x[k]) >= threshold) out.push_back(k);
  }
}
#endif

// The elements largest_elements() considers: |x| at least half the largest |x| (m).
inline float large_threshold(double m) { return static_cast<float>(0.5 * m); }

// Keeps the kLanes largest |x| of the indices in `top` (ties: the lowest index).
inline void keep_largest(const GroupData& g, std::vector<std::size_t>& top) {
  if (top.size() > kLanes) {
    std::nth_element(top.begin(), top.begin() + kLanes, top.end(), [&](std::size_t a, std::size_t b) {
      const float fa = std::fabs(g.x[a]), fb = std::fabs(g.x[b]);
      return fa > fb || (fa == fb && a < b);
    });
    top.resize(kLanes);
  }
}

// Indices of up to kLanes largest |x| (any subset of elements gives a valid lower bound).
inline void largest_elements(const GroupData& g, double m, Isa isa, std::vector<std::size_t>& top) {
  top.clear();
  const float threshold = large_threshold(m);
#ifdef PYQSHARE_QUANT_X86
  if (isa != Isa::kPortable) {
    indices_at_least_avx2(g.x, g.n, threshold, top);
  } else
#endif
  {
    for (std::size_t k = 0; k < g.n; ++k) {
      if (std::fabs(g.x[k]) >= threshold) top.push_back(k);
    }
  }
  keep_largest(g, top);
}

// Histogram bounds pay off when a group has many elements per cell (a cell: one code). (At most 2^20
// elements: beyond that the rounding radius of the prefix sums grows too wide to be useful.)
inline bool use_histogram(const GroupData& g, const SearchConfig& cfg) {
  return cfg.squared() && !g.w && cfg.bits <= 12 && g.n >= (std::size_t{64} << cfg.bits) && g.n <= (std::size_t{1} << 20);
}

// The candidates outward from the one with the smallest estimate, the two sides merged by estimate: the
// error is roughly unimodal in the index, so this is close to sorting by estimate at a fraction of the cost.
// (Only the amount of pruning depends on the order, never the result.)
inline void order_outward(const std::vector<double>& estimate, std::vector<int>& order) {
  const int n = static_cast<int>(estimate.size());
  order.clear();
  if (n == 0) return;
  const int center = static_cast<int>(std::min_element(estimate.begin(), estimate.end()) - estimate.begin());
  order.push_back(center);
  for (int lo = center - 1, hi = center + 1; lo >= 0 || hi < n;) {
    if (hi < n && (lo < 0 || estimate[hi] <= estimate[lo])) {
      order.push_back(hi++);
    } else {
      order.push_back(lo--);
    }
  }
}

// Groups up to this size screen every candidate at once instead of pruning candidate by candidate.
constexpr std::size_t kSmallGroup = 512;

inline GroupResult search_group_fast(const GroupData& g, const GroupStats& st, const SearchConfig& cfg, Isa isa,
                                     SearchScratch& sc) {
  if (degenerate(st)) return {};
  const int n_cand = cfg.objective == Objective::kMinMax ? 1 : cfg.grid;
  sc.cand.resize(n_cand);
  if (sc.ratio.size() != static_cast<std::size_t>(n_cand)) {
    sc.ratio.resize(n_cand);
    for (int i = 0; i < n_cand; ++i) sc.ratio[i] = clip_ratio(cfg, i);
  }
#ifdef PYQSHARE_QUANT_X86
  if (isa == Isa::kAvx512) {
    make_candidates_avx512(cfg, st.xmin, st.xmax, sc.ratio.data(), n_cand, sc.cand.data());
  } else
#endif
  {
    for (int i = 0; i < n_cand; ++i) sc.cand[i] = make_candidate(cfg, st.xmin, st.xmax, sc.ratio[i]);
  }
  if (cfg.objective == Objective::kMinMax) return {sc.cand[0].scale, sc.cand[0].zero_point};

  const double in_range_weight = g.w ? st.weight_sum : static_cast<double>(g.n);
  ScreenBound screen;
  screen.enabled = isa != Isa::kPortable && cfg.squared() && g.n <= 65536 && std::max(-st.xmin, st.xmax) <= 1e15;
  const bool screened_all = screen.enabled && g.n <= kSmallGroup;
  const bool histogram = !screened_all && use_histogram(g, cfg);
  // sum(w x^2): the histogram build computes it on the way; unweighted groups need it for the squared
  // objectives (screening bound, refinement hint).
  double weighted_sum_sq = st.weighted_sum_sq;
  if (histogram) {
    sc.prefetch.to_l2 = true;
    // The build also collects the largest elements (below): no separate pass over the group.
    sc.top.clear();
    sc.hist.build(g.x, g.n, static_cast<float>(st.xmin), static_cast<float>(st.xmax), st.abs_sum, isa, sc.prefetch,
                  large_threshold(std::max(-st.xmin, st.xmax)), sc.top);
    weighted_sum_sq = sc.hist.sum_sq;
  } else if (!g.w && cfg.squared()) {
    weighted_sum_sq = sum_of_squares(g.x, g.n, isa);
  }
  RefineHint hint;
  hint.weighted_sum_sq = weighted_sum_sq;
  hint.weight_sum = in_range_weight;
  hint.hist = histogram ? &sc.hist : nullptr;
  sc.w32 = nullptr;
  if (screen.enabled) {
    if (g.w) {
      sc.w32_buf.resize(g.n);
      for (std::size_t k = 0; k < g.n; ++k) sc.w32_buf[k] = static_cast<float>(g.w[k]);
      sc.w32 = sc.w32_buf.data();
    }
    screen.xnorm = std::sqrt(weighted_sum_sq);
    screen.wroot = std::sqrt(in_range_weight);
    const double per_lane = static_cast<double>(g.n) / (screened_all ? 2.0 : isa == Isa::kAvx512 ? 32.0 : 8.0);
    screen.gamma = (per_lane + 64.0) * 0x1p-23;
  }

  sc.bound.resize(n_cand);
  sc.estimate.resize(n_cand);
  sc.order.resize(n_cand);
  std::iota(sc.order.begin(), sc.order.end(), 0);
#ifdef PYQSHARE_QUANT_X86
  if (screened_all) {
    // Screening sums of all candidates: their order is the evaluation order, and they prune below.
    sc.screen_sum.resize(n_cand);
    if (isa == Isa::kAvx512) {
      screen_candidates_avx512(g, sc.w32, sc.cand.data(), n_cand, sc.screen_sum.data());
    } else {
      screen_candidates_avx2(g, sc.w32, sc.cand.data(), n_cand, sc.screen_sum.data());
    }
    for (int i = 0; i < n_cand; ++i) {
      sc.estimate[i] = sc.screen_sum[i];
      sc.bound[i] = 0.0;
    }
  } else
#endif
  {
    // Lower bound of every candidate: its exact error on the largest elements alone. Summation order
    // differs from the full sum, so a relative margin covers the rounding of both sums.
    if (histogram && sc.hist.valid) {
      keep_largest(g, sc.top);
    } else {
      largest_elements(g, std::max(-st.xmin, st.xmax), isa, sc.top);
    }
    for (std::size_t j = 0; j < sc.top.size(); ++j) {
      sc.top_x[j] = g.x[sc.top[j]];
      sc.top_w[j] = g.w ? g.w[sc.top[j]] : 1.0;
      sc.top_w32[j] = static_cast<float>(sc.top_w[j]);
    }
    GroupData top;
    top.n = sc.top.size();
    top.x = sc.top_x;
    top.w = g.w ? sc.top_w : nullptr;
    const double margin = 1.0 - (1e-9 + 4.0 * static_cast<double>(g.n) * DBL_EPSILON);
#ifdef PYQSHARE_QUANT_X86
    if (isa == Isa::kAvx512 && cfg.squared()) {
      top_errors_avx512(top, sc.cand.data(), n_cand, sc.bound.data());
    } else
#endif
    {
      for (int i = 0; i < n_cand; ++i) sc.bound[i] = top.n ? evaluate(top, sc.cand[i], cfg, isa).error : 0.0;
    }
    // Expected rounding error of one in-range element with unit weight: E|U|^p, U uniform in +-scale/2.
    const double p = cfg.squared() ? 2.0 : cfg.p;
    sc.top_error.resize(n_cand);
    for (int i = 0; i < n_cand; ++i) {
      sc.bound[i] *= margin;
      sc.top_error[i] = sc.bound[i];
      const double half = 0.5 * sc.cand[i].scale;
      sc.estimate[i] = sc.bound[i] + in_range_weight * (p == 2.0 ? half * half : std::pow(half, p)) / (p + 1.0);
    }
  }
  if (histogram) {
    // Histogram bounds: first the most promising candidate and its neighbours, then each side from its
    // far end inwards, where a bound carries over to the next candidates (ShiftBound) until it drops to
    // the best upper bound. Only candidates whose lower bound does not exceed the best upper bound are
    // evaluated exactly, smallest upper bound first.
    ShiftBound& shift = sc.shift;
    shift.prepare(sc.hist, st.abs_sum, sc.cand);
    sc.bounds.assign(n_cand, ErrorBounds());
    sc.ruled_out.assign(n_cand, 0);
    double best_upper = HUGE_VAL, thr = HUGE_VAL;
    const auto bound_one = [&](int i) {
      if (sc.bound[i] > best_upper) return false;
      sc.bounds[i] = histogram_bounds(sc.hist, sc.cand[i], isa);
      sc.bound[i] = std::max(sc.bound[i], sc.bounds[i].lower);
      if (sc.bounds[i].upper < best_upper) {
        best_upper = sc.bounds[i].upper;
        thr = shift.threshold(best_upper);
      }
      return true;
    };
    const int center = static_cast<int>(std::min_element(sc.estimate.begin(), sc.estimate.end()) - sc.estimate.begin());
    for (int i = std::max(center - 1, 0); i <= std::min(center + 1, n_cand - 1); ++i) bound_one(i);
    for (int step : {1, -1}) {
      int from = -1;  // the last candidate bounded on this side
      double root_from = 0.0;
      for (int i = step > 0 ? 0 : n_cand - 1; step > 0 ? i < center - 1 : i > center + 1; i += step) {
        if (from >= 0 && shift.rules_out(sc.cand, from, root_from, i, thr)) {
          sc.ruled_out[i] = 1;
        } else if (bound_one(i)) {
          from = i;
          root_from = shift.root(sc.bound[i]);
        }
      }
    }
    sc.order.clear();
    for (int i = 0; i < n_cand; ++i) {
      if (!sc.ruled_out[i] && sc.bound[i] <= best_upper) sc.order.push_back(i);
    }
    std::sort(sc.order.begin(), sc.order.end(), [&](int a, int b) {
      return sc.bounds[a].upper < sc.bounds[b].upper || (sc.bounds[a].upper == sc.bounds[b].upper && a < b);
    });
    GroupResult decided;
    if (sc.order.size() <= kResolveMax && decide_by_windows(g, cfg, isa, sc, hint, decided)) return decided;
  } else if (screened_all) {
    // The smallest screened sum first; the others (in index order) are filtered once its exact error is
    // known, see below.
    int first = 0;
    for (int i = 1; i < n_cand; ++i) {
      if (sc.screen_sum[i] < sc.screen_sum[first]) first = i;
    }
    sc.order.assign(1, first);
  } else {
    order_outward(sc.estimate, sc.order);
  }

  int best = n_cand;  // none yet
  double best_error = HUGE_VAL, best_root = HUGE_VAL;
  RefineSums sums, best_sums;
  const auto consider = [&](int i) {
    if (best < n_cand && sc.bound[i] > best_error) return;
    sc.prefetch.step(g.n / 16);  // a slice per screened or evaluated candidate: about one row per group
    if (best < n_cand) {
      if (screened_all) {
        if (sc.screen_sum[i] > screen.threshold_from_root(best_root, sc.cand[i].scale)) return;
      } else if (screen.enabled) {
        // The candidate's exact error on the largest elements is known, so the other elements must
        // exceed best_error minus it; the screened prefix also holds the largest elements' own
        // (unclamped) screening terms.
        double top_screen = 0.0;
#ifdef PYQSHARE_QUANT_X86
        if (isa == Isa::kAvx512) {
          top_screen = screen_terms_avx512(sc.top_x, g.w ? sc.top_w32 : nullptr, sc.top.size(), sc.cand[i]);
        } else
#endif
        {
          for (std::size_t j = 0; j < sc.top.size(); ++j) {
            top_screen += (g.w ? static_cast<double>(sc.top_w32[j]) : 1.0) * screen_term_upper(sc.top_x[j], sc.cand[i]);
          }
        }
        const double threshold = screen.threshold(best_error - sc.top_error[i], sc.cand[i].scale) +
                                 (1.0 + screen.gamma) * (1.0 + 0x1p-40) * top_screen;
        if (screen_mse(g, sc.w32, sc.cand[i], threshold, isa)) return;
      }
    }
    const bool ties_lose = i > best;
    const EvalResult r = evaluate(g, sc.cand[i], cfg, isa, best_error, ties_lose, cfg.refine ? &sums : nullptr);
    if (!r.complete) return;
    if (best == n_cand || r.error < best_error || (r.error == best_error && i < best)) {
      best = i;
      best_error = r.error;
      best_root = ScreenBound::root(best_error);
      best_sums = sums;
    }
  };
  if (screened_all) {
    // The smallest screened sum first; then, in a tight loop, the candidates whose screened sum does not
    // already prove them worse than it (few pass).
    const int first = sc.order[0];
    consider(first);
    for (int j = 0; j < n_cand; ++j) {
      if (j != first && sc.screen_sum[j] <= screen.threshold_from_root(best_root, sc.cand[j].scale)) consider(j);
    }
  } else {
    for (int i : sc.order) consider(i);
  }
  Candidate winner = sc.cand[best];
  if (cfg.refine) winner = refine(g, winner, best_error, cfg, isa, best_sums, &hint);
  return {winner.scale, winner.zero_point};
}

// Which elements form a group: every (o, l, i) with o in [o0, o1), l in [l0, l1), i in [i0, i1), in C order.
struct GroupBox {
  std::size_t o0, o1, l0, l1, i0, i1;
  std::size_t size() const { return (o1 - o0) * (l1 - l0) * (i1 - i0); }
};

inline std::size_t n_groups(const ScaleLayout& lay) { return lay.n_params(); }

inline GroupBox group_box(const ScaleLayout& lay, std::size_t gi) {
  switch (lay.kind) {
    case ScaleLayout::kPerTensor: return {0, lay.outer, 0, lay.length, 0, lay.inner};
    case ScaleLayout::kPerAxis: return {0, lay.outer, gi, gi + 1, 0, lay.inner};
    default: {
      const std::size_t i = gi % lay.inner, rest = gi / lay.inner;
      const std::size_t j = rest % lay.n_blocks(), o = rest / lay.n_blocks();
      return {o, o + 1, j * lay.block, std::min(lay.length, (j + 1) * lay.block), i, i + 1};
    }
  }
}

// Sample weights broadcast to w without copying: the weight of (o, l, i) is
// w[outer_off[o] + length_off[l] + inner_off[i]]; all three tables null means w has w's own shape.
struct SampleWeights {
  const double* w = nullptr;
  const int64_t* outer_off = nullptr;
  const int64_t* length_off = nullptr;
  const int64_t* inner_off = nullptr;
};

// Copies one group into the scratch buffers (x only when it is not contiguous) and checks finiteness.
struct GroupBuffers {
  std::vector<float> x;
  std::vector<double> w;
};

// Whether a group's elements are one contiguous run of x, which then starts at x + group_offset(...).
inline bool group_contiguous(const ScaleLayout& lay, const GroupBox& b) {
  return (b.i1 - b.i0 == lay.inner || (b.l1 - b.l0 == 1 && b.o1 - b.o0 == 1)) &&
         (b.l1 - b.l0 == lay.length || b.o1 - b.o0 == 1);
}
inline std::size_t group_offset(const ScaleLayout& lay, const GroupBox& b) {
  return (b.o0 * lay.length + b.l0) * lay.inner + b.i0;
}


inline GroupData gather_group(const float* x, const SampleWeights& sw, const ScaleLayout& lay,
                              const GroupBox& b, GroupBuffers& buf, GroupStats& st, std::size_t gi, Isa isa) {
  const std::size_t n = b.size();
  const std::size_t row_len = lay.inner;
  const bool contiguous = group_contiguous(lay, b);
  if (!contiguous) buf.x.resize(n);
  if (sw.w) buf.w.resize(n);
  const float* base = x + group_offset(lay, b);
  std::size_t k = 0;
  for (std::size_t o = b.o0; o < b.o1 && (!contiguous || sw.w); ++o) {
    for (std::size_t l = b.l0; l < b.l1; ++l) {
      const float* row = x + (o * lay.length + l) * row_len;
      for (std::size_t i = b.i0; i < b.i1; ++i, ++k) {
        if (!contiguous) buf.x[k] = row[i];
        if (sw.w) {
          buf.w[k] = sw.outer_off ? sw.w[sw.outer_off[o] + sw.length_off[l] + sw.inner_off[i]]
                                  : sw.w[(o * lay.length + l) * row_len + i];
        }
      }
    }
  }
  GroupData g;
  g.x = contiguous ? base : buf.x.data();
  g.n = n;
  float lo = 0.0f, hi = 0.0f;
  bool finite = true;
  double wsum = 0.0;
  if (n) lo = hi = g.x[0];
#ifdef PYQSHARE_QUANT_X86
  if (n && isa != Isa::kPortable) {
    finite = range_avx2(g.x, n, lo, hi, st.abs_sum);
  } else
#endif
  {
    double abs_sum = 0.0;
    for (std::size_t j = 0; j < n; ++j) {
      const float v = g.x[j];
      finite &= std::isfinite(v);
      lo = std::min(lo, v);
      hi = std::max(hi, v);
      abs_sum += std::fabs(v);
    }
    st.abs_sum = abs_sum;
  }
  if (!finite) {
    throw std::invalid_argument("w must be finite: group " + std::to_string(gi) +
                                " holds NaN or Inf (replace or mask them before the search)");
  }
  if (sw.w) {
    double wx2 = 0.0;
    for (std::size_t j = 0; j < n; ++j) {
      wsum += buf.w[j];
      const double v = g.x[j];
      wx2 += buf.w[j] * v * v;
    }
    st.weighted_sum_sq = wx2;
  }
  st.xmin = lo;
  st.xmax = hi;
  st.weight_sum = wsum;
  g.w = sw.w ? buf.w.data() : nullptr;
  return g;
}

// Runs the search for every group; tasks are fixed runs of groups, so results never depend on threads.
inline void scale_search(const float* x, const SampleWeights& sw, const ScaleLayout& lay, const SearchConfig& cfg,
                         float* scale_out, int32_t* zero_point_out, int num_threads, bool reference, Isa isa) {
  const std::size_t groups = n_groups(lay);
  const std::size_t group_size = groups ? lay.size() / groups : 0;
  // Tasks of about 2^16 elements: the scratch buffers are set up once per task.
  const std::size_t per_task = std::max<std::size_t>(1, (std::size_t{1} << 16) / std::max<std::size_t>(group_size, 1));
  const Isa use = resolve_isa(isa);
  parallel_for(n_chunks(groups, per_task), num_threads, [&](std::size_t task) {
    GroupBuffers buf;
    SearchScratch sc;
    const std::size_t g0 = task * per_task, g1 = std::min(groups, g0 + per_task);
    for (std::size_t gi = g0; gi < g1; ++gi) {
      sc.prefetch = Prefetch();
      if (gi + 1 < g1 && group_size >= 1024 && !reference) {
        const GroupBox next = group_box(lay, gi + 1);
        if (group_contiguous(lay, next)) sc.prefetch = {x + group_offset(lay, next), std::min<std::size_t>(next.size(), 1 << 16)};
      }
      GroupStats st;
      const GroupData g = gather_group(x, sw, lay, group_box(lay, gi), buf, st, gi, reference ? Isa::kPortable : use);
      const GroupResult r = reference ? search_group_reference(g, st, cfg) : search_group_fast(g, st, cfg, use, sc);
      scale_out[gi] = r.scale;
      zero_point_out[gi] = r.zero_point;
    }
  });
}

}  // namespace pyqshare::quant
