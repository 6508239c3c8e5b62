"""Driving the real QNN HTP backend that ships in the ``onnxruntime-qnn`` wheel (see ../shared/QNN_NOTES.md)."""

from pyqshare.qnn.ep import (
    DEFAULT_HTP_OPTIONS,
    QnnUnavailableError,
    create_htp_session,
    htp_session_options,
    native_stdout_to_stderr,
    qnn_available,
)

__all__ = [
    "DEFAULT_HTP_OPTIONS",
    "QnnUnavailableError",
    "create_htp_session",
    "htp_session_options",
    "native_stdout_to_stderr",
    "qnn_available",
]
