"""What to quantize how: the per-weight and activation choices every method fills in before writing QDQ."""

from __future__ import annotations

from dataclasses import dataclass

from onnx import TensorProto

from pyqshare.errors import InputError
from pyqshare.quantization.adaround import DEFAULT_ITERATIONS

WEIGHT_BITS = (4, 8, 16)
ACTIVATION_BITS = (8, 16)
GRANULARITIES = ("per-tensor", "per-channel", "per-block")
SEARCHES = ("minmax", "mse")
ROUNDINGS = ("nearest", "gptq", "adaround")

# Weights read by these roles are quantized with a WeightScheme; every other float initializer (norm
# parameters, biases of MatMul+Add, embeddings, scalars) is static data quantized like an activation.
LINEAR_ROLES = frozenset({"matmul", "conv", "rnn_w", "rnn_r"})


@dataclass(frozen=True)
class WeightScheme:
    """How one linear-layer weight is quantized.

    bits: 4, 8 or 16. granularity: one scale per tensor, per output channel, or per block of ``block_size``
    input features within each output channel. symmetric: signed codes with zero point 0 (int4 always is:
    QNN's HTP computes asymmetric int4 wrongly); asymmetric: unsigned codes with a searched zero point.
    search: the clipping range from min/max, or the scale_search optimum of the weight's squared error.
    rounding: nearest, GPTQ's error-compensating rounding against the layer's calibration inputs, or
    AdaRound's learned up-or-down rounding against them (:mod:`pyqshare.quantization.adaround`), which takes
    ``iterations`` Adam steps per layer.
    """

    bits: int = 8
    granularity: str = "per-channel"
    block_size: int | None = None
    symmetric: bool = True
    search: str = "mse"
    rounding: str = "gptq"
    iterations: int = DEFAULT_ITERATIONS

    def __post_init__(self) -> None:
        if self.bits not in WEIGHT_BITS:
            raise InputError(f"--weight-bits must be one of {WEIGHT_BITS}, not {self.bits}")
        if self.granularity not in GRANULARITIES:
            raise InputError(f"weight granularity must be one of {GRANULARITIES}, not {self.granularity!r}")
        if (self.granularity == "per-block") != (self.block_size is not None):
            raise InputError("--block-size goes with per-block weights (and only with them)")
        if self.block_size is not None and self.block_size < 1:
            raise InputError(f"--block-size must be positive, not {self.block_size}")
        if self.bits == 4 and not self.symmetric:
            raise InputError("int4 weights are always symmetric (QNN's HTP computes asymmetric int4 wrongly)")
        if self.search not in SEARCHES or self.rounding not in ROUNDINGS:
            raise InputError(f"unknown search {self.search!r} or rounding {self.rounding!r}")
        if self.iterations < 0:
            raise InputError(f"--iterations must be at least 0, not {self.iterations}")

    @property
    def elem_type(self) -> int:
        signed = {4: TensorProto.INT4, 8: TensorProto.INT8, 16: TensorProto.INT16}
        unsigned = {4: TensorProto.UINT4, 8: TensorProto.UINT8, 16: TensorProto.UINT16}
        return (signed if self.symmetric else unsigned)[self.bits]

    @property
    def code_range(self) -> tuple[int, int]:
        if self.symmetric:
            return -(1 << (self.bits - 1)), (1 << (self.bits - 1)) - 1
        return 0, (1 << self.bits) - 1


@dataclass(frozen=True)
class QuantScheme:
    """The whole model's choices: a default weight scheme, activations, and static (non-linear) data."""

    weights: WeightScheme = WeightScheme()
    activation_bits: int = 16
    activation_method: str = "minmax"

    def __post_init__(self) -> None:
        if self.activation_bits not in ACTIVATION_BITS:
            raise InputError(f"--activation-bits must be one of {ACTIVATION_BITS}, not {self.activation_bits}")

    @property
    def activation_elem_type(self) -> int:
        return TensorProto.UINT16 if self.activation_bits == 16 else TensorProto.UINT8
