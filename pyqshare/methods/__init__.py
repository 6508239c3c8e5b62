"""The quantization methods of the Guide, each a ``pyqshare <method>`` command and a Python function.

Every method shares one flow (:mod:`pyqshare.methods.common`): prepare the model for QNN, draw calibration
and evaluation inputs, quantize, write the QDQ model, its AIMET encodings and a JSON summary.
"""
