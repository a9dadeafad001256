#!/usr/bin/env bash
# Usage: scripts/gpu_check.sh [--dry-run] [--only CHECK ...] [--out FILE]
# The first minutes on a GPU box (one GPU, no network, installs nothing, under 8 minutes): every
# CUDA path of the repository checked (one PASS/FAIL/SKIP line each), AlexNet throughput and peak
# memory, JSON under benchmarks/results/. --dry-run (no GPU needed): the CUDA checks say SKIP.
# Python: .venv/bin/python when the repository has one, else the machine's python3 (never creates
# a .venv). Details: scripts/gpu_check.py.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
# each check has its own time box inside; this one bounds the whole run (8 minutes)
exec timeout -k 10 470 "$PY" scripts/gpu_check.py "$@"
