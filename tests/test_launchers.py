"""The evaluation launchers pass the original release's values by default (PYTHON = a stub
that records its arguments), and environment variables override them."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def launch(tmp_path: Path, script: str, **env: str) -> list[dict[str, str | bool]]:
    """Run ``script`` with PYTHON = a stub; one dict per stub call: flag -> value (True if bare)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    log = tmp_path / "calls.txt"
    stub = tmp_path / "stub.sh"
    stub.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" >> "{log}"\necho "@@END" >> "{log}"\n')
    stub.chmod(0o755)
    full = {**os.environ, "PYTHON": str(stub), "EXP": str(tmp_path / "exp"), **env}
    r = subprocess.run(["bash", str(ROOT / script)], env=full, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    calls = []
    for block in log.read_text().split("@@END\n")[:-1]:
        argv = block.splitlines()
        parsed: dict[str, str | bool] = {"script": argv[0]}
        i = 1
        while i < len(argv):
            if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                parsed[argv[i]] = argv[i + 1]
                i += 2
            else:
                parsed[argv[i]] = True
                i += 1
        calls.append(parsed)
    return calls


def test_eval_linear_sh_is_the_originals_run(tmp_path):
    (call,) = launch(tmp_path, "eval_linear.sh")
    assert call["script"] == "eval_linear.py"
    assert (call["--conv"], call["--lr"], call["--wd"], call["--tencrops"], call["--verbose"], call["--workers"],
            call["--epochs"], call["--batch_size"]) == ("3", "0.01", "-7", True, True, "12", "90", "256")
    (call,) = launch(tmp_path / "o", "eval_linear.sh", CONV="5", WD="-4", LR="0.1", TENCROPS="0")
    assert (call["--conv"], call["--wd"], call["--lr"]) == ("5", "-4", "0.1") and "--tencrops" not in call


def test_eval_voc_all_sh_is_the_originals_all_layers_run(tmp_path):
    (call,) = launch(tmp_path, "eval_voc_classif_all.sh")
    assert call["script"] == "eval_voc_classif.py"
    assert (call["--fc6_8"], call["--lr"], call["--nit"], call["--stepsize"], call["--batch_size"], call["--wd"],
            call["--split"]) == ("0", "0.001", "150000", "20000", "16", "1e-6", "trainval")
    (call,) = launch(tmp_path / "o", "eval_voc_classif_all.sh", LR="0.003", NIT="10", STEPSIZE="5", BATCH="4")
    assert (call["--lr"], call["--nit"], call["--stepsize"], call["--batch_size"]) == ("0.003", "10", "5", "4")


def test_eval_voc_fc6_8_sh_runs_the_originals_two_commands(tmp_path):
    calls = launch(tmp_path, "eval_voc_classif_fc6_8.sh")
    assert [c["--train_batchnorm"] for c in calls] == ["1", "0"]
    assert len({c["--exp"] for c in calls}) == 2
    for c in calls:
        assert (c["--fc6_8"], c["--split"], c["--nit"], c["--lr"], c["--stepsize"], c["--batch_size"], c["--wd"],
                c["--min_scale"], c["--max_scale"], c["--eval_random_crops"]) == \
            ("1", "trainval", "80000", "0.003", "5000", "16", "1e-6", "0.1", "0.5", "1")
    calls = launch(tmp_path / "o", "eval_voc_classif_fc6_8.sh", TRAIN_BN="0", NIT="7")
    assert [(c["--train_batchnorm"], c["--nit"]) for c in calls] == [("0", "7")]


@pytest.mark.parametrize("script", ["eval_linear.sh", "eval_voc_classif_all.sh", "eval_voc_classif_fc6_8.sh"])
def test_launcher_header_names_the_paper_number(script):
    header = "".join(ln for ln in (ROOT / script).read_text().splitlines(True)[1:8] if ln.startswith("#"))
    assert {"eval_linear.sh": "41.0", "eval_voc_classif_all.sh": "73.7",
            "eval_voc_classif_fc6_8.sh": "72.0"}[script] in header


@pytest.mark.parametrize("case", ["enough", "too_little", "missing"])
def test_disk_check_names_the_folder_and_its_space(tmp_path, case):
    folder = tmp_path / "nope" if case == "missing" else tmp_path
    need_gb = {"enough": "0", "too_little": "999999", "missing": "0"}[case]
    r = subprocess.run(["bash", str(ROOT / "scripts" / "check_disk.sh"), str(folder), need_gb,
                        "the test suite", "HINT"], capture_output=True, text=True, timeout=30)
    if case == "enough":
        assert r.returncode == 0 and r.stderr == ""
        return
    assert r.returncode == 2
    first = r.stderr.splitlines()[0]
    assert first.startswith("error: the test suite needs") and str(folder) in first
    if case == "too_little":
        assert "999999 GB" in first and " MB." in first and "HINT" in r.stderr
    else:
        assert "does not exist" in first and not folder.exists()


# every launcher with the variables that name paths (set relative to the caller's folder)
PATH_VARS = {"main.sh": ["DIR", "EXP"], "main_deepclusterv2.sh": ["DIR", "EXP"], "quickstart.sh": ["DIR", "EXP"],
             "eval_linear.sh": ["DATA", "MODEL", "EXP"], "eval_knn.sh": ["DATA", "MODEL", "EXP"],
             "eval_retrieval.sh": ["OXFORD", "PARIS", "MODEL", "EXP"],
             "eval_voc_classif_all.sh": ["VOC", "MODEL", "EXP"], "eval_voc_classif_fc6_8.sh": ["VOC", "MODEL", "EXP"],
             "visu/gradient_ascent.sh": ["MODEL", "EXP"], "visu/activ-retrieval.sh": ["MODEL", "DATA", "EXP"]}


@pytest.mark.parametrize("script", sorted(PATH_VARS))
def test_launchers_resolve_relative_paths_against_the_callers_folder(script, tmp_path):
    """Run from another folder with relative paths (variables, path flags, PYTHON itself): the
    script is given them absolute, against the caller's folder, though the launcher cd's away."""
    caller = tmp_path / "caller"
    caller.mkdir()
    log = tmp_path / "calls.txt"
    (caller / "stub.sh").write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" >> "{log}"\necho "@@END" >> "{log}"\n')
    (caller / "stub.sh").chmod(0o755)
    env = {**os.environ, "PYTHON": "./stub.sh", "NGPUS": "1", **{v: f"rel_{v}" for v in PATH_VARS[script]}}
    extra = ["--resume", "rel_resume", "--file_list=rel_list", "--lr", "0.1"]
    r = subprocess.run(["bash", str(ROOT / script), *extra], env=env, cwd=caller, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    calls = [block.splitlines() for block in log.read_text().split("@@END\n")[:-1]]
    assert calls
    for argv in calls:
        rel = [a for a in argv if "rel_" in a]
        assert all(a.split("=")[-1].startswith(f"{caller}/rel_") for a in rel), argv
        shown = "\n".join(argv)
        for name in [*PATH_VARS[script], "resume", "list"]:  # every one reached the script, absolute
            assert f"{caller}/rel_{name}" in shown, (name, argv)
        assert argv[-2:] == ["--lr", "0.1"]  # other arguments passed on unchanged
