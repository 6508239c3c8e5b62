"""Model-level quantization speed beside onnxruntime's quantize_static, on the same prepared model and inputs.

Full size: all-MiniLM-L6-v2 (seq 128, 8 calibration samples); the issue's targets are per-channel int8 with
search under 10 s and cluster k=16 per tensor under 5 s on 2 cores (both in one group beside onnxruntime,
whose figure is the 1.00x reference). Tiny (the test suite's smoke run): a generated MLP. Each run also checks
that pyqshare's per-channel output SQNR is at least onnxruntime's.
"""

from __future__ import annotations

import pytest

import pyqshare
from pyqshare.calibration import default_inputs, run_model
from pyqshare.evaluate import summarize_outputs
from pyqshare.methods.cluster import cluster_model, quantize_clustered
from pyqshare.methods.peers import onnxruntime_quantize_static
from pyqshare.model import load_model
from pyqshare.prepare import prepare_model
from pyqshare.quantization.pipeline import quantize_model
from pyqshare.quantization.scheme import QuantScheme, WeightScheme
from pyqshare.zoo import export_minilm, synthetic_mlp


@pytest.fixture(scope="module", autouse=True)
def all_cores():
    """pyqshare's kernels and per-layer work on every core, as the command line runs them (--num-threads)."""
    previous = pyqshare.get_num_threads()
    pyqshare.set_num_threads(pyqshare.available_cores())
    yield
    pyqshare.set_num_threads(previous)


@pytest.fixture(scope="module")
def prepared(scaled, tmp_path_factory):
    """(float model path, prepared model path, calibration samples, evaluation samples)."""
    folder = tmp_path_factory.mktemp("methods")
    source = scaled(export_minilm, synthetic_mlp)(folder / "float.onnx")
    shapes = scaled({}, {"x": (1, 16, 32)})
    prepare_model(source, folder / "prepared.onnx", shapes, placement="none")
    model = load_model(folder / "prepared.onnx")
    return (source, folder / "prepared.onnx", default_inputs(model, purpose="calibration"),
            default_inputs(model, purpose="evaluation"))


def _min_sqnr(source, candidate, samples) -> float:
    return summarize_outputs(run_model(source, samples), run_model(candidate, samples))["min_sqnr_db"]


@pytest.fixture(scope="module")
def ort_sqnr(prepared, tmp_path_factory) -> float:
    """The reference: output SQNR of onnxruntime's quantize_static (per_channel=True, same inputs and widths)."""
    source, path, calibration, evaluation = prepared
    output = tmp_path_factory.mktemp("ort") / "ort.onnx"
    onnxruntime_quantize_static(path, output, calibration, 16)
    return _min_sqnr(source, output, evaluation)


@pytest.mark.benchmark(group="per-channel int8, 16-bit activations")
@pytest.mark.filterwarnings("ignore::UserWarning")  # onnxruntime's quantizer suggests its own pre-processing
def test_pyqshare_per_channel(benchmark, run_once, prepared, ort_sqnr, tmp_path):
    from pyqshare.model import save_model

    source, path, calibration, evaluation = prepared
    scheme = QuantScheme(weights=WeightScheme(bits=8), activation_bits=16)

    def quantize():
        model = load_model(path, load_weights=True)
        return quantize_model(model, calibration, scheme, model_dir=path.parent).model

    model = run_once(quantize)
    save_model(model, tmp_path / "q.onnx")
    sqnr = _min_sqnr(source, tmp_path / "q.onnx", evaluation)
    benchmark.extra_info.update(impl="pyqshare", note=f"{sqnr:.1f} dB (onnxruntime {ort_sqnr:.1f} dB)")
    assert sqnr >= ort_sqnr


@pytest.mark.benchmark(group="per-channel int8, 16-bit activations")
@pytest.mark.filterwarnings("ignore::UserWarning")  # onnxruntime's quantizer suggests its own pre-processing
@pytest.mark.parametrize("refine_rounds", [2, 0], ids=["refined", "no-refine"])
def test_pyqshare_cluster(benchmark, run_once, prepared, tmp_path, refine_rounds):
    """Cluster k=16 per tensor, with the default refinement or without, written as int8 QDQ with 16-bit
    activations."""
    from pyqshare.model import save_model

    source, path, calibration, evaluation = prepared

    def cluster():
        model = load_model(path, load_weights=True)
        layers = cluster_model(model, calibration, clusters=16, refine_rounds=refine_rounds, model_dir=path.parent)
        return quantize_clustered(model, calibration, layers, activation_bits=16, model_dir=path.parent)

    result = run_once(cluster)
    assert result.layers and all(layer.distinct_values <= 16 for layer in result.layers.values())
    save_model(result.model, tmp_path / "q.onnx")
    sqnr = _min_sqnr(source, tmp_path / "q.onnx", evaluation)
    name = "pyqshare cluster k=16" + ("" if refine_rounds else " --no-refine")
    benchmark.extra_info.update(impl=name, note=f"{sqnr:.1f} dB")
    if refine_rounds:  # k=16 per tensor on MiniLM: 12.2 dB refined (0.8 dB plain); a broken refit falls below
        assert sqnr > 5.0


@pytest.mark.benchmark(group="per-channel int8, 16-bit activations")
@pytest.mark.filterwarnings("ignore::UserWarning")  # onnxruntime's quantizer suggests its own pre-processing
def test_onnxruntime_quantize_static(benchmark, run_once, prepared, ort_sqnr, tmp_path):
    source, path, calibration, evaluation = prepared
    run_once(onnxruntime_quantize_static, path, tmp_path / "ort.onnx", calibration, 16)
    sqnr = _min_sqnr(source, tmp_path / "ort.onnx", evaluation)
    benchmark.extra_info.update(impl="onnxruntime", note=f"{sqnr:.1f} dB")
    assert sqnr == pytest.approx(ort_sqnr)  # the timed run reproduces the reference
