#!/usr/bin/env bash
# DeepCluster launcher. Settings come from environment variables, defaulting to the paper's:
#   DIR=/path/to/imagenet/train ARCH=alexnet EXP=exp ./main.sh [extra main.py flags]
# With DIR unset, main.py runs the CPU demo on scikit-learn's digits (its own defaults, which
# include --knn_data data/digits_split: a kNN accuracy at the random network and after each epoch).
# Multi-GPU / multi-node: NGPUS=8 [NNODES=2 [NODE_RANK=0] MASTER_ADDR=host MASTER_PORT=29500] ./main.sh
# Asking for GPUs (NGPUS set) runs with --device cuda: a CUDA build that cannot see the GPUs
# (e.g. a driver too old for it) stops with an error instead of training on the CPU.
# Several CPU processes (gloo): DEVICE=cpu NGPUS=2 ./main.sh
# VERBOSE=1 adds --verbose (tracebacks of known errors, every k-means iteration).
# Under torchrun a failed worker restarts the job up to MAX_RESTARTS times (default 3): each
# restart continues the run from its newest checkpoint (docs/resume.md). Multi-node jobs meet
# through a c10d rendezvous at MASTER_ADDR:MASTER_PORT under RDZV_ID (default: SLURM_JOB_ID),
# or a static one when NODE_RANK is given (then NODE_RANK=0..NNODES-1, one per node):
#   NGPUS=8 NNODES=4 MASTER_ADDR=node0 RDZV_ID=job42 ./main.sh     # the same command on every node
# A SIGTERM or SIGUSR1 (SLURM: #SBATCH --signal=USR1@120) stops every rank at the next step
# with a checkpoint; the exit code is then 75: relaunch with --resume EXP to continue.
# --batch (BATCH) is the global mini-batch: each of the NGPUS processes takes BATCH / NGPUS.
# The processes are started by launch.py (torchrun, its flags, with one error line and the failed
# worker's exit code: 2 bad input, 75 stopped, 130 Ctrl-C; docs/distributed.md).
set -euo pipefail
# paths given relative to the caller's folder (variables and path flags) are made absolute first
. "$(dirname "$0")/scripts/paths.sh"
abs_vars DIR EXP PYTHON
abs_args "$@"
cd "$(dirname "$0")"
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"

DIR="${DIR:-}"
ARCH="${ARCH:-alexnet}"
LR="${LR:-0.05}"
WD="${WD:--5}"
K="${K:-10000}"
WORKERS="${WORKERS:-12}"
EXP="${EXP:-}"
SOBEL="${SOBEL:-1}"
EPOCHS="${EPOCHS:-}"
VERBOSE="${VERBOSE:-0}"  # 1: --verbose (the original's main.sh always passed it: debug lines, tracebacks)
if [ -n "${NGPUS:-}" ]; then DEVICE="${DEVICE:-cuda}"; else DEVICE="${DEVICE:-auto}"; fi
NGPUS="${NGPUS:-1}"
NNODES="${NNODES:-1}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"
MAX_RESTARTS="${MAX_RESTARTS:-3}"
RDZV_ID="${RDZV_ID:-${SLURM_JOB_ID:-deepcluster}}"

ARGS=(--device "$DEVICE")
if [ -n "$DIR" ]; then
    ARGS+=("$DIR" --exp "${EXP:-exp}" --arch "$ARCH" --lr "$LR" --wd "$WD" --k "$K" --workers "$WORKERS")
    [ "$SOBEL" = "1" ] && ARGS+=(--sobel)
    [ "$VERBOSE" = "1" ] && ARGS+=(--verbose)
    [ -n "$EPOCHS" ] && ARGS+=(--epochs "$EPOCHS")
elif [ -n "$EXP" ]; then
    ARGS+=(--exp "$EXP")  # the demo writes to exp_demo unless EXP says otherwise
fi

if [ "$NNODES" -gt 1 ] && [ -n "${NODE_RANK:-}" ]; then  # static rendezvous: each node given its NODE_RANK
    exec "$PYTHON" launch.py --nproc_per_node="$NGPUS" --nnodes="$NNODES" \
        --node_rank="$NODE_RANK" --max-restarts="$MAX_RESTARTS" --master_addr="$MASTER_ADDR" \
        --master_port="$MASTER_PORT" main.py "${ARGS[@]}" ${ARGV[@]+"${ARGV[@]}"}
fi
if [ "$NNODES" -gt 1 ]; then  # c10d rendezvous: node ranks are assigned, the same command everywhere
    exec "$PYTHON" launch.py --nproc_per_node="$NGPUS" --nnodes="$NNODES" \
        --max-restarts="$MAX_RESTARTS" --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" \
        --rdzv-id="$RDZV_ID" main.py "${ARGS[@]}" ${ARGV[@]+"${ARGV[@]}"}
fi
if [ "$NGPUS" -gt 1 ]; then  # one node: c10d rendezvous on a free local port (a restart meets afresh)
    exec "$PYTHON" launch.py --standalone --nproc_per_node="$NGPUS" \
        --max-restarts="$MAX_RESTARTS" main.py "${ARGS[@]}" ${ARGV[@]+"${ARGV[@]}"}
fi
exec "$PYTHON" main.py "${ARGS[@]}" ${ARGV[@]+"${ARGV[@]}"}
