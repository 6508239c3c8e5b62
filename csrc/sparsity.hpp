// N:M and magnitude sparsity kernels over raw IEEE float bits.
//
// Floats are handled as their bit patterns (uint16_t / uint32_t / uint64_t for float16 / float32 / float64).
// For a finite float, clearing the sign bit gives an integer whose order is the order of |x|, exactly; a
// signed "score key" (-|x| for negative x, |x| otherwise) orders signed values, with -0.0 == +0.0. Every
// selection below compares those integer keys, which is exact and vectorises well.
//
// Layout: any axis of a C-contiguous array is the (outer, length, inner) view. With G = length / m groups
// per row, the array is (Q = outer * G, m, inner): "group q, lane p" holds elements (q * m + j) * inner + p
// for j in [0, m). Every kernel works on ranges of q, so threads split work without copies.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "parallel.hpp"
#include "sparsity_simd.hpp"

namespace pyqshare {
namespace sparsity {

constexpr int kMaxM = 65536;      // largest group size; in-group indices then fit 16 bits
constexpr int kSmallM = 16;       // up to this m, ranks come from all pairwise comparisons
constexpr std::size_t kChunkElems = std::size_t(1) << 16;  // elements per parallel task (fixed: thread invariance)

// Bits per packed in-group index: ceil(log2(m)), 0 for m == 1.
inline int index_bits(int m) {
  int b = 0;
  while ((1 << b) < m) ++b;
  return b;
}

// Bits<U>: the sign bit and the all-ones exponent of the float stored in U.
template <class U>
struct Bits;
template <>
struct Bits<uint16_t> {
  using S = int16_t;
  static constexpr uint16_t kSign = 0x8000u, kExp = 0x7c00u;
};
template <>
struct Bits<uint32_t> {
  using S = int32_t;
  static constexpr uint32_t kSign = 0x80000000u, kExp = 0x7f800000u;
};
template <>
struct Bits<uint64_t> {
  using S = int64_t;
  static constexpr uint64_t kSign = 0x8000000000000000ull, kExp = 0x7ff0000000000000ull;
};

template <class U>
inline U magnitude_bits(U b) {
  return U(b & U(~Bits<U>::kSign));
}
template <class U>
inline bool finite_bits(U b) {
  return magnitude_bits(b) < Bits<U>::kExp;
}

// magnitude: select by |x|; score: select by x itself (largest scores are kept).
enum class KeyKind { magnitude, score };

template <KeyKind K, class U>
inline typename Bits<U>::S signed_key(U b) {
  using S = typename Bits<U>::S;
  const S mag = S(magnitude_bits(b));
  if constexpr (K == KeyKind::magnitude) {
    return mag;
  } else {
    return (b & Bits<U>::kSign) ? S(-mag) : mag;
  }
}

// The same order as signed_key, as an unsigned integer (for radix selection).
template <KeyKind K, class U>
inline U unsigned_key(U b) {
  return U(U(signed_key<K>(b)) ^ Bits<U>::kSign);
}

template <class U>
bool all_finite(const U* p, std::size_t count) {
  U worst = 0;
  for (std::size_t i = 0; i < count; ++i) worst = std::max(worst, magnitude_bits(p[i]));
  return worst < Bits<U>::kExp;
}

// ---------------------------------------------------------------------------------------------------------
// N:M mask. In each group, element j's rank is the number of elements that beat it: a larger key, or an
// equal key at a lower index. It is kept iff rank < n, so exactly n elements are kept, ties to the lowest
// index.

// Groups [q0, q1) for m <= kSmallM, any inner. Lanes (q, p) are processed in blocks of kBlock: the keys
// of a block are gathered into [j][lane] rows so the pairwise comparisons run over contiguous lanes.
// Returns false if a key source value is NaN or Inf.
template <KeyKind K, class U>
bool nm_mask_small_m(const U* src, uint8_t* out, std::size_t q0, std::size_t q1, int n, int m,
                     std::size_t inner) {
  using S = typename Bits<U>::S;
  constexpr std::size_t kBlock = 64;
  S keys[kSmallM][kBlock];
  int32_t acc[kSmallM][kBlock];
  std::size_t base[kBlock];
  U worst = 0;
  const std::size_t lane_end = q1 * inner;
  std::size_t q = q0, p = 0;
  for (std::size_t lane = q0 * inner; lane < lane_end;) {
    const std::size_t nb = std::min(kBlock, lane_end - lane);
    for (std::size_t b = 0; b < nb; ++b) {
      base[b] = q * std::size_t(m) * inner + p;
      if (++p == inner) p = 0, ++q;
    }
    for (int j = 0; j < m; ++j) {
      const std::size_t off = std::size_t(j) * inner;
      for (std::size_t b = 0; b < nb; ++b) {
        const U bits = src[base[b] + off];
        worst = std::max(worst, magnitude_bits(bits));
        keys[j][b] = signed_key<K>(bits);
        acc[j][b] = 0;
      }
    }
    // For i < j: c = [key_j > key_i] (j beats i); otherwise i beats j. rank_j = j + acc_j, see below.
    for (int i = 0; i < m; ++i) {
      for (int j = i + 1; j < m; ++j) {
        for (std::size_t b = 0; b < nb; ++b) {
          const int32_t c = keys[j][b] > keys[i][b];
          acc[i][b] += c;
          acc[j][b] -= c;
        }
      }
    }
    // rank_j = sum_{i<j} (1 - c_ij) + sum_{k>j} c_jk = j + acc_j.
    for (int j = 0; j < m; ++j) {
      const std::size_t off = std::size_t(j) * inner;
      for (std::size_t b = 0; b < nb; ++b) out[base[b] + off] = uint8_t(j + acc[j][b] < n);
    }
    lane += nb;
  }
  return worst < Bits<U>::kExp;
}

// Groups [q0, q1) for any m: a selection of the top n per group.
template <KeyKind K, class U>
bool nm_mask_large_m(const U* src, uint8_t* out, std::size_t q0, std::size_t q1, int n, int m,
                     std::size_t inner) {
  using S = typename Bits<U>::S;
  std::vector<S> keys(m);
  std::vector<int32_t> order(m);
  U worst = 0;
  const auto beats = [&](int32_t a, int32_t b) { return keys[a] > keys[b] || (keys[a] == keys[b] && a < b); };
  for (std::size_t q = q0; q < q1; ++q) {
    for (std::size_t p = 0; p < inner; ++p) {
      const std::size_t base = q * std::size_t(m) * inner + p;
      for (int j = 0; j < m; ++j) {
        const U bits = src[base + std::size_t(j) * inner];
        worst = std::max(worst, magnitude_bits(bits));
        keys[j] = signed_key<K>(bits);
        out[base + std::size_t(j) * inner] = 0;
      }
      std::iota(order.begin(), order.end(), 0);
      if (n > 0 && n < m) std::nth_element(order.begin(), order.begin() + n, order.end(), beats);
      for (int t = 0; t < n; ++t) out[base + std::size_t(order[t]) * inner] = 1;
    }
  }
  return worst < Bits<U>::kExp;
}

// Which hand-written SIMD kernels may run: generic (plain C++ only), sse2 (the portable x86-64 build), avx2.
enum class Isa { generic, sse2, avx2 };

inline Isa best_isa() {
#if PYQSHARE_SPARSITY_X86
  return __builtin_cpu_supports("avx2") ? Isa::avx2 : Isa::sse2;
#else
  return Isa::generic;
#endif
}

inline const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::avx2: return "avx2";
    case Isa::sse2: return "sse2";
    default: return "generic";
  }
}

// The mask of groups [q0, q1); src and out point at the whole array. Returns false on NaN/Inf.
template <KeyKind K, class U>
bool nm_mask_range(const U* src, uint8_t* out, std::size_t q0, std::size_t q1, int n, int m, std::size_t inner,
                   Isa isa) {
  if (m > kSmallM) return nm_mask_large_m<K>(src, out, q0, q1, n, m, inner);
  bool finite = true;
#if PYQSHARE_SPARSITY_X86
  if constexpr (std::is_same_v<U, uint32_t>) {
    // Contiguous groups of 4 or 8 float32: SIMD kernels take whole blocks, the generic code the tail.
    if (inner == 1 && (m == 4 || m == 8) && isa != Isa::generic) {
      const std::size_t done = simd::nm_mask_f32(isa == Isa::avx2, K == KeyKind::score, src + q0 * m,
                                                 out + q0 * m, q1 - q0, n, m, &finite);
      q0 += done;
    }
  }
#endif
  (void)isa;
  return nm_mask_small_m<K>(src, out, q0, q1, n, m, inner) && finite;
}

inline std::size_t groups_per_task(int m, std::size_t inner, std::size_t unit = 1) {
  const std::size_t per_group = std::max<std::size_t>(1, std::size_t(m) * inner);
  const std::size_t g = std::max<std::size_t>(1, kChunkElems / per_group);
  return (g + unit - 1) / unit * unit;
}

inline std::invalid_argument not_finite(const char* name) {
  return std::invalid_argument(std::string(name) + " contains NaN or Inf; pass finite values");
}

// Throws std::invalid_argument if any of w[0, count) is NaN/Inf, checking in parallel.
template <class U>
void check_finite(const U* w, std::size_t count, int num_threads, const char* name) {
  parallel_for(n_chunks(count, kChunkElems), num_threads, [&](std::size_t t) {
    const std::size_t lo = t * kChunkElems, hi = std::min(count, lo + kChunkElems);
    if (!all_finite(w + lo, hi - lo)) throw not_finite(name);
  });
}

// The N:M mask of the (Q, m, inner) array src; `name` names src in the NaN/Inf error.
template <KeyKind K, class U>
void nm_mask(const U* src, uint8_t* out, std::size_t Q, int n, int m, std::size_t inner, int num_threads, Isa isa,
             const char* name) {
  if (n < 0 || n > m || m < 1 || m > kMaxM) throw std::invalid_argument("nm_mask: need 0 <= n <= m <= 65536");
  const std::size_t per_task = groups_per_task(m, inner);
  parallel_for(n_chunks(Q, per_task), num_threads, [&](std::size_t t) {
    const std::size_t q0 = t * per_task, q1 = std::min(Q, q0 + per_task);
    if (!nm_mask_range<K>(src, out, q0, q1, n, m, inner, isa)) throw not_finite(name);
  });
}

// ---------------------------------------------------------------------------------------------------------
// Packed N:M form. values: (Q, n, inner), the kept elements of each group in increasing in-group index.
// indices: for the e-th element of values (C order), its in-group index j in bits [e*b, e*b + b) of a
// little-endian bit stream (bit i of the stream is bit i % 8 of byte i / 8), b = index_bits(m).

class BitWriter {
 public:
  explicit BitWriter(uint8_t* out) : out_(out) {}
  void put(uint32_t value, int bits) {
    acc_ |= uint64_t(value) << filled_;
    filled_ += bits;
    while (filled_ >= 8) {
      *out_++ = uint8_t(acc_);
      acc_ >>= 8;
      filled_ -= 8;
    }
  }
  void flush() {
    if (filled_ > 0) *out_++ = uint8_t(acc_);
    acc_ = 0;
    filled_ = 0;
  }

 private:
  uint8_t* out_;
  uint64_t acc_ = 0;
  int filled_ = 0;
};

class BitReader {
 public:
  explicit BitReader(const uint8_t* in) : in_(in) {}
  uint32_t get(int bits) {
    while (filled_ < bits) {
      acc_ |= uint64_t(*in_++) << filled_;
      filled_ += 8;
    }
    const uint32_t v = uint32_t(acc_ & ((uint64_t(1) << bits) - 1));
    acc_ >>= bits;
    filled_ -= bits;
    return v;
  }

 private:
  const uint8_t* in_;
  uint64_t acc_ = 0;
  int filled_ = 0;
};

// Groups per task such that every task's index bits start on a byte boundary.
inline std::size_t packed_groups_per_task(int n, int m, std::size_t inner) {
  const std::size_t bits_per_group = std::size_t(n) * inner * std::size_t(index_bits(m));
  const std::size_t unit = 8 / std::gcd<std::size_t>(bits_per_group % 8 == 0 ? 8 : bits_per_group % 8, 8);
  return groups_per_task(m, inner, unit);
}

// keysrc selects (w itself, or scores); w supplies the values. Checks keysrc for NaN/Inf (w separately if
// it differs).
template <KeyKind K, class UK, class UW>
void nm_compress(const UW* w, const UK* keysrc, UW* values, uint8_t* indices, std::size_t Q, int n, int m,
                 std::size_t inner, int num_threads, Isa isa, const char* name) {
  if (n < 0 || n > m || m < 1 || m > kMaxM) throw std::invalid_argument("nm_compress: need 0 <= n <= m <= 65536");
  const int b = index_bits(m);
  const std::size_t group = std::size_t(m) * inner, kept = std::size_t(n) * inner;
  const std::size_t per_task = packed_groups_per_task(n, m, inner);
  const std::size_t tasks = n_chunks(Q, per_task);
  parallel_for(tasks, num_threads, [&](std::size_t t) {
    const std::size_t q0 = t * per_task, q1 = std::min(Q, q0 + per_task);
    std::vector<uint8_t> mask((q1 - q0) * group);
    if (!nm_mask_range<K>(keysrc + q0 * group, mask.data(), 0, q1 - q0, n, m, inner, isa)) throw not_finite(name);
    std::vector<uint16_t> slot(kept);
    BitWriter bits(indices + q0 * kept * std::size_t(b) / 8);
    for (std::size_t q = q0; q < q1; ++q) {
      const uint8_t* mq = mask.data() + (q - q0) * group;
      const UW* wq = w + q * group;
      UW* vq = values + q * kept;
      if (inner == 1 && m <= kSmallM) {
        // Branch-free compaction (kept positions are unpredictable): write every element, advance on keep.
        UW v[kSmallM];
        uint16_t index[kSmallM];
        std::size_t k = 0;
        for (int j = 0; j < m; ++j) {
          v[k] = wq[j];
          index[k] = uint16_t(j);
          k += mq[j];
        }
        for (int t = 0; t < n; ++t) vq[t] = v[t];  // n is small: no memmove call
        if (n * b <= 32) {  // the whole group's indices in one write
          uint32_t word = 0;
          for (int t = 0; t < n; ++t) word |= uint32_t(index[t]) << (t * b);
          bits.put(word, n * b);
        } else {
          for (int t = 0; t < n; ++t) bits.put(index[t], b);
        }
        continue;
      }
      for (std::size_t p = 0; p < inner; ++p) {
        std::size_t k = p;
        for (int j = 0; j < m; ++j) {
          if (mq[std::size_t(j) * inner + p]) {
            vq[k] = wq[std::size_t(j) * inner + p];
            slot[k] = uint16_t(j);
            k += inner;
          }
        }
      }
      if (b > 0)
        for (std::size_t e = 0; e < kept; ++e) bits.put(slot[e], b);
    }
    bits.flush();  // only the last task can end inside a byte
  });
}

template <class UW>
void nm_decompress(const UW* values, const uint8_t* indices, UW* out, std::size_t Q, int n, int m, std::size_t inner,
                   int num_threads) {
  if (n < 0 || n > m || m < 1 || m > kMaxM) throw std::invalid_argument("nm_decompress: need 0 <= n <= m <= 65536");
  const int b = index_bits(m);
  const std::size_t group = std::size_t(m) * inner, kept = std::size_t(n) * inner;
  const std::size_t per_task = packed_groups_per_task(n, m, inner);
  parallel_for(n_chunks(Q, per_task), num_threads, [&](std::size_t t) {
    const std::size_t q0 = t * per_task, q1 = std::min(Q, q0 + per_task);
    std::memset(out + q0 * group, 0, (q1 - q0) * group * sizeof(UW));
    std::vector<int32_t> previous(inner);
    BitReader bits(indices + q0 * kept * std::size_t(b) / 8);
    for (std::size_t q = q0; q < q1; ++q) {
      std::fill(previous.begin(), previous.end(), -1);
      UW* oq = out + q * group;
      const UW* vq = values + q * kept;
      for (int t = 0; t < n; ++t) {
        for (std::size_t p = 0; p < inner; ++p) {
          // With b == 0 (m == 1) the only index is 0.
          const int32_t j = b > 0 ? int32_t(bits.get(b)) : 0;
          if (j <= previous[p] || j >= m) {
            throw std::invalid_argument(
                "nm_decompress: indices are not strictly increasing in-group indices < m "
                "(pass the indices nm_compress returned, with the same n, m, shape and axis)");
          }
          previous[p] = j;
          oq[std::size_t(j) * inner + p] = vq[std::size_t(t) * inner + p];
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------------------
// Magnitude mask: zero exactly k elements of each row: the k smallest keys, among equal keys the highest
// indices first (so the lowest indices are kept). Keys here are unsigned_key values.

template <class U>
struct Threshold {
  U key;                  // the largest dropped key
  std::size_t keep_equal; // how many elements equal to key are kept (the lowest-index ones)
  std::size_t count_equal;
};

// Reused buffers of one selection (one per task when rows are handed out whole).
template <class U>
struct SelectScratch {
  std::vector<uint32_t> histograms;  // per chunk: one count per top digit, then a NaN/Inf flag
  std::vector<std::size_t> offsets;
  std::vector<U> candidates;
};

// The threshold dropping k of src[0, len) (0 < k < len). A histogram of the top kTopBits of every key
// (fixed chunks, summed in order) finds the bin holding the largest dropped key; the keys of that bin are
// gathered and a selection among them gives the exact key.
template <KeyKind K, class U>
Threshold<U> select_threshold(const U* src, std::size_t len, std::size_t k, int num_threads,
                              SelectScratch<U>& s, const char* name) {
  constexpr int kTopBits = 11;
  constexpr int kShift = int(sizeof(U) * 8) - kTopBits;
  constexpr std::size_t kBins = std::size_t(1) << kTopBits, kStride = kBins + 1;
  const std::size_t tasks = n_chunks(len, kChunkElems);
  s.histograms.assign(tasks * kStride, 0);
  parallel_for(tasks, num_threads, [&](std::size_t t) {
    const std::size_t lo = t * kChunkElems, hi = std::min(len, lo + kChunkElems);
    uint32_t* h = s.histograms.data() + t * kStride;
    U worst = 0;
    for (std::size_t i = lo; i < hi; ++i) {
      worst = std::max(worst, magnitude_bits(src[i]));
      ++h[unsigned_key<K>(src[i]) >> kShift];
    }
    h[kBins] = worst >= Bits<U>::kExp;
  });
  for (std::size_t t = 0; t < tasks; ++t)
    if (s.histograms[t * kStride + kBins]) throw not_finite(name);
  // The bin of the (k-1)-th smallest key, and that key's rank among the bin's keys.
  std::size_t rank = k - 1, bin = 0;
  for (;; ++bin) {
    std::size_t count = 0;
    for (std::size_t t = 0; t < tasks; ++t) count += s.histograms[t * kStride + bin];
    if (rank < count) break;
    rank -= count;
  }
  // Gather the bin branch-free: each chunk writes every key and advances on a match, into its own region
  // with one spare slot; the regions are then closed up in chunk order.
  s.offsets.resize(tasks + 1);
  s.offsets[0] = 0;
  for (std::size_t t = 0; t < tasks; ++t) s.offsets[t + 1] = s.offsets[t] + s.histograms[t * kStride + bin] + 1;
  s.candidates.resize(s.offsets[tasks]);
  parallel_for(tasks, num_threads, [&](std::size_t t) {
    const std::size_t lo = t * kChunkElems, hi = std::min(len, lo + kChunkElems);
    U* out = s.candidates.data() + s.offsets[t];
    std::size_t pos = 0;
    for (std::size_t i = lo; i < hi; ++i) {
      const U key = unsigned_key<K>(src[i]);
      out[pos] = key;
      pos += (key >> kShift) == bin;
    }
  });
  std::size_t count = 0;
  for (std::size_t t = 0; t < tasks; ++t) {
    const std::size_t c = s.histograms[t * kStride + bin];
    std::copy(s.candidates.begin() + s.offsets[t], s.candidates.begin() + s.offsets[t] + c,
              s.candidates.begin() + count);
    count += c;
  }
  const auto first = s.candidates.begin(), last = first + count;
  std::nth_element(first, first + rank, last);
  const U key = first[rank];
  std::size_t less = 0, equal = 0;
  for (auto it = first; it != last; ++it) less += *it < key, equal += *it == key;
  // Of the keys equal to `key`, rank - less + 1 are dropped (the highest-index ones).
  return {key, equal - (rank - less + 1), equal};
}

// Writes the mask of src[lo, hi) given the threshold; equal_before = equal keys before lo.
template <KeyKind K, class U>
void write_magnitude_mask(const U* src, uint8_t* out, std::size_t lo, std::size_t hi, const Threshold<U>& th,
                          std::size_t equal_before) {
  if (th.keep_equal == 0) {  // no partial tie: plain comparisons
    for (std::size_t i = lo; i < hi; ++i) out[i] = unsigned_key<K>(src[i]) > th.key;
    return;
  }
  if (th.keep_equal == th.count_equal) {
    for (std::size_t i = lo; i < hi; ++i) out[i] = unsigned_key<K>(src[i]) >= th.key;
    return;
  }
  std::size_t equal_seen = equal_before;
  for (std::size_t i = lo; i < hi; ++i) {
    const U key = unsigned_key<K>(src[i]);
    const bool equal = key == th.key;
    out[i] = uint8_t((key > th.key) | (equal & (equal_seen < th.keep_equal)));
    equal_seen += equal;
  }
}

template <KeyKind K, class U>
std::size_t count_equal_keys(const U* src, std::size_t lo, std::size_t hi, U key) {
  std::size_t c = 0;
  for (std::size_t i = lo; i < hi; ++i) c += unsigned_key<K>(src[i]) == key;
  return c;
}

// One row of len elements with k zeros, all on the calling thread or split over num_threads.
template <KeyKind K, class U>
void magnitude_mask_row(const U* src, uint8_t* out, std::size_t len, std::size_t k, int num_threads,
                        SelectScratch<U>& scratch, const char* name) {
  if (k == 0 || k == len) {
    check_finite(src, len, num_threads, name);
    std::memset(out, k == 0 ? 1 : 0, len);
    return;
  }
  const Threshold<U> th = select_threshold<K>(src, len, k, num_threads, scratch, name);
  const std::size_t tasks = n_chunks(len, kChunkElems);
  // Only a partial tie at the threshold needs to know how many equal keys precede each chunk.
  std::vector<std::size_t> equal_before(tasks, 0);
  if (th.keep_equal > 0 && th.keep_equal < th.count_equal && tasks > 1) {
    parallel_for(tasks, num_threads, [&](std::size_t t) {
      const std::size_t lo = t * kChunkElems, hi = std::min(len, lo + kChunkElems);
      equal_before[t] = count_equal_keys<K>(src, lo, hi, th.key);
    });
    std::size_t sum = 0;
    for (auto& e : equal_before) sum += std::exchange(e, sum);
  }
  parallel_for(tasks, num_threads, [&](std::size_t t) {
    const std::size_t lo = t * kChunkElems, hi = std::min(len, lo + kChunkElems);
    write_magnitude_mask<K>(src, out, lo, hi, th, equal_before[t]);
  });
}

// rows rows of len elements each, k zeros per row. A single row is split over threads; several rows are
// handed out whole.
template <KeyKind K, class U>
void magnitude_mask(const U* src, uint8_t* out, std::size_t rows, std::size_t len, std::size_t k, int num_threads,
                    const char* name) {
  if (k > len) throw std::invalid_argument("magnitude_mask: more zeros than elements per row");
  if (rows == 1) {
    SelectScratch<U> scratch;
    magnitude_mask_row<K>(src, out, len, k, num_threads, scratch, name);
    return;
  }
  const std::size_t rows_per_task = std::max<std::size_t>(1, kChunkElems / std::max<std::size_t>(1, len));
  parallel_for(n_chunks(rows, rows_per_task), num_threads, [&](std::size_t t) {
    SelectScratch<U> scratch;
    const std::size_t r1 = std::min(rows, (t + 1) * rows_per_task);
    for (std::size_t r = t * rows_per_task; r < r1; ++r)
      magnitude_mask_row<K>(src + r * len, out + r * len, len, k, 1, scratch, name);
  });
}

// ---------------------------------------------------------------------------------------------------------
// Slow, obvious references: compare the float values themselves (no integer keys), stable sorts.
namespace ref {

inline double to_double(uint16_t h) {
  const int exp = (h >> 10) & 31, mant = h & 1023;
  double v = exp == 0 ? std::ldexp(double(mant), -24)
             : exp == 31 ? (mant ? NAN : INFINITY)
                         : std::ldexp(double(mant | 1024), exp - 25);
  return (h & 0x8000) ? -v : v;
}
inline double to_double(uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}
inline double to_double(uint64_t b) {
  double d;
  std::memcpy(&d, &b, 8);
  return d;
}

template <class U>
double selection_value(U bits, bool by_score) {
  const double v = to_double(bits);
  if (std::isnan(v) || std::isinf(v)) throw std::invalid_argument("reference: NaN or Inf");
  return by_score ? v : std::fabs(v);
}

// Keeps the n largest values of each group, ties to the lower index.
template <class U>
void nm_mask(const U* src, uint8_t* out, std::size_t outer, std::size_t length, std::size_t inner, int n, int m,
             bool by_score) {
  std::vector<std::size_t> order(m);
  std::vector<double> v(m);
  for (std::size_t o = 0; o < outer; ++o)
    for (std::size_t g = 0; g < length / m; ++g)
      for (std::size_t p = 0; p < inner; ++p) {
        auto at = [&](std::size_t j) { return (o * length + g * m + j) * inner + p; };
        for (int j = 0; j < m; ++j) v[j] = selection_value(src[at(j)], by_score), order[j] = j;
        std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) { return v[a] > v[b]; });
        for (int t = 0; t < m; ++t) out[at(order[t])] = t < n;
      }
}

// Zeros the k smallest values of each row, among equal values the highest indices first.
template <class U>
void magnitude_mask(const U* src, uint8_t* out, std::size_t rows, std::size_t len, std::size_t k, bool by_score) {
  std::vector<std::size_t> order(len);
  std::vector<double> v(len);
  for (std::size_t r = 0; r < rows; ++r) {
    for (std::size_t i = 0; i < len; ++i) v[i] = selection_value(src[r * len + i], by_score), order[i] = i;
    std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) { return v[a] > v[b]; });
    for (std::size_t t = 0; t < len; ++t) out[r * len + order[t]] = t < len - k;
  }
}

}  // namespace ref
}  // namespace sparsity
}  // namespace pyqshare
