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
// The fast search returns exactly the reference's answer: candidates are tried outward from the best
// cheap estimate, and a candidate is dropped only when it is provably worse than the best so far: by an
// exact lower bound from the largest elements (with a rounding margin), by a float32 screening pass whose
// prefix sums bound the exact error from below (ScreenBound), by the cell sums of the binned screening
// (BinnedGroup), or by early abandoning of the exact sum (its partial sums can only grow).
#pragma once

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <numeric>
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
// The SIMD kernels replace x / scale by f32(f64(x) * f64(1 / scale)): for float32 x and scale this is
// the correctly rounded float32 quotient (the exact quotient is never within 2^-49 relative of a float32
// rounding boundary, and the float64 product is within 2^-52 of it), and it is several times cheaper
// than a float32 division. Lambdas are avoided: they do not inherit the target attribute.
#define PYQSHARE_AVX2 __attribute__((target("avx2,fma")))
#define PYQSHARE_AVX512 __attribute__((target("avx512f,avx512dq,avx2,fma")))

PYQSHARE_AVX2 inline double lanes_sum_avx2(const __m256d* acc) {
  alignas(32) double lane[kLanes];
  for (int j = 0; j < 4; ++j) _mm256_store_pd(lane + 4 * j, acc[j]);
  return reduce_lanes(lane);
}

// x / scale clamped and rounded, for four elements given as float64.
PYQSHARE_AVX2 inline __m128 offset_code_avx2(__m256d xv, __m256d inv, __m128 lo, __m128 hi) {
  const __m128 t = _mm_min_ps(_mm_max_ps(_mm256_cvtpd_ps(_mm256_mul_pd(xv, inv)), lo), hi);
  return _mm_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

// Four elements into one lane vector; with kSums also into the refinement lane sums.
template <bool kSums>
PYQSHARE_AVX2 inline __m256d mse_step_avx2(const float* x, const double* w, __m256d inv, __m128 scale,
                                           __m128 lo, __m128 hi, __m256d acc, __m256d& num, __m256d& den) {
  const __m256d xv = _mm256_cvtps_pd(_mm_loadu_ps(x));
  const __m128 q = offset_code_avx2(xv, inv, lo, hi);
  const __m256d d = _mm256_sub_pd(xv, _mm256_cvtps_pd(_mm_mul_ps(q, scale)));
  if (kSums) {
    const __m256d qd = _mm256_cvtps_pd(q);
    const __m256d wq = w ? _mm256_mul_pd(_mm256_loadu_pd(w), qd) : qd;
    num = _mm256_fmadd_pd(wq, xv, num);
    den = _mm256_fmadd_pd(wq, qd, den);
  }
  return _mm256_fmadd_pd(w ? _mm256_mul_pd(_mm256_loadu_pd(w), d) : d, d, acc);
}

// With kSums, a complete evaluation also leaves the candidate's refinement sums (see eval_mse_avx512).
template <bool kSums>
PYQSHARE_AVX2 inline EvalResult eval_mse_avx2(const GroupData& g, const Candidate& c, double bound, bool ties_lose,
                                              RefineSums* sums) {
  const __m256d inv = _mm256_set1_pd(1.0 / static_cast<double>(c.scale));
  const __m128 scale = _mm_set1_ps(c.scale), lo = _mm_set1_ps(c.lo), hi = _mm_set1_ps(c.hi);
  __m256d acc[4], num[4], den[4];
  for (int j = 0; j < 4; ++j) acc[j] = num[j] = den[j] = _mm256_setzero_pd();
  const std::size_t n16 = g.n - g.n % kLanes;
  std::size_t k = 0;
  while (k < n16) {
    const std::size_t stop = std::min(n16, k + kCheckEvery);
    for (; k < stop; k += kLanes) {
      for (int j = 0; j < 4; ++j) {
        acc[j] = mse_step_avx2<kSums>(g.x + k + 4 * j, g.w ? g.w + k + 4 * j : nullptr, inv, scale, lo, hi, acc[j],
                                      num[j], den[j]);
      }
    }
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
    for (int j = 0; j < 4; ++j) {
      acc[j] = mse_step_avx2<kSums>(xt + 4 * j, g.w ? wt + 4 * j : nullptr, inv, scale, lo, hi, acc[j], num[j], den[j]);
    }
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

// Eight elements (those in mask m) into one lane vector; with kSums also into the refinement lane sums.
template <bool kSums>
PYQSHARE_AVX512 inline __m512d mse_step_avx512(const float* x, const double* w, __mmask8 m, __m512d inv,
                                               __m256 scale, __m256 lo, __m256 hi, __m512d acc, __m512d& num,
                                               __m512d& den) {
  const __m512d xv = _mm512_cvtps_pd(_mm512_castps512_ps256(_mm512_maskz_loadu_ps(m, x)));
  const __m256 q = offset_code_avx512(xv, inv, lo, hi);
  const __m512d d = _mm512_sub_pd(xv, _mm512_cvtps_pd(_mm256_mul_ps(q, scale)));
  const __m512d wv = w ? _mm512_maskz_loadu_pd(m, w) : _mm512_setzero_pd();
  if (kSums) {
    const __m512d qd = _mm512_cvtps_pd(q);
    const __m512d wq = w ? _mm512_mul_pd(wv, qd) : qd;
    num = _mm512_fmadd_pd(wq, xv, num);
    den = _mm512_fmadd_pd(wq, qd, den);
  }
  return _mm512_fmadd_pd(w ? _mm512_mul_pd(wv, d) : d, d, acc);
}

// With kSums, a complete evaluation also leaves the candidate's refinement sums: no second pass for them.
template <bool kSums>
PYQSHARE_AVX512 inline EvalResult eval_mse_avx512(const GroupData& g, const Candidate& c, double bound,
                                                  bool ties_lose, RefineSums* sums) {
  const __m512d inv = _mm512_set1_pd(1.0 / static_cast<double>(c.scale));
  const __m256 scale = _mm256_set1_ps(c.scale), lo = _mm256_set1_ps(c.lo), hi = _mm256_set1_ps(c.hi);
  __m512d acc0 = _mm512_setzero_pd(), acc1 = acc0, n0 = acc0, n1 = acc0, d0 = acc0, d1 = acc0;
  const std::size_t n16 = g.n - g.n % kLanes;
  std::size_t k = 0;
  while (k < n16) {
    const std::size_t stop = std::min(n16, k + kCheckEvery);
    for (; k < stop; k += kLanes) {
      acc0 = mse_step_avx512<kSums>(g.x + k, g.w ? g.w + k : nullptr, 0xFF, inv, scale, lo, hi, acc0, n0, d0);
      acc1 = mse_step_avx512<kSums>(g.x + k + 8, g.w ? g.w + k + 8 : nullptr, 0xFF, inv, scale, lo, hi, acc1, n1, d1);
    }
    if (k < g.n) {
      const double partial = lanes_sum_avx512(acc0, acc1);
      if (loses(partial, bound, ties_lose)) return {partial, false};
    }
  }
  if (k < g.n) {
    const unsigned rest = static_cast<unsigned>(g.n - k);
    const __mmask8 m0 = static_cast<__mmask8>(rest >= 8 ? 0xFF : (1u << rest) - 1);
    const __mmask8 m1 = static_cast<__mmask8>(rest > 8 ? (1u << (rest - 8)) - 1 : 0);
    acc0 = mse_step_avx512<kSums>(g.x + k, g.w ? g.w + k : nullptr, m0, inv, scale, lo, hi, acc0, n0, d0);
    acc1 = mse_step_avx512<kSums>(g.x + k + 8, g.w ? g.w + k + 8 : nullptr, m1, inv, scale, lo, hi, acc1, n1, d1);
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
// lanes) that is 3-5x cheaper than the exact sum. It only decides abandonment: it returns true once its
// prefix sum exceeds `threshold`, which ScreenBound sets so that this proves the exact error exceeds the
// best one (see ScreenBound). A candidate that survives screening is then evaluated exactly.
PYQSHARE_AVX512 inline bool screen_mse_avx512(const GroupData& g, const float* w32, const Candidate& c,
                                              double threshold) {
  const __m512 inv = _mm512_set1_ps(1.0f / c.scale), scale = _mm512_set1_ps(c.scale);
  const __m512 lo = _mm512_set1_ps(c.lo), hi = _mm512_set1_ps(c.hi);
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  std::size_t k = 0;
  while (k < g.n) {
    const std::size_t stop = std::min(g.n, k + kCheckEvery);
    for (; k < stop; k += 32) {
      const unsigned rest = static_cast<unsigned>(std::min<std::size_t>(stop - k, 32));
      const __mmask16 m0 = static_cast<__mmask16>(rest >= 16 ? 0xFFFF : (1u << rest) - 1);
      const __mmask16 m1 = static_cast<__mmask16>(rest > 16 ? (rest == 32 ? 0xFFFF : (1u << (rest - 16)) - 1) : 0);
      const __m512 x0 = _mm512_maskz_loadu_ps(m0, g.x + k), x1 = _mm512_maskz_loadu_ps(m1, g.x + k + 16);
      const __m512 q0 = _mm512_roundscale_ps(_mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(x0, inv), lo), hi),
                                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      const __m512 q1 = _mm512_roundscale_ps(_mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(x1, inv), lo), hi),
                                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      const __m512 d0 = _mm512_fnmadd_ps(q0, scale, x0), d1 = _mm512_fnmadd_ps(q1, scale, x1);
      if (w32) {
        acc0 = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(m0, w32 + k), d0), d0, acc0);
        acc1 = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(m1, w32 + k + 16), d1), d1, acc1);
      } else {
        acc0 = _mm512_fmadd_ps(d0, d0, acc0);
        acc1 = _mm512_fmadd_ps(d1, d1, acc1);
      }
    }
    if (static_cast<double>(_mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1))) > threshold) return true;
  }
  return false;
}

PYQSHARE_AVX2 inline bool screen_mse_avx2(const GroupData& g, const float* w32, const Candidate& c,
                                          double threshold) {
  const __m256 inv = _mm256_set1_ps(1.0f / c.scale), scale = _mm256_set1_ps(c.scale);
  const __m256 lo = _mm256_set1_ps(c.lo), hi = _mm256_set1_ps(c.hi);
  __m256 acc = _mm256_setzero_ps();
  std::size_t k = 0;
  while (k < g.n) {
    const std::size_t stop = std::min(g.n, k + kCheckEvery);
    for (; k + 8 <= stop; k += 8) {
      const __m256 x = _mm256_loadu_ps(g.x + k);
      const __m256 q = _mm256_round_ps(_mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(x, inv), lo), hi),
                                       _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      const __m256 d = _mm256_fnmadd_ps(q, scale, x);
      acc = _mm256_fmadd_ps(w32 ? _mm256_mul_ps(_mm256_loadu_ps(w32 + k), d) : d, d, acc);
    }
    alignas(32) float lane[8];
    _mm256_store_ps(lane, acc);
    float partial = 0.0f;
    for (float v : lane) partial += v;
    for (; k < stop; ++k) {  // at most 7 elements, only at the very end
      const float q = std::nearbyint(std::min(std::max(g.x[k] * (1.0f / c.scale), c.lo), c.hi));
      const float d = std::fma(-q, c.scale, g.x[k]);
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

// Minimum, maximum, finiteness and sum of squares of x.
PYQSHARE_AVX2 inline bool prepare_avx2(const float* x, std::size_t n, float& lo_out, float& hi_out, double& sum_sq) {
  __m256 lo = _mm256_set1_ps(x[0]), hi = lo, bad = _mm256_setzero_ps();
  __m256d sq = _mm256_setzero_pd();
  std::size_t k = 0;
  for (; k + 8 <= n; k += 8) {
    const __m256 v = _mm256_loadu_ps(x + k);
    lo = _mm256_min_ps(lo, v);
    hi = _mm256_max_ps(hi, v);
    bad = _mm256_or_ps(bad, _mm256_cmp_ps(_mm256_sub_ps(v, v), _mm256_setzero_ps(), _CMP_NEQ_UQ));
    const __m256d v0 = _mm256_cvtps_pd(_mm256_castps256_ps128(v)), v1 = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
    sq = _mm256_fmadd_pd(v0, v0, _mm256_fmadd_pd(v1, v1, sq));
  }
  alignas(32) double sq_lane[4];
  _mm256_store_pd(sq_lane, sq);
  sum_sq = (sq_lane[0] + sq_lane[1]) + (sq_lane[2] + sq_lane[3]);
  alignas(32) float l[8], h[8];
  _mm256_store_ps(l, lo);
  _mm256_store_ps(h, hi);
  bool finite = _mm256_movemask_ps(bad) == 0;
  for (int j = 0; j < 8; ++j) {
    lo_out = std::min(lo_out, l[j]);
    hi_out = std::max(hi_out, h[j]);
  }
  for (; k < n; ++k) {
    finite &= std::isfinite(x[k]);
    lo_out = std::min(lo_out, x[k]);
    hi_out = std::max(hi_out, x[k]);
    sum_sq += static_cast<double>(x[k]) * x[k];
  }
  return finite;
}
#endif

inline bool screen_mse(const GroupData& g, const float* w32, const Candidate& c, double threshold, Isa isa) {
#ifdef PYQSHARE_QUANT_X86
  if (isa == Isa::kAvx512) return screen_mse_avx512(g, w32, c, threshold);
  if (isa == Isa::kAvx2) return screen_mse_avx2(g, w32, c, threshold);
#endif
  return false;
}

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

// Least-squares scale for the winner's codes with its zero point kept; replaces it when not worse.
// `known`: the winner's sums when its evaluation produced them (equal to refine_sums_scalar's).
inline Candidate refine(const GroupData& g, const Candidate& best, double best_error, const SearchConfig& cfg,
                        Isa isa, const RefineSums& known = RefineSums()) {
  double num = known.num, den = known.den;
  if (!known.valid) refine_sums_scalar(g, best, num, den);
  if (!(den > 0.0)) return best;
  const double s = num / den;
  if (!(s > 0.0) || !std::isfinite(s)) return best;
  const float scale = std::max(static_cast<float>(std::min(s, static_cast<double>(FLT_MAX))), FLT_MIN);
  if (scale == best.scale) return best;
  const Candidate c = with_scale(best, scale);
  const EvalResult r = evaluate(g, c, cfg, isa, best_error, false);
  return (r.complete && r.error <= best_error) ? c : best;
}

struct GroupStats {
  double xmin = 0.0, xmax = 0.0, weight_sum = 0.0;
  double weighted_x2 = 0.0;  // sum(w x^2), filled only where screening may run
};

// When a screening prefix sum P proves a candidate's exact error E exceeds the best error B.
// Screening's d' differs from the exact d by at most a rounding of the quotient near a half-integer
// (|d'| <= |d| + 2^-21 |x|) and float32 roundings (relative 2^-23 each), so per element
// |d'| <= (1 + 2^-22)(|d| + 2^-19 (|x| + s)); by the triangle inequality in the weighted 2-norm
// sqrt(sum w d'^2) <= (1 + 2^-22)(sqrt(E) + 2^-19 (sqrt(sum w x^2) + s sqrt(sum w))), and the float32
// prefix sum is at most (1 + gamma) times its exact value: gamma = (n / 2 + 64) 2^-23 covers every
// kernel's float32 accumulation (at most n / 2 terms per lane, then a short reduction).
// Hence P > (1 + gamma) (1 + 2^-22)^2 (sqrt(B (1 + 1e-9)) + slack)^2 implies E > B.
// Float32 must not overflow: screening runs only for |x| <= 1e15 and n <= 65536.
struct ScreenBound {
  bool enabled = false;
  double xnorm = 0.0, wroot = 0.0, gamma = 0.0;
  double threshold(double best_error, float scale) const {
    const double slack = 0x1p-19 * (1.0 + 1e-9) * (xnorm + static_cast<double>(scale) * wroot);
    const double root = std::sqrt(best_error * (1.0 + 1e-9)) + slack;
    return (1.0 + gamma) * (1.0 + 0x1p-20) * root * root;
  }
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

// Binned screening (unweighted mse): the elements of a group are counting-sorted into value bins once;
// the error of a candidate is then a sum over its cells (runs of elements sharing one code). A run of
// elements inside one cell costs O(1) from prefix moments: sum (y - D)^2 = S2 - 2 D S1 + N D^2. Only the
// bins that may straddle a cell boundary are evaluated element by element, with the exact code rule.
// The result is the exact error up to a computed rounding radius, so it decides which candidates can
// still win; those are then evaluated exactly (bit for bit as the reference).
struct BinnedGroup {
  std::size_t n = 0, nbins = 0;
  float origin = 0.0f, inv_width = 0.0f;
  std::vector<uint32_t> bin_of, cursor;  // build scratch
  std::vector<uint32_t> start;           // bin b holds grouped[start[b], start[b + 1])
  std::vector<float> grouped;
  std::vector<double> p1, p2;  // p1[k], p2[k]: sums of y and y^2 over grouped[0, k)
  double abs_sum = 0.0;        // sum |y|
  std::vector<int32_t> first, last;  // cell boundaries of one candidate (screening scratch)

  // Monotone in v (a float32 subtraction, a product by a non-negative constant, a clamp, truncation),
  // so every element of bin b is <= every element of bin b + 1, and bin(y) < bin(t) implies y < t.
  uint32_t bin(float v) const {
    float f = (v - origin) * inv_width;
    f = f > 0.0f ? f : 0.0f;  // NaN (0 * inf) goes to bin 0 too
    f = std::min(f, static_cast<float>(nbins - 1));
    return static_cast<uint32_t>(static_cast<int32_t>(f));
  }

  void build(const float* x, std::size_t count, float xmin, float xmax, std::size_t bins, Isa isa);

  // Writes k (<= n) elements taken from both ends of the value order, larger |y| first.
  void extremes(std::size_t k, float* out) const {
    std::size_t lo = 0, hi = n;
    for (std::size_t j = 0; j < k; ++j) out[j] = std::fabs(grouped[lo]) >= std::fabs(grouped[hi - 1]) ? grouped[lo++] : grouped[--hi];
  }
};

// Prefix sums of y and y^2 (p[k] over y[0, k)) and sum |y|: every term passes through at most n / 4 + 10
// additions (runs of 4 or 8 plus a carry), which bounds their rounding (binned_mse).
inline double prefix_moments_scalar(const float* y, std::size_t n, double* p1, double* p2) {
  p1[0] = p2[0] = 0.0;
  double c1 = 0.0, c2 = 0.0, a = 0.0;
  for (std::size_t k = 0; k < n; k += 8) {
    double r1 = 0.0, r2 = 0.0;
    const std::size_t stop = std::min(n, k + 8);
    for (std::size_t e = k; e < stop; ++e) {
      const double v = y[e];
      r1 += v;
      r2 += v * v;  // exact: a float32 squared fits in float64
      a += std::fabs(v);
      p1[e + 1] = c1 + r1;
      p2[e + 1] = c2 + r2;
    }
    c1 += r1;
    c2 += r2;
  }
  return a;
}

#ifdef PYQSHARE_QUANT_X86
// Inclusive prefix sum of four doubles (lane j: v[0] + ... + v[j]).
PYQSHARE_AVX2 inline __m256d scan4_avx2(__m256d v) {
  const __m256d zero = _mm256_setzero_pd();
  v = _mm256_add_pd(v, _mm256_blend_pd(_mm256_permute4x64_pd(v, _MM_SHUFFLE(2, 1, 0, 0)), zero, 0x1));
  return _mm256_add_pd(v, _mm256_blend_pd(_mm256_permute4x64_pd(v, _MM_SHUFFLE(1, 0, 0, 0)), zero, 0x3));
}

PYQSHARE_AVX2 inline double prefix_moments_avx2(const float* y, std::size_t n, double* p1, double* p2) {
  p1[0] = p2[0] = 0.0;
  __m256d c1 = _mm256_setzero_pd(), c2 = c1, a = c1;
  const __m256d sign = _mm256_set1_pd(-0.0);
  std::size_t k = 0;
  for (; k + 4 <= n; k += 4) {
    const __m256d v = _mm256_cvtps_pd(_mm_loadu_ps(y + k));
    const __m256d r1 = scan4_avx2(v), r2 = scan4_avx2(_mm256_mul_pd(v, v));
    _mm256_storeu_pd(p1 + k + 1, _mm256_add_pd(c1, r1));
    _mm256_storeu_pd(p2 + k + 1, _mm256_add_pd(c2, r2));
    // The carry chain is one addition per four elements: the run totals do not depend on it.
    c1 = _mm256_add_pd(c1, _mm256_permute4x64_pd(r1, _MM_SHUFFLE(3, 3, 3, 3)));
    c2 = _mm256_add_pd(c2, _mm256_permute4x64_pd(r2, _MM_SHUFFLE(3, 3, 3, 3)));
    a = _mm256_add_pd(a, _mm256_andnot_pd(sign, v));
  }
  alignas(32) double lane[4];
  _mm256_store_pd(lane, a);
  double abs_sum = (lane[0] + lane[1]) + (lane[2] + lane[3]);
  for (; k < n; ++k) {
    const double v = y[k];
    p1[k + 1] = p1[k] + v;
    p2[k + 1] = p2[k] + v * v;
    abs_sum += std::fabs(v);
  }
  return abs_sum;
}

// prefix_moments_avx2 eight elements per step (at most n / 8 + 4 additions per term).
PYQSHARE_AVX512 inline __m512d scan8_avx512(__m512d v) {
  const __m512i zero = _mm512_setzero_si512();
  // alignr(v, 0, 8 - s): v moved up by s lanes, zeros below.
  v = _mm512_add_pd(v, _mm512_castsi512_pd(_mm512_alignr_epi64(_mm512_castpd_si512(v), zero, 7)));
  v = _mm512_add_pd(v, _mm512_castsi512_pd(_mm512_alignr_epi64(_mm512_castpd_si512(v), zero, 6)));
  return _mm512_add_pd(v, _mm512_castsi512_pd(_mm512_alignr_epi64(_mm512_castpd_si512(v), zero, 4)));
}

PYQSHARE_AVX512 inline double prefix_moments_avx512(const float* y, std::size_t n, double* p1, double* p2) {
  p1[0] = p2[0] = 0.0;
  const __m512i last = _mm512_set1_epi64(7);
  __m512d c1 = _mm512_setzero_pd(), c2 = c1, a = c1;
  std::size_t k = 0;
  for (; k + 8 <= n; k += 8) {
    const __m512d v = _mm512_cvtps_pd(_mm256_loadu_ps(y + k));
    const __m512d r1 = scan8_avx512(v), r2 = scan8_avx512(_mm512_mul_pd(v, v));
    _mm512_storeu_pd(p1 + k + 1, _mm512_add_pd(c1, r1));
    _mm512_storeu_pd(p2 + k + 1, _mm512_add_pd(c2, r2));
    c1 = _mm512_add_pd(c1, _mm512_permutexvar_pd(last, r1));
    c2 = _mm512_add_pd(c2, _mm512_permutexvar_pd(last, r2));
    a = _mm512_add_pd(a, _mm512_abs_pd(v));
  }
  double abs_sum = _mm512_reduce_add_pd(a);
  for (; k < n; ++k) {
    const double v = y[k];
    p1[k + 1] = p1[k] + v;
    p2[k + 1] = p2[k] + v * v;
    abs_sum += std::fabs(v);
  }
  return abs_sum;
}

// The bin() of n values, eight per step.
PYQSHARE_AVX2 inline void bin_indices_avx2(const float* x, std::size_t n, float origin, float inv_width, float top,
                                           uint32_t* out) {
  const __m256 o = _mm256_set1_ps(origin), inv = _mm256_set1_ps(inv_width), t = _mm256_set1_ps(top);
  const __m256 zero = _mm256_setzero_ps();
  std::size_t k = 0;
  for (; k + 8 <= n; k += 8) {
    // max_ps returns its second operand (0) for NaN, as bin() does.
    const __m256 f = _mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x + k), o), inv), zero), t);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + k), _mm256_cvttps_epi32(f));
  }
  for (; k < n; ++k) {
    float f = (x[k] - origin) * inv_width;
    f = f > 0.0f ? f : 0.0f;
    out[k] = static_cast<uint32_t>(static_cast<int32_t>(std::min(f, top)));
  }
}
#endif

inline void BinnedGroup::build(const float* x, std::size_t count, float xmin, float xmax, std::size_t bins, Isa isa) {
  n = count;
  nbins = bins;
  origin = xmin;
  inv_width = static_cast<float>(static_cast<double>(bins) / (static_cast<double>(xmax) - xmin));
  if (!std::isfinite(inv_width)) inv_width = 0.0f;  // a zero or subnormal range: one bin does
  bin_of.resize(n);
  grouped.resize(n);
  start.assign(nbins + 1, 0);
  // Local copies and pointers: stores through bin_of could otherwise alias the members.
  const float o = origin, inv = inv_width, top = static_cast<float>(nbins - 1);
  uint32_t* __restrict bins_out = bin_of.data();
  uint32_t* __restrict first = start.data();
#ifdef PYQSHARE_QUANT_X86
  if (isa != Isa::kPortable) {
    bin_indices_avx2(x, n, o, inv, top, bins_out);
  } else
#endif
  {
    for (std::size_t k = 0; k < n; ++k) {
      float f = (x[k] - o) * inv;  // as bin()
      f = f > 0.0f ? f : 0.0f;
      bins_out[k] = static_cast<uint32_t>(static_cast<int32_t>(std::min(f, top)));
    }
  }
  for (std::size_t k = 0; k < n; ++k) ++first[bins_out[k] + 1];
  uint32_t total = 0;
  for (std::size_t b = 1; b <= nbins; ++b) first[b] = total += first[b];
  cursor.assign(start.begin(), start.end() - 1);
  uint32_t* __restrict next = cursor.data();
  float* __restrict out = grouped.data();
  for (std::size_t k = 0; k < n; ++k) out[next[bins_out[k]]++] = x[k];
  p1.resize(n + 1);
  p2.resize(n + 1);
#ifdef PYQSHARE_QUANT_X86
  if (isa == Isa::kAvx512) {
    abs_sum = prefix_moments_avx512(grouped.data(), n, p1.data(), p2.data());
    return;
  }
  if (isa != Isa::kPortable) {
    abs_sum = prefix_moments_avx2(grouped.data(), n, p1.data(), p2.data());
    return;
  }
#endif
  abs_sum = prefix_moments_scalar(grouped.data(), n, p1.data(), p2.data());
}

struct ScreenedError {
  double value = 0.0, radius = 0.0;  // |value - exact error| <= radius
};

// Sum of squared errors of n elements under candidate c (float64 differences and sums).
inline double window_error_scalar(const float* y, std::size_t n, const Candidate& c) {
  double sum = 0.0;
  for (std::size_t e = 0; e < n; ++e) {
    const double d = static_cast<double>(y[e]) - static_cast<double>(offset_code(y[e], c) * c.scale);
    sum += d * d;
  }
  return sum;
}


// Cell boundaries of candidate c in the grouped order. Boundary j lies between codes q = c.lo + j and
// q + 1: a real y < t - |t| 2^-20 (t = (q + 1/2) s) has f32(y / s) < q + 1/2 (the margin covers the
// roundings), so code <= q, and y > t + |t| 2^-20 has code >= q + 1. Thresholds a little further out
// (whose float32 roundings stay beyond those bounds) are binned: elements in bins below the lower one's
// bin have code <= q, those above the upper one's bin code >= q + 1. So with first[j] = start[bin(lower)]
// and last[j] = start[bin(upper) + 1] (both non-decreasing in j), cell j (code c.lo + j) holds
// grouped[last[j - 1], max(first[j], last[j - 1])) entirely, and the elements
// [max(first[j], last[j - 1]), last[j]) may hold either code: they are evaluated one by one.
inline void cell_thresholds(double q_half, double s, float& lower_f, float& upper_f) {
  const double t = q_half * s, margin = std::fabs(t) * 0x1p-19 + 0x1p-148;
  lower_f = static_cast<float>(std::min(t - margin, static_cast<double>(FLT_MAX)));
  const double upper = std::max(t + margin, -static_cast<double>(FLT_MAX));
  upper_f = upper > FLT_MAX ? HUGE_VALF : static_cast<float>(upper);
}

// Rounding radius of a binned error (see binned_mse).
inline double binned_radius(const BinnedGroup& bg, const Candidate& c, double value, double mag, double elems,
                            std::size_t n_cells, std::size_t n_window) {
  // A prefix sum errs by at most (n / 4 + 10) u times the sum of its |terms|, so a cell's moments by
  // twice that; the cell formula and the sums (in any order) by small multiples of u times the magnitudes.
  constexpr double u = 0x1p-53;
  const double dmax = std::max(std::fabs(c.lo), std::fabs(c.hi)) * static_cast<double>(c.scale) * (1.0 + 0x1p-22);
  const double depth = static_cast<double>(bg.n) / 4.0 + 10.0;
  const double screened = 1.05 * u *
                          (2.0 * depth * static_cast<double>(n_cells) * (bg.p2[bg.n] + 2.0 * dmax * bg.abs_sum) +
                           static_cast<double>(n_cells + 8) * mag + static_cast<double>(n_window + 4) * elems +
                           std::fabs(value));
  // The exact error itself differs from the real sum by at most (n / 16 + 8) u of it (lane sums).
  const double exact = 1.05 * u * (static_cast<double>(bg.n) / kLanes + 8.0) * (std::fabs(value) + screened);
  return screened + exact;
}

inline ScreenedError binned_mse_scalar(const BinnedGroup& bg, const Candidate& c) {
  const double s = c.scale;
  double cells = 0.0, mag = 0.0, elems = 0.0;
  std::size_t n_window = 0;
  const std::size_t n_cells = static_cast<std::size_t>(c.hi - c.lo) + 1;
  std::size_t prev_last = 0;
  for (std::size_t j = 0; j < n_cells; ++j) {
    const float q = c.lo + static_cast<float>(j);
    std::size_t first = bg.n, last = bg.n;
    if (q < c.hi) {
      float lower_f, upper_f;
      cell_thresholds(static_cast<double>(q) + 0.5, s, lower_f, upper_f);
      first = bg.start[bg.bin(lower_f)];
      last = bg.start[bg.bin(upper_f) + 1];
    }
    const std::size_t a = prev_last, b = std::max(first, prev_last);
    const double deq = static_cast<double>(q * c.scale);
    const double s2 = bg.p2[b] - bg.p2[a], cross = 2.0 * deq * (bg.p1[b] - bg.p1[a]);
    const double nd2 = static_cast<double>(b - a) * deq * deq;
    cells += (s2 - cross) + nd2;
    mag += s2 + std::fabs(cross) + nd2;
    if (last > b) {
      elems += window_error_scalar(bg.grouped.data() + b, last - b, c);
      n_window += last - b;
    }
    prev_last = std::max(last, b);
  }
  ScreenedError r;
  r.value = cells + elems;
  r.radius = binned_radius(bg, c, r.value, mag, elems, n_cells, n_window);
  return r;
}

#ifdef PYQSHARE_QUANT_X86
// binned_mse_scalar with the thresholds, bins and cell moments of four boundaries per vector; the cells come
// first and may drop a sure loser before its windows, as in binned_mse_avx512.
PYQSHARE_AVX2 inline ScreenedError binned_mse_avx2(BinnedGroup& bg, const Candidate& c, double abandon_above) {
  const std::size_t n_cells = static_cast<std::size_t>(c.hi - c.lo) + 1, n_bounds = n_cells - 1;
  bg.first.resize(n_cells + 4);
  bg.last.resize(n_cells + 4);
  int32_t* first = bg.first.data();
  int32_t* last = bg.last.data() + 1;  // last[-1] = 0
  last[-1] = 0;
  const __m256d s = _mm256_set1_pd(c.scale), sign = _mm256_set1_pd(-0.0), tiny = _mm256_set1_pd(0x1p-148);
  const __m256d fmax = _mm256_set1_pd(FLT_MAX), fmin = _mm256_set1_pd(-FLT_MAX), inf = _mm256_set1_pd(HUGE_VAL);
  const __m128 origin = _mm_set1_ps(bg.origin), inv = _mm_set1_ps(bg.inv_width);
  const __m128 top = _mm_set1_ps(static_cast<float>(bg.nbins - 1)), zero = _mm_setzero_ps();
  const int* start = reinterpret_cast<const int*>(bg.start.data());
  for (std::size_t j = 0; j < n_bounds; j += 4) {
    const double q0 = static_cast<double>(c.lo) + static_cast<double>(j) + 0.5;
    const __m256d t = _mm256_mul_pd(_mm256_setr_pd(q0, q0 + 1.0, q0 + 2.0, q0 + 3.0), s);
    const __m256d margin = _mm256_add_pd(_mm256_mul_pd(_mm256_andnot_pd(sign, t), _mm256_set1_pd(0x1p-19)), tiny);
    const __m128 lower = _mm256_cvtpd_ps(_mm256_min_pd(_mm256_sub_pd(t, margin), fmax));
    const __m256d up = _mm256_max_pd(_mm256_add_pd(t, margin), fmin);
    const __m128 upper = _mm256_cvtpd_ps(_mm256_blendv_pd(up, inf, _mm256_cmp_pd(up, fmax, _CMP_GT_OQ)));
    // bin(): max_ps returns its second operand (0) for NaN, as bin() does.
    const __m128i bl = _mm_cvttps_epi32(_mm_min_ps(_mm_max_ps(_mm_mul_ps(_mm_sub_ps(lower, origin), inv), zero), top));
    const __m128i bu = _mm_cvttps_epi32(_mm_min_ps(_mm_max_ps(_mm_mul_ps(_mm_sub_ps(upper, origin), inv), zero), top));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(first + j), _mm_i32gather_epi32(start, bl, 4));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(last + j), _mm_i32gather_epi32(start + 1, bu, 4));
  }
  first[n_bounds] = last[n_bounds] = static_cast<int32_t>(bg.n);
  // last[] is non-decreasing, so cell j runs over [last[j - 1], max(first[j], last[j - 1])). Scalar loads:
  // gathers are slower here.
  double cells = 0.0, mag = 0.0;
  for (std::size_t j = 0; j < n_cells; ++j) {
    const int32_t lo_idx = last[static_cast<std::ptrdiff_t>(j) - 1], hi_idx = std::max(first[j], lo_idx);
    const double deq = static_cast<double>((c.lo + static_cast<float>(j)) * c.scale);
    const double s2 = bg.p2[hi_idx] - bg.p2[lo_idx], cross = 2.0 * deq * (bg.p1[hi_idx] - bg.p1[lo_idx]);
    const double nd2 = static_cast<double>(hi_idx - lo_idx) * deq * deq;
    cells += (s2 - cross) + nd2;
    mag += s2 + std::fabs(cross) + nd2;
  }
  // The cells alone bound the error from below (window terms are squares): drop a sure loser here.
  if (cells - binned_radius(bg, c, cells, mag, 0.0, n_cells, 0) > abandon_above) {
    ScreenedError lost;
    lost.value = HUGE_VAL;
    return lost;
  }
  // Windows [max(first[j], last[j - 1]), last[j]), four elements at a time.
  const __m256d inv_s = _mm256_set1_pd(1.0 / static_cast<double>(c.scale));
  const __m128 scale = _mm_set1_ps(c.scale), lo = _mm_set1_ps(c.lo), hi = _mm_set1_ps(c.hi);
  __m256d acc = _mm256_setzero_pd();
  std::size_t n_window = 0;
  for (std::size_t j = 0; j < n_bounds; ++j) {
    const int32_t a = std::max(first[j], last[j - 1]), b = last[j];
    for (int32_t e = a; e < b; e += 4) {
      const int rest = std::min(4, b - e);
      const __m128i mask = _mm_cmpgt_epi32(_mm_set1_epi32(rest), _mm_setr_epi32(0, 1, 2, 3));
      const __m256d yv = _mm256_cvtps_pd(_mm_maskload_ps(bg.grouped.data() + e, mask));
      const __m256d d = _mm256_sub_pd(yv, _mm256_cvtps_pd(_mm_mul_ps(offset_code_avx2(yv, inv_s, lo, hi), scale)));
      acc = _mm256_fmadd_pd(d, d, acc);  // masked-out lanes: y = 0 has code 0 and d = 0
    }
    n_window += b > a ? static_cast<std::size_t>(b - a) : 0;
  }
  alignas(32) double lane[4];
  _mm256_store_pd(lane, acc);
  ScreenedError r;
  const double elems = (lane[0] + lane[1]) + (lane[2] + lane[3]);
  r.value = cells + elems;
  r.radius = binned_radius(bg, c, r.value, mag, elems, n_cells, n_window);
  return r;
}
#endif

#ifdef PYQSHARE_QUANT_X86
// Squared errors of the window grouped[a, b) added into acc: eight elements per masked step, so the
// usual window (zero to a few elements) costs one step and no data-dependent branch.
PYQSHARE_AVX512 inline __m512d window_error_avx512(const float* y, int32_t a, int32_t b, __m512d inv_s, __m256 scale,
                                                   __m256 lo, __m256 hi, __m512d acc) {
  for (int32_t e = a;; e += 8) {
    const int32_t rest = b - e;
    const __mmask16 m = static_cast<__mmask16>(rest >= 8 ? 0xFF : (1u << std::max(rest, 0)) - 1);
    const __m512d yv = _mm512_cvtps_pd(_mm512_castps512_ps256(_mm512_maskz_loadu_ps(m, y + e)));
    const __m512d deq = _mm512_cvtps_pd(_mm256_mul_ps(offset_code_avx512(yv, inv_s, lo, hi), scale));
    const __m512d d = _mm512_sub_pd(yv, deq);
    acc = _mm512_fmadd_pd(d, d, acc);  // masked-out lanes: y = 0 has code 0 and d = 0
    if (rest <= 8) return acc;
  }
}

// binned_mse_avx2 with sixteen boundaries and cells per vector, kept in registers. The cells come first:
// their sum alone bounds the error from below (window terms are squares), so a candidate whose cells
// already lose against `abandon_above` is dropped before its windows (returned value HUGE_VAL).
PYQSHARE_AVX512 inline ScreenedError binned_mse_avx512(BinnedGroup& bg, const Candidate& c, double abandon_above) {
  const std::size_t n_cells = static_cast<std::size_t>(c.hi - c.lo) + 1, n_bounds = n_cells - 1;
  const std::size_t padded = (n_cells + 15) & ~std::size_t{15};
  if (bg.first.size() < padded) {
    bg.first.resize(padded);
    bg.last.resize(padded);
  }
  int32_t* window_start = bg.first.data();
  int32_t* window_end = bg.last.data();
  const __m512d s = _mm512_set1_pd(c.scale), tiny = _mm512_set1_pd(0x1p-148), rel = _mm512_set1_pd(0x1p-19);
  const __m512d fmax = _mm512_set1_pd(FLT_MAX), fmin = _mm512_set1_pd(-FLT_MAX), inf = _mm512_set1_pd(HUGE_VAL);
  const __m512d step = _mm512_setr_pd(0, 1, 2, 3, 4, 5, 6, 7);
  const __m512 origin = _mm512_set1_ps(bg.origin), inv = _mm512_set1_ps(bg.inv_width);
  const __m512 top = _mm512_set1_ps(static_cast<float>(bg.nbins - 1)), zero = _mm512_setzero_ps();
  const __m512 lanes = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i n_vec = _mm512_set1_epi32(static_cast<int32_t>(bg.n));
  // Lane 0 takes the carry's lane 15 (index 31: the second table), lane L > 0 last's lane L - 1.
  const __m512i shift_in = _mm512_setr_epi32(31, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14);
  const __m512 top_code = _mm512_set1_ps(c.hi);
  const int* start = reinterpret_cast<const int*>(bg.start.data());
  const double* p1 = bg.p1.data();
  const double* p2 = bg.p2.data();
  const __m512 scale_ps = _mm512_set1_ps(c.scale);
  __m512d cells = _mm512_setzero_pd(), mag = cells;
  __m512i carry = _mm512_setzero_si512();  // lane 15: the end of the last boundary window so far (0 at first)
  for (std::size_t j = 0; j < padded; j += 16) {
    // Boundary j + lane: first = start[bin(lower)], last = start[bin(upper) + 1]; past the last boundary n.
    __m256 lower[2], upper[2];
    for (int h = 0; h < 2; ++h) {
      const double q0 = static_cast<double>(c.lo) + static_cast<double>(j + 8 * h) + 0.5;
      const __m512d t = _mm512_mul_pd(_mm512_add_pd(_mm512_set1_pd(q0), step), s);
      const __m512d margin = _mm512_add_pd(_mm512_mul_pd(_mm512_abs_pd(t), rel), tiny);
      lower[h] = _mm512_cvtpd_ps(_mm512_min_pd(_mm512_sub_pd(t, margin), fmax));
      const __m512d up = _mm512_max_pd(_mm512_add_pd(t, margin), fmin);
      upper[h] = _mm512_cvtpd_ps(_mm512_mask_blend_pd(_mm512_cmp_pd_mask(up, fmax, _CMP_GT_OQ), up, inf));
    }
    const __m512 lw = _mm512_insertf32x8(_mm512_castps256_ps512(lower[0]), lower[1], 1);
    const __m512 uw = _mm512_insertf32x8(_mm512_castps256_ps512(upper[0]), upper[1], 1);
    // bin(): max_ps returns its second operand (0) for NaN, as bin() does.
    const __m512i bl = _mm512_cvttps_epi32(_mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(_mm512_sub_ps(lw, origin), inv), zero), top));
    const __m512i bu = _mm512_cvttps_epi32(_mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(_mm512_sub_ps(uw, origin), inv), zero), top));
    const __mmask16 real = static_cast<__mmask16>(n_bounds - std::min(n_bounds, j) >= 16 ? 0xFFFF : (1u << (n_bounds - j)) - 1);
    const __m512i first = _mm512_mask_i32gather_epi32(n_vec, real, bl, start, 4);
    const __m512i last = _mm512_mask_i32gather_epi32(n_vec, real, bu, start + 1, 4);
    // Cell j + lane runs over [last of boundary j + lane - 1, max(first, that)): last[] is non-decreasing.
    const __m512i cell_lo = _mm512_permutex2var_epi32(last, shift_in, carry);
    const __m512i cell_hi = _mm512_max_epi32(first, cell_lo);
    carry = last;
    _mm512_storeu_si512(window_start + j, cell_hi);
    _mm512_storeu_si512(window_end + j, last);
    // Padding cells past the last code are empty; their code is clamped so q * scale stays finite.
    const __m512 q = _mm512_min_ps(_mm512_add_ps(_mm512_set1_ps(c.lo + static_cast<float>(j)), lanes), top_code);
    const __m512 deq_ps = _mm512_mul_ps(q, scale_ps);
    for (int h = 0; h < 2; ++h) {
      const __m256i lo_idx = h ? _mm512_extracti64x4_epi64(cell_lo, 1) : _mm512_castsi512_si256(cell_lo);
      const __m256i hi_idx = h ? _mm512_extracti64x4_epi64(cell_hi, 1) : _mm512_castsi512_si256(cell_hi);
      const __m512d deq = _mm512_cvtps_pd(h ? _mm512_extractf32x8_ps(deq_ps, 1) : _mm512_castps512_ps256(deq_ps));
      const __m512d s2 = _mm512_sub_pd(_mm512_i32gather_pd(hi_idx, p2, 8), _mm512_i32gather_pd(lo_idx, p2, 8));
      const __m512d s1 = _mm512_sub_pd(_mm512_i32gather_pd(hi_idx, p1, 8), _mm512_i32gather_pd(lo_idx, p1, 8));
      const __m512d cross = _mm512_mul_pd(_mm512_add_pd(deq, deq), s1);
      const __m512d nd2 = _mm512_mul_pd(_mm512_cvtepi32_pd(_mm256_sub_epi32(hi_idx, lo_idx)), _mm512_mul_pd(deq, deq));
      cells = _mm512_add_pd(cells, _mm512_add_pd(_mm512_sub_pd(s2, cross), nd2));
      mag = _mm512_add_pd(mag, _mm512_add_pd(_mm512_add_pd(s2, _mm512_abs_pd(cross)), nd2));
    }
  }
  ScreenedError r;
  const double cell_sum = _mm512_reduce_add_pd(cells), mag_sum = _mm512_reduce_add_pd(mag);
  if (cell_sum - binned_radius(bg, c, cell_sum, mag_sum, 0.0, n_cells, 0) > abandon_above) {
    r.value = HUGE_VAL;
    return r;
  }
  // Windows [cell end j, last of boundary j) may hold either code: element by element.
  const __m512d inv_s = _mm512_set1_pd(1.0 / static_cast<double>(c.scale));
  const __m256 scale8 = _mm256_set1_ps(c.scale), lo = _mm256_set1_ps(c.lo), hi = _mm256_set1_ps(c.hi);
  const float* y = bg.grouped.data();
  __m512d acc = _mm512_setzero_pd();
  std::size_t n_window = 0;
  for (std::size_t j = 0; j < n_bounds; ++j) {
    const int32_t a = window_start[j], b = window_end[j];
    acc = window_error_avx512(y, a, b, inv_s, scale8, lo, hi, acc);
    n_window += static_cast<std::size_t>(b - a);
  }
  const double elems = _mm512_reduce_add_pd(acc);
  r.value = cell_sum + elems;
  r.radius = binned_radius(bg, c, r.value, mag_sum, elems, n_cells, n_window);
  return r;
}
#endif

// The error of candidate c from the bins (see BinnedGroup), with its rounding radius. A candidate that
// provably has a larger error than `abandon_above` may come back as HUGE_VAL instead.
inline ScreenedError binned_mse(BinnedGroup& bg, const Candidate& c, Isa isa, double abandon_above) {
#ifdef PYQSHARE_QUANT_X86
  if (isa == Isa::kAvx512) return binned_mse_avx512(bg, c, abandon_above);
  if (isa != Isa::kPortable) return binned_mse_avx2(bg, c, abandon_above);
#endif
  (void)isa;
  (void)abandon_above;
  return binned_mse_scalar(bg, c);
}

// Per-task scratch reused across the groups of a task (no allocation per group once grown).
struct SearchScratch {
  std::vector<Candidate> cand;
  std::vector<float> w32_buf;
  const float* w32 = nullptr;  // float32 weights for screening (nullptr: unweighted)
  std::vector<double> bound, estimate, ratio;
  std::vector<float> screen_sum;
  std::vector<int> order;
  std::vector<std::size_t> top;
  BinnedGroup bins;
  std::vector<ScreenedError> screened;
  float top_x[kLanes];
  double top_w[kLanes];
};

#ifdef PYQSHARE_QUANT_X86
// Appends the indices k with |x[k]| >= threshold (few: the scan is a vector compare per 8 elements).
PYQSHARE_AVX2 inline void indices_at_least_avx2(const float* x, std::size_t n, float threshold,
                                                std::vector<std::size_t>& out) {
  const __m256 t = _mm256_set1_ps(threshold), sign = _mm256_set1_ps(-0.0f);
  std::size_t k = 0;
  for (; k + 8 <= n; k += 8) {
    unsigned mask = static_cast<unsigned>(
        _mm256_movemask_ps(_mm256_cmp_ps(_mm256_andnot_ps(sign, _mm256_loadu_ps(x + k)), t, _CMP_GE_OQ)));
    while (mask) {
      out.push_back(k + static_cast<std::size_t>(__builtin_ctz(mask)));
      mask &= mask - 1;
    }
  }
  for (; k < n; ++k) {
    if (std::fabs(x[k]) >= threshold) out.push_back(k);
  }
}
#endif

// Indices of up to kLanes largest |x| (any subset of elements gives a valid lower bound).
inline void largest_elements(const GroupData& g, double m, Isa isa, std::vector<std::size_t>& top) {
  top.clear();
  const float threshold = static_cast<float>(0.5 * m);
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
  if (top.size() > kLanes) {
    std::nth_element(top.begin(), top.begin() + kLanes, top.end(), [&](std::size_t a, std::size_t b) {
      const float fa = std::fabs(g.x[a]), fb = std::fabs(g.x[b]);
      return fa > fb || (fa == fb && a < b);
    });
    top.resize(kLanes);
  }
}

// Binned screening pays off when a group has many elements per cell (a cell: one code).
// (At most 2^20 elements: the scratch holds two float64 prefix arrays of the group's size.)
inline bool use_bins(const GroupData& g, const SearchConfig& cfg) {
  return cfg.squared() && !g.w && cfg.bits <= 12 && g.n >= (std::size_t{64} << cfg.bits) && g.n <= (std::size_t{1} << 20);
}

// About four elements per bin: a straddling bin still fits one eight-element window step, and the bin
// prefix and cursors cost a quarter of the elements.
inline std::size_t bin_count(std::size_t n) { return std::max<std::size_t>(1, n / 4); }

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
  for (int i = 0; i < n_cand; ++i) sc.cand[i] = make_candidate(cfg, st.xmin, st.xmax, sc.ratio[i]);
  if (cfg.objective == Objective::kMinMax) return {sc.cand[0].scale, sc.cand[0].zero_point};

  const double in_range_weight = g.w ? st.weight_sum : static_cast<double>(g.n);
  ScreenBound screen;
  screen.enabled = isa != Isa::kPortable && cfg.squared() && g.n <= 65536 && std::max(-st.xmin, st.xmax) <= 1e15;
  sc.w32 = nullptr;
  if (screen.enabled) {
    double wx2 = st.weighted_x2;
    if (g.w) {
      sc.w32_buf.resize(g.n);
      wx2 = 0.0;
      for (std::size_t k = 0; k < g.n; ++k) {
        sc.w32_buf[k] = static_cast<float>(g.w[k]);
        const double v = g.x[k];
        wx2 += g.w[k] * v * v;
      }
      sc.w32 = sc.w32_buf.data();
    }
    screen.xnorm = std::sqrt(wx2);
    screen.wroot = std::sqrt(in_range_weight);
    screen.gamma = (static_cast<double>(g.n) / 2.0 + 64.0) * 0x1p-23;
  }

  sc.bound.resize(n_cand);
  sc.estimate.resize(n_cand);
  sc.order.resize(n_cand);
  std::iota(sc.order.begin(), sc.order.end(), 0);
  const bool screened_all = screen.enabled && g.n <= kSmallGroup;
  const bool binned = !screened_all && use_bins(g, cfg);
#ifdef PYQSHARE_QUANT_X86
  if (screened_all) {
    // Screening sums of all candidates: their order is the evaluation order, and they prune below.
    sc.screen_sum.resize(n_cand);
    screen_candidates_avx2(g, sc.w32, sc.cand.data(), n_cand, sc.screen_sum.data());
    for (int i = 0; i < n_cand; ++i) {
      sc.estimate[i] = sc.screen_sum[i];
      sc.bound[i] = 0.0;
    }
  } else
#endif
  {
    // Lower bound of every candidate: its exact error on the largest elements alone. Summation order
    // differs from the full sum, so a relative margin covers the rounding of both sums.
    if (binned) {
      // The bins hold the group in value order (up to the order inside a bin): the ends hold the
      // largest |x| (any subset gives a valid bound), without another pass over the group.
      sc.bins.build(g.x, g.n, static_cast<float>(st.xmin), static_cast<float>(st.xmax), bin_count(g.n), isa);
      sc.bins.extremes(kLanes, sc.top_x);
    } else {
      largest_elements(g, std::max(-st.xmin, st.xmax), isa, sc.top);
      for (std::size_t j = 0; j < sc.top.size(); ++j) {
        sc.top_x[j] = g.x[sc.top[j]];
        sc.top_w[j] = g.w ? g.w[sc.top[j]] : 1.0;
      }
    }
    GroupData top;
    top.n = binned ? kLanes : sc.top.size();
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
    for (int i = 0; i < n_cand; ++i) {
      sc.bound[i] *= margin;
      const double half = 0.5 * sc.cand[i].scale;
      sc.estimate[i] = sc.bound[i] + in_range_weight * (p == 2.0 ? half * half : std::pow(half, p)) / (p + 1.0);
    }
  }
  if (binned) {
    // Screen candidates by estimate, pruning by the lower bound; then only those whose screened error can
    // still be the smallest are evaluated exactly, smallest screened error first.
    order_outward(sc.estimate, sc.order);
    sc.screened.assign(n_cand, ScreenedError{HUGE_VAL, 0.0});
    double best_upper = HUGE_VAL;
    for (int i : sc.order) {
      if (sc.bound[i] > best_upper) continue;
      sc.screened[i] = binned_mse(sc.bins, sc.cand[i], isa, best_upper);
      best_upper = std::min(best_upper, sc.screened[i].value + sc.screened[i].radius);
    }
    sc.order.clear();
    for (int i = 0; i < n_cand; ++i) {
      if (sc.screened[i].value - sc.screened[i].radius <= best_upper) sc.order.push_back(i);
    }
    std::sort(sc.order.begin(), sc.order.end(), [&](int a, int b) {
      return sc.screened[a].value < sc.screened[b].value || (sc.screened[a].value == sc.screened[b].value && a < b);
    });
  } else if (screened_all) {
    // The most promising candidate first, the others in index order: they are mostly pruned anyway.
    const auto first = std::min_element(sc.estimate.begin(), sc.estimate.end()) - sc.estimate.begin();
    std::rotate(sc.order.begin(), sc.order.begin() + first, sc.order.begin() + first + 1);
  } else {
    order_outward(sc.estimate, sc.order);
  }

  int best = n_cand;  // none yet
  double best_error = HUGE_VAL;
  RefineSums sums, best_sums;
  for (int i : sc.order) {
    if (best < n_cand) {
      if (sc.bound[i] > best_error) continue;
      if (binned) {
        // Survivors of the binned screen need no further screening.
      } else if (screened_all) {
        if (sc.screen_sum[i] > screen.threshold(best_error, sc.cand[i].scale)) continue;
      } else if (screen.enabled &&
                 screen_mse(g, sc.w32, sc.cand[i], screen.threshold(best_error, sc.cand[i].scale), isa)) {
        continue;
      }
    }
    const bool ties_lose = i > best;
    const EvalResult r = evaluate(g, sc.cand[i], cfg, isa, best_error, ties_lose, cfg.refine ? &sums : nullptr);
    if (!r.complete) continue;
    if (best == n_cand || r.error < best_error || (r.error == best_error && i < best)) {
      best = i;
      best_error = r.error;
      best_sums = sums;
    }
  }
  Candidate winner = sc.cand[best];
  if (cfg.refine) winner = refine(g, winner, best_error, cfg, isa, best_sums);
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

inline GroupData gather_group(const float* x, const SampleWeights& sw, const ScaleLayout& lay,
                              const GroupBox& b, GroupBuffers& buf, GroupStats& st, std::size_t gi, Isa isa) {
  const std::size_t n = b.size();
  const std::size_t row_len = lay.inner;
  const bool contiguous = (b.i1 - b.i0 == lay.inner || (b.l1 - b.l0 == 1 && b.o1 - b.o0 == 1)) &&
                          (b.l1 - b.l0 == lay.length || b.o1 - b.o0 == 1);
  if (!contiguous) buf.x.resize(n);
  if (sw.w) buf.w.resize(n);
  const float* base = x + (b.o0 * lay.length + b.l0) * row_len + b.i0;
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
    finite = prepare_avx2(g.x, n, lo, hi, st.weighted_x2);
  } else
#endif
  {
    for (std::size_t j = 0; j < n; ++j) {
      const float v = g.x[j];
      finite &= std::isfinite(v);
      lo = std::min(lo, v);
      hi = std::max(hi, v);
    }
  }
  if (!finite) {
    throw std::invalid_argument("w must be finite: group " + std::to_string(gi) +
                                " holds NaN or Inf (replace or mask them before the search)");
  }
  if (sw.w) {
    for (std::size_t j = 0; j < n; ++j) wsum += buf.w[j];
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
  const std::size_t per_task = std::max<std::size_t>(1, (std::size_t{1} << 14) / std::max<std::size_t>(group_size, 1));
  const Isa use = resolve_isa(isa);
  parallel_for(n_chunks(groups, per_task), num_threads, [&](std::size_t task) {
    GroupBuffers buf;
    SearchScratch sc;
    const std::size_t g0 = task * per_task, g1 = std::min(groups, g0 + per_task);
    for (std::size_t gi = g0; gi < g1; ++gi) {
      GroupStats st;
      const GroupData g = gather_group(x, sw, lay, group_box(lay, gi), buf, st, gi, reference ? Isa::kPortable : use);
      const GroupResult r = reference ? search_group_reference(g, st, cfg) : search_group_fast(g, st, cfg, use, sc);
      scale_out[gi] = r.scale;
      zero_point_out[gi] = r.zero_point;
    }
  });
}

}  // namespace pyqshare::quant
