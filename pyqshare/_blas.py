"""Keep BLAS single-threaded around loops of small matrix operations.

OpenBLAS's own threads spin while they wait; on a shared 2-core machine they made the many small solves of
sparse's re-fit and GPTQ's row updates up to 20 times slower. ``threadpoolctl`` (installed with
scikit-learn; optional, not a runtime dependency) switches them off for the duration; without it nothing
changes but speed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def single_threaded_blas() -> Iterator[None]:
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield
