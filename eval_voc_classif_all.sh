#!/usr/bin/env bash
# PASCAL VOC 2007 classification, all layers fine-tuned: the paper's 73.7 mAP (Table 3, "all").
# The original produced it with its Caffe launcher (philkr/voc-classification): lr 0.001 halved
# every 20,000 iterations, 150,000 iterations, batch 16, weight decay 1e-6, gradient clipping
# at 10, fc6-8 re-initialised; those are the defaults here, run through eval_voc_classif.py
# (whose data augmentation is the PyTorch script's, not Caffe's). Every value can be overridden
# from the environment; extra arguments are passed on to eval_voc_classif.py.
set -euo pipefail
# paths given relative to the caller's folder (variables and path flags) are made absolute first
. "$(dirname "$0")/scripts/paths.sh"
abs_vars VOC MODEL EXP PYTHON
abs_args "$@"
cd "$(dirname "$0")"
VOC="${VOC:-/datasets/VOCdevkit/VOC2007}"
MODEL="${MODEL:-${HOME}/deepcluster_models/alexnet/checkpoint.pth.tar}"
SPLIT="${SPLIT:-trainval}"
EXP="${EXP:-exp_voc_all}"
NIT="${NIT:-150000}"
LR="${LR:-0.001}"
STEPSIZE="${STEPSIZE:-20000}"
BATCH="${BATCH:-16}"
WD="${WD:-1e-6}"
WORKERS="${WORKERS:-4}"
PYTHON="${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}"
"${PYTHON}" eval_voc_classif.py --vocdir "${VOC}" --model "${MODEL}" --split "${SPLIT}" --exp "${EXP}" \
  --fc6_8 0 --train_batchnorm 0 --nit "${NIT}" --lr "${LR}" --stepsize "${STEPSIZE}" --batch_size "${BATCH}" \
  --wd "${WD}" --min_scale 0.1 --max_scale 0.5 --eval_random_crops 1 --workers "${WORKERS}" ${ARGV[@]+"${ARGV[@]}"}
