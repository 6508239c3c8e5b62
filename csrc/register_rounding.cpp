// Bindings of GPTQ's per-block step (gptq.hpp). pyqshare.quantization.rounding calls them with arrays it
// allocated itself; these checks guard memory safety.
#include <cstdint>
#include <stdexcept>
#include <string>

#include "binding.hpp"
#include "gptq.hpp"
#include "register.hpp"

namespace pyqshare {
namespace {

struct BlockArrays {
  py::array_t<double, py::array::c_style> work, upper, errors;
  py::array_t<std::int32_t, py::array::c_style> codes;
  std::size_t rows = 0, cols = 0;
};

BlockArrays check_block(const py::object& work_obj, const py::object& upper_obj, const py::object& codes_obj,
                        const py::object& errors_obj, std::size_t start, std::size_t stop) {
  BlockArrays a{require_writable_array<double>(work_obj, "work"), require_array<double>(upper_obj, "upper"),
                require_writable_array<double>(errors_obj, "errors"),
                require_writable_array<std::int32_t>(codes_obj, "codes")};
  if (a.work.ndim() != 2) throw std::invalid_argument("work must be 2-D (rows, columns)");
  a.rows = static_cast<std::size_t>(a.work.shape(0));
  a.cols = static_cast<std::size_t>(a.work.shape(1));
  if (a.upper.ndim() != 2 || static_cast<std::size_t>(a.upper.shape(0)) != a.rows ||
      static_cast<std::size_t>(a.upper.shape(1)) != a.rows) {
    throw std::invalid_argument("upper must be (rows, rows)");
  }
  if (a.codes.ndim() != 2 || a.codes.shape(0) != a.work.shape(0) || a.codes.shape(1) != a.work.shape(1)) {
    throw std::invalid_argument("codes must have work's shape");
  }
  if (!(start <= stop && stop <= a.rows)) throw std::invalid_argument("need start <= stop <= rows");
  if (static_cast<std::size_t>(a.errors.size()) < (stop - start) * a.cols) {
    throw std::invalid_argument("errors must hold (stop - start) x columns values");
  }
  return a;
}

}  // namespace

void register_rounding(py::module_& m) {
  m.def(
      "gptq_block_grid",
      [](const py::object& work_obj, const py::object& upper_obj, std::size_t start, std::size_t stop,
         const py::object& scale_obj, const py::object& zp_obj, double qmin, double qmax, const py::object& codes_obj,
         const py::object& errors_obj) {
        BlockArrays a = check_block(work_obj, upper_obj, codes_obj, errors_obj, start, stop);
        auto scale = require_array<double>(scale_obj, "scale");
        auto zero_point = require_array<double>(zp_obj, "zero_point");
        if (static_cast<std::size_t>(scale.size()) != a.cols || static_cast<std::size_t>(zero_point.size()) != a.cols) {
          throw std::invalid_argument("scale and zero_point need one value per column");
        }
        const gptq::Grid grid{scale.data(), zero_point.data(), qmin, qmax};
        py::gil_scoped_release release;
        gptq::snap_block(a.work.mutable_data(), a.cols, a.upper.data(), a.rows, start, stop, grid,
                         a.codes.mutable_data(), a.errors.mutable_data());
      },
      py::arg("work"), py::arg("upper"), py::arg("start"), py::arg("stop"), py::arg("scale"), py::arg("zero_point"),
      py::arg("qmin"), py::arg("qmax"), py::arg("codes"), py::arg("errors"),
      "GPTQ's in-block step on an integer grid per column (see gptq.hpp); modifies work, codes and errors.");
  m.def(
      "gptq_block_codebook",
      [](const py::object& work_obj, const py::object& upper_obj, std::size_t start, std::size_t stop,
         const py::object& values_obj, const py::object& midpoints_obj, const py::object& codes_obj,
         const py::object& errors_obj) {
        BlockArrays a = check_block(work_obj, upper_obj, codes_obj, errors_obj, start, stop);
        auto values = require_array<double>(values_obj, "codebooks");
        auto midpoints = require_array<double>(midpoints_obj, "midpoints");
        if (values.ndim() != 2 || values.shape(1) < 1) throw std::invalid_argument("codebooks must be (groups, k)");
        const std::size_t groups = static_cast<std::size_t>(values.shape(0)), k = static_cast<std::size_t>(values.shape(1));
        if (groups != 1 && groups != a.cols) throw std::invalid_argument("codebooks need 1 or one group per column");
        if (static_cast<std::size_t>(midpoints.size()) != groups * (k - 1)) {
          throw std::invalid_argument("midpoints must be (groups, k - 1)");
        }
        const gptq::Codebooks books{values.data(), midpoints.data(), groups, k};
        py::gil_scoped_release release;
        gptq::snap_block(a.work.mutable_data(), a.cols, a.upper.data(), a.rows, start, stop, books,
                         a.codes.mutable_data(), a.errors.mutable_data());
      },
      py::arg("work"), py::arg("upper"), py::arg("start"), py::arg("stop"), py::arg("codebooks"), py::arg("midpoints"),
      py::arg("codes"), py::arg("errors"),
      "GPTQ's in-block step on look-up tables (see gptq.hpp); modifies work, codes and errors.");
}

}  // namespace pyqshare
