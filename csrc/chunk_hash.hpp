// Chunked hashing over one contiguous buffer: fixed-size chunks, content-defined chunks (position hash,
// FastCDC-style cut rules), and one whole-buffer digest built as a one-level tree. Every result depends only on the
// bytes, never on the thread count: tasks write to slots fixed by their index.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <vector>

#include "cut_hash.hpp"
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
// Cut candidates come from the position hash H of cut_hash.hpp (16 bytes of context). With
// b = floor(log2(average)), position e is a *strict* candidate if the top (b + 2) bits of H(e) are zero
// and a *loose* candidate if the top (b - 2) bits are (FastCDC's normalised chunking, level 2). From a
// chunk start s the chunk ends at:
//   the first strict candidate e with s + min <= e < s + average, else
//   the first loose candidate e with s + average <= e <= s + max, else
//   s + max;
// and the rest of the buffer is the last chunk once it is no longer than that rule would allow (the
// last chunk is the only one that may be shorter than min; e = n is never a cut). min = average / 4,
// max = 4 * average. No position below s + min is ever looked at, so a single thread scans about 78% of
// the bytes; the parallel path scans them all.

inline constexpr std::size_t kMinCdcAverage = 256;

struct CdcParams {
  std::size_t min_size;
  std::size_t average;
  std::size_t max_size;
  int strict_bits;
  int loose_bits;

  static CdcParams for_average(std::size_t average) {
    if (average < kMinCdcAverage) throw std::invalid_argument("cdc chunk_size must be >= 256");
    if (average > (std::size_t{1} << 58)) throw std::invalid_argument("cdc chunk_size is too large");
    int bits = 0;
    while ((average >> (bits + 1)) != 0) ++bits;  // floor(log2(average)), >= 8
    return {average / 4, average, average * 4, bits + 2, bits - 2};
  }
};
static_assert(kMinCdcAverage / 4 >= cut::kWindow, "every cut candidate needs its 16 bytes of context");

// Where the chunk starting at s (with n - s > min) ends, scanning [s + min, ...) in steps and handing each
// scanned step to `on_step(scanned_end)`: the chunk is then known to be longer than scanned_end - s - 2
// (no cut below scanned_end, except the max-size cut s + max = scanned_end - 1 after the last step).
template <class OnStep>
std::size_t next_cut(const std::uint8_t* data, std::size_t n, std::size_t s, const CdcParams& p,
                     cut::ScanFn scan, OnStep&& on_step) {
  constexpr std::size_t kStep = std::size_t{16} << 10;  // scanned, then hashed while in L1/L2
  const std::size_t strict_end = std::min(s + p.average, n);
  const std::size_t loose_end = std::min(s + p.max_size + 1, n);
  for (std::size_t pos = s + p.min_size; pos < loose_end;) {
    const bool strict = pos < strict_end;
    const std::size_t stop = std::min(pos + kStep, strict ? strict_end : loose_end);
    const std::size_t found = scan(data, pos, stop, strict ? p.strict_bits : p.loose_bits);
    if (found < stop) return found;
    pos = stop;
    on_step(pos);
  }
  return n - s <= p.max_size ? n : s + p.max_size;
}

// One thread: chunk ends and their XXH3-128 digests in one pass over memory. Each chunk is hashed step
// by step right behind the scan (LongHashState), so its bytes come from cache the second time.
inline void cdc_chunk_and_hash(const std::uint8_t* data, std::size_t n, const CdcParams& p, cut::ScanFn scan,
                               const LongKernel& kernel, std::vector<std::uint64_t>& ends,
                               std::vector<Hash128>& digests) {
  for (std::size_t s = 0; s < n;) {
    xxh3::LongHashState state;
    const std::uint8_t* chunk = data + s;
    const std::size_t end = n - s <= p.min_size
                                ? n
                                : next_cut(data, n, s, p, scan, [&](std::size_t scanned) {
                                    state.absorb(chunk, scanned - s - 2, kernel);
                                  });
    const std::size_t length = end - s;
    digests.push_back(length > 240 ? state.finish(chunk, length, kernel) : xxh3::hash128(chunk, length, kernel));
    ends.push_back(end);
    s = end;
  }
}

// Candidates are stored as (position << 1) | is_strict.
using Candidates = std::vector<std::uint64_t>;

// Every loose candidate e with first <= e < last (16 <= first).
inline void cdc_candidates_in(const std::uint8_t* data, std::size_t first, std::size_t last, const CdcParams& p,
                              cut::ScanFn scan, Candidates& out) {
  for (std::size_t e = scan(data, first, last, p.loose_bits); e < last; e = scan(data, e + 1, last, p.loose_bits)) {
    out.push_back((static_cast<std::uint64_t>(e) << 1) | (cut::is_candidate_reference(data, e, p.strict_bits) ? 1 : 0));
  }
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

// Several threads: the buffer is cut into segments whose candidates are collected independently (they
// depend on 16 bytes of context only), then the cuts are chosen in order; the caller hashes the chunks.
inline std::vector<std::uint64_t> cdc_chunk_ends_parallel(const std::uint8_t* data, std::size_t n,
                                                          const CdcParams& p, cut::ScanFn scan, int num_threads) {
  constexpr std::size_t kSegment = std::size_t{4} << 20;
  std::vector<Candidates> segments(n_chunks(n, kSegment));
  parallel_for(segments.size(), num_threads, [&](std::size_t s) {
    // Positions below min_size are never cuts, and they lack the hash's context.
    const std::size_t first = std::max(s * kSegment, p.min_size);
    const std::size_t last = std::min(n, (s + 1) * kSegment);
    if (first < last) cdc_candidates_in(data, first, last, p, scan, segments[s]);
  });
  return select_cuts(segments, n, p);
}

// The slow obvious version: one pass, rules applied position by position with the reference hash.
inline std::vector<std::uint64_t> cdc_chunk_ends_reference(const std::uint8_t* data, std::size_t n,
                                                           const CdcParams& p) {
  std::vector<std::uint64_t> ends;
  std::size_t start = 0;
  for (std::size_t e = 1; e < n; ++e) {
    const std::size_t size = e - start;
    if (size < p.min_size) continue;
    if ((size < p.average && cut::is_candidate_reference(data, e, p.strict_bits)) ||
        (size >= p.average && cut::is_candidate_reference(data, e, p.loose_bits)) || size == p.max_size) {
      ends.push_back(e);
      start = e;
    }
  }
  if (start < n) ends.push_back(n);
  return ends;
}

}  // namespace pyqshare::hashing
