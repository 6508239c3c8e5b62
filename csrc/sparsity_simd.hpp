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

// ----- SSE2: one group of 4 per register; m == 8 is left to the generic code.

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

// ----- AVX2: groups of 4 use 128-bit lanes (vpshufd); groups of 8 fill a register (vpermd).

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

// Lane i against lane (i + S) % 8; lanes with i + S >= 8 met a lower index, which wins ties.
template <int S>
__attribute__((target("avx2"))) inline __m256i beaten_by_rotation8(__m256i k) {
  const __m256i rotate = _mm256_setr_epi32(S % 8, (S + 1) % 8, (S + 2) % 8, (S + 3) % 8, (S + 4) % 8, (S + 5) % 8,
                                           (S + 6) % 8, (S + 7) % 8);
  const __m256i wrap = _mm256_setr_epi32(-(S >= 8), -(S + 1 >= 8), -(S + 2 >= 8), -(S + 3 >= 8), -(S + 4 >= 8),
                                         -(S + 5 >= 8), -(S + 6 >= 8), -(S + 7 >= 8));
  return _mm256_cmpgt_epi32(_mm256_permutevar8x32_epi32(k, rotate), _mm256_add_epi32(k, wrap));
}

__attribute__((target("avx2"))) inline __m256i keep8_avx2(__m256i k, __m256i neg_n) {
  const __m256i a = _mm256_add_epi32(beaten_by_rotation8<1>(k), beaten_by_rotation8<2>(k));
  const __m256i b = _mm256_add_epi32(beaten_by_rotation8<3>(k), beaten_by_rotation8<4>(k));
  const __m256i c = _mm256_add_epi32(beaten_by_rotation8<5>(k), beaten_by_rotation8<6>(k));
  const __m256i neg_rank = _mm256_add_epi32(_mm256_add_epi32(a, b), _mm256_add_epi32(c, beaten_by_rotation8<7>(k)));
  return _mm256_cmpgt_epi32(neg_rank, neg_n);
}

template <bool kScore, int kM>
__attribute__((target("avx2"))) inline __m256i keep_avx2(const uint32_t* p, __m256i neg_n, __m256i& worst) {
  const __m256i k = key_avx2<kScore>(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), worst);
  if constexpr (kM == 4) {
    return keep4_avx2(k, neg_n);
  } else {
    return keep8_avx2(k, neg_n);
  }
}

// 8 groups of 4, or 4 groups of 8, per step (32 elements); returns the number of groups done.
template <bool kScore, int kM>
__attribute__((target("avx2"))) std::size_t nm_avx2(const uint32_t* src, uint8_t* out, std::size_t groups, int n,
                                                   bool* finite) {
  const __m256i neg_n = _mm256_set1_epi32(-n);
  __m256i worst = _mm256_setzero_si256();
  constexpr std::size_t kGroupsPerStep = 32 / kM;
  const std::size_t steps = groups / kGroupsPerStep;
  for (std::size_t s = 0; s < steps; ++s) {
    const uint32_t* in = src + 32 * s;
    store_bytes_avx2(out + 32 * s, keep_avx2<kScore, kM>(in, neg_n, worst), keep_avx2<kScore, kM>(in + 8, neg_n, worst),
                     keep_avx2<kScore, kM>(in + 16, neg_n, worst), keep_avx2<kScore, kM>(in + 24, neg_n, worst));
  }
  *finite = _mm256_movemask_epi8(worst) == 0;
  return steps * kGroupsPerStep;
}

// Masks a prefix of `groups` contiguous groups of m (4 or 8) float32 bit patterns; returns how many groups
// it did (the caller finishes the rest). *finite is false if a value was NaN or Inf.
inline std::size_t nm_mask_f32(bool avx2, bool score, const uint32_t* src, uint8_t* out, std::size_t groups, int n,
                               int m, bool* finite) {
  *finite = true;
  if (avx2) {
    if (m == 4) return score ? nm_avx2<true, 4>(src, out, groups, n, finite) : nm_avx2<false, 4>(src, out, groups, n, finite);
    return score ? nm_avx2<true, 8>(src, out, groups, n, finite) : nm_avx2<false, 8>(src, out, groups, n, finite);
  }
  if (m == 4) return score ? nm4_sse2<true>(src, out, groups, n, finite) : nm4_sse2<false>(src, out, groups, n, finite);
  return 0;
}

}  // namespace simd
}  // namespace sparsity
}  // namespace pyqshare
#endif
