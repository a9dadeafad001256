#!/usr/bin/env bash
# One command: set up .venv (pinned wheels) and run the main job.
#   ./quickstart.sh                 # CPU demo on scikit-learn's digits (a few minutes)
#   DIR=/data/imagenet/train ./quickstart.sh   # the paper's run (see main.sh)
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup_env.sh
exec ./main.sh --report "$@"
