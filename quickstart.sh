#!/usr/bin/env bash
# One command: set up .venv (pinned wheels) and run the main job.
#   ./quickstart.sh                 # CPU demo on scikit-learn's digits (a few minutes)
#   DIR=/data/imagenet/train ./quickstart.sh   # the paper's run (see main.sh)
set -euo pipefail
# paths given relative to the caller's folder (variables and path flags) are made absolute first
. "$(dirname "$0")/scripts/paths.sh"
abs_vars DIR EXP PYTHON
abs_args "$@"
cd "$(dirname "$0")"
bash scripts/setup_env.sh
exec ./main.sh --report ${ARGV[@]+"${ARGV[@]}"}
