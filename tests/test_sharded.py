"""Sharded clustering (issue 21): each rank keeps only its rows; same result as one process."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import clustering
import deepcluster as dc
import distributed
import file_list
from test_distributed import digits100, free_port  # noqa: F401 (fixture)

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


SPY_MAIN = """import sys
sys.path.insert(0, {root!r})
import distributed


def refuse(*args, **kwargs):
    raise AssertionError("distributed.gather_rows called: the k-means features were gathered")


distributed.gather_rows = refuse  # k-means is sharded: no rank ever receives another rank's rows
import main
sys.exit(main.run(sys.argv[1:]))
"""


def run_spied(nproc: int, argv: list[str], tmp_path) -> None:
    import subprocess
    import sys

    from test_distributed import ROOT
    spy = tmp_path / "spy_main.py"
    spy.write_text(SPY_MAIN.format(root=str(ROOT)))
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", str(spy), *argv]
    res = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


@pytest.mark.slow
def test_main_sharded_epoch_equals_one_process_and_resumes_on_three(digits100, tmp_path):
    import shutil

    import checkpoint
    import fileio
    import main
    from test_distributed import train_argv

    # the same feature batches in every process (4 images), so the features are the same; train_argv has the
    # torch k-means (faiss on one process is the original's faiss.Clustering, whose draws no shard replays);
    # 24 draws (2 steps of 12, a multiple of 2 and 3) of training: the test is about the clustering
    argv = lambda exp, epochs: train_argv(digits100, exp, epochs) + [  # noqa: E731
        "--extract_batch", "4", "--reassign", "0.24", "--batch", "12"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main.run(argv(one, 1)) == 0
    run_spied(2, argv(two, 1), tmp_path)
    a, b = checkpoint.ClusterLog(one / "clusters").load(0), checkpoint.ClusterLog(two / "clusters").load(0)
    assert a.tolist() == b.tolist()
    ra, rb = fileio.read_jsonl(one / "log.jsonl")[0], fileio.read_jsonl(two / "log.jsonl")[0]
    assert rb["world_size"] == 2 and rb["clustering_loss"] == pytest.approx(ra["clustering_loss"], rel=1e-6)
    # the 1-process checkpoint continues on 3 processes: epoch 1 clusters as a 1-process resume does
    three = tmp_path / "three"
    shutil.copytree(one, three)
    run_spied(3, argv(three, 2) + ["--resume", str(three)], tmp_path)
    assert main.run(argv(one, 2) + ["--resume", str(one)]) == 0
    a, b = checkpoint.ClusterLog(one / "clusters").load(1), checkpoint.ClusterLog(three / "clusters").load(1)
    assert a.tolist() == b.tolist()
    assert fileio.read_jsonl(three / "log.jsonl")[-1]["world_size"] == 3


def test_file_list_index_and_resume_check(tmp_path):
    import argparse

    import checkpoint
    import data

    listing = tmp_path / "list.txt"
    listing.write_text("a/x 1.jpg\tcat\r\n/abs/y.jpg\tdog\n\nb/z.jpg\tcat")  # CRLF, a blank line, no final newline
    fl = file_list.FileList(listing)
    assert list(fl) == [str(tmp_path / "a/x 1.jpg"), "/abs/y.jpg", str(tmp_path / "b/z.jpg")]
    assert fl.labels.tolist() == [0, 1, 0] and fl.classes == ["cat", "dog"]
    assert isinstance(fl.blob, np.ndarray) and fl.select([2])[0] == str(tmp_path / "b/z.jpg")
    assert list(file_list.FileList(listing, root="/data"))[0] == "/data/a/x 1.jpg"  # DIR is the root when given
    (tmp_path / "half.txt").write_text("a.jpg\tq\nb.jpg\n")
    with pytest.raises(data.DataError, match="entry 2"):
        file_list.FileList(tmp_path / "half.txt")
    # a checkpoint trained on one list refuses another list (or a folder)
    ckpt = {"state_dict": {}, "args": {"file_list_sha256": fl.sha256}}
    same = argparse.Namespace(arch="alexnet", sobel=False, nmb_cluster=10, file_list=str(listing),
                              file_list_sha256=fl.sha256)
    dc.check_checkpoint(ckpt, "c.pth", same, 3)
    other = argparse.Namespace(**{**vars(same), "file_list_sha256": "0" * 64})
    with pytest.raises(checkpoint.CheckpointError, match="--file_list"):
        dc.check_checkpoint(ckpt, "c.pth", other, 3)
