"""Child process of :func:`pyqshare.qnn.placement.placement_report`: open one QNN HTP session and exit.

``python -P -m pyqshare.qnn._probe MODEL OPTIONS_JSON [EXTERNAL_DATA_FOLDER]``. The session allows CPU
fallback and logs at VERBOSE level; onnxruntime's C++ log goes to this process's stderr, which the parent
captures. With ``EXTERNAL_DATA_FOLDER`` the model is read as bytes and its external data resolved in that
folder (used for a renamed copy of a model whose weights stay where they are).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import onnxruntime as ort

from pyqshare.qnn.ep import htp_session_options
from pyqshare.qnn.placement import PROVIDERS_MARKER

_VERBOSE = 0


def main(argv: list[str]) -> int:
    model, options = argv[0], json.loads(argv[1])
    session_options = htp_session_options(options, disable_cpu_fallback=False, log_severity=_VERBOSE)
    # Basic level: the same load-time rewrites as a default session before partitioning, without the
    # later CPU-only fusions that would rename the nodes left on the CPU.
    session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    source: str | bytes = model
    if len(argv) > 2:
        session_options.add_session_config_entry("session.model_external_initializers_file_folder_path", argv[2])
        source = Path(model).read_bytes()
    session = ort.InferenceSession(source, session_options)
    print(PROVIDERS_MARKER, json.dumps(session.get_providers()), file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
