#!/usr/bin/env bash
# One command: set up .venv if needed, then run the test suite (CPU, < 10 minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup_env.sh
# pytest's temporary folders peak near 1.8 GB (full-size checkpoints; each passed test's folder is
# deleted at its end, see pytest.ini).
bash scripts/check_disk.sh "${TMPDIR:-/tmp}" 3 "the test suite" \
    "Free some space there, or point TMPDIR at a larger disk: TMPDIR=/big/tmp ./run_tests.sh"
exec .venv/bin/python -m pytest -q "$@"
