#!/usr/bin/env bash
# PASCAL VOC 2007 classification, conv layers frozen, fc6-8 trained (paper: 72.0 mAP with the BN
# scales trained, TRAIN_BN=1; 70.4 with them frozen, the default TRAIN_BN=0).
set -euo pipefail
cd "$(dirname "$0")"
VOC="${VOC:-/datasets/VOCdevkit/VOC2007}"
MODEL="${MODEL:-${HOME}/deepcluster_models/alexnet/checkpoint.pth.tar}"
SPLIT="${SPLIT:-trainval}"
EXP="${EXP:-exp_voc_fc6_8}"
NIT="${NIT:-80000}"
TRAIN_BN="${TRAIN_BN:-0}"
WORKERS="${WORKERS:-4}"
PYTHON="${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}"
"${PYTHON}" eval_voc_classif.py --vocdir "${VOC}" --model "${MODEL}" --split "${SPLIT}" --exp "${EXP}" \
  --nit "${NIT}" --fc6_8 1 --train_batchnorm "${TRAIN_BN}" --lr 0.003 --wd 1e-6 --stepsize 5000 \
  --min_scale 0.1 --max_scale 0.5 --eval_random_crops 1 --workers "${WORKERS}" "$@"
