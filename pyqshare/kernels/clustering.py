"""clustering kernels (filled in by the clustering work)."""
__all__: list[str] = []
