// Helpers shared by the register_*.cpp files: strict array checks (no hidden copies) and GIL release.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstddef>
#include <optional>
#include <stdexcept>
#include <string>

namespace pyqshare {
namespace py = pybind11;

// Returns `a` as a C-contiguous array of T, or throws TypeError / ValueError saying what to pass.
// Never converts: a conversion would be a hidden copy, and the Python layer converts visibly instead.
template <class T>
py::array_t<T, py::array::c_style> require_array(const py::handle& obj, const char* name) {
  if (!py::isinstance<py::array>(obj)) {
    throw py::type_error(std::string(name) + " must be a numpy array");
  }
  auto a = py::reinterpret_borrow<py::array>(obj);
  if (!a.dtype().is(py::dtype::of<T>())) {
    throw py::type_error(std::string(name) + " must have dtype " +
                         std::string(py::str(py::dtype::of<T>())) + ", got " + std::string(py::str(a.dtype())));
  }
  if (!(a.flags() & py::array::c_style)) {
    throw py::value_error(std::string(name) +
                          " must be C-contiguous; pass np.ascontiguousarray(" + name + ") to copy it explicitly");
  }
  return py::reinterpret_borrow<py::array_t<T, py::array::c_style>>(a);
}

// Writable variant for output buffers allocated by the caller.
template <class T>
py::array_t<T, py::array::c_style> require_writable_array(const py::handle& obj, const char* name) {
  auto a = require_array<T>(obj, name);
  if (!a.writeable()) throw py::value_error(std::string(name) + " must be writable");
  return a;
}

// Releases the GIL for the lifetime of the object, but only when the work is large enough to be worth it.
class MaybeReleaseGil {
 public:
  explicit MaybeReleaseGil(std::size_t work_items, std::size_t threshold = 1 << 14) {
    if (work_items >= threshold) release_.emplace();
  }

 private:
  std::optional<py::gil_scoped_release> release_;
};

}  // namespace pyqshare
