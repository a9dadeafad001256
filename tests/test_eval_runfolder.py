"""eval_linear.py / eval_voc_classif.py on the run engine: --resume DIR continues in DIR with the
run's flags, the lock refuses a second run into a live folder, --overwrite leaves nothing of the
old run, results.json names what was evaluated."""
from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path

import pytest
import torch

import eval_linear
import models
import runfolder
from conftest import make_split_folder


@pytest.fixture(scope="module")
def linear_data(module_tmp) -> Path:
    return make_split_folder(module_tmp.mktemp("linear") / "data", size=40)


@pytest.fixture(scope="module")
def alexnet64(module_tmp) -> Path:
    from test_eval_common import save_our_format
    torch.manual_seed(0)
    return save_our_format(models.alexnet(sobel=True, out=0, input_size=64), module_tmp.mktemp("m") / "a.pth.tar")


def linear_argv(data: Path, model: Path, exp: Path, *extra: str) -> list[str]:
    return ["--data", str(data), "--model", str(model), "--exp", str(exp), "--conv", "5", "--size", "64",
            "--workers", "0", "--batch_size", "4", "--epochs", "1", "--no_progress", "--device", "cpu", *extra]


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_resume_dir_continues_in_dir_with_its_flags(linear_data, alexnet64, tmp_path, monkeypatch, capsys):
    """``--resume DIR`` alone: DIR's flags (--data, --model, --conv...), written in DIR (not
    ./exp_linear), a stale lock taken over; Ctrl-C then names DIR; results.json's fields."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    run_dir = tmp_path / "run"
    assert eval_linear.run(linear_argv(linear_data, alexnet64, run_dir, "--lr", "0.02")) == 0
    res = json.loads((run_dir / "results.json").read_text())
    assert res["model"] == {"path": os.path.abspath(alexnet64), "size": alexnet64.stat().st_size,
                            "sha256": hashlib.sha256(alexnet64.read_bytes()).hexdigest()}
    assert (res["layer"], res["conv"], res["protocol"], res["lr"], res["epochs"]) == ("conv5", 5, "deepcluster", 0.02, 1)
    # a lock file left by a killed run (its holder gone: the kernel released the flock)
    (run_dir / runfolder.LOCK).write_text(json.dumps({"host": "gone", "pid": 999999}))
    capsys.readouterr()
    assert eval_linear.run(["--resume", str(run_dir), "--epochs", "2"]) == 0
    out = capsys.readouterr().out
    assert "taking over the lock" in out and f"--resume: flags of the run in {run_dir}, except --epochs 2" in out
    res = json.loads((run_dir / "results.json").read_text())
    assert [r["epoch"] for r in res["history"]] == [0, 1] and (res["lr"], res["epochs"]) == (0.02, 2)
    hist = runfolder.read_history(run_dir)
    assert [h["method"] for h in hist] == ["eval_linear"] * 2 and hist[1]["start_epoch"] == 1
    assert hist[0]["run_id"] == hist[1]["run_id"]
    assert list(cwd.iterdir()) == []  # nothing in ./exp_linear

    monkeypatch.setattr(eval_linear, "train_epoch", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    assert eval_linear.run(["--resume", str(run_dir), "--epochs", "3"]) == 130
    err = capsys.readouterr().err
    assert f"interrupted; --resume {run_dir} continues from {run_dir / 'checkpoint.pth.tar'}" in err
    assert list(cwd.iterdir()) == []
    # a folder of the other evaluation names its script
    assert eval_linear.run(["--resume", str(tmp_path / "voc")]) == 2
    assert "--data and --model are required: --resume" in error_line(capsys)
    (tmp_path / "voc").mkdir()
    runfolder.record_invocation(tmp_path / "voc", {}, "x", "eval_voc", 0)
    assert eval_linear.run(["--resume", str(tmp_path / "voc")]) == 2
    assert "holds a eval_voc run: continue it with eval_voc_classif.py" in capsys.readouterr().err


def test_second_run_into_a_live_folder_is_refused_first_unharmed(linear_data, alexnet64, tmp_path, monkeypatch,
                                                                 capsys):
    """While a run trains in EXP, the same command, --overwrite and --resume EXP into EXP are
    refused before any work (one line naming the holder); the run then ends as if alone. (The
    second runs start from inside the first's epoch: flock locks conflict between two opens of
    the file, in one process as in two.)"""
    exp = tmp_path / "exp"
    real, refused = eval_linear.train_epoch, []

    def with_second_runs(*a, **k):
        if not refused:
            for extra in ([], ["--overwrite"], ["--resume", str(exp)]):
                rc = eval_linear.run(linear_argv(linear_data, alexnet64, exp, *extra))
                refused.append((rc, error_line(capsys)))
        return real(*a, **k)
    monkeypatch.setattr(eval_linear, "train_epoch", with_second_runs)
    assert eval_linear.run(linear_argv(linear_data, alexnet64, exp, "--epochs", "2")) == 0
    assert len(refused) == 3
    for rc, line in refused:
        assert rc == 2 and f"is in use by the run of PID {os.getpid()} on {socket.gethostname()}" in line, line
    res = json.loads((exp / "results.json").read_text())
    assert [r["epoch"] for r in res["history"]] == [0, 1]
    assert torch.load(exp / "checkpoint.pth.tar", weights_only=True)["epoch"] == 2
    assert len(runfolder.read_history(exp)) == 1  # the refused runs recorded nothing
    assert "epoch   1 |" in (exp / "train.log").read_text()  # its log still open
    assert (exp / ".lock").read_text() == ""  # released at the end


def test_overwrite_leaves_nothing_of_the_old_run(linear_data, alexnet64, tmp_path, capsys):
    exp = tmp_path / "exp"
    assert eval_linear.run(linear_argv(linear_data, alexnet64, exp)) == 0
    old = runfolder.read_history(exp)[0]["run_id"]
    (exp / "notes.txt").write_text("mine")  # not an output of the run: kept
    (exp / "checkpoints" / "checkpoint_1.pth.tar").write_bytes(b"old")
    assert {"checkpoint.pth.tar", "model_best.pth.tar", "results.json", "log.jsonl", "train.log"} <= \
        {p.name for p in exp.iterdir()}
    assert eval_linear.run(linear_argv(linear_data, alexnet64, exp, "--overwrite", "--epochs", "0")) == 0
    left = {str(p.relative_to(exp)) for p in exp.rglob("*")}
    assert left == {".lock", "notes.txt", "checkpoints", "args.json", runfolder.HISTORY, "log.jsonl", "train.log",
                    "results.json"}, left
    assert [h["run_id"] != old for h in runfolder.read_history(exp)] == [True]
    assert json.loads((exp / "results.json").read_text())["history"] == []
    log = (exp / "train.log").read_text()
    assert (exp / "log.jsonl").read_text() == "" and "epoch   0 |" not in log and "--overwrite: deleting" in log
