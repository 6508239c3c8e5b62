"""quantization kernels (filled in by the quantization work)."""
__all__: list[str] = []
