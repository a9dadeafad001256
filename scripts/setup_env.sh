#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment at .venv in the repo root.
# Idempotent: a second run only checks that requirements.txt is satisfied.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating virtual environment at $VENV"
    "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.requirements.sha"
WANT="$(sha256sum "$ROOT/requirements.txt" | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null || true)" != "$WANT" ]; then
    # torch's wheel is a CUDA build: the installed .venv takes about 5.6 GB.
    bash "$ROOT/scripts/check_disk.sh" "$ROOT" 7 "installing the requirements into $VENV" \
        "Free some space on that disk, or clone the project onto a larger one."
    echo "[setup] installing requirements (about 2 minutes on a fresh machine)"
    "$VENV/bin/python" -m pip install -q -r "$ROOT/requirements.txt" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
    echo "$WANT" > "$STAMP"
fi
