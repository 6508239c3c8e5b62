// XXH3-128 with seed 0 and the default secret, implemented from the xxHash specification
// (doc/xxhash_spec.md, "XXH3 Algorithm Description"). Plain functions over a pointer and a length.
//
// The only hot path is the long-input accumulate/scramble loop; it comes in three interchangeable
// kernels (scalar reference, SSE2 which every x86-64 has, AVX2 chosen at run time). AVX2 code is
// confined to functions carrying __attribute__((target("avx2"))), so nothing else in the binary can
// end up containing AVX2 instructions.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define PYQSHARE_XXH3_X86 1
#include <immintrin.h>
#endif

namespace pyqshare::xxh3 {

// The 128-bit result as the spec names its halves; the canonical byte form is high then low, big-endian.
struct Hash128 {
  std::uint64_t low;
  std::uint64_t high;
};

inline void write_canonical(const Hash128& h, std::uint8_t out[16]) {
  for (int i = 0; i < 8; ++i) {
    out[i] = static_cast<std::uint8_t>(h.high >> (56 - 8 * i));
    out[8 + i] = static_cast<std::uint8_t>(h.low >> (56 - 8 * i));
  }
}

inline constexpr std::uint64_t kPrime32_1 = 0x9E3779B1U;
inline constexpr std::uint64_t kPrime32_2 = 0x85EBCA77U;
inline constexpr std::uint64_t kPrime32_3 = 0xC2B2AE3DU;
inline constexpr std::uint64_t kPrime64_1 = 0x9E3779B185EBCA87ULL;
inline constexpr std::uint64_t kPrime64_2 = 0xC2B2AE3D27D4EB4FULL;
inline constexpr std::uint64_t kPrime64_3 = 0x165667B19E3779F9ULL;
inline constexpr std::uint64_t kPrime64_4 = 0x85EBCA77C2B2AE63ULL;
inline constexpr std::uint64_t kPrime64_5 = 0x27D4EB2F165667C5ULL;
inline constexpr std::uint64_t kPrimeMx1 = 0x165667919E3779F9ULL;
inline constexpr std::uint64_t kPrimeMx2 = 0x9FB21C651E98DF25ULL;

inline constexpr std::size_t kSecretSize = 192;
alignas(64) inline constexpr std::uint8_t kSecret[kSecretSize] = {
    0xb8, 0xfe, 0x6c, 0x39, 0x23, 0xa4, 0x4b, 0xbe, 0x7c, 0x01, 0x81, 0x2c, 0xf7, 0x21, 0xad, 0x1c,
    0xde, 0xd4, 0x6d, 0xe9, 0x83, 0x90, 0x97, 0xdb, 0x72, 0x40, 0xa4, 0xa4, 0xb7, 0xb3, 0x67, 0x1f,
    0xcb, 0x79, 0xe6, 0x4e, 0xcc, 0xc0, 0xe5, 0x78, 0x82, 0x5a, 0xd0, 0x7d, 0xcc, 0xff, 0x72, 0x21,
    0xb8, 0x08, 0x46, 0x74, 0xf7, 0x43, 0x24, 0x8e, 0xe0, 0x35, 0x90, 0xe6, 0x81, 0x3a, 0x26, 0x4c,
    0x3c, 0x28, 0x52, 0xbb, 0x91, 0xc3, 0x00, 0xcb, 0x88, 0xd0, 0x65, 0x8b, 0x1b, 0x53, 0x2e, 0xa3,
    0x71, 0x64, 0x48, 0x97, 0xa2, 0x0d, 0xf9, 0x4e, 0x38, 0x19, 0xef, 0x46, 0xa9, 0xde, 0xac, 0xd8,
    0xa8, 0xfa, 0x76, 0x3f, 0xe3, 0x9c, 0x34, 0x3f, 0xf9, 0xdc, 0xbb, 0xc7, 0xc7, 0x0b, 0x4f, 0x1d,
    0x8a, 0x51, 0xe0, 0x4b, 0xcd, 0xb4, 0x59, 0x31, 0xc8, 0x9f, 0x7e, 0xc9, 0xd9, 0x78, 0x73, 0x64,
    0xea, 0xc5, 0xac, 0x83, 0x34, 0xd3, 0xeb, 0xc3, 0xc5, 0x81, 0xa0, 0xff, 0xfa, 0x13, 0x63, 0xeb,
    0x17, 0x0d, 0xdd, 0x51, 0xb7, 0xf0, 0xda, 0x49, 0xd3, 0x16, 0x55, 0x26, 0x29, 0xd4, 0x68, 0x9e,
    0x2b, 0x16, 0xbe, 0x58, 0x7d, 0x47, 0xa1, 0xfc, 0x8f, 0xf8, 0xb8, 0xd1, 0x7a, 0xd0, 0x31, 0xce,
    0x45, 0xcb, 0x3a, 0x8f, 0x95, 0x16, 0x04, 0x28, 0xaf, 0xd7, 0xfb, 0xca, 0xbb, 0x4b, 0x40, 0x7e,
};

inline constexpr std::size_t kStripeSize = 64;                           // 8 lanes of 8 bytes
inline constexpr std::size_t kStripesPerBlock = (kSecretSize - 64) / 8;  // 16
inline constexpr std::size_t kBlockSize = kStripeSize * kStripesPerBlock;  // 1024
inline constexpr std::size_t kScrambleSecretOffset = kSecretSize - 64;
inline constexpr std::size_t kLastStripeSecretOffset = kSecretSize - 71;
// The vector kernels prefetch this far ahead: on big buffers the loop is memory-bound, and the hardware
// prefetcher alone leaves it 5-10% short of a plain read (measured against a sum over the same memory).
inline constexpr std::size_t kPrefetchDistance = 384;

namespace detail {

inline std::uint32_t bswap32(std::uint32_t x) { return __builtin_bswap32(x); }
inline std::uint64_t bswap64(std::uint64_t x) { return __builtin_bswap64(x); }

// The spec reads every word little-endian, whatever the machine.
inline std::uint64_t read64(const std::uint8_t* p) {
  std::uint64_t v;
  std::memcpy(&v, p, 8);
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
  v = bswap64(v);
#endif
  return v;
}

inline std::uint32_t read32(const std::uint8_t* p) {
  std::uint32_t v;
  std::memcpy(&v, p, 4);
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
  v = bswap32(v);
#endif
  return v;
}

inline std::uint32_t rotl32(std::uint32_t x, int r) { return (x << r) | (x >> (32 - r)); }

struct Product128 {
  std::uint64_t lo;
  std::uint64_t hi;
};

__extension__ typedef unsigned __int128 uint128;  // GCC/Clang extension; __extension__ keeps -Wpedantic quiet

inline Product128 multiply_full(std::uint64_t a, std::uint64_t b) {
  const uint128 p = static_cast<uint128>(a) * b;
  return {static_cast<std::uint64_t>(p), static_cast<std::uint64_t>(p >> 64)};
}

// 64x64 -> 128 multiply folded back to 64 bits by xoring its halves.
inline std::uint64_t multiply_fold(std::uint64_t a, std::uint64_t b) {
  const Product128 p = multiply_full(a, b);
  return p.lo ^ p.hi;
}

inline std::uint64_t avalanche(std::uint64_t x) {
  x ^= x >> 37;
  x *= kPrimeMx1;
  return x ^ (x >> 32);
}

inline std::uint64_t avalanche_xxh64(std::uint64_t x) {
  x ^= x >> 33;
  x *= kPrime64_2;
  x ^= x >> 29;
  x *= kPrime64_3;
  return x ^ (x >> 32);
}

// ---- inputs of 0 to 16 bytes ----

inline Hash128 hash_empty() {
  const std::uint8_t* s = kSecret;
  return {avalanche_xxh64(read64(s + 64) ^ read64(s + 72)), avalanche_xxh64(read64(s + 80) ^ read64(s + 88))};
}

inline Hash128 hash_1to3(const std::uint8_t* p, std::size_t n) {
  const std::uint32_t combined = static_cast<std::uint32_t>(p[n - 1]) | (static_cast<std::uint32_t>(n) << 8) |
                                 (static_cast<std::uint32_t>(p[0]) << 16) |
                                 (static_cast<std::uint32_t>(p[n >> 1]) << 24);
  const std::uint8_t* s = kSecret;
  const std::uint64_t low = static_cast<std::uint64_t>(read32(s) ^ read32(s + 4)) ^ combined;
  const std::uint64_t high =
      static_cast<std::uint64_t>(read32(s + 8) ^ read32(s + 12)) ^ rotl32(bswap32(combined), 13);
  return {avalanche_xxh64(low), avalanche_xxh64(high)};
}

inline Hash128 hash_4to8(const std::uint8_t* p, std::size_t n) {
  const std::uint64_t first = read32(p);
  const std::uint64_t last = read32(p + n - 4);
  const std::uint64_t value = (read64(kSecret + 16) ^ read64(kSecret + 24)) ^ (first | (last << 32));
  const Product128 m = multiply_full(value, kPrime64_1 + (static_cast<std::uint64_t>(n) << 2));
  std::uint64_t high = m.hi + (m.lo << 1);
  std::uint64_t low = m.lo ^ (high >> 3);
  low ^= low >> 35;
  low *= kPrimeMx2;
  low ^= low >> 28;
  return {low, avalanche(high)};
}

inline Hash128 hash_9to16(const std::uint8_t* p, std::size_t n) {
  const std::uint8_t* s = kSecret + 32;
  const std::uint64_t first = read64(p);
  const std::uint64_t last = read64(p + n - 8);
  const std::uint64_t val1 = (read64(s) ^ read64(s + 8)) ^ first ^ last;
  const std::uint64_t val2 = (read64(s + 16) ^ read64(s + 24)) ^ last;
  const Product128 m = multiply_full(val1, kPrime64_1);
  std::uint64_t low = m.lo + (static_cast<std::uint64_t>(n - 1) << 54);
  std::uint64_t high = m.hi + (val2 & 0xFFFFFFFF00000000ULL) + (val2 & 0xFFFFFFFFULL) * kPrime32_2;
  low ^= bswap64(high);
  const Product128 m2 = multiply_full(low, kPrime64_2);
  return {avalanche(m2.lo), avalanche(m2.hi + high * kPrime64_2)};
}

// ---- inputs of 17 to 240 bytes ----

// One 16-byte piece of input against 16 bytes of secret.
inline std::uint64_t mix16(const std::uint8_t* data, const std::uint8_t* secret) {
  return multiply_fold(read64(data) ^ read64(secret), read64(data + 8) ^ read64(secret + 8));
}

// Two 16-byte pieces feed the two accumulators; each piece also perturbs the other accumulator.
inline void mix32(std::uint64_t acc[2], const std::uint8_t* a, const std::uint8_t* b, const std::uint8_t* secret) {
  acc[0] += mix16(a, secret);
  acc[1] += mix16(b, secret + 16);
  acc[0] ^= read64(b) + read64(b + 8);
  acc[1] ^= read64(a) + read64(a + 8);
}

inline Hash128 finish_medium(const std::uint64_t acc[2], std::size_t n) {
  const std::uint64_t low = acc[0] + acc[1];
  const std::uint64_t high = acc[0] * kPrime64_1 + acc[1] * kPrime64_4 + static_cast<std::uint64_t>(n) * kPrime64_2;
  return {avalanche(low), 0 - avalanche(high)};
}

// Pieces taken pairwise from both ends towards the middle, innermost pair first.
inline Hash128 hash_17to128(const std::uint8_t* p, std::size_t n) {
  std::uint64_t acc[2] = {static_cast<std::uint64_t>(n) * kPrime64_1, 0};
  const std::size_t rounds = ((n - 1) >> 5) + 1;
  for (std::size_t r = rounds; r-- > 0;) mix32(acc, p + 16 * r, p + n - 16 * r - 16, kSecret + 32 * r);
  return finish_medium(acc, n);
}

inline Hash128 hash_129to240(const std::uint8_t* p, std::size_t n) {
  std::uint64_t acc[2] = {static_cast<std::uint64_t>(n) * kPrime64_1, 0};
  for (std::size_t i = 0; i < 4; ++i) mix32(acc, p + 32 * i, p + 32 * i + 16, kSecret + 32 * i);
  acc[0] = avalanche(acc[0]);
  acc[1] = avalanche(acc[1]);
  const std::size_t pieces = n >> 5;
  for (std::size_t i = 4; i < pieces; ++i) mix32(acc, p + 32 * i, p + 32 * i + 16, kSecret + 32 * (i - 4) + 3);
  mix32(acc, p + n - 16, p + n - 32, kSecret + 103);  // the tail, halves swapped
  return finish_medium(acc, n);
}

// ---- inputs longer than 240 bytes: 8 accumulators over 64-byte stripes ----

inline std::uint64_t merge_accumulators(const std::uint64_t acc[8], std::uint64_t start, const std::uint8_t* secret) {
  std::uint64_t result = start;
  for (int i = 0; i < 4; ++i) {
    result += multiply_fold(acc[2 * i] ^ read64(secret + 16 * i), acc[2 * i + 1] ^ read64(secret + 16 * i + 8));
  }
  return avalanche(result);
}

// Scalar kernel, written exactly as the spec states the accumulate and scramble steps.
inline void accumulate_stripe_scalar(std::uint64_t acc[8], const std::uint8_t* stripe, const std::uint8_t* secret) {
  for (int i = 0; i < 8; ++i) {
    const std::uint64_t lane = read64(stripe + 8 * i);
    const std::uint64_t keyed = lane ^ read64(secret + 8 * i);
    acc[i ^ 1] += lane;
    acc[i] += (keyed & 0xFFFFFFFFULL) * (keyed >> 32);
  }
}

inline void scramble_scalar(std::uint64_t acc[8]) {
  const std::uint8_t* secret = kSecret + kScrambleSecretOffset;
  for (int i = 0; i < 8; ++i) {
    std::uint64_t a = acc[i];
    a ^= a >> 47;
    a ^= read64(secret + 8 * i);
    acc[i] = a * kPrime32_1;
  }
}

inline void stripes_scalar(std::uint64_t acc[8], const std::uint8_t* in, std::size_t n_stripes,
                           const std::uint8_t* secret) {
  for (std::size_t s = 0; s < n_stripes; ++s) accumulate_stripe_scalar(acc, in + s * kStripeSize, secret + 8 * s);
}

inline void blocks_scalar(std::uint64_t acc[8], const std::uint8_t* in, std::size_t n_blocks) {
  for (std::size_t b = 0; b < n_blocks; ++b) {
    stripes_scalar(acc, in + b * kBlockSize, kStripesPerBlock, kSecret);
    scramble_scalar(acc);
  }
}

#ifdef PYQSHARE_XXH3_X86

// SSE2 (baseline x86-64): one register holds two lanes. _mm_mul_epu32 multiplies the low 32 bits of each
// 64-bit lane, so the high half of the keyed lane is first shuffled down into the low half.
inline __m128i accumulate_pair_sse2(__m128i acc, __m128i data, __m128i key) {
  const __m128i keyed = _mm_xor_si128(data, key);
  const __m128i keyed_high = _mm_shuffle_epi32(keyed, _MM_SHUFFLE(3, 3, 1, 1));
  const __m128i product = _mm_mul_epu32(keyed, keyed_high);
  const __m128i data_swapped = _mm_shuffle_epi32(data, _MM_SHUFFLE(1, 0, 3, 2));  // lane i feeds acc[i ^ 1]
  return _mm_add_epi64(_mm_add_epi64(acc, data_swapped), product);
}

// acc * PRIME32_1 modulo 2^64 from two 32x32 products: lo*p + ((hi*p) << 32).
inline __m128i scramble_pair_sse2(__m128i acc, __m128i key) {
  const __m128i prime = _mm_set1_epi32(static_cast<int>(kPrime32_1));
  acc = _mm_xor_si128(_mm_xor_si128(acc, _mm_srli_epi64(acc, 47)), key);
  const __m128i low_product = _mm_mul_epu32(acc, prime);
  const __m128i high_product = _mm_mul_epu32(_mm_srli_epi64(acc, 32), prime);
  return _mm_add_epi64(low_product, _mm_slli_epi64(high_product, 32));
}

inline void stripes_sse2_regs(__m128i a[4], const std::uint8_t* in, std::size_t n_stripes,
                              const std::uint8_t* secret) {
  for (std::size_t s = 0; s < n_stripes; ++s) {
    const std::uint8_t* d = in + s * kStripeSize;
    const std::uint8_t* k = secret + 8 * s;
    __builtin_prefetch(d + kPrefetchDistance);
    for (int j = 0; j < 4; ++j) {
      a[j] = accumulate_pair_sse2(a[j], _mm_loadu_si128(reinterpret_cast<const __m128i*>(d + 16 * j)),
                                  _mm_loadu_si128(reinterpret_cast<const __m128i*>(k + 16 * j)));
    }
  }
}

inline void stripes_sse2(std::uint64_t acc[8], const std::uint8_t* in, std::size_t n_stripes,
                         const std::uint8_t* secret) {
  __m128i a[4];
  for (int j = 0; j < 4; ++j) a[j] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(acc + 2 * j));
  stripes_sse2_regs(a, in, n_stripes, secret);
  for (int j = 0; j < 4; ++j) _mm_storeu_si128(reinterpret_cast<__m128i*>(acc + 2 * j), a[j]);
}

inline void blocks_sse2(std::uint64_t acc[8], const std::uint8_t* in, std::size_t n_blocks) {
  __m128i a[4];
  for (int j = 0; j < 4; ++j) a[j] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(acc + 2 * j));
  const std::uint8_t* scramble_key = kSecret + kScrambleSecretOffset;
  for (std::size_t b = 0; b < n_blocks; ++b) {
    stripes_sse2_regs(a, in + b * kBlockSize, kStripesPerBlock, kSecret);
    for (int j = 0; j < 4; ++j) {
      a[j] = scramble_pair_sse2(a[j], _mm_loadu_si128(reinterpret_cast<const __m128i*>(scramble_key + 16 * j)));
    }
  }
  for (int j = 0; j < 4; ++j) _mm_storeu_si128(reinterpret_cast<__m128i*>(acc + 2 * j), a[j]);
}

// AVX2: the same steps on four lanes per register; the 64-bit halves swap within each 128-bit half,
// which is exactly the i ^ 1 pairing.
#define PYQSHARE_AVX2 __attribute__((target("avx2")))

PYQSHARE_AVX2 inline __m256i accumulate_quad_avx2(__m256i acc, __m256i data, __m256i key) {
  const __m256i keyed = _mm256_xor_si256(data, key);
  const __m256i keyed_high = _mm256_shuffle_epi32(keyed, _MM_SHUFFLE(3, 3, 1, 1));
  const __m256i product = _mm256_mul_epu32(keyed, keyed_high);
  const __m256i data_swapped = _mm256_shuffle_epi32(data, _MM_SHUFFLE(1, 0, 3, 2));
  return _mm256_add_epi64(_mm256_add_epi64(acc, data_swapped), product);
}

PYQSHARE_AVX2 inline __m256i scramble_quad_avx2(__m256i acc, __m256i key) {
  const __m256i prime = _mm256_set1_epi32(static_cast<int>(kPrime32_1));
  acc = _mm256_xor_si256(_mm256_xor_si256(acc, _mm256_srli_epi64(acc, 47)), key);
  const __m256i low_product = _mm256_mul_epu32(acc, prime);
  const __m256i high_product = _mm256_mul_epu32(_mm256_srli_epi64(acc, 32), prime);
  return _mm256_add_epi64(low_product, _mm256_slli_epi64(high_product, 32));
}

PYQSHARE_AVX2 inline void stripes_avx2_regs(__m256i& a0, __m256i& a1, const std::uint8_t* in, std::size_t n_stripes,
                                            const std::uint8_t* secret) {
  for (std::size_t s = 0; s < n_stripes; ++s) {
    const std::uint8_t* d = in + s * kStripeSize;
    const std::uint8_t* k = secret + 8 * s;
    __builtin_prefetch(d + kPrefetchDistance);
    a0 = accumulate_quad_avx2(a0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(d)),
                              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(k)));
    a1 = accumulate_quad_avx2(a1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(d + 32)),
                              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(k + 32)));
  }
}

PYQSHARE_AVX2 inline void stripes_avx2(std::uint64_t acc[8], const std::uint8_t* in, std::size_t n_stripes,
                                       const std::uint8_t* secret) {
  __m256i a0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(acc));
  __m256i a1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(acc + 4));
  stripes_avx2_regs(a0, a1, in, n_stripes, secret);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(acc), a0);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(acc + 4), a1);
}

PYQSHARE_AVX2 inline void blocks_avx2(std::uint64_t acc[8], const std::uint8_t* in, std::size_t n_blocks) {
  __m256i a0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(acc));
  __m256i a1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(acc + 4));
  const __m256i key0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kSecret + kScrambleSecretOffset));
  const __m256i key1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kSecret + kScrambleSecretOffset + 32));
  for (std::size_t b = 0; b < n_blocks; ++b) {
    stripes_avx2_regs(a0, a1, in + b * kBlockSize, kStripesPerBlock, kSecret);
    a0 = scramble_quad_avx2(a0, key0);
    a1 = scramble_quad_avx2(a1, key1);
  }
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(acc), a0);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(acc + 4), a1);
}

#undef PYQSHARE_AVX2
#endif  // PYQSHARE_XXH3_X86

}  // namespace detail

// One implementation of the long-input loop: `blocks` runs whole 1 KiB blocks (16 stripes, then a
// scramble); `stripes` accumulates n stripes with the secret advancing 8 bytes per stripe, no scramble.
struct LongKernel {
  const char* name;
  void (*blocks)(std::uint64_t acc[8], const std::uint8_t* in, std::size_t n_blocks);
  void (*stripes)(std::uint64_t acc[8], const std::uint8_t* in, std::size_t n_stripes, const std::uint8_t* secret);
};

inline constexpr LongKernel kScalarKernel{"scalar", detail::blocks_scalar, detail::stripes_scalar};
#ifdef PYQSHARE_XXH3_X86
inline constexpr LongKernel kSse2Kernel{"sse2", detail::blocks_sse2, detail::stripes_sse2};
inline constexpr LongKernel kAvx2Kernel{"avx2", detail::blocks_avx2, detail::stripes_avx2};
#endif

inline bool cpu_has_avx2() {
#ifdef PYQSHARE_XXH3_X86
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2");
#else
  return false;
#endif
}

// The fastest kernel this CPU runs.
inline const LongKernel& best_kernel() {
#ifdef PYQSHARE_XXH3_X86
  return cpu_has_avx2() ? kAvx2Kernel : kSse2Kernel;
#else
  return kScalarKernel;
#endif
}

// The kernel called `name` if this build and CPU can run it, else nullptr.
inline const LongKernel* kernel_named(const char* name) {
  const auto is = [&](const char* s) { return std::strcmp(name, s) == 0; };
  if (is("scalar")) return &kScalarKernel;
#ifdef PYQSHARE_XXH3_X86
  if (is("sse2")) return &kSse2Kernel;
  if (is("avx2") && cpu_has_avx2()) return &kAvx2Kernel;
#endif
  return nullptr;
}

// The long-input hash of one buffer, fed while its length is still unknown: absorb() takes the whole
// 1 KiB blocks that cannot be the input's last one, finish() does the rest once the length is known. The
// content-defined chunker hashes a chunk this way while scanning it, so its bytes are hashed from L1/L2.
class LongHashState {
 public:
  // Accumulates every block not yet taken that ends at or before `known_below`, where the caller knows
  // the input is longer than `known_below` bytes (so none of these blocks is the last one).
  void absorb(const std::uint8_t* p, std::size_t known_below, const LongKernel& kernel) {
    const std::size_t blocks = known_below / kBlockSize;
    if (blocks <= blocks_) return;
    kernel.blocks(acc_, p + blocks_ * kBlockSize, blocks - blocks_);
    blocks_ = blocks;
  }

  // XXH3-128 of the n > 240 bytes at p, of which absorb() has seen a prefix.
  Hash128 finish(const std::uint8_t* p, std::size_t n, const LongKernel& kernel) {
    // Every full block but the last one (which may be full too) gets accumulated and scrambled.
    const std::size_t full_blocks = (n - 1) / kBlockSize;
    kernel.blocks(acc_, p + blocks_ * kBlockSize, full_blocks - blocks_);
    blocks_ = full_blocks;
    const std::size_t tail_start = full_blocks * kBlockSize;
    kernel.stripes(acc_, p + tail_start, (n - tail_start - 1) / kStripeSize, kSecret);
    kernel.stripes(acc_, p + n - kStripeSize, 1, kSecret + kLastStripeSecretOffset);
    const std::uint64_t len = n;
    return {detail::merge_accumulators(acc_, len * kPrime64_1, kSecret + 11),
            detail::merge_accumulators(acc_, ~(len * kPrime64_2), kSecret + kSecretSize - 75)};
  }

 private:
  alignas(32) std::uint64_t acc_[8] = {kPrime32_3, kPrime64_1, kPrime64_2, kPrime64_3,
                                       kPrime64_4, kPrime32_2, kPrime64_5, kPrime32_1};
  std::size_t blocks_ = 0;
};

// XXH3-128 (seed 0, default secret) of n bytes at p, using `kernel` for inputs over 240 bytes.
inline Hash128 hash128(const void* data, std::size_t n, const LongKernel& kernel) {
  const auto* p = static_cast<const std::uint8_t*>(data);
  if (n <= 16) {
    if (n > 8) return detail::hash_9to16(p, n);
    if (n >= 4) return detail::hash_4to8(p, n);
    if (n > 0) return detail::hash_1to3(p, n);
    return detail::hash_empty();
  }
  if (n <= 128) return detail::hash_17to128(p, n);
  if (n <= 240) return detail::hash_129to240(p, n);
  return LongHashState().finish(p, n, kernel);
}

// The slow obvious version: the scalar long-input kernel, as the spec words it.
inline Hash128 hash128_reference(const void* data, std::size_t n) { return hash128(data, n, kScalarKernel); }

}  // namespace pyqshare::xxh3
