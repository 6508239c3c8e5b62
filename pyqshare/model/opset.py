"""Raising a model's default-domain opset (QDQ with int4/int16 and block-wise scales needs opset 21).

Two routes. When every operator of the model (subgraphs included) keeps its meaning up to the target opset,
the opset import is simply raised: no node changes and no copy of the model is made. An operator keeps its
meaning when each of its schema revisions between the two opsets keeps every attribute (with its type) and
every input, adding only optional ones, and is not one of the few revisions that changed semantics under an
unchanged signature (``_SEMANTIC_CHANGES``, from onnx's Changelog). Between opsets 17 and 21 that holds for
every operator of the MiniLM export: Cast, Constant, ConstantOfShape, Equal, Flatten, Reshape, Shape,
Transpose and Unsqueeze only gained types. Otherwise (e.g. ReduceMean's ``axes`` attribute, which opset 18
turned into an input) onnx's version converter rewrites the affected nodes; it copies the model once.
"""

from __future__ import annotations

import functools

import onnx
from onnx import defs, version_converter

from pyqshare.errors import InputError
from pyqshare.model.graph import iter_graphs

__all__ = ["QDQ_OPSET", "default_opset", "ensure_opset"]

QDQ_OPSET = 21
"""The opset whose QuantizeLinear/DequantizeLinear take int4/uint4/int16/uint16 and ``block_size``."""

# Revisions whose signature stayed compatible but whose meaning changed (onnx docs/Changelog.md).
_SEMANTIC_CHANGES = {
    ("Softmax", 13),  # axis no longer coerces the input to 2-D
    ("LogSoftmax", 13),
    ("Hardmax", 13),
    ("GridSample", 20),  # mode values renamed (bilinear -> linear, bicubic -> cubic)
    ("GroupNormalization", 21),  # scale and bias per channel instead of per group
}


def default_opset(model: onnx.ModelProto) -> int:
    """The model's ``ai.onnx`` opset version (0 if it imports none)."""
    return next((op.version for op in model.opset_import if op.domain in ("", "ai.onnx")), 0)


@functools.cache
def _revisions() -> dict[str, list[defs.OpSchema]]:
    """Every ``ai.onnx`` operator's schema revisions, oldest first."""
    table: dict[str, list[defs.OpSchema]] = {}
    for schema in defs.get_all_schemas_with_history():
        if schema.domain == "":
            table.setdefault(schema.name, []).append(schema)
    for revisions in table.values():
        revisions.sort(key=lambda schema: schema.since_version)
    return table


def _signature_kept(old: defs.OpSchema, new: defs.OpSchema) -> bool:
    """True when ``new`` accepts every node that was valid for ``old``, with the same inputs and attributes."""
    if new.deprecated or len(new.inputs) < len(old.inputs):
        return False
    for name, attr in old.attributes.items():
        if name not in new.attributes or new.attributes[name].type != attr.type:
            return False
    if any(attr.required and name not in old.attributes for name, attr in new.attributes.items()):
        return False
    if any(a.name != b.name for a, b in zip(old.inputs, new.inputs)):
        return False
    added = new.inputs[len(old.inputs) :]
    return all(value.option != defs.OpSchema.FormalParameterOption.Single for value in added)


def _keeps_meaning(op_type: str, current: int, target: int) -> bool:
    """True if every revision of ``op_type`` in (current, target] keeps its signature and meaning."""
    revisions = _revisions().get(op_type, [])
    active = [schema for schema in revisions if schema.since_version <= current]
    if not active:
        return False
    old = active[-1]
    for new in revisions:
        if current < new.since_version <= target:
            if (op_type, new.since_version) in _SEMANTIC_CHANGES or not _signature_kept(old, new):
                return False
            old = new
    return True


def ensure_opset(model: onnx.ModelProto, target: int = QDQ_OPSET) -> str:
    """Raise the model's default-domain opset to at least ``target``, in place.

    Parameters
    ----------
    model
        Modified in place (with the converter route, its contents are replaced by the converted model).
    target
        The opset wanted; a model already at or above it is left alone.

    Returns
    -------
    str
        ``"kept"`` (already there), ``"import"`` (only the opset import changed) or ``"converter"`` (onnx's
        version converter rewrote nodes).

    Raises
    ------
    InputError
        If onnx's version converter cannot convert the model.
    """
    current = default_opset(model)
    if current >= target:
        return "kept"
    op_types = {
        node.op_type
        for _, graph in iter_graphs(model)
        for node in graph.node
        if node.domain in ("", "ai.onnx")
    }
    if current and all(_keeps_meaning(op_type, current, target) for op_type in op_types):
        for opset in model.opset_import:
            if opset.domain in ("", "ai.onnx"):
                opset.version = target
        return "import"
    try:
        converted = version_converter.convert_version(model, target)
    except Exception as error:  # onnx raises RuntimeError or its own C++ errors, depending on the operator
        raise InputError(f"cannot convert the model from opset {current} to {target}: {error}") from None
    model.CopyFrom(converted)
    return "converter"
