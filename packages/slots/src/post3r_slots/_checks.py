"""The package's one set of argument checks: shapes, positive values and counts, each error naming
the argument and what was expected."""

from __future__ import annotations

import torch


def check_shape(tensor: object, name: str, dims: str, **sizes: int | None) -> dict[str, int]:
    """Check that `tensor` has the named layout `dims` and return the size of every dim.

    `dims` is a space-separated list of dim names, e.g. `"B K N"`; one name may be written in
    brackets (`"B [T] K Ds"`) to mark it optional, so tensors with and without it are accepted.
    Keyword `sizes` pin dims to known values (`Ds=128`; None leaves a dim free); a numeric
    name is a literal size (`"B N 2"`). A name used twice must match itself.
    Raises `ValueError` naming `name`, the expected layout and the actual shape.
    """
    names = dims.split()
    optional = [n for n in names if n.startswith("[")]
    layout = "(" + ", ".join(n.strip("[]") for n in names) + ")"
    if not isinstance(tensor, torch.Tensor):
        kind = type(tensor).__name__
        raise TypeError(f"{name} must be a torch.Tensor of shape {layout}, got {kind}")
    if tensor.ndim == len(names):
        used = [n.strip("[]") for n in names]
    elif optional and tensor.ndim == len(names) - 1:
        used = [n for n in names if n != optional[0]]
    else:
        ranks = f"{len(names) - 1} or {len(names)}" if optional else str(len(names))
        raise ValueError(
            f"{name} must have shape {layout} ({ranks} dims), got {tuple(tensor.shape)}"
        )
    found: dict[str, int] = {}
    for dim_name, size in zip(used, tensor.shape, strict=True):
        expected = int(dim_name) if dim_name.isdigit() else sizes.get(dim_name)
        expected = found.get(dim_name) if expected is None else expected
        if expected is not None and size != expected:
            raise ValueError(
                f"{name} must have shape {layout} with {dim_name}={expected}, "
                f"got {tuple(tensor.shape)}"
            )
        found[dim_name] = size
    return found


def check_positive(value: float, name: str) -> None:
    """Raise `ValueError` unless `value` is a positive number."""
    if not value > 0:
        raise ValueError(f"{name} must be positive, got {value}")


def check_at_least_one(value: object, name: str) -> None:
    """Raise `ValueError` unless the count `value` is a whole number >= 1."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


def check_finite(tensor: torch.Tensor, name: str, *, on_device: bool = False) -> None:
    """Raise `ValueError` when `tensor` holds NaN or infinity.

    CPU tensors are always checked (no device round trip). Tensors on an accelerator only with
    `on_device=True`: there the check is a host-device sync, too dear on a module's hot path
    (a training loop catches non-finite values once per step in its loss and gradient instead).
    """
    checked = tensor.is_floating_point() and (tensor.device.type == "cpu" or on_device)
    if checked and not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
