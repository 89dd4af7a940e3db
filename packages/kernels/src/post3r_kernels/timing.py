"""Timing helpers the packages' benchmark scripts share (one home for each)."""

from __future__ import annotations

import torch


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a GPU runs asynchronously); nothing to wait for on a
    CPU. Call before reading a clock so the time covers the work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
