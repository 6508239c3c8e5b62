#include "register.hpp"

PYBIND11_MODULE(_core, m) {
  m.doc() = "pyqshare native kernels; use the documented API in pyqshare.kernels";
  pyqshare::register_clustering(m);
  pyqshare::register_sparsity(m);
  pyqshare::register_quantization(m);
  pyqshare::register_hashing(m);
  pyqshare::register_rounding(m);
}
