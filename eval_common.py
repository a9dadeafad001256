"""Helpers shared by the evaluation scripts (eval_linear, eval_voc_classif, eval_retrieval).

One error type (:class:`EvalError`, a ``errors.ScriptError``: ``cli.run_cli`` prints it as one
line, exit code 2), a labelled image dataset, folder checks, average precision. Device choice,
seeding, logging and the CLI wrapper are ``util``'s, shared with ``main.py`` and ``visu/``.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

import data
import errors

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


def resume_file(resume: str) -> str | None:
    """``--resume``: a checkpoint file, or an evaluation folder (its checkpoint.pth.tar; None,
    i.e. start from the beginning, when the run there stopped before its first checkpoint)."""
    if not resume:
        return None
    p = Path(resume)
    if p.is_dir():
        if (p / "checkpoint.pth.tar").is_file():
            return str(p / "checkpoint.pth.tar")
        log.warning("no checkpoint in %s yet: starting from the beginning", resume)
        return None
    return resume


def claim_exp(exp: str | os.PathLike, resume: str, overwrite: bool, outputs: Sequence[str],
              also: Sequence[str] = ()) -> None:
    """A folder that holds an evaluation's ``outputs`` is refused unless ``--resume`` (continue
    it) or ``--overwrite`` (those files, and the ``also`` ones such as tensorboard/, are
    deleted); nothing is written before this check."""
    found = [Path(exp) / f for f in outputs if (Path(exp) / f).exists()]
    if not found or resume:
        return
    if not overwrite:
        raise EvalError(f"{exp} already holds a run ({found[0]}): continue it with --resume {exp}, use a new "
                        f"--exp, or start over with --overwrite (deletes {', '.join(p.name for p in found)})")
    for p in found + [Path(exp) / f for f in also]:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
