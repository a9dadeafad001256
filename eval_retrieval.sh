#!/usr/bin/env bash
# Instance-level retrieval with R-MAC on VGG-16 conv5_3 (paper: Oxford5K 61.0, Paris6K 72.0).
# Each dataset is whitened with the other one. Datasets: DIR/jpg/*.jpg + DIR/gt/ (or gnd_*.pkl).
set -euo pipefail
# paths given relative to the caller's folder (variables and path flags) are made absolute first
. "$(dirname "$0")/scripts/paths.sh"
abs_vars OXFORD PARIS MODEL EXP PYTHON
abs_args "$@"
cd "$(dirname "$0")"
OXFORD="${OXFORD:-/datasets/oxford5k}"
PARIS="${PARIS:-/datasets/paris6k}"
MODEL="${MODEL:-${HOME}/deepcluster_models/vgg16/checkpoint.pth.tar}"
EXP="${EXP:-exp_retrieval}"
S="${S:-1024}"
PYTHON="${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}"
"${PYTHON}" eval_retrieval.py --data "${OXFORD}" --whiten_data "${PARIS}" --model "${MODEL}" --S "${S}" --exp "${EXP}" ${ARGV[@]+"${ARGV[@]}"}
"${PYTHON}" eval_retrieval.py --data "${PARIS}" --whiten_data "${OXFORD}" --model "${MODEL}" --S "${S}" --exp "${EXP}" ${ARGV[@]+"${ARGV[@]}"}
