// Bindings for the sparsity kernels. Arguments are validated in pyqshare/kernels/sparsity.py; the checks
// here only keep the C++ side safe when called directly.
#include <pybind11/stl.h>

#include <string>
#include <type_traits>
#include <vector>

#include "binding.hpp"
#include "register.hpp"
#include "sparsity.hpp"

namespace pyqshare {
namespace {

using sparsity::Isa;
using sparsity::KeyKind;

// A C-contiguous float16/float32/float64 array, seen as raw bits.
struct FloatArray {
  py::array array;
  int bits;
};

FloatArray require_float_array(const py::handle& obj, const char* name) {
  if (!py::isinstance<py::array>(obj)) throw py::type_error(std::string(name) + " must be a numpy array");
  auto a = py::reinterpret_borrow<py::array>(obj);
  const py::dtype dt = a.dtype();
  int bits = 0;
  if (dt.equal(py::dtype("float16"))) bits = 16;
  if (dt.equal(py::dtype::of<float>())) bits = 32;
  if (dt.equal(py::dtype::of<double>())) bits = 64;
  if (bits == 0) {
    throw py::type_error(std::string(name) + " must have dtype float16, float32 or float64 (native byte order), got " +
                         std::string(py::str(dt)));
  }
  if (!(a.flags() & py::array::c_style)) {
    throw py::value_error(std::string(name) + " must be C-contiguous; pass np.ascontiguousarray(" + name +
                          ") to copy it explicitly");
  }
  return {a, bits};
}

template <class U>
const U* bits_of(const FloatArray& a) {
  return static_cast<const U*>(a.array.data());
}

// Calls fn(U{}) with U the unsigned type holding one float of `bits` bits.
template <class Fn>
decltype(auto) with_bits(int bits, Fn&& fn) {
  if (bits == 16) return fn(uint16_t{});
  if (bits == 32) return fn(uint32_t{});
  return fn(uint64_t{});
}

template <class Fn>
decltype(auto) with_kind(bool score, Fn&& fn) {
  if (score) return fn(std::integral_constant<KeyKind, KeyKind::score>{});
  return fn(std::integral_constant<KeyKind, KeyKind::magnitude>{});
}

std::vector<py::ssize_t> shape_of(const py::array& a) { return {a.shape(), a.shape() + a.ndim()}; }

// The (outer, length, inner) view of `shape` around `axis`.
struct AxisView {
  std::size_t outer = 1, length = 1, inner = 1;
};

AxisView axis_view(const std::vector<py::ssize_t>& shape, int axis) {
  if (axis < 0 || axis >= int(shape.size())) throw py::value_error("axis out of range (normalise it first)");
  AxisView v;
  for (int d = 0; d < int(shape.size()); ++d) {
    if (d < axis) v.outer *= std::size_t(shape[d]);
    if (d > axis) v.inner *= std::size_t(shape[d]);
  }
  v.length = std::size_t(shape[axis]);
  return v;
}

void check_nm(int n, int m, std::size_t length) {
  if (m < 1 || m > sparsity::kMaxM) throw py::value_error("m must be in [1, 65536], got " + std::to_string(m));
  if (n < 0 || n > m) throw py::value_error("n must be in [0, m], got n=" + std::to_string(n));
  if (length % std::size_t(m) != 0) {
    throw py::value_error("axis length " + std::to_string(length) + " is not divisible by m=" + std::to_string(m));
  }
}

Isa parse_isa(const std::string& name) {
  const Isa best = sparsity::best_isa();
  if (name == "auto") return best;
  if (name == "generic") return Isa::generic;
  if (name == "sse2" && best != Isa::generic) return Isa::sse2;
  if (name == "avx2" && best == Isa::avx2) return Isa::avx2;
  throw py::value_error("isa must be 'auto', 'generic' or one this CPU supports (best: " +
                        std::string(sparsity::isa_name(best)) + "), got '" + name + "'");
}

FloatArray optional_scores(const py::object& scores, const FloatArray& w) {
  FloatArray s = require_float_array(scores, "scores");
  if (shape_of(s.array) != shape_of(w.array)) throw py::value_error("scores must have the shape of w");
  return s;
}

py::array bool_array(const std::vector<py::ssize_t>& shape) { return py::array(py::dtype("bool"), shape); }

uint8_t* bytes_of(py::array& a) { return static_cast<uint8_t*>(a.mutable_data()); }

// Runs kernel(kind, key_bits) with the GIL released (it is back before any Python object is touched again).
// When scores rank the elements, w itself is still checked for NaN/Inf.
template <class Kernel>
void with_keys_nogil(const FloatArray& w, const FloatArray& keys, bool by_score, int num_threads, Kernel&& kernel) {
  const std::size_t size = std::size_t(w.array.size());
  MaybeReleaseGil release(size);
  if (by_score) {
    with_bits(w.bits, [&](auto u) { sparsity::check_finite(bits_of<decltype(u)>(w), size, num_threads, "w"); });
  }
  with_kind(by_score, [&](auto kind) {
    with_bits(keys.bits, [&](auto u) { kernel(kind, bits_of<decltype(u)>(keys)); });
  });
}

py::array nm_mask_py(const py::handle& w_obj, int n, int m, int axis, const py::object& scores_obj, int num_threads,
                     const std::string& isa_name) {
  const FloatArray w = require_float_array(w_obj, "w");
  const auto shape = shape_of(w.array);
  const AxisView v = axis_view(shape, axis);
  check_nm(n, m, v.length);
  const Isa isa = parse_isa(isa_name);
  const bool by_score = !scores_obj.is_none();
  const FloatArray keys = by_score ? optional_scores(scores_obj, w) : w;
  py::array out = bool_array(shape);
  uint8_t* mask = bytes_of(out);
  const std::size_t groups = v.outer * (v.length / std::size_t(m));
  with_keys_nogil(w, keys, by_score, num_threads, [&](auto kind, const auto* k) {
    sparsity::nm_mask<decltype(kind)::value>(k, mask, groups, n, m, v.inner, num_threads, isa, by_score ? "scores" : "w");
  });
  return out;
}

py::array nm_mask_reference_py(const py::handle& w_obj, int n, int m, int axis, const py::object& scores_obj) {
  const FloatArray w = require_float_array(w_obj, "w");
  const auto shape = shape_of(w.array);
  const AxisView v = axis_view(shape, axis);
  check_nm(n, m, v.length);
  const bool by_score = !scores_obj.is_none();
  const FloatArray keys = by_score ? optional_scores(scores_obj, w) : w;
  py::array out = bool_array(shape);
  uint8_t* mask = bytes_of(out);
  with_bits(keys.bits, [&](auto u) {
    sparsity::ref::nm_mask(bits_of<decltype(u)>(keys), mask, v.outer, v.length, v.inner, n, m, by_score);
  });
  return out;
}

// rows rows of equal length (the whole array for rows == 1), k zeros per row.
std::size_t row_length(const FloatArray& w, std::size_t rows, std::size_t k) {
  const std::size_t size = std::size_t(w.array.size());
  if (rows == 0 ? size != 0 : size % rows != 0) throw py::value_error("rows must divide the size of w");
  const std::size_t len = rows == 0 ? 0 : size / rows;
  if (k > len) throw py::value_error("k must be at most the row length " + std::to_string(len));
  return len;
}

py::array magnitude_mask_py(const py::handle& w_obj, std::size_t k, std::size_t rows, const py::object& scores_obj,
                            int num_threads) {
  const FloatArray w = require_float_array(w_obj, "w");
  const std::size_t len = row_length(w, rows, k);
  const bool by_score = !scores_obj.is_none();
  const FloatArray keys = by_score ? optional_scores(scores_obj, w) : w;
  py::array out = bool_array(shape_of(w.array));
  uint8_t* mask = bytes_of(out);
  with_keys_nogil(w, keys, by_score, num_threads, [&](auto kind, const auto* key) {
    sparsity::magnitude_mask<decltype(kind)::value>(key, mask, rows, len, k, num_threads, by_score ? "scores" : "w");
  });
  return out;
}

py::array magnitude_mask_reference_py(const py::handle& w_obj, std::size_t k, std::size_t rows,
                                      const py::object& scores_obj) {
  const FloatArray w = require_float_array(w_obj, "w");
  const std::size_t len = row_length(w, rows, k);
  const bool by_score = !scores_obj.is_none();
  const FloatArray keys = by_score ? optional_scores(scores_obj, w) : w;
  py::array out = bool_array(shape_of(w.array));
  uint8_t* mask = bytes_of(out);
  with_bits(keys.bits, [&](auto u) {
    sparsity::ref::magnitude_mask(bits_of<decltype(u)>(keys), mask, rows, len, k, by_score);
  });
  return out;
}

std::size_t packed_index_bytes(std::size_t kept_elements, int m) {
  return (kept_elements * std::size_t(sparsity::index_bits(m)) + 7) / 8;
}

py::tuple nm_compress_py(const py::handle& w_obj, int n, int m, int axis, const py::object& scores_obj,
                         int num_threads, const std::string& isa_name) {
  const FloatArray w = require_float_array(w_obj, "w");
  auto shape = shape_of(w.array);
  const AxisView v = axis_view(shape, axis);
  check_nm(n, m, v.length);
  const Isa isa = parse_isa(isa_name);
  const bool by_score = !scores_obj.is_none();
  const FloatArray keys = by_score ? optional_scores(scores_obj, w) : w;
  const std::size_t groups = v.outer * (v.length / std::size_t(m));
  shape[axis] = py::ssize_t(v.length / std::size_t(m) * std::size_t(n));
  py::array values(w.array.dtype(), shape);
  const std::size_t kept = std::size_t(values.size());
  py::array_t<uint8_t> indices(py::ssize_t(packed_index_bytes(kept, m)));
  void* values_data = values.mutable_data();
  uint8_t* index_data = indices.mutable_data();
  {  // the GIL is back before any Python object is touched again
    MaybeReleaseGil release(std::size_t(w.array.size()));
    if (by_score) {
      with_bits(w.bits, [&](auto u) {
        sparsity::check_finite(bits_of<decltype(u)>(w), std::size_t(w.array.size()), num_threads, "w");
      });
    }
    with_kind(by_score, [&](auto kind) {
      with_bits(w.bits, [&](auto uw) {
        using UW = decltype(uw);
        with_bits(keys.bits, [&](auto uk) {
          sparsity::nm_compress<decltype(kind)::value>(bits_of<UW>(w), bits_of<decltype(uk)>(keys),
                                                       static_cast<UW*>(values_data), index_data, groups, n, m, v.inner,
                                                       num_threads, isa, by_score ? "scores" : "w");
        });
      });
    });
  }
  return py::make_tuple(values, indices);
}

py::array nm_decompress_py(const py::handle& values_obj, const py::handle& indices_obj, int n, int m,
                           const std::vector<py::ssize_t>& shape, int axis, int num_threads) {
  const FloatArray values = require_float_array(values_obj, "values");
  const auto indices = require_array<uint8_t>(indices_obj, "indices");
  const AxisView v = axis_view(shape, axis);
  check_nm(n, m, v.length);
  auto packed_shape = shape;
  packed_shape[axis] = py::ssize_t(v.length / std::size_t(m) * std::size_t(n));
  if (shape_of(values.array) != packed_shape) throw py::value_error("values has the wrong shape for shape, n, m, axis");
  const std::size_t kept = std::size_t(values.array.size());
  if (indices.ndim() != 1 || std::size_t(indices.size()) != packed_index_bytes(kept, m)) {
    throw py::value_error("indices must be 1-D with " + std::to_string(packed_index_bytes(kept, m)) + " bytes");
  }
  for (auto d : shape)
    if (d < 0) throw py::value_error("shape must not have negative dimensions");
  py::array out(values.array.dtype(), shape);
  void* out_data = out.mutable_data();
  const uint8_t* index_data = indices.data();
  const std::size_t groups = v.outer * (v.length / std::size_t(m));
  {  // the GIL is back before any Python object is touched again
    MaybeReleaseGil release(std::size_t(out.size()));
    with_bits(values.bits, [&](auto u) {
      using U = decltype(u);
      sparsity::nm_decompress(bits_of<U>(values), index_data, static_cast<U*>(out_data), groups, n, m, v.inner,
                              num_threads);
    });
  }
  return out;
}

}  // namespace

void register_sparsity(py::module_& m) {
  using namespace pybind11::literals;
  m.def("nm_mask", &nm_mask_py, "w"_a, "n"_a, "m"_a, "axis"_a, "scores"_a = py::none(), "num_threads"_a = 1,
        "isa"_a = "auto", "N:M mask of w along a non-negative axis (use pyqshare.kernels.nm_mask).");
  m.def("nm_mask_reference", &nm_mask_reference_py, "w"_a, "n"_a, "m"_a, "axis"_a, "scores"_a = py::none(),
        "Slow scalar reference for nm_mask (stable sort of float values per group).");
  m.def("magnitude_mask", &magnitude_mask_py, "w"_a, "k"_a, "rows"_a, "scores"_a = py::none(), "num_threads"_a = 1,
        "Mask zeroing k elements in each of `rows` equal rows of w (use pyqshare.kernels.magnitude_mask).");
  m.def("magnitude_mask_reference", &magnitude_mask_reference_py, "w"_a, "k"_a, "rows"_a, "scores"_a = py::none(),
        "Slow scalar reference for magnitude_mask (stable sort of float values per row).");
  m.def("nm_compress", &nm_compress_py, "w"_a, "n"_a, "m"_a, "axis"_a, "scores"_a = py::none(), "num_threads"_a = 1,
        "isa"_a = "auto", "Packed N:M form (values, indices) of w (use pyqshare.kernels.nm_compress).");
  m.def("nm_decompress", &nm_decompress_py, "values"_a, "indices"_a, "n"_a, "m"_a, "shape"_a, "axis"_a,
        "num_threads"_a = 1, "Inverse of nm_compress (use pyqshare.kernels.nm_decompress).");
  m.def("sparsity_best_isa", [] { return std::string(sparsity::isa_name(sparsity::best_isa())); },
        "The fastest sparsity SIMD path this CPU runs: 'avx2', 'sse2' or 'generic'.");
}

}  // namespace pyqshare
