#!/usr/bin/env bash
# DeepCluster launcher. Settings come from environment variables, defaulting to the paper's:
#   DIR=/path/to/imagenet/train ARCH=alexnet EXP=exp ./main.sh [extra main.py flags]
# With DIR unset, main.py runs the CPU demo on scikit-learn's digits (its own defaults, which
# include --knn_data data/digits_split: a kNN accuracy at the random network and after each epoch).
# Multi-GPU / multi-node: NGPUS=8 [NNODES=2 NODE_RANK=0 MASTER_ADDR=host MASTER_PORT=29500] ./main.sh
# Asking for GPUs (NGPUS set) runs with --device cuda: a CUDA build that cannot see the GPUs
# (e.g. a driver too old for it) stops with an error instead of training on the CPU.
# Several CPU processes (gloo): DEVICE=cpu NGPUS=2 ./main.sh
# VERBOSE=1 adds --verbose (tracebacks of known errors, every k-means iteration).
# --batch (BATCH) is the global mini-batch: each of the NGPUS processes takes BATCH / NGPUS.
set -euo pipefail
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
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"

ARGS=(--device "$DEVICE")
if [ -n "$DIR" ]; then
    ARGS+=("$DIR" --exp "${EXP:-exp}" --arch "$ARCH" --lr "$LR" --wd "$WD" --k "$K" --workers "$WORKERS")
    [ "$SOBEL" = "1" ] && ARGS+=(--sobel)
    [ "$VERBOSE" = "1" ] && ARGS+=(--verbose)
    [ -n "$EPOCHS" ] && ARGS+=(--epochs "$EPOCHS")
elif [ -n "$EXP" ]; then
    ARGS+=(--exp "$EXP")  # the demo writes to exp_demo unless EXP says otherwise
fi

if [ "$NGPUS" -gt 1 ] || [ "$NNODES" -gt 1 ]; then
    exec "$PYTHON" -m torch.distributed.run --nproc_per_node="$NGPUS" --nnodes="$NNODES" \
        --node_rank="$NODE_RANK" --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" \
        main.py "${ARGS[@]}" "$@"
fi
exec "$PYTHON" main.py "${ARGS[@]}" "$@"
