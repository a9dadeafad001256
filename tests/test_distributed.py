"""Multi-process DeepCluster on CPU with gloo (2 processes on one machine)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from sklearn.metrics import adjusted_rand_score

import util
from conftest import digits_subset

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def digits100(tmp_path_factory, digits_dir) -> str:
    return digits_subset(digits_dir, tmp_path_factory.mktemp("d100") / "digits", 10)


def train_argv(data: str, exp: Path, epochs: int) -> list[str]:
    return [data, "--exp", str(exp), "--size", "64", "--k", "10", "--pca", "32", "--batch", "16",
            "--workers", "0", "--epochs", str(epochs), "--sobel", "--no_progress", "--checkpoints", "1000"]


def run_torchrun(nproc: int, argv: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", "main.py", *argv]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_two_processes_match_one_and_resume_on_one(digits100, tmp_path):
    two, one = tmp_path / "two", tmp_path / "one"
    res = run_torchrun(2, train_argv(digits100, two, 2))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    recs = util.read_jsonl(two / "log.jsonl")
    assert [r["epoch"] for r in recs] == [0, 1] and all(r["world_size"] == 2 for r in recs)
    # written once: a single log line per epoch, one checkpoint
    assert (two / "checkpoint.pth.tar").exists()

    import main
    assert main.run(train_argv(digits100, one, 1)) == 0
    # same initial model and same k-means seed: the epoch-0 partition is the same up to relabelling
    a = util.ClusterLog(two / "clusters").load(0)
    b = util.ClusterLog(one / "clusters").load(0)
    assert adjusted_rand_score(a, b) == pytest.approx(1.0)

    # a checkpoint from 2 ranks resumes on 1 process
    assert main.run(train_argv(digits100, two, 3) + ["--resume", str(two / "checkpoint.pth.tar")]) == 0
    recs = util.read_jsonl(two / "log.jsonl")
    assert [r["epoch"] for r in recs] == [0, 1, 2] and recs[2]["world_size"] == 1
    assert recs[2]["nmi_prev"] is not None


def _gather_worker(rank: int, world: int, port: int, n: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    rt = util.init_runtime("cpu")
    full = torch.arange(n * 3, dtype=torch.float32).reshape(n, 3)
    idx = torch.arange(rank, n, world)
    got = util.gather_rows(full[idx], idx, n, rt)
    labels = util.broadcast_array(np.arange(n) % 4 if rt.is_main else None, rt)
    torch.save({"full": got, "labels": torch.as_tensor(labels)}, f"{out}.{rank}")
    torch.distributed.destroy_process_group()


def test_gather_rows_and_broadcast(tmp_path):
    n, world = 11, 2
    mp.spawn(_gather_worker, args=(world, free_port(), n, str(tmp_path / "res")), nprocs=world)
    r0 = torch.load(tmp_path / "res.0", weights_only=True)
    r1 = torch.load(tmp_path / "res.1", weights_only=True)
    torch.testing.assert_close(r0["full"], torch.arange(n * 3, dtype=torch.float32).reshape(n, 3))
    assert r1["full"] is None
    assert r0["labels"].tolist() == r1["labels"].tolist() == (np.arange(n) % 4).tolist()


def test_sampler_shards_draw_each_sample_once():
    rng_lists = [list(range(0, 50)), list(range(50, 53)), [], list(range(53, 100))]
    n_draws, world = 97 // 3 * 3, 3
    full = util.UnifLabelSampler(n_draws, rng_lists, rng=np.random.RandomState(5)).indexes
    shards = [list(util.UnifLabelSampler(n_draws, rng_lists, rng=np.random.RandomState(5),
                                         rank=r, world_size=world)) for r in range(world)]
    assert all(len(s) == n_draws // world for s in shards)  # same step count on every rank
    # position j of the epoch is drawn by rank j % W, exactly once
    rebuilt = np.empty(n_draws, dtype=np.int64)
    for r, s in enumerate(shards):
        rebuilt[r::world] = s
    np.testing.assert_array_equal(rebuilt, full)
