// One registration function per area of the Python API; module.cpp only wires them together.
#pragma once

#include <pybind11/pybind11.h>

namespace pyqshare {
void register_clustering(pybind11::module_& m);
void register_sparsity(pybind11::module_& m);
void register_quantization(pybind11::module_& m);
void register_hashing(pybind11::module_& m);
void register_rounding(pybind11::module_& m);
}  // namespace pyqshare
