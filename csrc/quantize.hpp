// ONNX QuantizeLinear / DequantizeLinear (opset 21) over float32, for any code width from 2 to 16 bits.
//
//   quantize:   q = saturate(round_half_even(x / scale) + zero_point)      (float32 division, as onnxruntime)
//   dequantize: y = float32(q - zero_point) * scale                        (float32 product)
//
// The array is viewed as (outer, length, inner) around the quantization axis; scales are per tensor,
// per index along the axis, or per block of `block` indices along the axis (ONNX blocked quantization).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

#include "parallel.hpp"

namespace pyqshare::quant {

struct CodeRange {
  int32_t qmin;
  int32_t qmax;
};

// Signed codes use the two's complement range of `bits` bits, unsigned codes [0, 2^bits - 1].
inline CodeRange code_range(int bits, bool is_signed) {
  if (is_signed) return {-(int32_t{1} << (bits - 1)), (int32_t{1} << (bits - 1)) - 1};
  return {0, (int32_t{1} << bits) - 1};
}

// Where the scale and zero point of element (o, l, i) of the (outer, length, inner) view live.
struct ScaleLayout {
  enum Kind { kPerTensor, kPerAxis, kBlocked };
  Kind kind = kPerTensor;
  std::size_t outer = 1, length = 1, inner = 1;
  std::size_t block = 1;  // kBlocked only

  std::size_t n_blocks() const { return (length + block - 1) / block; }
  std::size_t size() const { return outer * length * inner; }
  std::size_t n_params() const {
    switch (kind) {
      case kPerTensor: return 1;
      case kPerAxis: return length;
      default: return outer * n_blocks() * inner;
    }
  }
  // Index of the first parameter of row (o, l); `param_stride()` says how it moves with i.
  std::size_t row_param(std::size_t o, std::size_t l) const {
    switch (kind) {
      case kPerTensor: return 0;
      case kPerAxis: return l;
      default: return (o * n_blocks() + l / block) * inner;
    }
  }
  std::size_t param_stride() const { return kind == kBlocked ? 1 : 0; }
};

// Round half to even of a float already clamped to |t| <= 2^22: adding and removing 1.5 * 2^23 leaves
// the nearest integer under the default rounding mode, and unlike nearbyintf it vectorizes with SSE2.
inline float round_half_even_small(float t) {
  constexpr float kMagic = 12582912.0f;  // 1.5 * 2^23
  return (t + kMagic) - kMagic;
}

inline int32_t quantize_value(float x, float scale, int32_t zero_point, CodeRange r) {
  float t = x / scale;
  t = std::min(std::max(t, static_cast<float>(r.qmin - zero_point)), static_cast<float>(r.qmax - zero_point));
  return static_cast<int32_t>(round_half_even_small(t)) + zero_point;
}

inline float dequantize_value(int32_t q, float scale, int32_t zero_point) {
  return static_cast<float>(q - zero_point) * scale;
}

#if defined(__x86_64__) || defined(_M_X64)
#define PYQSHARE_QUANTIZE_X86 1
// Eight int32 in [code range] stored as eight Code values (the packs cannot saturate: values are in range).
template <class Code>
__attribute__((target("avx2"))) inline void store8_codes(Code* out, __m256i v) {
  const __m128i lo = _mm256_castsi256_si128(v), hi = _mm256_extracti128_si256(v, 1);
  if constexpr (std::is_same_v<Code, uint16_t>) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm_packus_epi32(lo, hi));
  } else {
    const __m128i v16 = _mm_packs_epi32(lo, hi);
    if constexpr (std::is_same_v<Code, int16_t>) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out), v16);
    } else if constexpr (std::is_same_v<Code, int8_t>) {
      _mm_storel_epi64(reinterpret_cast<__m128i*>(out), _mm_packs_epi16(v16, v16));
    } else {
      _mm_storel_epi64(reinterpret_cast<__m128i*>(out), _mm_packus_epi16(v16, v16));
    }
  }
}

template <class Code>
__attribute__((target("avx2"))) inline __m256i load8_codes(const Code* q) {
  if constexpr (sizeof(Code) == 1) {
    const __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q));
    return std::is_signed_v<Code> ? _mm256_cvtepi8_epi32(v) : _mm256_cvtepu8_epi32(v);
  } else {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
    return std::is_signed_v<Code> ? _mm256_cvtepi16_epi32(v) : _mm256_cvtepu16_epi32(v);
  }
}

// A run of n elements sharing one (scale, zero point); returns false if x holds NaN.
template <class Code>
__attribute__((target("avx2"))) inline bool quantize_run_avx2(const float* x, std::size_t n, float scale,
                                                              int32_t zp, CodeRange r, Code* out) {
  const __m256 s = _mm256_set1_ps(scale);
  const __m256 lo = _mm256_set1_ps(static_cast<float>(r.qmin - zp)), hi = _mm256_set1_ps(static_cast<float>(r.qmax - zp));
  const __m256i z = _mm256_set1_epi32(zp);
  __m256 nan = _mm256_setzero_ps();
  std::size_t k = 0;
  for (; k + 8 <= n; k += 8) {
    const __m256 v = _mm256_loadu_ps(x + k);
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    const __m256 t = _mm256_min_ps(_mm256_max_ps(_mm256_div_ps(v, s), lo), hi);
    const __m256i q = _mm256_cvtps_epi32(_mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    store8_codes(out + k, _mm256_add_epi32(q, z));
  }
  bool ok = _mm256_movemask_ps(nan) == 0;
  for (; k < n; ++k) {
    ok &= !std::isnan(x[k]);
    out[k] = static_cast<Code>(quantize_value(x[k], scale, zp, r));
  }
  return ok;
}

// A run of n codes sharing one (scale, zero point); returns false if a code is outside the range.
template <class Code>
__attribute__((target("avx2"))) inline bool dequantize_run_avx2(const Code* q, std::size_t n, float scale,
                                                                int32_t zp, CodeRange r, float* out) {
  const __m256 s = _mm256_set1_ps(scale);
  const __m256i z = _mm256_set1_epi32(zp), qmin = _mm256_set1_epi32(r.qmin), qmax = _mm256_set1_epi32(r.qmax);
  __m256i bad = _mm256_setzero_si256();
  std::size_t k = 0;
  for (; k + 8 <= n; k += 8) {
    const __m256i v = load8_codes(q + k);
    bad = _mm256_or_si256(bad, _mm256_or_si256(_mm256_cmpgt_epi32(qmin, v), _mm256_cmpgt_epi32(v, qmax)));
    _mm256_storeu_ps(out + k, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(v, z)), s));
  }
  bool ok = _mm256_testz_si256(bad, bad);
  for (; k < n; ++k) {
    ok &= q[k] >= r.qmin && q[k] <= r.qmax;
    out[k] = dequantize_value(q[k], scale, zp);
  }
  return ok;
}
#endif

inline bool has_avx2() {
#ifdef PYQSHARE_QUANTIZE_X86
  static const bool yes = __builtin_cpu_supports("avx2");
  return yes;
#else
  return false;
#endif
}

template <class Code>
bool quantize_run(const float* x, std::size_t n, float scale, int32_t zp, CodeRange r, Code* out, bool vector) {
#ifdef PYQSHARE_QUANTIZE_X86
  if (vector) return quantize_run_avx2(x, n, scale, zp, r, out);
#endif
  bool ok = true;
  for (std::size_t k = 0; k < n; ++k) {
    ok &= !std::isnan(x[k]);
    out[k] = static_cast<Code>(quantize_value(x[k], scale, zp, r));
  }
  return ok;
}

template <class Code>
bool dequantize_run(const Code* q, std::size_t n, float scale, int32_t zp, CodeRange r, float* out, bool vector) {
#ifdef PYQSHARE_QUANTIZE_X86
  if (vector) return dequantize_run_avx2(q, n, scale, zp, r, out);
#endif
  bool ok = true;
  for (std::size_t k = 0; k < n; ++k) {
    ok &= q[k] >= r.qmin && q[k] <= r.qmax;
    out[k] = dequantize_value(q[k], scale, zp);
  }
  return ok;
}

// Calls run(begin, count, param) over the elements [e0, e1) of the flat array, in maximal runs of one
// (scale, zero point) within a row: a whole row per tensor / per axis, a block when blocks run along the
// last axis, single elements when blocks run along an earlier axis.
template <class Run>
void for_each_run(const ScaleLayout& lay, std::size_t e0, std::size_t e1, Run&& run) {
  const std::size_t inner = std::max<std::size_t>(lay.inner, 1);
  std::size_t e = e0;
  while (e < e1) {
    const std::size_t row = e / inner, i = e % inner;
    const std::size_t o = row / lay.length, l = row % lay.length;
    std::size_t count;
    std::size_t param = lay.row_param(o, l) + i * lay.param_stride();
    if (lay.kind != ScaleLayout::kBlocked) {
      count = inner - i;
    } else if (lay.inner == 1) {
      count = lay.block - l % lay.block;
      count = std::min(count, lay.length - l);
    } else {
      count = 1;
    }
    count = std::min(count, e1 - e);
    run(e, count, param);
    e += count;
  }
}

constexpr std::size_t kElementsPerTask = std::size_t{1} << 16;

// Calls run(e, count, p) on every run of elements sharing scale p, in fixed tasks of kElementsPerTask;
// `run` returns false on bad input, and then `error()` is thrown (from the worker, carried back).
template <class Run, class Error>
void for_each_task_run(const ScaleLayout& lay, int num_threads, Run&& run, Error&& error) {
  const std::size_t n = lay.size();
  parallel_for(n_chunks(n, kElementsPerTask), num_threads, [&](std::size_t task) {
    const std::size_t e0 = task * kElementsPerTask, e1 = std::min(n, e0 + kElementsPerTask);
    bool ok = true;
    for_each_run(lay, e0, e1, [&](std::size_t e, std::size_t count, std::size_t p) { ok &= run(e, count, p); });
    if (!ok) throw std::invalid_argument(error());
  });
}

template <class Code>
void quantize(const float* x, const float* scale, const Code* zero_point, Code* out, const ScaleLayout& lay,
              CodeRange range, int num_threads, bool vector = has_avx2()) {
  for_each_task_run(
      lay, num_threads,
      [&](std::size_t e, std::size_t count, std::size_t p) {
        return quantize_run(x + e, count, scale[p], static_cast<int32_t>(zero_point[p]), range, out + e, vector);
      },
      [] { return std::string("x contains NaN; quantize needs NaN-free input (Inf saturates)"); });
}

template <class Code>
void dequantize(const Code* q, const float* scale, const Code* zero_point, float* out, const ScaleLayout& lay,
                CodeRange range, int num_threads, bool vector = has_avx2()) {
  for_each_task_run(
      lay, num_threads,
      [&](std::size_t e, std::size_t count, std::size_t p) {
        return dequantize_run(q + e, count, scale[p], static_cast<int32_t>(zero_point[p]), range, out + e, vector);
      },
      [&] {
        return "q holds codes outside [" + std::to_string(range.qmin) + ", " + std::to_string(range.qmax) +
               "]: pass the bits the codes were made with";
      });
}

}  // namespace pyqshare::quant
