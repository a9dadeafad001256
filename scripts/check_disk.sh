#!/usr/bin/env bash
# Usage: scripts/check_disk.sh DIR MIN_GB WHAT HINT
# Refuse, with one line naming DIR and the space it has, when DIR's file system has less than
# MIN_GB free: a run that fills the disk fails far from the cause (dozens of ENOSPC errors).
set -euo pipefail
dir="$1"; need_gb="$2"; what="$3"; hint="$4"
if [ ! -d "$dir" ]; then
    echo "error: $what needs the folder $dir, which does not exist." >&2
    exit 2
fi
free_kb="$(df -Pk "$dir" | awk 'NR == 2 {print $4}')"
need_kb=$((need_gb * 1024 * 1024))
if [ "$free_kb" -lt "$need_kb" ]; then
    echo "error: $what needs about $need_gb GB free in $dir; it has $((free_kb / 1024)) MB." >&2
    echo "       $hint" >&2
    exit 2
fi
