"""Helpers shared by the evaluation scripts (eval_linear, eval_voc_classif, eval_retrieval).

One error type (:class:`EvalError`, a ``errors.ScriptError``: ``cli.run_cli`` prints it as one
line, exit code 2), a labelled image dataset, folder checks, average precision. Device choice,
seeding, logging and the CLI wrapper are ``util``'s, shared with ``main.py`` and ``visu/``.
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
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
