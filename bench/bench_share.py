"""``share analyze`` over a family of 64 models in raw weight folders (2 GB, 10^9 bytes, at full size) from
the page cache, beside the method of Qualcomm's weight-sharing note (md5 of every raw file, folders compared
by file name) on the same folders in the same run; both must agree wherever names match.

The family is a fine-tuned base: 16 tensors (1 to 2.5 MiB) shared by every model under the same names,
two private 1 MiB tensors per model under names every model uses (the fine-tuned head: same name, other bytes),
and in odd models one shared tensor stored under another name (which only a by-content analysis matches).
The folders are generated once into ``$PYQSHARE_BENCH_CACHE`` (default ``~/.cache/pyqshare/bench``) at full
size, into a temporary folder at tiny size.

Resident memory: the analysis runs once more in a child process whose peak resident set (``VmHWM``, reset
before the call through ``/proc/self/clear_refs``) is reported in ``extra_info`` beside the largest model's
size (``ru_maxrss`` too, which also counts the imports); the analysis maps one tensor at a time, so the
growth must stay within about one model's size.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import pyqshare
from pyqshare.share.analyze import analyze

MODELS = 64
SHARED = 16
PRIVATE = ("head.0.raw", "head.1.raw")
RENAMED = ("layers.15.raw", "renamed.15.raw")  # odd models store shared tensor 15 under the second name
GROUP = "share analyze: 64-model family, raw weight folders"
MAX_RSS_SLACK = 48 << 20  # interpreter allocations beside the mapped tensors


def shared_sizes(unit: int) -> list[int]:
    return [unit * (2 + i % 4) // 2 for i in range(SHARED)]  # 1, 1.5, 2, 2.5 units, repeating


def generate(folder: Path, models: int, unit: int) -> None:
    """Write the family (module docstring) into ``folder``, atomically: a marker file is written last."""
    rng = np.random.default_rng(2025)
    shared = [rng.integers(0, 256, size, dtype=np.uint8) for size in shared_sizes(unit)]
    staging = folder.with_name(folder.name + ".partial")
    for model in range(models):
        target = staging / f"model{model:02d}"
        target.mkdir(parents=True, exist_ok=True)
        for index, values in enumerate(shared):
            name = f"layers.{index}.raw"
            values.tofile(target / (RENAMED[1] if name == RENAMED[0] and model % 2 else name))
        for name in PRIVATE:
            rng.integers(0, 256, unit, dtype=np.uint8).tofile(target / name)
    (staging / "complete").write_text(json.dumps({"models": models, "unit": unit}))
    staging.rename(folder)


@pytest.fixture(scope="module")
def family(scaled, tmp_path_factory) -> list[Path]:
    models, unit = scaled((MODELS, 1 << 20), (8, 4096))
    if scaled(True, False):
        cache = Path(os.environ.get("PYQSHARE_BENCH_CACHE", Path.home() / ".cache" / "pyqshare" / "bench"))
        folder = cache / f"share-family-{models}x{SHARED}x{unit}"
    else:
        folder = tmp_path_factory.mktemp("share") / "family"
    if not (folder / "complete").exists():
        generate(folder, models, unit)
    folders = [folder / f"model{model:02d}" for model in range(models)]
    for path in folders:  # into the page cache: the bar is analysis from memory, not disk speed
        for file in path.iterdir():
            file.read_bytes()
    return folders


def note_method(folders: list[Path]) -> list[dict]:
    """The note's ``compare_folders`` for every pair, md5-ing each file once instead of once per pair."""
    digests = []
    for folder in folders:
        digests.append({name: hashlib.md5((folder / name).read_bytes()).hexdigest() for name in os.listdir(folder)})
    pairs = []
    for a in range(len(folders)):
        for b in range(a + 1, len(folders)):
            same = digests[a].keys() & digests[b].keys()
            identical = sum(digests[a][name] == digests[b][name] for name in same)
            pairs.append({"a": a, "b": b, "identical": identical, "different": len(same) - identical,
                          "unmatched_a": len(digests[a].keys() - same), "unmatched_b": len(digests[b].keys() - same)})
    return pairs


def total_bytes(folders: list[Path]) -> int:
    return sum(file.stat().st_size for folder in folders for file in folder.iterdir())


@pytest.fixture(scope="module")
def reference(family) -> list[dict]:
    return note_method(family)


def agree(report: dict, note_pairs: list[dict]) -> None:
    """Counts by name agree with the note's; by content, the renamed copy is matched too."""
    class_of = {}
    for index, group in enumerate(report["groups"]):
        for member in group["members"]:
            class_of[(member["model"], member["tensor"])] = index
    grouped_names: dict[int, set[str]] = {}
    for model, name in class_of:
        grouped_names.setdefault(model, set()).add(name)
    for ours, theirs in zip(report["pairs"], note_pairs, strict=True):
        a, b = ours["a"], ours["b"]
        assert (a, b) == (theirs["a"], theirs["b"])
        names = grouped_names[a] & grouped_names[b]
        same_named_identical = sum(class_of[(a, name)] == class_of[(b, name)] for name in names)
        assert same_named_identical == theirs["identical"]
        renamed = (a + b) % 2  # one model stores shared tensor 15 under its other name
        assert ours["identical"] == theirs["identical"] + renamed
        assert ours["different"] == theirs["different"] == len(PRIVATE)
        assert ours["unmatched_a"] == theirs["unmatched_a"] - renamed == 0
        assert ours["near_identical"] == ours["relaid"] == 0


@pytest.mark.benchmark(group=GROUP)
def test_share_analyze(benchmark, family, reference):
    size = total_bytes(family)
    report = benchmark.pedantic(analyze, args=(family,), rounds=3, iterations=1, warmup_rounds=0)
    agree(report, reference)
    assert report["total_bytes"] == size
    peak = child_peak_rss(family)
    largest = max(sum(file.stat().st_size for file in folder.iterdir()) for folder in family)
    benchmark.extra_info.update(impl="pyqshare", bytes=size, largest_model_bytes=largest, **peak,
                                note=f"{len(family)} models, RSS growth {peak['rss_growth_bytes'] / 1e6:.0f} MB "
                                     f"(largest model {largest / 1e6:.0f} MB)")
    assert peak["rss_growth_bytes"] <= largest + MAX_RSS_SLACK
    if benchmark.enabled and size >= 10**9:
        assert size / benchmark.stats.stats.median >= 1e9, "share analyze below 1 GB/s from the page cache"


@pytest.mark.benchmark(group=GROUP)
def test_note_md5_per_file(benchmark, run_once, family, reference):
    size = total_bytes(family)
    pairs = run_once(note_method, family)
    assert pairs == reference
    benchmark.extra_info.update(impl="note: md5 every file, compare by name", bytes=size)


def child_peak_rss(folders: list[Path]) -> dict:
    """The analysis in a fresh interpreter: its resident set before the call and at its peak during it."""
    script = textwrap.dedent("""
        import json, resource, sys
        from pyqshare.share.analyze import analyze

        def status(key):
            with open("/proc/self/status") as handle:
                line = next(line for line in handle if line.startswith(key + ":"))
            return int(line.split()[1]) * 1024

        folders = json.loads(sys.stdin.read())
        before = status("VmRSS")
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # reset VmHWM to the current resident set
        analyze(folders)
        print(json.dumps({"rss_before_bytes": before, "peak_rss_bytes": status("VmHWM"),
                          "ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
    """)
    package_root = str(Path(pyqshare.__file__).resolve().parents[1])  # the pyqshare under test
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-P", "-c", script], input=json.dumps([str(f) for f in folders]),
                          capture_output=True, text=True, check=True, timeout=600, env=env)
    peak = json.loads(done.stdout)
    peak["rss_growth_bytes"] = peak["peak_rss_bytes"] - peak["rss_before_bytes"]
    return peak
