// Chunked hashing over one contiguous buffer: fixed-size chunks, content-defined chunks (gear hash,
// FastCDC-style), and one whole-buffer digest built as a one-level tree. Every result depends only on the
// bytes, never on the thread count: tasks write to slots fixed by their index.
#pragma once

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <vector>

#include "parallel.hpp"
#include "xxh3.hpp"

namespace pyqshare::hashing {

using xxh3::Hash128;
using xxh3::LongKernel;

// Chunks are grouped into tasks of about this many bytes, so tiny chunks do not cost one task each.
inline constexpr std::size_t kTaskBytes = std::size_t{1} << 20;

// Digests land as (high, low) pairs: row i of an (n, 2) uint64 array.
inline void store(const Hash128& h, std::uint64_t* row) {
  row[0] = h.high;
  row[1] = h.low;
}

// XXH3-128 of chunk i = [offsets[i], offsets[i] + lengths[i]) for every i, in parallel.
inline void hash_chunks(const std::uint8_t* data, const std::int64_t* offsets, const std::int64_t* lengths,
                        std::size_t count, const LongKernel& kernel, int num_threads, std::uint64_t* digests) {
  if (count == 0) return;
  // Chunks per task from the mean chunk length: tasks of roughly kTaskBytes, at least one chunk each.
  const std::size_t total = static_cast<std::size_t>(offsets[count - 1] + lengths[count - 1] - offsets[0]);
  const std::size_t mean = std::max<std::size_t>(1, total / count);
  const std::size_t per_task = std::max<std::size_t>(1, kTaskBytes / mean);
  parallel_for(n_chunks(count, per_task), num_threads, [&](std::size_t task) {
    const std::size_t end = std::min(count, (task + 1) * per_task);
    for (std::size_t i = task * per_task; i < end; ++i) {
      store(xxh3::hash128(data + offsets[i], static_cast<std::size_t>(lengths[i]), kernel), digests + 2 * i);
    }
  });
}

// ---- fixed-size chunks ----

inline std::size_t fixed_chunk_count(std::size_t n, std::size_t chunk_size) { return n_chunks(n, chunk_size); }

inline void fixed_chunk_layout(std::size_t n, std::size_t chunk_size, std::int64_t* offsets, std::int64_t* lengths) {
  const std::size_t count = fixed_chunk_count(n, chunk_size);
  for (std::size_t i = 0; i < count; ++i) {
    offsets[i] = static_cast<std::int64_t>(i * chunk_size);
    lengths[i] = static_cast<std::int64_t>(std::min(chunk_size, n - i * chunk_size));
  }
}

// ---- whole-buffer digest ----

// Buffers up to kLeafSize bytes: XXH3-128 of the bytes. Longer: the buffer is cut into kLeafSize leaves
// (the last shorter), and the digest is XXH3-128 of the leaves' 16-byte canonical (big-endian high, low)
// digests concatenated in order, followed by the total length as 8 little-endian bytes.
inline constexpr std::size_t kLeafSize = std::size_t{1} << 20;

inline Hash128 tensor_digest(const std::uint8_t* data, std::size_t n, const LongKernel& kernel, int num_threads) {
  if (n <= kLeafSize) return xxh3::hash128(data, n, kernel);
  const std::size_t leaves = n_chunks(n, kLeafSize);
  std::vector<std::uint8_t> tree((leaves * 16) + 8);
  parallel_for(leaves, num_threads, [&](std::size_t i) {
    const std::size_t start = i * kLeafSize;
    xxh3::write_canonical(xxh3::hash128(data + start, std::min(kLeafSize, n - start), kernel), &tree[16 * i]);
  });
  for (int b = 0; b < 8; ++b) tree[leaves * 16 + b] = static_cast<std::uint8_t>(static_cast<std::uint64_t>(n) >> (8 * b));
  return xxh3::hash128(tree.data(), tree.size(), kernel);
}

// ---- content-defined chunks ----
//
// Rolling gear hash over the whole buffer: h = (h << 1) + GEAR[byte], starting from 0 before byte 0. A
// byte's table value is shifted out after 64 more bytes, so h after byte i depends only on bytes
// i-63 .. i. Position e = i + 1 is a *strict* candidate if the top (b + 2) bits of h are all zero and a
// *loose* candidate if the top (b - 2) bits are, with b = floor(log2(average)) (FastCDC's normalised
// chunking, level 2; strict candidates are loose ones too). From a chunk start s the chunk ends at:
//   the first strict candidate e with s + min <= e < s + average, else
//   the first loose candidate e with s + average <= e <= s + max, else
//   s + max;
// and the rest of the buffer is the last chunk once it is no longer than that rule would allow (the
// last chunk is the only one that may be shorter than min). min = average / 4, max = 4 * average.
//
// GEAR[k] is the (k + 1)-th output of SplitMix64 seeded with 0x7079717368617265 ("pyqshare" in ASCII).

inline constexpr std::uint64_t kGearSeed = 0x7079717368617265ULL;
inline constexpr std::size_t kMinCdcAverage = 256;

inline constexpr std::array<std::uint64_t, 256> make_gear_table() {
  std::array<std::uint64_t, 256> table{};
  std::uint64_t state = kGearSeed;
  for (auto& entry : table) {
    state += 0x9E3779B97F4A7C15ULL;
    std::uint64_t z = state;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    entry = z ^ (z >> 31);
  }
  return table;
}

inline constexpr std::array<std::uint64_t, 256> kGear = make_gear_table();

struct CdcParams {
  std::size_t min_size;
  std::size_t average;
  std::size_t max_size;
  std::uint64_t strict_mask;
  std::uint64_t loose_mask;

  static CdcParams for_average(std::size_t average) {
    if (average < kMinCdcAverage) throw std::invalid_argument("cdc chunk_size must be >= 256");
    if (average > (std::size_t{1} << 58)) throw std::invalid_argument("cdc chunk_size is too large");
    int bits = 0;
    while ((average >> (bits + 1)) != 0) ++bits;  // floor(log2(average)), >= 8
    const auto top_bits = [](int k) { return ~std::uint64_t{0} << (64 - k); };
    return {average / 4, average, average * 4, top_bits(bits + 2), top_bits(bits - 2)};
  }
};

// Candidates are stored as (position << 1) | is_strict.
using Candidates = std::vector<std::uint64_t>;

inline std::uint64_t gear_step(std::uint64_t h, std::uint8_t byte) { return (h << 1) + kGear[byte]; }

// Every loose candidate e (see above) with first < e <= last, i.e. rolling-hash positions i in
// [first, last). The hash is warmed up on the 64 bytes before each starting point, which gives the same h
// as a scan from byte 0. The range is split into four lanes scanned in one loop so that four independent
// hash chains are in flight. The loop makes no calls (a call would push the hashes out of registers):
// hits go to a small stack buffer, emptied into the per-lane lists after each block.
inline void cdc_candidates_in(const std::uint8_t* data, std::size_t first, std::size_t last, const CdcParams& p,
                              Candidates& out) {
  constexpr std::size_t kWindow = 64;
  constexpr std::size_t kLanes = 4;
  constexpr std::size_t kBlock = 256;  // steps per block; each step can hit in every lane
  const std::uint64_t loose = p.loose_mask;
  const std::size_t lane_len = (last - first) / kLanes;
  const auto warm_hash = [&](std::size_t start) {
    std::uint64_t h = 0;
    for (std::size_t i = start >= kWindow ? start - kWindow : 0; i < start; ++i) h = gear_step(h, data[i]);
    return h;
  };
  std::uint64_t h0 = warm_hash(first), h1 = warm_hash(first + lane_len), h2 = warm_hash(first + 2 * lane_len),
                h3 = warm_hash(first + 3 * lane_len);
  const std::uint8_t* q0 = data + first;
  const std::uint8_t* q1 = q0 + lane_len;
  const std::uint8_t* q2 = q1 + lane_len;
  const std::uint8_t* q3 = q2 + lane_len;
  const std::uint8_t* const lane1_start = q1;
  const std::uint8_t* const lane2_start = q2;
  const std::uint8_t* const lane3_start = q3;

  Candidates later_lanes[kLanes - 1];  // lane 0 goes straight to out: lanes are in position order
  const auto keep = [&](const std::uint8_t* at, std::uint64_t h) {
    const std::size_t lane = (at >= lane1_start) + (at >= lane2_start) + (at >= lane3_start);
    const auto position = static_cast<std::uint64_t>(at - data) + 1;
    (lane == 0 ? out : later_lanes[lane - 1]).push_back((position << 1) | ((h & p.strict_mask) == 0 ? 1 : 0));
  };
  const std::uint8_t* hit_at[kLanes * kBlock];
  std::uint64_t hit_hash[kLanes * kBlock];
  const std::uint8_t* const lanes_end = lane1_start;
  while (q0 < lanes_end) {
    const std::uint8_t* const block_end = q0 + std::min<std::size_t>(kBlock, lanes_end - q0);
    std::size_t hits = 0;
    for (; q0 < block_end; ++q0, ++q1, ++q2, ++q3) {
      h0 = gear_step(h0, *q0);
      h1 = gear_step(h1, *q1);
      h2 = gear_step(h2, *q2);
      h3 = gear_step(h3, *q3);
      if ((h0 & loose) == 0) [[unlikely]] { hit_at[hits] = q0; hit_hash[hits++] = h0; }
      if ((h1 & loose) == 0) [[unlikely]] { hit_at[hits] = q1; hit_hash[hits++] = h1; }
      if ((h2 & loose) == 0) [[unlikely]] { hit_at[hits] = q2; hit_hash[hits++] = h2; }
      if ((h3 & loose) == 0) [[unlikely]] { hit_at[hits] = q3; hit_hash[hits++] = h3; }
    }
    for (std::size_t k = 0; k < hits; ++k) keep(hit_at[k], hit_hash[k]);
  }
  for (const std::uint8_t* const end = data + last; q3 < end; ++q3) {  // the last lane takes the remainder
    h3 = gear_step(h3, *q3);
    if ((h3 & loose) == 0) keep(q3, h3);
  }
  for (const auto& hits : later_lanes) out.insert(out.end(), hits.begin(), hits.end());
}

// Walks the per-segment candidate lists as one sorted sequence.
class CandidateCursor {
 public:
  explicit CandidateCursor(const std::vector<Candidates>& segments) : segments_(&segments) { settle(); }
  bool done() const { return segment_ == segments_->size(); }
  std::size_t position() const { return static_cast<std::size_t>((*segments_)[segment_][index_] >> 1); }
  bool strict() const { return ((*segments_)[segment_][index_] & 1) != 0; }
  void advance() {
    ++index_;
    settle();
  }

 private:
  void settle() {
    while (segment_ < segments_->size() && index_ == (*segments_)[segment_].size()) {
      ++segment_;
      index_ = 0;
    }
  }
  const std::vector<Candidates>* segments_;
  std::size_t segment_ = 0;
  std::size_t index_ = 0;
};

// Applies the min / average / max rules to the sorted candidates; returns every chunk's end.
inline std::vector<std::uint64_t> select_cuts(const std::vector<Candidates>& segments, std::size_t n,
                                              const CdcParams& p) {
  std::vector<std::uint64_t> ends;
  CandidateCursor next(segments);
  std::size_t start = 0;
  while (n - start > p.min_size) {
    while (!next.done() && next.position() < start + p.min_size) next.advance();
    std::size_t cut = 0;
    CandidateCursor k = next;
    for (; !k.done() && k.position() < start + p.average; k.advance()) {
      if (k.strict()) {
        cut = k.position();
        break;
      }
    }
    if (cut == 0 && !k.done() && k.position() <= start + p.max_size) cut = k.position();
    if (cut == 0 || cut >= n) {
      if (n - start <= p.max_size) break;  // the rest fits in one chunk
      cut = start + p.max_size;
    }
    ends.push_back(cut);
    start = cut;
  }
  if (start < n) ends.push_back(n);
  return ends;
}

// Content-defined chunk ends, found in parallel: the buffer is cut into segments whose candidates are
// collected independently (they depend on 64 bytes of context only), then the cuts are chosen in order.
inline std::vector<std::uint64_t> cdc_chunk_ends(const std::uint8_t* data, std::size_t n, const CdcParams& p,
                                                 int num_threads) {
  constexpr std::size_t kSegment = std::size_t{4} << 20;
  std::vector<Candidates> segments(n_chunks(n, kSegment));
  parallel_for(segments.size(), num_threads, [&](std::size_t s) {
    cdc_candidates_in(data, s * kSegment, std::min(n, (s + 1) * kSegment), p, segments[s]);
  });
  return select_cuts(segments, n, p);
}

// The slow obvious version: one pass, one hash chain, rules applied as bytes arrive.
inline std::vector<std::uint64_t> cdc_chunk_ends_reference(const std::uint8_t* data, std::size_t n,
                                                           const CdcParams& p) {
  std::vector<std::uint64_t> ends;
  std::uint64_t h = 0;
  std::size_t start = 0;
  for (std::size_t i = 0; i < n; ++i) {
    h = gear_step(h, data[i]);
    const std::size_t e = i + 1;
    const std::size_t size = e - start;
    if (e == n) break;
    const bool strict = (h & p.strict_mask) == 0;
    const bool loose = (h & p.loose_mask) == 0;
    if ((size >= p.min_size && size < p.average && strict) || (size >= p.average && loose) ||
        size == p.max_size) {
      ends.push_back(e);
      start = e;
    }
  }
  if (start < n) ends.push_back(n);
  return ends;
}

}  // namespace pyqshare::hashing
