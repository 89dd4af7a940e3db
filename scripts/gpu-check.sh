#!/usr/bin/env bash
# The GPU check: kernel tests, bench-rope2d, bench-backbone (plus --compare-heads), bench-train, one summary table
# (post3r_train/gpu_check.py has the steps and their time limits). `--cpu-tiny`: the CPU form.
# On ROCm, export UV_NO_SYNC=1 first (README: GPUs) so that `uv run` keeps ROCm's torch.
set -euo pipefail
cd "$(dirname "$0")/.."
exec uv run python -m post3r_train.gpu_check "$@"
