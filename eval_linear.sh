#!/usr/bin/env bash
# Linear classification on frozen conv features (the paper's settings by default).
# DATA holds train/<class>/ and val/<class>/ (ImageNet or Places).
set -euo pipefail
cd "$(dirname "$0")"
DATA="${DATA:-/datasets/imagenet}"
MODEL="${MODEL:-${HOME}/deepcluster_models/alexnet/checkpoint.pth.tar}"
CONV="${CONV:-3}"
EXP="${EXP:-exp_linear_conv${CONV}}"
EPOCHS="${EPOCHS:-90}"
LR="${LR:-0.01}"
WD="${WD:--4}"
BATCH="${BATCH:-256}"
WORKERS="${WORKERS:-4}"
PYTHON="${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}"
mkdir -p "${EXP}"
"${PYTHON}" eval_linear.py --data "${DATA}" --model "${MODEL}" --conv "${CONV}" --exp "${EXP}" \
  --epochs "${EPOCHS}" --lr "${LR}" --wd "${WD}" --batch_size "${BATCH}" --workers "${WORKERS}" \
  ${TENCROPS:+--tencrops} ${VERBOSE:+--verbose} "$@"
