"""The ``pyqshare`` command line: one entry point, one module per command.

Conventions (../shared/CLI.md): ``--json`` puts exactly one JSON object on stdout; logs and progress go to
stderr; exit status 0 on success, 2 for bad usage or input, 1 for a failure of the work itself.

Each command module exposes ``configure(parser)`` (adds its flags) and ``run(args) -> dict`` (does the work
and returns the report); ``module:function`` names another run function, for modules serving two commands. Modules are imported only when their command runs, so ``pyqshare --help`` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence

from pyqshare.errors import InputError

# command name -> (module, one-line help), in the order of ../shared/CLI.md.
COMMANDS: dict[str, tuple[str, str]] = {
    "int8": ("pyqshare.methods.baselines:run_int8", "baseline: per-tensor int8 weights, 8-bit activations"),
    "int4": ("pyqshare.methods.baselines:run_int4", "baseline: per-tensor int4 weights, 8-bit activations"),
    "per-channel": ("pyqshare.methods.per_channel", "per-channel/per-block weights via scale_search, calibrated activations"),
    "cluster": ("pyqshare.methods.cluster", "k-means weight clustering with cluster-aware refinement, written as QDQ"),
    "sparse": ("pyqshare.methods.sparse", "pruning (unstructured or n:m) with least-squares re-fit, then quantization"),
    "hybrid": ("pyqshare.methods.hybrid", "per-layer mixed precision (fp16/int16/int8/int4) by component or sensitivity"),
    "learned": ("pyqshare.methods.learned", "BatchNorm folding, bias correction, AdaRound learned rounding (no training framework)"),
    "prepare": ("pyqshare.prepare", "fix shapes, fold shape computations, report QNN HTP placement"),
    "evaluate": ("pyqshare.evaluate", "fidelity of a candidate model against a reference"),
}


def _build_parser(chosen: str | None) -> argparse.ArgumentParser:
    """All commands are listed; only the chosen one's module is imported to add its flags."""
    parser = argparse.ArgumentParser(prog="pyqshare", description="Get ONNX model families ready for QNN HTP.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        command.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
        if name == chosen:
            importlib.import_module(module.partition(":")[0]).configure(command)
        command.set_defaults(_module=module)
    return parser


def _print_human(report: dict, indent: str = "") -> None:
    for key, value in report.items():
        if isinstance(value, dict):
            print(f"{indent}{key}:")
            _print_human(value, indent + "  ")
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            print(f"{indent}{key}: {len(value)} entries (use --json for all)")
        else:
            print(f"{indent}{key}: {value}")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _build_parser(next((word for word in argv if word in COMMANDS), None))
    args = parser.parse_args(argv)  # argparse exits with status 2 on bad usage
    try:
        module, _, function = args._module.partition(":")
        report = getattr(importlib.import_module(module), function or "run")(args)
    except InputError as error:
        print(f"pyqshare {args.command}: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # noqa: BLE001  (report the failure as exit status 1, not a traceback)
        print(f"pyqshare {args.command}: failed: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    if args.json:
        json.dump(report, sys.stdout, default=str)
        sys.stdout.write("\n")
    else:
        _print_human(report)
    return 0
