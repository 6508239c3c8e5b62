// 1-D k-means: the globally optimal clustering (sort + linear-per-layer DP) and a fast one (a summary of the
// data -> exact DP on summary groups -> exact DP within windows around its boundaries -> Lloyd iterations,
// exact on the summary -> one labelling pass over the data). Plain functions over caller-owned memory;
// see kmeans1d_dp.hpp for the DP itself.
#pragma once

#include <algorithm>
#include <array>
#include <cfloat>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <type_traits>
#include <vector>

#include "kmeans1d_dp.hpp"
#include "parallel.hpp"

namespace pyqshare {
namespace kmeans1d {

enum class Method { fast, optimal };

constexpr std::size_t kMaxClusters = 65536;
// Fixed chunk of every parallel pass: per-chunk partial sums reduced in chunk order give results that do
// not depend on the thread count.
constexpr std::size_t kChunk = std::size_t{1} << 16;
// Below this many values the fast method sorts; above it, it summarises the data in a histogram.
constexpr std::size_t kHistogramMinSize = std::size_t{1} << 19;
// Assignment passes over at least this many values use a bin -> label table instead of binary search.
constexpr std::size_t kLutMinSize = std::size_t{1} << 17;
// Histogram bins: the top 20 bits of the order key of float32(x - centre): sign, exponent and 11 mantissa
// bits, so a bin is 2^-11 relative wide around any magnitude of x - centre.
constexpr int kBinBits = 20;
constexpr int kBinShift = 32 - kBinBits;
constexpr std::size_t kBins = std::size_t{1} << kBinBits;
// Label tables use coarser bins (2^-9 relative): a small hot set in cache, few values in the bins that
// straddle a threshold.
constexpr int kLutBits = 18;
constexpr std::size_t kLutSize = std::size_t{1} << kLutBits;
// Bound on (clusters x summary points) for the DP of the fast method.
constexpr std::size_t kDpBudget = std::size_t{1} << 23;
constexpr int kMaxLloydIterations = 1000;
// Summary groups per cluster for the fast method's coarse DP: fine enough that the coarse optimum has the
// right global shape (how many clusters go to the tails), which window refinement cannot change. 32 left 4 of
// 4096 Student-t rows of 4096 values up to 0.042% above their optimum; 64 keeps every row within 0.0001%.
constexpr std::size_t kGroupsPerCluster = 64;

// ---------------------------------------------------------------------------------------------------------
// Order-preserving integer keys of floats (-0.0 must be turned into +0.0 first: it has its own key).

inline std::uint32_t order_key(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
inline std::uint64_t order_key(double d) {
  std::uint64_t u;
  std::memcpy(&u, &d, sizeof u);
  return (u & 0x8000000000000000ull) ? ~u : (u | 0x8000000000000000ull);
}
inline float float_from_key(std::uint32_t k) {
  const std::uint32_t u = (k & 0x80000000u) ? (k & 0x7fffffffu) : ~k;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline double double_from_key(std::uint64_t k) {
  const std::uint64_t u = (k & 0x8000000000000000ull) ? (k & 0x7fffffffffffffffull) : ~k;
  double d;
  std::memcpy(&d, &u, sizeof d);
  return d;
}
template <class T>
using KeyOf = std::conditional_t<std::is_same_v<T, float>, std::uint32_t, std::uint64_t>;
template <class T>
T value_from_key(KeyOf<T> k) {
  if constexpr (std::is_same_v<T, float>) {
    return float_from_key(k);
  } else {
    return double_from_key(k);
  }
}

// LSD radix sort, 8-bit digits, skipping digits that all keys share; idx (optional) is permuted alongside.
// Returns the buffer (keys or tmp) that holds the sorted keys; *idx_out likewise for the indices.
template <class K>
K* radix_sort(K* keys, K* tmp, std::size_t n, std::uint32_t* idx, std::uint32_t* idx_tmp,
              std::uint32_t** idx_out) {
  constexpr int kDigits = sizeof(K);
  std::array<std::array<std::size_t, 256>, kDigits> count{};  // on the stack: small rows are sorted by the thousand
  for (std::size_t i = 0; i < n; ++i) {
    const K k = keys[i];
    for (int d = 0; d < kDigits; ++d) ++count[d][(k >> (8 * d)) & 0xff];
  }
  K* src = keys;
  K* dst = tmp;
  std::uint32_t* isrc = idx;
  std::uint32_t* idst = idx_tmp;
  for (int d = 0; d < kDigits; ++d) {
    auto& c = count[d];
    if (n == 0 || c[(src[0] >> (8 * d)) & 0xff] == n) continue;
    std::size_t sum = 0;
    for (auto& x : c) {
      const std::size_t t = x;
      x = sum;
      sum += t;
    }
    for (std::size_t i = 0; i < n; ++i) {
      const std::size_t pos = c[(src[i] >> (8 * d)) & 0xff]++;
      dst[pos] = src[i];
      if (isrc) idst[pos] = isrc[i];
    }
    std::swap(src, dst);
    std::swap(isrc, idst);
  }
  if (idx_out) *idx_out = isrc;
  return src;
}

// Calls emit(value, weight) for each run of equal keys in sorted (ascending) whose weight is positive: the
// run's length, or with wbuf the sum of its members' weights wbuf[sorted_idx[...]].
template <class T, class K, class Emit>
void for_each_distinct(const K* sorted, std::size_t n, const double* wbuf, const std::uint32_t* sorted_idx,
                       Emit&& emit) {
  for (std::size_t i = 0; i < n;) {
    std::size_t j = i + 1;
    while (j < n && sorted[j] == sorted[i]) ++j;
    double weight = static_cast<double>(j - i);
    if (wbuf) {
      weight = 0;
      for (std::size_t t = i; t < j; ++t) weight += wbuf[sorted_idx[t]];
    }
    if (weight > 0) emit(static_cast<double>(value_from_key<T>(sorted[i])), weight);
    i = j;
  }
}

// ---------------------------------------------------------------------------------------------------------
// Where one clustering's values live in the flat array: n_seg segments of seg_len contiguous elements,
// seg_stride apart, starting at offset (an (outer, length, inner) view of a C-contiguous array).

struct RowGeometry {
  std::size_t offset = 0, n_seg = 1, seg_len = 0, seg_stride = 0;
  std::size_t size() const { return n_seg * seg_len; }
};

// Calls f(flat_index, count, element_index) for each contiguous run of elements [e0, e1) of the row.
template <class F>
void for_each_span(const RowGeometry& g, std::size_t e0, std::size_t e1, F&& f) {
  if (g.seg_len == 0) return;
  while (e0 < e1) {
    const std::size_t seg = e0 / g.seg_len, off = e0 % g.seg_len;
    const std::size_t len = std::min(g.seg_len - off, e1 - e0);
    f(g.offset + seg * g.seg_stride + off, len, e0);
    e0 += len;
  }
}

[[noreturn]] inline void throw_not_finite() {
  throw std::invalid_argument("x contains NaN or Inf; kmeans1d needs finite values (clean them first, e.g. with "
                              "np.nan_to_num, or drop them)");
}
[[noreturn]] inline void throw_bad_weight() {
  throw std::invalid_argument("sample_weight contains NaN, Inf or negative values; pass finite weights >= 0");
}

// ---------------------------------------------------------------------------------------------------------
// Distinct values with positive total weight, ascending, and their prefix sums (the DP's and Lloyd's input).

struct Points {
  std::vector<double> v;      // values
  std::vector<double> W, S1;  // prefix sums, size() + 1 entries (see PrefixView)
  double shift = 0;           // subtracted from values in S1 to limit cancellation

  std::size_t size() const { return v.size(); }
  PrefixView prefix() const { return {W.data(), S1.data(), v.size()}; }
  // Weighted mean of points [a, b), a < b, kept inside their range despite rounding.
  double mean(std::size_t a, std::size_t b) const {
    const double m = (S1[b] - S1[a]) / (W[b] - W[a]) + shift;
    return std::min(std::max(m, v[a]), v[b - 1]);
  }
};

// v and per-point weights w are filled; computes shift and the prefix sums.
inline void finish_points(Points& P, const std::vector<double>& w) {
  const std::size_t n = P.v.size();
  double sw = 0, swv = 0;
  for (std::size_t i = 0; i < n; ++i) {
    sw += w[i];
    swv += w[i] * P.v[i];
  }
  P.shift = n ? swv / sw : 0.0;
  P.W.assign(n + 1, 0.0);
  P.S1.assign(n + 1, 0.0);
  for (std::size_t i = 0; i < n; ++i) {
    P.W[i + 1] = P.W[i] + w[i];
    P.S1[i + 1] = P.S1[i] + w[i] * (P.v[i] - P.shift);
  }
}

// Sorts one row (and its weights) and collapses equal values. Throws on non-finite values or bad weights.
template <class T, class Wt>
Points sorted_points(const T* x, const Wt* weights, const RowGeometry& g) {
  using K = KeyOf<T>;
  const std::size_t n = g.size();
  std::vector<K> keys(n), tmp(n);
  std::vector<std::uint32_t> idx, idx_tmp;
  std::vector<double> wbuf;
  if (weights) {
    idx.resize(n);
    idx_tmp.resize(n);
    wbuf.resize(n);
  }
  for_each_span(g, 0, n, [&](std::size_t flat, std::size_t len, std::size_t e) {
    for (std::size_t t = 0; t < len; ++t) {
      const T v = x[flat + t];
      if (!std::isfinite(v)) throw_not_finite();
      keys[e + t] = order_key(static_cast<T>(v + T(0)));  // -0.0 -> +0.0
      if (weights) {
        const double wv = static_cast<double>(weights[flat + t]);
        if (!(wv >= 0) || !std::isfinite(wv)) throw_bad_weight();
        wbuf[e + t] = wv;
        idx[e + t] = static_cast<std::uint32_t>(e + t);
      }
    }
  });
  std::uint32_t* sorted_idx = nullptr;
  const K* sorted = radix_sort(keys.data(), tmp.data(), n, weights ? idx.data() : nullptr,
                               weights ? idx_tmp.data() : nullptr, &sorted_idx);
  Points P;
  P.v.resize(n);  // sized once, trimmed to the distinct values below (no regrowth)
  std::vector<double> w(n);
  std::size_t m = 0;
  for_each_distinct<T>(sorted, n, weights ? wbuf.data() : nullptr, sorted_idx, [&](double value, double weight) {
    P.v[m] = value;
    w[m] = weight;
    ++m;
  });
  P.v.resize(m);
  w.resize(m);
  finish_points(P, w);
  return P;
}

// ---------------------------------------------------------------------------------------------------------
// Fast method on points: group points into a summary, solve the DP exactly on the groups, then run Lloyd
// (exact on the points, O(k log n) per iteration thanks to the prefix sums) until assignments are stable.

// Group boundaries (in point indices) such that no group has weight * span^2 above a budget chosen to give
// between target/2 and 2 * target groups (and at least min_groups): narrow groups where data is dense, as
// k-means clusters are (their width goes as density^(-1/3)).
inline std::vector<std::size_t> summary_groups(const Points& P, std::size_t target, std::size_t min_groups) {
  const std::size_t n = P.size();
  std::vector<std::size_t> bounds;
  auto build = [&](double budget) {
    bounds.clear();
    bounds.push_back(0);
    std::size_t s = 0;
    for (std::size_t e = 1; e < n; ++e) {
      const double span = P.v[e] - P.v[s];
      if ((P.W[e + 1] - P.W[s]) * span * span > budget) {
        bounds.push_back(e);
        s = e;
      }
    }
    bounds.push_back(n);
    return bounds.size() - 1;
  };
  if (n <= target) {
    for (std::size_t i = 0; i <= n; ++i) bounds.push_back(i);
    return bounds;
  }
  const double span = P.v[n - 1] - P.v[0];
  double budget = P.W[n] * span * span / (static_cast<double>(target) * target * target);
  for (int it = 0; it < 24; ++it) {
    const std::size_t G = build(budget);
    if (G >= min_groups && 2 * G >= target && G <= 2 * target) return bounds;
    // Groups scale as budget^(-1/3) for smooth densities.
    const double ratio = static_cast<double>(G) / static_cast<double>(target);
    budget *= std::min(std::max(ratio * ratio * ratio, 1e-3), 1e3);
  }
  if (build(budget) >= min_groups) return bounds;
  bounds.clear();
  for (std::size_t i = 0; i <= n; ++i) bounds.push_back(i);
  return bounds;
}

// Initial cluster bounds for the fast method (k < P.size()).
inline std::vector<std::size_t> fast_initial_bounds(const Points& P, std::size_t k) {
  const std::size_t target = std::max<std::size_t>(kGroupsPerCluster * k, 256);
  std::vector<std::size_t> bounds(k + 1);
  if (2 * k * k <= kDpBudget) {
    const std::size_t M = std::max(std::min(target, kDpBudget / k), 2 * k);
    const std::vector<std::size_t> gb = summary_groups(P, M, k);
    const std::size_t G = gb.size() - 1;
    std::vector<double> gW(G + 1), gS(G + 1);
    for (std::size_t g = 0; g <= G; ++g) {
      gW[g] = P.W[gb[g]];
      gS[g] = P.S1[gb[g]];
    }
    OptimalPartitioner part(PrefixView{gW.data(), gS.data(), G});
    part.solve(k, bounds.data());
    for (auto& b : bounds) b = gb[b];
  } else {
    // Too many clusters for a DP: about 2 groups per cluster, taken in equal runs.
    const std::vector<std::size_t> gb = summary_groups(P, 2 * k, k);
    const std::size_t G = gb.size() - 1;
    for (std::size_t c = 0; c <= k; ++c) bounds[c] = gb[c * G / k];
  }
  return bounds;
}

// Moves the boundaries to the optimal partition among those whose boundaries lie within windows around
// the current ones (a quarter of the neighbouring clusters on each side), re-centring while a boundary
// ends on a window edge. From the coarse DP's start this reaches the optimum of the points in practice,
// where plain Lloyd stalls in a local optimum on heavy-tailed data.
inline void refine_in_windows(const Points& P, std::size_t k, std::vector<std::size_t>& bounds) {
  const std::size_t n = P.size();
  std::vector<std::size_t> lo(k + 1), hi(k + 1);
  for (int round = 0; round < 8; ++round) {
    lo[0] = hi[0] = 0;
    lo[k] = hi[k] = n;
    for (std::size_t c = 1; c < k; ++c) {
      const std::size_t r = std::max<std::size_t>(2, (bounds[c + 1] - bounds[c - 1]) / 4);
      lo[c] = std::max(std::max(c, bounds[c] > r ? bounds[c] - r : 0), lo[c - 1]);
      hi[c] = std::min(n - (k - c), bounds[c] + r);
    }
    for (std::size_t c = k - 1; c >= 1; --c) hi[c] = std::min(hi[c], hi[c + 1]);
    windowed_partition(P.prefix(), k, lo, hi, bounds.data());
    bool on_edge = false;
    for (std::size_t c = 1; c < k; ++c) {
      on_edge |= (bounds[c] == lo[c] && lo[c] > c) || (bounds[c] == hi[c] && hi[c] < n - (k - c));
    }
    if (!on_edge) break;
  }
}

// Lloyd iterations on points from non-empty initial bounds; returns the centroids at the fixed point (an
// empty cluster keeps its last centroid, which stays between its neighbours).
inline std::vector<double> lloyd(const Points& P, std::size_t k, std::vector<std::size_t> bounds) {
  std::vector<double> mu(k);
  for (std::size_t c = 0; c < k; ++c) mu[c] = P.mean(bounds[c], bounds[c + 1]);
  std::vector<std::size_t> next(bounds);
  for (int it = 0; it < kMaxLloydIterations; ++it) {
    for (std::size_t c = 1; c < k; ++c) {
      const double t = 0.5 * (mu[c - 1] + mu[c]);  // values <= t go to the lower cluster
      next[c] = static_cast<std::size_t>(std::upper_bound(P.v.begin() + next[c - 1], P.v.end(), t) - P.v.begin());
    }
    if (next == bounds) break;
    bounds = next;
    for (std::size_t c = 0; c < k; ++c) {
      if (bounds[c] < bounds[c + 1]) mu[c] = P.mean(bounds[c], bounds[c + 1]);
    }
  }
  return mu;
}

// Centroids (ascending, as doubles) of the points: optimal or fast. k >= distinct values: every distinct
// value is a centroid and the last one is repeated to fill k; no points: all zeros.
inline std::vector<double> centroids_of(const Points& P, std::size_t k, Method method) {
  const std::size_t n = P.size();
  std::vector<double> mu(k, 0.0);
  if (n == 0) return mu;
  if (n <= k) {
    for (std::size_t c = 0; c < k; ++c) mu[c] = P.v[std::min(c, n - 1)];
    return mu;
  }
  // Fast on data no larger than its summary would be: the exact DP is the cheaper route.
  const bool summary_is_data = 2 * k * k <= kDpBudget && n <= std::max<std::size_t>(kGroupsPerCluster * k, 256);
  if (method == Method::optimal || summary_is_data) {
    std::vector<std::size_t> bounds(k + 1);
    OptimalPartitioner(P.prefix()).solve(k, bounds.data());
    for (std::size_t c = 0; c < k; ++c) mu[c] = P.mean(bounds[c], bounds[c + 1]);
    return mu;
  }
  std::vector<std::size_t> bounds = fast_initial_bounds(P, k);
  refine_in_windows(P, k, bounds);
  return lloyd(P, k, bounds);
}

// ---------------------------------------------------------------------------------------------------------
// Binning by the order key of float32(x - centre). The map x -> float32(x - centre) is monotone, so a bin
// whose keys all lie below (above) the keys a threshold t can have holds only values below (above) t: only
// the bins around t need exact comparisons.

template <class T>
struct Binner {
  T centre;
  // float data: one float subtraction (correctly rounded); double data: rounded to double, then to float.
  std::uint32_t key(T x) const {
    if constexpr (std::is_same_v<T, float>) {
      return order_key(x - centre);
    } else {
      return order_key(static_cast<float>(x - centre));
    }
  }
  // Keys a value equal to the double t may have: computing t - centre in double and rounding to float is
  // within one float step of the correctly rounded float difference, so widen by one key each way.
  void key_range(double t, std::uint32_t& lo, std::uint32_t& hi) const {
    const std::uint32_t k = order_key(static_cast<float>(t - static_cast<double>(centre)));
    lo = k > 0 ? k - 1 : k;
    hi = k < 0xffffffffu ? k + 1 : k;
  }
};

// Median of an evenly strided sample of the row's finite values (0 if none): the centre of the bins.
template <class T>
T sample_centre(const T* x, const RowGeometry& g) {
  const std::size_t n = g.size();
  const std::size_t s = std::min<std::size_t>(n, 4095);
  std::vector<T> sample;
  sample.reserve(s);
  for (std::size_t i = 0; i < s; ++i) {
    const std::size_t e = i * n / s;
    const T v = x[g.offset + (e / g.seg_len) * g.seg_stride + e % g.seg_len];
    if (std::isfinite(v)) sample.push_back(v);
  }
  if (sample.empty()) return T(0);
  std::nth_element(sample.begin(), sample.begin() + sample.size() / 2, sample.end());
  return sample[sample.size() / 2];
}

// Bin -> label table for thresholds t (ascending): in the low 16 bits the number of thresholds whose
// possible bins all lie below, plus kStraddle when the bin may hold a threshold (then comparisons finish).
// threshold_bins receives each threshold's (first, last) possible bin.
constexpr std::uint32_t kStraddle = 0x80000000u;

template <class T>
void build_label_table(const Binner<T>& binner, const std::vector<double>& t, std::vector<std::uint32_t>& table,
                       std::vector<std::uint32_t>& threshold_bins) {
  const std::size_t nt = t.size();
  table.resize(kLutSize);
  threshold_bins.resize(2 * nt);
  for (std::size_t c = 0; c < nt; ++c) {
    std::uint32_t lo, hi;
    binner.key_range(t[c], lo, hi);
    threshold_bins[2 * c] = lo >> (32 - kLutBits);
    threshold_bins[2 * c + 1] = hi >> (32 - kLutBits);
  }
  std::size_t j = 0;
  for (std::uint32_t b = 0; b < kLutSize; ++b) {
    while (j < nt && threshold_bins[2 * j + 1] < b) ++j;
    const bool straddle = j < nt && threshold_bins[2 * j] <= b;
    table[b] = static_cast<std::uint32_t>(j) | (straddle ? kStraddle : 0u);
  }
}

// Thresholds between neighbouring centroids (ascending): values <= t[c] are nearer to some centroid <= c.
// Inside a run of equal centroids the threshold is the one after the run (+inf for a final run), so a
// value goes to the lowest index of the nearest value.
inline std::vector<double> thresholds_of(const std::vector<double>& mu) {
  const std::size_t k = mu.size();
  std::vector<double> t(k > 0 ? k - 1 : 0, INFINITY);
  for (std::size_t c = k - 1; c-- > 0;) {
    t[c] = mu[c + 1] > mu[c] ? 0.5 * (mu[c] + mu[c + 1]) + 0.0 : (c + 1 < k - 1 ? t[c + 1] : INFINITY);
  }
  return t;
}

// Label of x: number of thresholds strictly below it (x exactly on a midpoint goes to the lower centroid).
// Branchless (conditional moves): labels of random data defeat branch prediction.
inline std::uint32_t label_by_search(const double* t, std::size_t nt, double x) {
  if (nt == 0) return 0;
  const double* p = t;
  while (nt > 1) {
    const std::size_t half = nt / 2;
    p += static_cast<std::size_t>(p[half - 1] < x) * half;
    nt -= half;
  }
  return static_cast<std::uint32_t>((p - t) + (p[0] < x));
}

// ---------------------------------------------------------------------------------------------------------
// Final pass: labels of every value (nearest centroid, ties to the lower index) and the inertia
// sum(w * (x - centroid)^2) in float64, per fixed chunk and reduced in chunk order.

template <class T, class Wt, class L>
double assign_labels(const T* x, const Wt* weights, L* labels, const RowGeometry& g, const std::vector<double>& mu,
                     int num_threads) {
  const std::size_t n = g.size(), k = mu.size();
  const std::vector<double> t = thresholds_of(mu);
  const bool use_table = n >= kLutMinSize && k > 2;
  std::vector<std::uint32_t> table, tbins;
  const Binner<T> binner{use_table ? sample_centre(x, g) : T(0)};
  if (use_table) build_label_table(binner, t, table, tbins);
  const std::size_t n_chunks = pyqshare::n_chunks(n, kChunk);
  std::vector<double> partial(n_chunks, 0.0);
  parallel_for(n_chunks, num_threads, [&](std::size_t ch) {
    double acc[4] = {0, 0, 0, 0};  // independent adds: no 4-cycle dependency chain per value
    for_each_span(g, ch * kChunk, std::min(n, (ch + 1) * kChunk), [&](std::size_t flat, std::size_t len, std::size_t e) {
      for (std::size_t i = flat; i < flat + len; ++i) {
        const double xv = static_cast<double>(x[i]);
        std::uint32_t l;
        if (use_table) {
          const std::uint32_t entry = table[binner.key(x[i]) >> (32 - kLutBits)];
          l = entry & 0xffffu;
          if (entry & kStraddle) {
            while (l < k - 1 && xv > t[l]) ++l;
          }
        } else {
          l = label_by_search(t.data(), t.size(), xv);
        }
        labels[i] = static_cast<L>(l);
        const double d = xv - mu[l];
        acc[(e + i - flat) & 3] += weights ? static_cast<double>(weights[i]) * d * d : d * d;
      }
    });
    partial[ch] = (acc[0] + acc[1]) + (acc[2] + acc[3]);
  });
  double inertia = 0;
  for (double p : partial) inertia += p;
  return inertia;
}

// ---------------------------------------------------------------------------------------------------------
// Fast method on large unweighted rows: a histogram of 2^20 bins (2^-11 relative wide around the median)
// becomes one point per non-empty bin, at the bin's exact mean, for the fast solver. Returns false when
// the sorted path must be used instead (few occupied bins, or a range that float32 cannot bin).

struct Histogram {
  std::vector<std::uint64_t> count;
  std::vector<std::uint64_t> low;  // sum of the 12 low key bits: the exact offset of each value in its bin
};

template <class T>
bool histogram_points(const T* x, const RowGeometry& g, const Binner<T>& binner, std::size_t k, int num_threads,
                      Points& P) {
  const double centre = static_cast<double>(binner.centre);
  const std::size_t n = g.size();
  const std::size_t n_chunks = pyqshare::n_chunks(n, kChunk);
  const std::size_t n_tasks = std::max<std::size_t>(1, std::min<std::size_t>(n_chunks, num_threads));
  // Integer histograms: merging them in any grouping gives identical totals, so tasks may follow threads.
  std::vector<Histogram> hist(n_tasks);
  std::vector<double> lo(n_tasks, INFINITY), hi(n_tasks, -INFINITY);
  parallel_for(n_tasks, num_threads, [&](std::size_t task) {
    Histogram& h = hist[task];
    h.count.assign(kBins, 0);
    h.low.assign(kBins, 0);
    // One packed counter per bin (count << 32 | low-bit sum) halves the random memory traffic; it cannot
    // overflow within a block of 2^20 values, after which the touched bins are flushed to the totals.
    std::vector<std::uint64_t> packed(kBins, 0);
    double mn = INFINITY, mx = -INFINITY;
    const std::size_t c0 = task * n_chunks / n_tasks, c1 = (task + 1) * n_chunks / n_tasks;
    const std::size_t e_end = std::min(n, c1 * kChunk);
    constexpr std::size_t kBlock = std::size_t{1} << 20;
    for (std::size_t b0 = c0 * kChunk; b0 < e_end; b0 += kBlock) {
      double bmn = INFINITY, bmx = -INFINITY;
      for_each_span(g, b0, std::min(e_end, b0 + kBlock), [&](std::size_t flat, std::size_t len, std::size_t) {
        for (std::size_t i = flat; i < flat + len; ++i) {
          const double xv = static_cast<double>(x[i]);
          if (!std::isfinite(xv)) throw_not_finite();
          bmn = std::min(bmn, xv);
          bmx = std::max(bmx, xv);
          const std::uint32_t key = binner.key(x[i]);
          packed[key >> kBinShift] += (std::uint64_t{1} << 32) | (key & ((1u << kBinShift) - 1));
        }
      });
      // Touched bins lie between those of the block's extremes (one more each side: -0.0 and +0.0 have
      // neighbouring keys but compare equal).
      const std::size_t b_lo = binner.key(static_cast<T>(bmn)) >> kBinShift, b_hi = binner.key(static_cast<T>(bmx)) >> kBinShift;
      for (std::size_t b = b_lo > 0 ? b_lo - 1 : 0; bmn <= bmx && b <= std::min(b_hi + 1, kBins - 1); ++b) {
        h.count[b] += packed[b] >> 32;
        h.low[b] += packed[b] & 0xffffffffu;
        packed[b] = 0;
      }
      mn = std::min(mn, bmn);
      mx = std::max(mx, bmx);
    }
    lo[task] = mn;
    hi[task] = mx;
  });
  const double mn = *std::min_element(lo.begin(), lo.end()), mx = *std::max_element(hi.begin(), hi.end());
  // float32(x - centre) must not saturate, or bins would lose the values' order information.
  if (mx - centre > 1e37 || centre - mn > 1e37) return false;
  Histogram& h = hist[0];
  for (std::size_t task = 1; task < n_tasks; ++task) {
    for (std::size_t b = 0; b < kBins; ++b) {
      h.count[b] += hist[task].count[b];
      h.low[b] += hist[task].low[b];
    }
    std::vector<std::uint64_t>().swap(hist[task].count);
    std::vector<std::uint64_t>().swap(hist[task].low);
  }
  std::size_t nonempty = 0;
  for (std::size_t b = 0; b < kBins; ++b) nonempty += h.count[b] != 0;
  if (nonempty <= 2 * k) return false;  // few bins: maybe few distinct values, which the sorted path handles exactly
  P.v.clear();
  P.v.reserve(nonempty);
  std::vector<double> w;
  w.reserve(nonempty);
  for (std::uint32_t b = 0; b < kBins; ++b) {
    if (!h.count[b]) continue;
    const double first = float_from_key(b << kBinShift);
    const double step = static_cast<double>(float_from_key((b << kBinShift) + 1)) - first;
    const double mean_offset = static_cast<double>(h.low[b]) / static_cast<double>(h.count[b]);
    P.v.push_back(centre + (first + mean_offset * step));
    w.push_back(static_cast<double>(h.count[b]));
  }
  finish_points(P, w);
  return true;
}

template <class T>
std::vector<double> rounded_sorted(const std::vector<double>& mu) {
  std::vector<double> r(mu.size());
  for (std::size_t c = 0; c < mu.size(); ++c) r[c] = static_cast<double>(static_cast<T>(mu[c]));
  std::sort(r.begin(), r.end());
  return r;
}

// ---------------------------------------------------------------------------------------------------------
// One clustering of the values of a row: centroids (k, ascending, in T), labels (through g), inertia.

template <class T, class Wt, class L>
void cluster_row(const T* x, const Wt* weights, L* labels, const RowGeometry& g, std::size_t k, Method method,
                 int num_threads, T* centroids, double* inertia) {
  const std::size_t n = g.size();
  if (k < 1 || k > kMaxClusters) throw std::invalid_argument("k must be in [1, 65536]");
  if (n >= (std::size_t{1} << 32)) throw std::invalid_argument("kmeans1d handles at most 2^32 - 1 values per clustering");
  std::vector<double> mu;
  if (method == Method::fast && !weights && n >= kHistogramMinSize) {
    const Binner<T> binner{sample_centre(x, g)};
    Points P;
    if (histogram_points(x, g, binner, k, num_threads, P)) {
      mu = rounded_sorted<T>(centroids_of(P, k, Method::fast));
      *inertia = assign_labels<T, T, L>(x, nullptr, labels, g, mu, num_threads);
      for (std::size_t c = 0; c < k; ++c) centroids[c] = static_cast<T>(mu[c]);
      return;
    }
  }
  const Points P = sorted_points(x, weights, g);
  mu = rounded_sorted<T>(centroids_of(P, k, method));
  for (std::size_t c = 0; c < k; ++c) centroids[c] = static_cast<T>(mu[c]);
  *inertia = assign_labels(x, weights, labels, g, mu, num_threads);
}

}  // namespace kmeans1d
}  // namespace pyqshare
