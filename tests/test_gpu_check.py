"""scripts/gpu_check.sh --dry-run: the GPU box's first command runs without a GPU (CUDA checks SKIP)."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "gpu_check.json"
    res = subprocess.run([str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run", "--out", str(out)], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    lines = [line for line in res.stdout.splitlines() if line.split(" ", 1)[0] in ("PASS", "FAIL", "SKIP")]
    report = json.loads(out.read_text())
    checks = report["checks"]
    assert report["dry_run"] and len(lines) == len(checks) == 8  # one line per check
    assert checks["environment"]["status"] == checks["decode_cpu_twin"]["status"] == "PASS"
    skipped = {n for n, c in checks.items() if c["status"] == "SKIP"}
    assert skipped == {"cuda_tests", "decode_gpu", "clustering", "demo_cuda_vs_cpu", "torchrun", "throughput"}
    assert checks["decode_cpu_twin"]["numbers"]["max_abs"] <= 1
    assert not (tmp_path / ".venv").exists()
