"""Driving the real QNN HTP backend that ships in the ``onnxruntime-qnn`` wheel (see ../shared/QNN_NOTES.md)."""

from pyqshare.qnn.ep import (
    DEFAULT_HTP_OPTIONS,
    QnnUnavailableError,
    create_htp_session,
    htp_session_options,
    native_stdout_to_stderr,
    qnn_available,
)
from pyqshare.qnn.placement import Placement, placement_report

__all__ = [
    "DEFAULT_HTP_OPTIONS",
    "Placement",
    "QnnUnavailableError",
    "create_htp_session",
    "htp_session_options",
    "native_stdout_to_stderr",
    "placement_report",
    "qnn_available",
]
