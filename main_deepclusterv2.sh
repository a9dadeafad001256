#!/usr/bin/env bash
# DeepCluster-v2 launcher: facebookresearch/swav's scripts/deepclusterv2_*_pretrain.sh recipes.
#   DIR=/path/to/imagenet/train RECIPE=800ep EXP=exp_dcv2 ./main_deepclusterv2.sh [extra flags]
# RECIPE (swav's scripts; ImageNet linear top-1 of their released models):
#   800ep         2x224 + 6x96 crops (min scale 0.14 0.05, max 1 0.14), 800 epochs   75.2
#   400ep         2x160 + 4x96 crops (min scale 0.08 0.05, max 1 0.14), 400 epochs   74.3
#   400ep_2x224   2x224 crops (min scale 0.08), 400 epochs                            70.2
# Common to all: crops_for_assign 0 1, temperature 0.1, feat_dim 128, nmb_prototypes 3000 x3,
# wd 1e-6, warmup 10 epochs, LARC (trust 0.001, no clipping), ResNet-50, SyncBatchNorm.
#
# swav ran 64 GPUs (8 nodes x 8) with --batch_size 64 each: global batch 4096, base_lr 4.8,
# final_lr 0.0048, start_warmup 0.3, freeze_prototypes_niters 300000. That is
#   NNODES=8 NGPUS=8 NODE_RANK=0..7 MASTER_ADDR=host ./main_deepclusterv2.sh   (exactly swav's values)
# On fewer GPUs the global batch is NNODES x NGPUS x BATCH and this script scales the three
# learning rates linearly with it (lr x global/4096) and freeze_prototypes_niters inversely
# (300000 steps of 4096 images = 961 ImageNet epochs: the prototypes never leave their
# k-means values; the same number of images is kept). Single node, 8 GPUs x 64 = 512 images:
#   base_lr 0.6, final_lr 0.0006, start_warmup 0.0375, freeze_prototypes_niters 2400000.
# swav gives no single-node DeepCluster-v2 recipe; this linear rule is ours (its SwAV
# batch-256 recipe used 0.6, twice the linear value). Override with BASE_LR/FINAL_LR/START_WARMUP.
# Several CPU processes (gloo, per-process BatchNorm): DEVICE=cpu NGPUS=2 ./main_deepclusterv2.sh
# The processes are started by launch.py (torchrun with one error line and the failed worker's
# exit code; docs/distributed.md).
set -euo pipefail
# paths given relative to the caller's folder (variables and path flags) are made absolute first
. "$(dirname "$0")/scripts/paths.sh"
abs_vars DIR EXP PYTHON
abs_args "$@"
cd "$(dirname "$0")"
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"

DIR="${DIR:?set DIR to the training image folder (e.g. /path/to/imagenet/train)}"
RECIPE="${RECIPE:-800ep}"
EXP="${EXP:-exp_dcv2_$RECIPE}"
NGPUS="${NGPUS:-8}"
NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"
BATCH="${BATCH:-64}"
WORKERS="${WORKERS:-10}"
DEVICE="${DEVICE:-cuda}"

case "$RECIPE" in
    800ep)       CROPS=(--nmb_crops 2 6 --size_crops 224 96 --min_scale_crops 0.14 0.05 --max_scale_crops 1. 0.14)
                 EPOCHS=800 ;;
    400ep)       CROPS=(--nmb_crops 2 4 --size_crops 160 96 --min_scale_crops 0.08 0.05 --max_scale_crops 1. 0.14)
                 EPOCHS=400 ;;
    400ep_2x224) CROPS=(--nmb_crops 2 --size_crops 224 --min_scale_crops 0.08 --max_scale_crops 1.)
                 EPOCHS=400 ;;
    *) echo "error: RECIPE $RECIPE: expected 800ep, 400ep or 400ep_2x224" >&2; exit 2 ;;
esac

GLOBAL=$(( NNODES * NGPUS * BATCH ))
scale() { awk -v v="$1" -v g="$GLOBAL" 'BEGIN { printf "%.10g", v * g / 4096 }'; }
BASE_LR="${BASE_LR:-$(scale 4.8)}"
FINAL_LR="${FINAL_LR:-$(scale 0.0048)}"
START_WARMUP="${START_WARMUP:-$(scale 0.3)}"
FREEZE="${FREEZE:-$(awk -v g="$GLOBAL" 'BEGIN { printf "%d", 300000 * 4096 / g }')}"
echo "DeepCluster-v2 $RECIPE: $NNODES node(s) x $NGPUS process(es) x batch $BATCH = $GLOBAL images per step;" \
     "base_lr $BASE_LR final_lr $FINAL_LR start_warmup $START_WARMUP freeze_prototypes_niters $FREEZE" >&2

ARGS=("$DIR" --exp "$EXP" "${CROPS[@]}" --crops_for_assign 0 1 --temperature 0.1 --feat_dim 128
      --nmb_prototypes 3000 3000 3000 --epochs "$EPOCHS" --batch_size "$BATCH" --base_lr "$BASE_LR"
      --final_lr "$FINAL_LR" --freeze_prototypes_niters "$FREEZE" --wd 0.000001 --warmup_epochs 10
      --start_warmup "$START_WARMUP" --arch resnet50 --sync_bn pytorch --workers "$WORKERS" --device "$DEVICE")

if [ "$NGPUS" -gt 1 ] || [ "$NNODES" -gt 1 ]; then
    exec "$PYTHON" launch.py --nproc_per_node="$NGPUS" --nnodes="$NNODES" \
        --node_rank="$NODE_RANK" --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" \
        main_deepclusterv2.py "${ARGS[@]}" ${ARGV[@]+"${ARGV[@]}"}
fi
exec "$PYTHON" main_deepclusterv2.py "${ARGS[@]}" ${ARGV[@]+"${ARGV[@]}"}
