"""Scaling of DeepCluster's feature extraction and training with the number of processes.

Usage:
    python benchmarks/bench_distributed.py                      # quick: digits, 1 and 2 CPU processes
    python benchmarks/bench_distributed.py --clustering --nprocs 1 2 4 --out benchmarks/results/cpu_sharded_clustering.json
    python benchmarks/bench_distributed.py --nprocs 1 2 4 8 --data /data/imagenet_subset \
        --size 224 --k 1000 --batch 256 --device cuda --out scaling.json

Each configuration runs ``torchrun --nproc_per_node=P main.py`` for ``--epochs`` epochs and
reads the per-stage times main.py logs (exp/log.jsonl, last epoch): images/s of feature
extraction (N / time) and of training (draws / time), and their ratio to 1 process, measured
in the same run. On CPU the processes share the machine's cores (gloo), so the ratio shows
the overhead of the distributed path more than a speed-up; on a multi-GPU box it is the
scaling. Clustering is reported separately.

``--clustering``: the clustering step alone on synthetic (N, D) features (N = 50,000,
D = 4096 by default) at each number of processes (gloo, CPU): the sharded k-means (each rank
keeps its N / W rows, ``clustering.Kmeans.cluster_shard``) against the former path (rows
gathered on rank 0 with ``distributed.gather_rows``, clustered there, labels broadcast), in
the same run. Per rank: seconds, peak RSS growth over the process's RSS before its features
existed (getrusage), and the bytes of the buffers the sharded step counts
(``clustering.cluster_peak_bytes``).
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT, environment, pick_device, print_table, write_json

sys.path.insert(0, str(ROOT))
import checkpoint  # noqa: E402
import fileio  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("workload")
    g.add_argument("--data", default=None, help="image folder (default: 400 of scikit-learn's digits)")
    g.add_argument("--arch", default="alexnet", choices=["alexnet", "vgg16"])
    g.add_argument("--size", type=int, default=64, help="input resolution")
    g.add_argument("--k", type=int, default=20)
    g.add_argument("--batch", type=int, default=32, help="per-process batch size")
    g.add_argument("--epochs", type=int, default=1)
    g.add_argument("--workers", type=int, default=0)
    g = p.add_argument_group("run")
    g.add_argument("--nprocs", type=int, nargs="+", default=[1, 2])
    g.add_argument("--clustering", action="store_true",
                   help="benchmark the clustering step alone (synthetic features, sharded vs gathered)")
    g.add_argument("--N", type=int, default=50_000, help="--clustering: number of feature rows")
    g.add_argument("--D", type=int, default=4096, help="--clustering: feature dimension")
    g.add_argument("--pca", type=int, default=256, help="--clustering: PCA dimension")
    g.add_argument("--kmeans_iters", type=int, default=20, help="--clustering: k-means iterations")
    g.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    g.add_argument("--out", default=None, help="JSON output path")
    return p


def small_digits(n_per_class: int = 40) -> str:
    import data
    src = Path(tempfile.gettempdir()) / "deepcluster_bench" / "digits_full"
    data.export_digits(src, size=32)
    dst = Path(tempfile.gettempdir()) / "deepcluster_bench" / f"digits_{n_per_class}"
    if not dst.exists():
        for cls in sorted(p for p in src.iterdir() if p.is_dir()):
            (dst / cls.name).mkdir(parents=True)
            for f in sorted(cls.iterdir())[:n_per_class]:
                shutil.copy(f, dst / cls.name / f.name)
    return str(dst)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_one(nproc: int, args: argparse.Namespace, data_dir: str, exp: Path) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(ROOT / "main.py"), data_dir,
           "--exp", str(exp), "--arch", args.arch, "--size", str(args.size), "--k", str(args.k),
           "--batch", str(args.batch), "--epochs", str(args.epochs), "--workers", str(args.workers),
           "--sobel", "--no_progress", "--checkpoints", "1000000000", "--device", args.device]
    env = dict(os.environ)
    if args.device == "cpu":  # share the cores fairly between the processes
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"error: the {nproc}-process run failed:\n{res.stderr[-3000:]}")
    rec = fileio.read_jsonl(exp / "log.jsonl")[-1]
    n = len(checkpoint.ClusterLog(exp / "clusters").load(rec["epoch"]))
    draws = n // nproc * nproc
    return {"processes": nproc, "images": n, "wall_s": time.perf_counter() - t0,
            "features_s": rec["time_features"], "features_img_s": n / rec["time_features"],
            "clustering_s": rec["time_clustering"],
            "train_s": rec["time_train"], "train_img_s": draws / rec["time_train"]}


BLOCK = 500  # rows generated per seeded block: any rank makes any row without the others


def synthetic_rows(lo: int, hi: int, d: int, k: int):
    """Rows lo..hi-1 of an fc7-like synthetic matrix (ReLU of cluster centres + noise), each
    row the same whichever process makes it."""
    import torch
    centres = torch.randn(k, d, generator=torch.Generator().manual_seed(12345)) * 2
    out = torch.empty(hi - lo, d)
    for b in range(lo // BLOCK, (hi + BLOCK - 1) // BLOCK):
        g = torch.Generator().manual_seed(b)
        lab = torch.randint(0, k, (BLOCK,), generator=g)
        blk = (centres[lab] + torch.randn(BLOCK, d, generator=g)).relu_()
        s, e = max(lo, b * BLOCK), min(hi, (b + 1) * BLOCK)
        out[s - lo:e - lo] = blk[s - b * BLOCK:e - b * BLOCK]
    return out


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _cluster_worker(rank: int, world: int, port: int, args: argparse.Namespace, mode: str, out: str) -> None:
    import resource

    import numpy as np
    import torch

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)  # one thread per process: W processes use min(W, cores) cores (no OpenMP oversubscription)
    import clustering
    import distributed
    rt = distributed.init_runtime("cpu")
    per = args.N // world
    lo, hi = rank * per, (rank + 1) * per if rank < world - 1 else args.N
    base = _rss()  # before the features exist
    x = synthetic_rows(lo, hi, args.D, args.k)
    idx = torch.arange(lo, hi)
    km = clustering.Kmeans(args.k, backend="torch", pca=args.pca, niter=args.kmeans_iters, seed=3, device="cpu")
    distributed.barrier(rt)
    t0 = time.perf_counter()
    stats: dict = {}
    if mode == "sharded":
        loss, labels = km.cluster_shard(x, idx, args.N, rt, stats=stats)
    else:  # the former path: every row to rank 0, clustered there, labels broadcast
        full = distributed.gather_rows(x, idx, args.N, rt) if rt.distributed else x
        if rt.is_main:
            loss = km.cluster(full.numpy())
            labels = clustering.arrange_clustering(km.images_lists)
        else:
            loss, labels = 0.0, None
        del full
        labels = distributed.broadcast_array(labels, rt)
    distributed.barrier(rt)
    secs = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    torch.save({"rank": rank, "seconds": secs, "peak_rss_growth": peak - base, "loss": float(loss),
                "labels_head": np.asarray(labels[:1000]).tolist(), "counted_bytes": stats.get("peak_bytes"),
                "formula_bytes": clustering.cluster_peak_bytes(args.N, hi - lo, args.D, args.k, args.pca, 4),
                "shard_bytes": x.numel() * 4}, f"{out}.{rank}")
    if rt.distributed:
        torch.distributed.destroy_process_group()


def main_clustering(args: argparse.Namespace) -> dict:
    """Sharded against gathered clustering at each number of processes (see the module docstring)."""
    import torch
    import torch.multiprocessing as mp
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("sharded", "gather"):
            for w in args.nprocs:
                t0 = time.perf_counter()
                mp.spawn(_cluster_worker, args=(w, free_port(), args, mode, f"{tmp}/r"), nprocs=w)
                ranks = [torch.load(f"{tmp}/r.{r}", weights_only=False) for r in range(w)]
                r0 = ranks[0]
                rows.append({"mode": mode, "processes": w, "N": args.N, "D": args.D, "k": args.k,
                             "seconds": max(r["seconds"] for r in ranks), "wall_s": time.perf_counter() - t0,
                             "rank0_peak_gib": r0["peak_rss_growth"] / 2 ** 30,
                             "max_rank_peak_gib": max(r["peak_rss_growth"] for r in ranks) / 2 ** 30,
                             "per_rank_peak_gib": [r["peak_rss_growth"] / 2 ** 30 for r in ranks],
                             "shard_gib": r0["shard_bytes"] / 2 ** 30,
                             "formula_gib": r0["formula_bytes"] / 2 ** 30 if mode == "sharded" else None,
                             "counted_gib": (r0["counted_bytes"] or 0) / 2 ** 30 if mode == "sharded" else None,
                             "loss": r0["loss"], "labels_head": r0["labels_head"]})
                print(f"{mode} W={w}: {rows[-1]['seconds']:.1f} s, peak per rank "
                      f"{', '.join(f'{g:.2f}' for g in rows[-1]['per_rank_peak_gib'])} GiB", flush=True)
    ref = next(r for r in rows if r["mode"] == "sharded" and r["processes"] == args.nprocs[0])
    ref_labels = ref["labels_head"]
    for r in rows:
        r["same_labels_as_first"] = r["labels_head"] == ref_labels
        r["loss_rel_diff"] = abs(r["loss"] - ref["loss"]) / ref["loss"]
        del r["labels_head"]
    print_table(rows, [("mode", "path"), ("processes", "W"), ("seconds", "seconds"),
                       ("rank0_peak_gib", "rank0 GiB"), ("max_rank_peak_gib", "max rank GiB"),
                       ("shard_gib", "shard GiB"), ("formula_gib", "formula GiB"),
                       ("loss_rel_diff", "loss rel diff")],
                title=f"clustering step, N={args.N} D={args.D} k={args.k} pca={args.pca} (gloo, CPU)")
    import torch as _t
    payload = {"benchmark": "distributed_clustering", "args": vars(args),
               "environment": environment(_t.device("cpu")), "rows": rows}
    write_json(args.out, payload)
    return payload


def main(args: argparse.Namespace) -> dict:
    if args.clustering:
        return main_clustering(args)
    device = pick_device(args.device)
    data_dir = args.data or small_digits()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for p in args.nprocs:
            rows.append(run_one(p, args, data_dir, Path(tmp) / f"exp_{p}"))
    base = rows[0]
    for r in rows:
        r["features_scaling"] = r["features_img_s"] / base["features_img_s"]
        r["train_scaling"] = r["train_img_s"] / base["train_img_s"]
    print_table(rows, [("processes", "procs"), ("images", "N"), ("features_img_s", "extract img/s"),
                       ("features_scaling", "x"), ("train_img_s", "train img/s"), ("train_scaling", "x"),
                       ("clustering_s", "cluster s"), ("wall_s", "wall s")],
                title=f"DeepCluster scaling ({args.arch} {args.size}px, batch {args.batch}/process, {device})")
    payload = {"benchmark": "distributed", "args": vars(args), "environment": environment(device), "rows": rows}
    write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main(get_args_parser().parse_args())
