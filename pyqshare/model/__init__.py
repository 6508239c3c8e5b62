"""ONNX model I/O for quantization: safe loading, weight discovery, atomic writing, QDQ insertion.

``load_model`` -> ``find_weights`` -> ``quantize_weight_in_place`` / ``insert_activation_qdq`` /
``quantize_bias_in_place`` / ``replace_weight`` -> ``save_model``.
"""

from pyqshare.model.graph import find_graph, iter_graphs
from pyqshare.model.io import PROTOBUF_LIMIT, load_model, save_model, supported_ir_version
from pyqshare.model.opset import QDQ_OPSET, default_opset, ensure_opset
from pyqshare.model.qdq import QUANTIZED_TYPES, insert_activation_qdq, quantize_bias_in_place, quantize_weight_in_place
from pyqshare.model.weights import ROLES, Weight, find_weights, replace_weight

__all__ = [
    "PROTOBUF_LIMIT",
    "QDQ_OPSET",
    "QUANTIZED_TYPES",
    "ROLES",
    "Weight",
    "default_opset",
    "ensure_opset",
    "find_graph",
    "find_weights",
    "insert_activation_qdq",
    "iter_graphs",
    "load_model",
    "quantize_bias_in_place",
    "quantize_weight_in_place",
    "replace_weight",
    "save_model",
    "supported_ir_version",
]
