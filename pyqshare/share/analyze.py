"""``pyqshare share analyze``: which weights a model family shares, by content, whatever their names.

Qualcomm's weight-sharing note extracts each model's ``.bin``, md5s every raw file and compares two folders
by file name. This does the same for 2 to 64 models of any form (:mod:`pyqshare.share.sources`) by content:

1. **Identical** tensors: every tensor is hashed once (:func:`~pyqshare.kernels.tensor_digest`, XXH3-128,
   tree-parallel for big tensors); tensors with the same byte count and digest are nominated and every
   identity is confirmed byte by byte (:func:`~pyqshare.kernels.buffers_equal`) against the first copy seen.
   A reshaped copy is identical bytes and lands in the same group. Each group of identical tensors is a
   *content class*; all later steps work on classes, not tensors.
2. **Layout changes**: a 2-D class (after dropping unit axes) is transposed, hashed and looked up, once, only
   when another class of the same byte count and dtype has the transposed shape; an LSTM/GRU weight (an ONNX
   recurrent weight, or a PyTorch ``weight_ih_l0``-style parameter) is re-stacked into the other framework's
   gate order (ONNX LSTM ``i o f c`` versus PyTorch ``i f g o``, GRU ``z r h`` versus ``r z n``, blocks of
   ``hidden_size`` along the gate axis), hashed and looked up, only when another class has its byte count.
   Every hit is confirmed byte by byte.
3. **Near-duplicates**: float classes are bucketed by element count and dtype; each gets a signature of
   16 seeded Gaussian projections of a strided subsample (at most 4,096 values, the same positions and
   projections for every tensor of that element count). Pairs whose signatures are within four times the
   threshold's angle (a loose bound: the projection keeps angles to within about 3x) and that span two
   models are candidates; at most ``max(16, 2 * models)`` per class, best first, are confirmed on the full
   values: cosine similarity, relative L2 ``||a - b|| / ||a||`` and the maximum absolute difference, in
   float64. Pairs at or above ``near_threshold`` are near-identical.

Counts (per model pair and for the family) follow the note's five, by content. For a pair (A, B) tensors
are matched one to one: identical first (same-named copies preferred), then layout copies, then
near-identical (same name first, then highest cosine), then same-named leftovers are ``different``; the rest
are ``unmatched_a`` / ``unmatched_b``. So ``identical + relaid + near_identical + different + unmatched_a``
is A's tensor count, and likewise for B. For the family, each tensor counts once under its best relation to a
tensor of another model (identical, relaid, near-identical, a same-named tensor: different, or unmatched).

Bytes: ``total_bytes`` sums every tensor of every model; ``unique_bytes`` counts each content class once;
``shared_bytes`` counts once each class present in two or more models (what a weight-shared context's
shared-weights pool would hold; per pair: the classes both models hold).

Size prediction, float-level: a solo context binary stores each distinct tensor of its model once, and one
weight-shared context binary stores each distinct tensor of the family once; sizes are the source bytes
(before quantization). So ``predicted_solo_bytes`` is the sum over models of their distinct bytes and
``predicted_combined_bytes`` is ``unique_bytes``. Not modelled: graph structure, headers and op data, and
quantization, which shrinks all weights alike only when every model quantizes shared weights the same way
(what ``share harmonize`` ensures). Only byte-identical tensors share; layout copies and near-duplicates are
reported as opportunities, not savings.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field

import ml_dtypes
import numpy as np

from pyqshare.errors import InputError
from pyqshare.kernels.hashing import buffers_equal, tensor_digest
from pyqshare.model import WEIGHT_MIN_ELEMENTS
from pyqshare.share.quantized import load_family, quantized_view
from pyqshare.share.sources import GateLayout, SourceTensor, open_model

__all__ = ["MAX_MODELS", "analyze", "configure", "run"]

MAX_MODELS = 64
"""A weight-shared QNN context holds at most 64 graphs (Qualcomm's weight-sharing note)."""

_SIGNATURE_SAMPLE = 4096
_SIGNATURE_PROJECTIONS = 16
# Candidates whose signature angle is within this factor of the threshold's angle are confirmed: with 16
# projections of a 4,096-value sample the projected angle stayed within 3x the true one in 4,000 trials.
_SIGNATURE_SLACK = 4.0
_COMPARE_CHUNK = 1 << 20  # elements per float64 block when confirming near-duplicates
_SIGNATURE_BLOCK = 1 << 22  # signature similarities computed at once (rows x bucket size), 32 MB
# (gates, order) -> (permutation to the other framework's order, description): new block k = old block perm[k].
_GATE_PERMUTATIONS = {
    (4, "onnx"): ((0, 2, 3, 1), "LSTM gates onnx iofc -> torch ifgo"),
    (4, "torch"): ((0, 3, 1, 2), "LSTM gates torch ifgo -> onnx iofc"),
    (3, "onnx"): ((1, 0, 2), "GRU gates onnx zrh -> torch rzn"),
    (3, "torch"): ((1, 0, 2), "GRU gates torch rzn -> onnx zrh"),
}


@dataclass
class _Class:
    """Distinct content: every tensor holding these exact bytes."""

    nbytes: int
    rep: SourceTensor
    members: list[int] = field(default_factory=list)
    models: set[int] = field(default_factory=set)
    gate_layouts: set[GateLayout] = field(default_factory=set)
    signature: np.ndarray | None = None


@dataclass(frozen=True)
class _Relation:
    """A layout copy or near-duplicate between two content classes (``first`` is the earlier one)."""

    kind: str  # "transposed" | "gate_order" | "near_identical"
    first: int
    second: int
    cosine: float = 1.0
    relative_l2: float = 0.0
    max_abs_difference: float = 0.0
    detail: str = ""


def _is_float(dtype: np.dtype) -> bool:
    """Floating point, ml_dtypes' bfloat16 and float8 included (their numpy kind is "V")."""
    try:
        ml_dtypes.finfo(dtype)
    except ValueError:
        return False
    return True


def _squeezed(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(dim for dim in shape if dim != 1)


@functools.lru_cache(maxsize=64)
def _projections(length: int) -> np.ndarray:
    """Seeded Gaussian projections for a sample of ``length`` values (the same for every tensor)."""
    return np.random.default_rng(length).standard_normal((length, _SIGNATURE_PROJECTIONS))


def _signature(values: np.ndarray) -> np.ndarray | None:
    """Unit-norm projections of a strided subsample; None for non-finite or all-zero samples."""
    flat = values.reshape(-1)
    step = max(1, flat.size // _SIGNATURE_SAMPLE)
    sample = flat[::step][:_SIGNATURE_SAMPLE].astype(np.float64)
    projected = sample @ _projections(sample.size)
    norm = float(np.linalg.norm(projected))
    if not math.isfinite(norm) or norm == 0.0:
        return None
    return projected / norm


def _compare_values(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
    """``(cosine, relative L2 of b against a, max |a - b|)`` over the flattened values, in float64 blocks."""
    flat_a, flat_b = a.reshape(-1), b.reshape(-1)
    dot = norm_a = norm_b = diff2 = max_abs = 0.0
    for start in range(0, flat_a.size, _COMPARE_CHUNK):
        block_a = flat_a[start : start + _COMPARE_CHUNK].astype(np.float64)
        block_b = flat_b[start : start + _COMPARE_CHUNK].astype(np.float64)
        difference = block_a - block_b
        dot += float(block_a @ block_b)
        norm_a += float(block_a @ block_a)
        norm_b += float(block_b @ block_b)
        diff2 += float(difference @ difference)
        max_abs = max(max_abs, float(np.abs(difference).max(initial=0.0)))
    if norm_a == 0.0 or norm_b == 0.0:
        return math.nan, math.nan, max_abs
    return dot / math.sqrt(norm_a * norm_b), math.sqrt(diff2 / norm_a), max_abs


class _Family:
    """The content classes of a family, built tensor by tensor, then related to each other."""

    def __init__(self) -> None:
        self.tensors: list[SourceTensor] = []
        self.class_of: list[int] = []
        self.classes: list[_Class] = []
        self.by_key: dict[tuple[int, bytes], list[int]] = defaultdict(list)
        self.by_nbytes: dict[int, list[int]] = defaultdict(list)
        self.relations: list[_Relation] = []

    def add(self, tensor: SourceTensor) -> None:
        """Hash ``tensor``, confirm it against the classes with its digest, and join or found a class."""
        values = tensor.array()
        key = (tensor.nbytes, tensor_digest(values))
        found = next((candidate for candidate in self.by_key.get(key, ())
                      if buffers_equal(values, self.classes[candidate].rep.array())), None)
        if found is None:
            found = len(self.classes)
            self.classes.append(_Class(tensor.nbytes, tensor))
            self.by_key[key].append(found)
            self.by_nbytes[tensor.nbytes].append(found)
            if _is_float(tensor.dtype) and tensor.size:
                self.classes[found].signature = _signature(values)
        content = self.classes[found]
        content.members.append(len(self.tensors))
        content.models.add(tensor.model)
        content.gate_layouts.update(tensor.gate_layouts)
        self.tensors.append(tensor)
        self.class_of.append(found)

    def find_layout_copies(self) -> None:
        """Transposed and gate-reordered copies between classes (module docstring, step 2)."""
        by_shape: dict[tuple, list[int]] = defaultdict(list)
        for index, content in enumerate(self.classes):
            by_shape[(content.nbytes, content.rep.dtype, _squeezed(content.rep.shape))].append(index)
        for index, content in enumerate(self.classes):
            shape = _squeezed(content.rep.shape)
            if len(shape) == 2 and shape <= shape[::-1]:
                others = [other for other in by_shape[(content.nbytes, content.rep.dtype, shape[::-1])] if other != index]
                if others:
                    transposed = np.ascontiguousarray(content.rep.array().reshape(shape).T)
                    self._relate_copies(index, transposed, set(others), "transposed", "2-D transpose")
            if content.gate_layouts and len(self.by_nbytes[content.nbytes]) > 1:
                for layout in sorted(content.gate_layouts, key=lambda found: (found.gates, found.order)):
                    permutation, detail = _GATE_PERMUTATIONS[(layout.gates, layout.order)]
                    if content.nbytes % (layout.outer * layout.gates):
                        continue
                    stacked = content.rep.array().reshape(-1).view(np.uint8).reshape(layout.outer, layout.gates, -1)
                    permuted = np.ascontiguousarray(stacked[:, permutation, :])
                    self._relate_copies(index, permuted, None, "gate_order", detail)

    def _relate_copies(self, index: int, relaid: np.ndarray, allowed: set[int] | None, kind: str, detail: str) -> None:
        digest = tensor_digest(relaid)
        for other in self.by_key.get((self.classes[index].nbytes, digest), ()):
            if other == index or (allowed is not None and other not in allowed):
                continue
            if any({relation.first, relation.second} == {index, other} for relation in self.relations):
                continue
            if buffers_equal(relaid, self.classes[other].rep.array()):
                self.relations.append(_Relation(kind, min(index, other), max(index, other), detail=detail))

    def find_near_duplicates(self, threshold: float, models: int) -> None:
        """Near-identical float classes (module docstring, step 3)."""
        floor = math.cos(min(math.pi / 2, _SIGNATURE_SLACK * math.acos(threshold)))
        per_class = max(16, 2 * models)
        related = {frozenset((relation.first, relation.second)) for relation in self.relations}
        buckets: dict[tuple, list[int]] = defaultdict(list)
        for index, content in enumerate(self.classes):
            if content.signature is not None:
                buckets[(content.rep.size, content.rep.dtype)].append(index)
        for members in buckets.values():
            if len(members) < 2:
                continue
            signatures = np.stack([self.classes[index].signature for index in members])
            candidates: set[tuple[int, int]] = set()
            rows = max(1, _SIGNATURE_BLOCK // len(members))
            for start in range(0, len(members), rows):
                block = signatures[start : start + rows] @ signatures.T
                for offset, similarity in enumerate(block):
                    similarity[start + offset] = -np.inf
                    hits = np.flatnonzero(similarity >= floor)
                    if hits.size > per_class:
                        hits = hits[np.argpartition(-similarity[hits], per_class - 1)[:per_class]]
                    index = members[start + offset]
                    for column in hits:
                        other = members[column]
                        if self._spans_two_models(index, other) and frozenset((index, other)) not in related:
                            candidates.add((min(index, other), max(index, other)))
            for first, second in sorted(candidates):
                cosine, relative_l2, max_abs = _compare_values(self.classes[first].rep.array(),
                                                               self.classes[second].rep.array())
                if cosine >= threshold:
                    self.relations.append(_Relation("near_identical", first, second, cosine, relative_l2, max_abs))

    def _spans_two_models(self, first: int, second: int) -> bool:
        return len(self.classes[first].models | self.classes[second].models) >= 2


def _match_identical(members_a: list[int], members_b: list[int], tensors: list[SourceTensor]):
    """One-to-one pairs within a class, same-named first; returns ``(pairs, leftover a, leftover b)``."""
    free_b = list(members_b)
    pairs, leftover_a = 0, []
    names_b = {tensors[member].name: member for member in members_b}
    unpaired_a = []
    for member in members_a:
        partner = names_b.get(tensors[member].name)
        if partner is not None and partner in free_b:
            free_b.remove(partner)
            pairs += 1
        else:
            unpaired_a.append(member)
    for member in unpaired_a:
        if free_b:
            free_b.pop(0)
            pairs += 1
        else:
            leftover_a.append(member)
    return pairs, leftover_a, free_b


def _entry(tensors: list[SourceTensor], index: int) -> dict:
    return {"model": tensors[index].model, "tensor": tensors[index].name}


def _pair_report(family: _Family, a: int, b: int, members_by_model: list[dict[int, list[int]]],
                 relations_of: dict[int, list[_Relation]]) -> dict:
    tensors, class_of = family.tensors, family.class_of
    in_a, in_b = members_by_model[a], members_by_model[b]
    identical, left_a, left_b = 0, [], []
    for content, members in in_a.items():
        partners = in_b.get(content)
        if partners is not None and len(members) == 1 and len(partners) == 1:
            identical += 1
            continue
        pairs, leftover_a, leftover_b = _match_identical(members, partners or [], tensors)
        identical += pairs
        left_a += leftover_a
        left_b += leftover_b
    left_b += [member for content, members in in_b.items() if content not in in_a for member in members]
    free_a, free_b = set(left_a), set(left_b)
    b_by_class: dict[int, list[int]] = defaultdict(list)
    for member in sorted(left_b):
        b_by_class[class_of[member]].append(member)
    counts = {"identical": identical, "relaid": 0, "near_identical": 0, "different": 0}
    matches = []
    for kinds, count_key in ((("transposed", "gate_order"), "relaid"), (("near_identical",), "near_identical")):
        proposals = []
        for member in sorted(free_a):
            for relation in relations_of.get(class_of[member], ()):
                if relation.kind not in kinds:
                    continue
                other = relation.second if relation.first == class_of[member] else relation.first
                for partner in b_by_class.get(other, ()):
                    renamed = tensors[member].name != tensors[partner].name
                    proposals.append(((renamed, -relation.cosine, member, partner), member, partner, relation))
        for _, member, partner, relation in sorted(proposals, key=lambda proposal: proposal[0]):
            if member in free_a and partner in free_b:
                free_a.discard(member)
                free_b.discard(partner)
                counts[count_key] += 1
                matches.append(_match_entry(relation.kind, tensors[member].name, tensors[partner].name, relation))
    names_b = {tensors[member].name: member for member in sorted(free_b)}
    for member in sorted(free_a):
        partner = names_b.get(tensors[member].name)
        if partner is not None and partner in free_b:
            free_a.discard(member)
            free_b.discard(partner)
            counts["different"] += 1
            matches.append({"kind": "different", "tensor_a": tensors[member].name, "tensor_b": tensors[partner].name})
    shared = sum(family.classes[content].nbytes for content in in_a.keys() & in_b.keys())
    return {"a": a, "b": b, **counts, "unmatched_a": len(free_a), "unmatched_b": len(free_b),
            "shared_bytes": shared, "matches": matches}


def _match_entry(kind: str, name_a: str, name_b: str, relation: _Relation) -> dict:
    entry = {"kind": kind, "tensor_a": name_a, "tensor_b": name_b}
    if kind == "near_identical":
        entry.update(cosine=relation.cosine, relative_l2=relation.relative_l2,
                     max_abs_difference=relation.max_abs_difference)
    else:
        entry["detail"] = relation.detail
    return entry


def _family_counts(family: _Family, relations_of: dict[int, list[_Relation]]) -> dict:
    """Each tensor once, under its best relation to a tensor of another model (module docstring)."""
    models_by_name: dict[str, set[int]] = defaultdict(set)
    for tensor in family.tensors:
        models_by_name[tensor.name].add(tensor.model)
    counts = dict.fromkeys(("identical", "relaid", "near_identical", "different", "unmatched"), 0)
    for index, tensor in enumerate(family.tensors):
        content = family.classes[family.class_of[index]]
        related_models: dict[str, set[int]] = defaultdict(set)
        for relation in relations_of.get(family.class_of[index], ()):
            other = relation.second if relation.first == family.class_of[index] else relation.first
            kind = "near_identical" if relation.kind == "near_identical" else "relaid"
            related_models[kind] |= family.classes[other].models
        if content.models - {tensor.model}:
            counts["identical"] += 1
        elif related_models["relaid"] - {tensor.model}:
            counts["relaid"] += 1
        elif related_models["near_identical"] - {tensor.model}:
            counts["near_identical"] += 1
        elif models_by_name[tensor.name] - {tensor.model}:
            counts["different"] += 1
        else:
            counts["unmatched"] += 1
    return {"tensors": len(family.tensors), **counts}


def analyze(models: list[str | os.PathLike[str]], *, near_threshold: float = 0.99,
            min_elements: int = WEIGHT_MIN_ELEMENTS) -> dict:
    """Analyse what a model family shares (module docstring); the report ``share analyze --json`` prints.

    Parameters
    ----------
    models
        2 to 64 models: ONNX files, raw weight folders, tar ``.bin`` archives or safetensors files, in any mix.
    near_threshold
        Cosine similarity (0 < F <= 1) at or above which two float tensors of equal element count and dtype
        are near-identical.
    min_elements
        Smallest tensor analysed (../shared/CLI.md's weight definition).

    Returns
    -------
    dict
        ``models``, ``total_bytes``, ``unique_bytes``, ``shared_bytes``, ``predicted_combined_bytes``,
        ``predicted_solo_bytes``, ``family`` (counts), ``pairs`` (per pair: the five counts, ``relaid``,
        ``shared_bytes`` and ``matches`` naming every non-identical match), ``groups`` (identical tensors:
        ``bytes`` and ``members``), ``relations`` (layout copies and near-duplicates between groups, with
        their members), ``model_stats`` and ``seconds``.

    Raises
    ------
    InputError
        For fewer than 2 or more than 64 models, a threshold outside (0, 1], a negative ``min_elements``, or
        any unreadable, malformed or hostile model (:func:`pyqshare.share.sources.open_model`).
    """
    if not 2 <= len(models) <= MAX_MODELS:
        raise InputError(f"share analyze needs 2 to {MAX_MODELS} models, got {len(models)}")
    if not 0.0 < near_threshold <= 1.0:
        raise InputError(f"--near-threshold must be in (0, 1], got {near_threshold}")
    if min_elements < 0:
        raise InputError(f"--min-elements must be >= 0, got {min_elements}")
    started = time.perf_counter()
    family = _Family()
    forms = []
    for index, path in enumerate(models):
        source = open_model(path, index, min_elements=min_elements)
        forms.append(source.form)
        for tensor in source.tensors:
            family.add(tensor)
    family.find_layout_copies()
    family.find_near_duplicates(near_threshold, len(models))

    relations_of: dict[int, list[_Relation]] = defaultdict(list)
    for relation in family.relations:
        relations_of[relation.first].append(relation)
        relations_of[relation.second].append(relation)
    members_by_model: list[dict[int, list[int]]] = [defaultdict(list) for _ in models]
    for index, tensor in enumerate(family.tensors):
        members_by_model[tensor.model][family.class_of[index]].append(index)
    pairs = [_pair_report(family, a, b, members_by_model, relations_of)
             for a in range(len(models)) for b in range(a + 1, len(models))]

    classes, tensors = family.classes, family.tensors
    solo = [sum(classes[content].nbytes for content in members_by_model[model]) for model in range(len(models))]
    unique = sum(content.nbytes for content in classes)
    groups = sorted((content for content in classes if len(content.members) > 1), key=lambda content: -content.nbytes)
    return {
        "models": [str(path) for path in models],
        "forms": forms,
        "total_bytes": sum(tensor.nbytes for tensor in tensors),
        "unique_bytes": unique,
        "shared_bytes": sum(content.nbytes for content in classes if len(content.models) > 1),
        "predicted_combined_bytes": unique,
        "predicted_solo_bytes": sum(solo),
        "near_threshold": near_threshold,
        "min_elements": min_elements,
        "family": _family_counts(family, relations_of),
        "pairs": pairs,
        "groups": [{"bytes": content.nbytes, "members": [_entry(tensors, member) for member in content.members]}
                   for content in groups],
        "relations": [_relation_report(family, relation) for relation in family.relations],
        "model_stats": [
            {"model": model, "form": forms[model], "tensors": sum(map(len, members_by_model[model].values())),
             "bytes": sum(tensors[member].nbytes for members in members_by_model[model].values() for member in members),
             "solo_bytes": solo[model]}
            for model in range(len(models))
        ],
        "seconds": time.perf_counter() - started,
    }


def _relation_report(family: _Family, relation: _Relation) -> dict:
    first, second = family.classes[relation.first], family.classes[relation.second]
    report = {"kind": relation.kind, "bytes": first.nbytes,
              "a": [_entry(family.tensors, member) for member in first.members],
              "b": [_entry(family.tensors, member) for member in second.members]}
    if relation.kind == "near_identical":
        report.update(cosine=relation.cosine, relative_l2=relation.relative_l2,
                      max_abs_difference=relation.max_abs_difference)
    else:
        report["detail"] = relation.detail
    return report


def configure(parser: argparse.ArgumentParser) -> None:
    """Add ``share analyze``'s arguments to ``parser``.

    Parameters
    ----------
    parser
        The subcommand's parser (``--json`` is added by the command line).
    """
    parser.add_argument("models", nargs="*", metavar="MODEL",
                        help="2 to 64 models: .onnx, raw weight folders, .bin tar archives, .safetensors")
    parser.add_argument("--model-path", action="extend", nargs="+", default=[], metavar="MODEL",
                        help="more models (the Guide's spelling; repeatable)")
    parser.add_argument("--near-threshold", type=float, default=0.99, metavar="F",
                        help="cosine similarity at or above which tensors are near-identical (default 0.99)")
    parser.add_argument("--min-elements", type=int, default=WEIGHT_MIN_ELEMENTS, metavar="N",
                        help=f"smallest tensor analysed, in elements (default {WEIGHT_MIN_ELEMENTS})")
    parser.add_argument("--quantized", action="store_true",
                        help="also predict sharing as QNN decides it, from quantized bytes: the models are QDQ "
                        "models, or float models with --encodings; lists float-identical weights whose encodings "
                        "differ")
    parser.add_argument("--float-models", nargs="+", metavar="F",
                        help="with --quantized: the float model of each QDQ model, in order (exact float identity)")
    parser.add_argument("--encodings", nargs="+", metavar="E",
                        help="with --quantized: an AIMET encodings file per model (default: OUT.encodings beside it)")


def run(args: argparse.Namespace) -> dict:
    """Run ``share analyze`` from parsed arguments.

    Parameters
    ----------
    args
        ``models``, ``model_path``, ``near_threshold``, ``min_elements``, ``quantized``, ``float_models`` and
        ``encodings`` as :func:`configure` defines them.
    """
    models = [*args.models, *args.model_path]
    if (args.float_models or args.encodings) and not args.quantized:
        raise InputError("--float-models and --encodings belong to --quantized")
    report = analyze(models, near_threshold=args.near_threshold, min_elements=args.min_elements)
    if args.quantized:
        family = load_family(models, float_models=args.float_models, encodings=args.encodings,
                             min_elements=args.min_elements)
        report["quantized"] = quantized_view(family)
    return report
