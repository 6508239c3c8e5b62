"""Typed stub for the compiled module pyqshare._core. Use pyqshare.kernels: it validates arguments."""

import numpy as np
import numpy.typing as npt
