"""Peers pyqshare measures itself against: onnxruntime's own static quantizer on the same prepared model."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np


def onnxruntime_quantize_static(
    prepared: str | os.PathLike[str],
    output: str | os.PathLike[str],
    samples: Sequence[dict[str, np.ndarray]],
    activation_bits: int,
) -> None:
    """onnxruntime's ``quantize_static`` in QDQ format, per-channel int8 weights, uint8/uint16 activations,
    calibrated (min-max) on ``samples``: the reference the issue compares pyqshare's per-channel method to."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    class Reader:
        def __init__(self) -> None:
            self.samples = iter(samples)

        def get_next(self):
            return next(self.samples, None)

    quantize_static(os.fspath(prepared), os.fspath(output), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt16 if activation_bits == 16 else QuantType.QUInt8,
                    weight_type=QuantType.QInt8)
