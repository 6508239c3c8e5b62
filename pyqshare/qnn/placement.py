"""Where a model's nodes run under the QNN HTP execution provider: on the HTP or on the CPU, and why.

onnxruntime gives QNN only the nodes the backend validates and silently runs the rest on its CPU provider
(../shared/QNN_NOTES.md, "Placement"). :func:`placement_report` opens a real HTP session with CPU fallback
allowed and reads the answer from onnxruntime's own VERBOSE log, which is the only place it is written:

* The QNN EP logs every node unit it validates, in each ``GetCapability`` pass::

      Validation FAILED for 1 nodes in OrtNodeUnit (LayerNormalization) :
      <TAB>Operator type: LayerNormalization Node name: /embeddings/LayerNorm Node index: 9
      <TAB>REASON : Cannot get shape of input 0

  A fused unit (``GeluFusion``, ``ReshapeGemmFusionGroup``, a QDQ group) lists each of its nodes; the
  reason applies to all of them. The last pass (after the layout transform) is the one that counts.
* The session then logs ``Node placements``: ``Node(s) placed on [EP]. Number of nodes: N`` followed by
  ``OpType (name)`` lines, or a single ``All nodes placed on [EP]. Number of nodes: N`` without a list.
  Each QNN partition appears as one fused node, so the QNN count is the number of partitions.

Other ways were tried and rejected: ``optimized_model_filepath`` cannot serialize a graph holding compiled
QNN nodes, and an EPContext compile keeps the CPU nodes but says nothing about which nodes each context
holds. This version of the EP prints no partition summary line; per-node validation plus the placement
list is the complete record.

The session is created in a child process (``python -m pyqshare.qnn._probe``) whose stderr goes to a
temporary file: the C++ log cannot be redirected from Python otherwise, a crash of the QNN backend cannot
take the caller down, and state the backend keeps between sessions does not leak into the caller.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import onnx

from pyqshare.model import iter_nodes, load_model, name_nodes_uniquely, weight_sizes
from pyqshare.qnn.ep import EP_NAME, QnnUnavailableError, child_process_env, htp_provider_options

CPU_EP = "CPUExecutionProvider"
PROVIDERS_MARKER = "pyqshare-probe providers:"
"""Starts the line on which the child process (:mod:`pyqshare.qnn._probe`) reports the session's providers."""

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_HEADER = re.compile(r"^\S+ \S+ \[(?P<severity>[VIWEF]):onnxruntime:[^\]]*\] ?(?P<message>.*)$")
_PASS = re.compile(r"^GetCapability pass (?P<number>\d+)")
_VALIDATION = re.compile(r"^Validation (?P<result>PASSED|FAILED) for \d+ nodes in ")
_MEMBER = re.compile(r"^\tOperator type: (?P<op>\S+) Node name: (?P<name>.*) Node index: \d+$")
_REASON = re.compile(r"^\tREASON ?: ?(?P<reason>.*)$")
_PLACED = re.compile(r"^ (?:All nodes|Node\(s\)) placed on \[(?P<ep>[^\]]+)\]\. Number of nodes: (?P<count>\d+)$")
_PLACED_NODE = re.compile(r"^  (?P<op>\S+) \((?P<name>.*)\)$")
_QUOTED = re.compile(r"[`'](?P<name>[^`']+)[`']")

_PASSED_BUT_CPU = "passed QNN validation, but onnxruntime left it on the CPU"
_NOT_VALIDATED = "not offered to the QNN EP (no validation record in its log)"


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where a model runs under the QNN HTP EP with CPU fallback allowed.

    Node counts are nodes of the graph onnxruntime partitions (the model after its load-time basic
    optimizations: constant folding and a few fusions). Weight bytes count the model's weights
    (../shared/CLI.md: tensors of at least 64 elements) by the side of the nodes that consume them; a
    weight consumed on both sides counts once on each side, and one consumed by nothing that runs (folded
    away by onnxruntime) counts on neither.

    Attributes
    ----------
    htp_nodes, cpu_nodes : int
        Nodes inside QNN partitions and nodes left on onnxruntime's CPU provider.
    partitions : int
        QNN partitions (each becomes one QNN graph; 1 means the whole model runs as one HTP graph).
    htp_weight_bytes, cpu_weight_bytes : int
        Weight bytes consumed on each side.
    cpu_ops : dict[str, int]
        Op types left on the CPU, with counts, most frequent first.
    fallback_reasons : list[dict[str, str]]
        One ``{"node", "op_type", "reason"}`` per CPU node, the reason as the QNN EP logged it.
    """

    htp_nodes: int
    cpu_nodes: int
    partitions: int
    htp_weight_bytes: int
    cpu_weight_bytes: int
    cpu_ops: dict[str, int]
    fallback_reasons: list[dict[str, str]]

    def to_dict(self) -> dict:
        """The JSON form (keys of ../shared/CLI.md's ``placement`` plus ``cpu_ops`` and ``fallback_reasons``)."""
        return dataclasses.asdict(self)


@dataclasses.dataclass
class _Unit:
    """One validation record: a node unit (a single node or a fused group) and the EP's verdict."""

    passed: bool
    reason: str = ""
    members: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class _SessionLog:
    validations: dict[str, tuple[_Unit, str]]  # node -> (its unit in the deciding pass, op type)
    notes: dict[str, list[str]]  # node -> warnings and errors that quote its name
    placed: dict[str, int]  # EP -> nodes placed on it (QNN: one fused node per partition)
    listed: dict[str, list[tuple[str, str]]]  # EP -> (op type, node name) when the log lists them
    providers: list[str] | None
    last_line: str


def _parse_session_log(lines: Iterable[str]) -> _SessionLog:
    """The validation records, node placements and warnings of one session's VERBOSE log."""
    passes: list[dict[str, tuple[_Unit, str]]] = [{}]  # the GetCapability passes of the current call
    calls = [passes]  # one entry per GetCapability call (the main graph, then each subgraph)
    unit: _Unit | None = None  # the validation record being read
    notes: dict[str, list[str]] = collections.defaultdict(list)
    placed: dict[str, int] = collections.Counter()
    listed: dict[str, list[tuple[str, str]]] = collections.defaultdict(list)
    placement_ep: str | None = None  # set while reading a placement list
    providers: list[str] | None = None
    last_line = ""
    for raw in lines:
        line = _ANSI.sub("", raw.rstrip("\r\n"))
        if line.strip():
            last_line = line
        header = _HEADER.match(line)
        if header is None:  # a continuation line
            if line.startswith(PROVIDERS_MARKER):
                providers = json.loads(line[len(PROVIDERS_MARKER):])
            elif unit is not None and (member := _MEMBER.match(line)) is not None:
                unit.members.append(member["name"])
                passes[-1][member["name"]] = (unit, member["op"])
            elif unit is not None and (reason := _REASON.match(line)) is not None:
                unit.reason = reason["reason"].strip()
            continue
        message = header["message"]
        unit = None
        if header["severity"] in "WEF":
            for name in _QUOTED.findall(message):
                if message not in notes[name]:
                    notes[name].append(message)
        if (summary := _PLACED.match(message)) is not None:
            placement_ep = summary["ep"]
            placed[placement_ep] += int(summary["count"])
            continue
        if placement_ep is not None and (entry := _PLACED_NODE.match(message)) is not None:
            listed[placement_ep].append((entry["op"], entry["name"]))
            continue
        placement_ep = None
        if (validation := _VALIDATION.match(message)) is not None:
            unit = _Unit(passed=validation["result"] == "PASSED")
        elif (number := _PASS.match(message)) is not None and passes[-1]:
            if number["number"] == "1":
                passes = [{}]
                calls.append(passes)
            else:
                passes.append({})
    validations: dict[str, tuple[_Unit, str]] = {}
    for call in calls:
        validations.update(call[-1])  # the last pass of each call decides
    return _SessionLog(validations, dict(notes), dict(placed), dict(listed), providers, last_line)


def _fallback_reason(log: _SessionLog, name: str) -> str:
    """The EP's reason for leaving ``name`` on the CPU, with any warning that quotes a node of its unit."""
    if name not in log.validations:
        return _NOT_VALIDATED
    unit, _ = log.validations[name]
    if unit.passed:
        return _PASSED_BUT_CPU
    details = dict.fromkeys(note for member in unit.members for note in log.notes.get(member, ()))
    return " | ".join([unit.reason or "validation failed without a reason", *details])


def _owner(created: str, names: set[str]) -> str | None:
    """The model node an onnxruntime-made node stems from: the longest model node name that, followed by
    ``/`` or ``_``, starts ``created`` (onnxruntime names fusions ``<node>/MatMulAddFusion`` and alike)."""
    for cut in range(len(created) - 1, 0, -1):
        if created[cut] in "/_" and created[:cut] in names:
            return created[:cut]
    return None


def _weight_bytes_by_side(model: onnx.ModelProto, htp: set[str], cpu: set[str]) -> tuple[int, int]:
    """Weight bytes consumed by HTP and by CPU nodes.

    Nodes that onnxruntime folded or fused away at load time pass the weights they consumed on to the
    consumers of their outputs, so a weight reaches the side of the first node that actually runs it.
    """
    weights = weight_sizes(model)
    names = {node.name for node in iter_nodes(model)}
    side: dict[str, str] = {}
    for where, placed in (("htp", htp), ("cpu", cpu)):
        for name in placed:
            if name in names:
                side[name] = where
    for where, placed in (("htp", htp), ("cpu", cpu)):
        for name in placed - names:
            if (owner := _owner(name, names)) is not None:
                side.setdefault(owner, where)
    carried: dict[str, set[str]] = {name: {name} for name in weights}
    consumed: dict[str, set[str]] = {"htp": set(), "cpu": set()}
    for node in iter_nodes(model):
        if node.op_type == "Constant" and not node.domain:
            continue
        reaching = set().union(*(carried.get(name, ()) for name in node.input))
        if (where := side.get(node.name)) is not None:
            consumed[where] |= reaching
        else:
            for output in node.output:
                carried.setdefault(output, set()).update(reaching)
    return tuple(sum(weights[name] for name in consumed[where]) for where in ("htp", "cpu"))


def _placement(log: _SessionLog, model: onnx.ModelProto, source: Path) -> Placement:
    if not log.providers or log.providers[0] != EP_NAME:
        raise QnnUnavailableError(f"the QNN EP was not used for {source} (providers {log.providers}): {log.last_line}")
    if not log.placed:
        raise RuntimeError(f"onnxruntime logged no node placements for {source}; cannot tell where nodes run")
    partitions = log.placed.get(EP_NAME, 0)
    cpu_entries = list(log.listed.get(CPU_EP, []))
    listed_cpu = {name for _, name in cpu_entries}
    htp = {name for name, (unit, _) in log.validations.items() if unit.passed and name not in listed_cpu}
    if not partitions:
        htp = set()
    if log.placed.get(CPU_EP, 0) > len(cpu_entries):  # "All nodes placed on [CPU]" comes without a list
        cpu_entries += [(op, name) for name, (_, op) in log.validations.items() if name not in htp | listed_cpu]
    htp_bytes, cpu_bytes = _weight_bytes_by_side(model, htp, {name for _, name in cpu_entries})
    return Placement(
        htp_nodes=len(htp),
        cpu_nodes=log.placed.get(CPU_EP, 0),
        partitions=partitions,
        htp_weight_bytes=htp_bytes,
        cpu_weight_bytes=cpu_bytes,
        cpu_ops=dict(collections.Counter(op for op, _ in cpu_entries).most_common()),
        fallback_reasons=[
            {"node": name, "op_type": op, "reason": _fallback_reason(log, name)} for op, name in cpu_entries
        ],
    )


def placement_report(
    model_path: str | os.PathLike[str], provider_options: Mapping[str, object] | None = None
) -> Placement:
    """Open a real QNN HTP session on ``model_path`` (CPU fallback allowed) and report which nodes run where.

    The session uses onnxruntime's basic optimization level: nodes are partitioned exactly as in a
    default session (the later optimization levels only fuse nodes already left on the CPU), and the CPU
    nodes keep their names. Nodes without a unique name are named first (in a temporary copy) so that
    every log record points at one node.

    Parameters
    ----------
    model_path : str or os.PathLike
        The ONNX model; external data must lie in its folder.
    provider_options : Mapping[str, object], optional
        QNN provider options over pyqshare's defaults (``soc_model`` 43, ``htp_arch`` 73); unknown keys
        raise :class:`~pyqshare.errors.InputError`.

    Returns
    -------
    Placement
        Node counts, partitions, weight bytes per side, CPU op types and the reason for each fallback.

    Raises
    ------
    InputError
        The file is missing or not an ONNX model, its external data escapes its folder, or an option is unknown.
    QnnUnavailableError
        onnxruntime-qnn is missing or the QNN EP could not be used.
    RuntimeError
        onnxruntime could not create the session (its last error is in the message).
    """
    path = Path(model_path)
    model = load_model(path)
    options = {key: str(value) for key, value in (provider_options or {}).items()}
    htp_provider_options(options)  # validate keys and find the backend here, not in the child
    env = child_process_env()
    with tempfile.TemporaryDirectory(prefix="pyqshare-placement-") as tmp:
        args = [str(path), json.dumps(options)]
        if name_nodes_uniquely(model):
            renamed = Path(tmp) / "named.onnx"
            renamed.write_bytes(model.SerializeToString())
            args = [str(renamed), json.dumps(options), str(path.resolve().parent)]
        log_path = Path(tmp) / "session.log"
        with open(log_path, "wb") as log_file:
            # -P: import pyqshare from PYTHONPATH (this very package), never from the working directory.
            returncode = subprocess.run(
                [sys.executable, "-P", "-m", "pyqshare.qnn._probe", *args],
                stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT, env=env, check=False,
            ).returncode
        with open(log_path, encoding="utf-8", errors="replace") as lines:
            log = _parse_session_log(lines)
    if returncode != 0:
        raise RuntimeError(f"onnxruntime could not open a QNN HTP session on {path}: {log.last_line}")
    return _placement(log, model, path)
