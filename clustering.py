"""Clustering step of DeepCluster: PCA-whitening + L2, then k-means (or PIC).

Public API kept from the original release::

    xb = preprocess_features(features)          # (N, D) -> (N, 256) whitened, unit rows
    km = Kmeans(k); loss = km.cluster(features) # fills km.images_lists
    train_set = cluster_assign(km.images_lists, dataset)
    labels = arrange_clustering(km.images_lists)

Two k-means backends with faiss semantics:

* ``faiss``: ``faiss.Clustering`` (GPU flat index when faiss was built with GPU support and
  CUDA is present, else CPU).
* ``torch``: the same algorithm in pure PyTorch (exact L2 assignment, mean update, empty
  clusters re-seeded by splitting a populated centroid with a symmetric 1/1024 perturbation).
  It runs on a CUDA GPU without faiss-gpu, and on CPU.

``backend="auto"`` picks torch on CUDA (even with faiss-gpu installed), else faiss when
installed, else torch.

The pieces live in their own modules, re-exported here: :mod:`pca` (whitening and the
eigensolver), :mod:`kmeans` (faiss, torch and sharded Lloyd), :mod:`pic`,
:mod:`spherical_kmeans` (DeepCluster-v2), :mod:`cluster_util` (backend choice, collectives).
"""
from __future__ import annotations

import logging
import time
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from cluster_util import (ClusteringError, _all_reduce, _default_device, _distributed, faiss, faiss_has_gpu,
                          labels_to_lists, resolve_backend)
from kmeans import (_kmeans, check_not_collapsed, cluster_peak_bytes, cluster_sums, count_distinct_rows,
                    count_distinct_sharded, faiss_nearest, kmeans_faiss, kmeans_sharded, kmeans_torch,
                    nearest_centroid, run_kmeans, split_empty_clusters)
from pca import (EIG_TOL, LAST_PCA_INFO, PCA_SOLVERS, covariance, live_axes, pca_apply, pca_apply_kept, pca_fit,
                 pca_fit_sharded, preprocess_features, resolve_pca_solver, top_eigh)
from pic import PIC, distribute_singletons, make_graph, pic_graph, run_pic
from spherical_kmeans import all_gather_varlen, gather_assignments, sample_centroids, spherical_kmeans

log = logging.getLogger("deepcluster")

__all__ = [
    # the original's API
    "preprocess_features", "Kmeans", "PIC", "run_kmeans", "cluster_assign", "arrange_clustering",
    "ReassignedDataset", "OrderedReassignedDataset", "make_graph", "run_pic", "ClusteringError",
    # ours, re-exported from the modules that hold them
    "pca_fit", "pca_apply", "pca_fit_sharded", "pca_apply_kept", "top_eigh", "covariance", "live_axes",
    "resolve_pca_solver", "PCA_SOLVERS", "EIG_TOL", "LAST_PCA_INFO", "kmeans_torch", "kmeans_faiss",
    "kmeans_sharded", "nearest_centroid", "split_empty_clusters", "cluster_sums", "cluster_peak_bytes",
    "count_distinct_rows", "count_distinct_sharded", "check_not_collapsed", "faiss_nearest", "resolve_backend",
    "faiss", "faiss_has_gpu", "labels_to_lists", "pic_graph", "distribute_singletons", "spherical_kmeans",
    "sample_centroids", "all_gather_varlen", "gather_assignments", "nmi", "compact_labels", "cluster_readable",
]


class Kmeans:
    """k-means on PCA-whitened, L2-normalised features (the DeepCluster clustering step)."""

    def __init__(self, k: int, backend: str = "auto", niter: int = 20, pca: int = 256,
                 device=None, seed: int | None = None, pca_solver: str = "auto"):
        if int(k) < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k, self.backend, self.niter, self.pca = int(k), backend, niter, pca
        self.device, self.seed, self.pca_solver = device, seed, pca_solver
        self.images_lists: list[list[int]] = []
        self.labels: np.ndarray | None = None
        self.centroids: torch.Tensor | None = None
        self.obj: list[float] = []
        self.nsplit = 0
        self.timings: dict[str, float] = {}

    def cluster(self, data, verbose: bool = False) -> float:
        """Cluster (N, D) features; fills ``images_lists`` and returns the k-means loss."""
        if data.shape[0] < self.k:
            raise ClusteringError(f"k={self.k} clusters requested but only {data.shape[0]} images "
                                  f"(k must be <= the number of images)")
        t0 = time.time()
        xb = preprocess_features(data, self.pca, backend=self.backend, device=self.device,
                                 pca_solver=self.pca_solver)
        check_not_collapsed(count_distinct_rows(xb), data.shape[0], self.k)
        t1 = time.time()
        res = _kmeans(xb, self.k, verbose=verbose, backend=self.backend, seed=self.seed,
                      niter=self.niter, device=self.device)
        self.labels = res["labels"].cpu().numpy()
        self.centroids = res["centroids"]  # (k, pca) final centroids (labels = nearest of them)
        self.obj, self.nsplit = [float(o) for o in res["obj"]], res["nsplit"]
        self.images_lists = labels_to_lists(self.labels, self.k)
        self.timings = {"pca": t1 - t0, "kmeans": time.time() - t1}
        if verbose:
            log.info("k-means time: %.1f s", time.time() - t0)
        return self.obj[-1]

    def cluster_shard(self, x: torch.Tensor, idx: torch.Tensor | None, n: int, rt=None, verbose: bool = False,
                      stats: dict | None = None) -> tuple[float, np.ndarray]:
        """Cluster the features of all ranks, each holding only its own rows (any world size).

        x (n_local, D): this rank's rows (host or device, any float dtype; never copied whole),
        ``idx`` (n_local,) int64 their dataset indices (None: x is the whole (n, D) matrix).
        Rows whose first value is NaN (images found unreadable, ``--bad_images skip``) are left
        out without copying the matrix and get the label -1. PCA: :func:`pca_fit_sharded`;
        k-means: :func:`kmeans_sharded` (``faiss`` on one process: the original's
        ``faiss.Clustering``; under torchrun: the same sharded Lloyd with faiss's search on
        each shard). Labels come back by one all-reduce of an (n,) int32 buffer. Every rank
        returns (loss, (n,) int64 labels) and fills ``images_lists``. Peak memory:
        :func:`cluster_peak_bytes`; ``stats`` receives the bytes of the buffers held per phase.
        """
        t0 = time.time()
        dev = _default_device(self.device)
        n_local, d = x.shape
        idx = torch.arange(n_local) if idx is None else torch.as_tensor(idx, dtype=torch.int64).cpu()
        nan = torch.isnan(x[:, 0]).cpu()                   # (n_local,) unreadable images
        n_bad = int(_all_reduce(nan.sum().reshape(1).to(torch.int64), rt))
        keep = None if n_bad == 0 else ~nan
        n_kept = n - n_bad
        if n_kept < self.k:
            raise ClusteringError(f"k={self.k} clusters requested but only {n_kept} images "
                                  f"(k must be <= the number of images)")
        kept_idx = idx if keep is None else idx[keep]
        if keep is None:
            pos = kept_idx
        else:  # position of each kept row among all kept images (dataset order): an (n,) int32 scan
            flags = torch.zeros(n, dtype=torch.int32)
            flags[kept_idx] = 1
            _all_reduce(flags, rt)
            pos = (torch.cumsum(flags, 0, dtype=torch.int32) - 1)[kept_idx].long()
            del flags
        seed = int(np.random.randint(1234)) if self.seed is None else self.seed
        stats = {} if stats is None else stats
        dim = min(self.pca, d)
        mean, proj = pca_fit_sharded(x, dim, rt, keep, pos, n_kept, self.pca_solver, dev, stats=stats)
        xb = pca_apply_kept(x, keep, mean, proj, dev)      # (n_kept_local, dim) float32
        check_not_collapsed(count_distinct_sharded(xb, self.k, rt), n_kept, self.k)
        t1 = time.time()
        backend = resolve_backend(self.backend, dev)
        if backend == "faiss" and not _distributed(rt):
            res = kmeans_faiss(xb.cpu().numpy(), self.k, niter=self.niter, seed=seed, verbose=verbose)
            stats["kmeans"] = 0
        else:
            res = kmeans_sharded(xb, self.k, niter=self.niter, seed=seed, verbose=verbose, rt=rt,
                                 pos=pos if _distributed(rt) or keep is not None else None, n=n_kept,
                                 assign=faiss_nearest if backend == "faiss" else None, stats=stats)
        # one collective: each rank writes label + 1 at its rows' dataset indices, zeros elsewhere
        buf = torch.zeros(n, dtype=torch.int32, device=rt.device if _distributed(rt) else dev)
        buf[kept_idx.to(buf.device)] = res["labels"].to(buf.device, torch.int32) + 1
        _all_reduce(buf, rt)
        labels = buf.cpu().numpy().astype(np.int64) - 1
        stats["exchange"] = buf.numel() * 4 + labels.nbytes + res["labels"].numel() * 8
        stats["shard"] = x.numel() * x.element_size()
        stats["xb"] = xb.numel() * 4
        stats["peak_bytes"] = stats["shard"] + max(stats["pca"], stats["xb"] + max(stats["kmeans"], stats["exchange"]))
        del buf, xb
        self.labels = labels
        self.centroids = res["centroids"]
        self.obj, self.nsplit = [float(o) for o in res["obj"]], res["nsplit"]
        self.images_lists = labels_to_lists(labels, self.k)
        self.timings = {"pca": t1 - t0, "kmeans": time.time() - t1}
        if verbose:
            log.info("k-means time: %.1f s", time.time() - t0)
        return self.obj[-1], labels


# ---------------------------------------------------------------------------------------
# pseudo-labelled datasets
# ---------------------------------------------------------------------------------------
def compact_labels(images_lists: Sequence[Sequence[int]], n: int | None = None) -> np.ndarray:
    """(N,) pseudo-label per image, empty clusters compacted out; -1 for unassigned images."""
    if n is None:
        n = 1 + max((max(lst) for lst in images_lists if len(lst)), default=-1)
    labels = np.full(n, -1, dtype=np.int64)
    c = 0
    for lst in images_lists:
        if len(lst):
            labels[np.asarray(lst, dtype=np.int64)] = c
            c += 1
    return labels


class ReassignedDataset(Dataset):
    """Dataset indexed like the base dataset, each sample labelled with its pseudo-label.

    Item ``idx`` is ``(image, pseudo_label, idx)``: the sampler draws dataset indices, so a
    cluster-balanced sampler really serves balanced clusters (the paper's intent).
    """

    def __init__(self, labels: np.ndarray, dataset, transform=None):
        self.labels = np.asarray(labels, dtype=np.int64)
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, item):
        idx, seed = _split_item(item)
        img = _load(self.dataset, idx)
        return _apply(self.transform, img, seed), int(self.labels[idx]), idx


class OrderedReassignedDataset(Dataset):
    """The original's relabelled dataset: position p holds the p-th image in cluster order.

    Combined with a sampler that returns *dataset* indices (as the original's), position
    and image disagree and the per-cluster balance is lost. Kept only to reproduce the
    published runs (``--sampler original``).
    """

    def __init__(self, images_lists: Sequence[Sequence[int]], dataset, transform=None):
        labels = compact_labels(images_lists, None)
        self.image_indexes = np.concatenate([np.asarray(l, dtype=np.int64) for l in images_lists if len(l)])
        self.pseudolabels = labels[self.image_indexes]
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.image_indexes)

    def __getitem__(self, item):
        pos, seed = _split_item(item)
        idx = int(self.image_indexes[pos])
        img = _load(self.dataset, idx)
        return _apply(self.transform, img, seed), int(self.pseudolabels[pos]), idx


def _split_item(item) -> tuple[int, int | None]:
    """A sampler item is an index, or (index, augmentation seed) (see util.SeededShardSampler)."""
    if isinstance(item, (tuple, list)):
        return int(item[0]), int(item[1])
    return int(item), None


def _load(dataset, idx: int):
    return dataset.load(idx) if hasattr(dataset, "load") else dataset[idx][0]


def _apply(transform, img, seed: int | None):
    """Apply the (random) transform; with a seed, its draws depend on that seed alone, so a
    sample's augmentation is the same whatever the worker, the world size or a restart."""
    if transform is None:
        return img
    if seed is None:
        return transform(img)
    with torch.random.fork_rng(devices=[]):
        # the CPU generator only: torch.manual_seed would also queue a CUDA re-seed (with a
        # recorded stack trace, ~8 ms and a never-freed entry per sample when CUDA is unused)
        torch.random.default_generator.manual_seed(seed)
        return transform(img)


def cluster_assign(images_lists: Sequence[Sequence[int]], dataset, transform=None,
                   order: str = "index") -> Dataset:
    """Pseudo-labelled training set from ``images_lists`` (empty clusters compacted out).

    ``order='index'`` (default) indexes by dataset index; ``order='cluster'`` reproduces the
    original's cluster-ordered dataset (see :class:`OrderedReassignedDataset`).
    """
    if order == "cluster":
        return OrderedReassignedDataset(images_lists, dataset, transform)
    if order != "index":
        raise ValueError(f"order must be 'index' or 'cluster', got {order!r}")
    return ReassignedDataset(compact_labels(images_lists, len(dataset)), dataset, transform)


def arrange_clustering(images_lists: Sequence[Sequence[int]]) -> np.ndarray:
    """``images_lists`` -> (N,) cluster index of each image (original cluster ids, not compacted)."""
    idx = np.concatenate([np.asarray(l, dtype=np.int64) for l in images_lists]) if images_lists else np.zeros(0, np.int64)
    lab = np.concatenate([np.full(len(l), c, dtype=np.int64) for c, l in enumerate(images_lists)]) if images_lists else idx
    out = np.empty(len(idx), dtype=np.int64)
    out[idx] = lab
    return out


def nmi(a: np.ndarray, b: np.ndarray) -> float:
    """Normalised mutual information of two assignments, I(A;B) / sqrt(H(A) H(B)), over the
    images that have a label in both (-1: no cluster)."""
    from sklearn.metrics import normalized_mutual_info_score
    keep = (np.asarray(a) >= 0) & (np.asarray(b) >= 0)
    return float(normalized_mutual_info_score(np.asarray(a)[keep], np.asarray(b)[keep], average_method="geometric"))


def cluster_readable(clusterer, features, verbose: bool = False) -> tuple[float, list[list[int]], np.ndarray]:
    """Cluster the rows of ``features`` (N, D) that are not marked unreadable (NaN rows).

    Returns (loss, images_lists in dataset indices, (N,) cluster id per image, -1 for the
    unreadable ones)."""
    col = features[:, 0]
    nan = np.isnan(col) if isinstance(col, np.ndarray) else torch.isnan(col).cpu().numpy()
    if not nan.any():
        loss = float(clusterer.cluster(features, verbose=verbose))
        return loss, clusterer.images_lists, arrange_clustering(clusterer.images_lists)
    kept = np.flatnonzero(~nan)
    rows = kept if isinstance(features, np.ndarray) else torch.as_tensor(kept, device=features.device)
    loss = float(clusterer.cluster(features[rows], verbose=verbose))
    lists = [kept[np.asarray(lst, dtype=np.int64)].tolist() for lst in clusterer.images_lists]
    labels = np.full(len(features), -1, dtype=np.int64)
    for c, lst in enumerate(lists):
        labels[lst] = c
    return loss, lists, labels
