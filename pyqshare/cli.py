"""The ``pyqshare`` command line: one entry point, one module per command.

Conventions (../shared/CLI.md): ``--json`` puts exactly one JSON object on stdout; logs and progress go to
stderr; exit status 0 on success, 2 for bad usage or input, 1 for a failure of the work itself.

Each command module exposes ``configure(parser)`` (adds its flags) and ``run(args) -> dict`` (does the work
and returns the report); ``module:function`` names another run function, for modules serving two commands.
Modules are imported only when their command runs, so ``pyqshare --help`` is fast. A two-word name
(``share analyze``) is a subcommand of a command group (``share``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Sequence

from pyqshare.errors import InputError

# command name -> (module, one-line help), in the order of ../shared/CLI.md; "group leaf" for subcommands.
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
    "share analyze": ("pyqshare.share.analyze", "what a model family shares by content: identical, re-laid-out, near-identical weights"),
    "share harmonize": ("pyqshare.share.harmonize", "rewrite encodings so float-identical weights quantize to identical bytes; --snap-tolerance for fine-tunes"),
    "share compile": ("pyqshare.share.compile", "compile a family into one weight-shared QNN context binary and measure it"),
    "config": ("pyqshare.qnn.config", "QNN HTP JSON configs, ORT options, SDK command lines, input lists"),
}


def _build_parser(chosen: str | None) -> argparse.ArgumentParser:
    """All commands are listed; only the chosen one's module is imported to add its flags."""
    parser = argparse.ArgumentParser(prog="pyqshare", description="Get ONNX model families ready for QNN HTP.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}
    for name, (module, help_text) in COMMANDS.items():
        group, _, leaf = name.rpartition(" ")
        if group and group not in groups:
            group_parser = sub.add_parser(group, help=f"{group} {{{', '.join(_leaves(group))}}}")
            groups[group] = group_parser.add_subparsers(dest="subcommand", required=True, metavar="SUBCOMMAND")
        command = (groups[group] if group else sub).add_parser(leaf, help=help_text, description=help_text)
        command.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
        if name == chosen:
            importlib.import_module(module.partition(":")[0]).configure(command)
        command.set_defaults(_module=module, _name=name)
    return parser


def _leaves(group: str) -> list[str]:
    return [name.rpartition(" ")[2] for name in COMMANDS if name.rpartition(" ")[0] == group]


def _chosen_command(argv: Sequence[str]) -> str | None:
    """The command ``argv`` names (the first word that is a command, or a group followed by one of its
    subcommands), or None."""
    for index, word in enumerate(argv):
        if word in COMMANDS:
            return word
        if index + 1 < len(argv) and f"{word} {argv[index + 1]}" in COMMANDS:
            return f"{word} {argv[index + 1]}"
    return None


_TABLE_ROWS = 64  # longer lists of records print as a count


def _print_human(report: dict, indent: str = "") -> None:
    for key, value in report.items():
        if isinstance(value, dict):
            print(f"{indent}{key}:")
            _print_human(value, indent + "  ")
        elif isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
            _print_records(key, value, indent)
        else:
            print(f"{indent}{key}: {value}")


def _print_records(key: str, records: list[dict], indent: str) -> None:
    """A short list of records as a table of their scalar fields (nested ones are in --json)."""
    columns = [c for c in records[0] if not isinstance(records[0][c], (dict, list))]
    if len(records) > _TABLE_ROWS or not columns:
        print(f"{indent}{key}: {len(records)} entries (use --json for all)")
        return
    print(f"{indent}{key}:")
    rows = [[str(record.get(column, "")) for column in columns] for record in records]
    widths = [max(len(column), *(len(row[i]) for row in rows)) for i, column in enumerate(columns)]
    for row in [columns, *rows]:
        print(indent + "  " + "  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True)))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _build_parser(_chosen_command(argv))
    args = parser.parse_args(argv)  # argparse exits with status 2 on bad usage
    try:
        module, _, function = args._module.partition(":")
        report = getattr(importlib.import_module(module), function or "run")(args)
    except InputError as error:
        print(f"pyqshare {args._name}: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # noqa: BLE001  (report the failure as exit status 1, not a traceback)
        print(f"pyqshare {args._name}: failed: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    try:
        if args.json:
            json.dump(report, sys.stdout, default=str)
            sys.stdout.write("\n")
        else:
            _print_human(report)
        sys.stdout.flush()
    except BrokenPipeError:  # the reader (e.g. `| head`) stopped early: not a failure of the work
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0
