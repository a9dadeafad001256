"""Faults of issue 31 that the other fault tests do not reach: a checkpoint corrupted in place
(checksums), a full disk during a checkpoint write (one process; two in test_survival.py),
stop signals that reach the DataLoader workers, and the launcher's exit codes.

The runs are in-process with test_resume.py's small network (seconds); the two-process runs
of the same faults are in test_survival.py, the one-process SIGTERM to a process group with
loader workers in test_faults.py (its reference run).
"""
from __future__ import annotations

import os
import resource
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
import launch
import main
import preempt
import runfolder
from test_resume import argv, images36, outcome, run, small  # noqa: F401 (fixtures)

ROOT = Path(__file__).resolve().parents[1]


class Rank0:
    is_main, rank, world_size, distributed = True, 0, 1, False


# ---------------------------------------------------------------------------------------
# checksums
# ---------------------------------------------------------------------------------------
def payload() -> dict:
    g = torch.Generator().manual_seed(0)
    return {"epoch": 3, "iteration": 0, "arch": "alexnet", "lr": 0.05, "flag": True, "none": None,
            "state_dict": {"w": torch.randn(6, 5, generator=g), "b": torch.randn(5, generator=g).to(torch.bfloat16),
                           "n": torch.tensor(7)},
            "labels": torch.randint(0, 9, (40,), generator=g), "rng": {"python": [3, [1, 2, 3], None]},
            "empty": torch.zeros(0, 4), "steps": (1, 2)}


def test_checksum_sees_every_byte_dtype_shape_and_value():
    base = fileio.payload_digest(payload())
    assert base.startswith("sha256:") and fileio.payload_digest(payload()) == base
    changed = []
    for key, sub in [("state_dict", "w"), ("state_dict", "b"), ("labels", None)]:  # every byte of each tensor
        t = payload()[key][sub] if sub else payload()[key]
        raw = t.reshape(-1).view(torch.uint8)
        for i in range(raw.numel()):
            p = payload()
            tensor = p[key][sub] if sub else p[key]
            tensor.reshape(-1).view(torch.uint8)[i] ^= 0x10
            changed.append(fileio.payload_digest(p))
    edits = [lambda p: p.update(epoch=4), lambda p: p.update(flag=1), lambda p: p.update(lr=0.05000000000000001),
             lambda p: p.update(steps=[1, 2]), lambda p: p["rng"]["python"][1].append(4),
             lambda p: p["state_dict"].update(w=p["state_dict"]["w"].reshape(5, 6)),      # same bytes, other shape
             lambda p: p["state_dict"].update(n=torch.tensor(7, dtype=torch.int32)),     # same value, other dtype
             lambda p: p.update(empty=torch.zeros(4, 0)),
             lambda p: p.update({"state_dict": dict(reversed(list(p["state_dict"].items())))})]  # key order
    for edit in edits:
        p = payload()
        edit(p)
        changed.append(fileio.payload_digest(p))
    assert base not in changed and len(set(changed)) == len(changed)
    # the content, not the layout: a transposed view, a channels-last copy, a GPU copy hash as their values
    p = payload()
    w = p["state_dict"]["w"]
    p["state_dict"]["w"] = w.t().contiguous().t()
    assert not p["state_dict"]["w"].is_contiguous() and fileio.payload_digest(p) == base


def test_checksum_in_threads_equals_one_thread(monkeypatch):
    p = payload()
    p["big"] = torch.randn(50_000)  # 200 kB: 49 chunks of 4 kB
    monkeypatch.setattr(fileio, "_CHUNK", 4096)
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    one = fileio.payload_digest(p)
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    assert fileio.payload_digest(p) == one
    monkeypatch.setattr(fileio, "_CHUNK", 1 << 24)
    assert fileio.payload_digest(p) != one  # the chunk size is part of the definition: a constant


def flip_mid_file(path: Path, n: int = 4096) -> None:
    """Invert ``n`` bytes in the middle of ``path``, in place (same size, same inode)."""
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        block = f.read(n)
        f.seek(-len(block), os.SEEK_CUR)
        f.write(bytes(b ^ 0xFF for b in block))


def test_checksum_is_saved_and_verified_by_full_loads_only(tmp_path):
    path = tmp_path / "c.pth.tar"
    state = payload()
    state["state_dict"]["fc"] = torch.randn(256, 256)  # 256 kB: the middle of the file is tensor data
    checkpoint.save_checkpoint(state, path, Rank0())
    raw = torch.load(path, weights_only=True)  # still a dict of plain types and tensors
    assert raw["checksum"] == fileio.payload_digest(state) and list(raw)[-1] == "checksum"
    assert checkpoint.torch_load(path)["epoch"] == 3
    copy = tmp_path / "copy.pth.tar"
    shutil.copy(path, copy)
    flip_mid_file(copy)
    assert checkpoint.torch_load(copy, mmap=True)["epoch"] == 3  # the cheap header read does not verify
    with pytest.raises(checkpoint.CheckpointError, match="is corrupt: its contents do not match the checksum"):
        checkpoint.torch_load(copy)
    # a checkpoint older than the checksum loads as before
    torch.save(state, tmp_path / "old.pth.tar")
    assert "checksum" not in checkpoint.torch_load(tmp_path / "old.pth.tar")


def test_corrupt_newest_checkpoint_is_named_skipped_and_the_run_ends_equal(small, images36, tmp_path, capsys):
    """4 KiB flipped in the middle of the finished run's checkpoint.pth.tar: given as a file, one
    error line; ``--resume EXP`` names it, takes the newest valid one (the periodic copy at epoch
    1, step 4) and ends bitwise equal to the uninterrupted run (weights, log records, clusters),
    as a resume from any checkpoint of the run does."""
    ref, exp = tmp_path / "ref", tmp_path / "exp"
    assert run(argv(images36, ref))
    shutil.copytree(ref, exp)
    newest = exp / "checkpoint.pth.tar"
    flip_mid_file(newest)
    capsys.readouterr()
    assert main.run(argv(images36, exp, "--resume", str(newest))) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and f"checkpoint {str(newest)!r} is corrupt" in err, err
    assert run(argv(images36, exp, "--resume", str(exp)))
    assert f"skipping {newest}: it is corrupt" in capsys.readouterr().out
    history = runfolder.read_history(exp)
    assert history[-1]["resumed_from"] == str(exp / "checkpoints" / "checkpoint_3.pth.tar"), history[-1]
    ref_ck, ref_recs, ref_clusters = outcome(ref)
    ck, recs, clusters = outcome(exp)
    for k, v in ref_ck["state_dict"].items():
        assert torch.equal(v, ck["state_dict"][k]), k
    assert recs == ref_recs and len(clusters) == len(ref_clusters) == 2
    for a, b in zip(ref_clusters, clusters):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------------------
# a full disk during a checkpoint write, one process (two: test_survival.py)
# ---------------------------------------------------------------------------------------
def test_full_disk_in_a_checkpoint_write_is_one_line(small, images36, tmp_path, capsys):
    """Files cannot grow past 64 KiB from step 1 on (RLIMIT_FSIZE: EFBIG through the same write
    path as ENOSPC): step 2's checkpoint_latest fails inside torch's zip writer. One line naming
    the file and the OS error, exit 2, the previous checkpoint_latest intact, no temporary file."""
    exp = tmp_path / "exp"
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    sigxfsz = signal.getsignal(signal.SIGXFSZ)

    def hook(point, n):
        if (point, n) == ("train", 2):
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, limits[1]))
    small.setattr(fileio, "FAULT_HOOK", hook)
    try:
        code = main.run(argv(images36, exp, "--checkpoint_minutes", "1e-9"))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, sigxfsz)
    err = capsys.readouterr().err
    latest = exp / "checkpoints" / "checkpoint_latest.pth.tar"
    assert code == 2 and err.count("error:") == 1, err
    assert f"error: cannot write checkpoint {str(latest)!r}: File too large; the previous checkpoint there is intact" \
        in err and "Traceback" not in err and "inline_container" not in err, err
    assert checkpoint.torch_load(latest)["iteration"] == 1 and not list(exp.rglob(".tmp-*"))


def test_write_errors_name_their_file(tmp_path):
    """Below torch's zip writer: the OSError of the failed write, naming the file (not
    ``RuntimeError: [enforce fail at inline_container.cc] unexpected pos``), and the temporary
    file removed; the same for any file written through fileio.atomic_write."""
    limits, sigxfsz = resource.getrlimit(resource.RLIMIT_FSIZE), signal.getsignal(signal.SIGXFSZ)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, limits[1]))
    try:
        with pytest.raises(OSError) as big:
            fileio.atomic_torch_save({"w": torch.zeros(1 << 16)}, tmp_path / "c.pth.tar")
        with pytest.raises(OSError) as text:
            fileio.atomic_write_text(tmp_path / "t.txt", "x" * (1 << 17))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, sigxfsz)
    import errno

    assert (big.value.errno, big.value.filename) == (errno.EFBIG, str(tmp_path / "c.pth.tar"))
    assert (text.value.errno, text.value.filename) == (errno.EFBIG, str(tmp_path / "t.txt"))
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------
# stop signals and the DataLoader workers
# ---------------------------------------------------------------------------------------
class Slow(torch.utils.data.Dataset):
    def __len__(self):
        return 40

    def __getitem__(self, i):
        time.sleep(0.02)
        return torch.tensor([i, os.getpid()])


@pytest.mark.skipif(not hasattr(signal, "sigwaitinfo"), reason="SIGTERM keeps PyTorch's handling there")
def test_loader_workers_leave_stop_signals_to_their_main_process():
    """SIGTERM, SIGUSR1 and SIGINT from another process (torchrun's killpg, SLURM, a terminal)
    leave the loader workers running; SIGTERM from their main process (the loader's shutdown,
    multiprocessing's exit) still ends them."""
    import data

    loader = data.make_loader(Slow(), 2, 2, torch.device("cpu"))
    it = iter(loader)
    pids = sorted({int(p) for p in next(it)[:, 1]} | {int(p) for p in next(it)[:, 1]})
    assert len(pids) == 2 and os.getpid() not in pids
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):  # sent by a process other than the parent
        subprocess.run([sys.executable, "-c", f"import os; [os.kill(p, {int(sig)}) for p in {pids}]"], check=True)
    seen = [int(i) for batch in it for i in batch[:, 0]]
    assert seen == list(range(4, 40))  # every batch, from the same workers
    it = iter(loader)
    workers = list(it._workers)
    next(it)
    for w in workers:
        os.kill(w.pid, signal.SIGTERM)  # from the parent: as Process.terminate()
        w.join(timeout=10)
    assert [w.exitcode for w in workers] == [0, 0]
    del it


def test_sigterm_to_the_process_group_with_loader_workers_then_resume_equals_uninterrupted(small, images36,
                                                                                          tmp_path):
    """SIGTERM to a one-process run's process group (as SLURM or a terminal's job control sends
    it: the loader workers of --workers 2 get it too) in epoch 1's step 1: the run stops before
    step 2 with checkpoint_stopped, exit 75, one line; the resume ends bitwise equal (the small
    network of test_resume.py, in a subprocess of its own session)."""
    from test_survival import ENTRY

    ref, exp, entry = tmp_path / "ref", tmp_path / "exp", tmp_path / "entry.py"
    assert run(argv(images36, ref))
    entry.write_text(ENTRY.format(root=str(ROOT)))
    env = dict(os.environ, OMP_NUM_THREADS="1", SURVIVAL_SMALL="1", SURVIVAL_TEST_PGID=str(os.getpgrp()))
    env.pop("DEEPCLUSTER_FAULT", None)
    env.pop("DEEPCLUSTER_FAULT_MODE", None)

    def main_py(*extra: str, hook: str = "") -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(entry), *argv(images36, exp, "--workers", "2", *extra)],
                              cwd=ROOT, env=dict(env, SURVIVAL_HOOK=hook), capture_output=True, text=True,
                              timeout=300, start_new_session=True)
    res = main_py(hook="pgterm:7")
    stopped = exp / "checkpoints" / "checkpoint_stopped.pth.tar"
    lines = [ln for ln in res.stderr.splitlines() if "error:" in ln]
    assert res.returncode == 75 and lines == [f"error: stopped by SIGTERM at step 2: --resume {exp} continues from "
                                              f"{stopped}"], res.stderr[-3000:]
    ck = torch.load(stopped, weights_only=True)
    assert (ck["epoch"], ck["iteration"]) == (1, 2)
    res = main_py("--resume", str(exp))
    assert res.returncode == 0, res.stderr[-3000:]
    ref_ck, ref_recs, ref_clusters = outcome(ref)
    ck, recs, clusters = outcome(exp)
    for k, v in ref_ck["state_dict"].items():
        assert torch.equal(v, ck["state_dict"][k]), k
    assert recs == ref_recs and len(clusters) == len(ref_clusters) == 2
    for a, b in zip(ref_clusters, clusters):
        np.testing.assert_array_equal(a, b)
    assert not list(exp.rglob(".tmp-*"))


def test_a_second_stop_signal_never_raises():
    """torchrun and SLURM both signal a worker: the second SIGTERM must not raise inside the
    stop (the stop checkpoint's collective, the report)."""
    previous = preempt.install()
    try:
        with pytest.raises(preempt.Preempted):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
        os.kill(os.getpid(), signal.SIGTERM)  # while stopping
        time.sleep(0.1)
        assert preempt.requested() == "SIGTERM"
    finally:
        preempt.uninstall(previous)
        preempt._state.requested = None  # the next in-process run starts clean


# ---------------------------------------------------------------------------------------
# the launcher's exit code
# ---------------------------------------------------------------------------------------
def test_exit_code_names_the_rank_that_died_first(tmp_path, monkeypatch, capsys):
    """The failures of the attempt's first failed worker decide (launch._ROOT_PIDS, taken
    before torchrun stops the others): a SIGKILL is 137 with its line, whatever the stopped
    ranks reported; a stop signal that killed a worker before its handlers is 75, silently."""
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    def failure(rank: int, code: int, report: int | None = None) -> ProcessFailure:
        path = tmp_path / f"error_{rank}_{code}.json"
        if report is not None:
            monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(path))
            preempt.record_for_launcher(report, f"rank {rank}: stopped by SIGTERM")
        return ProcessFailure(local_rank=rank, pid=100 + rank, exitcode=code, error_file=str(path))

    monkeypatch.setattr(launch, "_ROOT_PIDS", {101})
    assert launch.exit_code({0: failure(0, 75, report=75), 1: failure(1, -9)}) == 128 + 9
    assert capsys.readouterr().err.strip() == "error: rank 1: killed by SIGKILL (pid 101)"
    assert launch.exit_code({0: failure(0, 2), 1: failure(1, -15)}) == preempt.EXIT_PREEMPTED
    assert launch.exit_code({0: failure(0, 1), 1: failure(1, 2, report=2)}) == 2
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(launch, "_ROOT_PIDS", set())  # not known: a SIGKILL before a SIGTERM
    assert launch.exit_code({0: failure(0, -15), 1: failure(1, -9)}) == 128 + 9
    assert launch.signal_code(signal.SIGUSR1) == preempt.EXIT_PREEMPTED


def test_a_full_disk_anywhere_is_bad_input_not_a_bug():
    """A full disk met by any write (a cluster file, the log): exit 2 and one line naming the
    file, so that --max-restarts does not rerun into it; a bug stays a bug."""
    import argparse
    import errno

    import cli

    args = argparse.Namespace(exp="E")
    hint = lambda a: "--resume E continues from F"  # noqa: E731
    e = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "E/clusters/epoch_00001.npy")
    assert cli._outcome(e, args, None, None, None, hint, 1) == (
        2, "cannot write 'E/clusters/epoch_00001.npy': No space left on device")
    code, msg = cli._outcome(OSError(errno.EDQUOT, "Disk quota exceeded"), args, None, None, None, hint, 2)
    assert (code, msg) == (2, "cannot write: Disk quota exceeded; --resume E continues from F")
    assert cli._outcome(OSError(errno.EACCES, "Permission denied"), args, None, None, None, hint, 1)[0] == 1
