#!/usr/bin/env bash
# Linear classification on frozen conv features: by default the original release's run,
# `eval_linear.py --conv 3 --lr 0.01 --wd -7 --tencrops --verbose --workers 12` (90 epochs,
# batch 256), which reproduces the paper's ImageNet linear probe on AlexNet conv3
# (Table 2: 41.0 top-1; other layers with CONV=1..5: 13.4, 32.3, 41.0, 39.6, 38.2).
# DATA holds train/<class>/ and val/<class>/ (ImageNet or Places). Every value below can be
# overridden from the environment (TENCROPS=0 / VERBOSE=0 drop those flags); extra arguments
# are passed on to eval_linear.py.
set -euo pipefail
# paths given relative to the caller's folder (variables and path flags) are made absolute first
. "$(dirname "$0")/scripts/paths.sh"
abs_vars DATA MODEL EXP PYTHON
abs_args "$@"
cd "$(dirname "$0")"
DATA="${DATA:-/datasets/imagenet}"
MODEL="${MODEL:-${HOME}/deepcluster_models/alexnet/checkpoint.pth.tar}"
CONV="${CONV:-3}"
EXP="${EXP:-exp_linear_conv${CONV}}"
EPOCHS="${EPOCHS:-90}"
LR="${LR:-0.01}"
WD="${WD:--7}"
BATCH="${BATCH:-256}"
WORKERS="${WORKERS:-12}"
TENCROPS="${TENCROPS:-1}"
VERBOSE="${VERBOSE:-1}"
PYTHON="${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}"
flags=()
[ "${TENCROPS}" = 1 ] && flags+=(--tencrops)
[ "${VERBOSE}" = 1 ] && flags+=(--verbose)
"${PYTHON}" eval_linear.py --data "${DATA}" --model "${MODEL}" --conv "${CONV}" --exp "${EXP}" \
  --epochs "${EPOCHS}" --lr "${LR}" --wd "${WD}" --batch_size "${BATCH}" --workers "${WORKERS}" \
  ${flags[@]+"${flags[@]}"} ${ARGV[@]+"${ARGV[@]}"}
