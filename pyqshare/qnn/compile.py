"""Compile ONNX models into QNN HTP context binaries with onnxruntime-qnn: one weight-shared context for a
family, and each model alone for comparison.

onnxruntime's EPContext compile (``ort.ModelCompiler(...).compile_to_file``) with the session config
``ep.share_ep_contexts=1`` on every model and ``ep.stop_share_ep_contexts=1`` on the last puts every
model's QNN graphs into one context binary (``<first model>_ctx_qnn.bin``) and writes a small
``<model>_ctx.onnx`` per model whose ``EPContext`` nodes point into it (../shared/QNN_NOTES.md). QNN shares
a weight between graphs of one context when its quantized bytes are identical.

Two traps of that mechanism are handled here. A model that fails inside a shared group still adds its
graph, and a group whose last session fails leaks into the next group of the same process: so each group
compiles in its own child process (``python -P -c ...``) and, afterwards, the graphs the binary holds (read
by :func:`pyqshare.qnn.context_binary.inspect_context_binary`) must be exactly the ``EPContext`` nodes of
the group's compiled models. And QNN compiles 70 graphs into one context without complaint, though a
device loads at most :data:`MAX_GRAPHS`: the limit is enforced here.

Outputs are staged in a temporary folder beside the destination and moved into place only when the
group compiled and verified; a failure leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import onnx

from pyqshare.errors import InputError
from pyqshare.qnn.context_binary import ContextBinaryInfo, inspect_context_binary
from pyqshare.qnn.ep import child_process_env, htp_provider_options, htp_session_options, native_stdout_to_stderr

MAX_GRAPHS = 64
"""Graphs one context binary may hold to load on a device (QNN HTP's limit; the compiler does not check)."""

SHARE_CONFIG = {"ep.share_ep_contexts": "1"}
STOP_SHARING_CONFIG = {"ep.stop_share_ep_contexts": "1"}
CONTEXT_SUFFIX = "_ctx.onnx"

_CHILD = "from pyqshare.qnn.compile import _child_main; _child_main()"


@dataclasses.dataclass(frozen=True)
class CompiledContext:
    """One context binary and the EPContext models that use it.

    Attributes
    ----------
    binary : Path
        The context binary (``<first model>_ctx_qnn.bin``).
    context_models : tuple[Path, ...]
        One ``<model>_ctx.onnx`` per compiled model, in the order given (nodes QNN did not take stay in
        them and run on onnxruntime's CPU provider).
    graphs_by_model : tuple[tuple[str, ...], ...]
        The QNN graphs (EPContext node names) of each model: one per QNN partition.
    info : ContextBinaryInfo
        What libQnnSystem reports about the binary.
    """

    binary: Path
    context_models: tuple[Path, ...]
    graphs_by_model: tuple[tuple[str, ...], ...]
    info: ContextBinaryInfo

    @property
    def file_bytes(self) -> int:
        """The binary's size on disk."""
        return self.info.file_bytes


@dataclasses.dataclass(frozen=True)
class FamilyCompile:
    """A family compiled into one weight-shared context, and each model alone.

    Attributes
    ----------
    shared : CompiledContext
        All models in one context.
    solos : tuple[CompiledContext, ...]
        Each model in its own context, in the order given.
    """

    shared: CompiledContext
    solos: tuple[CompiledContext, ...]

    @property
    def combined_bytes(self) -> int:
        """Size of the weight-shared binary."""
        return self.shared.file_bytes

    @property
    def solo_bytes(self) -> list[int]:
        """Size of each model's own binary."""
        return [solo.file_bytes for solo in self.solos]

    @property
    def shared_weights_bytes(self) -> int:
        """The shared-weights pool the weight-shared binary reports."""
        return self.shared.info.shared_weights_bytes


def context_model_names(models: Sequence[str | os.PathLike[str]]) -> list[str]:
    """``<stem>_ctx.onnx`` for each model, made unique (``<stem>_2_ctx.onnx``...) when stems repeat.

    Parameters
    ----------
    models : Sequence of paths
        The ONNX models, in order.
    """
    names: list[str] = []
    for model in models:
        stem, counter = Path(model).stem, 1
        candidate = stem
        while f"{candidate}{CONTEXT_SUFFIX}" in names:
            counter += 1
            candidate = f"{stem}_{counter}"
        names.append(f"{candidate}{CONTEXT_SUFFIX}")
    return names


def child_argv(
    models: Sequence[str | os.PathLike[str]],
    outputs: Sequence[str | os.PathLike[str]],
    provider_options: Mapping[str, object] | None = None,
    *,
    allow_cpu_fallback: bool = True,
) -> list[str]:
    """The exact command that compiles ``models`` into one context (shared when more than one).

    Parameters
    ----------
    models : Sequence of paths
        The ONNX models (static shapes, QDQ), in order; the context binary is named after the first.
    outputs : Sequence of paths
        The ``*_ctx.onnx`` to write for each model.
    provider_options : Mapping[str, object], optional
        QNN provider options over pyqshare's defaults (keys validated).
    allow_cpu_fallback : bool
        False: a node QNN rejects fails the compile instead of staying on the CPU.
    """
    spec = {
        "models": [os.fspath(model) for model in models],
        "outputs": [os.fspath(output) for output in outputs],
        "options": {key: str(value) for key, value in (provider_options or {}).items()},
        "allow_cpu_fallback": allow_cpu_fallback,
    }
    return [sys.executable, "-P", "-c", _CHILD, json.dumps(spec)]


def _child_main() -> None:
    """Child process: compile one group (spec in argv[1]); print ``{"error": ...}`` on failure, else ``{}``."""
    import onnxruntime as ort

    spec = json.loads(sys.argv[1])
    models, outputs = spec["models"], spec["outputs"]
    share = len(models) > 1
    report: dict = {}
    with native_stdout_to_stderr():
        for index, (model, output) in enumerate(zip(models, outputs, strict=True)):
            config = {**SHARE_CONFIG, **(STOP_SHARING_CONFIG if index == len(models) - 1 else {})} if share else {}
            options = htp_session_options(spec["options"], disable_cpu_fallback=not spec["allow_cpu_fallback"],
                                          config_entries=config)
            try:
                ort.ModelCompiler(options, model, embed_compiled_data_into_model=False).compile_to_file(output)
            except Exception as error:  # noqa: BLE001  (onnxruntime raises its own types; report, do not trace)
                report = {"error": f"{model}: {str(error).splitlines()[0] if str(error) else type(error).__name__}",
                          "model": index}
                break
    json.dump(report, sys.stdout)
    sys.stdout.flush()


def _epcontext_graphs(context_model: Path) -> tuple[list[str], set[str]]:
    """The EPContext node names of a compiled model and the context binaries they point to."""
    model = onnx.load(context_model, load_external_data=False)
    graphs, binaries = [], set()
    for node in model.graph.node:
        if node.op_type != "EPContext":
            continue
        graphs.append(node.name)
        for attribute in node.attribute:
            if attribute.name == "ep_cache_context":
                binaries.add(attribute.s.decode())
    return graphs, binaries


def _verify(
    staging: Path, outputs: Sequence[Path], models: Sequence[Path]
) -> tuple[Path, tuple[tuple[str, ...], ...], ContextBinaryInfo]:
    """Check that the group produced one binary holding exactly its models' graphs, at most MAX_GRAPHS."""
    graphs_by_model, binaries = [], set()
    for output, model in zip(outputs, models, strict=True):
        if not output.is_file():
            raise RuntimeError(f"onnxruntime wrote no compiled model for {model}")
        graphs, referenced = _epcontext_graphs(output)
        if not graphs:
            raise InputError(f"{model}: no node runs on the QNN HTP, so nothing was compiled (see `pyqshare prepare`)")
        graphs_by_model.append(tuple(graphs))
        binaries |= referenced
    if len(binaries) != 1:
        raise RuntimeError(f"the compiled models point to {len(binaries)} context binaries ({sorted(binaries)}), not one")
    binary = staging / binaries.pop()
    if binary.parent != staging or not binary.is_file():
        raise RuntimeError(f"the compiled models point to {binary.name}, which onnxruntime did not write")
    info = inspect_context_binary(binary)
    expected = [graph for graphs in graphs_by_model for graph in graphs]
    if sorted(info.graph_names) != sorted(expected):
        extra = sorted(set(info.graph_names) - set(expected))
        missing = sorted(set(expected) - set(info.graph_names))
        raise RuntimeError(f"{binary.name} holds {len(info.graphs)} graphs, its models {len(expected)} "
                           f"(extra {extra}, missing {missing}): a failed compile leaked into this group")
    if len(info.graphs) > MAX_GRAPHS:
        raise InputError(f"the family needs {len(info.graphs)} QNN graphs in one context; devices load at most "
                         f"{MAX_GRAPHS} (split the family, or prepare the models so each is one partition)")
    return binary, tuple(graphs_by_model), info


def compile_context(
    models: Sequence[str | os.PathLike[str]],
    output_dir: str | os.PathLike[str],
    provider_options: Mapping[str, object] | None = None,
    *,
    allow_cpu_fallback: bool = True,
    timeout: float | None = None,
) -> CompiledContext:
    """Compile ``models`` into one QNN context binary in a child process and verify it.

    With more than one model the context is weight-shared (identical quantized weights are stored once).

    Parameters
    ----------
    models : Sequence of paths
        1 to :data:`MAX_GRAPHS` ONNX models with static shapes (QDQ for the HTP), external data beside each.
    output_dir : str or os.PathLike
        Where the ``*_ctx.onnx`` files and the binary go (created; existing files of the same names are
        replaced, others left alone).
    provider_options : Mapping[str, object], optional
        QNN provider options over pyqshare's defaults (``soc_model`` 43, ``htp_arch`` 73).
    allow_cpu_fallback : bool
        True (default): nodes QNN rejects stay on onnxruntime's CPU provider in the ``*_ctx.onnx``; False: they
        fail the compile.
    timeout : float, optional
        Seconds before the compile is stopped (None: no limit; large models take minutes).

    Returns
    -------
    CompiledContext
        The binary, the compiled models, the graphs of each model and the binary's inspection.

    Raises
    ------
    InputError
        No model, more than :data:`MAX_GRAPHS` models or graphs, a model with no node on the HTP, or an
        unknown provider option.
    RuntimeError
        onnxruntime failed to compile a model (its message is included), or the binary does not hold exactly
        the group's graphs.
    """
    models = [Path(model) for model in models]
    if not models:
        raise InputError("no model to compile")
    if len(models) > MAX_GRAPHS:
        raise InputError(f"{len(models)} models cannot share one context: devices load at most {MAX_GRAPHS} graphs")
    htp_provider_options(provider_options)  # validate keys here, not in the child
    destination = Path(output_dir)
    destination.mkdir(parents=True, exist_ok=True)
    names = context_model_names(models)
    with tempfile.TemporaryDirectory(prefix=".pyqshare-compile-", dir=destination) as tmp:
        staging = Path(tmp)
        outputs = [staging / name for name in names]
        argv = child_argv([model.resolve() for model in models], outputs, provider_options,
                          allow_cpu_fallback=allow_cpu_fallback)
        try:
            done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout,
                                  env=child_process_env(), check=False)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"compiling {len(models)} model(s) took longer than {timeout:g} s") from None
        report = _child_report(done)
        if "error" in report:
            raise RuntimeError(f"onnxruntime-qnn could not compile {report['error']}")
        binary, graphs_by_model, info = _verify(staging, outputs, models)
        placed = [destination / path.name for path in (binary, *outputs)]
        for path, target in zip((binary, *outputs), placed, strict=True):
            os.replace(path, target)
    return CompiledContext(
        binary=placed[0], context_models=tuple(placed[1:]), graphs_by_model=graphs_by_model,
        info=dataclasses.replace(info, path=str(placed[0])),
    )


def _child_report(done: subprocess.CompletedProcess) -> dict:
    with contextlib.suppress(json.JSONDecodeError):
        return json.loads(done.stdout)
    lines = done.stderr.decode(errors="replace").strip().splitlines()
    how = f"signal {-done.returncode}" if done.returncode < 0 else f"exit status {done.returncode}"
    return {"error": f"the compile process ended with {how}: {lines[-1] if lines else 'no message'}"}


def compile_family(
    models: Sequence[str | os.PathLike[str]],
    output_dir: str | os.PathLike[str],
    provider_options: Mapping[str, object] | None = None,
    *,
    allow_cpu_fallback: bool = True,
    timeout: float | None = None,
) -> FamilyCompile:
    """Compile a family into one weight-shared context (``output_dir/shared``) and each model alone
    (``output_dir/solo/<model>``), every group in its own child process.

    Parameters
    ----------
    models : Sequence of paths
        2 to :data:`MAX_GRAPHS` ONNX models with static shapes.
    output_dir : str or os.PathLike
        The output folder.
    provider_options : Mapping[str, object], optional
        QNN provider options over pyqshare's defaults.
    allow_cpu_fallback : bool
        Whether nodes QNN rejects may stay on the CPU (see :func:`compile_context`).
    timeout : float, optional
        Seconds allowed per group (None: no limit).

    Returns
    -------
    FamilyCompile
        The shared context and the solo contexts; a group that fails removes what it wrote, the groups
        compiled before it stay.
    """
    if len(models) < 2:
        raise InputError(f"a family needs at least 2 models, got {len(models)}")
    root = Path(output_dir)
    shared = compile_context(models, root / "shared", provider_options,
                             allow_cpu_fallback=allow_cpu_fallback, timeout=timeout)
    solo_dirs = [root / "solo" / name.removesuffix(CONTEXT_SUFFIX) for name in context_model_names(models)]
    solos = tuple(
        compile_context([model], folder, provider_options, allow_cpu_fallback=allow_cpu_fallback, timeout=timeout)
        for model, folder in zip(models, solo_dirs, strict=True)
    )
    return FamilyCompile(shared=shared, solos=solos)

