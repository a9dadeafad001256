"""DeepCluster-v2's clustering: spherical k-means on a memory bank sharded over the ranks
(facebookresearch/swav main_deepclusterv2.py ``cluster_memory``, written anew)."""
from __future__ import annotations

import numpy as np
import torch

from cluster_util import ClusteringError, _all_reduce, _broadcast, _distributed, _row_chunk
from kmeans import cluster_sums, split_empty_clusters


def all_gather_varlen(t: torch.Tensor, rt=None) -> torch.Tensor:
    """Concatenation over the ranks of ``rt`` (rank order) of each rank's ``t`` (n_r, ...);
    n_r may differ. ``t`` lives on ``rt.device`` (NCCL gathers device tensors)."""
    if not _distributed(rt):
        return t
    world = rt.world_size
    n = torch.tensor([t.shape[0]], dtype=torch.long, device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    torch.distributed.all_gather(sizes, n)
    sizes = [int(s.item()) for s in sizes]
    pad = t.new_zeros((max(sizes),) + tuple(t.shape[1:]))
    pad[:t.shape[0]] = t
    out = [torch.empty_like(pad) for _ in range(world)]
    torch.distributed.all_gather(out, pad)
    return torch.cat([o[:s] for o, s in zip(out, sizes)])


def sample_centroids(x: torch.Tensor, k: int, seed: int, index: torch.Tensor | None = None, rt=None) -> torch.Tensor:
    """(k, d) initial centroids: k distinct rows of the bank drawn at random, the same on every rank.

    ``index=None`` (swav): rank 0 draws k of *its own* rows (``randperm`` of a generator
    seeded with ``seed``) and broadcasts them. With ``index`` (the dataset index of each
    local row), the k rows are drawn among all ranks' rows by dataset index, so the draw does
    not depend on how the bank is sharded (the world size). Raises ClusteringError when the
    bank holds fewer than k rows.
    """
    g = torch.Generator().manual_seed(int(seed))
    if index is None:
        rank0 = not _distributed(rt) or rt.rank == 0
        c = torch.empty(k, x.shape[1], dtype=x.dtype, device=x.device)
        if rank0:
            if x.shape[0] < k:
                raise ClusteringError(f"the memory bank of rank 0 holds {x.shape[0]} rows, fewer than "
                                      f"{k} clusters: reduce --nmb_prototypes or use more images")
            c = x[torch.randperm(x.shape[0], generator=g)[:k].to(x.device)].clone()
        return _broadcast(c, rt)
    all_idx = torch.sort(all_gather_varlen(index.to(x.device).long(), rt))[0].cpu()  # (N_bank,)
    if len(all_idx) < k:
        raise ClusteringError(f"the memory bank holds {len(all_idx)} rows, fewer than {k} clusters: "
                              f"reduce --nmb_prototypes or use more images")
    chosen = all_idx[torch.randperm(len(all_idx), generator=g)[:k]]                 # (k,) dataset indexes
    # each rank writes the chosen rows it holds; the sum over ranks assembles them
    where = {int(i): j for j, i in enumerate(chosen.tolist())}
    c = torch.zeros(k, x.shape[1], dtype=x.dtype, device=x.device)
    local = [(r, where[i]) for r, i in enumerate(index.cpu().tolist()) if i in where]
    if local:
        rows, slots = zip(*local)
        c[torch.tensor(slots, device=x.device)] = x[torch.tensor(rows, device=x.device)]
    return _all_reduce(c, rt)


def assign_nearest(x: torch.Tensor, centroids: torch.Tensor, block: int | None = None) -> torch.Tensor:
    """(n,) int64 index of the centroid of largest dot product for each row of ``x`` (n, d),
    ``centroids`` (k, d), computed by blocks of ``block`` rows (default: a (block, k) float32
    score block of about 256 MiB, at least 256 rows), so the (n, k) score matrix never exists.

    Each row's scores are the same dot products as in the whole ``x @ centroids.T`` (the
    k-loop of a row does not depend on the rows around it on the CPU: bitwise equal, tested;
    cuBLAS may choose another reduction split for another block height, which can move a score
    by an ulp and flip an exact tie)."""
    n = x.shape[0]
    out = torch.empty(n, dtype=torch.long, device=x.device)
    step = block or _row_chunk(centroids.shape[0])
    ct = centroids.t()
    for s in range(0, n, step):
        torch.argmax(x[s:s + step] @ ct, dim=1, out=out[s:s + step])
    return out


def spherical_kmeans(x: torch.Tensor, k: int, niter: int = 10, centroids: torch.Tensor | None = None,
                     seed: int = 0, index: torch.Tensor | None = None,
                     reassign_empty: bool = False, rt=None) -> tuple[torch.Tensor, torch.Tensor]:
    """swav's distributed spherical k-means on this rank's shard ``x`` (n_local, d), unit rows.

    Initial centroids: ``centroids`` or :func:`sample_centroids` (``seed``, ``index``). Then
    ``niter`` times: assign each row to the centroid of largest dot product; per-cluster sums
    and counts, all-reduced over the ranks of ``rt`` (:func:`cluster_sums`, float64: the same
    sums whatever the sharding); each centroid
    with members becomes the L2-normalised mean, an empty one keeps its previous value
    (swav), or with ``reassign_empty`` is re-seeded by splitting a populated cluster as
    faiss does (same draws on every rank). A last assignment follows the last update.
    Returns (centroids (k, d), local assignments (n_local,) int64).
    """
    if centroids is None:
        centroids = sample_centroids(x, k, seed, index, rt)
    centroids = centroids.to(device=x.device, dtype=x.dtype).clone()
    rng = np.random.RandomState(int(seed) % (2 ** 32))
    n_total = int(_all_reduce(torch.tensor([x.shape[0]], dtype=torch.long, device=x.device), rt).item())
    for it in range(niter + 1):
        assign = assign_nearest(x, centroids)                                         # (n_local,)
        if it == niter:
            break
        sums, counts = cluster_sums(x, assign, k, rt)                                 # (k, d) f64, (k,)
        mask = counts > 0
        centroids[mask] = (sums[mask] / counts[mask].unsqueeze(1)).to(centroids.dtype)
        if reassign_empty:
            split_empty_clusters(centroids, counts, n_total, rng)
        centroids = torch.nn.functional.normalize(centroids, dim=1, p=2)
    return centroids, assign


def gather_assignments(local_assign: torch.Tensor, local_index: torch.Tensor, n: int,
                       fill: int = -100, rt=None) -> torch.Tensor:
    """(n,) int64 label of every dataset index from every rank's (assignments, indexes);
    indexes no rank holds get ``fill`` (swav: -100, the loss's ignore_index)."""
    labels = torch.full((n,), fill, dtype=torch.long)
    idx = all_gather_varlen(local_index.long(), rt).cpu()
    lab = all_gather_varlen(local_assign.long(), rt).cpu()
    labels[idx] = lab
    return labels
