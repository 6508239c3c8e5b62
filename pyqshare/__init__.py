"""pyqshare: get families of ONNX models ready for Qualcomm's QNN HTP runtime, fast."""

from pyqshare.kernels import *  # noqa: F403  (the kernel API is pyqshare's public API)
from pyqshare.kernels import __all__ as _kernel_names

__version__ = "0.1.0"
__all__ = [*_kernel_names, "__version__"]
