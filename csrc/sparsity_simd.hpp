// Hand-written SIMD N:M mask kernels for contiguous float32 groups of 4 or 8 (the axis=-1 2:4 / 4:8 case).
//
// Each element's rank in its group is counted by comparing the group with rotated copies of itself: lane i
// meets lane (i + s) % m. When that lane has a lower index (the rotation wrapped), it wins ties, so the test
// is key_j > key_i - 1 instead of key_j > key_i (keys are integers well inside int32). A comparison yields
// -1 where lane j beats lane i, so the sum over rotations is -rank, and rank < n is -rank > -n.
//
// SSE2 is the x86-64 baseline; the AVX2 functions carry target attributes and run only after a run-time
// check (no file is compiled with -mavx2).
#pragma once

#include <cstddef>
#include <cstdint>

#if defined(__x86_64__) && defined(__SSE2__) && (defined(__GNUC__) || defined(__clang__))
#define PYQSHARE_SPARSITY_X86 1
#include <immintrin.h>
#else
#define PYQSHARE_SPARSITY_X86 0
#endif

#if PYQSHARE_SPARSITY_X86
namespace pyqshare {
namespace sparsity {
namespace simd {

// ----- SSE2: one group of 4 per register.

template <bool kScore>
inline __m128i key_sse2(__m128i bits, __m128i& worst) {
  const __m128i mag = _mm_and_si128(bits, _mm_set1_epi32(0x7fffffff));
  worst = _mm_or_si128(worst, _mm_cmpgt_epi32(mag, _mm_set1_epi32(0x7f7fffff)));
  if constexpr (!kScore) return mag;
  const __m128i sign = _mm_srai_epi32(bits, 31);
  return _mm_sub_epi32(_mm_xor_si128(mag, sign), sign);  // -|x| for negative x
}

inline __m128i keep4_sse2(__m128i k, __m128i neg_n) {
  // _mm_set_epi32 lists lanes 3..0: the lanes whose partner wrapped to a lower index.
  const __m128i wrap1 = _mm_set_epi32(-1, 0, 0, 0), wrap2 = _mm_set_epi32(-1, -1, 0, 0),
                wrap3 = _mm_set_epi32(-1, -1, -1, 0);
  __m128i neg_rank = _mm_cmpgt_epi32(_mm_shuffle_epi32(k, _MM_SHUFFLE(0, 3, 2, 1)), _mm_add_epi32(k, wrap1));
  neg_rank = _mm_add_epi32(neg_rank,
                           _mm_cmpgt_epi32(_mm_shuffle_epi32(k, _MM_SHUFFLE(1, 0, 3, 2)), _mm_add_epi32(k, wrap2)));
  neg_rank = _mm_add_epi32(neg_rank,
                           _mm_cmpgt_epi32(_mm_shuffle_epi32(k, _MM_SHUFFLE(2, 1, 0, 3)), _mm_add_epi32(k, wrap3)));
  return _mm_cmpgt_epi32(neg_rank, neg_n);
}

// 4 groups of 4 per step; returns the number of groups done.
template <bool kScore>
std::size_t nm4_sse2(const uint32_t* src, uint8_t* out, std::size_t groups, int n, bool* finite) {
  const __m128i neg_n = _mm_set1_epi32(-n), one = _mm_set1_epi8(1);
  __m128i worst = _mm_setzero_si128();
  const std::size_t steps = groups / 4;
  for (std::size_t s = 0; s < steps; ++s) {
    const __m128i* in = reinterpret_cast<const __m128i*>(src + 16 * s);
    const __m128i k0 = keep4_sse2(key_sse2<kScore>(_mm_loadu_si128(in + 0), worst), neg_n);
    const __m128i k1 = keep4_sse2(key_sse2<kScore>(_mm_loadu_si128(in + 1), worst), neg_n);
    const __m128i k2 = keep4_sse2(key_sse2<kScore>(_mm_loadu_si128(in + 2), worst), neg_n);
    const __m128i k3 = keep4_sse2(key_sse2<kScore>(_mm_loadu_si128(in + 3), worst), neg_n);
    const __m128i bytes = _mm_packs_epi16(_mm_packs_epi32(k0, k1), _mm_packs_epi32(k2, k3));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 16 * s), _mm_and_si128(bytes, one));
  }
  *finite = _mm_movemask_epi8(worst) == 0;
  return steps * 4;
}

// Groups of 8 (SSE2): four groups at a time, transposed so that register j holds element j of each group,
// then all 28 pairs compared vertically (see nm8_step_avx2 for the counting).
template <bool kScore>
inline void nm8_step_sse2(const uint32_t* src, uint8_t* out, int n, __m128i& worst) {
  __m128i v[8], acc[8];
  for (int half = 0; half < 2; ++half) {  // elements 0-3, then 4-7
    __m128i k[4];
#pragma GCC unroll 4
    for (int g = 0; g < 4; ++g)
      k[g] = key_sse2<kScore>(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 8 * g + 4 * half)), worst);
    const __m128i a = _mm_unpacklo_epi32(k[0], k[1]), b = _mm_unpackhi_epi32(k[0], k[1]);
    const __m128i c = _mm_unpacklo_epi32(k[2], k[3]), d = _mm_unpackhi_epi32(k[2], k[3]);
    v[4 * half + 0] = _mm_unpacklo_epi64(a, c);
    v[4 * half + 1] = _mm_unpackhi_epi64(a, c);
    v[4 * half + 2] = _mm_unpacklo_epi64(b, d);
    v[4 * half + 3] = _mm_unpackhi_epi64(b, d);
  }
#pragma GCC unroll 8
  for (int j = 0; j < 8; ++j) acc[j] = _mm_setzero_si128();
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {
#pragma GCC unroll 8
    for (int j = i + 1; j < 8; ++j) {
      const __m128i c = _mm_cmpgt_epi32(v[j], v[i]);
      acc[i] = _mm_add_epi32(acc[i], c);
      acc[j] = _mm_sub_epi32(acc[j], c);
    }
  }
#pragma GCC unroll 8
  for (int j = 0; j < 8; ++j) acc[j] = _mm_cmpgt_epi32(acc[j], _mm_set1_epi32(j - n));
  // Back to memory order without SSSE3 byte shuffles: packing elements (0, 2, 1, 3) lets two interleaves
  // turn byte j * 4 + g into g * 4 + j; then the j < 4 and j >= 4 halves are interleaved per group.
  const auto by_group = [](__m128i e0, __m128i e1, __m128i e2, __m128i e3) {
    const __m128i packed = _mm_packs_epi16(_mm_packs_epi32(e0, e2), _mm_packs_epi32(e1, e3));
    const __m128i pairs = _mm_unpacklo_epi8(packed, _mm_srli_si128(packed, 8));
    return _mm_unpacklo_epi16(pairs, _mm_srli_si128(pairs, 8));
  };
  const __m128i lo = by_group(acc[0], acc[1], acc[2], acc[3]), hi = by_group(acc[4], acc[5], acc[6], acc[7]);
  const __m128i one = _mm_set1_epi8(1);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm_and_si128(_mm_unpacklo_epi32(lo, hi), one));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 16), _mm_and_si128(_mm_unpackhi_epi32(lo, hi), one));
}

template <bool kScore>
std::size_t nm8_sse2(const uint32_t* src, uint8_t* out, std::size_t groups, int n, bool* finite) {
  __m128i worst = _mm_setzero_si128();
  const std::size_t steps = groups / 4;
  for (std::size_t s = 0; s < steps; ++s) nm8_step_sse2<kScore>(src + 32 * s, out + 32 * s, n, worst);
  *finite = _mm_movemask_epi8(worst) == 0;
  return steps * 4;
}

// ----- AVX2: groups of 4 use 128-bit lanes (vpshufd rotations); groups of 8 are transposed (below).

template <bool kScore>
__attribute__((target("avx2"))) inline __m256i key_avx2(__m256i bits, __m256i& worst) {
  const __m256i mag = _mm256_and_si256(bits, _mm256_set1_epi32(0x7fffffff));
  worst = _mm256_or_si256(worst, _mm256_cmpgt_epi32(mag, _mm256_set1_epi32(0x7f7fffff)));
  if constexpr (!kScore) return mag;
  const __m256i sign = _mm256_srai_epi32(bits, 31);
  return _mm256_sub_epi32(_mm256_xor_si256(mag, sign), sign);
}

// Packs four registers of 32-bit 0/-1 lanes into 32 bytes of 0/1 in lane order.
__attribute__((target("avx2"))) inline void store_bytes_avx2(uint8_t* out, __m256i a, __m256i b, __m256i c,
                                                              __m256i d) {
  // packs work per 128-bit half: the 4-byte pieces come out as a.lo b.lo c.lo d.lo | a.hi b.hi c.hi d.hi.
  const __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(a, b), _mm256_packs_epi32(c, d));
  const __m256i ordered = _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm256_and_si256(ordered, _mm256_set1_epi8(1)));
}

__attribute__((target("avx2"))) inline __m256i keep4_avx2(__m256i k, __m256i neg_n) {
  const __m256i wrap1 = _mm256_setr_epi32(0, 0, 0, -1, 0, 0, 0, -1), wrap2 = _mm256_setr_epi32(0, 0, -1, -1, 0, 0, -1, -1),
                wrap3 = _mm256_setr_epi32(0, -1, -1, -1, 0, -1, -1, -1);
  __m256i neg_rank =
      _mm256_cmpgt_epi32(_mm256_shuffle_epi32(k, _MM_SHUFFLE(0, 3, 2, 1)), _mm256_add_epi32(k, wrap1));
  neg_rank = _mm256_add_epi32(
      neg_rank, _mm256_cmpgt_epi32(_mm256_shuffle_epi32(k, _MM_SHUFFLE(1, 0, 3, 2)), _mm256_add_epi32(k, wrap2)));
  neg_rank = _mm256_add_epi32(
      neg_rank, _mm256_cmpgt_epi32(_mm256_shuffle_epi32(k, _MM_SHUFFLE(2, 1, 0, 3)), _mm256_add_epi32(k, wrap3)));
  return _mm256_cmpgt_epi32(neg_rank, neg_n);
}

// Groups of 8: eight groups at a time are transposed so that register j holds element j of each group; the
// ranks then need plain vertical comparisons of the 28 pairs (i < j): c = [v_j > v_i] means j beats i,
// otherwise i beats j (ties go to the lower index). With c as 0/-1, acc_i += c and acc_j -= c give
// rank_j = j - acc_j, so rank_j < n is acc_j > j - n.
template <bool kScore>
__attribute__((target("avx2"))) inline void nm8_step_avx2(const uint32_t* src, uint8_t* out, int n, __m256i& worst) {
  __m256i v[8], acc[8];
  for (int half = 0; half < 2; ++half) {  // groups 0-3, then 4-7
    __m256i k[4];
#pragma GCC unroll 4
    for (int g = 0; g < 4; ++g)
      k[g] = key_avx2<kScore>(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 8 * (4 * half + g))), worst);
    // In-lane 4x4 transpose: t[j] holds element j (low lane) and j + 4 (high lane) of the four groups.
    const __m256i a = _mm256_unpacklo_epi32(k[0], k[1]), b = _mm256_unpackhi_epi32(k[0], k[1]);
    const __m256i c = _mm256_unpacklo_epi32(k[2], k[3]), d = _mm256_unpackhi_epi32(k[2], k[3]);
    acc[4 * half + 0] = _mm256_unpacklo_epi64(a, c);
    acc[4 * half + 1] = _mm256_unpackhi_epi64(a, c);
    acc[4 * half + 2] = _mm256_unpacklo_epi64(b, d);
    acc[4 * half + 3] = _mm256_unpackhi_epi64(b, d);
  }
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j) {  // element j of groups 0-3 | groups 4-7, and element j + 4 likewise
    v[j] = _mm256_permute2x128_si256(acc[j], acc[4 + j], 0x20);
    v[j + 4] = _mm256_permute2x128_si256(acc[j], acc[4 + j], 0x31);
  }
#pragma GCC unroll 8
  for (int j = 0; j < 8; ++j) acc[j] = _mm256_setzero_si256();
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {
#pragma GCC unroll 8
    for (int j = i + 1; j < 8; ++j) {
      const __m256i c = _mm256_cmpgt_epi32(v[j], v[i]);
      acc[i] = _mm256_add_epi32(acc[i], c);
      acc[j] = _mm256_sub_epi32(acc[j], c);
    }
  }
#pragma GCC unroll 8
  for (int j = 0; j < 8; ++j) acc[j] = _mm256_cmpgt_epi32(acc[j], _mm256_set1_epi32(j - n));
  // Back to memory order. Per 128-bit lane the packs give byte j * 4 + g (groups g of that lane); the byte
  // shuffle makes it g * 4 + j; interleaving the j < 4 and j >= 4 halves gives whole groups.
  const __m256i lo = _mm256_packs_epi16(_mm256_packs_epi32(acc[0], acc[1]), _mm256_packs_epi32(acc[2], acc[3]));
  const __m256i hi = _mm256_packs_epi16(_mm256_packs_epi32(acc[4], acc[5]), _mm256_packs_epi32(acc[6], acc[7]));
  const __m256i transpose = _mm256_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15, 0, 4, 8, 12, 1, 5,
                                             9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  const __m256i l = _mm256_shuffle_epi8(lo, transpose), h = _mm256_shuffle_epi8(hi, transpose);
  const __m256i g0145 = _mm256_unpacklo_epi32(l, h), g2367 = _mm256_unpackhi_epi32(l, h);
  const __m256i one = _mm256_set1_epi8(1);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out),
                      _mm256_and_si256(_mm256_permute2x128_si256(g0145, g2367, 0x20), one));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 32),
                      _mm256_and_si256(_mm256_permute2x128_si256(g0145, g2367, 0x31), one));
}

template <bool kScore>
__attribute__((target("avx2"))) std::size_t nm8_avx2(const uint32_t* src, uint8_t* out, std::size_t groups, int n,
                                                    bool* finite) {
  __m256i worst = _mm256_setzero_si256();
  const std::size_t steps = groups / 8;
  for (std::size_t s = 0; s < steps; ++s) nm8_step_avx2<kScore>(src + 64 * s, out + 64 * s, n, worst);
  *finite = _mm256_movemask_epi8(worst) == 0;
  return steps * 8;
}

template <bool kScore>
__attribute__((target("avx2"))) inline __m256i keep4_avx2(const uint32_t* p, __m256i neg_n, __m256i& worst) {
  return keep4_avx2(key_avx2<kScore>(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), worst), neg_n);
}

// 8 groups of 4 per step; returns the number of groups done.
template <bool kScore>
__attribute__((target("avx2"))) std::size_t nm4_avx2(const uint32_t* src, uint8_t* out, std::size_t groups, int n,
                                                    bool* finite) {
  const __m256i neg_n = _mm256_set1_epi32(-n);
  __m256i worst = _mm256_setzero_si256();
  const std::size_t steps = groups / 8;
  for (std::size_t s = 0; s < steps; ++s) {
    const uint32_t* in = src + 32 * s;
    store_bytes_avx2(out + 32 * s, keep4_avx2<kScore>(in, neg_n, worst), keep4_avx2<kScore>(in + 8, neg_n, worst),
                     keep4_avx2<kScore>(in + 16, neg_n, worst), keep4_avx2<kScore>(in + 24, neg_n, worst));
  }
  *finite = _mm256_movemask_epi8(worst) == 0;
  return steps * 8;
}

// Masks a prefix of `groups` contiguous groups of m (4 or 8) float32 bit patterns; returns how many groups
// it did (the caller finishes the rest). *finite is false if a value was NaN or Inf.
inline std::size_t nm_mask_f32(bool avx2, bool score, const uint32_t* src, uint8_t* out, std::size_t groups, int n,
                               int m, bool* finite) {
  *finite = true;
  if (avx2) {
    if (m == 4) return score ? nm4_avx2<true>(src, out, groups, n, finite) : nm4_avx2<false>(src, out, groups, n, finite);
    return score ? nm8_avx2<true>(src, out, groups, n, finite) : nm8_avx2<false>(src, out, groups, n, finite);
  }
  if (m == 4) return score ? nm4_sse2<true>(src, out, groups, n, finite) : nm4_sse2<false>(src, out, groups, n, finite);
  return score ? nm8_sse2<true>(src, out, groups, n, finite) : nm8_sse2<false>(src, out, groups, n, finite);
}

}  // namespace simd
}  // namespace sparsity
}  // namespace pyqshare
#endif
