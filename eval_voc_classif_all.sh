#!/usr/bin/env bash
# PASCAL VOC 2007 classification, all layers fine-tuned (paper: 73.7 mAP).
set -euo pipefail
cd "$(dirname "$0")"
VOC="${VOC:-/datasets/VOCdevkit/VOC2007}"
MODEL="${MODEL:-${HOME}/deepcluster_models/alexnet/checkpoint.pth.tar}"
SPLIT="${SPLIT:-trainval}"
EXP="${EXP:-exp_voc_all}"
NIT="${NIT:-80000}"
WORKERS="${WORKERS:-4}"
PYTHON="${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}"
"${PYTHON}" eval_voc_classif.py --vocdir "${VOC}" --model "${MODEL}" --split "${SPLIT}" --exp "${EXP}" \
  --nit "${NIT}" --fc6_8 0 --train_batchnorm 0 --lr 0.003 --wd 1e-6 --stepsize 5000 \
  --min_scale 0.1 --max_scale 0.5 --eval_random_crops 1 --workers "${WORKERS}" "$@"
