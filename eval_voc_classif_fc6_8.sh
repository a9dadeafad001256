#!/usr/bin/env bash
# PASCAL VOC 2007 classification, conv layers frozen, fc6-8 trained: the original release's two
# runs (its eval_voc_classif.sh), one after the other:
#   TRAIN_BN=1  BN scale/shift of the conv layers trained  -> the paper's 72.0 mAP (Table 3, fc6-8)
#   TRAIN_BN=0  BN parameters frozen too                    -> 70.4 mAP (the paper's erratum)
# both with eval_voc_classif.py's defaults, which are the original's (80,000 iterations, lr 0.003
# halved every 5,000, batch 16, wd 1e-6). TRAIN_BN="1" (or "0") runs one of them; every other
# value can be overridden from the environment; extra arguments go to eval_voc_classif.py.
set -euo pipefail
# paths given relative to the caller's folder (variables and path flags) are made absolute first
. "$(dirname "$0")/scripts/paths.sh"
abs_vars VOC MODEL EXP PYTHON
abs_args "$@"
cd "$(dirname "$0")"
VOC="${VOC:-/datasets/VOCdevkit/VOC2007}"
MODEL="${MODEL:-${HOME}/deepcluster_models/alexnet/checkpoint.pth.tar}"
SPLIT="${SPLIT:-trainval}"
EXP="${EXP:-exp_voc_fc6_8}"
NIT="${NIT:-80000}"
LR="${LR:-0.003}"
STEPSIZE="${STEPSIZE:-5000}"
BATCH="${BATCH:-16}"
WD="${WD:-1e-6}"
TRAIN_BN="${TRAIN_BN:-1 0}"
WORKERS="${WORKERS:-4}"
PYTHON="${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}"
for bn in ${TRAIN_BN}; do
  "${PYTHON}" eval_voc_classif.py --vocdir "${VOC}" --model "${MODEL}" --split "${SPLIT}" \
    --exp "${EXP}_train_bn${bn}" --fc6_8 1 --train_batchnorm "${bn}" --nit "${NIT}" --lr "${LR}" \
    --stepsize "${STEPSIZE}" --batch_size "${BATCH}" --wd "${WD}" --min_scale 0.1 --max_scale 0.5 \
    --eval_random_crops 1 --workers "${WORKERS}" ${ARGV[@]+"${ARGV[@]}"}
done
