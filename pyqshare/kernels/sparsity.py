"""sparsity kernels (filled in by the sparsity work)."""
__all__: list[str] = []
