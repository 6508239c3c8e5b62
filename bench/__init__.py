"""Peer benchmarks for the pyqshare kernels. Run ``python -m bench`` for the ratio table."""
