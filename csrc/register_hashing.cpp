#include <atomic>
#include <cstring>
#include <string>

#include "binding.hpp"
#include "chunk_hash.hpp"
#include "register.hpp"
#include "xxh3.hpp"

namespace pyqshare {
namespace {

using hashing::CdcParams;
using xxh3::LongKernel;

// The bytes of any C-contiguous buffer-protocol object, held (not copied) for this object's lifetime:
// while held, the exporter cannot resize or close the memory, so the GIL can be released.
class HeldBuffer {
 public:
  HeldBuffer(const py::handle& obj, const char* name) {
    if (!PyObject_CheckBuffer(obj.ptr())) {
      throw py::type_error(std::string(name) +
                           " must support the buffer protocol (bytes, bytearray, memoryview, numpy array, mmap), got " +
                           std::string(py::str(py::type::handle_of(obj).attr("__name__"))));
    }
    if (PyObject_GetBuffer(obj.ptr(), &view_, PyBUF_STRIDES) != 0) throw py::error_already_set();
    if (!PyBuffer_IsContiguous(&view_, 'C')) {
      PyBuffer_Release(&view_);
      throw py::value_error(std::string(name) + " must be C-contiguous; pass np.ascontiguousarray(" + name +
                            ") or bytes(" + name + ") to copy it explicitly");
    }
  }
  ~HeldBuffer() { PyBuffer_Release(&view_); }
  HeldBuffer(const HeldBuffer&) = delete;
  HeldBuffer& operator=(const HeldBuffer&) = delete;

  const std::uint8_t* data() const { return static_cast<const std::uint8_t*>(view_.buf); }
  std::size_t size() const { return static_cast<std::size_t>(view_.len); }

 private:
  Py_buffer view_{};
};

// The long-input kernel every call uses: the best one for this CPU unless a test forced another.
std::atomic<const LongKernel*> g_kernel{nullptr};

const LongKernel& current_kernel() {
  const LongKernel* k = g_kernel.load(std::memory_order_acquire);
  return k ? *k : xxh3::best_kernel();
}

int checked_threads(int num_threads) {
  if (num_threads < 1) throw std::invalid_argument("num_threads must be >= 1");
  return num_threads;
}

py::bytes canonical_bytes(const xxh3::Hash128& h) {
  std::uint8_t out[16];
  xxh3::write_canonical(h, out);
  return py::bytes(reinterpret_cast<const char*>(out), 16);
}

py::bytes xxh3_128(const py::handle& data, bool reference) {
  HeldBuffer buf(data, "data");
  xxh3::Hash128 h;
  {
    MaybeReleaseGil nogil(buf.size());
    h = reference ? xxh3::hash128_reference(buf.data(), buf.size())
                  : xxh3::hash128(buf.data(), buf.size(), current_kernel());
  }
  return canonical_bytes(h);
}

py::tuple chunk_hash_fixed(const py::handle& data, std::size_t chunk_size, int num_threads) {
  if (chunk_size < 1) throw std::invalid_argument("chunk_size must be >= 1");
  checked_threads(num_threads);
  HeldBuffer buf(data, "data");
  const std::size_t count = hashing::fixed_chunk_count(buf.size(), chunk_size);
  const auto n = static_cast<py::ssize_t>(count);
  py::array_t<std::uint64_t> digests({n, py::ssize_t{2}});
  py::array_t<std::int64_t> offsets(n);
  py::array_t<std::int64_t> lengths(n);
  {
    MaybeReleaseGil nogil(buf.size());
    hashing::fixed_chunk_layout(buf.size(), chunk_size, offsets.mutable_data(), lengths.mutable_data());
    hashing::hash_chunks(buf.data(), offsets.data(), lengths.data(), count, current_kernel(), num_threads,
                         digests.mutable_data());
  }
  return py::make_tuple(digests, offsets, lengths);
}

// The cut-candidate scanner every call uses: the best one for this CPU unless a test forced another.
std::atomic<const cut::Scanner*> g_scanner{nullptr};

const cut::Scanner& current_scanner() {
  const cut::Scanner* s = g_scanner.load(std::memory_order_acquire);
  return s ? *s : cut::best_scanner();
}

py::tuple chunk_hash_cdc(const py::handle& data, std::size_t chunk_size, int num_threads) {
  const CdcParams params = CdcParams::for_average(chunk_size);
  checked_threads(num_threads);
  HeldBuffer buf(data, "data");
  const cut::ScanFn scan = current_scanner().scan;
  const LongKernel& kernel = current_kernel();
  std::vector<std::uint64_t> ends;
  std::vector<xxh3::Hash128> fused;  // the one-thread path hashes while it scans
  {
    MaybeReleaseGil nogil(buf.size());
    if (num_threads == 1) {
      hashing::cdc_chunk_and_hash(buf.data(), buf.size(), params, scan, kernel, ends, fused);
    } else {
      ends = hashing::cdc_chunk_ends_parallel(buf.data(), buf.size(), params, scan, num_threads);
    }
  }
  const auto n = static_cast<py::ssize_t>(ends.size());
  py::array_t<std::uint64_t> digests({n, py::ssize_t{2}});
  py::array_t<std::int64_t> offsets(n);
  py::array_t<std::int64_t> lengths(n);
  {
    MaybeReleaseGil nogil(buf.size());
    std::int64_t* off = offsets.mutable_data();
    std::int64_t* len = lengths.mutable_data();
    std::uint64_t start = 0;
    for (std::size_t i = 0; i < ends.size(); ++i) {
      off[i] = static_cast<std::int64_t>(start);
      len[i] = static_cast<std::int64_t>(ends[i] - start);
      start = ends[i];
    }
    std::uint64_t* rows = digests.mutable_data();
    if (num_threads == 1) {
      for (std::size_t i = 0; i < fused.size(); ++i) hashing::store(fused[i], rows + 2 * i);
    } else {
      hashing::hash_chunks(buf.data(), off, len, ends.size(), kernel, num_threads, rows);
    }
  }
  return py::make_tuple(digests, offsets, lengths);
}

py::array_t<std::uint64_t> cdc_chunk_ends_reference(const py::handle& data, std::size_t chunk_size) {
  const CdcParams params = CdcParams::for_average(chunk_size);
  HeldBuffer buf(data, "data");
  std::vector<std::uint64_t> ends;
  {
    MaybeReleaseGil nogil(buf.size());
    ends = hashing::cdc_chunk_ends_reference(buf.data(), buf.size(), params);
  }
  py::array_t<std::uint64_t> out(static_cast<py::ssize_t>(ends.size()));
  if (!ends.empty()) std::memcpy(out.mutable_data(), ends.data(), ends.size() * sizeof(std::uint64_t));
  return out;
}

py::bytes tensor_digest(const py::handle& data, int num_threads) {
  checked_threads(num_threads);
  HeldBuffer buf(data, "data");
  xxh3::Hash128 h;
  {
    MaybeReleaseGil nogil(buf.size());
    h = hashing::tensor_digest(buf.data(), buf.size(), current_kernel(), num_threads);
  }
  return canonical_bytes(h);
}

bool buffers_equal(const py::handle& a, const py::handle& b) {
  HeldBuffer x(a, "a");
  HeldBuffer y(b, "b");
  if (x.size() != y.size()) return false;
  if (x.size() == 0 || x.data() == y.data()) return true;
  MaybeReleaseGil nogil(x.size());
  return std::memcmp(x.data(), y.data(), x.size()) == 0;
}

std::string set_hash_isa(const std::string& name) {
  const LongKernel* k = xxh3::kernel_named(name.c_str());
  if (k == nullptr) throw std::invalid_argument("hash ISA '" + name + "' is not available on this build or CPU");
  const std::string previous = current_kernel().name;
  g_kernel.store(k, std::memory_order_release);
  return previous;
}

std::string set_cdc_isa(const std::string& name) {
  const cut::Scanner* s = cut::scanner_named(name.c_str());
  if (s == nullptr) throw std::invalid_argument("cdc ISA '" + name + "' is not available on this build or CPU");
  const std::string previous = current_scanner().name;
  g_scanner.store(s, std::memory_order_release);
  return previous;
}

py::list available_cdc_isas() {
  py::list names;
  for (const char* name : {"scalar", "sse2", "avx2", "avx512"}) {
    if (cut::scanner_named(name) != nullptr) names.append(name);
  }
  return names;
}

py::list available_hash_isas() {
  py::list names;
  for (const char* name : {"scalar", "sse2", "avx2"}) {
    if (xxh3::kernel_named(name) != nullptr) names.append(name);
  }
  return names;
}

}  // namespace

void register_hashing(py::module_& m) {
  m.def("xxh3_128", [](const py::handle& data) { return xxh3_128(data, false); }, py::arg("data"),
        "XXH3-128 (seed 0) of a C-contiguous buffer, canonical 16 bytes.");
  m.def("xxh3_128_reference", [](const py::handle& data) { return xxh3_128(data, true); }, py::arg("data"),
        "XXH3-128 with the scalar reference long-input kernel.");
  m.def("chunk_hash_fixed", &chunk_hash_fixed, py::arg("data"), py::arg("chunk_size"), py::arg("num_threads"),
        "(digests (n, 2) uint64 [high, low], offsets int64, lengths int64) of fixed-size chunks.");
  m.def("chunk_hash_cdc", &chunk_hash_cdc, py::arg("data"), py::arg("chunk_size"), py::arg("num_threads"),
        "(digests, offsets, lengths) of content-defined chunks of average size chunk_size.");
  m.def("cdc_chunk_ends_reference", &cdc_chunk_ends_reference, py::arg("data"), py::arg("chunk_size"),
        "Content-defined chunk ends from the one-pass scalar reference chunker.");
  m.def("tensor_digest", &tensor_digest, py::arg("data"), py::arg("num_threads"),
        "Whole-buffer digest (leaf tree of XXH3-128), canonical 16 bytes.");
  m.def("buffers_equal", &buffers_equal, py::arg("a"), py::arg("b"), "Byte-by-byte equality of two buffers.");
  m.def("_set_hash_isa", &set_hash_isa, py::arg("name"),
        "Tests only: force the long-input kernel ('scalar', 'sse2', 'avx2'); returns the previous one.");
  m.def("_hash_isa", []() { return std::string(current_kernel().name); }, "The long-input kernel in use.");
  m.def("_hash_isas", &available_hash_isas, "Long-input kernels this build and CPU can run.");
  m.def("_set_cdc_isa", &set_cdc_isa, py::arg("name"),
        "Tests only: force the cut-candidate scanner ('scalar', 'sse2', 'avx2', 'avx512'); returns the previous one.");
  m.def("_cdc_isa", []() { return std::string(current_scanner().name); }, "The cut-candidate scanner in use.");
  m.def("_cdc_isas", &available_cdc_isas, "Cut-candidate scanners this build and CPU can run.");
}

}  // namespace pyqshare
