#!/bin/bash
# Give this SLURM task only its own GPU (AMD: one GCD), then run the command.
export ROCR_VISIBLE_DEVICES=$SLURM_LOCALID
exec "$@"
