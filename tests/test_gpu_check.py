"""scripts/gpu_check.py without a GPU: every command line it launches parses with the script's own
parser, the dry run runs what needs no CUDA, and the process group of one
(DEEPCLUSTER_FORCE_DISTRIBUTED=1) gives the one-process results on CPU/gloo."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import distributed

import gpu_checks as gc

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)  # the driver: run_checks, its parser
spec.loader.exec_module(gpu_check)


@pytest.mark.parametrize("dev", ["cuda", "cpu"])
def test_every_command_line_parses_with_the_scripts_parser(tmp_path, dev):
    """What the GPU run launches (main.py, main_deepclusterv2.py, launch.py's torchrun flags) is
    accepted by the real parsers, with the sizes of each device."""
    cmds = gc.command_lines(tmp_path, dev)
    scripts = {c.script for c in cmds.values()}
    assert scripts == {"main.py", "main_deepclusterv2.py"} and any(c.nproc == 2 for c in cmds.values())
    for name, cmd in cmds.items():
        args = gc.parse_command(cmd)
        assert args.device == ("cpu" if dev == "cpu" else "cuda"), name
    assert cmds["v1_group_of_one"].env == {"DEEPCLUSTER_FORCE_DISTRIBUTED": "1"}
    assert gc.preflight(tmp_path)["status"] == "PASS"


def test_a_flag_the_script_lacks_fails_before_any_run(tmp_path, monkeypatch, capsys):
    """The flag that made the former torchrun check fail on every GPU box is refused here (and
    would be by the pre-flight of every run), for both trainers and for torchrun's own flags."""
    cmds = gc.command_lines(tmp_path, "cuda")
    bad = [gc.Command("main.py", cmds["v1_plain"].argv + ["--knn_every", "0"]),
           gc.Command("main_deepclusterv2.py", cmds["v2_fp32"].argv + ["--no_such_flag"]),
           gc.Command("main.py", cmds["v1_plain"].argv + ["--batch", "7"], nproc=2)]  # 7 % 2: main.py's rule
    for cmd in bad:
        with pytest.raises(SystemExit) as e:
            gc.parse_command(cmd)
        assert e.value.code == 2
    real = gc.command_lines
    monkeypatch.setattr(gc, "command_lines", lambda work, dev="cuda": {**real(work, dev), "bad": bad[0]})
    res = gc.preflight(tmp_path)
    assert res["status"] == "FAIL" and "bad (cuda)" in res["detail"] and "bad (cpu)" in res["detail"]


def test_missing_packages_are_one_skip_line_each(tmp_path, monkeypatch, capsys):
    """A box without scikit-learn or tqdm: one SKIP line per package, the checks that need one
    SKIP with the reason, and tqdm's stand-in lets main.py run."""
    monkeypatch.setattr(gc, "package_versions", lambda: ({"torch": torch.__version__}, ["tqdm", "pytest"]))
    args = gpu_check.get_args_parser().parse_args(["--dry-run"])
    res = gpu_check.run_checks(["cuda_tests"], str(tmp_path), args, 100.0, 0.0)
    out = capsys.readouterr().out.splitlines()
    assert "SKIP package_tqdm: tqdm is not installed: a stand-in runs (no progress bars)" in out
    assert res["package_pytest"]["status"] == "SKIP" and res["commands"]["status"] == "PASS"
    assert gc.skip_reason(gc.CHECKS["cuda_tests"], True, False, ["pytest"]) == \
        "needs pytest (not installed)"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    env = gc.child_env(tmp_path, {"X": "1"})
    shim = env["PYTHONPATH"].split(":")[0]
    code = "from tqdm import tqdm; b = tqdm(range(3), disable=False); b.set_postfix(loss=1); print(sum(b), b.disable)"
    ran = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=shim)
    assert ran.stdout.split() == ["3", "True"] and env["X"] == "1"


def _run(argv: list[str]) -> None:
    import main
    assert main.run(argv) == 0


def test_group_of_one_equals_one_process_on_gloo(tmp_path, monkeypatch):
    """DEEPCLUSTER_FORCE_DISTRIBUTED=1 (gloo, one process): DDP, the sharded k-means, the loss
    all-reduce and the RNG gather all run (collectives counted) and the run equals the plain
    one: the same train loss and clusters, bitwise (the CPU is deterministic)."""
    monkeypatch.setattr(gc, "DEV", "cpu")
    monkeypatch.setattr(gc, "sizes", lambda dev="cpu": dict(gc.SIZES["cpu"], n=16))
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", distributed.FORCE_DISTRIBUTED_ENV):
        monkeypatch.delenv(k, raising=False)
    gc.photo_folder(tmp_path, 16)
    cmds = gc.command_lines(tmp_path, "cpu")
    _run(cmds["v1_plain"].argv + ["--workers", "0"])
    calls = []
    for name in ("all_reduce", "broadcast", "all_gather", "gather_object"):
        real = getattr(torch.distributed, name)
        monkeypatch.setattr(torch.distributed, name,
                            lambda *a, _r=real, _n=name, **k: (calls.append(_n), _r(*a, **k))[1])
    monkeypatch.setenv(distributed.FORCE_DISTRIBUTED_ENV, "1")
    _run(cmds["v1_group_of_one"].argv + ["--workers", "0"])
    assert not torch.distributed.is_initialized()  # cli.run_cli destroyed the group of one
    assert {"all_reduce", "broadcast", "gather_object"} <= set(calls) and len(calls) > 20
    logs = [json.loads((tmp_path / e / "log.jsonl").read_text().splitlines()[-1]) for e in ("plain", "group_of_one")]
    assert logs[0]["train_loss"] == logs[1]["train_loss"] and logs[0]["clustering_loss"] == logs[1]["clustering_loss"]
    clusters = [np.load(tmp_path / e / "clusters" / "epoch_00000.npy") for e in ("plain", "group_of_one")]
    assert np.array_equal(*clusters)


def test_gpu_check_dry_run(tmp_path):
    """scripts/gpu_check.sh --dry-run: one line per check; the command lines parse, what needs no
    CUDA runs and passes, every CUDA check says SKIP with its reason; no .venv is made."""
    out = tmp_path / "gpu_check.json"
    res = subprocess.run([str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run", "--out", str(out)], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    lines = [line for line in res.stdout.splitlines() if line.split(" ", 1)[0] in ("PASS", "FAIL", "SKIP")]
    report = json.loads(out.read_text())
    checks = report["checks"]
    assert report["dry_run"] and len(lines) == len(checks) >= len(gc.CHECKS) + 1
    ran = {n for n, c in checks.items() if c["status"] == "PASS"}
    assert ran == {"commands", "environment", "loader", "decode_cpu_twin"}
    skipped = {n for n, c in checks.items() if c["status"] == "SKIP" and "needs CUDA" in c["detail"]}
    assert skipped == {n for n, c in gc.CHECKS.items() if c.cuda}
    assert checks["decode_cpu_twin"]["numbers"]["max_abs"] <= 1
    assert checks["loader"]["numbers"]["img_s"]["pil"] > 0
    assert not (tmp_path / ".venv").exists()
