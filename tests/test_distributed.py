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

import checkpoint
import distributed
import fileio
import util
from conftest import digits_subset

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def digits100(module_tmp, digits_dir) -> str:
    return digits_subset(digits_dir, module_tmp.mktemp("d100") / "digits", 10)


def train_argv(data: str, exp: Path, epochs: int) -> list[str]:
    # the torch k-means: the same on any number of processes (faiss on one process is faiss.Clustering)
    return [data, "--exp", str(exp), "--size", "64", "--k", "10", "--pca", "32", "--batch", "8",
            "--workers", "0", "--epochs", str(epochs), "--sobel", "--no_progress", "--checkpoints", "1000",
            "--cluster_backend", "torch", "--keep_checkpoints", "0", "--device", "cpu"]  # every periodic copy kept


def run_torchrun(nproc: int, argv: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", "main.py", *argv]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_two_processes_match_one_and_resume_on_one(digits100, tmp_path):
    two, one = tmp_path / "two", tmp_path / "one"
    # --sync_bn on gloo: BatchNorm over the global batch (distributed.AllReduceBatchNorm)
    res = run_torchrun(2, train_argv(digits100, two, 2) + ["--checkpoints", "5", "--sync_bn"])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "BatchNorm synchronised over the 2 processes" in (two / "train.log").read_text()
    recs = fileio.read_jsonl(two / "log.jsonl")
    assert [r["epoch"] for r in recs] == [0, 1] and all(r["world_size"] == 2 for r in recs)
    # written once: a single log line per epoch, one checkpoint
    assert (two / "checkpoint.pth.tar").exists()

    import main
    assert main.run(train_argv(digits100, one, 1)) == 0
    # same initial model and same k-means seed: the epoch-0 partition is the same up to relabelling
    a = checkpoint.ClusterLog(two / "clusters").load(0)
    b = checkpoint.ClusterLog(one / "clusters").load(0)
    assert adjusted_rand_score(a, b) == pytest.approx(1.0)
    # --batch is the global mini-batch: 2 processes take 4 images each, for as many steps as 1 process
    one_rec = fileio.read_jsonl(one / "log.jsonl")[0]
    assert recs[0]["iterations"] == one_rec["iterations"] == 13  # ceil(100 draws / 8)

    # a mid-epoch copy from 2 ranks (epoch 1, before step 12: global position 96) resumes on 1 process
    mid = torch.load(two / "checkpoints" / "checkpoint_5.pth.tar", weights_only=True)
    assert (mid["epoch"], mid["mid_epoch"]["position"], mid["mid_epoch"]["world_size"]) == (1, 96, 2)
    assert len(mid["rng_ranks"]) == 2 and not torch.equal(mid["rng_ranks"][0]["torch"], mid["rng_ranks"][1]["torch"])
    argv = train_argv(digits100, two, 3) + ["--resume", str(two / "checkpoints" / "checkpoint_5.pth.tar")]
    assert main.run(argv) == 0
    recs = fileio.read_jsonl(two / "log.jsonl")
    assert [r["epoch"] for r in recs] == [0, 1, 2] and recs[1]["world_size"] == recs[2]["world_size"] == 1
    assert recs[1]["iterations"] == recs[2]["iterations"] == 13
    assert recs[2]["nmi_prev"] is not None


def _gather_worker(rank: int, world: int, port: int, n: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    rt = distributed.init_runtime("cpu")
    full = torch.arange(n * 3, dtype=torch.float32).reshape(n, 3)
    idx = torch.arange(rank, n, world)
    stats: dict = {}
    got = distributed.gather_rows(full[idx].clone(), idx, n, rt, stats=stats)
    # uneven shares (rank 1 sends more rows than rank 0 holds), bfloat16 rows
    idx2 = torch.arange(0, 3) if rank == 0 else torch.arange(3, n)
    stats2: dict = {}
    got2 = distributed.gather_rows(full[idx2].bfloat16(), idx2, n, rt, stats=stats2)
    labels = distributed.broadcast_array(np.arange(n) % 4 if rt.is_main else None, rt)
    # BatchNorm statistics differ per rank after training: rank 0's reach every rank
    bn = torch.nn.BatchNorm1d(3)
    bn.running_mean.fill_(float(rank + 1))
    bn.weight.data.fill_(float(rank + 5))
    distributed.broadcast_module_state(bn, rt)
    torch.manual_seed(100 + rank)
    rng = checkpoint.gather_rng_states(rt)
    torch.save({"full": got, "full2": got2, "labels": torch.as_tensor(labels), "stats": stats, "stats2": stats2,
                "bn": bn.running_mean.clone(), "bn_w": bn.weight.detach().clone(),
                "rng": None if rng is None else [r["torch"] for r in rng]}, f"{out}.{rank}")
    torch.save(_sync_bn_run(rank, rt), f"{out}.bn.{rank}")  # the same 2 processes (one spawn)
    torch.distributed.destroy_process_group()


N_GATHER = 11


@pytest.fixture(scope="module")
def two_ranks(module_tmp) -> Path:
    """Results of 2 gloo processes (:func:`_gather_worker`): ``res.R`` and ``res.bn.R`` of rank R."""
    out = module_tmp.mktemp("two_ranks")
    mp.spawn(_gather_worker, args=(2, free_port(), N_GATHER, str(out / "res")), nprocs=2)
    return out


def test_gather_rows_broadcast_and_rng_states(two_ranks):
    n = N_GATHER
    r0 = torch.load(two_ranks / "res.0", weights_only=False)
    r1 = torch.load(two_ranks / "res.1", weights_only=False)
    ref = torch.arange(n * 3, dtype=torch.float32).reshape(n, 3)
    torch.testing.assert_close(r0["full"], ref)
    torch.testing.assert_close(r0["full2"], ref.bfloat16())
    assert r1["full"] is None and r1["full2"] is None
    assert r0["labels"].tolist() == r1["labels"].tolist() == (np.arange(n) % 4).tolist()
    # peak bookkeeping: the buffers rank 0 holds are exactly what the formula counts
    assert r0["stats"]["counts"] == [6, 5]
    assert r0["stats"]["peak_bytes"] == distributed.gather_peak_bytes(n, 3, [6, 5], 4) == (11 + 6) * 3 * 4 + 11 * 8
    assert r0["stats2"]["counts"] == [3, 8]  # rank 0's rows cannot take rank 1's: one more buffer
    assert r0["stats2"]["peak_bytes"] == distributed.gather_peak_bytes(n, 3, [3, 8], 2) == (11 + 3 + 8) * 3 * 2 + 11 * 8
    assert r1["bn"].tolist() == r0["bn"].tolist() == [1.0] * 3 and r1["bn_w"].tolist() == [5.0] * 3
    # every rank's RNG state reaches rank 0, in rank order
    assert r1["rng"] is None and len(r0["rng"]) == 2
    for rank, state in enumerate(r0["rng"]):
        torch.manual_seed(100 + rank)
        assert torch.equal(state, torch.get_rng_state())


def test_gather_peak_imagenet_fits_an_80gb_gpu():
    n, d, w = 1_281_167, 4096, 8
    counts = [len(range(r, n, w)) for r in range(w)]
    gib = distributed.gather_peak_bytes(n, d, counts, 4) / 2 ** 30
    assert 21.9 < gib < 22.1  # the (n, D) float32 matrix is 19.5 GiB: one eighth more
    assert distributed.gather_peak_bytes(n, d, counts, 2) / 2 ** 30 < 11.1


def test_sampler_shards_draw_each_sample_once():
    rng_lists = [list(range(0, 50)), list(range(50, 53)), [], list(range(53, 100))]
    n_draws, world = 97 // 3 * 3, 3
    full = util.UnifLabelSampler(n_draws, rng_lists, rng=np.random.RandomState(5)).indexes
    shards = [[d for d, _ in util.SeededShardSampler(full, 0, rank=r, world_size=world)] for r in range(world)]
    assert all(len(s) == n_draws // world for s in shards)  # same step count on every rank
    # position j of the epoch is drawn by rank j % W, exactly once
    rebuilt = np.empty(n_draws, dtype=np.int64)
    for r, s in enumerate(shards):
        rebuilt[r::world] = s
    np.testing.assert_array_equal(rebuilt, full)


# ---------------------------------------------------------------------------------------
# BatchNorm over the global batch on gloo (distributed.AllReduceBatchNorm)
# ---------------------------------------------------------------------------------------
def _bn_cases() -> list[tuple[str, torch.Tensor, torch.Tensor, list[int]]]:
    """(name, input, weights of the loss, rows of each rank): 1d on (N, C), 1d on (N, C, L),
    2d on (N, C, H, W) split unevenly. Inputs far from zero mean (float cancellation)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for name, shape, split in (("1d", (8, 5), [4, 4]), ("1d_seq", (6, 3, 7), [3, 3]),
                               ("2d", (8, 4, 5, 3), [3, 5])):
        x = torch.randn(*shape, generator=g, dtype=torch.float64).float() * 3 + 2
        out.append((name, x, torch.randn(*shape, generator=g), split))
    return out


def _bn_module(x: torch.Tensor, momentum) -> torch.nn.Module:
    cls = torch.nn.BatchNorm2d if x.dim() == 4 else torch.nn.BatchNorm1d
    bn = cls(x.shape[1], momentum=momentum)
    with torch.no_grad():
        bn.weight.copy_(torch.linspace(0.5, 1.5, x.shape[1]))
        bn.bias.copy_(torch.linspace(-1, 1, x.shape[1]))
    return bn


def _bn_steps(bn: torch.nn.Module, xs: list[torch.Tensor], ws: list[torch.Tensor]) -> dict:
    """Two training steps (outputs, input gradients, parameter gradients), then an eval pass."""
    res: dict = {}
    for step, (x, w) in enumerate(zip(xs, ws)):
        x = x.clone().requires_grad_(True)
        bn.zero_grad()
        y = bn(x)
        (torch.tanh(y) * w).sum().backward()   # a non-linear loss of the normalised values
        res[f"y{step}"], res[f"gx{step}"] = y.detach(), x.grad
        res[f"gw{step}"], res[f"gb{step}"] = bn.weight.grad.clone(), bn.bias.grad.clone()
    bn.eval()
    res["eval"] = bn(xs[0]).detach()
    res.update(mean=bn.running_mean.clone(), var=bn.running_var.clone(), n=int(bn.num_batches_tracked))
    return res


def _sync_bn_run(rank: int, rt: distributed.Runtime) -> dict:
    """This rank's share of every case through the converted BatchNorm (in :func:`_gather_worker`)."""
    res = {}
    for name, x, w, split in _bn_cases():
        lo, hi = sum(split[:rank]), sum(split[:rank + 1])
        for momentum in (0.1, None):
            bn = distributed.sync_batchnorm(_bn_module(x, momentum), True, rt)
            assert isinstance(bn, distributed.AllReduceBatchNorm)
            # step 2 on other values (x squared), so the running statistics move twice
            r = _bn_steps(bn, [x[lo:hi], x[lo:hi] ** 2], [w[lo:hi], w[lo:hi]])
            for k in [k for k in r if k.startswith(("gw", "gb"))]:  # what DDP sums over the ranks
                torch.distributed.all_reduce(r[k])
            res[name, momentum] = r
    return res


def test_allreduce_batchnorm_two_ranks_equal_one_batchnorm(two_ranks):
    """Each of 2 gloo ranks holds part of the batch: outputs, input gradients, weight and bias
    gradients (summed over the ranks, as DDP does) and running statistics equal those of
    torch's BatchNorm on the whole batch in one process; eval mode is BatchNorm's own."""
    ranks = [torch.load(two_ranks / f"res.bn.{r}", weights_only=False) for r in range(2)]
    worst = 0.0
    for name, x, w, split in _bn_cases():
        for momentum in (0.1, None):
            ref = _bn_steps(_bn_module(x, momentum), [x, x ** 2], [w, w])
            got = {k: torch.cat([r[name, momentum][k] for r in ranks]) for k in ("y0", "gx0", "y1", "gx1", "eval")}
            for k in ("gw0", "gb0", "gw1", "gb1", "mean", "var", "n"):
                got[k] = ranks[0][name, momentum][k]
                assert torch.equal(torch.as_tensor(ranks[1][name, momentum][k]), torch.as_tensor(got[k])), k
            assert got["n"] == ref["n"] == 2
            for k, v in ref.items():
                if k != "n":
                    torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-5, msg=f"{name} {momentum} {k}")
                    # relative to the magnitude (running variances reach 300, where a float32 ulp is 3e-5)
                    worst = max(worst, float(((got[k] - v).abs() / v.abs().clamp_min(1)).max()))
    print(f"max difference {worst:.2e} (relative to max(1, |value|))")
    assert worst < 1e-6  # a few float32 ulps
    # one process, no process group: plain BatchNorm, bitwise
    x = _bn_cases()[2][1]
    a, b = _bn_module(x, 0.1), _bn_module(x, 0.1)
    synced = distributed.convert_allreduce_batchnorm(torch.nn.Sequential(a))
    assert isinstance(synced[0], distributed.AllReduceBatchNorm) and synced[0].weight is a.weight
    assert torch.equal(synced(x), b(x)) and torch.equal(synced[0].running_var, b.running_var)
    assert list(synced.state_dict()) == ["0." + k for k in b.state_dict()]
