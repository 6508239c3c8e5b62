"""ONNX model I/O for quantization: safe loading, weight discovery, atomic writing, QDQ insertion.

``load_model`` -> ``find_weights`` -> ``quantize_weight_in_place`` / ``insert_activation_qdq`` /
``quantize_bias_in_place`` / ``replace_weight`` -> ``save_model``.
"""

from pyqshare.model.external import external_tensors
from pyqshare.model.graph import find_graph, iter_graphs, iter_nodes, name_nodes_uniquely
from pyqshare.model.io import PROTOBUF_LIMIT, external_data_path, load_model, save_model, supported_ir_version
from pyqshare.model.opset import QDQ_OPSET, default_opset, ensure_opset
from pyqshare.model.qdq import QUANTIZED_TYPES, insert_activation_qdq, quantize_bias_in_place, quantize_weight_in_place
from pyqshare.model.weights import ROLES, WEIGHT_MIN_ELEMENTS, Weight, find_weights, replace_weight, weight_sizes

__all__ = [
    "PROTOBUF_LIMIT",
    "QDQ_OPSET",
    "QUANTIZED_TYPES",
    "ROLES",
    "WEIGHT_MIN_ELEMENTS",
    "Weight",
    "default_opset",
    "ensure_opset",
    "external_data_path",
    "external_tensors",
    "find_graph",
    "find_weights",
    "insert_activation_qdq",
    "iter_graphs",
    "iter_nodes",
    "load_model",
    "name_nodes_uniquely",
    "quantize_bias_in_place",
    "quantize_weight_in_place",
    "replace_weight",
    "save_model",
    "supported_ir_version",
    "weight_sizes",
]
