// Bindings for 1-D k-means (pyqshare.kernels.clustering validates arguments and shapes first).
#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "binding.hpp"
#include "kmeans1d_rows.hpp"
#include "register.hpp"

namespace pyqshare {
namespace {

using kmeans1d::Method;

template <class T, class Wt, class L>
py::tuple run_kmeans1d(const py::array& x_obj, std::size_t k, std::size_t outer, std::size_t length, std::size_t inner,
                       const py::object& w_obj, Method method, int num_threads) {
  auto x = require_array<T>(x_obj, "x");
  const Wt* w = nullptr;
  py::array_t<Wt, py::array::c_style> warr;
  if (!w_obj.is_none()) {
    warr = require_array<Wt>(w_obj, "sample_weight");
    w = warr.data();
  }
  std::vector<py::ssize_t> shape(x.shape(), x.shape() + x.ndim());
  py::array_t<L> labels(shape);
  py::array_t<T> centroids(std::vector<py::ssize_t>{static_cast<py::ssize_t>(length), static_cast<py::ssize_t>(k)});
  py::array_t<double> inertia(std::vector<py::ssize_t>{static_cast<py::ssize_t>(length)});
  const T* xp = x.data();
  L* lp = labels.mutable_data();
  T* cp = centroids.mutable_data();
  double* ip = inertia.mutable_data();
  {
    MaybeReleaseGil release(static_cast<std::size_t>(x.size()), 1 << 12);
    kmeans1d::cluster_rows(xp, w, lp, outer, length, inner, k, method, num_threads, cp, ip);
  }
  return py::make_tuple(centroids, labels, inertia);
}

template <class T, class L>
py::tuple dispatch_weight(const py::array& x, std::size_t k, std::size_t outer, std::size_t length, std::size_t inner,
                          const py::object& w, Method method, int num_threads) {
  if (!w.is_none() && py::isinstance<py::array>(w) &&
      py::reinterpret_borrow<py::array>(w).dtype().is(py::dtype::of<float>())) {
    return run_kmeans1d<T, float, L>(x, k, outer, length, inner, w, method, num_threads);
  }
  return run_kmeans1d<T, double, L>(x, k, outer, length, inner, w, method, num_threads);
}

template <class L>
py::tuple dispatch_value(const py::array& x, std::size_t k, std::size_t outer, std::size_t length, std::size_t inner,
                         const py::object& w, Method method, int num_threads) {
  if (x.dtype().is(py::dtype::of<float>())) return dispatch_weight<float, L>(x, k, outer, length, inner, w, method, num_threads);
  return dispatch_weight<double, L>(x, k, outer, length, inner, w, method, num_threads);
}

py::tuple kmeans1d_entry(const py::object& x_obj, long long k, long long outer, long long length, long long inner,
                         const py::object& sample_weight, bool optimal, int num_threads) {
  if (!py::isinstance<py::array>(x_obj)) throw py::type_error("x must be a numpy array");
  const auto x = py::reinterpret_borrow<py::array>(x_obj);
  if (!x.dtype().is(py::dtype::of<float>()) && !x.dtype().is(py::dtype::of<double>())) {
    throw py::type_error("x must have dtype float32 or float64 (convert float16 with .astype(np.float32))");
  }
  if (k < 1 || k > static_cast<long long>(kmeans1d::kMaxClusters)) {
    throw std::invalid_argument("k must be in [1, 65536], got " + std::to_string(k));
  }
  if (outer < 0 || length < 0 || inner < 0 || outer * length * inner != static_cast<long long>(x.size())) {
    throw std::invalid_argument("outer * length * inner must equal x.size");
  }
  if (num_threads < 1) throw std::invalid_argument("num_threads must be >= 1");
  if (!sample_weight.is_none()) {
    if (!py::isinstance<py::array>(sample_weight)) throw py::type_error("sample_weight must be a numpy array or None");
    const auto w = py::reinterpret_borrow<py::array>(sample_weight);
    if (!w.dtype().is(py::dtype::of<float>()) && !w.dtype().is(py::dtype::of<double>())) {
      throw py::type_error("sample_weight must have dtype float32 or float64");
    }
    if (w.ndim() != x.ndim() || !std::equal(x.shape(), x.shape() + x.ndim(), w.shape())) {
      throw std::invalid_argument("sample_weight must have the same shape as x");
    }
  }
  const Method method = optimal ? Method::optimal : Method::fast;
  const auto kk = static_cast<std::size_t>(k);
  const auto o = static_cast<std::size_t>(outer), l = static_cast<std::size_t>(length), i = static_cast<std::size_t>(inner);
  if (k <= 256) return dispatch_value<std::uint8_t>(x, kk, o, l, i, sample_weight, method, num_threads);
  return dispatch_value<std::uint16_t>(x, kk, o, l, i, sample_weight, method, num_threads);
}

// Textbook O(k n^2) DP on sorted distinct values (tests only): (centroids float64 (k,), inertia).
py::tuple kmeans1d_reference(const py::object& values_obj, const py::object& weights_obj, long long k) {
  auto values = require_array<double>(values_obj, "values");
  const std::size_t n = static_cast<std::size_t>(values.size());
  std::vector<double> w(n, 1.0);
  if (!weights_obj.is_none()) {
    auto weights = require_array<double>(weights_obj, "weights");
    if (static_cast<std::size_t>(weights.size()) != n) throw std::invalid_argument("weights must match values");
    for (std::size_t i = 0; i < n; ++i) w[i] = weights.data()[i];
  }
  if (k < 1) throw std::invalid_argument("k must be >= 1");
  const auto kk = static_cast<std::size_t>(k);
  std::vector<std::size_t> order(n);
  for (std::size_t i = 0; i < n; ++i) order[i] = i;
  const double* v = values.data();
  std::sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) { return v[a] < v[b]; });
  std::vector<double> dv, dw;
  for (std::size_t i = 0; i < n;) {
    std::size_t j = i;
    double sw = 0;
    while (j < n && v[order[j]] == v[order[i]]) sw += w[order[j++]];
    if (sw > 0) {
      dv.push_back(v[order[i]]);
      dw.push_back(sw);
    }
    i = j;
  }
  py::array_t<double> centroids(static_cast<py::ssize_t>(kk));
  double* c = centroids.mutable_data();
  double inertia = 0;
  if (dv.size() <= kk) {
    for (std::size_t q = 0; q < kk; ++q) c[q] = dv.empty() ? 0.0 : dv[std::min(q, dv.size() - 1)];
  } else {
    const auto bounds = kmeans1d::ref::optimal_partition(dv, dw, kk);
    for (std::size_t q = 0; q < kk; ++q) {
      double sw = 0, sv = 0;
      for (std::size_t t = bounds[q]; t < bounds[q + 1]; ++t) {
        sw += dw[t];
        sv += dw[t] * dv[t];
      }
      c[q] = sv / sw;
      for (std::size_t t = bounds[q]; t < bounds[q + 1]; ++t) inertia += dw[t] * (dv[t] - c[q]) * (dv[t] - c[q]);
    }
  }
  return py::make_tuple(centroids, inertia);
}

}  // namespace

void register_clustering(py::module_& m) {
  m.def("kmeans1d", &kmeans1d_entry, py::arg("x"), py::arg("k"), py::arg("outer"), py::arg("length"), py::arg("inner"),
        py::arg("sample_weight"), py::arg("optimal"), py::arg("num_threads"),
        "1-D k-means over an (outer, length, inner) view: one clustering per index along `length`. "
        "Returns (centroids (length, k), labels (x.shape), inertia (length,)). Use pyqshare.kmeans1d.");
  m.def("kmeans1d_reference", &kmeans1d_reference, py::arg("values"), py::arg("weights"), py::arg("k"),
        "Textbook O(k n^2) optimal 1-D k-means (tests only): (centroids, inertia).");
}

}  // namespace pyqshare
