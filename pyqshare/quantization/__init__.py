"""Model-level quantization: the QDQ pipeline every method uses and the techniques it calls.

``scheme`` (what to quantize how), ``pipeline`` (calibrate, quantize weights and activations, write QDQ),
``rounding`` (GPTQ), ``adaround`` (learned rounding), ``folding`` (BatchNorm folding), ``bias_correction``.
(Not ``pyqshare.quantize``: that name is the kernel function ``pyqshare.quantize``.)
"""
