"""kmeans1d against scikit-learn, Ckmeans.1d.dp (PyPI ckmeans), kmeans1d (PyPI) and faiss.

Data: weight-like values, Student-t with 4 degrees of freedom times 0.02 (seeded), 16M float32 values for
the whole-tensor groups and a 4096 x 4096 matrix clustered per row (axis=0) for the per-channel groups.

Every peer runs in a child process with RLIMIT_AS = 16 GiB and a timeout (Ckmeans.1d.dp and kmeans1d
allocate k x n tables and can exhaust memory; scikit-learn at k=256 takes minutes). The child loads the
data and imports its library before the timed call, so the time is the peer's own call; a failure is
recorded in the note instead of failing the run. ``inertia_vs_optimal`` is each result's inertia over
pyqshare's optimal inertia (computed in the same run; float64 sums over the full data).
"""

from __future__ import annotations

import json
import resource
import select
import subprocess
import sys

import numpy as np
import pytest

from pyqshare import kmeans1d

MEMORY_LIMIT = 16 << 30
PER_ROW_SUBSET = 256

_CHILD = r"""
import json, sys, time
import numpy as np

peer, path, k, rows = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
x = np.load(path)
if peer == "scikit-learn":
    from sklearn.cluster import KMeans
    def fit(v):
        m = KMeans(n_clusters=k, n_init=1, random_state=0).fit(v.reshape(-1, 1))
        return m.cluster_centers_.ravel(), m.labels_
elif peer == "Ckmeans.1d.dp":
    import ckmeans
    def fit(v):
        return ckmeans.ckmeans(v, k)  # the sorted clusters
elif peer == "kmeans1d":
    import kmeans1d
    def fit(v):
        r = kmeans1d.cluster(v, k)
        return np.asarray(r.centroids), np.asarray(r.clusters)
elif peer == "faiss":
    import faiss
    def fit(v):
        km = faiss.Kmeans(1, k, seed=1234)
        km.train(np.ascontiguousarray(v.reshape(-1, 1), dtype=np.float32))
        return km.centroids.ravel().astype(np.float64), None
else:
    raise SystemExit(f"unknown peer {peer}")

def inertia(v, result):
    v = v.astype(np.float64)
    if peer == "Ckmeans.1d.dp":
        return float(sum(np.sum((c - c.mean()) ** 2) for c in result))
    centroids, labels = result
    if labels is None:  # nearest centroid
        c = np.sort(centroids)
        labels = np.searchsorted((c[1:] + c[:-1]) / 2, v)
        centroids = c
    return float(np.sum((v - np.asarray(centroids, dtype=np.float64)[labels]) ** 2))

values = [x[r] for r in range(rows)] if rows else [x]
print("ready", flush=True)
sys.stdin.readline()
t0 = time.perf_counter()
results = [fit(v) for v in values]
seconds = time.perf_counter() - t0
print(json.dumps({"seconds": seconds, "inertia": sum(inertia(v, r) for v, r in zip(values, results))}), flush=True)
"""


def _limit_memory():
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


class _PeerProcess:
    """A peer in a child process: started (imports, data loaded) before the timed part, run on request."""

    def __init__(self, peer, path, k, rows):
        self.proc = subprocess.Popen(
            [sys.executable, "-P", "-c", _CHILD, peer, str(path), str(k), str(rows)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=_limit_memory,
        )
        self.ready = self._readline(600) == "ready"

    def _readline(self, timeout):
        readable, _, _ = select.select([self.proc.stdout], [], [], timeout)
        return self.proc.stdout.readline().strip() if readable else None

    def run(self, timeout):
        if not self.ready:
            return {"error": self._failure()}
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        line = self._readline(timeout)
        if line is None:
            self.proc.kill()
            return {"error": f"timed out after {timeout} s (time is a lower bound)"}
        if not line:
            return {"error": self._failure()}
        return json.loads(line)

    def _failure(self):
        self.proc.wait(timeout=60)
        err = self.proc.stderr.read()
        if "MemoryError" in err or "bad_alloc" in err or "Cannot allocate" in err or self.proc.returncode == -9:
            return "aborted: out of memory (RLIMIT_AS 16 GiB)"
        last = err.strip().splitlines()[-1] if err.strip() else f"exit code {self.proc.returncode}"
        return f"failed: {last[:160]}"

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            f.close()


def _run_peer(benchmark, peer, path, k, rows, timeout):
    """Time one call of a peer in a child process (pytest-benchmark times only the call)."""
    holder = {}

    def setup():
        holder["peer"] = _PeerProcess(peer, path, k, rows)

    try:
        return benchmark.pedantic(
            lambda: holder["peer"].run(timeout), setup=setup, rounds=1, iterations=1, warmup_rounds=0
        )
    finally:
        if "peer" in holder:
            holder["peer"].close()


def _ratio(inertia, optimal):
    return f"{inertia / optimal:.7f}" if optimal > 0 else "n/a"


# --- data ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def weights_16m(scaled, tmp_path_factory):
    n = scaled(1 << 24, 20_000)
    x = (np.random.default_rng(2024).standard_t(4, n) * 0.02).astype(np.float32)
    path = tmp_path_factory.mktemp("kmeans1d") / "values.npy"
    np.save(path, x)
    return x, path, "16M" if n == 1 << 24 else f"{n}"


@pytest.fixture(scope="session")
def matrix_4096(scaled, tmp_path_factory):
    rows, cols = scaled((4096, 4096), (16, 512))
    x = (np.random.default_rng(7).standard_t(4, (rows, cols)) * 0.02).astype(np.float32)
    path = tmp_path_factory.mktemp("kmeans1d") / "matrix.npy"
    np.save(path, x)
    subset = min(PER_ROW_SUBSET, rows)
    subset_path = tmp_path_factory.mktemp("kmeans1d") / "matrix_subset.npy"
    np.save(subset_path, np.ascontiguousarray(x[:subset]))
    return x, path, subset_path, f"{rows}x{cols}"


@pytest.fixture(scope="session")
def optimal_inertia():
    """Optimal inertia per workload, filled by the optimal benchmark (or computed here when it was skipped)."""
    cache = {}

    def get(key, compute):
        if key not in cache:
            cache[key] = compute()
        return cache[key]

    get.cache = cache
    return get


def _group(k):
    return pytest.mark.benchmark(group=f"kmeans1d whole tensor, Student-t(4)*0.02 float32, k={k}")


KS = [pytest.param(16, marks=_group(16)), pytest.param(256, marks=_group(256))]


# --- whole tensor: 16M values ------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", KS)
def test_optimal(benchmark, run_once, weights_16m, optimal_inertia, k):
    x, _, size = weights_16m
    centroids, labels, inertia = run_once(kmeans1d, x, k, method="optimal")
    optimal_inertia.cache[(size, k)] = inertia
    direct = float(np.sum((x.astype(np.float64) - centroids[labels].astype(np.float64)) ** 2))
    assert inertia == pytest.approx(direct, rel=1e-9)
    benchmark.extra_info.update(impl="pyqshare optimal", inertia_vs_optimal=_ratio(inertia, inertia), bytes=x.nbytes)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("k", KS)
def test_fast(benchmark, weights_16m, optimal_inertia, k, threads):
    x, _, size = weights_16m
    centroids, labels, inertia = benchmark(kmeans1d, x, k, num_threads=threads)
    optimal = optimal_inertia((size, k), lambda: kmeans1d(x, k, method="optimal")[2])
    assert optimal * (1 - 1e-12) <= inertia <= optimal * (1 + 1e-4)
    benchmark.extra_info.update(
        impl="pyqshare" if threads == 1 else f"pyqshare {threads} threads",
        inertia_vs_optimal=_ratio(inertia, optimal),
        bytes=x.nbytes,
    )


@pytest.mark.parametrize("peer", ["scikit-learn", "Ckmeans.1d.dp", "kmeans1d", "faiss"])
@pytest.mark.parametrize("k", KS)
def test_peer(benchmark, weights_16m, optimal_inertia, k, peer):
    x, path, size = weights_16m
    timeout = 300 if peer == "scikit-learn" else 900
    result = _run_peer(benchmark, peer, path, k, 0, timeout)
    benchmark.extra_info.update(impl=peer, bytes=x.nbytes)
    if "error" in result:
        benchmark.extra_info["note"] = result["error"]
        return
    optimal = optimal_inertia((size, k), lambda: kmeans1d(x, k, method="optimal")[2])
    benchmark.extra_info["inertia_vs_optimal"] = _ratio(result["inertia"], optimal)
    assert result["inertia"] >= optimal * (1 - 1e-9)  # nobody beats the optimum
    if peer in ("Ckmeans.1d.dp", "kmeans1d"):  # optimal peers agree with pyqshare's optimum
        assert result["inertia"] == pytest.approx(optimal, rel=1e-9)


# --- per channel: one clustering per row of a 4096 x 4096 matrix ---------------------------------------------------

PER_CHANNEL = pytest.mark.benchmark(group="kmeans1d per-channel (axis=0), 4096x4096 Student-t(4)*0.02, k=16, all rows")
PER_CHANNEL_SUBSET = pytest.mark.benchmark(
    group=f"kmeans1d per-channel (axis=0), 4096x4096 Student-t(4)*0.02, k=16, first {PER_ROW_SUBSET} rows"
)


def _per_row_optimal(x, optimal_inertia, key):
    return optimal_inertia(key, lambda: kmeans1d(x, 16, axis=0, method="optimal")[2])


@PER_CHANNEL
def test_per_channel_optimal(benchmark, run_once, matrix_4096, optimal_inertia):
    x, _, _, size = matrix_4096
    _, _, inertia = run_once(kmeans1d, x, 16, axis=0, method="optimal")
    optimal_inertia.cache[("rows", size)] = inertia
    benchmark.extra_info.update(impl="pyqshare optimal", inertia_vs_optimal=_ratio(inertia.sum(), inertia.sum()))


@PER_CHANNEL
@pytest.mark.parametrize("threads", [1, 2])
def test_per_channel_fast(benchmark, matrix_4096, optimal_inertia, threads):
    x, _, _, size = matrix_4096
    _, _, inertia = benchmark(kmeans1d, x, 16, axis=0, num_threads=threads)
    optimal = _per_row_optimal(x, optimal_inertia, ("rows", size))
    # Every row's clustering, not just the total, must land within 0.01% of its optimum.
    assert np.all(inertia >= optimal * (1 - 1e-12))
    assert np.all(inertia <= optimal * (1 + 1e-4)), f"worst row {np.max(inertia / optimal)}"
    benchmark.extra_info.update(
        impl="pyqshare" if threads == 1 else f"pyqshare {threads} threads",
        inertia_vs_optimal=_ratio(inertia.sum(), optimal.sum()),
        note=f"worst row {_ratio(float(np.max(inertia / optimal)), 1.0)}",
        bytes=x.nbytes,
    )


@PER_CHANNEL
def test_per_channel_ckmeans(benchmark, matrix_4096, optimal_inertia):
    x, path, _, size = matrix_4096
    result = _run_peer(benchmark, "Ckmeans.1d.dp", path, 16, x.shape[0], 900)
    benchmark.extra_info.update(impl="Ckmeans.1d.dp", note="one call per row", bytes=x.nbytes)
    assert "error" not in result, result
    optimal = _per_row_optimal(x, optimal_inertia, ("rows", size))
    benchmark.extra_info["inertia_vs_optimal"] = _ratio(result["inertia"], optimal.sum())
    assert result["inertia"] == pytest.approx(optimal.sum(), rel=1e-9)


@PER_CHANNEL_SUBSET
def test_per_channel_subset_pyqshare(benchmark, matrix_4096, optimal_inertia):
    x, _, _, size = matrix_4096
    rows = np.ascontiguousarray(x[:PER_ROW_SUBSET])
    _, _, inertia = benchmark(kmeans1d, rows, 16, axis=0)
    optimal = _per_row_optimal(x, optimal_inertia, ("rows", size))[:PER_ROW_SUBSET]
    assert np.all(inertia <= optimal * (1 + 1e-4)), f"worst row {np.max(inertia / optimal)}"
    benchmark.extra_info.update(impl="pyqshare", inertia_vs_optimal=_ratio(inertia.sum(), optimal.sum()))


@PER_CHANNEL_SUBSET
@pytest.mark.parametrize("peer", ["kmeans1d", "faiss", "scikit-learn"])
def test_per_channel_subset_peer(benchmark, matrix_4096, optimal_inertia, peer):
    x, _, subset_path, size = matrix_4096
    n_rows = min(PER_ROW_SUBSET, x.shape[0])
    result = _run_peer(benchmark, peer, subset_path, 16, n_rows, 900)
    benchmark.extra_info.update(impl=peer, note=f"one call per row, first {n_rows} rows")
    assert "error" not in result, result
    optimal = _per_row_optimal(x, optimal_inertia, ("rows", size))[:n_rows]
    benchmark.extra_info["inertia_vs_optimal"] = _ratio(result["inertia"], optimal.sum())
    assert result["inertia"] >= optimal.sum() * (1 - 1e-9)
    if peer == "kmeans1d":
        assert result["inertia"] == pytest.approx(optimal.sum(), rel=1e-9)

