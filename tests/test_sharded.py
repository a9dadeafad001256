"""Sharded clustering (issue 21): each rank keeps only its rows; same result as one process."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import clustering
import distributed
from test_distributed import free_port

N, D, K, PCA = 600, 64, 8, 16  # N >= D: the covariance path, no rank ever holds (N, D)


def blobs(n: int = N, d: int = D, k: int = K, seed: int = 0) -> np.ndarray:
    """Well-separated clusters: the nearest centroid of every row wins by a wide margin, so a
    centroid moved by float summation order (<< 1e-6) cannot flip an assignment."""
    rng = np.random.RandomState(seed)
    centres = rng.randn(k, d) * 4
    # noise of distinct variances per axis: every PCA axis, not only the k - 1 between the
    # centres, is well defined (a near-degenerate eigenvalue pair would turn with any rounding)
    x = centres[rng.randint(0, k, n)] + rng.randn(n, d) * np.linspace(2.0, 0.5, d)
    x[[5, 321]] = np.nan  # two unreadable images (--bad_images skip): left out, label -1
    return x.astype(np.float32)


def run_shard(x: np.ndarray, rt, backend: str, idx=None, stats=None) -> tuple[float, np.ndarray]:
    km = clustering.Kmeans(K, backend=backend, pca=PCA, seed=7, device="cpu")
    rows = torch.from_numpy(x) if idx is None else torch.from_numpy(x)[idx]
    return km.cluster_shard(rows, idx, len(x), rt, stats=stats)


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    rt = distributed.init_runtime("cpu")
    x = blobs()
    idx = torch.arange(rank, N, world)  # main.py's share: images r, r + W, ...
    stats: dict = {}
    res = {"torch": run_shard(x, rt, "torch", idx, stats), "faiss": run_shard(x, rt, "faiss", idx),
           "stats": stats, "n_local": len(idx)}
    torch.save(res, f"{out}.{rank}")
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("world", [3])  # 2 processes: through main.py below
def test_sharded_kmeans_matches_one_process(tmp_path, world):
    x = blobs()
    one = {b: run_shard(x, None, b) for b in ("torch", "faiss")}
    mp.spawn(_worker, args=(world, free_port(), str(tmp_path / "r")), nprocs=world)
    for rank in range(world):
        r = torch.load(tmp_path / f"r.{rank}", weights_only=False)
        loss, labels = r["torch"]
        assert labels.tolist() == one["torch"][1].tolist()  # the same labels, not just the same partition
        assert loss == pytest.approx(one["torch"][0], rel=1e-6)  # PCA and sums in another order
        assert labels[5] == labels[321] == -1 and (labels[labels >= 0] < K).all()
        assert r["faiss"][0] == pytest.approx(one["faiss"][0], rel=5e-3)  # faiss: its own init on one process
        # the peak the formula predicts is the bytes this rank's buffers held (no (N, D) buffer among them)
        s = r["stats"]
        assert s["peak_bytes"] == clustering.cluster_peak_bytes(N, r["n_local"], D, K, PCA, 4)
        assert s["shard"] == r["n_local"] * D * 4 and s["pca"] == D * D * 8
