#!/usr/bin/env bash
# One command: set up .venv if needed, then run the test suite (CPU, < 10 minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup_env.sh
# pytest's temporary folders peak near 1.8 GB (full-size checkpoints; each passed test's folder is
# deleted at its end, see pytest.ini). Without a TMPDIR of the user's, they go to /dev/shm when that
# memory file system has 4 GB free and the machine 8 GB of memory available: the tests write several
# GB of 173 MB checkpoints, which a disk's write-back throttling made take 0.3-2 s each instead of 0.17 s.
if [ -z "${TMPDIR:-}" ] && [ -d /dev/shm ] && [ -w /dev/shm ]; then
    shm_kb="$(df -Pk /dev/shm | awk 'NR == 2 {print $4}')"
    mem_kb="$(awk '/^MemAvailable:/ {print $2}' /proc/meminfo 2>/dev/null || echo 0)"
    if [ "${shm_kb:-0}" -ge $((4 * 1024 * 1024)) ] && [ "${mem_kb:-0}" -ge $((8 * 1024 * 1024)) ]; then
        export TMPDIR="/dev/shm/deepcluster-tests-$(id -u)"
        mkdir -p "$TMPDIR"
    fi
fi
bash scripts/check_disk.sh "${TMPDIR:-/tmp}" 3 "the test suite" \
    "Free some space there, or point TMPDIR at a larger disk: TMPDIR=/big/tmp ./run_tests.sh"
exec .venv/bin/python -m pytest -q "$@"
