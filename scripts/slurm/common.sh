# Shared by the POST3R sbatch scripts (sourced, not run). Submit from the repository root.
#
# Settings (export before sbatch, or edit the defaults here):
#   CONFIG       run config                         (configs/ytvis2021.yaml)
#   DATA_DIR     shard directory                    ($PWD/data/ytvis2021)
#   LOG_DIR      run directories go under it        ($PWD/outputs)
#   EXPERIMENT   <LOG_DIR>/<EXPERIMENT>/<timestamp>/ (post3r_ytvis2021)
#   PYTHON       interpreter of the synced venv     ($PWD/.venv/bin/python)
#   EXTRA_ARGS   more `key=value` overrides or flags (empty)
#
# What it adds to a job:
#   * resume: when the newest run of EXPERIMENT has a checkpoint, training continues it
#     (--continue), so a requeued job picks up where the last one stopped;
#   * preemption: `#SBATCH --signal=B:USR1@180` reaches this shell 180 s before the time limit;
#     the trap passes USR1 on to the training processes (they checkpoint at the next step
#     boundary and exit), waits for them, and requeues the job.

set -uo pipefail
cd "${SLURM_SUBMIT_DIR:-$PWD}"

CONFIG=${CONFIG:-configs/ytvis2021.yaml}
DATA_DIR=${DATA_DIR:-$PWD/data/ytvis2021}
LOG_DIR=${LOG_DIR:-$PWD/outputs}
EXPERIMENT=${EXPERIMENT:-post3r_ytvis2021}
PYTHON=${PYTHON:-$PWD/.venv/bin/python}
EXTRA_ARGS=${EXTRA_ARGS:-}

if [[ ! -x "$PYTHON" ]]; then
  echo "no Python at $PYTHON: run 'uv sync --frozen' in the repository first (login node)" >&2
  exit 1
fi

# The training command line shared by every launcher (torchrun or one task per GPU).
train_args() {
  local args=("$CONFIG" --data-dir "$DATA_DIR" --log-dir "$LOG_DIR" "experiment=$EXPERIMENT")
  local run
  run=$(ls -1dt "$LOG_DIR/$EXPERIMENT"/*/ 2>/dev/null | head -n 1)
  if [[ -n "$run" ]] && compgen -G "${run}results/checkpoints/*.ckpt" >/dev/null; then
    args+=(--continue "$run")
  fi
  # shellcheck disable=SC2206  # EXTRA_ARGS is a word list on purpose
  args+=($EXTRA_ARGS)
  printf '%s\n' "${args[@]}"
}

# Since Slurm 22.05 a job step no longer inherits the batch job's --cpus-per-task: without this,
# each srun task (a torchrun and all its workers, or one trainer per GPU) gets a single core.
if [[ -n "${SLURM_CPUS_PER_TASK:-}" ]]; then
  export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK
fi

# The first node of the allocation hosts the rendezvous.
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
export MASTER_ADDR MASTER_PORT

PREEMPTED=0
on_time_limit() {
  echo "$(date -Is) time limit near: asking the trainer to checkpoint and stop"
  PREEMPTED=1
  scancel --signal=USR1 "$SLURM_JOB_ID"  # every job step, not this shell
}
trap on_time_limit USR1

# run_step CMD...: run a job step in the background so the trap can fire, wait for it to
# finish (also after a preemption), and requeue the job when it was preempted.
run_step() {
  "$@" &
  local step=$!
  local status=0
  while kill -0 "$step" 2>/dev/null; do
    wait "$step"
    status=$?
  done
  if [[ $PREEMPTED == 1 ]]; then
    echo "$(date -Is) checkpoint written; requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
  fi
  return "$status"
}
