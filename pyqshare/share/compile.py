"""``pyqshare share compile``: build one weight-shared QNN context binary for a family of QDQ models, and
measure it against each model compiled alone.

With onnxruntime-qnn installed (``pyqshare[qnn]``), for 2 to 64 QDQ models:

1. models with dynamic input dims are prepared first (:func:`pyqshare.prepare.prepare_model`: static
   shapes, folded shape computations) into ``DIR/prepared/``;
2. each model's QNN placement is measured (:func:`pyqshare.qnn.placement.placement_report`) and the model is
   linted (:func:`pyqshare.qnn.lint.lint_qdq_model`); ``--require-full-offload`` stops here, with exit
   status 1, when any node would run on the CPU;
3. the family is compiled into ``DIR/shared/`` and each model alone into ``DIR/solo/<model>/``
   (:func:`pyqshare.qnn.compile.compile_family`: each group in its own process, graph count verified);
4. the binaries are inspected through libQnnSystem: graph names, per-graph memory and the shared-weights
   pool, reported beside the pool predicted from the models' quantized weights
   (:func:`predict_shared_bytes_from_qdq`);
5. each model's solo context runs on the HTP simulator with CPU fallback disabled, on the seeded
   evaluation inputs, and its outputs are compared with the QDQ model on onnxruntime's CPU provider.

With ``QNN_SDK_ROOT`` set the QNN SDK tools are the backend instead (qnn-onnx-converter,
qnn-model-lib-generator, qnn-context-binary-generator with ``--model a.so,b.so``): ``pyqshare config`` writes
their configs and command lines, which run in order (:func:`run_sdk`; untested here, where no SDK exists: a
missing tool is refused by name before anything runs). With neither backend, or with ``--dry-run``, nothing
is compiled: the report lists exactly what would run.

Storage rules, measured with onnxruntime-qnn 2.7.0 (QAIRT 2.51, HTP v73) through the binaries' per-graph
``const``/``sharedWeights`` sizes, solo against shared compiles of synthetic graphs and of MiniLM cut into
pieces:

1. The shared-weights pool packs the shared tensors one after another: their bytes rounded down to whole
   pages of 4,096 B, plus one page (:func:`pool_bytes`; four 9,216-byte weights take 10 pages, not 12; one
   page when nothing is shared). Per-channel scales and offsets are not in it.
2. A graph's own constant memory holds its private tensors the same way plus a page or two of its own
   (:data:`GRAPH_OWN_PAGES` beside the packed tensors for plain weights; per-channel weights add about a page
   each).
3. The HTP compiler makes constants of its own, shared like any other when identical. With 16-bit
   activations, ``Add(bias, x)`` with the constant *first* (as PyTorch exports ``bias + x @ W``; MiniLM's 36
   biases) is not fused into the MatMul: the bias is stored broadcast over the rows, ``rows x channels x 2``
   bytes for 512 to 3,072 channels, but only a quarter (384 channels) or a half (768) of that at 128 rows
   (the compiler's tiling choice); ``Add(x, bias)`` costs nothing at those shapes, which is why ``prepare``
   puts constants second (:func:`pyqshare.qnn.rewrites.constants_second`: MiniLM's binary shrinks from 38.5
   to 35.2 MB). At 16 rows a bias second is still stored broadcast. A scalar ``Mul`` constant takes about 7
   pages.
4. A ``Gather`` with constant indices is folded: the stored tensor is the rows gathered, not the table
   (MiniLM's position embeddings: 24 pages instead of 96); a uint8 table gathered into a 16-bit output is
   stored at 16 bits.

Rules 3 and 4 depend on the compiler's choices, so the pool predicted from the models alone
(:attr:`SharedPrediction.pool_bytes`) can miss them: on a MiniLM fine-tune prepared by pyqshare (constants
second) it is 0.4% low, on the same models with ``Add(bias, x)`` 9.8% low, on a 16-row MLP 5% low. Each
model's solo binary does hold them: :meth:`SharedPrediction.pool_from_solo` (its constant memory less the
model's private tensors and its graph's own page) is within 0.2% of the pool on MiniLM and exact on the
synthetic families; ``share compile`` reports both.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import onnx

from pyqshare.calibration import default_inputs, run_model
from pyqshare.errors import InputError
from pyqshare.evaluate import run_on_htp, summarize_outputs
from pyqshare.model import load_model
from pyqshare.prepare import prepare_model
from pyqshare.qnn.compile import MAX_GRAPHS, child_argv, compile_family, context_model_names
from pyqshare.qnn.config import COMBINED_BINARY, SDK_ROOT, graph_names, sdk_commands, write_config
from pyqshare.qnn.context_binary import inspect_context_binary
from pyqshare.qnn.ep import qnn_available
from pyqshare.qnn.lint import lint_qdq_model
from pyqshare.qnn.placement import placement_report
from pyqshare.shapes import declared_dims, parse_input_shapes, runtime_inputs
from pyqshare.share.quantized import load_family, predict_sharing

POOL_PAGE_BYTES = 4096
"""The HTP lays constant memory out in pages of this size (module docstring: storage rules)."""

GRAPH_OWN_PAGES = 1
"""Pages a solo graph's constant memory holds beyond its packed tensors (measured: weights of whole pages give
their pages plus this)."""

PLACEMENT_KEYS = ("htp_nodes", "cpu_nodes", "partitions", "htp_weight_bytes", "cpu_weight_bytes")


# --------------------------------------------------------------------------------- predicted sharing


def pool_bytes(shared_bytes: int) -> int:
    """The shared-weights pool that ``shared_bytes`` of shared tensors fill (rule 1 of the module docstring):
    packed one after another, rounded down to whole pages, one page more.

    Parameters
    ----------
    shared_bytes : int
        Bytes of the shared tensors, each counted once.
    """
    return (shared_bytes // POOL_PAGE_BYTES + 1) * POOL_PAGE_BYTES


@dataclasses.dataclass(frozen=True)
class SharedPrediction:
    """Quantized weights that identical bytes let QNN store once, across a family.

    Attributes
    ----------
    shared_bytes : int
        Bytes of every weight group found in two or more models, each counted once.
    pool_bytes : int
        The shared-weights pool this predicts from the models alone (:func:`pool_bytes`). Constants the HTP
        compiler makes itself (rule 3 of the module docstring) are not in it.
    groups : list[dict]
        ``{"bytes", "members": [{"model": index, "tensor": name}, ...]}`` per shared group.
    private_bytes : list[int]
        Per model, the bytes of its tensors found in no other model.
    """

    shared_bytes: int
    pool_bytes: int
    groups: list[dict]
    private_bytes: list[int]

    def pool_from_solo(self, solo_const_bytes: Sequence[int]) -> int:
        """The pool predicted from each model's solo binary: its constant memory less its private tensors
        and its graph's own page (rule 2), the smallest over models, at least one page. It counts the
        constants the HTP compiler makes itself, which the models alone do not show.

        Parameters
        ----------
        solo_const_bytes : Sequence[int]
            ``const_bytes`` of each model's solo binary, in the family's order.
        """
        return max(POOL_PAGE_BYTES, min(((const - private) // POOL_PAGE_BYTES - GRAPH_OWN_PAGES) * POOL_PAGE_BYTES
                                        for const, private in zip(solo_const_bytes, self.private_bytes, strict=True)))


def predict_shared_bytes_from_qdq(model_paths: Sequence[str | os.PathLike[str]]) -> SharedPrediction:
    """Predict what a weight-shared context stores once: quantized weights with identical bytes, type and
    shape in two or more models, whatever their names and scales (QNN shares by bytes; the grouping is
    :func:`pyqshare.share.quantized.predict_sharing`'s), and the pool they fill.

    Parameters
    ----------
    model_paths : Sequence of paths
        The family's QDQ models.

    Returns
    -------
    SharedPrediction
        Shared bytes, the predicted pool, the shared groups and each model's private bytes.
    """
    family = load_family(model_paths)
    prediction = predict_sharing(family)
    shared = [group for group in prediction.groups if len({member["model"] for member in group["members"]}) > 1]
    shared.sort(key=lambda group: -group["bytes"])
    in_pool = {(member["model"], member["tensor"]) for group in shared for member in group["members"]}
    private = [sum(weight.nbytes for name, weight in member.counted().items() if (index, name) not in in_pool)
               + sum(values.nbytes for name, values in member.float_weights.items() if (index, name) not in in_pool)
               for index, member in enumerate(family)]
    return SharedPrediction(prediction.shared_bytes, pool_bytes(prediction.shared_bytes), shared, private)


# ------------------------------------------------------------------------------------------------ plans


def run_sdk(models: Sequence[Path], output_dir: Path, sdk_root: str) -> dict:
    """Build the weight-shared context binary with the QNN SDK tools: ``pyqshare config`` writes the configs and
    the host command lines into ``DIR/sdk`` (:func:`pyqshare.qnn.config.write_config`), which then run in order.
    Untested here (no SDK on this machine): a missing tool is reported by name before anything runs.

    Parameters
    ----------
    models : Sequence[Path]
        The prepared QDQ models.
    output_dir : Path
        The output folder.
    sdk_root : str
        ``QNN_SDK_ROOT``.

    Returns
    -------
    dict
        ``binary`` (the combined context binary), ``info`` (its inspection) and ``commands`` (as run).
    """
    def host_steps(commands: Sequence[Mapping]) -> list[tuple[str, str, list[str]]]:
        return [(command["step"], command["cwd"], [word.replace(SDK_ROOT, sdk_root) for word in command["argv"]])
                for command in commands if command["where"] == "host"]

    names = graph_names(models)
    missing = sorted({argv[0] for _, _, argv in host_steps(sdk_commands(models, names, names))
                      if not Path(argv[0]).is_file()})
    if missing:
        raise InputError(f"QNN_SDK_ROOT={sdk_root}: no {', '.join(missing)}")
    folder = output_dir / "sdk"
    host = host_steps(write_config(models, folder)["commands"])
    (folder / "build").mkdir(exist_ok=True)
    for step, cwd, argv in host:
        done = subprocess.run(argv, cwd=folder / cwd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{step} failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    binary = folder / "context" / f"{COMBINED_BINARY}.bin"
    return {"binary": str(binary), "info": inspect_context_binary(binary).to_dict(),
            "commands": [shlex.join(argv) for _, _, argv in host]}


def _lint(paths: Sequence[Path]) -> list[dict]:
    return [{"model": str(path), **dataclasses.asdict(finding)} for path in paths for finding in lint_qdq_model(path)]


def _onnxruntime_steps(models: Sequence[Path], prepared: Sequence[Path], output_dir: Path,
                       require_full_offload: bool) -> list[dict]:
    """What an onnxruntime-qnn run does, step by step; compiles as the exact child command lines."""
    steps: list[dict] = [{"step": "prepare", "model": str(model), "output": str(target)}
                         for model, target in zip(models, prepared, strict=True) if model != target]
    steps += [{"step": "placement and lint", "model": str(path)} for path in prepared]
    names = context_model_names(prepared)
    groups = [(prepared, output_dir / "shared", names)]
    groups += [([path], output_dir / "solo" / name.removesuffix("_ctx.onnx"), [name])
               for path, name in zip(prepared, names, strict=True)]
    for paths, folder, outputs in groups:
        argv = child_argv(paths, [folder / name for name in outputs], allow_cpu_fallback=not require_full_offload)
        steps.append({"step": "compile", "output_dir": str(folder), "argv": argv, "command": shlex.join(argv)})
    steps += [{"step": "inspect", "binary": str(output_dir / "shared")},
              *({"step": "fidelity on the HTP simulator", "model": str(path)} for path in prepared)]
    return steps


# ------------------------------------------------------------------------------------------------- the run


def _has_dynamic_inputs(model: onnx.ModelProto) -> bool:
    return any(dims is None or not all(isinstance(dim, int) for dim in dims)
               for dims in (declared_dims(value) for value in runtime_inputs(model.graph)))


def _fidelity(model: Path, context_model: Path, provider_options: Mapping[str, object] | None) -> dict:
    """The solo context on the HTP simulator (no CPU fallback) against the QDQ model on the CPU provider."""
    samples = default_inputs(model, purpose="evaluation")
    names = [output.name for output in load_model(model).graph.output]
    reference = run_model(model, samples, names)
    try:
        htp = run_on_htp(context_model, samples, names, provider_options)
    except RuntimeError as error:
        return {"error": str(error)}
    return {"inputs": f"random:{len(samples)}", **summarize_outputs(reference, htp)}


def share_compile(
    models: Sequence[str | os.PathLike[str]],
    output_dir: str | os.PathLike[str],
    *,
    require_full_offload: bool = False,
    dry_run: bool = False,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    provider_options: Mapping[str, object] | None = None,
    allow_lint_errors: bool = False,
) -> dict:
    """Compile a family of QDQ models into one weight-shared QNN context and report what it saves.

    Parameters
    ----------
    models : Sequence of paths
        2 to 64 QDQ ONNX models (pyqshare's methods write them).
    output_dir : str or os.PathLike
        Where prepared models, the shared context (``shared/``) and the solo contexts (``solo/<model>/``) go.
    require_full_offload : bool
        Fail (RuntimeError, exit status 1) when any node of any model would run on the CPU.
    dry_run : bool
        Only report what would run.
    input_shapes : Mapping[str, Sequence[int]], optional
        Static shapes for dynamic inputs (used when a model needs preparing).
    provider_options : Mapping[str, object], optional
        QNN provider options over pyqshare's defaults.
    allow_lint_errors : bool
        Compile even when the lint finds what the HTP computes wrongly (asymmetric int4 weights, block-wise
        weights with 8-bit activations); by default that is an InputError before anything compiles.

    Returns
    -------
    dict
        The keys of ../shared/CLI.md (``models``, ``graphs``, ``combined_bytes``, ``solo_bytes``,
        ``predicted_shared_bytes``, ``measured_shared_bytes``, ``placement``) plus ``backend``,
        ``predicted_shared_pool_bytes``, ``solo_calibrated_pool_bytes``
        (:meth:`SharedPrediction.pool_from_solo`), ``shared_groups``, ``graph_names``, ``memory``, ``lint``,
        ``fidelity``, ``binary``, ``prepared`` and ``seconds``; with ``dry_run`` or no backend: ``backend``,
        ``dry_run`` true, ``steps`` (onnxruntime-qnn) or ``commands`` (QNN SDK), the prediction and the lint.
    """
    started = time.perf_counter()
    paths = [Path(model) for model in models]
    if not 2 <= len(paths) <= MAX_GRAPHS:
        raise InputError(f"share compile takes 2 to {MAX_GRAPHS} models, got {len(paths)}")
    if len({path.resolve() for path in paths}) != len(paths):
        raise InputError("a model is given twice")
    loaded = [load_model(path) for path in paths]  # refuses missing, empty and hostile files first
    root = Path(output_dir)
    names = context_model_names(paths)
    prepared = [root / "prepared" / name.replace("_ctx.onnx", ".onnx") if _has_dynamic_inputs(model) else path
                for path, model, name in zip(paths, loaded, names, strict=True)]
    prediction = predict_shared_bytes_from_qdq(paths)
    report: dict = {"models": [str(path) for path in paths],
                    "predicted_shared_bytes": prediction.shared_bytes,
                    "predicted_shared_pool_bytes": prediction.pool_bytes,
                    "shared_groups": prediction.groups}
    sdk_root = os.environ.get("QNN_SDK_ROOT")
    backend = "qnn-sdk" if sdk_root else "onnxruntime-qnn" if qnn_available() else None
    if backend == "qnn-sdk" and not dry_run:
        if prepared != paths:
            raise InputError("the QNN SDK route takes prepared models (static shapes): run `pyqshare prepare` first")
        return {**report, "backend": backend, "lint": _lint(paths), **run_sdk(paths, root, sdk_root),
                "seconds": time.perf_counter() - started}
    if dry_run or backend != "onnxruntime-qnn":
        lint = _lint(paths)
        if sdk_root:
            names = graph_names(prepared)
            plan = {"commands": [shlex.join(word.replace(SDK_ROOT, sdk_root) for word in command["argv"])
                                 for command in sdk_commands(prepared, names, names) if command["where"] == "host"]}
        else:
            steps = _onnxruntime_steps(paths, prepared, root, require_full_offload)
            plan = {"steps": steps, "commands": [step["command"] for step in steps if "command" in step]}
        return {**report, "backend": backend, "dry_run": True, **plan, "lint": lint,
                **({} if backend else {"note": 'no QNN backend: pip install "pyqshare[qnn]" or set QNN_SDK_ROOT'}),
                "seconds": time.perf_counter() - started}

    for path, target in zip(paths, prepared, strict=True):
        if target != path:
            prepare_model(path, target, input_shapes, placement="none", provider_options=provider_options)
    placements = [placement_report(path, provider_options) for path in prepared]
    lint = [{"model": str(path), **dataclasses.asdict(finding)}
            for path, placement in zip(paths, placements, strict=True)
            for finding in lint_qdq_model(path, placement)]
    errors = [f"{finding['model']}: {finding['message']}" for finding in lint if finding["severity"] == "error"]
    if errors and not allow_lint_errors:
        raise InputError("the HTP would compute these wrongly (--allow-lint-errors compiles anyway): "
                         + "; ".join(errors))
    on_cpu = {str(path): placement.cpu_ops for path, placement in zip(paths, placements, strict=True) if placement.cpu_nodes}
    if require_full_offload and on_cpu:
        raise RuntimeError(f"--require-full-offload: nodes would run on the CPU: {on_cpu} (see the lint with --dry-run)")
    graphs_needed = sum(placement.partitions for placement in placements)
    if graphs_needed > MAX_GRAPHS:
        raise InputError(f"the family needs {graphs_needed} QNN graphs (partitions) in one context; "
                         f"devices load at most {MAX_GRAPHS}")

    family = compile_family(prepared, root, provider_options, allow_cpu_fallback=not require_full_offload)
    report.update({
        "backend": backend,
        "graphs": len(family.shared.info.graphs),
        "combined_bytes": family.combined_bytes,
        "solo_bytes": {str(path): solo.file_bytes for path, solo in zip(paths, family.solos, strict=True)},
        "solo_total_bytes": sum(family.solo_bytes),
        "measured_shared_bytes": family.shared_weights_bytes,
        "solo_calibrated_pool_bytes": prediction.pool_from_solo([solo.info.const_bytes for solo in family.solos]),
        "binary": str(family.shared.binary),
        "graph_names": {str(path): list(graphs) for path, graphs in zip(paths, family.shared.graphs_by_model, strict=True)},
        "memory": {graph.name: dataclasses.asdict(graph.memory) for graph in family.shared.info.graphs if graph.memory},
        "placement": {str(path): {key: getattr(placement, key) for key in PLACEMENT_KEYS}
                      for path, placement in zip(paths, placements, strict=True)},
        "lint": lint,
        "fidelity": {str(path): _fidelity(model, solo.context_models[0], provider_options)
                     for path, model, solo in zip(paths, prepared, family.solos, strict=True)},
        "prepared": {str(path): str(target) for path, target in zip(paths, prepared, strict=True) if target != path},
        "seconds": time.perf_counter() - started,
    })
    return report


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("models", nargs="*", metavar="MODEL", help="the family's QDQ ONNX models (2 to 64)")
    parser.add_argument("--model-path", action="extend", nargs="+", default=[], metavar="MODEL",
                        help="more models (the Guide's spelling; repeatable)")
    parser.add_argument("--output-dir", required=True, help="where prepared models and the context binaries go")
    parser.add_argument("--require-full-offload", action="store_true",
                        help="fail (exit status 1) when any node would run on the CPU instead of the HTP")
    parser.add_argument("--dry-run", action="store_true", help="print what would run, compile nothing")
    parser.add_argument("--input-shape", action="append", default=[], metavar="NAME=D1,D2,...",
                        help="static shape of a dynamic input, for models that need preparing (repeatable)")
    parser.add_argument("--allow-lint-errors", action="store_true",
                        help="compile even what the lint says the HTP computes wrongly (asymmetric int4 weights, "
                        "block-wise weights with 8-bit activations)")


def run(args: argparse.Namespace) -> dict:
    return share_compile([*args.models, *args.model_path], args.output_dir,
                         require_full_offload=args.require_full_offload, dry_run=args.dry_run,
                         input_shapes=parse_input_shapes(args.input_shape), allow_lint_errors=args.allow_lint_errors)
