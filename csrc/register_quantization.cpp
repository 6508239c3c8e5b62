// Bindings of the quantization kernels: scale_search (fast and reference), quantize, dequantize.
// pyqshare.kernels.quantization validates and shapes the arguments; these checks guard memory safety.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>
#include <stdexcept>
#include <string>
#include <utility>

#include "binding.hpp"
#include "register.hpp"
#include "scale_search.hpp"

namespace pyqshare {
namespace {

using quant::ScaleLayout;

template <class Code>
void check_code_width(int bits) {
  if (bits > 8 * static_cast<int>(sizeof(Code))) {
    throw std::invalid_argument(std::to_string(bits) + "-bit codes need a 16-bit zero_point dtype (int16 or uint16)");
  }
}

ScaleLayout make_layout(int kind, std::size_t outer, std::size_t length, std::size_t inner, std::size_t block) {
  if (kind < 0 || kind > 2) throw std::invalid_argument("layout kind must be 0 (per tensor), 1 (per axis) or 2 (blocked)");
  ScaleLayout lay;
  lay.kind = static_cast<ScaleLayout::Kind>(kind);
  lay.outer = outer;
  lay.length = length;
  lay.inner = inner;
  lay.block = block;
  if (lay.kind == ScaleLayout::kBlocked && block < 1) throw std::invalid_argument("block_size must be >= 1");
  return lay;
}

void check_bits(int bits) {
  if (bits < 2 || bits > 16) throw std::invalid_argument("bits must be in [2, 16], got " + std::to_string(bits));
}

const int64_t* optional_table(const py::object& obj, const char* name, std::size_t expected, int64_t& max_out) {
  auto a = require_array<int64_t>(obj, name);
  if (static_cast<std::size_t>(a.size()) != expected) {
    throw std::invalid_argument(std::string(name) + " must have " + std::to_string(expected) + " entries");
  }
  max_out = 0;
  for (py::ssize_t k = 0; k < a.size(); ++k) {
    if (a.data()[k] < 0) throw std::invalid_argument(std::string(name) + " must hold non-negative offsets");
    max_out = std::max(max_out, a.data()[k]);
  }
  return a.data();
}

py::tuple scale_search_binding(const py::object& w_obj, int bits, bool symmetric, int objective, int grid, double p,
                               int kind, std::size_t outer, std::size_t length, std::size_t inner, std::size_t block,
                               const py::object& sw_obj, const py::object& outer_off, const py::object& length_off,
                               const py::object& inner_off, int num_threads, bool refine, int isa, bool reference) {
  if (isa < -1 || isa > 2) throw std::invalid_argument("isa must be -1 (auto), 0 (portable), 1 (AVX2) or 2 (AVX-512)");
  auto w = require_array<float>(w_obj, "w");
  check_bits(bits);
  if (grid < 1) throw std::invalid_argument("grid must be >= 1, got " + std::to_string(grid));
  if (objective < 0 || objective > 2) throw std::invalid_argument("objective must be 0 (mse), 1 (lp) or 2 (minmax)");
  if (!(p > 0.0) || !std::isfinite(p)) throw std::invalid_argument("p must be a finite number > 0");
  const ScaleLayout lay = make_layout(kind, outer, length, inner, block);
  if (static_cast<std::size_t>(w.size()) != lay.size()) {
    throw std::invalid_argument("outer * length * inner must equal w.size");
  }
  quant::SampleWeights sw;
  py::array_t<double, py::array::c_style> sw_arr;
  if (!sw_obj.is_none()) {
    sw_arr = require_array<double>(sw_obj, "sample_weight");
    sw.w = sw_arr.data();
    const std::size_t sw_size = static_cast<std::size_t>(sw_arr.size());
    if (outer_off.is_none()) {
      if (sw_size != lay.size()) throw std::invalid_argument("sample_weight without offset tables must match w.size");
    } else {
      int64_t m0 = 0, m1 = 0, m2 = 0;
      sw.outer_off = optional_table(outer_off, "outer_off", outer, m0);
      sw.length_off = optional_table(length_off, "length_off", length, m1);
      sw.inner_off = optional_table(inner_off, "inner_off", inner, m2);
      if (lay.size() && static_cast<std::size_t>(m0 + m1 + m2) >= sw_size) {
        throw std::invalid_argument("sample_weight offset tables point past the end of sample_weight");
      }
    }
  }
  quant::SearchConfig cfg;
  cfg.bits = bits;
  cfg.symmetric = symmetric;
  cfg.objective = static_cast<quant::Objective>(objective);
  cfg.grid = grid;
  cfg.p = p;
  cfg.refine = refine;
  const std::size_t groups = quant::n_groups(lay);
  py::array_t<float> scale(static_cast<py::ssize_t>(groups));
  py::array_t<int32_t> zero_point(static_cast<py::ssize_t>(groups));
  {
    MaybeReleaseGil release(lay.size());
    quant::scale_search(w.data(), sw, lay, cfg, scale.mutable_data(), zero_point.mutable_data(), num_threads,
                        reference, static_cast<quant::Isa>(isa));
  }
  return py::make_tuple(scale, zero_point);
}

template <class Code>
py::array quantize_typed(const py::array_t<float, py::array::c_style>& x, const py::array_t<float, py::array::c_style>& scale,
                         const py::object& zp_obj, const ScaleLayout& lay, int bits, int num_threads, bool simd) {
  check_code_width<Code>(bits);
  auto zp = require_array<Code>(zp_obj, "zero_point");
  if (static_cast<std::size_t>(zp.size()) != lay.n_params()) throw std::invalid_argument("zero_point must match scale");
  py::array_t<Code> out(std::vector<py::ssize_t>(x.shape(), x.shape() + x.ndim()));
  {
    MaybeReleaseGil release(lay.size());
    quant::quantize(x.data(), scale.data(), zp.data(), out.mutable_data(), lay,
                    quant::code_range(bits, std::is_signed_v<Code>), num_threads, simd && quant::has_avx2());
  }
  return std::move(out);
}

template <class Code>
py::array dequantize_typed(const py::object& q_obj, const py::array_t<float, py::array::c_style>& scale,
                           const py::object& zp_obj, const ScaleLayout& lay, int bits, int num_threads, bool simd) {
  check_code_width<Code>(bits);
  auto q = require_array<Code>(q_obj, "q");
  auto zp = require_array<Code>(zp_obj, "zero_point");
  if (static_cast<std::size_t>(q.size()) != lay.size()) throw std::invalid_argument("outer * length * inner must equal q.size");
  if (static_cast<std::size_t>(zp.size()) != lay.n_params()) throw std::invalid_argument("zero_point must match scale");
  py::array_t<float> out(std::vector<py::ssize_t>(q.shape(), q.shape() + q.ndim()));
  {
    MaybeReleaseGil release(lay.size());
    quant::dequantize(q.data(), scale.data(), zp.data(), out.mutable_data(), lay,
                      quant::code_range(bits, std::is_signed_v<Code>), num_threads, simd && quant::has_avx2());
  }
  return std::move(out);
}

// Calls fn.template operator()<Code>() for the code type named by zero_point's dtype.
template <class Fn>
py::array dispatch_code_type(const py::object& zp_obj, Fn&& fn) {
  if (!py::isinstance<py::array>(zp_obj)) throw py::type_error("zero_point must be a numpy array");
  const auto dt = py::reinterpret_borrow<py::array>(zp_obj).dtype();
  if (dt.is(py::dtype::of<int8_t>())) return fn(int8_t{});
  if (dt.is(py::dtype::of<uint8_t>())) return fn(uint8_t{});
  if (dt.is(py::dtype::of<int16_t>())) return fn(int16_t{});
  if (dt.is(py::dtype::of<uint16_t>())) return fn(uint16_t{});
  throw py::type_error("zero_point must have dtype int8, uint8, int16 or uint16, got " + std::string(py::str(dt)));
}

void check_params(const py::array_t<float, py::array::c_style>& scale, const ScaleLayout& lay) {
  if (static_cast<std::size_t>(scale.size()) != lay.n_params()) {
    throw std::invalid_argument("scale has " + std::to_string(scale.size()) + " entries, the layout needs " +
                                std::to_string(lay.n_params()));
  }
}

}  // namespace

void register_quantization(py::module_& m) {
  m.def("scale_search", &scale_search_binding, py::arg("w"), py::arg("bits"), py::arg("symmetric"),
        py::arg("objective"), py::arg("grid"), py::arg("p"), py::arg("kind"), py::arg("outer"), py::arg("length"),
        py::arg("inner"), py::arg("block"), py::arg("sample_weight"), py::arg("outer_off"), py::arg("length_off"),
        py::arg("inner_off"), py::arg("num_threads"), py::arg("refine") = true, py::arg("isa") = -1,
        py::arg("reference") = false,
        "Scale search over a validated (outer, length, inner) view; returns flat (scale float32, zero_point int32). "
        "isa: -1 auto, 0 portable, 1 AVX2, 2 AVX-512 (capped at what the CPU has). "
        "reference: the scalar brute force over every candidate (the specification the fast search reproduces).");
  m.def(
      "quantize",
      [](const py::object& x_obj, const py::object& scale_obj, const py::object& zp_obj, int bits, int kind,
         std::size_t outer, std::size_t length, std::size_t inner, std::size_t block, int num_threads, bool simd) {
        auto x = require_array<float>(x_obj, "x");
        auto scale = require_array<float>(scale_obj, "scale");
        check_bits(bits);
        const ScaleLayout lay = make_layout(kind, outer, length, inner, block);
        if (static_cast<std::size_t>(x.size()) != lay.size()) throw std::invalid_argument("outer * length * inner must equal x.size");
        check_params(scale, lay);
        return dispatch_code_type(zp_obj, [&](auto code) {
          return quantize_typed<decltype(code)>(x, scale, zp_obj, lay, bits, num_threads, simd);
        });
      },
      py::arg("x"), py::arg("scale"), py::arg("zero_point"), py::arg("bits"), py::arg("kind"), py::arg("outer"),
      py::arg("length"), py::arg("inner"), py::arg("block"), py::arg("num_threads"), py::arg("simd") = true,
      "ONNX QuantizeLinear over a validated (outer, length, inner) view; codes take zero_point's dtype. "
      "simd=False forces the portable loop (for tests).");
  m.def(
      "dequantize",
      [](const py::object& q_obj, const py::object& scale_obj, const py::object& zp_obj, int bits, int kind,
         std::size_t outer, std::size_t length, std::size_t inner, std::size_t block, int num_threads, bool simd) {
        auto scale = require_array<float>(scale_obj, "scale");
        check_bits(bits);
        const ScaleLayout lay = make_layout(kind, outer, length, inner, block);
        check_params(scale, lay);
        return dispatch_code_type(zp_obj, [&](auto code) {
          return dequantize_typed<decltype(code)>(q_obj, scale, zp_obj, lay, bits, num_threads, simd);
        });
      },
      py::arg("q"), py::arg("scale"), py::arg("zero_point"), py::arg("bits"), py::arg("kind"), py::arg("outer"),
      py::arg("length"), py::arg("inner"), py::arg("block"), py::arg("num_threads"), py::arg("simd") = true,
      "ONNX DequantizeLinear over a validated (outer, length, inner) view; returns float32. "
      "simd=False forces the portable loop (for tests).");
}

}  // namespace pyqshare
