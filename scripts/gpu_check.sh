#!/usr/bin/env bash
# Usage: scripts/gpu_check.sh [--dry-run] [--only CHECK ...] [--out FILE]
# The first minutes on a GPU box (one GPU, no network, installs nothing, under 8 minutes): every
# command line parsed first, then each CUDA path checked (one PASS/FAIL/SKIP line each, with its
# numbers): NCCL in a process group of one, the host-sync audit, DeepCluster-v2 with --amp and a
# resume, the eigensolver at D=4096, --decode gpu training, loader img/s, peak memory and img/s of
# AlexNet/VGG-16/ResNet-50 at batch 256 and of v2's recipe. JSON under benchmarks/results/.
# --dry-run (no GPU needed): the CUDA checks say SKIP. GPU_CHECK_DEVICE=cpu: their code on the
# CPU with tiny data (slower: the time box grows with it).
# Python: .venv/bin/python when the repository has one, else the machine's python3 (never creates
# a .venv). Details: scripts/gpu_check.py.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
# each check has its own time box inside; this one bounds the whole run (8 minutes on a GPU)
LIMIT=470
if [ "${GPU_CHECK_DEVICE:-cuda}" = cpu ]; then LIMIT=1900; fi
exec timeout -k 10 "$LIMIT" "$PY" scripts/gpu_check.py "$@"
