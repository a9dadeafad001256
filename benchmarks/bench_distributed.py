"""Scaling of DeepCluster's feature extraction and training with the number of processes.

Usage:
    python benchmarks/bench_distributed.py                      # quick: digits, 1 and 2 CPU processes
    python benchmarks/bench_distributed.py --nprocs 1 2 4 8 --data /data/imagenet_subset \
        --size 224 --k 1000 --batch 256 --device cuda --out scaling.json

Each configuration runs ``torchrun --nproc_per_node=P main.py`` for ``--epochs`` epochs and
reads the per-stage times main.py logs (exp/log.jsonl, last epoch): images/s of feature
extraction (N / time) and of training (draws / time), and their ratio to 1 process, measured
in the same run. On CPU the processes share the machine's cores (gloo), so the ratio shows
the overhead of the distributed path more than a speed-up; on a multi-GPU box it is the
scaling. Clustering runs on rank 0 only and is reported separately.
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


def main(args: argparse.Namespace) -> dict:
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
