// Fast method for one small row (up to kSmallRowMax values), as used per channel: everything lives in a
// per-thread scratch reused across rows (no allocation once it has grown), and the partition comes from a
// banded exact DP instead of a fine summary.
//
// 1. Sort the row's order keys (radix), collapse equal values, prefix sums in double.
// 2. Coarse DP on ~16 summary groups per cluster, forward and backward, keeping every layer: for boundary c
//    at group edge e, D_c(e) + B_{k-c}(e) is the best coarse cost of any partition with that boundary there.
// 3. Band of boundary c: every group edge whose best coarse cost is within a margin of the coarse optimum
//    (widened by one group each side). A partition that respects groups has its true cost equal to its
//    coarse cost plus a constant, so the only error in the coarse costs is that of rounding boundaries to
//    group edges; the margin covers it, so the bands hold the optimal partition's boundaries, including
//    those of competing shapes (one cluster more in one tail, one fewer in the other).
// 4. Exact DP over the points restricted to the bands (linear in the band sizes), re-centred if a boundary
//    ends on a band edge; then Lloyd on the points to a fixed point of nearest-centroid assignment.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <vector>

#include "kmeans1d.hpp"
#include "kmeans1d_dp.hpp"
#include "parallel.hpp"

namespace pyqshare {
namespace kmeans1d {

// Rows up to this many values take the small-row path (per-thread scratch stays in L2).
constexpr std::size_t kSmallRowMax = std::size_t{1} << 16;
// Coarse groups per cluster of the banded path, and at least kBandMinGroups in all: with few clusters, 8
// groups each were too coarse (k=4 on 384-value MiniLM rows landed 0.22% above the optimum).
constexpr std::size_t kBandGroupsPerCluster = 8;
constexpr std::size_t kBandMinGroups = 128;
// Band margin, relative to the coarse optimum's cost: covers the cost of rounding the optimal boundaries to
// the edges of 8-per-cluster groups. On 1024 Student-t rows of 4096 values (k=16), 2e-3 left a row 0.035%
// above its optimum and 6e-3 kept every row optimal; 8e-3 leaves headroom.
constexpr double kBandMargin = 8e-3;
// Largest k the banded path takes: its coarse tables hold k x 16 k entries.
constexpr std::size_t kBandMaxClusters = 64;

// Whether a row of n values with k clusters takes the banded path (else the general one).
inline bool banded_path_fits(std::size_t n, std::size_t k) {
  return k >= 2 && k <= kBandMaxClusters && n <= kSmallRowMax &&
         n > std::max<std::size_t>(kGroupsPerCluster * k, 256);
}

struct RowScratch {
  std::vector<std::uint32_t> keys32, keys32_tmp;
  std::vector<std::uint64_t> keys64, keys64_tmp;
  std::vector<std::uint32_t> idx, idx_tmp;
  std::vector<double> wbuf;
  // Points: distinct values with positive weight and prefix sums (n + 1 entries).
  std::vector<double> v, W, S1;
  // Coarse summary.
  std::vector<std::size_t> groups;
  std::vector<double> gW, gS, gWr, gSr, fwd, bwd;
  // DP scratch.
  std::vector<std::uint32_t> arg;
  std::vector<double> e;
  std::vector<std::size_t> lo, hi, off, bounds, next;
  std::vector<double> mu, t, wpt;
  // inv[m] = 1 / m, for rows whose weights are counts (W integer-valued, at most inv.size() - 1 in total).
  std::vector<double> inv;
  bool integer_weights = false;

  void use_counts(std::size_t n) {
    integer_weights = true;
    for (std::size_t m = inv.size(); m <= n; ++m) inv.push_back(m ? 1.0 / static_cast<double>(m) : 0.0);
  }

  template <class K>
  std::vector<K>& keys() {
    if constexpr (sizeof(K) == 4) {
      return keys32;
    } else {
      return keys64;
    }
  }
  template <class K>
  std::vector<K>& keys_tmp() {
    if constexpr (sizeof(K) == 4) {
      return keys32_tmp;
    } else {
      return keys64_tmp;
    }
  }

  template <class V>
  static void grow(V& vec, std::size_t n) {
    if (vec.size() < n) vec.resize(n);
  }
};

// A stretch of a DP layer stored from data[0] but indexed by absolute positions first, first + 1, ...
// (a pointer moved below its array would be undefined behaviour).
template <class T>
struct Band {
  T* data;
  std::size_t first;
  T& operator[](std::size_t position) const { return data[position - first]; }
};

// Row-minima of one DP layer over positions: for rows j in [r_lo, r_hi], cur[j] = min over columns i in
// [c_lo, c_hi], i < j, of prev[i] - gain(i, j) (leftmost on ties), argmin to arg[j]. Prefix sums w, s.
// The argmin is non-decreasing in j (the matrix is totally monotone), so divide and conquer: the middle
// row's argmin splits the columns of the rows above and below. O((rows + cols) log rows) evaluations in
// plain loops: measured as fast as SMAWK (kmeans1d_dp.hpp) at these sizes, and simpler.
template <bool kIntegerWeights>
void dp_rows(const double* w, const double* s, Band<const double> prev, std::size_t r_lo, std::size_t r_hi,
             std::size_t c_lo, std::size_t c_hi, Band<double> cur, Band<std::uint32_t> arg, const double* inv) {
  if (r_lo > r_hi) return;
  const std::size_t j = r_lo + (r_hi - r_lo) / 2;
  const std::size_t last = std::min(c_hi, j - 1);
  std::size_t best_i = c_lo;
  double best = std::numeric_limits<double>::infinity();
  const double sj = s[j], wj = w[j];
  for (std::size_t i = c_lo; i <= last && i < j; ++i) {
    const double d = sj - s[i];
    double v;
    if constexpr (kIntegerWeights) {
      v = prev[i] - d * d * inv[static_cast<std::int64_t>(wj - w[i])];
    } else {
      v = prev[i] - d * d / (wj - w[i]);
    }
    if (v < best) {
      best = v;
      best_i = i;
    }
  }
  cur[j] = best;
  arg[j] = static_cast<std::uint32_t>(best_i);
  if (j > r_lo) dp_rows<kIntegerWeights>(w, s, prev, r_lo, j - 1, c_lo, best_i, cur, arg, inv);
  dp_rows<kIntegerWeights>(w, s, prev, j + 1, r_hi, best_i, c_hi, cur, arg, inv);
}

// Counts as weights (unweighted rows): a table of reciprocals replaces the division, the costliest step.
inline void dp_layer(const double* w, const double* s, Band<const double> prev, std::size_t r_lo, std::size_t r_hi,
                     std::size_t c_lo, std::size_t c_hi, Band<double> cur, Band<std::uint32_t> arg,
                     const RowScratch& sc) {
  if (sc.integer_weights) {
    dp_rows<true>(w, s, prev, r_lo, r_hi, c_lo, c_hi, cur, arg, sc.inv.data());
  } else {
    dp_rows<false>(w, s, prev, r_lo, r_hi, c_lo, c_hi, cur, arg, nullptr);
  }
}

// Group edges (point indices, first 0, last n) such that no group has weight * span^2 above a budget,
// the budget tuned (a few passes, each O(groups * log)) to give between target/2 and 2 * target groups.
inline void band_groups(const double* v, const double* W, std::size_t n, std::size_t target,
                        std::vector<std::size_t>& edges) {
  edges.clear();
  if (n <= target) {
    for (std::size_t i = 0; i <= n; ++i) edges.push_back(i);
    return;
  }
  auto build = [&](double budget) {
    edges.clear();
    edges.push_back(0);
    std::size_t s = 0;
    while (s < n) {
      // Largest e > s with (W[e] - W[s]) * (v[e - 1] - v[s])^2 <= budget (at least one point): gallop,
      // then bisect (the product grows with e).
      auto ok = [&](std::size_t e) {
        const double span = v[e - 1] - v[s];
        return (W[e] - W[s]) * span * span <= budget;
      };
      std::size_t good = s + 1, step = 1;
      while (good + step <= n && ok(good + step)) {
        good += step;
        step *= 2;
      }
      std::size_t bad = std::min(n + 1, good + step);
      while (bad - good > 1) {
        const std::size_t mid = good + (bad - good) / 2;
        if (mid <= n && ok(mid)) {
          good = mid;
        } else {
          bad = mid;
        }
      }
      edges.push_back(good);
      s = good;
      if (edges.size() > 4 * target) return edges.size() - 1;  // far too many: the caller grows the budget
    }
    return edges.size() - 1;
  };
  // Start from the budget that gives target groups on a uniform density over the central half of the data,
  // where most groups are; groups scale as budget^(-1/3).
  const std::size_t q1 = n / 4, q3 = n - 1 - n / 4;
  const double iqr = std::max(v[q3] - v[q1], (v[n - 1] - v[0]) * 1e-6);
  const double tq = 0.5 * static_cast<double>(target);
  double budget = 0.5 * W[n] * iqr * iqr / (tq * tq * tq) + 0.0;
  for (int it = 0; it < 24; ++it) {
    const std::size_t G = build(budget);
    if (4 * G >= 3 * target && 4 * G <= 5 * target) return;
    const double ratio = static_cast<double>(G) / static_cast<double>(target);
    budget *= std::min(std::max(ratio * ratio * ratio, 1e-3), 1e3);
  }
  if (build(budget) > 4 * target) {  // pathological: every point its own group
    edges.clear();
    for (std::size_t i = 0; i <= n; ++i) edges.push_back(i);
  }
}

// Coarse DP over G groups with prefix sums gw, gs (G + 1 entries), all layers 1..K kept: table[m * (G + 1) + e]
// is the best cost (minus the constant sum of w v^2) of e groups in m clusters; +inf where infeasible.
inline void coarse_table(const double* gw, const double* gs, std::size_t G, std::size_t K, double* table,
                         RowScratch& sc) {
  const double inf = std::numeric_limits<double>::infinity();
  std::fill(table, table + (K + 1) * (G + 1), inf);
  table[0] = 0;
  for (std::size_t j = 1; j <= G; ++j) {
    const double d = gs[j] - gs[0];
    table[G + 1 + j] = -d * d / (gw[j] - gw[0]);
  }
  RowScratch::grow(sc.arg, G + 1);
  for (std::size_t m = 2; m <= K; ++m) {
    dp_layer(gw, gs, {table + (m - 1) * (G + 1), 0}, m, G, m - 1, G - 1, {table + m * (G + 1), 0},
             {sc.arg.data(), 0}, sc);
  }
}

// Exact optimal partition of points [0, n) into K clusters with boundary c in [lo[c], hi[c]] (lo/hi as in
// windowed_partition). Writes bounds[0..K].
inline void banded_partition(const double* W, const double* S1, std::size_t n, std::size_t K, const std::size_t* lo,
                             const std::size_t* hi, std::size_t* bounds, RowScratch& sc) {
  RowScratch::grow(sc.off, K + 2);
  std::size_t* off = sc.off.data();
  off[0] = 0;
  for (std::size_t c = 0; c <= K; ++c) off[c + 1] = off[c] + (hi[c] - lo[c] + 1);
  RowScratch::grow(sc.e, off[K + 1]);
  std::vector<std::uint32_t>& arg = sc.idx_tmp;  // free after sorting
  RowScratch::grow(arg, off[K + 1]);
  sc.e[0] = 0;
  for (std::size_t c = 1; c <= K; ++c) {
    // Rows are positions lo[c]..hi[c], stored from e[off[c]]; columns lo[c-1]..hi[c-1] from e[off[c-1]].
    const Band<const double> e_prev{sc.e.data() + off[c - 1], lo[c - 1]};
    dp_layer(W, S1, e_prev, lo[c], hi[c], lo[c - 1], hi[c - 1], {sc.e.data() + off[c], lo[c]},
             {arg.data() + off[c], lo[c]}, sc);
  }
  bounds[K] = n;
  for (std::size_t c = K; c >= 1; --c) bounds[c - 1] = arg[off[c] + bounds[c] - lo[c]];
}

// Boundaries (K + 1 entries) of a near-optimal partition of the points (v, W, S1; n > K) by the banded
// method (steps 2-4 above, without Lloyd). sum_sq: sum of w (v - shift)^2 over the points.
inline void banded_bounds(const double* v, const double* W, const double* S1, std::size_t n, std::size_t K,
                          double sum_sq, std::size_t* bounds, RowScratch& sc) {
  band_groups(v, W, n, std::max(kBandGroupsPerCluster * K, kBandMinGroups), sc.groups);
  const std::size_t G = sc.groups.size() - 1;
  const std::size_t* edge = sc.groups.data();
  // Forward and mirrored (backward) prefix sums over groups.
  RowScratch::grow(sc.gW, G + 1);
  RowScratch::grow(sc.gS, G + 1);
  RowScratch::grow(sc.gWr, G + 1);
  RowScratch::grow(sc.gSr, G + 1);
  for (std::size_t g = 0; g <= G; ++g) {
    sc.gW[g] = W[edge[g]];
    sc.gS[g] = S1[edge[g]];
  }
  for (std::size_t g = 0; g <= G; ++g) {
    sc.gWr[g] = sc.gW[G] - sc.gW[G - g];
    sc.gSr[g] = sc.gS[G] - sc.gS[G - g];
  }
  RowScratch::grow(sc.fwd, (K + 1) * (G + 1));
  RowScratch::grow(sc.bwd, (K + 1) * (G + 1));
  RowScratch::grow(sc.lo, K + 1);
  RowScratch::grow(sc.hi, K + 1);
  std::size_t* lo = sc.lo.data();
  std::size_t* hi = sc.hi.data();
  lo[0] = hi[0] = 0;
  lo[K] = hi[K] = n;
  if (G < K) {  // too few groups for a coarse solution: the full exact DP over the points
    for (std::size_t c = 1; c < K; ++c) {
      lo[c] = c;
      hi[c] = n - (K - c);
    }
  } else {
    coarse_table(sc.gW.data(), sc.gS.data(), G, K, sc.fwd.data(), sc);
    coarse_table(sc.gWr.data(), sc.gSr.data(), G, K, sc.bwd.data(), sc);
    const double best = sc.fwd[K * (G + 1) + G];
    // The coarse cost plus sum_sq is the coarse optimum's inertia: the margin's scale.
    const double limit = best + kBandMargin * std::max(sum_sq + best, 0.0);
    for (std::size_t c = 1; c < K; ++c) {
      const double* f = sc.fwd.data() + c * (G + 1);
      const double* b = sc.bwd.data() + (K - c) * (G + 1);
      std::size_t e_min = G, e_max = 0;
      for (std::size_t e = 1; e < G; ++e) {
        if (f[e] + b[G - e] <= limit) {
          e_min = std::min(e_min, e);
          e_max = std::max(e_max, e);
        }
      }
      if (e_min > e_max) e_min = e_max = G / 2;  // cannot happen (the optimum's own edges qualify)
      lo[c] = std::max(edge[e_min - 1], c);
      hi[c] = std::min(edge[std::min(e_max + 1, G)], n - (K - c));
    }
  }
  for (int round = 0; round < 16; ++round) {
    for (std::size_t c = 1; c < K; ++c) lo[c] = std::max(lo[c], lo[c - 1]);
    for (std::size_t c = K - 1; c >= 1; --c) hi[c] = std::min(hi[c], hi[c + 1]);
    for (std::size_t c = 1; c < K; ++c) lo[c] = std::min(lo[c], hi[c]);
    banded_partition(W, S1, n, K, lo, hi, bounds, sc);
    // A boundary on a band edge (not a hard limit) may want to go further: widen that band and redo.
    bool on_edge = false;
    for (std::size_t c = 1; c < K; ++c) {
      const std::size_t width = hi[c] - lo[c] + 2;
      if (bounds[c] == lo[c] && lo[c] > c) {
        lo[c] = lo[c] > c + width ? lo[c] - width : c;
        on_edge = true;
      }
      if (bounds[c] == hi[c] && hi[c] < n - (K - c)) {
        hi[c] = std::min(hi[c] + width, n - (K - c));
        on_edge = true;
      }
    }
    if (!on_edge) break;
  }
}

// Lloyd iterations on the points from non-empty bounds (as lloyd(), on scratch): centroids to mu[0..K).
inline void lloyd_points(const double* v, const double* W, const double* S1, double shift, std::size_t n,
                         std::size_t K, std::size_t* bounds, double* mu, std::size_t* next) {
  auto mean = [&](std::size_t a, std::size_t b) {
    const double m = (S1[b] - S1[a]) / (W[b] - W[a]) + shift;
    return std::min(std::max(m, v[a]), v[b - 1]);
  };
  for (std::size_t c = 0; c < K; ++c) mu[c] = mean(bounds[c], bounds[c + 1]);
  next[0] = 0;
  next[K] = n;
  for (int it = 0; it < kMaxLloydIterations; ++it) {
    bool changed = false;
    for (std::size_t c = 1; c < K; ++c) {
      const double t = 0.5 * (mu[c - 1] + mu[c]);
      next[c] = static_cast<std::size_t>(std::upper_bound(v + next[c - 1], v + n, t) - v);
      changed |= next[c] != bounds[c];
    }
    if (!changed) break;
    std::copy(next, next + K + 1, bounds);
    for (std::size_t c = 0; c < K; ++c) {
      if (bounds[c] < bounds[c + 1]) mu[c] = mean(bounds[c], bounds[c + 1]);
    }
  }
}

// One contiguous row of n values (n <= kSmallRowMax) by the fast method, using only the scratch once it
// has grown: centroids (k, ascending, in T), labels, inertia (float64, summed in value order).
template <class T, class Wt, class L>
void cluster_small_row(const T* x, const Wt* weights, L* labels, std::size_t n, std::size_t k, T* centroids,
                       double* inertia, RowScratch& sc) {
  using K = KeyOf<T>;
  std::vector<K>& keys = sc.keys<K>();
  std::vector<K>& keys_tmp = sc.keys_tmp<K>();
  RowScratch::grow(keys, n);
  RowScratch::grow(keys_tmp, n);
  if (weights) {
    RowScratch::grow(sc.idx, n);
    RowScratch::grow(sc.idx_tmp, n);
    RowScratch::grow(sc.wbuf, n);
  }
  for (std::size_t i = 0; i < n; ++i) {
    const T xv = x[i];
    if (!std::isfinite(xv)) throw_not_finite();
    keys[i] = order_key(static_cast<T>(xv + T(0)));  // -0.0 -> +0.0
  }
  if (weights) {
    for (std::size_t i = 0; i < n; ++i) {
      const double wv = static_cast<double>(weights[i]);
      if (!(wv >= 0) || !std::isfinite(wv)) throw_bad_weight();
      sc.wbuf[i] = wv;
      sc.idx[i] = static_cast<std::uint32_t>(i);
    }
  }
  std::uint32_t* sorted_idx = nullptr;
  const K* sorted = radix_sort(keys.data(), keys_tmp.data(), n, weights ? sc.idx.data() : nullptr,
                               weights ? sc.idx_tmp.data() : nullptr, &sorted_idx);
  // Distinct values with positive weight; prefix sums around the weighted mean (shift).
  RowScratch::grow(sc.v, n);
  RowScratch::grow(sc.wpt, n);
  RowScratch::grow(sc.W, n + 1);
  RowScratch::grow(sc.S1, n + 1);
  double* v = sc.v.data();
  double* wpt = sc.wpt.data();
  std::size_t m = 0;
  double sw = 0, swv = 0;
  for_each_distinct<T>(sorted, n, weights ? sc.wbuf.data() : nullptr, sorted_idx, [&](double value, double weight) {
    v[m] = value;
    wpt[m] = weight;
    sw += weight;
    swv += weight * value;
    ++m;
  });
  const double shift = m ? swv / sw : 0.0;
  double* W = sc.W.data();
  double* S1 = sc.S1.data();
  W[0] = S1[0] = 0;
  double sum_sq = 0;
  for (std::size_t i = 0; i < m; ++i) {
    const double d = v[i] - shift;
    W[i + 1] = W[i] + wpt[i];
    S1[i + 1] = S1[i] + wpt[i] * d;
    sum_sq += wpt[i] * d * d;
  }
  RowScratch::grow(sc.mu, k);
  double* mu = sc.mu.data();
  sc.integer_weights = false;
  if (!weights) sc.use_counts(n);
  if (banded_path_fits(m, k)) {
    RowScratch::grow(sc.bounds, k + 1);
    RowScratch::grow(sc.next, k + 1);
    banded_bounds(v, W, S1, m, k, sum_sq, sc.bounds.data(), sc);
    lloyd_points(v, W, S1, shift, m, k, sc.bounds.data(), mu, sc.next.data());
  } else {
    // Few distinct values: the general route (it allocates, but such rows are cheap and rare).
    Points P;
    P.v.assign(v, v + m);
    P.W.assign(W, W + m + 1);
    P.S1.assign(S1, S1 + m + 1);
    P.shift = shift;
    const std::vector<double> c = centroids_of(P, k, Method::fast);
    std::copy(c.begin(), c.end(), mu);
  }
  for (std::size_t c = 0; c < k; ++c) mu[c] = static_cast<double>(static_cast<T>(mu[c]));
  std::sort(mu, mu + k);
  for (std::size_t c = 0; c < k; ++c) centroids[c] = static_cast<T>(mu[c]);
  // Thresholds as in thresholds_of (a run of equal centroids takes the threshold after it).
  RowScratch::grow(sc.t, k);
  double* t = sc.t.data();
  const std::size_t nt = k - 1;
  for (std::size_t c = nt; c-- > 0;) {
    t[c] = mu[c + 1] > mu[c] ? 0.5 * (mu[c] + mu[c + 1]) + 0.0 : (c + 1 < nt ? t[c + 1] : INFINITY);
  }
  double acc[4] = {0, 0, 0, 0};
  for (std::size_t i = 0; i < n; ++i) {
    const double xv = static_cast<double>(x[i]);
    const std::uint32_t l = label_by_search(t, nt, xv);
    labels[i] = static_cast<L>(l);
    const double d = xv - mu[l];
    acc[i & 3] += weights ? static_cast<double>(weights[i]) * d * d : d * d;
  }
  *inertia = (acc[0] + acc[1]) + (acc[2] + acc[3]);
}

// All clusterings of an (outer, length, inner) array: one per index along the middle axis, in parallel
// over rows (each row single-threaded, so a row's result depends only on the row) or, for a single large
// row, in parallel inside it. Contiguous rows (outer == 1) that fit take the small-row path with a
// per-thread scratch.
template <class T, class Wt, class L>
void cluster_rows(const T* x, const Wt* weights, L* labels, std::size_t outer, std::size_t length, std::size_t inner,
                  std::size_t k, Method method, int num_threads, T* centroids, double* inertia) {
  if (k < 1 || k > kMaxClusters) throw std::invalid_argument("k must be in [1, 65536]");
  const bool small = method == Method::fast && outer == 1 && banded_path_fits(inner, k);
  auto row = [&](std::size_t r, int threads) {
    if (small) {
      thread_local RowScratch scratch;
      const std::size_t off = r * inner;
      cluster_small_row(x + off, weights ? weights + off : nullptr, labels + off, inner, k, centroids + r * k,
                        inertia + r, scratch);
      return;
    }
    RowGeometry g;
    g.offset = r * inner;
    g.n_seg = outer;
    g.seg_len = inner;
    g.seg_stride = length * inner;
    cluster_row(x, weights, labels, g, k, method, threads, centroids + r * k, inertia + r);
  };
  if (length == 1) {
    row(0, num_threads);
  } else {
    parallel_for(length, num_threads, [&](std::size_t r) { row(r, 1); });
  }
}

}  // namespace kmeans1d
}  // namespace pyqshare
