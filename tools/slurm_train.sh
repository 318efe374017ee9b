#!/bin/bash
# One training job over several nodes under SLURM: srun starts one rank per GPU, so SLURM's warning signal
# (--signal=TERM@300: SIGTERM to every rank 300 s before the time limit) reaches each rank directly. The
# loop then skips evaluation, saves a checkpoint at the next step boundary and exits. (Under the deepspeed
# launcher a SIGTERM would reach the launcher too, which kills its ranks 30 s later: too little to save a large model.)
#
#   sbatch --nodes 2 tools/slurm_train.sh --configs defaults stablelm-7b oasst-mix \
#       --cache_dir /shared/data --output_dir /shared/runs/sft7
#   sbatch --nodes 2 tools/slurm_train.sh ... --resume          # continue from the newest complete checkpoint
#
# --output_dir must be on a filesystem every node sees (each rank writes its own ZeRO partition there, rank 0
# the pointer file and the final model). PYTHON selects the interpreter (default: .venv/bin/python).
#SBATCH --job-name=gptneox
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=48:00:00
#SBATCH --signal=TERM@300
#SBATCH --output=%x-%j.out
set -euo pipefail
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    echo "usage: sbatch [--nodes N] tools/slurm_train.sh TRAIN_PY_ARGS..."
    sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
    exit 0
fi
cd "${SLURM_SUBMIT_DIR:-.}"
PYTHON=${PYTHON:-.venv/bin/python}
# the first node; read the whole list (a `| head -n 1` can kill scontrol with SIGPIPE, fatal under pipefail)
mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
MASTER_ADDR=${NODES[0]}
export MASTER_ADDR MASTER_PORT=${MASTER_PORT:-29500} PYTHON
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}   # INFO prints the chosen interfaces and transports when a job hangs
# every task sees all GPUs of its node and picks one by LOCAL_RANK (so no --gpus-per-task here)
srun --kill-on-bad-exit=1 bash -c \
    'export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS; exec "$PYTHON" train.py "$@" --deepspeed' \
    train "$@"
