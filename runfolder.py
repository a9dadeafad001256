"""The run folder (``--exp``) of every script that trains: claimed under a lock, refused when
used, emptied by ``--overwrite``, continued by ``--resume EXP`` with the flags its run recorded.

* **The lock** (``EXP/.lock``): an exclusive ``flock`` held by the run's main process for its
  whole life, so a second run into a live folder is refused with one line naming the holder's
  host and PID, before anything in the folder is touched. The kernel releases the lock when
  its holder dies, however it dies (SIGKILL included): a lock file whose holder is gone is
  simply taken over (the log says whose it was). ``flock`` also works on NFSv4 and Lustre.
* **A used folder**: a new run is refused unless ``--resume`` (continue it) or ``--overwrite``
  (every output of the old run is deleted first: checkpoints, logs, cluster files, exports,
  reports; the folder's other files are left alone).
* **The record**: ``args.json`` (the flags a run started with) and ``args_history.jsonl`` (one
  line per invocation: flags, run id, where it started, the method), so ``--resume EXP`` takes
  the run's flags, and a folder of one method given to the other script is named as such.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Sequence

import cli
from errors import ScriptError
from fileio import atomic_write_text, fsync_enabled

log = logging.getLogger("deepcluster")

HISTORY = "args_history.jsonl"  # one line per invocation in a run folder
LOCK = ".lock"
# the script that writes each method's folders (args_history.jsonl "method")
SCRIPTS = {"deepcluster": "main.py", "deepclusterv2": "main_deepclusterv2.py",
           "eval_linear": "eval_linear.py", "eval_voc": "eval_voc_classif.py"}
# what a run writes (deleted by --overwrite); a script adds its own (results.json, ...)
OUTPUTS = ("checkpoint.pth.tar", "checkpoints", "clusters", "log.jsonl", "args.json", HISTORY, "train.log",
           "tensorboard", "report", "export", "bad_images.txt", "input_cache")


class RunFolderError(ScriptError):
    """The run folder cannot be used as asked (in use, holds another run, another method)."""


# ---------------------------------------------------------------------------------------
# the lock
# ---------------------------------------------------------------------------------------
class FolderLock:
    """``flock(EXP/.lock)``, held until :meth:`release` or the process's death."""

    def __init__(self, exp: Path):
        self.path = Path(exp) / LOCK
        self.fd: int | None = None

    def holder(self) -> dict:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def acquire(self) -> None:
        """Take the lock or raise :class:`RunFolderError` naming its holder. Creates EXP."""
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            h = self.holder()
            raise RunFolderError(
                f"{self.path.parent} is in use by the run of PID {h.get('pid', '?')} on {h.get('host', '?')} "
                f"(started {h.get('started', '?')}: {h.get('command', '?')}): wait for it to end, stop it, or "
                f"use another --exp") from None
        stale = self.holder()
        if stale.get("pid"):  # the file outlived its holder (killed): the kernel had released its lock
            log.info("taking over the lock of %s: PID %s on %s is gone", self.path.parent, stale["pid"],
                     stale.get("host"))
        info = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "command": " ".join(sys.argv)[:300]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self.fd = fd

    def release(self) -> None:
        """Unlock (for every process sharing the descriptor: forked loader workers too) and close."""
        import fcntl

        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, 0)  # an empty lock file: nobody to take over from
                fcntl.flock(self.fd, fcntl.LOCK_UN)
                os.close(self.fd)
            self.fd = None


# ---------------------------------------------------------------------------------------
# invocation history and recorded flags
# ---------------------------------------------------------------------------------------
def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def read_history(exp: Path) -> list[dict]:
    """The invocations recorded in ``exp/args_history.jsonl`` (oldest first)."""
    path = Path(exp) / HISTORY
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line torn by a kill while appending
            continue
    return out


def current_run_id(exp: Path) -> str | None:
    """The run id of the folder's last invocation (None for a folder without history)."""
    hist = [h for h in read_history(exp) if h.get("run_id")]
    return hist[-1]["run_id"] if hist else None


def folder_of(resume: str) -> Path | None:
    """The run folder a ``--resume`` target names: the folder, or the one holding the
    checkpoint (``EXP/checkpoint.pth.tar``, ``EXP/checkpoints/checkpoint_N.pth.tar``)."""
    p = Path(resume)
    cands = [p] if p.is_dir() else [p.parent] + ([p.parent.parent] if p.parent.name == "checkpoints" else [])
    for folder in cands:
        if (folder / HISTORY).exists() or (folder / "args.json").exists():
            return folder
    return None


def recorded_run(resume: str) -> tuple[Path | None, dict, str | None]:
    """(folder, the flags its run last ran with, its method) of a ``--resume`` target; the
    flags of the last recorded invocation, else ``args.json``'s; ``(None, {}, None)`` for
    anything else (a released checkpoint, a missing path: the resume itself says what is wrong)."""
    folder = folder_of(resume)
    if folder is None:
        return None, {}, None
    hist = [h for h in read_history(folder) if isinstance(h.get("args"), dict)]
    if hist:
        return folder, dict(hist[-1]["args"]), hist[-1].get("method")
    try:
        flags = json.loads((folder / "args.json").read_text())
    except (OSError, ValueError):
        return None, {}, None
    return (folder, flags, flags.get("method")) if isinstance(flags, dict) else (None, {}, None)


def check_method(folder: Path, method: str | None, wanted: str) -> None:
    """A folder written by another method's script is refused, naming that script."""
    if method is not None and method != wanted:
        raise RunFolderError(f"{folder} holds a {method} run: continue it with {SCRIPTS.get(method, method)}, "
                             f"not {SCRIPTS[wanted]}")


def parse_resumable(make_parser, argv: Sequence[str] | None, method: str, not_inherited: Sequence[str],
                    defaults=None) -> tuple[argparse.Namespace, str | None]:
    """Parse ``argv``; with ``--resume EXP`` every flag not given defaults to the run's recorded
    one and ``--exp`` to EXP. ``defaults(chosen)`` may return more defaults (the demo's), given
    ``chosen(flag)`` = the value given or recorded. Returns (args, the note on what was taken
    from the run and what differs, data folder included; None without --resume)."""
    args = make_parser().parse_args(argv)
    resume = getattr(args, "resume", "")
    folder, recorded, ran = recorded_run(resume) if resume else (None, {}, None)
    if folder is not None:
        check_method(folder, ran, method)
    given = cli.explicit_flags(make_parser(), argv)
    recorded = {k: v for k, v in recorded.items() if k in vars(args) and k not in not_inherited}
    parser = make_parser()
    if defaults is not None:
        parser.set_defaults(**defaults(lambda flag: given[flag] if flag in given else recorded.get(flag)))
    parser.set_defaults(**recorded, **({"exp": str(folder)} if folder is not None and "exp" not in given else {}))
    args = parser.parse_args(argv)
    if folder is None:
        return args, None
    changed = [f"--{k} {getattr(args, k)} (the run's: {v})" for k, v in recorded.items()
               if k in given and not _same(k, getattr(args, k), v)]
    return args, f"flags of the run in {folder}" + (f", except {', '.join(changed)}" if changed else "")


def _same(flag: str, now, then) -> bool:
    if flag in ("data", "data_path", "file_list") and now and then:  # folders: compared as absolute paths
        return os.path.abspath(str(now)) == os.path.abspath(str(then))
    return now == then


# ---------------------------------------------------------------------------------------
# claiming the folder
# ---------------------------------------------------------------------------------------
def used_by(exp: Path, outputs: Sequence[str] = ()) -> list[str]:
    """Files that show ``exp`` holds a run: checkpoints, logged epochs, the script's ``outputs``."""
    exp = Path(exp)
    found = [p for p in [exp / "checkpoint.pth.tar", *sorted((exp / "checkpoints").glob("*.pth*")),
                         *(exp / o for o in outputs)] if p.exists()]
    logf = exp / "log.jsonl"
    if logf.exists() and logf.stat().st_size > 0:
        found.append(logf)
    return [str(p) for p in found]


def retire(exp: Path, outputs: Sequence[str] = ()) -> None:
    """``--overwrite``: delete every output of the old run (files and folders of OUTPUTS and
    ``outputs``), temporary files of interrupted writes included; nothing else in EXP."""
    exp = Path(exp)
    for name in (*OUTPUTS, *outputs):
        p = exp / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    drop_partial_writes(exp)


def drop_partial_writes(exp: Path) -> None:
    """Temporary files of writes killed before their rename (never valid). Only the lock's
    holder calls this: in a live run's folder they are its checkpoint being written."""
    for sub in (exp, exp / "checkpoints", exp / "clusters"):
        for stale in sub.glob(".tmp-*"):
            stale.unlink(missing_ok=True)


def check_writable(exp: Path) -> None:
    """Fail before any work if the folder cannot take files (read-only, full)."""
    try:
        (exp / "checkpoints").mkdir(parents=True, exist_ok=True)
        probe = exp / f".write_test.{os.getpid()}"  # one per process: ranks share the folder
        probe.write_bytes(b"0" * 4096)
        probe.unlink()
    except OSError as e:
        raise RunFolderError(f"experiment folder {str(exp)!r} is not writable: {e.strerror or e}") from None


def record_invocation(exp: Path, flags: dict, run_id: str, method: str, start_epoch: int, iteration: int = 0,
                      resumed_from: str | None = None) -> None:
    """Append this invocation (all flags, run id, method, where it starts) to ``args_history.jsonl``."""
    entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "run_id": run_id, "method": method,
             "start_epoch": int(start_epoch), "iteration": int(iteration), "resumed_from": resumed_from,
             "launch": launch_id(), "args": flags}
    with open(Path(exp) / HISTORY, "a") as f:
        f.write(json.dumps(entry, default=str) + "\n")
        f.flush()
        if fsync_enabled():
            os.fsync(f.fileno())


def write_args(exp: Path, flags: dict, method: str) -> None:
    """``args.json``: the flags the run started with, and its method."""
    atomic_write_text(Path(exp) / "args.json", json.dumps({**flags, "method": method}, indent=1, default=str))


def launch_id() -> str | None:
    """The torchrun launch this process belongs to, the same in all its restarts (None outside
    torchrun): its rendezvous id when set, else the launcher's host and pid."""
    if "TORCHELASTIC_RESTART_COUNT" not in os.environ:
        return None
    run = os.environ.get("TORCHELASTIC_RUN_ID", "")
    if run and run != "none":
        return f"rdzv:{run}"
    return f"{socket.gethostname()}:{os.getppid()}"


def restarted_own_run(exp: Path) -> bool:
    """True in a torchrun restart (``TORCHELASTIC_RESTART_COUNT`` > 0) whose folder's last
    invocation is this same launch: the command continues its own run."""
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) <= 0:
        return False
    hist = read_history(exp)
    return bool(hist) and hist[-1].get("launch") is not None and hist[-1].get("launch") == launch_id()
