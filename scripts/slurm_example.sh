#!/bin/bash
# EXAMPLE ONLY: a SLURM job script for one of the long runs on a GPU node. Adapt the partition, account, module
# loads and paths to your cluster; nothing here is tested against a particular site.
#SBATCH --job-name=gevit-rotmnist
#SBATCH --partition=gpu
#SBATCH --nodes=1
#SBATCH --gpus-per-node=4
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=16
#SBATCH --time=12:00:00
#SBATCH --output=runs/slurm-%j.out
#SBATCH --signal=B:USR1@300    # ask for a warning 5 minutes before the time limit

set -euo pipefail
cd "${SLURM_SUBMIT_DIR}"
make install                    # creates .venv on first use
export GEVIT_DATA_DIR="${GEVIT_DATA_DIR:-$PWD/data}"
RUN_DIR="runs/gevit_rotmnist_p4_p9/full"

# The run checkpoints every epoch (atomically) and --resume continues it, so resubmitting this script after a
# time-out or pre-emption picks up where it stopped, with any number of GPUs. --resume refuses a run folder made
# with another model (group, patch size, ...) or other training settings, and leaves a finished run untouched.
srun .venv/bin/torchrun --nproc-per-node "${SLURM_GPUS_PER_NODE}" -m gevit_lib.run \
    --experiment gevit_rotmnist --group p4 --patch-size 9 --profile full --device cuda \
    --run-dir "${RUN_DIR}" --resume --num-workers 4
