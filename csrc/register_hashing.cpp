#include "binding.hpp"
#include "register.hpp"

namespace pyqshare {
void register_hashing(py::module_& m) { (void)m; }
}  // namespace pyqshare
