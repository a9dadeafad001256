"""The run engine for both trainers: the folder lock (a second run refused, the first unharmed, a
stale lock taken over), --overwrite leaving nothing of the old run, SIGTERM at a step -> exit 75
-> --resume equal to the uninterrupted run (DeepCluster-v2; v1's: test_survival.py), and the
flags that mean other things in the two scripts."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import checkpoint
import fileio
import main
import main_deepclusterv2 as m2
import preempt
import runfolder
from conftest import ROOT, make_image_folder
from test_deepclusterv2 import dcv2_argv

# a run that waits at its 2nd training step until the file $HOLD_FILE is gone, after saying so in $HOLD_FILE.ready
ENTRY = '''
import os, sys, time
sys.path.insert(0, {root!r})
import fileio
script = sys.argv.pop(1)
def hook(point, n):
    if point in ("train", "dcv2_train") and n == 2:
        open(os.environ["HOLD_FILE"] + ".ready", "w").close()
        while os.path.exists(os.environ["HOLD_FILE"]):
            time.sleep(0.05)
fileio.FAULT_HOOK = hook
mod = __import__(script)
sys.exit(mod.run())
'''


@pytest.fixture(scope="module")
def images(module_tmp) -> Path:
    return make_image_folder(module_tmp.mktemp("imgs") / "images", n_classes=2, per_class=8, size=40)


def v1_argv(images: Path, exp: Path, *extra: str) -> list[str]:
    return [str(images), "--exp", str(exp), "--size", "64", "--k", "2", "--pca", "8", "--batch", "4",
            "--workers", "0", "--epochs", "2", "--checkpoints", "3", "--no_progress", "--device", "cpu", *extra]


ARGV = {"main": v1_argv, "main_deepclusterv2": lambda images, exp, *extra: dcv2_argv(images, exp, "--no_progress",
                                                                                     *extra)}
RUN = {"main": main.run, "main_deepclusterv2": m2.run}


def held_run(tmp_path: Path, script: str, argv: list[str]) -> tuple[subprocess.Popen, Path]:
    """``script`` in a subprocess, waiting inside its 2nd training step until the hold file is removed."""
    entry, hold = tmp_path / "entry.py", tmp_path / "hold"
    entry.write_text(ENTRY.format(root=str(ROOT)))
    hold.touch()
    proc = subprocess.Popen([sys.executable, str(entry), script, *argv], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, HOLD_FILE=str(hold), OMP_NUM_THREADS="1"))
    deadline = time.monotonic() + 120
    while not Path(str(hold) + ".ready").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    return proc, hold


def listing(exp: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(exp)): (p.stat().st_ino, p.stat().st_mtime_ns) for p in exp.rglob("*") if p.is_file()}


@pytest.mark.slow
@pytest.mark.parametrize("script", ["main", "main_deepclusterv2"])
def test_second_run_into_a_live_folder_is_refused_and_the_first_is_unharmed(script, images, tmp_path, capsys):
    exp = tmp_path / "exp"
    proc, hold = held_run(tmp_path, script, ARGV[script](images, exp))
    before = listing(exp)
    for extra in ([], ["--resume", str(exp)], ["--overwrite"]):  # none of them may touch the live run
        assert RUN[script](ARGV[script](images, exp, *extra)) == 2
        err = capsys.readouterr().err
        assert err.count("error:") == 1 and f"in use by the run of PID {proc.pid} on {socket.gethostname()}" in err
    assert listing(exp) == before  # not a file touched: the live run's temporary files included
    hold.unlink()
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert [r["epoch"] for r in fileio.read_jsonl(exp / "log.jsonl")] == [0, 1]
    assert "error" not in (exp / "train.log").read_text()
    # the lock is free again: a resume of the finished run says so and exits 0
    assert RUN[script](ARGV[script](images, exp, "--resume", str(exp))) == 0


def test_stale_lock_of_a_killed_run_is_taken_over(tmp_path, caplog):
    exp = tmp_path / "exp"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]); "
                               "import runfolder; runfolder.FolderLock(sys.argv[2]).acquire(); print('held', "
                               "flush=True); time.sleep(60)", str(ROOT), str(exp)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(runfolder.RunFolderError, match=f"in use by the run of PID {holder.pid} on "):
        runfolder.FolderLock(exp).acquire()
    holder.kill()
    holder.wait()
    lock = runfolder.FolderLock(exp)
    with caplog.at_level("INFO", logger="deepcluster"):
        lock.acquire()  # the kernel released the dead holder's flock: taken over, said in the log
    assert f"PID {holder.pid}" in caplog.text and "is gone" in caplog.text
    assert lock.holder()["pid"] == os.getpid()
    lock.release()
    runfolder.FolderLock(exp).acquire()  # released: free again


@pytest.mark.slow
@pytest.mark.parametrize("script", ["main", "main_deepclusterv2"])
def test_overwrite_leaves_nothing_of_the_old_run(script, images, tmp_path):
    exp = tmp_path / "exp"
    assert RUN[script](ARGV[script](images, exp, "--keep_epoch_checkpoints")) == 0
    for extra in ("export/epoch_0.csv", "report/x.png", "bad_images.txt", "checkpoints/.tmp-123"):
        (exp / extra).parent.mkdir(exist_ok=True)
        (exp / extra).write_text("old")
    (exp / "notes.txt").write_text("mine")  # not an output of a run: left alone
    old = listing(exp)
    t0 = time.time_ns()
    assert RUN[script](ARGV[script](images, exp, "--overwrite", "--epochs", "1")) == 0
    kept = [p for p, (ino, mtime) in listing(exp).items() if p in old and old[p] == (ino, mtime)]
    assert kept == ["notes.txt"] or sorted(kept) == [".lock", "notes.txt"], kept
    assert all(mtime >= t0 for p, (_, mtime) in listing(exp).items() if p not in (".lock", "notes.txt"))
    assert [r["epoch"] for r in fileio.read_jsonl(exp / "log.jsonl") if r["epoch"] >= 0] == [0]
    assert len(runfolder.read_history(exp)) == 1


@pytest.mark.slow
@pytest.mark.parametrize("hit", [1, 3])  # in step 0 of epoch 0 / of epoch 1 (2 steps an epoch): stops before step 1
def test_dcv2_sigterm_at_a_step_stops_with_a_checkpoint_and_resumes_equal(hit, images, tmp_path, monkeypatch,
                                                                          capsys):
    ref, exp = tmp_path / "ref", tmp_path / "exp"
    assert m2.run(ARGV["main_deepclusterv2"](images, ref)) == 0

    def hook(point, n):
        if (point, n) == ("dcv2_train", hit):
            os.kill(os.getpid(), signal.SIGTERM)
    monkeypatch.setattr(fileio, "FAULT_HOOK", hook)
    fileio.FAULT_HITS.clear()
    assert m2.run(ARGV["main_deepclusterv2"](images, exp)) == preempt.EXIT_PREEMPTED
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "stopped by SIGTERM at step 1" in err and f"--resume {exp}" in err
    stopped = checkpoint.torch_load(exp / "checkpoints" / "checkpoint_stopped.pth.tar")
    assert (stopped["epoch"], stopped["iteration"]) == (hit // 2, 1) and "mid_epoch" in stopped
    monkeypatch.setattr(fileio, "FAULT_HOOK", None)
    assert m2.run(ARGV["main_deepclusterv2"](images, exp, "--resume", str(exp))) == 0
    a, b = (checkpoint.torch_load(e / "checkpoint.pth.tar") for e in (ref, exp))
    assert all(torch.equal(v, b["state_dict"][k]) for k, v in a["state_dict"].items())
    assert torch.equal(a["bank"], b["bank"]) and torch.equal(a["bank_index"], b["bank_index"])
    keys = ("epoch", "train_loss", "nmi_labels_heads", "n_empty_heads", "lr", "iterations")
    ra, rb = ([{k: r.get(k) for k in keys} for r in fileio.read_jsonl(e / "log.jsonl")] for e in (ref, exp))
    assert ra == rb


@pytest.mark.parametrize("script,argv,expected", [
    ("main", ["--wd", "1e-6"], "--wd: invalid value 1e-06: is an exponent (weight decay = 10**wd) and must be < 0: "
                               "--wd -5 is a decay of 1e-5; 1e-06 is a decay itself, as main_deepclusterv2.py's --wd "
                               "takes: here --wd -6"),
    ("main_deepclusterv2", ["--wd", "-5"], "--wd -5.0: is the weight decay itself (swav's; 1e-6 by default) and must "
                                           "be >= 0; -5 looks like main.py's exponent: here --wd 1e-05"),
])
def test_a_flag_of_the_other_script_is_named(script, argv, expected, images, tmp_path, capsys):
    try:
        code = RUN[script](ARGV[script](images, tmp_path / "e", *argv))
    except SystemExit as e:  # argparse's usage error (main.py)
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and expected in err and not (tmp_path / "e").exists()


@pytest.mark.slow
def test_a_folder_of_the_other_method_names_its_script(images, tmp_path, capsys):
    v1, v2 = tmp_path / "v1", tmp_path / "v2"
    assert main.run(v1_argv(images, v1, "--epochs", "1")) == 0
    assert m2.run(dcv2_argv(images, v2, "--epochs", "1", "--warmup_epochs", "0", "--no_progress")) == 0
    capsys.readouterr()
    assert m2.run([str(images), "--resume", str(v1)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{v1} holds a deepcluster run: continue it with main.py" in err
    assert main.run([str(images), "--resume", str(v2)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{v2} holds a deepclusterv2 run: continue it with main_deepclusterv2.py" in err


V2_SIGTERM_ENTRY = '''
import os, signal, sys
sys.path.insert(0, {root!r})
import fileio, main_deepclusterv2
def hook(point, n):  # rank 1, first attempt: SIGTERM to the launcher, which forwards it to every worker
    if point == "dcv2_train" and n == int(os.environ["AT_HIT"]) and os.environ.get("RANK") == "1":
        os.kill(os.getppid(), signal.SIGTERM)
fileio.FAULT_HOOK = hook
sys.exit(main_deepclusterv2.run())
'''


@pytest.mark.slow
def test_dcv2_two_processes_sigterm_to_the_launcher_then_resume_equal(images, tmp_path):
    from test_survival import torchrun

    entry = tmp_path / "entry.py"
    entry.write_text(V2_SIGTERM_ENTRY.format(root=str(ROOT)))
    ref, exp = tmp_path / "ref", tmp_path / "exp"
    argv = lambda e, *x: dcv2_argv(images, e, "--batch_size", "4", "--no_progress", *x)  # noqa: E731
    script = ROOT / "main_deepclusterv2.py"
    res, _ = torchrun(argv(ref), entry=script, launch=True)
    assert res.returncode == 0, res.stderr[-3000:]
    res, _ = torchrun(argv(exp), entry=entry, launch=True, AT_HIT="3")  # epoch 1, step 0, after its clustering
    assert res.returncode == preempt.EXIT_PREEMPTED, res.stderr[-3000:]
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "stopped by SIGTERM" in lines[0] and f"--resume {exp}" in lines[0], res.stderr
    stopped = checkpoint.torch_load(exp / "checkpoints" / "checkpoint_stopped.pth.tar")
    assert stopped["epoch"] == 1 and stopped["world_size"] == 2
    res, _ = torchrun(argv(exp, "--resume", str(exp)), entry=script, launch=True)
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = (checkpoint.torch_load(e / "checkpoint.pth.tar") for e in (ref, exp))
    assert all(torch.equal(v, b["state_dict"][k]) for k, v in a["state_dict"].items())
    assert torch.equal(a["bank"], b["bank"])
    la, lb = (fileio.read_jsonl(e / "log.jsonl") for e in (ref, exp))
    assert [r["train_loss"] for r in la] == [r["train_loss"] for r in lb]
    assert [r["nmi_labels_heads"] for r in la] == [r["nmi_labels_heads"] for r in lb]
