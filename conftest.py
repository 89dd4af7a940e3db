"""Workspace-wide pytest set-up: keep parallel test workers from oversubscribing the CPU."""

import os

import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `pytest -n 2` on a 2-core machine: one intra-op thread per worker process.
    torch.set_num_threads(1)
