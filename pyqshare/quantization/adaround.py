"""Learned rounding of linear-layer weights (AdaRound: Nagel et al., "Up or Down? Adaptive Rounding for
Post-Training Quantization", ICML 2020), in numpy: no training framework.

On a fixed grid (scale ``s`` and zero point per output channel), every weight ``w`` lies between two grid
points, ``floor(w / s)`` and the one above. AdaRound learns, per weight, which of the two to take, so that the
layer's *outputs* on calibration inputs ``X`` stay close to the float ones. A continuous variable ``V`` per
weight gives the soft rounding ``h(V) = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1)`` (the rectified
sigmoid, ``zeta = 1.1``, ``gamma = -0.1``), and Adam minimises

    ||X (W - W_soft)||^2 / ||X (W - W_nearest)||^2  +  lambda * mean(1 - |2 h(V) - 1|^beta)

with ``W_soft = s * (floor(W / s) + h(V))`` inside the code range. The first term is the layer-output error
relative to nearest rounding, so that ``lambda`` means the same for every layer (the paper uses the plain
error, which only rescales ``lambda`` per layer). It never touches ``X``: with the Gram matrix ``H = X^T X``,
``||X E||^2 = tr(E^T H E)`` and its gradient ``2 H E`` cost ``O(I^2 O)`` per step for ``I`` inputs and ``O``
outputs, whatever the number of calibration rows. The second term pushes every ``h`` to 0 or 1 while
``beta`` anneals from 20 to 2 over the iterations; at the end ``h >= 0.5`` rounds up.

Two departures from the paper, both measured on all-MiniLM-L6-v2:
- no warm-up without the regularizer: ``V`` starts where ``h(V)`` is the fractional part of ``W / s``, so
  the soft weights start equal to the float weights and the output error at zero (the paper's warm-up
  matters when the layer's inputs come from the already quantized model; here they are the float ones);
  dropping it took one attention layer from 0.38 to 0.29 of nearest rounding's output error (200 steps);
- the gradient is exact (every calibration row at once, not mini-batches), and the default ``lambda`` is
  large: the regularizer then sets the pace at which soft roundings harden, from the ones near 0 or 1 inward
  as ``beta`` falls, and the output-error term decides the ones still near 1/2, compensating the errors of
  those already decided. At 100 iterations that gives about a third of nearest rounding's output error.

Should the hard rounding leave a larger output error than nearest rounding (possible with very few
iterations), nearest rounding is returned: the result is never worse than nearest on the calibration data.
"""

from __future__ import annotations

import math

import numpy as np

DEFAULT_ITERATIONS = 100
DEFAULT_LEARNING_RATE = 0.02
DEFAULT_REGULARIZATION = 3e4
_ZETA, _GAMMA = 1.1, -0.1  # stretch of the rectified sigmoid, so that h reaches 0 and 1 exactly
_BETA_START, _BETA_END = 20.0, 2.0
_V_LIMIT = 20.0
_ADAM_BETAS, _ADAM_EPS = (0.9, 0.999), 1e-8


def adaround(
    weight: np.ndarray,
    scale: np.ndarray,
    zero_point: np.ndarray,
    qmin: int,
    qmax: int,
    gram: np.ndarray,
    *,
    iterations: int = DEFAULT_ITERATIONS,
    learning_rate: float = DEFAULT_LEARNING_RATE,
    regularization: float = DEFAULT_REGULARIZATION,
) -> np.ndarray:
    """Integer codes for ``weight`` on a fixed per-channel grid, each rounded up or down as learned.

    Parameters
    ----------
    weight
        (I, O) float array: I input features (the reduction axis) by O output channels.
    scale, zero_point
        (O,) grid per output channel: value = (code - zero_point) * scale.
    qmin, qmax
        The code range (e.g. -128, 127).
    gram
        (I, I) Gram matrix ``X^T X`` of the layer's inputs over the calibration data.
    iterations
        Adam steps; 0 gives nearest rounding.
    learning_rate
        Adam's step size for the rounding variables ``V``.
    regularization
        ``lambda``, the weight of the term that drives every soft rounding to 0 or 1.

    Returns
    -------
    np.ndarray
        (I, O) int32 codes in ``[qmin, qmax]``.
    """
    scale = np.asarray(scale, dtype=np.float64)
    zero_point = np.asarray(zero_point, dtype=np.float64)
    scaled = np.asarray(weight, dtype=np.float64) / scale
    nearest = np.clip(np.rint(scaled) + zero_point, qmin, qmax)
    if iterations <= 0:
        return nearest.astype(np.int32)
    # Work in grid steps: a code choice's error is (scaled - offset code) * scale of its column.
    # A weight whose lower grid point lies outside the code range keeps its clipped code (h stays 0).
    floor = np.floor(scaled)
    low, high = qmin - zero_point, qmax - zero_point
    h_high = ((floor >= low) & (floor < high)).astype(np.float32)
    floor = np.clip(floor, low, high)
    gram32 = np.asarray(gram, dtype=np.float32)
    residual = (scaled - floor).astype(np.float32)  # the error is (residual - h) grid steps

    def output_error(codes: np.ndarray) -> float:
        error = ((scaled - (codes - zero_point)) * scale).astype(np.float32)
        return float(np.sum(error * (gram32 @ error), dtype=np.float64))

    baseline = output_error(nearest)
    if baseline <= 0:  # inputs that never fire, or a weight already on the grid
        return nearest.astype(np.int32)

    # Start where h(V) equals the fractional part: the soft weights begin as the float weights.
    start = np.clip(residual, 0.01, 0.99)
    v = -np.log((_ZETA - _GAMMA) / (start - _GAMMA) - 1.0)
    # d/dh of tr(E^T H E) / baseline with E = (residual - h) * scale is (H (h - residual)) * factor.
    factor = (2.0 / baseline * scale.astype(np.float32) ** 2).astype(np.float32)
    reg_factor = 2.0 * regularization / v.size
    # Every step works in place in these buffers: fresh temporaries of this size cost more than the math.
    sigmoid, stretched, h, gradient, work, first, second = (np.zeros_like(v) for _ in range(7))
    kept = np.zeros(v.shape, dtype=bool)
    for step in range(iterations):
        beta = _BETA_START + (_BETA_END - _BETA_START) * step / max(1, iterations - 1)
        np.negative(v, out=sigmoid)
        np.exp(sigmoid, out=sigmoid)
        sigmoid += 1.0
        np.reciprocal(sigmoid, out=sigmoid)
        np.multiply(sigmoid, _ZETA - _GAMMA, out=stretched)
        stretched += _GAMMA
        np.maximum(stretched, 0.0, out=h)
        np.minimum(h, h_high, out=h)
        np.equal(h, stretched, out=kept)  # the rectifier passes gradients only where it does not clip
        np.subtract(h, residual, out=work)
        np.matmul(gram32, work, out=gradient)
        gradient *= factor
        # Regularizer 1 - |2h - 1|^beta: d/dh = -2 beta (2h - 1) |2h - 1|^(beta - 2).
        np.multiply(h, 2.0, out=work)
        work -= 1.0
        np.abs(work, out=stretched)
        np.power(stretched, beta - 2.0, out=stretched)
        stretched *= work
        stretched *= reg_factor * beta
        gradient -= stretched
        # Chain rule through h = (zeta - gamma) sigmoid(V) + gamma.
        np.subtract(1.0, sigmoid, out=work)
        work *= sigmoid
        work *= (_ZETA - _GAMMA)
        gradient *= work
        gradient *= kept
        # Adam.
        first *= _ADAM_BETAS[0]
        np.multiply(gradient, 1.0 - _ADAM_BETAS[0], out=work)
        first += work
        second *= _ADAM_BETAS[1]
        np.multiply(gradient, gradient, out=work)
        work *= 1.0 - _ADAM_BETAS[1]
        second += work
        rate = learning_rate * math.sqrt(1 - _ADAM_BETAS[1] ** (step + 1)) / (1 - _ADAM_BETAS[0] ** (step + 1))
        np.sqrt(second, out=work)
        work += _ADAM_EPS
        np.divide(first, work, out=work)
        work *= rate
        v -= work
        np.clip(v, -_V_LIMIT, _V_LIMIT, out=v)  # h is 0 or 1 long before; this keeps exp() finite

    up = np.clip(1.0 / (1.0 + np.exp(-v)) * (_ZETA - _GAMMA) + _GAMMA, 0.0, h_high) >= 0.5
    learned = np.clip(floor + up + zero_point, qmin, qmax)
    return (learned if output_error(learned) <= baseline else nearest).astype(np.int32)
