"""A torchrun job that survives its machines (CPU, gloo, 2 processes): a worker killed at each
stage and restarted by ``torchrun --max-restarts 1``, an image that goes bad on one rank only,
and SIGTERM to the launcher. Each ends bitwise equal to the uninterrupted 2-process run.

The faults are placed, not timed: ``DEEPCLUSTER_FAULT=point:n@rank`` (fileio.fault_point) kills
rank ``rank`` at its n-th hit of ``point``; the other two scenarios run main.py through a small
entry file that installs a fileio.FAULT_HOOK on rank 1 (truncate the next image it reads, or
SIGTERM the launcher) and then calls main.run().
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import checkpoint
import fileio
import preempt
import runfolder
from conftest import digits_subset

ROOT = Path(__file__).resolve().parents[1]
RECORD_KEYS = ("epoch", "clustering_loss", "train_loss", "nmi_prev", "nmi_labels", "n_clusters", "iterations")
HANG = 240  # seconds: far below --dist_timeout (60 minutes), far above a run (20 s)

ENTRY = '''
import os, resource, signal, subprocess, sys, time
sys.path.insert(0, {root!r})
import data, deepcluster, fileio, main
mode, _, hit = os.environ.get("SURVIVAL_HOOK", ":").partition(":")
rank, first = os.environ.get("RANK", "0"), os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
if os.environ.get("SURVIVAL_SMALL"):  # test_resume.py's small network instead of AlexNet
    sys.path.insert(0, os.path.join({root!r}, "tests"))
    from test_resume import small_model
    deepcluster.build_model = small_model
if mode in ("badimage", "sigterm") and rank == "1" and first:
    real = data.load_rgb
    armed = []
    def load_rgb(path, *a, **kw):  # the first image rank 1 reads once armed goes bad under its feet
        if armed == [True]:
            armed.append(path)
            with open(os.environ["SURVIVAL_OUT"], "w") as f:
                f.write(path)
            with open(path, "rb") as f:
                keep = f.read()
            with open(os.environ["SURVIVAL_OUT"] + ".bytes", "wb") as f:
                f.write(keep)
            with open(path, "wb") as f:
                f.write(keep[:200])  # truncated
        return real(path, *a, **kw)
    def hook(point, n):
        if point == "train" and n == int(hit):
            if mode == "badimage":
                armed.append(True)
            elif mode == "sigterm":
                os.kill(os.getppid(), signal.SIGTERM)  # the launcher: it forwards SIGTERM to every worker
    data.load_rgb, fileio.FAULT_HOOK = load_rgb, hook
elif mode and rank == "0" and first:
    def hook(point, n):
        if point != "train" or n != int(hit):
            return
        test = int(os.environ["SURVIVAL_TEST_PGID"])
        if mode == "pgterm":  # SIGTERM to every process group of the run, loader workers included, as SLURM
            # does, sent by another process (a loader worker obeys its parent's SIGTERM only)
            groups = {{os.getpgrp()}} | ({{os.getpgid(os.getppid())}} if "LOCAL_RANK" in os.environ else set())
            assert all(g > 1 and g != test for g in groups), groups
            subprocess.run([sys.executable, "-c", "import os, sys; [os.killpg(int(g), 15) for g in sys.argv[1:]]",
                            *map(str, groups)], check=True, start_new_session=True)
            time.sleep(1)  # the signal reaches every process before this step goes on (a loader worker killed
            # by it is seen by PyTorch's SIGCHLD handler here, whether or not its batches were all loaded)
        elif mode == "killlauncher":
            assert os.getppid() > 1 and os.getpgid(os.getppid()) != test
            with open(os.environ["SURVIVAL_OUT"], "w") as f:
                f.write(repr(time.time()))
            os.kill(os.getppid(), signal.SIGKILL)
        elif mode == "fsize":  # files above 1 MiB cannot grow (EFBIG, the path of ENOSPC): the next checkpoint fails
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    fileio.FAULT_HOOK = hook
sys.exit(main.run())
'''


@pytest.fixture(scope="module")
def digits50(module_tmp, digits_dir) -> str:
    return digits_subset(digits_dir, module_tmp.mktemp("d50") / "digits", 5)


def argv(data: str, exp: Path, *extra: str) -> list[str]:
    # 50 images, global batch 10 (5 per rank): 5 steps an epoch; periodic copies every 3 steps
    return [data, "--exp", str(exp), "--size", "64", "--k", "5", "--pca", "16", "--batch", "10",
            "--workers", "0", "--epochs", "2", "--sobel", "--no_progress", "--checkpoints", "3", *extra]


def torchrun(args: list[str], restarts: int = 0, entry: Path | None = None, launch: bool = False,
             monitor: float = 0.1, **env: str) -> tuple[subprocess.CompletedProcess, float]:
    """main.py (or ``entry``) under 2 gloo processes, by torchrun (or by launch.py, the launchers'
    wrapper of it); (result, seconds)."""
    # c10d rendezvous (--standalone: a free port, a fresh run id): a restart meets in a new round,
    # with fresh store keys (under the static rendezvous a restarted gloo group can read the dead
    # attempt's addresses: "connectFullMesh failed ... Connection refused")
    runner = ["launch.py"] if launch else ["-m", "torch.distributed.run"]
    cmd = [sys.executable, *runner, "--standalone", "--nproc_per_node=2",
           f"--max-restarts={restarts}", f"--monitor-interval={monitor}", str(entry or "main.py"), *args]
    full_env = dict(os.environ, OMP_NUM_THREADS="1", SURVIVAL_TEST_PGID=str(os.getpgrp()), **env)
    if "DEEPCLUSTER_FAULT" not in env:
        full_env.pop("DEEPCLUSTER_FAULT", None)
    t = time.monotonic()
    # its own session: the signals of the tests go to the run's process groups, never to pytest's
    res = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=HANG,
                         start_new_session=True)
    return res, time.monotonic() - t


def outcome(exp: Path) -> tuple[dict, list[dict], list[np.ndarray]]:
    ck = torch.load(exp / "checkpoint.pth.tar", weights_only=True)
    recs = [{k: r[k] for k in RECORD_KEYS} for r in fileio.read_jsonl(exp / "log.jsonl")]
    clog = checkpoint.ClusterLog(exp / "clusters")
    return ck, recs, [clog.load(e) for e in clog.epochs()]


def assert_same_run(ref: Path, exp: Path) -> None:
    ref_ck, ref_recs, ref_clusters = outcome(ref)
    ck, recs, clusters = outcome(exp)
    assert ck["epoch"] == ref_ck["epoch"] == 2
    for k, v in ref_ck["state_dict"].items():
        assert torch.equal(v, ck["state_dict"][k]), k
    assert recs == ref_recs
    assert len(clusters) == len(ref_clusters) == 2
    for a, b in zip(ref_clusters, clusters):
        np.testing.assert_array_equal(a, b)
    assert not list(exp.rglob(".tmp-*"))


def out(res: subprocess.CompletedProcess) -> str:
    return res.stdout[-3000:] + res.stderr[-4000:]


@pytest.fixture(scope="module")
def reference(digits50, module_tmp) -> Path:
    exp = module_tmp.mktemp("ref") / "exp"
    res, _ = torchrun(argv(digits50, exp))
    assert res.returncode == 0, out(res)
    return exp


@pytest.fixture(scope="module")
def entry(module_tmp) -> Path:
    path = module_tmp.mktemp("entry") / "entry.py"
    path.write_text(ENTRY.format(root=str(ROOT)))
    return path


# One job, killed by SIGKILL at a different point in each launch attempt (the hits count from
# the start of each attempt's process): the restarts must still end equal to the reference.
KILLS = (
    "features:2@1",    # attempt 0, epoch 0's feature pass, before any checkpoint: the restart starts afresh
    "clustering:2@0",  # attempt 1 (from scratch): epoch 1's k-means on rank 0
    "train:3@1",       # attempt 2 (resumed at epoch 1): step 2 on rank 1, after the post-clustering copy
    "save:1@0",        # attempt 3: its first checkpoint write on rank 0, temporary file written, not renamed
)


@pytest.mark.slow
def test_killed_worker_restarts_and_ends_equal(reference, digits50, tmp_path):
    exp = tmp_path / "exp"
    res, _ = torchrun(argv(digits50, exp), restarts=len(KILLS), launch=True, DEEPCLUSTER_FAULT=";".join(KILLS))
    assert res.returncode == 0, out(res)
    # a run that the restarts complete prints no error (the ranks torchrun stopped stay quiet): one
    # line per restart, naming the rank killed and its signal
    assert "error:" not in res.stderr, out(res)
    notes = [ln for ln in res.stderr.splitlines() if ln.startswith("launch.py: ")]
    assert len(notes) == len(KILLS) and all("killed by SIGKILL" in n for n in notes), out(res)
    assert [n.split(":")[1].strip() for n in notes] == [f"rank {k[-1]}" for k in KILLS], notes
    launches = [h.get("launch") for h in runfolder.read_history(exp)]
    # every kill fired (one recorded invocation per attempt), and each attempt continued the same launch
    assert len(launches) == len(KILLS) + 1 and len(set(launches)) == 1 and launches[0] is not None, launches
    assert_same_run(reference, exp)
    # a fresh command (not a restart) still refuses the folder that now holds a run
    res, _ = torchrun(argv(digits50, exp))
    assert res.returncode != 0 and res.stderr.count("error:") == 1 and "already holds a run" in res.stderr


@pytest.mark.slow
def test_image_gone_bad_on_one_rank_stops_both_then_resumes_equal(reference, digits50, entry, tmp_path):
    images = tmp_path / "digits"
    shutil.copytree(digits50, images)
    exp, spy = tmp_path / "exp", tmp_path / "bad"
    # armed at rank 1's step 1 of epoch 1 (train hit 7): its next batch (step 2) holds the bad image
    res, took = torchrun(argv(str(images), exp), entry=entry, SURVIVAL_HOOK="badimage:7", SURVIVAL_OUT=str(spy))
    bad = spy.read_text()
    assert res.returncode != 0 and took < HANG
    err = res.stderr
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith("error: rank 1: cannot read image file") and bad in lines[0]
    # no worker traceback (torchrun's own ChildFailedError report remains), no collective error
    assert f"--resume {exp}" in lines[0] and "Connection closed" not in err and "main.py" not in err.split("Traceback")[0]
    stopped = torch.load(exp / "checkpoints" / "checkpoint_stopped.pth.tar", weights_only=True)
    assert (stopped["epoch"], stopped["iteration"]) == (1, 2)
    Path(bad).write_bytes((tmp_path / "bad.bytes").read_bytes())  # fixed: the run continues exactly
    res, _ = torchrun(argv(str(images), exp, "--resume", str(exp)))
    assert res.returncode == 0, out(res)
    assert_same_run(reference, exp)


@pytest.mark.slow
def test_image_gone_bad_on_one_rank_is_skipped(digits50, entry, tmp_path):
    images = tmp_path / "digits"
    shutil.copytree(digits50, images)
    exp, spy = tmp_path / "exp", tmp_path / "bad"
    res, _ = torchrun(argv(str(images), exp, "--bad_images", "skip"), entry=entry,
                      SURVIVAL_HOOK="badimage:2", SURVIVAL_OUT=str(spy))
    assert res.returncode == 0, out(res)
    bad = spy.read_text()
    listing = (exp / "bad_images.txt").read_text().splitlines()
    assert [ln.split("\t")[0] for ln in listing] == [bad]  # listed once (rank 1 in training, then epoch 1)
    paths = sorted(str(p) for p in images.rglob("*.png")) or sorted(str(p) for p in images.rglob("*.*"))
    labels1 = checkpoint.ClusterLog(exp / "clusters").load(1)
    assert (labels1 == -1).sum() == 1  # left out of epoch 1's clustering, whichever rank extracted it
    assert [r["epoch"] for r in fileio.read_jsonl(exp / "log.jsonl")] == [0, 1] and paths


@pytest.mark.slow
def test_sigterm_to_every_process_group_stops_with_a_checkpoint_then_resumes_equal(reference, digits50, entry,
                                                                                   tmp_path):
    """SIGTERM to the launcher's and rank 0's process groups (loader workers included: SLURM
    signals every process; torchrun passes it on to each worker's group) in epoch 1's step 0:
    every rank stops before step 1 with checkpoint_stopped, exit 75; the resume ends equal."""
    exp = tmp_path / "exp"
    res, _ = torchrun(argv(digits50, exp, "--workers", "2"), entry=entry, launch=True, SURVIVAL_HOOK="pgterm:6")
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert res.returncode == preempt.EXIT_PREEMPTED and len(lines) == 1, out(res)
    stopped = exp / "checkpoints" / "checkpoint_stopped.pth.tar"
    assert lines[0].startswith("error: rank 0: stopped by SIGTERM at step 1") and lines[0].endswith(
        f"--resume {exp} continues from {stopped}"), out(res)
    assert "DataLoader" not in res.stderr and "Traceback" not in res.stderr, out(res)
    ck = torch.load(stopped, weights_only=True)
    assert (ck["epoch"], ck["iteration"]) == (1, 1)
    res, _ = torchrun(argv(digits50, exp, "--workers", "2", "--resume", str(exp)), launch=True)
    assert res.returncode == 0, out(res)
    assert_same_run(reference, exp)


@pytest.mark.slow
def test_killed_rank_is_reported_by_its_signal_not_as_a_stop(digits50, tmp_path):
    """Rank 1 SIGKILLed in training (the OOM killer): exit 128 + 9 and one line naming it, not
    rank 0's "stopped by SIGTERM" (torchrun's SIGTERM after the crash) with 75, which a
    requeue-on-75 script would requeue forever."""
    res, _ = torchrun(argv(digits50, tmp_path / "exp"), launch=True, DEEPCLUSTER_FAULT="train:2@1")
    lines = [ln for ln in res.stderr.splitlines() if "error:" in ln]
    assert res.returncode == 128 + signal.SIGKILL, out(res)
    assert len(lines) == 1 and lines[0].startswith("error: rank 1: killed by SIGKILL (pid "), out(res)


def _holders(tag: str) -> list[int]:
    """The pids of the processes whose environment holds ``tag``."""
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if tag.encode() in (d / "environ").read_bytes().split(b"\0"):
                    found.append(int(d.name))
            except OSError:
                pass
    return found


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the leftover workers in /proc (Linux only)")
def test_sigkill_of_the_launcher_leaves_no_worker(digits50, entry, tmp_path):
    """launch.py SIGKILLed in epoch 0's step 1: its workers (own sessions) and their loader
    workers are gone within seconds, after a stop like a preemption (checkpoint_stopped)."""
    exp, spy, tag = tmp_path / "exp", tmp_path / "killed_at", f"SURVIVAL_TAG={os.getpid()}-{time.time()}"
    try:
        res, _ = torchrun(argv(digits50, exp, "--workers", "2"), entry=entry, launch=True,
                          SURVIVAL_HOOK="killlauncher:2", SURVIVAL_OUT=str(spy), SURVIVAL_TAG=tag.split("=", 1)[1])
        # the run returns when every process holding its stderr (workers, loader workers) has closed it
        gone_after = time.time() - float(spy.read_text())
        left = _holders(tag)
    finally:
        for pid in _holders(tag):  # never leave a worker behind, whatever failed
            os.kill(pid, signal.SIGKILL)
    assert res.returncode == -signal.SIGKILL and not left, (left, out(res))
    assert gone_after < 20, gone_after  # a step, a checkpoint, the loader workers' 5 s watchdog
    lines = [ln for ln in res.stderr.splitlines() if "error:" in ln]
    assert len(lines) == 1 and "rank 0: stopped by SIGTERM (its launcher, pid " in lines[0], out(res)
    ck = torch.load(exp / "checkpoints" / "checkpoint_stopped.pth.tar", weights_only=True)
    assert (ck["epoch"], ck["iteration"]) == (0, 2) and not (exp / "checkpoint.pth.tar").exists()


@pytest.mark.slow
def test_full_disk_in_a_checkpoint_write_is_one_line_and_not_restarted(digits50, entry, tmp_path):
    """Rank 0's files cannot grow past 1 MiB from epoch 0's step 1 (EFBIG, through the same
    write path as ENOSPC): step 2's checkpoint_latest (--checkpoint_minutes: one before every
    step) fails. One line naming the file and the OS error, exit 2, no restart (one invocation
    in args_history), the previous checkpoint_latest intact, no temporary file."""
    exp = tmp_path / "exp"
    res, _ = torchrun(argv(digits50, exp, "--checkpoint_minutes", "1e-9"), restarts=1, entry=entry, launch=True,
                      SURVIVAL_HOOK="fsize:2")
    latest = exp / "checkpoints" / "checkpoint_latest.pth.tar"
    lines = [ln for ln in res.stderr.splitlines() if "error:" in ln]
    assert res.returncode == 2 and len(lines) == 1, out(res)
    assert lines[0].startswith(f"error: rank 0: cannot write checkpoint {str(latest)!r}: File too large; "
                               f"the previous checkpoint there is intact"), out(res)
    assert "Traceback" not in res.stderr and "inline_container" not in res.stderr, out(res)
    assert len(runfolder.read_history(exp)) == 1 and not list(exp.rglob(".tmp-*"))
    assert checkpoint.torch_load(latest)["iteration"] == 1


# ---------------------------------------------------------------------------------------
# one process, in this process: the same signal paths without torchrun
# ---------------------------------------------------------------------------------------
def test_fault_point_takes_a_rank(monkeypatch):
    monkeypatch.setenv("DEEPCLUSTER_FAULT", "features:2@1")
    monkeypatch.setenv("DEEPCLUSTER_FAULT_MODE", "raise")
    monkeypatch.setattr(fileio, "FAULT_HITS", {})
    for rank, restart, fires in (("0", "0", False), ("1", "1", False), ("1", "0", True)):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", restart)
        fileio.FAULT_HITS.clear()
        fileio.fault_point("features")  # hit 1: never
        if fires:
            with pytest.raises(fileio.FaultInjected):
                fileio.fault_point("features")
        else:
            fileio.fault_point("features")


def test_signals_in_one_process_stop_cleanly_and_resume_exactly(digits50, tmp_path, monkeypatch, capsys):
    import main

    monkeypatch.delenv("DEEPCLUSTER_FAULT", raising=False)
    one = ["--epochs", "1", "--checkpoints", "1000"]
    ref, exp, ctrl_c = tmp_path / "ref", tmp_path / "exp", tmp_path / "ctrl_c"
    assert main.run(argv(digits50, ref, *one)) == 0

    def signal_at(point: str, hit: int, sig: int):
        def hook(p, n):
            if (p, n) == (point, hit):
                os.kill(os.getpid(), sig)
        monkeypatch.setattr(fileio, "FAULT_HOOK", hook)
        fileio.FAULT_HITS.clear()

    # SIGTERM inside step 2: the run stops before step 3 with a checkpoint there, exit 75; a copy
    # every step by the clock (--checkpoint_minutes) was written before each step up to 2
    signal_at("train", 3, signal.SIGTERM)
    assert main.run(argv(digits50, exp, *one, "--checkpoint_minutes", "1e-9")) == preempt.EXIT_PREEMPTED
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "stopped by SIGTERM at step 3" in err and f"--resume {exp}" in err
    stopped = torch.load(exp / "checkpoints" / "checkpoint_stopped.pth.tar", weights_only=True)
    latest = torch.load(exp / "checkpoints" / "checkpoint_latest.pth.tar", weights_only=True)
    assert (stopped["iteration"], latest["iteration"]) == (3, 2)
    assert signal.getsignal(signal.SIGTERM) is not preempt._on_stop_signal  # handlers put back
    monkeypatch.setattr(fileio, "FAULT_HOOK", None)
    assert main.run(argv(digits50, exp, *one, "--resume", str(exp))) == 0
    a, b = torch.load(ref / "checkpoint.pth.tar", weights_only=True), torch.load(exp / "checkpoint.pth.tar",
                                                                                 weights_only=True)
    assert all(torch.equal(v, b["state_dict"][k]) for k, v in a["state_dict"].items())
    assert fileio.read_jsonl(ref / "log.jsonl")[0]["train_loss"] == fileio.read_jsonl(exp / "log.jsonl")[0]["train_loss"]

    # Ctrl-C while the first checkpoint's temporary file is written: the write completes, then the hint.
    # Python's own SIGINT handler, as in a terminal (a job started in the background ignores SIGINT)
    signal_at("save", 1, signal.SIGINT)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        assert main.run(argv(digits50, ctrl_c, *one)) == 130
    finally:
        signal.signal(signal.SIGINT, previous)
    err = capsys.readouterr().err
    first = ctrl_c / "checkpoints" / "checkpoint_0.pth.tar"
    assert err.count("error:") == 1 and f"interrupted; --resume {ctrl_c} continues from {first}" in err
    assert "inline_container" not in err and not list(ctrl_c.rglob(".tmp-*"))
    assert torch.load(first, weights_only=True)["iteration"] == 0
