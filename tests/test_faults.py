"""Fault injection: SIGKILL at any stage, mid-epoch resume, numerical and disk faults.

The kill test runs main.py in a subprocess with DEEPCLUSTER_FAULT="point:n", which makes
the process SIGKILL itself the n-th time it reaches ``point`` (fileio.fault_point), here
between writing a checkpoint's temporary file and renaming it. Resuming from the experiment
folder must then finish the run with the same model and cluster history, bit for bit (CPU,
fixed seed, no workers). Every fault point at every hit count is swept by test_resume.py.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import checkpoint
import clustering
import main
from conftest import digits_subset
import fileio

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 3


@pytest.fixture(scope="module")
def digits80(module_tmp, digits_dir) -> str:
    return digits_subset(digits_dir, module_tmp.mktemp("d80") / "digits", 8)


def argv(data: str, exp: Path, *extra: str) -> list[str]:
    # 80 images, batch 16: 5 iterations an epoch; a periodic copy every 3 iterations
    return [data, "--exp", str(exp), "--size", "64", "--k", "8", "--pca", "32", "--batch", "16",
            "--workers", "0", "--epochs", str(EPOCHS), "--sobel", "--no_progress", "--checkpoints", "3",
            "--keep_checkpoints", "0", "--device", "cpu", *extra]  # every periodic copy kept: the tests compare them


def run_main(args: list[str], fault: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("DEEPCLUSTER_FAULT", None)
    if fault:
        env["DEEPCLUSTER_FAULT"] = fault
    return subprocess.run([sys.executable, "main.py", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def reference(digits80, module_tmp) -> Path:
    exp = module_tmp.mktemp("ref") / "exp"
    res = run_main(argv(digits80, exp))
    assert res.returncode == 0, res.stderr[-3000:]
    return exp


def assert_same_run(a: Path, b: Path) -> None:
    sa = torch.load(a / "checkpoint.pth.tar", weights_only=True)
    sb = torch.load(b / "checkpoint.pth.tar", weights_only=True)
    assert sa["epoch"] == sb["epoch"] == EPOCHS
    for k in sa["state_dict"]:
        assert torch.equal(sa["state_dict"][k], sb["state_dict"][k]), k
    ca, cb = checkpoint.ClusterLog(a / "clusters"), checkpoint.ClusterLog(b / "clusters")
    assert ca.epochs() == cb.epochs() == list(range(EPOCHS))
    for e in ca.epochs():
        np.testing.assert_array_equal(ca.load(e), cb.load(e))
    la, lb = fileio.read_jsonl(a / "log.jsonl"), fileio.read_jsonl(b / "log.jsonl")
    assert [r["epoch"] for r in lb] == list(range(EPOCHS))
    for ra, rb in zip(la, lb):
        assert ra["clustering_loss"] == rb["clustering_loss"]
        assert ra["nmi_prev"] == rb["nmi_prev"]
        assert rb["train_loss"] == pytest.approx(ra["train_loss"], rel=1e-6)


def assert_nothing_corrupt(exp: Path) -> None:
    for p in [exp / "checkpoint.pth.tar", *(exp / "checkpoints").glob("*.pth.tar")]:
        torch.load(p, weights_only=True)
    assert not list(exp.rglob(".tmp-*"))


@pytest.mark.slow
def test_sigkill_with_a_temporary_file_left_then_resume_equals_uninterrupted(reference, digits80, tmp_path):
    """A real SIGKILL of the real AlexNet while a checkpoint's temporary file is written
    (every other point and hit count is swept in-process by test_resume.py)."""
    exp = tmp_path / "exp"
    res = run_main(argv(digits80, exp), fault="save:4")
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    assert list(exp.rglob(".tmp-*"))
    res = run_main(argv(digits80, exp, "--resume", str(exp)))
    assert res.returncode == 0, res.stderr[-3000:]
    assert_nothing_corrupt(exp)
    assert_same_run(reference, exp)


def test_resume_folder_skips_corrupt_newest(reference, tmp_path, caplog):
    exp = tmp_path / "exp"
    shutil.copytree(reference, exp)
    (exp / "checkpoint.pth.tar").write_bytes(b"truncated")
    numbered = [p for p in (exp / "checkpoints").glob("*.pth.tar") if p.name.split("_")[1].split(".")[0].isdigit()]
    newest_periodic = max(numbered, key=lambda p: int(p.name.split("_")[1].split(".")[0]))
    assert checkpoint.find_checkpoint(str(exp)) == str(newest_periodic)
    assert "corrupt" in caplog.text
    for p in (exp / "checkpoints").glob("*.pth.tar"):
        p.write_bytes(b"")
    with pytest.raises(checkpoint.CheckpointError, match="no valid checkpoint"):
        checkpoint.find_checkpoint(str(exp))


def test_nan_loss_stops_and_keeps_last_checkpoint(digits80, tmp_path, monkeypatch, capsys):
    exp = tmp_path / "exp"
    args = argv(digits80, exp, "--checkpoints", "1000")
    args[args.index("--epochs") + 1] = "1"
    assert main.run(args) == 0
    before = (exp / "checkpoint.pth.tar").read_bytes()

    class NanLoss(torch.nn.CrossEntropyLoss):
        def forward(self, x, t):
            return super().forward(x, t) * float("nan")
    monkeypatch.setattr(main.nn, "CrossEntropyLoss", NanLoss)
    args[args.index("--epochs") + 1] = "2"
    assert main.run(args + ["--resume", str(exp)]) == 2
    err = capsys.readouterr().err
    assert "loss is nan" in err and "diverged" in err
    assert (exp / "checkpoint.pth.tar").read_bytes() == before


def test_degenerate_features_give_clear_errors():
    same = np.ones((50, 64), dtype=np.float32)
    with pytest.raises(clustering.ClusteringError, match="distinct"):
        clustering.Kmeans(5).cluster(same)
    few = np.repeat(np.random.RandomState(0).randn(3, 64).astype(np.float32), 20, axis=0)
    with pytest.raises(clustering.ClusteringError, match="only 3 distinct"):
        clustering.Kmeans(5).cluster(few)
    assert clustering.Kmeans(3).cluster(few + 1e-3 * np.random.RandomState(1).randn(60, 64).astype(np.float32)) >= 0
    bad = np.random.RandomState(0).randn(50, 64).astype(np.float32)
    bad[3, 7] = np.nan
    with pytest.raises(clustering.ClusteringError, match="NaN"):
        clustering.Kmeans(5).cluster(bad)


def test_read_only_experiment_folder_is_refused_up_front(digits80, tmp_path, monkeypatch, capsys):
    real_write = Path.write_bytes

    def refuse(self, data):
        if self.name.startswith(".write_test"):
            raise OSError(30, "Read-only file system")
        return real_write(self, data)
    monkeypatch.setattr(Path, "write_bytes", refuse)
    assert main.run(argv(digits80, tmp_path / "exp")) == 2
    err = capsys.readouterr().err
    assert "not writable" in err and "Read-only file system" in err


def test_disk_full_at_save_is_reported_and_previous_survives(digits80, tmp_path, monkeypatch, capsys):
    exp = tmp_path / "exp"
    args = argv(digits80, exp, "--checkpoints", "1000")
    args[args.index("--epochs") + 1] = "1"
    assert main.run(args) == 0
    before = (exp / "checkpoint.pth.tar").read_bytes()
    real_replace = os.replace

    def full_disk(src, dst):
        if str(dst).endswith(".pth.tar"):
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)
    monkeypatch.setattr(os, "replace", full_disk)
    args[args.index("--epochs") + 1] = "2"
    assert main.run(args + ["--resume", str(exp)]) == 2
    err = capsys.readouterr().err
    # the first save of epoch 1 fails: the copy right after its clustering
    assert "No space left on device" in err and "checkpoint_latest.pth.tar" in err and "intact" in err
    assert (exp / "checkpoint.pth.tar").read_bytes() == before
    assert not list(exp.rglob(".tmp-*"))
