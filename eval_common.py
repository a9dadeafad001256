"""Helpers shared by the evaluation scripts (eval_linear, eval_voc_classif, eval_retrieval).

One error type (:class:`EvalError`, a ``errors.ScriptError``: ``cli.run_cli`` prints it as one
line, exit code 2), a labelled image dataset, folder checks, average precision, the model
file's fingerprint, strict-JSON results files (:func:`write_results`: an undefined number is
``null``), and what eval_linear / eval_voc_classif add to the run engine (:mod:`engine`) for
their run folder: ``--resume EXP`` without the required flags, the checks made before any work.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import logging
import math
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

import checkpoint
import cli
import data
import errors
import fileio
import runfolder

log = logging.getLogger("deepcluster.eval")


class EvalError(errors.ScriptError):
    """Bad input for an evaluation (missing files, wrong model...). The message says what."""


# ---------------------------------------------------------------------------------------
# feature caches
# ---------------------------------------------------------------------------------------
def model_key(path: str) -> str:
    """Short key of a model file for cache names: its absolute path, size and mtime."""
    st = os.stat(path)
    return hashlib.sha1(f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------
class LabeledImages(Dataset):
    """``(transform(image), label)`` pairs from a list of paths and labels."""

    def __init__(self, paths: Sequence[str], labels: Sequence, transform: Callable | None = None):
        self.paths = list(paths)
        self.labels = list(labels)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, idx: int):
        img = data.load_rgb(self.paths[idx])
        if self.transform is not None:
            img = self.transform(img)
        return img, self.labels[idx]


def require_dir(path: str | os.PathLike, what: str) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise EvalError(f"{what} {str(p)!r} does not exist or is not a directory")
    return p


def check_input_size(model, size: int, path: str) -> None:
    """fc6 fixes the input size: the conv output at ``size`` must match its width (a model with
    no fc6, ResNet-50, takes any size)."""
    fc6 = next((m for m in getattr(model, "classifier", []) if isinstance(m, nn.Linear)), None)
    if fc6 is None:
        return
    try:
        with torch.no_grad():
            dim = model.forward_conv(torch.zeros(1, 3, size, size, device=fc6.weight.device)).numel()  # C * h * w
    except RuntimeError:  # the conv body cannot even run at this size
        dim = -1
    if dim != fc6.in_features:
        raise EvalError(f"{path!r} takes {model.input_size} px inputs (fc6 has {fc6.in_features} inputs), "
                        f"but --size is {size}: leave --size out to use the model's")


# ---------------------------------------------------------------------------------------
# average precision
# ---------------------------------------------------------------------------------------
def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Non-interpolated AP of a ranking; labels 1 positive, -1 (or <0) negative, 0 ignored.

    AP = sum_n (R_n - R_{n-1}) P_n over the distinct score thresholds (ties count as one
    threshold), i.e. the area under the precision-recall step curve, the definition of
    scikit-learn's ``average_precision_score``. NaN when there is no positive.
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).ravel()
    keep = labels != 0  # difficult / ignored items
    scores, pos = scores[keep], labels[keep] > 0
    npos = int(pos.sum())
    if npos == 0:
        return float("nan")
    order = np.argsort(-scores, kind="mergesort")
    scores, pos = scores[order], pos[order]
    tp = np.cumsum(pos)
    # last index of each group of equal scores: the thresholds
    last = np.r_[np.nonzero(np.diff(scores))[0], len(scores) - 1]
    tp_t = tp[last]
    precision = tp_t / (last + 1)
    recall = tp_t / npos
    d_recall = np.diff(np.r_[0.0, recall])
    return float(np.sum(d_recall * precision))


def average_precision_voc07(scores: np.ndarray, labels: np.ndarray) -> float:
    """The VOC2007 devkit's 11-point interpolated AP (labels as in :func:`average_precision`)."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).ravel()
    keep = labels != 0
    scores, pos = scores[keep], labels[keep] > 0
    if pos.sum() == 0:
        return float("nan")
    order = np.argsort(-scores, kind="mergesort")
    tp = np.cumsum(pos[order])
    recall = tp / pos.sum()
    precision = tp / np.arange(1, len(tp) + 1)
    ap = 0.0
    for t in np.linspace(0, 1, 11):
        p = precision[recall >= t]
        ap += (p.max() if p.size else 0.0) / 11
    return float(ap)


# ---------------------------------------------------------------------------------------
# checkpoints of the evaluations: which frozen model, which folder, which file to resume
# ---------------------------------------------------------------------------------------
def model_fingerprint(path: str | os.PathLike) -> dict:
    """What identifies the model file an evaluation started from: absolute path, size and
    SHA-256 (the checkpoints of eval_linear do not hold the frozen network again)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return {"path": os.path.abspath(path), "size": os.path.getsize(path), "sha256": h.hexdigest()}


def check_same_model(saved: dict | None, current: dict, resume: str) -> None:
    """Refuse to resume on another model file than the checkpoint's (a moved copy is fine)."""
    if saved is None:
        return  # a checkpoint written before the fingerprint was recorded
    if saved.get("sha256") != current["sha256"]:
        raise EvalError(f"--resume {resume!r} was trained on the model {saved.get('path')!r} "
                        f"({saved.get('size')} bytes, sha256 {str(saved.get('sha256'))[:12]}...), but --model "
                        f"{current['path']!r} is another file ({current['size']} bytes, sha256 "
                        f"{current['sha256'][:12]}...): pass that model, or a new --exp without --resume")


# ---------------------------------------------------------------------------------------
# the run folder of the evaluations that train (eval_linear, eval_voc_classif): engine.Run
# ---------------------------------------------------------------------------------------
def parse_resumable(make_parser: Callable[[], argparse.ArgumentParser], argv: Sequence[str] | None, method: str,
                    not_inherited: Sequence[str], required: Sequence[str],
                    defaults=None) -> tuple[argparse.Namespace, str | None]:
    """:func:`runfolder.parse_resumable`; with ``--resume`` the ``required`` flags (``data``,
    ``model``...) may be left out: the recorded run's are taken (an error names any still missing)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--resume", default="")
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            resuming = bool(pre.parse_known_args(argv)[0].resume)
    except SystemExit:  # a bare --resume: the full parser says what is wrong
        resuming = False

    def parser() -> argparse.ArgumentParser:
        p = make_parser()
        for action in p._actions:
            if resuming and action.dest in required:
                action.required = False
        return p

    args, note = runfolder.parse_resumable(parser, argv, method, not_inherited, defaults)
    missing = [f"--{d}" for d in required if getattr(args, d) is None]
    if missing:
        raise EvalError(f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} required: --resume "
                        f"{args.resume} names no run folder that recorded {'it' if len(missing) == 1 else 'them'}")
    return args, note


def refuse_taken(exp: Path, resume: str, overwrite: bool, outputs: Sequence[str]) -> None:
    """Before any work, creating nothing: a folder locked by a live run is refused (naming its
    host and PID), a folder holding a run unless ``--resume`` / ``--overwrite``.
    ``engine.Run.claim`` checks both again under the lock."""
    if (exp / runfolder.LOCK).exists() and _locked(exp / runfolder.LOCK):
        lock = runfolder.FolderLock(exp)
        lock.acquire()  # raises RunFolderError naming the holder (unless it ended meanwhile)
        lock.release()
    used = runfolder.used_by(exp, outputs)
    if used and not resume and not overwrite:
        raise runfolder.RunFolderError(
            f"{exp} already holds a run ({used[0]}): continue it with --resume {exp}, use a new --exp, or start "
            f"over with --overwrite (deletes every output of that run)")


def _locked(path: Path) -> bool:
    """True while another process holds ``flock(path)`` (probed with a shared lock, released at once)."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)  # closing releases the probe's lock


def setup_run_logging(exp: Path, verbose: bool) -> None:
    """The run's lines, the engine's included, to stdout and ``EXP/train.log``; the file is made
    by ``engine.Run.claim`` (a refused run leaves nothing) and keeps the lines logged before."""
    cli.setup_logging(logging.getLogger("deepcluster"), exp, "train.log", verbose, defer=True)
    for h in list(log.handlers):  # the eval logger passes its lines to the run's handlers
        log.removeHandler(h)
        h.close()
    log.setLevel(logging.NOTSET)
    log.propagate = True


def resume_checkpoint(resume: str) -> str | None:
    """The checkpoint ``--resume`` loads: a file, or a folder's newest one of its current run
    (None: the run stopped before its first checkpoint, it starts from the beginning)."""
    if not resume:
        return None
    folder = runfolder.folder_of(resume)
    try:
        return checkpoint.find_checkpoint(resume, runfolder.current_run_id(folder) if folder else None)
    except checkpoint.CheckpointError as e:
        raise EvalError(f"--resume: {e}") from None


# ---------------------------------------------------------------------------------------
# results files: strict JSON
# ---------------------------------------------------------------------------------------
def finite_or_null(obj, where: str = "", undefined: list[str] | None = None):
    """``obj`` with every NaN/inf float (numpy's too) replaced by None; their places are
    appended to ``undefined`` (e.g. ``ap.cow``)."""
    if isinstance(obj, dict):
        return {k: finite_or_null(v, f"{where}.{k}" if where else str(k), undefined) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_null(v, f"{where}[{i}]", undefined) for i, v in enumerate(obj)]
    if isinstance(obj, (float, np.floating)):
        if math.isfinite(obj):
            return float(obj)
        if undefined is not None:
            undefined.append(where)
        return None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def write_results(path: str | os.PathLike, result: dict) -> dict:
    """Write ``result`` as strict JSON (``json.dumps`` would write a bare NaN, which JSON does
    not have): an undefined number becomes ``null``, named in a warning. Returns what was written."""
    import json

    undefined: list[str] = []
    clean = finite_or_null(result, "", undefined)
    for where in undefined:
        log.warning("%s: %s is undefined (not a number), written as null", Path(path).name, where)
    fileio.atomic_write_text(path, json.dumps(clean, indent=1, allow_nan=False))
    return clean
