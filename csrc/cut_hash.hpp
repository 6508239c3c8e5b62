// The cut-point hash of content-defined chunking: a hash of the 16 bytes before a position, computed
// independently at every position so that it vectorises across positions (a rolling hash such as gear's
// is a serial chain of table lookups, ~1 byte per cycle).
//
// For a position e >= 16 (a chunk that would end just before byte e), with a, b, c, d the little-endian
// 16-bit words at e-8, e-6, e-4, e-2 and all 16-bit arithmetic modulo 2^16:
//   f(e) = (((a * K1 + b) * K2 ^ (c * K1 + d)) + C) * K3                      (16 bits, bytes e-8 .. e-1)
//   g(e) = mix64(read64(e - 8) + mix64(read64(e - 16)))                        (64 bits, bytes e-16 .. e-1)
//   H(e) = f(e) << 48 | g(e) >> 16
// with mix64 the SplitMix64 finaliser. e is a k-candidate if the top k bits of H(e) are zero. The cheap
// f is evaluated at every position (16 lanes per SSE2 multiply pair, 32 with AVX2, 64 with AVX-512); g
// only where f's top min(k, 16) bits are zero (one position in 2^16 when k >= 16), which is the only
// place it can matter.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define PYQSHARE_CUT_X86 1
#include <immintrin.h>
#endif

namespace pyqshare::cut {

inline constexpr std::uint16_t kF1 = 0x9E37;
inline constexpr std::uint16_t kF2 = 0x85EB;
inline constexpr std::uint16_t kF3 = 0xC2B3;
inline constexpr std::uint16_t kFAdd = 0x6A09;  // keeps f(all zero bytes) = 0xF64B away from a cut
inline constexpr std::size_t kWindow = 16;       // positions below this have no cut hash

inline std::uint16_t read16(const std::uint8_t* p) { return static_cast<std::uint16_t>(p[0] | (p[1] << 8)); }

inline std::uint64_t read64(const std::uint8_t* p) {
  std::uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

inline std::uint64_t mix64(std::uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

inline std::uint16_t mul16(std::uint32_t x, std::uint32_t y) { return static_cast<std::uint16_t>(x * y); }

inline std::uint16_t cut_f(const std::uint8_t* data, std::size_t e) {
  const std::uint8_t* w = data + e - 8;
  const std::uint16_t ab = mul16(read16(w), kF1) + read16(w + 2);
  const std::uint16_t cd = mul16(read16(w + 4), kF1) + read16(w + 6);
  return mul16(static_cast<std::uint16_t>((mul16(ab, kF2) ^ cd) + kFAdd), kF3);
}

inline std::uint64_t cut_g(const std::uint8_t* data, std::size_t e) {
  return mix64(read64(data + e - 8) + mix64(read64(data + e - 16)));
}

inline std::uint64_t cut_hash(const std::uint8_t* data, std::size_t e) {
  return (static_cast<std::uint64_t>(cut_f(data, e)) << 48) | (cut_g(data, e) >> 16);
}

// The slow obvious test, straight from the definition (1 <= k <= 64).
inline bool is_candidate_reference(const std::uint8_t* data, std::size_t e, int k) {
  return (cut_hash(data, e) >> (64 - k)) == 0;
}

// f passes when its top min(k, 16) bits are zero, i.e. f <= f_limit(k).
inline std::uint16_t f_limit(int k) { return k >= 16 ? 0 : static_cast<std::uint16_t>(0xFFFFu >> k); }

// The rest of the test at a position whose f already passed: g's share when k > 16.
inline bool g_passes(const std::uint8_t* data, std::size_t e, int k) {
  return k <= 16 || (cut_g(data, e) >> (64 - (k - 16))) == 0;
}

// A scanner returns the first k-candidate e with from <= e < to (16 <= from), or `to` if there is none.
using ScanFn = std::size_t (*)(const std::uint8_t* data, std::size_t from, std::size_t to, int k);

inline std::size_t scan_scalar(const std::uint8_t* data, std::size_t from, std::size_t to, int k) {
  const std::uint16_t limit = f_limit(k);
  for (std::size_t e = from; e < to; ++e) {
    if (cut_f(data, e) <= limit && g_passes(data, e, k)) return e;
  }
  return to;
}

// Positions e + j for the set bits j of `hits` (in order), confirmed with g; `to` if none passes.
inline std::size_t first_confirmed(const std::uint8_t* data, std::size_t e, std::uint64_t hits, int k,
                                   std::size_t to) {
  for (; hits != 0; hits &= hits - 1) {
    const std::size_t at = e + static_cast<std::size_t>(__builtin_ctzll(hits));
    if (g_passes(data, at, k)) return at;
  }
  return to;
}

#ifdef PYQSHARE_CUT_X86

// Every vector kernel computes f for the positions e, e+2, e+4, ... from words loaded at e-8 (one 16-bit
// lane per position), and a second time from e-7 for the odd positions. Loads stay inside
// [e-8, e+V-1) for V positions e .. e+V-1, so a block never reads past its last position's window.
// The scan reads ahead of the hardware prefetcher's reach: it is the first touch of the chunk's memory.
inline constexpr std::size_t kScanPrefetch = 1024;

// Lanes (0xFFFF) whose f passes, for the positions w+8, w+10, ...
inline __m128i passes_sse2(const std::uint8_t* w, bool exact_zero, __m128i limit) {
  const auto load = [](const std::uint8_t* p) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)); };
  const __m128i k1 = _mm_set1_epi16(static_cast<short>(kF1));
  const __m128i ab = _mm_add_epi16(_mm_mullo_epi16(load(w), k1), load(w + 2));
  const __m128i cd = _mm_add_epi16(_mm_mullo_epi16(load(w + 4), k1), load(w + 6));
  const __m128i inner = _mm_xor_si128(_mm_mullo_epi16(ab, _mm_set1_epi16(static_cast<short>(kF2))), cd);
  if (exact_zero) return _mm_cmpeq_epi16(inner, _mm_set1_epi16(static_cast<short>(-kFAdd)));
  const __m128i f = _mm_mullo_epi16(_mm_add_epi16(inner, _mm_set1_epi16(static_cast<short>(kFAdd))),
                                    _mm_set1_epi16(static_cast<short>(kF3)));
  return _mm_cmpeq_epi16(_mm_subs_epu16(f, limit), _mm_setzero_si128());  // f - limit saturates to 0
}

inline std::size_t scan_sse2(const std::uint8_t* data, std::size_t from, std::size_t to, int k) {
  const __m128i limit = _mm_set1_epi16(static_cast<short>(f_limit(k)));
  const bool exact_zero = k >= 16;
  std::size_t e = from;
  for (; e + 16 <= to; e += 16) {
    __builtin_prefetch(data + e + kScanPrefetch);
    const __m128i even = passes_sse2(data + e - 8, exact_zero, limit);
    const __m128i odd = passes_sse2(data + e - 7, exact_zero, limit);
    if (_mm_movemask_epi8(_mm_or_si128(even, odd)) != 0) [[unlikely]] {
      const auto hits = static_cast<std::uint64_t>((_mm_movemask_epi8(even) & 0x5555) | (_mm_movemask_epi8(odd) & 0xAAAA));
      const std::size_t found = first_confirmed(data, e, hits, k, to);
      if (found != to) return found;
    }
  }
  return scan_scalar(data, e, to, k);
}

#define PYQSHARE_CUT_AVX2 __attribute__((target("avx2")))

PYQSHARE_CUT_AVX2 inline __m256i ab_avx2(const std::uint8_t* w) {
  const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
  const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 2));
  return _mm256_add_epi16(_mm256_mullo_epi16(a, _mm256_set1_epi16(static_cast<short>(kF1))), b);
}

// As passes_avx512 (below), as a byte mask: 0xFFFF in the lanes that pass.
PYQSHARE_CUT_AVX2 inline __m256i passes_avx2(__m256i ab, __m256i cd, bool exact_zero, __m256i limit) {
  const __m256i inner = _mm256_xor_si256(_mm256_mullo_epi16(ab, _mm256_set1_epi16(static_cast<short>(kF2))), cd);
  if (exact_zero) return _mm256_cmpeq_epi16(inner, _mm256_set1_epi16(static_cast<short>(-kFAdd)));
  const __m256i f = _mm256_mullo_epi16(_mm256_add_epi16(inner, _mm256_set1_epi16(static_cast<short>(kFAdd))),
                                       _mm256_set1_epi16(static_cast<short>(kF3)));
  return _mm256_cmpeq_epi16(_mm256_subs_epu16(f, limit), _mm256_setzero_si256());
}

// The 16 words of `cur` moved down two lanes, the two lowest of `next` coming in on top.
PYQSHARE_CUT_AVX2 inline __m256i two_lanes_on_avx2(__m256i cur, __m256i next) {
  return _mm256_alignr_epi8(_mm256_permute2x128_si256(cur, next, 0x21), cur, 4);
}

PYQSHARE_CUT_AVX2 inline std::size_t scan_avx2(const std::uint8_t* data, std::size_t from, std::size_t to, int k) {
  const __m256i limit = _mm256_set1_epi16(static_cast<short>(f_limit(k)));
  const bool exact_zero = k >= 16;
  std::size_t e = from;
  if (e + 64 <= to) {
    __m256i even = ab_avx2(data + e - 8);
    __m256i odd = ab_avx2(data + e - 7);
    for (; e + 64 <= to; e += 32) {  // the next block's products reach byte e + 57
      __builtin_prefetch(data + e + kScanPrefetch);
      const __m256i even_next = ab_avx2(data + e + 24);
      const __m256i odd_next = ab_avx2(data + e + 25);
      const __m256i even_hits = passes_avx2(even, two_lanes_on_avx2(even, even_next), exact_zero, limit);
      const __m256i odd_hits = passes_avx2(odd, two_lanes_on_avx2(odd, odd_next), exact_zero, limit);
      const __m256i any = _mm256_or_si256(even_hits, odd_hits);
      if (!_mm256_testz_si256(any, any)) [[unlikely]] {
        const auto hits = static_cast<std::uint64_t>(
            (static_cast<std::uint32_t>(_mm256_movemask_epi8(even_hits)) & 0x55555555u) |
            (static_cast<std::uint32_t>(_mm256_movemask_epi8(odd_hits)) & 0xAAAAAAAAu));
        const std::size_t found = first_confirmed(data, e, hits, k, to);
        if (found != to) return found;
      }
      even = even_next;
      odd = odd_next;
    }
  }
  return scan_sse2(data, e, to, k);
}

#define PYQSHARE_CUT_AVX512 __attribute__((target("avx512f,avx512bw,bmi2")))

// a * K1 + b for the 32 positions w+8, w+10, ...; the c * K1 + d of position e is this value at e + 4,
// two lanes further on, so one product serves both.
PYQSHARE_CUT_AVX512 inline __m512i ab_avx512(const std::uint8_t* w) {
  return _mm512_add_epi16(_mm512_mullo_epi16(_mm512_loadu_si512(w), _mm512_set1_epi16(static_cast<short>(kF1))),
                          _mm512_loadu_si512(w + 2));
}

// Lanes whose f passes, for f's inner value (ab * K2 ^ cd). For k >= 16 f must be 0, and as the last
// multiply is a bijection that is the inner value being -kFAdd: two operations fewer.
PYQSHARE_CUT_AVX512 inline __mmask32 passes_avx512(__m512i ab, __m512i cd, bool exact_zero, __m512i limit) {
  const __m512i inner = _mm512_xor_si512(_mm512_mullo_epi16(ab, _mm512_set1_epi16(static_cast<short>(kF2))), cd);
  if (exact_zero) return _mm512_cmpeq_epi16_mask(inner, _mm512_set1_epi16(static_cast<short>(-kFAdd)));
  const __m512i f = _mm512_mullo_epi16(_mm512_add_epi16(inner, _mm512_set1_epi16(static_cast<short>(kFAdd))),
                                       _mm512_set1_epi16(static_cast<short>(kF3)));
  return _mm512_cmple_epu16_mask(f, limit);
}

PYQSHARE_CUT_AVX512 inline std::size_t scan_avx512(const std::uint8_t* data, std::size_t from, std::size_t to,
                                                   int k) {
  const __m512i limit = _mm512_set1_epi16(static_cast<short>(f_limit(k)));
  const bool exact_zero = k >= 16;
  std::size_t e = from;
  if (e + 128 <= to) {
    __m512i even = ab_avx512(data + e - 8);
    __m512i odd = ab_avx512(data + e - 7);
    // The next block's products are read up to byte e + 121: the loop stops one block early.
    for (; e + 128 <= to; e += 64) {
      __builtin_prefetch(data + e + kScanPrefetch);
      const __m512i even_next = ab_avx512(data + e + 56);
      const __m512i odd_next = ab_avx512(data + e + 57);
      const __mmask32 even_hits = passes_avx512(even, _mm512_mask_alignr_epi32(even, 0xFFFF, even_next, even, 1), exact_zero, limit);
      const __mmask32 odd_hits = passes_avx512(odd, _mm512_mask_alignr_epi32(odd, 0xFFFF, odd_next, odd, 1), exact_zero, limit);
      if ((even_hits | odd_hits) != 0) [[unlikely]] {
        const std::uint64_t hits =
            _pdep_u64(even_hits, 0x5555555555555555ULL) | _pdep_u64(odd_hits, 0xAAAAAAAAAAAAAAAAULL);
        const std::size_t found = first_confirmed(data, e, hits, k, to);
        if (found != to) return found;
      }
      even = even_next;
      odd = odd_next;
    }
  }
  return scan_avx2(data, e, to, k);
}

#undef PYQSHARE_CUT_AVX2
#undef PYQSHARE_CUT_AVX512
#endif  // PYQSHARE_CUT_X86

struct Scanner {
  const char* name;
  ScanFn scan;
};

inline constexpr Scanner kScalarScanner{"scalar", scan_scalar};
#ifdef PYQSHARE_CUT_X86
inline constexpr Scanner kSse2Scanner{"sse2", scan_sse2};
inline constexpr Scanner kAvx2Scanner{"avx2", scan_avx2};
inline constexpr Scanner kAvx512Scanner{"avx512", scan_avx512};

inline bool cpu_has_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("bmi2");
}

inline bool cpu_has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2");
}
#endif

// The fastest scanner this CPU runs.
inline const Scanner& best_scanner() {
#ifdef PYQSHARE_CUT_X86
  if (cpu_has_avx512()) return kAvx512Scanner;
  return cpu_has_avx2() ? kAvx2Scanner : kSse2Scanner;
#else
  return kScalarScanner;
#endif
}

// The scanner called `name` if this build and CPU can run it, else nullptr.
inline const Scanner* scanner_named(const char* name) {
  const auto is = [&](const char* s) { return std::strcmp(name, s) == 0; };
  if (is("scalar")) return &kScalarScanner;
#ifdef PYQSHARE_CUT_X86
  if (is("sse2")) return &kSse2Scanner;
  if (is("avx2") && cpu_has_avx2()) return &kAvx2Scanner;
  if (is("avx512") && cpu_has_avx512()) return &kAvx512Scanner;
#endif
  return nullptr;
}

}  // namespace pyqshare::cut
