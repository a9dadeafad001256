"""k-means with faiss's semantics (the second half of DeepCluster's clustering step):
faiss itself, the same Lloyd algorithm in PyTorch (CPU or CUDA, no faiss-gpu needed), and
its sharded form where each rank holds only its own rows (one code path for any world size)."""
from __future__ import annotations

import logging

import numpy as np
import torch

from cluster_util import (ClusteringError, _all_reduce, _broadcast, _default_device, _distributed, _row_chunk,
                          faiss, faiss_has_gpu, resolve_backend)
from pca import PCA_BLOCK, to_device_blocks

log = logging.getLogger("deepcluster")

SPLIT_EPS = 1.0 / 1024.0  # faiss's relative perturbation when splitting a centroid


def nearest_centroid(x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact L2 search: x (N, d), c (k, d) -> (labels (N,) int64, squared distances (N,))."""
    c_sq = (c * c).sum(1)                                  # (k,)
    labels = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    dists = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    step = _row_chunk(c.shape[0])
    for s in range(0, x.shape[0], step):
        xb = x[s:s + step]
        # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2, the first term added after the argmin
        d = torch.addmm(c_sq, xb, c.T, beta=1.0, alpha=-2.0)  # (rows, k)
        dmin, amin = d.min(1)
        labels[s:s + step] = amin
        dists[s:s + step] = (dmin + (xb * xb).sum(1)).clamp_min(0)
    return labels, dists


def split_empty_clusters(centroids: torch.Tensor, counts: torch.Tensor, n: int,
                         rng: np.random.RandomState) -> int:
    """Re-seed empty clusters in place, as faiss does; returns the number of splits.

    Each empty cluster ci takes the centroid of a cluster cj drawn with probability
    proportional to (count_j - 1); both are pushed apart by a symmetric relative
    perturbation of 1/1024 on alternate coordinates, and cj's count is shared between them.
    """
    k, d = centroids.shape
    counts_np = counts.detach().cpu().numpy().astype(np.float64)
    empty = np.flatnonzero(counts_np == 0)
    if len(empty) == 0:
        return 0
    sign = torch.ones(d, device=centroids.device)
    sign[1::2] = -1                                          # +, -, +, - ...
    nsplit = 0
    for ci in empty:
        weights = np.maximum(counts_np - 1.0, 0.0)
        if weights.sum() <= 0:  # every cluster holds <= 1 point: nothing can be split
            break
        cj = int(rng.choice(k, p=weights / weights.sum()))
        centroids[ci] = centroids[cj] * (1 + SPLIT_EPS * sign)
        centroids[cj] = centroids[cj] * (1 - SPLIT_EPS * sign)
        counts_np[ci] = counts_np[cj] / 2  # faiss keeps fractional counts (float hassign)
        counts_np[cj] -= counts_np[ci]
        nsplit += 1
    return nsplit


def kmeans_torch(x: torch.Tensor, k: int, niter: int = 20, seed: int = 1234,
                 verbose: bool = False) -> dict:
    """Lloyd's k-means with faiss's semantics, in PyTorch, on ``x``'s device.

    x: (N, d) float32. Returns a dict with ``centroids`` (k, d), ``labels`` (N,) = nearest
    final centroid, ``obj`` (niter,) per-iteration objective (sum of squared distances to
    the centroids in force at that iteration, as faiss's iteration_stats) and ``nsplit``.
    The one-process case of :func:`kmeans_sharded` (same code, no collective).
    """
    return kmeans_sharded(x, k, niter=niter, seed=seed, verbose=verbose)


def kmeans_faiss(x: np.ndarray, k: int, niter: int = 20, seed: int = 1234, verbose: bool = False) -> dict:
    """The original's k-means call, through faiss (GPU flat index when available)."""
    n, d = x.shape
    if n < k:
        raise ClusteringError(f"k-means: {n} points cannot make {k} clusters (k must be <= N)")
    x = np.ascontiguousarray(x, dtype=np.float32)
    clus = faiss.Clustering(d, k)
    clus.seed = int(seed)
    clus.niter = niter
    clus.max_points_per_centroid = 10_000_000  # never subsample (the original's setting)
    clus.min_points_per_centroid = 1  # only silences faiss's "please provide more points" warning
    clus.verbose = verbose
    if faiss_has_gpu():
        res = faiss.StandardGpuResources()
        cfg = faiss.GpuIndexFlatConfig()
        cfg.useFloat16 = False
        index = faiss.GpuIndexFlatL2(res, d, cfg)
    else:
        index = faiss.IndexFlatL2(d)
    clus.train(x, index)
    _, labels = index.search(x, 1)
    stats = clus.iteration_stats
    obj = [stats.at(i).obj for i in range(stats.size())]
    centroids = faiss.vector_float_to_array(clus.centroids).reshape(k, d)
    nsplit = sum(stats.at(i).nsplit for i in range(stats.size()))
    return {"centroids": torch.from_numpy(centroids), "labels": torch.from_numpy(labels[:, 0].astype(np.int64)),
            "obj": obj, "nsplit": int(nsplit)}


def run_kmeans(x, nmb_clusters: int, verbose: bool = False, backend: str = "auto",
               seed: int | None = None, niter: int = 20, device=None) -> tuple[list[int], float]:
    """Original API: k-means on preprocessed (N, d) data -> (labels as list, final objective)."""
    res = _kmeans(x, nmb_clusters, verbose=verbose, backend=backend, seed=seed, niter=niter, device=device)
    return res["labels"].cpu().tolist(), res["obj"][-1]


def _kmeans(x, k: int, verbose=False, backend="auto", seed=None, niter=20, device=None) -> dict:
    if seed is None:
        seed = int(np.random.randint(1234))  # the original draws a fresh seed per call
    is_tensor = isinstance(x, torch.Tensor)
    dev = _default_device(device)  # the run's device, not the data's
    backend = resolve_backend(backend, dev)
    if backend == "faiss":
        xn = x.detach().cpu().numpy() if is_tensor else x
        return kmeans_faiss(xn, k, niter=niter, seed=seed, verbose=verbose)
    return kmeans_torch(to_device_blocks(x, dev), k, niter=niter, seed=seed, verbose=verbose)


def count_distinct_rows(x) -> int:
    """Number of distinct rows of (N, d) data, via a random projection (exact with
    probability 1 for distinct rows; O(N d) instead of sorting whole rows)."""
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
    g = torch.Generator(device="cpu").manual_seed(0)
    r = torch.randn(t.shape[1], 2, generator=g, dtype=torch.float64).to(t.device)
    step = _row_chunk(t.shape[1])
    # (N, 2) projections, block by block: no float64 copy of the whole matrix
    proj = torch.cat([t[s:s + step].double() @ r for s in range(0, t.shape[0], step)]).cpu().numpy()
    return int(len(np.unique(proj, axis=0)))


def check_not_collapsed(n_distinct: int, n: int, k: int) -> None:
    """k-means needs at least k distinct points: a :class:`ClusteringError` saying why otherwise."""
    if n_distinct < k:
        raise ClusteringError(
            f"the features hold only {n_distinct} distinct point(s) among {n} images, fewer "
            f"than k={k}: the network's features have collapsed (or the images are duplicates); "
            f"lower --k or restart from an earlier checkpoint")


# ---------------------------------------------------------------------------------------
# sharded k-means: each rank holds only the rows it extracted
# ---------------------------------------------------------------------------------------
def cluster_sums(x: torch.Tensor, assign: torch.Tensor, k: int, rt=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-cluster sums and sizes over every rank's rows: the one reduction of a sharded Lloyd step.

    x (n_local, d) float rows of this rank, assign (n_local,) int64 cluster of each row.
    Returns ``sums`` (k, d) float64 and ``counts`` (k,) int64, all-reduced (every rank gets the
    totals). Rows are summed in float64 (upcast one block at a time), so the order in which
    ranks, blocks or atomics add them moves a sum by at most ~n_c * 2**-53 of its magnitude
    (see :func:`kmeans_sharded`).
    """
    n, d = x.shape
    sums = torch.zeros(k, d, dtype=torch.float64, device=x.device)
    step = _row_chunk(d, PCA_BLOCK)
    for s in range(0, n, step):
        sums.index_add_(0, assign[s:s + step], x[s:s + step].double())
    counts = torch.bincount(assign, minlength=k)
    _all_reduce(sums, rt)
    _all_reduce(counts, rt)
    return sums, counts


def count_distinct_sharded(xb: torch.Tensor, k: int, rt=None) -> int:
    """Distinct rows over every rank's ``xb`` (n_local, d), exact when below ``k``; else a
    number >= k (all a collapse check needs). When every rank holds fewer than k distinct
    rows, their keys ((< k, 2) each) are all-gathered: O(W k), never O(N)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    r = torch.randn(xb.shape[1], 2, generator=g, dtype=torch.float64).to(xb.device)
    step = _row_chunk(xb.shape[1])
    keys = np.unique(torch.cat([xb[s:s + step].double() @ r for s in range(0, xb.shape[0], step)]).cpu().numpy()
                     if len(xb) else np.zeros((0, 2)), axis=0)
    most = _all_reduce(torch.tensor([len(keys)], dtype=torch.int64), rt, op="max")
    if int(most) >= k or not _distributed(rt):
        return len(keys) if not _distributed(rt) else int(most)
    import torch.distributed as dist
    pad = torch.full((k, 2), float("nan"), dtype=torch.float64)
    pad[:len(keys)] = torch.from_numpy(keys)
    pad = pad.to(rt.device)
    parts = [torch.empty_like(pad) for _ in range(rt.world_size)]
    dist.all_gather(parts, pad)
    allk = torch.cat(parts).cpu().numpy()
    return int(len(np.unique(allk[~np.isnan(allk[:, 0])], axis=0)))


def _init_centroids(x: torch.Tensor, pos: torch.Tensor, init: torch.Tensor, rt) -> torch.Tensor:
    """(k, d) rows of global positions ``init`` (k,), each taken from the rank holding it."""
    if not _distributed(rt) and pos is None:
        return x[init].clone()
    k = len(init)
    sorted_init, slot = init.sort()
    j = torch.searchsorted(sorted_init, pos).clamp_max(k - 1)
    hit = sorted_init[j] == pos                          # (n_local,) rows that start a centroid
    centroids = torch.zeros(k, x.shape[1], dtype=x.dtype, device=x.device)
    centroids[slot[j[hit]]] = x[hit]
    return _all_reduce(centroids, rt)                    # one non-zero term per centroid: exact


def faiss_nearest(x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`nearest_centroid` through a faiss flat L2 index (GPU when faiss has one)."""
    d = c.shape[1]
    if faiss_has_gpu():
        cfg = faiss.GpuIndexFlatConfig()
        cfg.useFloat16 = False
        index = faiss.GpuIndexFlatL2(faiss.StandardGpuResources(), d, cfg)
    else:
        index = faiss.IndexFlatL2(d)
    index.add(np.ascontiguousarray(c.detach().cpu().numpy(), dtype=np.float32))
    dist_, lab = index.search(np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32), 1)
    return (torch.from_numpy(lab[:, 0].astype(np.int64)).to(x.device),
            torch.from_numpy(dist_[:, 0]).to(x.device))


def kmeans_sharded(x: torch.Tensor, k: int, niter: int = 20, seed: int = 1234, verbose: bool = False,
                   rt=None, pos: torch.Tensor | None = None, n: int | None = None,
                   assign=None, stats: dict | None = None) -> dict:
    """Lloyd's k-means with faiss's semantics over rows spread across ranks.

    x (n_local, d) float32: this rank's rows; ``pos`` (n_local,) int64 their global positions
    among the ``n`` rows of all ranks (None: one process, x is everything). Every rank takes
    the same decisions: the k initial centroids are the rows at ``randperm(n)[:k]`` of a
    generator seeded with ``seed`` (the one-process draw), each assignment is local
    (``assign``, default :func:`nearest_centroid`), per-cluster sums and sizes are
    all-reduced (:func:`cluster_sums`), empty clusters are split from the all-reduced sizes
    with a numpy RNG seeded alike, and rank 0's centroids are broadcast after every update.

    Same result as one process: the sums are float64, so the order of summation (ranks,
    blocks, atomics) moves a sum of n_c unit rows by at most about n_c * 2**-53 * n_c, i.e. a
    centroid coordinate by ~n_c * 1.1e-16 (1e-10 for a million rows) before it is rounded to
    float32, whose spacing near 1 is 6e-8: the float32 centroid is the same or one ulp away
    (when the float64 value falls within that bound of a rounding boundary). An assignment
    can then flip only for a row whose two nearest centroids are within ~1e-7 of each other
    in squared distance; on data without such near-ties the labels equal the one-process run's.
    Returns ``centroids`` (k, d), local ``labels`` (n_local,), ``obj`` (niter,) all-reduced,
    ``nsplit``. ``stats`` receives ``kmeans_bytes``: the largest sum of the buffers held
    here (see :func:`cluster_peak_bytes`).
    """
    n_local, d = x.shape
    n = n_local if n is None else int(n)
    if n < k:
        raise ClusteringError(f"k-means: {n} points cannot make {k} clusters (k must be <= N)")
    assign = assign or nearest_centroid
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    perm = torch.randperm(n, generator=gen)             # (n,) int64: the one-process draw
    init = perm[:k].to(x.device)
    held = perm.numel() * 8 + k * d * 4
    del perm
    centroids = _init_centroids(x, None if pos is None else pos.to(x.device), init, rt)
    rng = np.random.RandomState(int(seed) % (2 ** 32))
    obj, nsplit = [], 0
    for it in range(niter):
        labels, dists = assign(x, centroids)
        obj.append(float(_all_reduce(dists.sum(dtype=torch.float64).reshape(1), rt)))
        sums, counts = cluster_sums(x, labels, k, rt)
        held = max(held, sum(t.numel() * t.element_size() for t in (labels, dists, centroids, sums, counts)))
        nonempty = counts > 0
        centroids[nonempty] = (sums[nonempty] / counts[nonempty, None]).float()
        del sums
        nsplit += split_empty_clusters(centroids, counts, n, rng)
        _broadcast(centroids, rt)  # guards against a backend whose all-reduce differs by rank
        if verbose:
            log.info("k-means iter %d/%d objective %.4f", it + 1, niter, obj[-1])
    labels, _ = assign(x, centroids)
    if stats is not None:
        stats["kmeans"] = held
    return {"centroids": centroids, "labels": labels, "obj": obj, "nsplit": nsplit}


def cluster_peak_bytes(n: int, n_local: int, d: int, k: int, pca: int, element_size: int) -> int:
    """Bytes one rank holds at the peak of the sharded clustering step (:meth:`Kmeans.cluster_shard`).

    ``n`` images in all, ``n_local`` on this rank, D-dim features of ``element_size`` bytes,
    k clusters, PCA to p = min(pca, D). The rank keeps its shard S = n_local D b throughout;
    on top of it, the largest of:

    * PCA: the float64 (D, D) covariance, 8 D^2 (n < D: the n kept rows, 4 n D < 4 D^2);
    * k-means, beside the (n_local, p) float32 whitened rows X = 4 n_local p, the largest of:
      the initial draw ``randperm(n)`` (8 n) with the float32 centroids (4 k p); one Lloyd
      iteration: centroids, float64 sums and int64 sizes (12 k p + 8 k), int64 labels and
      float32 distances of the rows (12 n_local); the label exchange: an (n,) int32 buffer
      and the int64 labels (4 n + 8 n), with the local labels (8 n_local).

    ::

        peak = S + max(8 D^2, X + max(8 n + 4 k p, 12 k p + 8 k + 12 n_local, 12 n + 8 n_local))

    Not counted: block temporaries of fixed size (row blocks of 2**25 values, 2**26 in the
    covariance pass, the (rows, k)
    distance block of :func:`nearest_centroid`, 2**26 values), the eigensolver's float32
    (D, D) copy on rank 0 (4 D^2, 64 MiB at D = 4096).

    Examples (D = 4096, p = 256, shards of ceil(n / W) rows, ``cluster_peak_bytes(...) / 2**30``):

    ========================================  ========  =========  ===================
    run                                        float32   float16   gather, on rank 0
    ========================================  ========  =========  ===================
    ImageNet, n = 1,281,167, W = 8, k = 10^4   2.63 GiB  1.41 GiB  22.0 / 11.0 GiB
    YFCC100M, n = 95.9 M, W = 64, k = 10^4     25.4 GiB  13.9 GiB  1.60 / 0.80 TB
    YFCC100M, n = 95.9 M, W = 64, k = 10^5     25.4 GiB  13.9 GiB  1.60 / 0.80 TB
    ========================================  ========  =========  ===================

    The shard is 2.44 / 1.22 GiB (ImageNet) and 22.9 / 11.4 GiB (YFCC100M) of these, in host
    RAM unless ``--features_on device`` (the GPU then holds 0.18 / 2.51 GiB: the rest); at
    YFCC100M scale the label exchange (12 n = 1.07 GiB) outweighs the k terms (12 k p = 0.29
    GiB at k = 10^5), so both k give the same peak: every rank fits a GPU of 80 GB with room
    for the network, the gather does not fit any.
    """
    p = min(pca, d)
    shard = n_local * d * element_size
    pca_b = 8 * d * d if n >= d else 4 * n * d
    x = 4 * n_local * p
    init = 8 * n + 4 * k * p
    lloyd = 12 * k * p + 8 * k + 12 * n_local
    exchange = 12 * n + 8 * n_local
    return shard + max(pca_b, x + max(init, lloyd, exchange))
