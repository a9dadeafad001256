"""Benchmark of the peak host memory of one whole clustering step at a given N.

Each configuration runs in its own subprocess (clean peak RSS from getrusage ru_maxrss):
the features are produced batch by batch (synthetic fc7-like rows standing for the network's
output, 256 rows a batch) into their storage, then PCA-256 whitening + L2 + k-means run.

  original        the original's layout: np.zeros((N, D), float32) on the host filled by batch,
                  faiss PCAMatrix + numpy L2 + faiss.Clustering (CPU)
  cpu_fp32        ours: distributed.FeatureStore on the host, float32; clustering.Kmeans
  cpu_fp16        ours: host storage in float16 (half the matrix); PCA upcasts block by block
  gpu_fp32        ours: features written into GPU memory, clustered there (needs CUDA)
  gpu_fp16        ours: same, float16 on the GPU (needs CUDA)

The original's matrix is N x 4096 x 4 bytes (21 GB for ImageNet's 1,281,167 images); the
table reports that size for the N given and the measured peak RSS of every configuration.

    python benchmarks/bench_memory.py                     # quick: N=100000, D=512, k=200
    python benchmarks/bench_memory.py --N 200000 --D 4096 --k 10000 --configs cpu_fp32,cpu_fp16
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, pick_device, print_table, write_json  # noqa: E402

CONFIGS = ("original", "cpu_fp32", "cpu_fp16", "gpu_fp32", "gpu_fp16")
IMAGENET_N = 1_281_167


def get_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--N", type=int, default=100000)
    p.add_argument("--D", type=int, default=512, help="feature dim (4096 is fc7; 512 keeps the quick run short)")
    p.add_argument("--k", type=int, default=200)
    p.add_argument("--niter", type=int, default=20)
    p.add_argument("--pca", type=int, default=256)
    p.add_argument("--backend", default="auto", help="clustering.Kmeans backend for ours")
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.configs = [c for c in args.configs.split(",") if c]
    bad = [c for c in args.configs if c not in CONFIGS]
    if bad:
        p.error(f"unknown config(s) {bad}: choose from {CONFIGS}")
    return args


# ---------------------------------------------------------------------------------------
# child: one configuration
# ---------------------------------------------------------------------------------------
def child(args) -> dict:
    import numpy as np
    import torch

    import clustering
    import distributed
    from _common import memory_snapshot, reset_peak_memory

    cfg = args._child
    device = torch.device("cuda" if cfg.startswith("gpu") else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        return {"config": cfg, "skipped": "no CUDA device"}
    if cfg == "original":
        import faiss  # noqa: F401  (imported before the baseline RSS, as torch is)
    import psutil
    rss0 = psutil.Process(os.getpid()).memory_info().rss
    reset_peak_memory(device)

    g = torch.Generator(device="cpu").manual_seed(args.seed)
    latent, true_k = min(64, args.D), args.k
    centres = (torch.randn(true_k, latent, generator=g) * 2.0).to(device)
    mix = (torch.randn(latent, args.D, generator=g) * torch.linspace(1.0, 0.1, latent)[:, None]).to(device)
    gd = torch.Generator(device=device).manual_seed(args.seed)

    def batch(b):  # what the network would output for b images
        z = torch.randint(0, true_k, (b,), generator=gd, device=device)
        x = (centres[z] + 0.5 * torch.randn(b, latent, generator=gd, device=device)) @ mix
        return x + 0.3 * torch.randn(b, args.D, generator=gd, device=device)

    t0 = time.perf_counter()
    bs = 256
    if cfg == "original":
        feats = np.zeros((args.N, args.D), dtype=np.float32)
        for s in range(0, args.N, bs):
            out = batch(min(bs, args.N - s))
            feats[s:s + out.shape[0]] = out.cpu().numpy()
        nbytes = feats.nbytes
    else:
        store = distributed.FeatureStore(args.N, args.D, device=device, dtype="float16" if cfg.endswith("fp16") else "float32")
        for s in range(0, args.N, bs):
            out = batch(min(bs, args.N - s))
            store.write(torch.arange(s, s + out.shape[0]), out)
        feats, nbytes = store.tensor, store.nbytes
    t1 = time.perf_counter()
    if cfg == "original":
        import faiss
        mat = faiss.PCAMatrix(args.D, min(args.pca, args.D), -0.5)
        mat.train(feats)
        xb = mat.apply_py(feats)
        xb = xb / np.linalg.norm(xb, axis=1)[:, None]
        xb = np.ascontiguousarray(xb, dtype=np.float32)
        clus = faiss.Clustering(xb.shape[1], args.k)
        clus.seed, clus.niter, clus.max_points_per_centroid = args.seed, args.niter, 10_000_000
        index = faiss.IndexFlatL2(xb.shape[1])
        clus.train(xb, index)
        _, labels = index.search(xb, 1)
        stats = clus.iteration_stats
        loss = stats.at(stats.size() - 1).obj
    else:
        km = clustering.Kmeans(args.k, backend=args.backend, niter=args.niter, pca=args.pca, device=device,
                               seed=args.seed)
        loss = km.cluster(feats)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t2 = time.perf_counter()
    snap = memory_snapshot(device)
    return {"config": cfg, "features_mb": nbytes / 2 ** 20, "features_dtype": str(getattr(feats, "dtype", "")),
            "features_on": str(device), "rss_import_mb": rss0 / 2 ** 20, "peak_rss_mb": snap["peak_rss_mb"],
            "added_rss_mb": snap["peak_rss_mb"] - rss0 / 2 ** 20, "gpu_peak_mb": snap["gpu_peak_mb"],
            "time_features_s": t1 - t0, "time_cluster_s": t2 - t1, "loss": float(loss)}


# ---------------------------------------------------------------------------------------
def main(argv=None) -> dict:
    args = get_args(argv)
    if args._child:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return {}
    import torch
    env = environment(pick_device("auto"))
    print(f"memory: clustering step N={args.N} D={args.D} k={args.k}, {env['cpu']}, "
          f"{env['ram_gb']} GB RAM, GPU {env['gpu']}, load {env['loadavg_1min_at_start']}", flush=True)
    rows, skipped = [], {}
    for cfg in args.configs:
        if cfg.startswith("gpu") and not torch.cuda.is_available():
            skipped[cfg] = "no CUDA device on this machine"
            print(f"  {cfg:9s} skipped (no CUDA)")
            continue
        cmd = [sys.executable, __file__, "--_child", cfg, "--N", str(args.N), "--D", str(args.D), "--k", str(args.k),
               "--niter", str(args.niter), "--pca", str(args.pca), "--backend", args.backend,
               "--seed", str(args.seed)]
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        res = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not res:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            skipped[cfg] = f"failed (exit {proc.returncode}): {' | '.join(tail)}"
            print(f"  {cfg:9s} FAILED: {skipped[cfg]}")
            continue
        r = json.loads(res[-1][len("RESULT "):])
        if "skipped" in r:
            skipped[cfg] = r["skipped"]
            continue
        r["wall_s"] = time.perf_counter() - t
        rows.append(r)
        print(f"  {cfg:9s} peak RSS {r['peak_rss_mb']:8.1f} MB  (+{r['added_rss_mb']:.1f} MB)  "
              f"{r['time_cluster_s']:.1f}s", flush=True)
    orig = next((r for r in rows if r["config"] == "original"), None)
    for r in rows:
        r["peak_rss_vs_original"] = r["peak_rss_mb"] / orig["peak_rss_mb"] if orig else None
        r["added_rss_vs_original"] = r["added_rss_mb"] / orig["added_rss_mb"] if orig else None
    matrix_mb = args.N * 4096 * 4 / 2 ** 20
    text = print_table(rows, [("config", "config"), ("features_on", "on"), ("features_mb", "feat MB"),
                              ("rss_import_mb", "RSS import"), ("peak_rss_mb", "peak RSS MB"),
                              ("added_rss_mb", "+RSS MB"), ("gpu_peak_mb", "GPU MB"),
                              ("time_cluster_s", "cluster s"), ("loss", "loss"),
                              ("peak_rss_vs_original", "x orig peak"), ("added_rss_vs_original", "x orig +RSS")],
                       title=f"\nclustering step memory, N={args.N} D={args.D} k={args.k}")
    notes = [f"original's feature matrix at this N: N x 4096 x 4 B = {matrix_mb:.1f} MB "
             f"(this run's D={args.D}: {args.N * args.D * 4 / 2 ** 20:.1f} MB); ImageNet "
             f"({IMAGENET_N:,} images): {IMAGENET_N * 4096 * 4 / 1e9:.1f} GB"]
    gpu = [r for r in rows if r["config"].startswith("gpu")]
    if gpu:
        best = min(gpu, key=lambda r: r["peak_rss_mb"])
        notes.append(f"GPU target 'peak host RAM <= 4 GB with features on the GPU': {best['peak_rss_mb']:.0f} MB "
                     f"at N={args.N} ({best['config']})")
    else:
        notes.append("GPU target 'peak host RAM <= 4 GB with features on the GPU': not measured (no CUDA)")
    for cfg, why in skipped.items():
        notes.append(f"skipped {cfg}: {why}")
    for n in notes:
        print(n)
    payload = {"benchmark": "memory", "config": {k: v for k, v in vars(args).items() if k != "_child"},
               "env": env, "rows": rows, "skipped": skipped, "original_matrix_bytes": args.N * 4096 * 4,
               "notes": notes, "table": text}
    write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
