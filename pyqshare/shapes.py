"""A model's inputs and their static shapes: the input signature, ``--input-shape`` flags, dynamic-dim defaults.

Every command that feeds or fixes inputs (calibration, evaluation, ``prepare``, the methods) resolves shapes
here, so they all agree on the shape a dynamic model runs with.

Dynamic dims
------------
:func:`resolve_input_shapes` gives every input a static shape. ``--input-shape name=1,128``
(``input_shapes``) fixes an input's full shape and binds the symbolic dims it covers for every other input
that shares them. Any other symbolic dim takes the value of the first row of :data:`DEFAULT_DIMS` whose
pattern its name matches (case-insensitive search):

========  =============================================================  =====
role      dim names                                                      value
========  =============================================================  =====
batch     containing ``batch``, or exactly ``n``, ``b`` or ``bs``          1
sequence  containing ``seq`` or ``length``, or ending in ``len``,          128
          ``token`` or ``tokens``
========  =============================================================  =====

An anonymous dynamic dim (no name) on axis 0 is the batch. Any other dynamic dim is an
:class:`~pyqshare.errors.InputError` that names the input, the axis and the dim, and asks for
``--input-shape``.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np
import onnx

from pyqshare.errors import InputError
from pyqshare.model import load_model

ModelSource = onnx.ModelProto | str | os.PathLike[str]


class DimDefault(NamedTuple):
    """One row of :data:`DEFAULT_DIMS`."""

    role: str
    pattern: re.Pattern[str]
    value: int


_BATCH = DimDefault("batch", re.compile(r"batch|^(n|b|bs)$", re.IGNORECASE), 1)
DEFAULT_DIMS: tuple[DimDefault, ...] = (
    _BATCH,
    DimDefault("sequence", re.compile(r"seq|length|len$|tokens?$", re.IGNORECASE), 128),
)
"""Values for symbolic dims that ``--input-shape`` leaves open, by name (table in the module docstring)."""

_DEFAULTS_TEXT = ", ".join(f"{row.role}-like dims get {row.value}" for row in DEFAULT_DIMS)


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """One graph input: name, numpy dtype, and dims (int, symbolic name, or None when anonymous).

    ``dims`` is None when the model declares no shape at all.
    """

    name: str
    dtype: np.dtype
    dims: tuple[int | str | None, ...] | None


def runtime_inputs(graph: onnx.GraphProto) -> list[onnx.ValueInfoProto]:
    """The inputs ``graph`` is fed at run time: its inputs that are not initializers (old IR versions list
    initializers as inputs too)."""
    initializers = {tensor.name for tensor in graph.initializer}
    return [value for value in graph.input if value.name not in initializers]


def declared_dims(value: onnx.ValueInfoProto) -> tuple[int | str | None, ...] | None:
    """``value``'s dims as declared: an int, a dim name, or None when anonymous; None without a tensor shape.

    A non-positive ``dim_value`` and a ``dim_param`` of "?" (paddle2onnx writes both for unrelated dynamic
    dims) count as anonymous.
    """
    tensor_type = value.type.tensor_type
    if not value.type.HasField("tensor_type") or not tensor_type.HasField("shape"):
        return None
    dims = tensor_type.shape.dim
    return tuple(
        (dim.dim_value if dim.dim_value > 0 else None) if dim.HasField("dim_value")
        else (dim.dim_param if dim.dim_param not in ("", "?") else None)
        for dim in dims
    )


def input_signature(model: ModelSource) -> list[InputSpec]:
    """The inputs a model must be fed (graph inputs that are not initializers), in graph order.

    Parameters
    ----------
    model
        A ModelProto or the path of an ONNX file.
    """
    if not isinstance(model, onnx.ModelProto):
        model = load_model(model)
    specs = []
    for value in runtime_inputs(model.graph):
        if not value.type.HasField("tensor_type") or not value.type.tensor_type.elem_type:
            raise InputError(f"input {value.name!r} is not a tensor with a known element type")
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type))
        specs.append(InputSpec(value.name, dtype, declared_dims(value)))
    return specs


def parse_input_shapes(values: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """Parse repeated ``--input-shape NAME=D1,D2,...`` flags into ``{name: (d1, d2, ...)}``.

    Parameters
    ----------
    values
        The flag values, one per input: a name (surrounding spaces dropped; it may contain ``=``, the last
        one separates it from the dims) and positive integer dims separated by commas.
    """
    shapes: dict[str, tuple[int, ...]] = {}
    for value in values:
        name, sep, dims = value.rpartition("=")
        name = name.strip()
        try:
            shape = tuple(int(dim) for dim in dims.split(","))
        except ValueError:
            shape = ()
        if not sep or not name or not shape or min(shape) <= 0:
            raise InputError(f"--input-shape {value!r}: expected NAME=D1,D2,... with positive integer dims")
        if name in shapes:
            raise InputError(f"--input-shape: input {name!r} is given twice")
        shapes[name] = shape
    return shapes


def resolve_input_shapes(
    model: ModelSource, input_shapes: Mapping[str, Sequence[int]] | None = None
) -> dict[str, tuple[int, ...]]:
    """Static shapes for every input: ``input_shapes`` first, then :data:`DEFAULT_DIMS` (module docstring).

    Parameters
    ----------
    model
        A ModelProto or the path of an ONNX file.
    input_shapes
        ``{input name: full shape}`` overrides; they must agree with the model's static dims, and they bind
        the symbolic dims they cover for every other input that shares them. An input that declares no
        shape takes its override as it is.
    """
    specs = {spec.name: spec for spec in input_signature(model)}
    overrides = {name: tuple(int(dim) for dim in shape) for name, shape in (input_shapes or {}).items()}
    unknown = [name for name in overrides if name not in specs]
    if unknown:
        raise InputError(f"--input-shape: the model has no input {unknown[0]!r}; its inputs: {', '.join(specs)}")
    bound: dict[str, int] = {}
    for name, shape in overrides.items():
        dims = specs[name].dims
        if dims is None:
            continue
        if len(shape) != len(dims):
            raise InputError(f"--input-shape: input {name!r} has rank {len(dims)}, got {len(shape)} dims")
        for axis, (declared, given) in enumerate(zip(dims, shape, strict=True)):
            if isinstance(declared, int) and declared != given:
                raise InputError(
                    f"--input-shape: input {name!r} axis {axis} is fixed at {declared} in the model's static "
                    f"shape {list(dims)}, got {given}"
                )
            if isinstance(declared, str) and bound.setdefault(declared, given) != given:
                raise InputError(
                    f"--input-shape: dim {declared!r} is {bound[declared]} elsewhere but {given} for input "
                    f"{name!r} axis {axis}"
                )
    shapes = {}
    for name, spec in specs.items():
        if name in overrides:
            shapes[name] = overrides[name]
        elif spec.dims is None:
            raise InputError(f"input {name!r} declares no shape: pass --input-shape {name}=D1,D2,...")
        else:
            shapes[name] = tuple(_default_dim(name, axis, dim, bound) for axis, dim in enumerate(spec.dims))
    return shapes


def _default_dim(name: str, axis: int, dim: int | str | None, bound: Mapping[str, int]) -> int:
    if isinstance(dim, int):
        return dim
    if dim is None:
        if axis == 0:
            return _BATCH.value
    elif dim in bound:
        return bound[dim]
    else:
        for row in DEFAULT_DIMS:
            if row.pattern.search(dim):
                return row.value
    which = f"axis {axis}" + ("" if dim is None else f" (dim {dim!r})")
    raise InputError(
        f"input {name!r} {which} is dynamic and has no default ({_DEFAULTS_TEXT}): pass --input-shape {name}=D1,D2,..."
    )
