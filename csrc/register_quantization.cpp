#include "binding.hpp"
#include "register.hpp"

namespace pyqshare {
void register_quantization(py::module_& m) { (void)m; }
}  // namespace pyqshare
