"""Weighted k-nearest-neighbour classification on frozen features: the classifier (tensors in,
class rankings out), the labelled train/val splits, feature extraction, and the per-epoch
monitor of main.py (:class:`KnnMonitor`). The command line is eval_knn.py.

A val image is classified by its k most cosine-similar train images, each voting for its
class with weight exp(similarity / T) (Wu et al. 2018; DINO's eval_knn).
"""
from __future__ import annotations

import argparse
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

import cli
import data
import distributed
import input_cache as cache_lib
import models
from eval_common import EvalError, LabeledImages, log


DEFAULT_K = 20
DEFAULT_T = 0.07
TOPN = 5  # the accuracy reports top-1 and top-5


# ---------------------------------------------------------------------------------------
# the classifier (pure: tensors in, class rankings out)
# ---------------------------------------------------------------------------------------
def clamp_ks(ks: Iterable[int], n_train: int, what: str = "k", logger: logging.Logger = log) -> list[int]:
    """Sorted distinct k values, each at most ``n_train`` (a warning says which were cut)."""
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ValueError(f"{what} must be >= 1, got {ks}")
    if ks[-1] > n_train:
        logger.warning("%s %s larger than the %d train images: clamped to %d", what,
                       [k for k in ks if k > n_train], n_train, n_train)
        ks = sorted({min(k, n_train) for k in ks})
    return ks


@torch.no_grad()
def knn_classify(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 ks: Sequence[int] = (DEFAULT_K,), T: float = DEFAULT_T, chunk: int = 256,
                 train_chunk: int = 65536, num_classes: int | None = None,
                 topn: int = TOPN) -> dict[int, torch.Tensor]:
    """Weighted kNN: ``{k: (N_test, min(topn, C)) int64}`` classes, best first, for each k.

    Features are L2-normalised here (cosine similarity). Test image q votes with its k most
    similar train images i, weight exp(sim(q, i) / T), for the class of i; classes are ranked
    by total vote, ties broken by the smaller class index. Runs on ``train_features.device``;
    the similarities are computed in blocks of ``chunk`` test x ``train_chunk`` train rows
    (a running top-k merges the train blocks), never the whole N_test x N_train matrix.
    Every k must be <= N_train (see :func:`clamp_ks`).
    """
    device = train_features.device
    n_train = train_features.shape[0]
    ks = sorted({int(k) for k in ks})
    kmax = ks[-1]
    if not 1 <= ks[0] <= kmax <= n_train:
        raise ValueError(f"k values {ks} must be in 1..{n_train} (the number of train features)")
    C = int(num_classes if num_classes is not None else int(train_labels.max()) + 1)
    train = nn.functional.normalize(train_features.float(), dim=1)      # (N_train, D)
    train_labels = train_labels.to(device=device, dtype=torch.long)      # (N_train,)
    out: dict[int, list[torch.Tensor]] = {k: [] for k in ks}
    for s in range(0, test_features.shape[0], chunk):
        q = nn.functional.normalize(test_features[s:s + chunk].to(device).float(), dim=1)  # (B, D)
        best_sim = torch.empty(q.shape[0], 0, device=device)             # (B, <= kmax)
        best_idx = torch.empty(q.shape[0], 0, dtype=torch.long, device=device)
        for t in range(0, n_train, train_chunk):
            sim = q @ train[t:t + train_chunk].T                          # (B, Tc)
            sim, idx = sim.topk(min(kmax, sim.shape[1]), dim=1)
            best_sim = torch.cat([best_sim, sim], 1)
            best_idx = torch.cat([best_idx, idx + t], 1)
            if best_sim.shape[1] > kmax:
                best_sim, pos = best_sim.topk(kmax, dim=1)
                best_idx = best_idx.gather(1, pos)
        if best_sim.shape[1] > 1:  # best first, whatever the train blocks (at most 2 kmax values)
            best_sim, pos = best_sim.sort(dim=1, descending=True, stable=True)
            best_idx = best_idx.gather(1, pos)
        # exp(sim / T) divided by its value at the nearest neighbour (one factor per test image,
        # so the same ranking): neither overflows nor vanishes for a small T
        weights = ((best_sim - best_sim[:, :1]) / T).exp()               # (B, kmax)
        neighbours = train_labels[best_idx]                              # (B, kmax)
        for k in ks:
            votes = torch.zeros(q.shape[0], C, device=device, dtype=weights.dtype)
            votes.scatter_add_(1, neighbours[:, :k], weights[:, :k])     # (B, C)
            order = votes.sort(dim=1, descending=True, stable=True).indices[:, :min(topn, C)]
            out[k].append(order)
    empty = torch.zeros(0, min(topn, C), dtype=torch.long, device=device)
    return {k: torch.cat(v) if v else empty for k, v in out.items()}


def knn_accuracy(rankings: dict[int, torch.Tensor], labels: torch.Tensor,
                 num_classes: int | None = None) -> dict[int, dict[str, float | None]]:
    """``{k: {"top1": %, "top5": %}}`` from :func:`knn_classify`'s rankings and the true labels;
    top-5 is None with ``num_classes`` <= 5 (always 100 there: no information)."""
    out = {}
    for k, r in rankings.items():
        hit = r.eq(labels.to(r.device, torch.long)[:, None])             # (N, topn)
        n = max(1, len(labels))
        out[k] = {"top1": 100.0 * hit[:, 0].sum().item() / n if r.shape[1] else 0.0,
                  "top5": 100.0 * hit[:, :TOPN].any(1).sum().item() / n}
        if num_classes is not None and num_classes <= TOPN:
            out[k]["top5"] = None
    return out


def pca_whiten(train: torch.Tensor, val: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PCA-whitening to ``dim`` dims fitted on ``train`` and applied to both, then L2 (what the
    clustering does to the features before k-means: clustering.pca_fit / pca_apply)."""
    import clustering
    mean, proj = clustering.pca_fit(train.float(), min(dim, train.shape[1]))
    return clustering.pca_apply(train.float(), mean, proj), clustering.pca_apply(val.float(), mean, proj)


# ---------------------------------------------------------------------------------------
# data: DIR/train and DIR/val class folders
# ---------------------------------------------------------------------------------------
@dataclass
class KnnSplits:
    train_paths: list[str]
    train_labels: np.ndarray   # (N_train,) int64, index into classes
    val_paths: list[str]
    val_labels: np.ndarray     # (N_val,) int64, index into classes (train's numbering)
    classes: list[str]


def load_knn_splits(root: str | os.PathLike, flag: str = "--data") -> KnnSplits:
    """Scan ``root/train`` and ``root/val``; refuse (DataError naming ``flag``) a missing split,
    folders without class sub-folders, a single class, or val classes absent from train."""
    root_p = Path(root)
    if not root_p.is_dir():
        raise data.DataError(f"{flag} {str(root)!r} does not exist or is not a directory")
    scans = {}
    for split in ("train", "val"):
        if not (root_p / split).is_dir():
            raise data.DataError(f"{flag} {str(root)!r} has no {split}/ folder "
                                 f"(expected {split}/<class>/<image>)")
        paths, targets, classes = data.scan_image_folder(root_p / split)
        if targets is None:
            raise data.DataError(f"{flag}: {str(root_p / split)!r} must hold one folder per class")
        scans[split] = (paths, targets, classes)
    tr_paths, tr_t, tr_classes = scans["train"]
    va_paths, va_t, va_classes = scans["val"]
    missing = sorted(set(va_classes) - set(tr_classes))
    if missing:
        raise data.DataError(f"{flag}: class(es) {missing[:5]} of {str(root_p / 'val')!r} have no images in "
                             f"{str(root_p / 'train')!r}")
    if len(tr_classes) < 2:
        raise data.DataError(f"{flag} {str(root)!r} has a single class ({tr_classes[0]!r}): a kNN accuracy "
                             f"needs at least 2")
    remap = np.asarray([tr_classes.index(c) for c in va_classes], dtype=np.int64)
    return KnnSplits(tr_paths, np.asarray(tr_t, dtype=np.int64), va_paths, remap[np.asarray(va_t)], tr_classes)


def subset(paths: list[str], labels: np.ndarray, size: int, rng: np.random.RandomState) -> tuple[list[str], np.ndarray]:
    """At most ``size`` items drawn without replacement by ``rng``, kept in folder order."""
    if size >= len(paths):
        return paths, labels
    keep = np.sort(rng.choice(len(paths), size, replace=False))
    return [paths[i] for i in keep], labels[keep]


# ---------------------------------------------------------------------------------------
# features
# ---------------------------------------------------------------------------------------
class FeatureNet(nn.Module):
    """(B, 3, S, S) -> (B, D): fc7 before its ReLU, or conv``n`` after its ReLU pooled as the
    linear probe pools it (models.make_pool) and flattened. Frozen, always in eval mode."""

    def __init__(self, model: models.DeepClusterNet, layer: str = "fc7", size: int = 224):
        super().__init__()
        self.layer = layer
        if layer == "fc7":
            self.model, self.body, self.pool = model, None, None
            return
        try:
            conv = model.probe_index(models.probe_arg(layer))
            self.model, self.body = None, model.trunk(conv).freeze()
        except models.ProbeError:
            raise EvalError(f"--layer {layer!r}: expected fc7 or one of {', '.join(model.probe_points())}") from None
        device = next(model.parameters()).device
        with torch.no_grad():
            fmap = self.body(torch.zeros(1, 3, size, size, device=device))  # (1, C, h, w)
        self.pool = models.make_pool(model.arch, conv, fmap.shape[1], tuple(fmap.shape[2:]))

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.body is None:
            return self.model.forward_features(x)                        # (B, 4096)
        return torch.flatten(self.pool(self.body(x)), 1)                 # (B, C * h' * w')


@torch.no_grad()
def extract(net: nn.Module, batches: Iterable[torch.Tensor], device: torch.device) -> torch.Tensor:
    """(N, D) float32 features on the CPU, in the order of ``batches``; every module of ``net``
    is left in the train/eval mode it had."""
    modes = [(m, m.training) for m in net.modules()]
    net.eval()
    try:
        out = [net(imgs.to(device, non_blocking=True)).float().cpu() for imgs in batches]
    finally:
        for m, mode in modes:
            m.training = mode
    return torch.cat(out) if out else torch.zeros(0, 0)


def image_batches(paths: list[str], size: int, batch: int, workers: int, desc: str = "",
                  no_progress: bool = True, device: torch.device = torch.device("cpu")) -> Iterator[torch.Tensor]:
    """(B, 3, S, S) normalised centre crops of ``paths``, in order (pinned for a CUDA
    ``device``). The loader has its own generator: iterating it draws nothing from the global RNG."""
    loader = data.make_loader(LabeledImages(paths, [0] * len(paths), data.eval_transform(size)), batch, workers,
                              device)
    for imgs, _ in tqdm(loader, desc=desc, leave=False, disable=cli.progress(no_progress)):
        yield imgs


# ---------------------------------------------------------------------------------------
# the per-epoch monitor of main.py
# ---------------------------------------------------------------------------------------
def add_monitor_args(p: argparse.ArgumentParser, features: str = "fc7"):
    """The flags of the per-epoch kNN monitor (main.py: of fc7; main_deepclusterv2.py: of the
    pooled trunk features); returns their argument group."""
    g = p.add_argument_group("kNN monitor")
    g.add_argument("--knn_data", type=str, default="", metavar="DIR",
                   help=f"labelled DIR/train and DIR/val class folders: weighted-kNN top-1/top-5 of {features} "
                        f"on a fixed seeded subset, at the random network and after every epoch (empty: off)")
    g.add_argument("--knn_train_size", type=int, default=5000, help="train images of the kNN subset (at most)")
    g.add_argument("--knn_val_size", type=int, default=1000, help="val images of the kNN subset (at most)")
    g.add_argument("--knn_k", type=int, default=20, help="nearest train images voting (weights exp(sim/0.07))")
    g.add_argument("--knn_whiten", type=int, default=0, metavar="DIM",
                   help=f"PCA-whiten {features} to DIM dims (fitted on the kNN train subset, as the clustering "
                        f"does) before the kNN; 0: raw {features}")
    return g


def monitor_arg_rules(args: argparse.Namespace) -> list[tuple[str, bool, object, str]]:
    """(flag, valid, value, why) checks of the monitor's flags, for ``main.check_args``."""
    return [
        ("--knn_train_size", args.knn_train_size >= 1, args.knn_train_size, "must be >= 1"),
        ("--knn_val_size", args.knn_val_size >= 1, args.knn_val_size, "must be >= 1"),
        ("--knn_k", args.knn_k >= 1, args.knn_k, "must be >= 1"),
        ("--knn_whiten", args.knn_whiten >= 0, args.knn_whiten, "must be >= 0 (0: off)"),
    ]


class KnnMonitor:
    """kNN top-1/top-5 of fc7 on a fixed subset of ``root``'s train/ and val/ splits.

    The subset is drawn once by its own seeded generator. Its images are the uint8 centre crops
    (``data.eval_transform(size, normalize=False)``, normalised per batch by
    ``data.to_model_input``: bitwise the per-image Normalize), decoded once and kept in memory
    when they fit in ``cache_mb``, else read from the input cache under ``input_cache`` (see
    input_cache.py; None: decoded at every evaluation). :meth:`evaluate` draws nothing from any
    global RNG and leaves the model's train/eval mode as it found it, so enabling the monitor
    does not change training, and the same weights always give the same values.
    """

    def __init__(self, root: str, train_size: int, val_size: int, seed: int = 0, size: int = 224,
                 k: int = DEFAULT_K, T: float = DEFAULT_T, batch: int = 256, workers: int = 0,
                 load: bool = True, cache_mb: float = 512, no_progress: bool = True, flag: str = "--knn_data",
                 logger: logging.Logger = log, whiten: int = 0, input_cache: Path | None = None):
        splits = load_knn_splits(root, flag)
        rng = np.random.RandomState(seed)
        self.train_paths, self.train_labels = subset(splits.train_paths, splits.train_labels, train_size, rng)
        self.val_paths, self.val_labels = subset(splits.val_paths, splits.val_labels, val_size, rng)
        self.num_classes = len(splits.classes)
        self.ks = clamp_ks([k], len(self.train_paths), flag.replace("data", "k"), logger)
        # every image checked now: a bad one named before any training, not mid-run (where the
        # hints are about the training data)
        data.check_eval_images(self.train_paths + self.val_paths, flag, progress=not no_progress,
                               hint=f"fix or remove them, or train without {flag}")
        self.whiten = whiten
        self.T, self.size, self.batch, self.workers, self.no_progress = T, size, batch, workers, no_progress
        dataset = data.IndexedImageFolder.from_paths(self.train_paths + self.val_paths, root,
                                                     data.eval_transform(size, normalize=False))
        in_memory = load and len(dataset) * 3 * size * size <= cache_mb * 2 ** 20
        self.loader = cache_lib.feature_loader(dataset, batch, workers, torch.device("cpu"), size,
                                               cache=None if in_memory else input_cache, what="knn")
        self.images: list[torch.Tensor] | None = None  # (B, 3, S, S) uint8 batches kept in memory
        if in_memory:
            self.images = [imgs for imgs, _ in self._progress(self.loader, "kNN images")]

    @classmethod
    def for_training(cls, args, rt, logger: logging.Logger = log, demo: str = "") -> "KnnMonitor | None":
        """``main.py --knn_data`` on rank 0 (None when off and on the other ranks). Every rank
        reads the folders, so a bad --knn_data stops all of them before any training. The
        demo's ``--knn_data`` (``demo``) is exported from scikit-learn's digits on first use."""
        if not args.knn_data:
            return None
        if args.demo and args.knn_data == demo:
            if rt.is_main:
                data.export_digits_split(args.knn_data)
            distributed.barrier(rt)
        root = os.path.abspath(args.knn_data)
        monitor = cls(root, args.knn_train_size, args.knn_val_size, seed=args.seed, size=args.size,
                      k=args.knn_k, batch=args.batch, workers=args.workers, load=rt.is_main,
                      no_progress=args.no_progress, logger=logger, whiten=args.knn_whiten,
                      input_cache=cache_lib.resolve(getattr(args, "input_cache", "off"), args.exp))
        logger.info("kNN monitor: %d train, %d val images of %s, k=%d", len(monitor.train_paths),
                    len(monitor.val_paths), root, monitor.ks[0])
        return monitor if rt.is_main else None

    @staticmethod
    def text(r: dict) -> str:
        """The console line's kNN part of a log record ('' when it has none)."""
        top5 = "-" if r.get("knn_top5") is None else f"{r['knn_top5']:.2f}"
        return f" knn {r['time_knn']:.1f}s | kNN top-1 {r['knn_top1']:.2f} top-5 {top5}" if "knn_top1" in r else ""

    def _progress(self, loader, desc: str):
        return tqdm(loader, desc=desc, leave=False, disable=cli.progress(self.no_progress))

    def _batches(self, device: torch.device) -> Iterator[torch.Tensor]:
        """The normalised float32 batches on ``device``."""
        batches = self.images if self.images is not None else (x for x, _ in self._progress(self.loader, "kNN features"))
        for imgs in batches:
            yield data.to_model_input(imgs, device)

    def evaluate(self, model: models.DeepClusterNet, device: torch.device) -> dict:
        """``{"knn_top1", "knn_top5", "time_knn"}`` of the model's pre-ReLU fc7 features
        (PCA-whitened to ``whiten`` dims first when > 0)."""
        t0 = time.time()
        feats = extract(FeatureNet(model, "fc7"), self._batches(device), device).to(device)  # (N_tr + N_val, 4096)
        n = len(self.train_paths)
        train, val = pca_whiten(feats[:n], feats[n:], self.whiten) if self.whiten else (feats[:n], feats[n:])
        ranks = knn_classify(train, torch.from_numpy(self.train_labels), val, self.ks, self.T,
                             num_classes=self.num_classes)
        acc = knn_accuracy(ranks, torch.from_numpy(self.val_labels), self.num_classes)[self.ks[0]]
        return {"knn_top1": acc["top1"], "knn_top5": acc["top5"], "time_knn": time.time() - t0}
