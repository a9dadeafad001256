#!/usr/bin/env bash
# Weighted kNN on the frozen features of a DeepCluster model (top-1 / top-5, several k in one pass).
#   MODEL=exp/checkpoint.pth.tar DATA=/data/imagenet ./eval_knn.sh [extra eval_knn.py flags]
# DATA holds train/<class>/ and val/<class>/. LAYER=fc7 (pre-ReLU, as clustered) or conv1..conv5.
set -euo pipefail
# paths given relative to the caller's folder (variables and path flags) are made absolute first
. "$(dirname "$0")/scripts/paths.sh"
abs_vars DATA MODEL EXP PYTHON
abs_args "$@"
cd "$(dirname "$0")"
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"

DATA="${DATA:-/datasets/imagenet}"
MODEL="${MODEL:-exp/checkpoint.pth.tar}"
LAYER="${LAYER:-fc7}"
EXP="${EXP:-exp_knn_${LAYER}}"
WORKERS="${WORKERS:-12}"

exec "$PYTHON" eval_knn.py --data "$DATA" --model "$MODEL" --layer "$LAYER" --exp "$EXP" --workers "$WORKERS" \
    --nb_knn 10 20 100 200 --temperature 0.07 ${ARGV[@]+"${ARGV[@]}"}
