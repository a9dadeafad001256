#!/usr/bin/env bash
# One command: set up .venv if needed, then run the test suite (CPU, < 10 minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup_env.sh
exec .venv/bin/python -m pytest -q "$@"
