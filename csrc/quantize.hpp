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

// Rows of the (outer, length, inner) view handed to one parallel task: about 64 Ki elements.
inline std::size_t rows_per_task(const ScaleLayout& lay) {
  return std::max<std::size_t>(1, (std::size_t{1} << 16) / std::max<std::size_t>(lay.inner, 1));
}

template <class Code>
void quantize(const float* x, const float* scale, const Code* zero_point, Code* out, const ScaleLayout& lay,
              CodeRange range, int num_threads) {
  const std::size_t rows = lay.outer * lay.length;
  const std::size_t chunk = rows_per_task(lay);
  const std::size_t inner = lay.inner;
  const std::size_t ps = lay.param_stride();
  parallel_for(n_chunks(rows, chunk), num_threads, [&](std::size_t task) {
    const std::size_t r0 = task * chunk, r1 = std::min(rows, r0 + chunk);
    // A separate finiteness pass keeps the conversion loop branch-free (and vectorized).
    bool has_nan = false;
    for (std::size_t k = r0 * inner; k < r1 * inner; ++k) has_nan |= std::isnan(x[k]);
    if (has_nan) throw std::invalid_argument("x contains NaN; quantize needs NaN-free input (Inf saturates)");
    for (std::size_t row = r0; row < r1; ++row) {
      const std::size_t p0 = lay.row_param(row / lay.length, row % lay.length);
      const float* xr = x + row * inner;
      Code* yr = out + row * inner;
      for (std::size_t i = 0; i < inner; ++i) {
        const std::size_t p = p0 + i * ps;
        yr[i] = static_cast<Code>(quantize_value(xr[i], scale[p], zero_point[p], range));
      }
    }
  });
}

template <class Code>
void dequantize(const Code* q, const float* scale, const Code* zero_point, float* out, const ScaleLayout& lay,
                CodeRange range, int num_threads) {
  const std::size_t rows = lay.outer * lay.length;
  const std::size_t chunk = rows_per_task(lay);
  const std::size_t inner = lay.inner;
  const std::size_t ps = lay.param_stride();
  parallel_for(n_chunks(rows, chunk), num_threads, [&](std::size_t task) {
    const std::size_t r0 = task * chunk, r1 = std::min(rows, r0 + chunk);
    bool out_of_range = false;
    for (std::size_t k = r0 * inner; k < r1 * inner; ++k) {
      out_of_range |= (static_cast<int32_t>(q[k]) < range.qmin) | (static_cast<int32_t>(q[k]) > range.qmax);
    }
    if (out_of_range) {
      throw std::invalid_argument("q holds codes outside [" + std::to_string(range.qmin) + ", " +
                                  std::to_string(range.qmax) + "]: pass the bits the codes were made with");
    }
    for (std::size_t row = r0; row < r1; ++row) {
      const std::size_t p0 = lay.row_param(row / lay.length, row % lay.length);
      const Code* qr = q + row * inner;
      float* yr = out + row * inner;
      for (std::size_t i = 0; i < inner; ++i) {
        const std::size_t p = p0 + i * ps;
        yr[i] = dequantize_value(qr[i], scale[p], zero_point[p]);
      }
    }
  });
}

}  // namespace pyqshare::quant
