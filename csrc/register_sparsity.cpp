#include "binding.hpp"
#include "register.hpp"

namespace pyqshare {
void register_sparsity(py::module_& m) { (void)m; }
}  // namespace pyqshare
