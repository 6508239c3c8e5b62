// GPTQ's sequential step (Frantar et al., ICLR 2023): within one block of rows, snap each row to its grid or
// codebook and spread its scaled error onto the block's later rows. The rows below the block get one matrix
// product per block from the caller (BLAS); this is the part that is one small update per row.
// Plain functions over caller-owned, C-contiguous float64 memory; the arithmetic matches
// pyqshare/quantization/rounding.py's numpy reference operation for operation (no FMA contraction: the
// portable build has no FMA instructions), so the two give identical codes.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>

namespace pyqshare {
namespace gptq {

// Per output channel integer grid: code = clip(rint(v / scale) + zero_point, qmin, qmax).
struct Grid {
  const double* scale;
  const double* zero_point;
  double qmin, qmax;
  double snap(std::size_t column, double v, std::int32_t& code) const {
    double c = std::nearbyint(v / scale[column]) + zero_point[column];  // half to even, as np.rint
    c = std::min(std::max(c, qmin), qmax);
    code = static_cast<std::int32_t>(c);
    return (c - zero_point[column]) * scale[column];
  }
};

// Look-up tables: one (groups == 1) or one per output channel, ascending, with their k - 1 midpoints;
// a value takes the entry after every midpoint strictly below it (ties to the lower entry).
struct Codebooks {
  const double* values;
  const double* midpoints;
  std::size_t groups, k;
  double snap(std::size_t column, double v, std::int32_t& code) const {
    const std::size_t g = groups == 1 ? 0 : column;
    const double* mid = midpoints + g * (k - 1);
    code = static_cast<std::int32_t>(std::lower_bound(mid, mid + (k - 1), v) - mid);
    return values[g * k + static_cast<std::size_t>(code)];
  }
};

// Rows [start, stop) of work (rows x cols): codes and errors (stop - start rows) are written; work's later
// rows inside the block are updated. upper is the (rows x rows) upper Cholesky factor of H^-1.
template <class Snapper>
void snap_block(double* work, std::size_t cols, const double* upper, std::size_t rows, std::size_t start,
                std::size_t stop, const Snapper& snapper, std::int32_t* codes, double* errors) {
  for (std::size_t r = start; r < stop; ++r) {
    double* row = work + r * cols;
    double* error = errors + (r - start) * cols;
    const double diagonal = upper[r * rows + r];
    for (std::size_t j = 0; j < cols; ++j) {
      const double value = snapper.snap(j, row[j], codes[r * cols + j]);
      error[j] = (row[j] - value) / diagonal;
    }
    for (std::size_t later = r + 1; later < stop; ++later) {
      const double u = upper[r * rows + later];
      double* target = work + later * cols;
      for (std::size_t j = 0; j < cols; ++j) {
        const double step = u * error[j];
        target[j] -= step;
      }
    }
  }
}

}  // namespace gptq
}  // namespace pyqshare
