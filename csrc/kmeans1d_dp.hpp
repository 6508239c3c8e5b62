// Optimal 1-D k-means over sorted weighted points: a layered DP whose layers are row-minima problems on
// totally monotone matrices (SMAWK, linear per layer), with Hirschberg-style checkpointing so that
// backtracking needs O(n) memory instead of the O(k n) argmin table.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <utility>
#include <vector>

namespace pyqshare {
namespace kmeans1d {

// Points sorted ascending with positive weights, seen through prefix sums with n + 1 entries:
// W[i] = total weight of points [0, i), S1[i] = sum of weight * (value - shift) over the same points.
// The cost of a cluster [a, b) is sum(w v^2) - S^2 / W; the first term does not depend on the partition,
// so an optimal partition maximises the sum over clusters of S^2 / W (the cluster's "gain").
struct PrefixView {
  const double* W;
  const double* S1;
  std::size_t n;

  double gain(std::size_t a, std::size_t b) const {
    const double s = S1[b] - S1[a];
    return s * s / (W[b] - W[a]);
  }
};

// Row minima (leftmost on ties) of a totally monotone matrix, SMAWK: rows r0, r0 + step, ... (nr of them),
// over the given columns (ascending). value(row, col) gives an entry. Writes argmin[row] and minval[row].
// buf/vbuf: scratch for this level's reduced columns and the values of the reduction stack; deeper levels
// use the space after this level's nr entries (2 * nr + 64 entries suffice in all).
template <class Value>
void smawk(const Value& value, std::size_t r0, std::size_t step, std::size_t nr, const std::uint32_t* cols,
           std::size_t nc, std::uint32_t* buf, double* vbuf, std::uint32_t* argmin, double* minval) {
  if (nr == 0) return;
  const std::uint32_t* c = cols;
  std::size_t n_c = nc;
  if (nc > nr) {
    // REDUCE: keep at most nr columns that can still hold a row minimum.
    std::size_t top = 0;
    for (std::size_t q = 0; q < nc; ++q) {
      const std::uint32_t col = cols[q];
      while (top > 0 && vbuf[top - 1] > value(r0 + (top - 1) * step, col)) --top;
      if (top < nr) {
        buf[top] = col;
        vbuf[top] = value(r0 + top * step, col);
        ++top;
      }
    }
    c = buf;
    n_c = top;
  }
  smawk(value, r0 + step, 2 * step, nr / 2, c, n_c, buf + nr, vbuf + nr, argmin, minval);
  // Even rows: scan between the minima of the neighbouring odd rows (monotone by construction).
  std::size_t q = 0;
  for (std::size_t t = 0; t < nr; t += 2) {
    const std::size_t row = r0 + t * step;
    const std::uint32_t stop = t + 1 < nr ? argmin[row + step] : c[n_c - 1];
    std::uint32_t best = c[q];
    double best_val = value(row, best);
    while (c[q] != stop) {
      ++q;
      const double v = value(row, c[q]);
      if (v < best_val) {
        best_val = v;
        best = c[q];
      }
    }
    argmin[row] = best;
    minval[row] = best_val;
  }
}

// Splits n weighted points into K contiguous clusters minimising the within-cluster sum of squares.
// Memory is O(n) whatever K: the forward DP keeps two layers plus, for every position, where the optimal
// path crosses a few checkpoint layers; the solution is then refined recursively between checkpoints,
// which costs about (1 + 1/kCheckpoints) forward passes in total.
class OptimalPartitioner {
 public:
  explicit OptimalPartitioner(PrefixView p) : p_(p) {
    const std::size_t n1 = p.n + 1;
    e_prev_.resize(n1);
    e_cur_.resize(n1);
    argmin_.resize(n1);
    split_prev_.resize(n1 * kCheckpoints);
    split_cur_.resize(n1 * kCheckpoints);
    cols_.resize(3 * n1 + 64);
    colval_.resize(3 * n1 + 64);
  }

  // Fills bounds[0..K]: cluster c holds points [bounds[c], bounds[c + 1]). Requires 1 <= K <= n.
  void solve(std::size_t K, std::size_t* bounds) {
    if (K < 1 || K > p_.n) throw std::invalid_argument("OptimalPartitioner: need 1 <= K <= number of points");
    bounds[0] = 0;
    bounds[K] = p_.n;
    if (K > 1 && (p_.n + 1) * K <= kFullTableEntries) {
      // Small problem: keep every layer's argmins and backtrack directly (no checkpoint recursion).
      table_.resize((p_.n + 1) * (K + 1));
      std::size_t unused[1];
      forward(0, p_.n, K, nullptr, 0, unused);
      for (std::size_t m = K; m >= 2; --m) bounds[m - 1] = table_[m * (p_.n + 1) + bounds[m]];
      table_.clear();
      return;
    }
    solve_range(0, p_.n, K, bounds);
  }

 private:
  static constexpr std::size_t kCheckpoints = 3;
  static constexpr std::size_t kFullTableEntries = std::size_t{1} << 21;

  // bounds[0] == a and bounds[K] == b are set by the caller.
  void solve_range(std::size_t a, std::size_t b, std::size_t K, std::size_t* bounds) {
    if (K <= 1) return;
    if (b - a == K) {
      for (std::size_t c = 1; c < K; ++c) bounds[c] = a + c;
      return;
    }
    const std::size_t n_chk = std::min(K - 1, kCheckpoints);
    std::size_t layers[kCheckpoints];
    for (std::size_t q = 0; q < n_chk; ++q) layers[q] = (q + 1) * K / (n_chk + 1);
    std::size_t splits[kCheckpoints];
    forward(a, b, K, layers, n_chk, splits);
    for (std::size_t q = 0; q < n_chk; ++q) bounds[layers[q]] = splits[q];
    std::size_t prev = 0;
    for (std::size_t q = 0; q <= n_chk; ++q) {
      const std::size_t next = q < n_chk ? layers[q] : K;
      solve_range(bounds[prev], bounds[next], next - prev, bounds + prev);
      prev = next;
    }
  }

  // Entry (row j, column i) of the current layer's matrix, positions relative to the subproblem start:
  // best score of the previous layer ending at i minus the gain of cluster [i, j). +inf where i >= j.
  double value(std::size_t j, std::size_t i) const {
    if (i >= j) return std::numeric_limits<double>::infinity();
    const double s = s1_[j] - s1_[i];
    return e_prev_[i] - s * s / (w_[j] - w_[i]);
  }

  // One DP over points [a, b) with K clusters; splits[q] receives the end of cluster layers[q] on the
  // optimal path (absolute position).
  void forward(std::size_t a, std::size_t b, std::size_t K, const std::size_t* layers, std::size_t n_chk,
               std::size_t* splits) {
    w_ = p_.W + a;
    s1_ = p_.S1 + a;
    const std::size_t n = b - a;
    // Layer 1: one cluster [0, j).
    for (std::size_t j = 1; j + (K - 1) <= n; ++j) {
      const double s = s1_[j] - s1_[0];
      e_prev_[j] = -s * s / (w_[j] - w_[0]);
    }
    for (std::size_t m = 2; m <= K; ++m) {
      const std::size_t col_lo = m - 1, col_hi = n - (K - m + 1);
      const std::size_t row_hi = n - (K - m);
      const std::size_t row_lo = m == K ? n : m;
      if (m == K) {
        std::size_t best = col_lo;
        double best_val = value(n, col_lo);
        for (std::size_t i = col_lo + 1; i <= col_hi; ++i) {
          const double v = value(n, i);
          if (v < best_val) {
            best_val = v;
            best = i;
          }
        }
        argmin_[n] = static_cast<std::uint32_t>(best);
      } else {
        const std::size_t n_cols = col_hi - col_lo + 1;
        for (std::size_t q = 0; q < n_cols; ++q) cols_[q] = static_cast<std::uint32_t>(col_lo + q);
        smawk([this](std::size_t j, std::size_t i) { return value(j, i); }, row_lo, 1, row_hi - row_lo + 1,
              cols_.data(), n_cols, cols_.data() + n_cols, colval_.data(), argmin_.data(), e_cur_.data());
      }
      // Carry, for each row, where its optimal path crosses the checkpoint layers already passed.
      if (!table_.empty()) {
        std::copy(&argmin_[row_lo], &argmin_[row_hi] + 1, &table_[m * (n + 1) + row_lo]);
      }
      for (std::size_t j = row_lo; n_chk > 0 && j <= row_hi; ++j) {
        const std::uint32_t i = argmin_[j];
        std::uint32_t* cur = &split_cur_[j * kCheckpoints];
        const std::uint32_t* prev = &split_prev_[static_cast<std::size_t>(i) * kCheckpoints];
        for (std::size_t q = 0; q < n_chk; ++q) {
          if (layers[q] + 1 == m) {
            cur[q] = i;
          } else if (layers[q] + 1 < m) {
            cur[q] = prev[q];
          }
        }
      }
      std::swap(e_prev_, e_cur_);
      std::swap(split_prev_, split_cur_);
    }
    for (std::size_t q = 0; q < n_chk; ++q) splits[q] = a + split_prev_[n * kCheckpoints + q];
  }

  PrefixView p_;
  const double* w_ = nullptr;
  const double* s1_ = nullptr;
  std::vector<double> e_prev_, e_cur_;
  std::vector<std::uint32_t> argmin_;
  std::vector<std::uint32_t> split_prev_, split_cur_;
  std::vector<std::uint32_t> cols_;
  std::vector<double> colval_;
  std::vector<std::uint32_t> table_;  // all layers' argmins, for small problems only
};

// Optimal partition among those whose boundary c (the end of cluster c - 1) lies in [lo[c], hi[c]] for
// c = 1..K-1; lo and hi hold K + 1 non-decreasing entries with lo[0] = hi[0] = 0, lo[K] = hi[K] = n and
// lo[c] <= hi[c]. Work and memory are linear in the total window size. Writes bounds[0..K].
inline void windowed_partition(PrefixView p, std::size_t K, const std::vector<std::size_t>& lo,
                               const std::vector<std::size_t>& hi, std::size_t* bounds) {
  std::vector<std::size_t> off(K + 2, 0);
  std::size_t widest = 0;
  for (std::size_t c = 0; c <= K; ++c) {
    off[c + 1] = off[c] + (hi[c] - lo[c] + 1);
    widest = std::max(widest, hi[c] - lo[c] + 1);
  }
  std::vector<std::uint32_t> arg(off[K + 1]), cols(widest), buf(2 * widest + 64);
  std::vector<double> e(off[K + 1]), vbuf(2 * widest + 64);
  e[0] = 0;
  for (std::size_t c = 1; c <= K; ++c) {
    const std::size_t row_lo = lo[c], col_lo = lo[c - 1];
    const double* e_prev = &e[off[c - 1]];
    auto value = [&](std::size_t r, std::size_t i) {
      const std::size_t j = row_lo + r;
      if (i >= j) return std::numeric_limits<double>::infinity();
      return e_prev[i - col_lo] - p.gain(i, j);
    };
    const std::size_t nc = hi[c - 1] - col_lo + 1;
    for (std::size_t q = 0; q < nc; ++q) cols[q] = static_cast<std::uint32_t>(col_lo + q);
    smawk(value, 0, 1, hi[c] - row_lo + 1, cols.data(), nc, buf.data(), vbuf.data(), &arg[off[c]], &e[off[c]]);
  }
  bounds[K] = p.n;
  for (std::size_t c = K; c >= 1; --c) bounds[c - 1] = arg[off[c] + bounds[c] - lo[c]];
}

namespace ref {

// Textbook O(K n^2) DP with the full argmin table and cluster costs summed directly (two-pass mean, then
// squares): slow and obvious, for tests. v ascending and distinct, w > 0. Returns bounds (K + 1 entries).
inline std::vector<std::size_t> optimal_partition(const std::vector<double>& v, const std::vector<double>& w,
                                                  std::size_t K) {
  const std::size_t n = v.size();
  if (K < 1 || K > n) throw std::invalid_argument("optimal_partition reference: need 1 <= K <= n");
  std::vector<double> cost((n + 1) * (n + 1), 0.0);
  for (std::size_t i = 0; i < n; ++i) {
    for (std::size_t j = i + 1; j <= n; ++j) {
      double sw = 0, sv = 0;
      for (std::size_t t = i; t < j; ++t) {
        sw += w[t];
        sv += w[t] * v[t];
      }
      const double mean = sv / sw;
      double ss = 0;
      for (std::size_t t = i; t < j; ++t) ss += w[t] * (v[t] - mean) * (v[t] - mean);
      cost[i * (n + 1) + j] = ss;
    }
  }
  const double inf = std::numeric_limits<double>::infinity();
  std::vector<double> D((K + 1) * (n + 1), inf);
  std::vector<std::size_t> arg((K + 1) * (n + 1), 0);
  D[0] = 0;
  for (std::size_t m = 1; m <= K; ++m) {
    for (std::size_t j = m; j <= n; ++j) {
      for (std::size_t i = m - 1; i < j; ++i) {
        const double cand = D[(m - 1) * (n + 1) + i] + cost[i * (n + 1) + j];
        if (cand < D[m * (n + 1) + j]) {
          D[m * (n + 1) + j] = cand;
          arg[m * (n + 1) + j] = i;
        }
      }
    }
  }
  std::vector<std::size_t> bounds(K + 1);
  bounds[K] = n;
  for (std::size_t m = K; m >= 1; --m) bounds[m - 1] = arg[m * (n + 1) + bounds[m]];
  return bounds;
}

}  // namespace ref
}  // namespace kmeans1d
}  // namespace pyqshare
