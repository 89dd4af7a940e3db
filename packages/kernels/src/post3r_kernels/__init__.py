"""post3r_kernels: 2D rotary position embedding (RoPE2D) with swappable implementations."""

from post3r_kernels.reference import rope2d_torch


def rope2d(x, positions, base: float = 100.0, impl: str | None = None):
    """Temporary entry point: the torch reference. The kernels issue adds the registry and Triton."""
    return rope2d_torch(x, positions, base)


__all__ = ["rope2d", "rope2d_torch"]
