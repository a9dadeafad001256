#!/bin/bash
# Filter visualisation by gradient ascent: one synthetic image per filter of conv layer CONV.
# Usage: edit the variables below (or set them in the environment), then ./visu/gradient_ascent.sh
set -euo pipefail
# paths given relative to the caller's folder (variables and path flags) are made absolute first
. "$(dirname "$0")/../scripts/paths.sh"
abs_vars MODEL EXP PYTHON
abs_args "$@"
cd "$(dirname "$0")/.."

MODEL="${MODEL:-exp/checkpoint.pth.tar}"   # checkpoint (ours or a released DeepCluster one)
ARCH="${ARCH:-}"                             # alexnet or vgg16 (empty: the checkpoint's)
CONV="${CONV:-1}"                            # conv layer, 1-based (alexnet 1..5, vgg16 1..13)
EXP="${EXP:-visu_gradient_ascent}"           # output folder
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"

# The README of the original suggests lr 3 / 30000 iterations for conv1 and lr 30 / 3000
# iterations for conv5 with the released AlexNet; the defaults are lr 3, 1000 iterations.
"$PYTHON" visu/gradient_ascent.py --model "$MODEL" ${ARCH:+--arch "$ARCH"} --conv "$CONV" --exp "$EXP" \
    --lr 3 --wd 0.00001 --sig 0.3 --step 5 --niter 1000 --idim 224 ${ARGV[@]+"${ARGV[@]}"}
