"""``python -m bench [pytest args]``: run the peer benchmarks at full size and print one table of ratios.

Run it from the repository root after ``pip install ".[bench]"``; pytest runs with ``-P`` so that the
installed pyqshare (with its compiled core) is imported, not the source folder.

Ratios are peer median / pyqshare median within each group (above 1 means pyqshare is faster); GB/s is
``extra_info["bytes"]`` over the median. The machine is shared and noisy: read medians and ratios, never a
lone absolute time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

QUALITY_KEYS = ("inertia_vs_optimal", "error_vs_reference", "note")


def _format_extra(extra: dict) -> str:
    return ", ".join(f"{k}={extra[k]}" for k in QUALITY_KEYS if k in extra)


def table(report: dict) -> str:
    """Markdown table of every group in a pytest-benchmark JSON report."""
    groups: dict[str, list[dict]] = {}
    for b in report["benchmarks"]:
        groups.setdefault(b["group"] or b["name"], []).append(b)
    lines = [
        "| workload | implementation | median (s) | peer / pyqshare | GB/s | quality |",
        "|---|---|---:|---:|---:|---|",
    ]
    for group, runs in groups.items():
        ours = next((r for r in runs if r["extra_info"].get("impl") == "pyqshare"), None)
        for r in sorted(runs, key=lambda r: r["stats"]["median"]):
            extra = r["extra_info"]
            median = r["stats"]["median"]
            ratio = f"{median / ours['stats']['median']:.2f}x" if ours else ""
            gbps = f"{extra['bytes'] / median / 1e9:.2f}" if "bytes" in extra else ""
            lines.append(
                f"| {group} | {extra.get('impl', r['name'])} | {median:.4f} | {ratio} | {gbps} | {_format_extra(extra)} |"
            )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        env = {**os.environ, "PYQSHARE_BENCH_SCALE": os.environ.get("PYQSHARE_BENCH_SCALE", "full")}
        cmd = [sys.executable, "-P", "-m", "pytest", str(Path(__file__).parent), "--benchmark-enable",
               f"--benchmark-json={out}", "-p", "no:cacheprovider", "-q", *argv]
        rc = subprocess.call(cmd, env=env)
        if not out.exists():
            return rc or 1
        report = json.loads(out.read_text())
    print(table(report))
    return rc


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
