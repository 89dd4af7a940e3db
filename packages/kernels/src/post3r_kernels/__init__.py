"""post3r_kernels: 2D rotary position embedding (RoPE2D) with swappable implementations.

`rope2d(x, positions, base=100.0, impl=None)` is the one entry point; `impl` (or the
`POST3R_ROPE2D_IMPL` environment variable) picks `torch` (the reference), `eager` (fewer
passes, the CPU's default), `triton`, `compiled` or `auto`. Importing this package never
imports triton. `split_heads`, `merge_heads`, `grid_positions` and `row_major_positions` lay
tokens out for it (one home for the backbone and the slot corrector).
"""

from post3r_kernels.dispatch import (
    ENV_VAR,
    Rope2dImpl,
    auto_impl,
    register_rope2d_impl,
    resolve_rope2d_impl,
    rope2d,
    rope2d_impls,
)
from post3r_kernels.eager import rope2d_eager
from post3r_kernels.reference import rope2d_torch
from post3r_kernels.tokens import grid_positions, merge_heads, row_major_positions, split_heads
from post3r_kernels.validation import check_rope2d_inputs

__all__ = [
    "ENV_VAR",
    "Rope2dImpl",
    "auto_impl",
    "check_rope2d_inputs",
    "grid_positions",
    "merge_heads",
    "register_rope2d_impl",
    "resolve_rope2d_impl",
    "rope2d",
    "rope2d_eager",
    "rope2d_impls",
    "rope2d_torch",
    "row_major_positions",
    "split_heads",
]
