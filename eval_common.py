"""Helpers shared by the evaluation scripts (eval_linear, eval_voc_classif, eval_retrieval).

One error type (:class:`EvalError`) for bad input, turned into a one-line message and exit
code 2 by :func:`run_cli`; model loading with an architecture check; the device choice;
seeding; a labelled image dataset; average precision.
"""
from __future__ import annotations

import argparse
import logging
import os
import random
import sys
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

import checkpoint
import data
import models
import util

log = logging.getLogger("deepcluster.eval")


class EvalError(RuntimeError):
    """Bad input for an evaluation (missing files, wrong model...). The message says what."""


# ---------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------
def run_cli(main: Callable[[argparse.Namespace], object], parser: argparse.ArgumentParser,
            argv: Sequence[str] | None = None) -> int:
    """Parse, run ``main``; known failures become ``error: <one line>`` on stderr, exit 2."""
    args = parser.parse_args(argv)
    try:
        main(args)
    except (EvalError, checkpoint.CheckpointError, data.DataError, data.BadImageError) as e:
        return fail(str(e))
    except KeyboardInterrupt:
        return fail("interrupted", 130)
    return 0


def fail(msg: str, code: int = 2) -> int:
    msg = " ".join(str(msg).split())  # one line
    print(f"error: {msg}", file=sys.stderr)
    return code


def setup_logging(exp: str | os.PathLike | None, verbose: bool, filename: str) -> None:
    """Log to stdout and, when ``exp`` is given, to ``exp/filename``."""
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()
    fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if exp is not None:
        Path(exp).mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(Path(exp) / filename))
    for h in handlers:
        h.setFormatter(fmt)
        log.addHandler(h)
    log.propagate = False


def select_device() -> torch.device:
    """CUDA when present, else CPU: the scripts have a single code path for both."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def progress(disable: bool) -> bool | None:
    """tqdm's ``disable`` value: None shows bars on a terminal only, True hides them."""
    return True if disable else None


# ---------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------
def load_model(path: str | None, arch: str | None = None, purpose: str = "") -> models.DeepClusterNet:
    """Load our or the released checkpoint; refuse another architecture than ``arch``."""
    if not path:
        raise EvalError("no model given: pass --model PATH (a DeepCluster checkpoint)")
    model = util.load_model(path)
    if arch is not None and model.arch != arch:
        raise EvalError(f"{purpose or 'this evaluation'} needs a {arch} model, but {path!r} holds "
                        f"a {model.arch}")
    return model


def conv_prefix(model: models.DeepClusterNet, conv: int) -> torch.nn.Sequential:
    """``features`` up to and including the ReLU of conv layer ``conv`` (1-based)."""
    relus = model.conv_layers()
    if not 1 <= conv <= len(relus):
        raise EvalError(f"--conv {conv} is out of range: {model.arch} has conv layers 1..{len(relus)}")
    return model.features[:relus[conv - 1] + 1]


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
