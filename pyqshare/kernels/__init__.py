"""The four native kernels behind pyqshare, with a numpy API.

Every kernel takes C-contiguous numpy arrays of the documented dtypes (anything else is refused with a
message saying what to pass, never silently copied), releases the GIL while it works, accepts
``num_threads`` (default: :func:`set_num_threads`, initially 1) and returns bit-identical results for
any thread count.
"""

from pyqshare.kernels._common import available_cores, get_num_threads, set_num_threads
from pyqshare.kernels.clustering import *  # noqa: F403
from pyqshare.kernels.clustering import __all__ as _clustering
from pyqshare.kernels.hashing import *  # noqa: F403
from pyqshare.kernels.hashing import __all__ as _hashing
from pyqshare.kernels.quantization import *  # noqa: F403
from pyqshare.kernels.quantization import __all__ as _quantization
from pyqshare.kernels.sparsity import *  # noqa: F403
from pyqshare.kernels.sparsity import __all__ as _sparsity

__all__ = [
    "available_cores",
    "get_num_threads",
    "set_num_threads",
    *_clustering,
    *_sparsity,
    *_quantization,
    *_hashing,
]
