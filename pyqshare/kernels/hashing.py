"""hashing kernels (filled in by the hashing work)."""
__all__: list[str] = []
