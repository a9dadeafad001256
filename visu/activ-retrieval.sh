#!/bin/bash
# Top 9 images of a dataset for each filter of conv layer CONV (by mean activation).
# Usage: edit the variables below (or set them in the environment), then ./visu/activ-retrieval.sh
set -euo pipefail
# paths given relative to the caller's folder (variables and path flags) are made absolute first
. "$(dirname "$0")/../scripts/paths.sh"
abs_vars MODEL DATA EXP PYTHON
abs_args "$@"
cd "$(dirname "$0")/.."

MODEL="${MODEL:-exp/checkpoint.pth.tar}"   # checkpoint (ours or a released DeepCluster one)
ARCH="${ARCH:-}"                             # alexnet or vgg16 (empty: the checkpoint's)
CONV="${CONV:-5}"                            # conv layer, 1-based (alexnet 1..5, vgg16 1..13)
DATA="${DATA:-data/digits}"                  # image folder (e.g. the ImageNet val set)
EXP="${EXP:-visu_activ_retrieval}"           # output folder
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"

"$PYTHON" visu/activ-retrieval.py --model "$MODEL" ${ARCH:+--arch "$ARCH"} --conv "$CONV" --data "$DATA" \
    --exp "$EXP" --count 9 ${ARGV[@]+"${ARGV[@]}"}
