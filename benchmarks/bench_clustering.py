"""Benchmark of the clustering step: (N, D) features in -> cluster labels out.

Step = PCA to 256 dims with whitening + L2 normalisation + k-means (20 iterations).
Methods, all on the same input, same seed, timed in the same run:

  original   the original release's path: faiss PCAMatrix(D, 256, -0.5) on CPU, numpy L2,
             faiss.Clustering(niter=20, max_points_per_centroid=10M) with IndexFlatL2
  sklearn    scikit-learn PCA(whiten) + normalize + KMeans(n_init=1, max_iter=20, lloyd,
             init='random' as faiss, tol=0); skipped above --sklearn_max_nk (N*k)
  torch      ours: clustering.Kmeans(backend='torch') (runs on the GPU when there is one)
  auto       ours: clustering.Kmeans(backend='auto') (torch PCA + faiss k-means on CPU)

Quality: every method's final k-means objective is recomputed here the same way: sum of
squared distances of the points (its own preprocessed data) to their assigned final centroid,
in float64. ``obj_ref`` is the within-cluster sum of squares of its partition measured on one
reference preprocessed matrix (torch PCA), so partitions compare on identical data.

    python benchmarks/bench_clustering.py                       # quick: N=10000 D=512 k=500
    python benchmarks/bench_clustering.py --N 100000 --D 4096 --k 10000 --methods torch,auto
    python benchmarks/bench_clustering.py --real                # AlexNet features of digits
    python benchmarks/bench_clustering.py --real --model exp/checkpoint.pth.tar

Grid mode (``--grid``): fc7-shaped features (D=4096, eigenvalues decaying as 1/i, k blobs),
for each N x k the original path (faiss PCAMatrix(4096, 256, -0.5) + faiss k-means) against
ours (clustering.Kmeans defaults: randomized top-256 PCA + the auto k-means backend), plus
the exact-PCA reference (torch.linalg.eigh) whose preprocessed matrix is the common one on
which every partition's within-cluster sum of squares is recomputed. The original's PCA and
the exact PCA are fitted once per N (their cost does not depend on k) and added to each k's
k-means time. Also measured: the machine's GEMM peak, the covariance pass in seconds per
million rows, the k-means FLOPs and the time they would take at GEMM peak.

    python benchmarks/bench_clustering.py --grid 8000x100,8000x1000,50000x100,50000x1000 --D 4096
    python benchmarks/bench_clustering.py --grid 8000x100 --D 4096      # ~5 min on 2 cores
    python benchmarks/bench_clustering.py --grid quick                  # seconds (tests)

``--spectra``: the generated inputs' covariance spectra, each a full grid: ``inv`` (1/i over
all axes) and ``trained`` (fitted to fc7 of a trained AlexNet-Sobel: one axis with 95% of the
variance, a long flat tail, no gap at the cut, see TRAINED_FC7_SPECTRUM). ``--features FILE.npy``
clusters a user's own (N, D) matrix (e.g. a feature export of a run) instead; the grid's N are
then its first N rows (``--grid 5000x100``; without --grid: all rows, k = 100 and 1,000).

    python benchmarks/bench_clustering.py --grid 8000x100,8000x1000,3000x100 --D 4096 --spectra inv,trained
    python benchmarks/bench_clustering.py --features exp/fc7.npy --grid 8000x100,8000x1000
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PeakRSS, environment, fmt, gemm_peak, pick_device, print_table, write_json  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

import checkpoint  # noqa: E402
import clustering  # noqa: E402
import kmeans  # noqa: E402
from cluster_util import _row_chunk  # noqa: E402
from pca import COV_BLOCK, COV_COL_BLOCKS  # noqa: E402

METHODS = ("original", "sklearn", "torch", "auto")


def get_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--N", type=int, default=10000, help="number of synthetic feature rows")
    p.add_argument("--D", type=int, default=512,
                   help="synthetic feature dimension (fc7 is 4096; faiss's PCA is slow at 4096 on CPU)")
    p.add_argument("--k", type=int, default=None, help="clusters (default 500 synthetic, 100 --real)")
    p.add_argument("--true_k", type=int, default=None, help="clusters in the synthetic data (default k)")
    p.add_argument("--pca", type=int, default=256)
    p.add_argument("--niter", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list from {','.join(METHODS)}")
    p.add_argument("--sklearn_max_nk", type=float, default=1e9,
                   help="skip scikit-learn when N*k exceeds this (it is the slow one)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per method (the best is kept)")
    p.add_argument("--no_warmup", action="store_true", help="skip the small untimed warm-up run")
    p.add_argument("--real", action="store_true",
                   help="cluster AlexNet-Sobel fc7 features of scikit-learn's digits (1,797 x 4096)")
    p.add_argument("--model", default=None, help="checkpoint for --real (default: random init)")
    p.add_argument("--size", type=int, default=64, help="input resolution for --real")
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "deepcluster_bench"))
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--out", default=None, help="write the table as JSON here")
    p.add_argument("--grid", default=None,
                   help="comma list of NxK (e.g. 8000x100,50000x1000): the grid mode described above; "
                        "'quick' = a tiny grid for the tests")
    p.add_argument("--pca_solver", choices=list(clustering.PCA_SOLVERS), default="auto",
                   help="grid mode: our PCA eigensolver")
    p.add_argument("--quality_seeds", type=int, default=4,
                   help="grid mode: k-means seeds on which our partition is compared with the exact-PCA one "
                        "(k-means at k ~ N/8 is chaotic: one seed measures mostly noise)")
    p.add_argument("--spectra", default="inv,trained",
                   help="grid mode: comma list of generated spectra, each a full grid: 'inv' (1/i) and/or "
                        "'trained' (fitted to trained fc7 features: dominant axis, flat tail)")
    p.add_argument("--features", default=None,
                   help="grid mode: a (N, D) float .npy matrix of your own (e.g. exported fc7 features) "
                        "instead of generated inputs; the grid's N are its first N rows")
    p.add_argument("--no_original", action="store_true",
                   help="grid mode: skip the original path (its PCA is the slow part), keep ours vs exact")
    args = p.parse_args(argv)
    if args.k is None:
        args.k = 100 if args.real else 500
    if args.grid and args.grid != "quick":
        try:
            cells = [tuple(int(v) for v in c.lower().split("x")) for c in args.grid.split(",") if c]
            assert cells and all(len(c) == 2 and 1 <= c[1] <= c[0] for c in cells)
        except (ValueError, AssertionError):
            p.error(f"argument --grid: invalid value {args.grid!r}: expected NxK[,NxK...] with 1 <= K <= N")
    if args.features is not None:
        path = Path(args.features)
        try:
            mat = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as e:
            p.error(f"argument --features: cannot read {path} as a .npy array: {e}")
        if mat.ndim != 2 or mat.shape[0] < 2 or not np.issubdtype(mat.dtype, np.floating):
            p.error(f"argument --features: {path} holds a {mat.dtype} array of shape {mat.shape}, "
                    f"expected a float (N, D) matrix with N >= 2")
        if not args.grid:
            args.grid = ",".join(f"{mat.shape[0]}x{k}" for k in (100, 1000) if k <= mat.shape[0])
        if args.grid == "quick":
            p.error("argument --features: not with --grid quick (which generates its own inputs)")
        too_big = [c for c in args.grid.split(",") if c and int(c.lower().split("x")[0]) > mat.shape[0]]
        if too_big:
            p.error(f"argument --grid: {too_big[0]} asks for more rows than {path} holds ({mat.shape[0]})")
        args.spectra = "file"
    else:
        spectra = [v.strip() for v in args.spectra.split(",") if v.strip()]
        bad = [v for v in spectra if v not in SPECTRA]
        if bad or not spectra:
            p.error(f"argument --spectra: invalid value {args.spectra!r}: expected a comma list of {', '.join(SPECTRA)}")
        args.spectra = ",".join(spectra)
    if args.quality_seeds < 1:
        p.error(f"argument --quality_seeds: invalid value {args.quality_seeds}: must be >= 1")
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in args.methods if m not in METHODS]
    if bad:
        p.error(f"unknown method(s) {bad}: choose from {METHODS}")
    return args


# ---------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------
def synthetic_features(n: int, d: int, true_k: int, seed: int) -> np.ndarray:
    """(n, d) float32 with cluster structure: Gaussian blobs in a 64-d latent space mapped
    to d dims by a random linear map with a decaying spectrum, plus isotropic noise."""
    g = torch.Generator().manual_seed(seed)
    latent = min(64, d)
    centres = torch.randn(true_k, latent, generator=g) * 2.0
    z = torch.randint(0, true_k, (n,), generator=g)
    mix = torch.randn(latent, d, generator=g) * torch.linspace(1.0, 0.1, latent)[:, None]
    x = (centres[z] + 0.5 * torch.randn(n, latent, generator=g)) @ mix
    x += 0.3 * torch.randn(n, d, generator=g)
    return x.numpy()


def real_features(args) -> np.ndarray:
    """fc7 (pre-ReLU) features of the 1,797 digits, AlexNet-Sobel random init or --model."""
    import data
    import models
    torch.manual_seed(args.seed)
    if args.model:
        model = checkpoint.load_model(args.model)
        size = model.input_size
    else:
        model, size = models.alexnet(sobel=True, bn=True, out=0, input_size=args.size), args.size
    root = data.export_digits(Path(args.cache) / "digits")
    ds = data.IndexedImageFolder(root, transform=data.eval_transform(size))
    loader = torch.utils.data.DataLoader(ds, batch_size=128, num_workers=0)
    model.eval()
    out = np.zeros((len(ds), 4096), np.float32)
    with torch.no_grad():
        for imgs, idx in loader:
            out[idx.numpy()] = model.forward_features(imgs).numpy()
    return out


# ---------------------------------------------------------------------------------------
# methods: each returns (preprocessed data, labels, centroids, {pca_s, kmeans_s})
# ---------------------------------------------------------------------------------------
def run_original(x: np.ndarray, k: int, pca: int, niter: int, seed: int, device):
    import faiss
    t0 = time.perf_counter()
    n, d = x.shape
    mat = faiss.PCAMatrix(d, min(pca, d), -0.5)
    mat.train(x)
    xb = mat.apply_py(x)
    xb = xb / np.linalg.norm(xb, axis=1)[:, None]  # the original's L2 step
    xb = np.ascontiguousarray(xb, dtype=np.float32)
    t1 = time.perf_counter()
    clus = faiss.Clustering(xb.shape[1], k)
    clus.seed, clus.niter, clus.max_points_per_centroid = seed, niter, 10_000_000
    index = faiss.IndexFlatL2(xb.shape[1])
    clus.train(xb, index)
    _, labels = index.search(xb, 1)
    t2 = time.perf_counter()
    cent = faiss.vector_float_to_array(clus.centroids).reshape(k, -1)
    return xb, labels[:, 0].astype(np.int64), cent, {"pca_s": t1 - t0, "kmeans_s": t2 - t1}


def run_sklearn(x: np.ndarray, k: int, pca: int, niter: int, seed: int, device):
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import normalize
    t0 = time.perf_counter()
    n, d = x.shape
    solver = "covariance_eigh" if n >= d else "full"
    xb = PCA(n_components=min(pca, d), whiten=True, svd_solver=solver, random_state=seed).fit_transform(x)
    xb = normalize(xb).astype(np.float32)
    t1 = time.perf_counter()
    km = KMeans(n_clusters=k, init="random", n_init=1, max_iter=niter, tol=0.0, algorithm="lloyd",
                random_state=seed).fit(xb)
    t2 = time.perf_counter()
    return xb, km.labels_.astype(np.int64), km.cluster_centers_, {"pca_s": t1 - t0, "kmeans_s": t2 - t1}


def _run_ours(backend: str):
    def run(x, k, pca, niter, seed, device):
        inp = torch.from_numpy(x).to(device) if device.type == "cuda" else x  # features kept on the GPU
        km = clustering.Kmeans(k, backend=backend, niter=niter, pca=pca, device=device, seed=seed)
        t0 = time.perf_counter()
        km.cluster(inp)
        t1 = time.perf_counter()
        # recompute the preprocessed data and centroids for the objective (untimed)
        xb = clustering.preprocess_features(inp, pca, backend="torch", device=device)
        xb = xb.cpu().numpy() if isinstance(xb, torch.Tensor) else xb
        labels = km.labels.astype(np.int64)
        cent = km.centroids.cpu().numpy()
        tm = dict(km.timings)
        return xb, labels, cent, {"pca_s": tm.get("pca"), "kmeans_s": tm.get("kmeans"), "total_s": t1 - t0}
    return run


def _centroids_of(xb: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Means of the assigned points (for the partition's within-cluster sum of squares)."""
    x = torch.from_numpy(xb).double()
    lab = torch.from_numpy(labels)
    sums = torch.zeros(k, x.shape[1], dtype=torch.float64).index_add_(0, lab, x)
    cnt = torch.bincount(lab, minlength=k).clamp_min(1).double()
    return (sums / cnt[:, None]).numpy()


RUNNERS = {"original": run_original, "sklearn": run_sklearn, "torch": _run_ours("torch"), "auto": _run_ours("auto")}


def objective(xb: np.ndarray, labels: np.ndarray, centroids: np.ndarray) -> float:
    """sum_i ||x_i - c_{label_i}||^2 in float64 (the same computation for every method)."""
    x = torch.from_numpy(np.asarray(xb)).double()
    c = torch.from_numpy(np.asarray(centroids)).double()
    lab = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    total = 0.0
    for s in range(0, x.shape[0], 65536):
        total += float(((x[s:s + 65536] - c[lab[s:s + 65536]]) ** 2).sum())
    return total


def partition_sse(xb_ref: np.ndarray, labels: np.ndarray, k: int) -> float:
    return objective(xb_ref, labels, _centroids_of(xb_ref, labels, k))


# ---------------------------------------------------------------------------------------
def main(argv=None) -> dict:
    args = get_args(argv)
    if args.grid:
        return main_grid(args)
    device = pick_device(args.device)
    env = environment(device)
    if args.real:
        t = time.perf_counter()
        x = real_features(args)
        source = f"AlexNet-Sobel fc7 of sklearn digits ({'--model ' + args.model if args.model else 'random init'}, {args.size}px)"
        print(f"features: {source}, {x.shape}, extracted in {time.perf_counter() - t:.1f}s")
    else:
        x = synthetic_features(args.N, args.D, args.true_k or args.k, args.seed)
        source = f"synthetic: {args.true_k or args.k} Gaussian blobs in a 64-d latent space"
    n, d = x.shape
    if args.k > n:
        raise SystemExit(f"error: --k {args.k} exceeds the number of rows {n}")
    print(f"clustering step: N={n} D={d} -> PCA {min(args.pca, d)} -> k={args.k}, {args.niter} iterations, "
          f"device {device}, {env['cpu']} ({env['cpu_cores']} cores), load {env['loadavg_1min_at_start']}")

    methods = list(args.methods)
    skipped = {}
    if "sklearn" in methods and n * args.k > args.sklearn_max_nk:
        methods.remove("sklearn")
        skipped["sklearn"] = f"N*k = {n * args.k:.3g} > --sklearn_max_nk {args.sklearn_max_nk:.3g}"
    if "auto" in methods and "torch" in methods and clustering.resolve_backend("auto", device) == "torch":
        methods.remove("auto")
        skipped["auto"] = "'auto' resolves to the torch backend on this device (same as 'torch')"

    if not args.no_warmup:  # library initialisation (BLAS/LAPACK, faiss, CUDA) out of the timings
        xw = synthetic_features(min(n, 2000), min(d, 128), 10, args.seed + 1)
        for m in methods:
            RUNNERS[m](xw, min(args.k, 20), args.pca, 2, args.seed, device)

    xb_ref = clustering.preprocess_features(x, args.pca, backend="torch", device="cpu")
    rows = []
    for m in methods:
        best = None
        for _ in range(max(1, args.repeats)):
            with PeakRSS(device) as mem:
                xb, labels, cent, tm = RUNNERS[m](x, args.k, args.pca, args.niter, args.seed, device)
            total = tm.get("total_s") or mem.seconds
            if best is None or total < best["time_s"]:
                best = {"method": m, "time_s": total, "pca_s": tm["pca_s"], "kmeans_s": tm["kmeans_s"],
                        "rss_peak_mb": mem.peak_mb, "rss_added_mb": mem.peak_mb - mem.start_mb,
                        "gpu_peak_mb": mem.gpu_peak_mb,
                        "objective": objective(xb, labels, cent),
                        "obj_ref": partition_sse(xb_ref, labels, args.k),
                        "nonempty": int(len(np.unique(labels)))}
        best["throughput_rows_s"] = n / best["time_s"]
        rows.append(best)
        print(f"  {m:9s} {best['time_s']:8.2f} s   objective {best['objective']:.2f}", flush=True)

    ref = {r["method"]: r for r in rows}
    for r in rows:
        for base in ("original", "sklearn"):
            b = ref.get(base)
            r[f"speedup_vs_{base}"] = b["time_s"] / r["time_s"] if b else None
            r[f"kmeans_speedup_vs_{base}"] = (b["kmeans_s"] / r["kmeans_s"]) if b and r["kmeans_s"] else None
            r[f"obj_vs_{base}_pct"] = 100 * (r["objective"] / b["objective"] - 1) if b else None

    text = print_table(rows, [("method", "method"), ("time_s", "time s"), ("pca_s", "pca s"),
                              ("kmeans_s", "kmeans s"), ("throughput_rows_s", "rows/s"),
                              ("rss_peak_mb", "RSS MB"), ("rss_added_mb", "+RSS MB"), ("gpu_peak_mb", "GPU MB"),
                              ("objective", "objective"), ("obj_ref", "obj(ref)"), ("nonempty", "clusters"),
                              ("speedup_vs_original", "x orig"), ("speedup_vs_sklearn", "x sklearn"),
                              ("obj_vs_original_pct", "obj% orig"), ("obj_vs_sklearn_pct", "obj% skl")],
                       title=f"\nclustering step, N={n} D={d} k={args.k} ({source})")
    for m, why in skipped.items():
        print(f"skipped {m}: {why}")
    verdicts = targets(ref, device)
    for v in verdicts:
        print(v)
    payload = {"benchmark": "clustering", "config": {k: v for k, v in vars(args).items()},
               "shape": [n, d], "source": source, "env": env, "rows": rows, "skipped": skipped,
               "targets": verdicts, "table": text}
    write_json(args.out, payload)
    return payload


def targets(ref: dict, device: torch.device) -> list[str]:
    """The issue's targets for this device, and by how much each is met or missed."""
    out = []
    ours = [ref[m] for m in ("auto", "torch") if m in ref]
    if not ours:
        return out
    best = min(ours, key=lambda r: r["time_s"])
    o, s = ref.get("original"), ref.get("sklearn")
    tag = f"ours ({best['method']})"
    if device.type == "cpu":
        if o:
            sp = o["time_s"] / best["time_s"]
            ok = sp >= 1.0
            out.append(f"CPU target 'no slower than the original path': {'MET' if ok else 'MISSED'} - {tag} "
                       f"{best['time_s']:.2f}s vs original {o['time_s']:.2f}s = {sp:.2f}x"
                       + ("" if ok else f" ({1 / sp:.2f}x slower)")
                       + f"; objective {best['obj_vs_original_pct']:+.2f}% vs original")
        if s:
            sp = s["time_s"] / best["time_s"]
            eq = abs(best["obj_vs_sklearn_pct"]) <= 1.0
            ok = sp >= 10 and eq
            out.append(f"CPU target '>= 10x scikit-learn at equal objective': {'MET' if ok else 'MISSED'} - "
                       f"{sp:.2f}x (needs 10x{'' if sp >= 10 else f', short by {10 / sp:.2f}x'}); "
                       f"objective {best['obj_vs_sklearn_pct']:+.2f}% vs sklearn "
                       f"({'within' if eq else 'NOT within'} 1%)")
    else:
        if o:
            sp = o["time_s"] / best["time_s"]
            eq = abs(best["obj_vs_original_pct"]) <= 1.0
            out.append(f"GPU target '>= 10x the original path, objective within 1%': "
                       f"{'MET' if sp >= 10 and eq else 'MISSED'} - {sp:.2f}x, objective "
                       f"{best['obj_vs_original_pct']:+.2f}%")
        out.append(f"GPU target '<= 15 s at N=1,281,167 D=4096 k=10,000': this run took {best['time_s']:.2f}s "
                   f"(meaningful only at that size)")
    return out


# ---------------------------------------------------------------------------------------
# grid mode
# ---------------------------------------------------------------------------------------
def fc7_like_features(n: int, d: int, true_k: int, seed: int) -> np.ndarray:
    """(n, d) float32: eigenvalues decaying as 1/i over all d axes, true_k blobs whose
    centres follow the same spectrum, rotated by random orthogonal 512 x 512 blocks (so
    axes are not the coordinates; a full d x d rotation would cost more than the benchmark)."""
    g = torch.Generator().manual_seed(seed)
    std = torch.arange(1, d + 1, dtype=torch.float32) ** -0.5
    centres = torch.randn(true_k, d, generator=g) * std * 3
    blk = min(512, d)
    rots = [torch.linalg.qr(torch.randn(blk, blk, generator=g)).Q for _ in range(0, d, blk)]
    out = np.empty((n, d), np.float32)
    step = 8192
    for s in range(0, n, step):
        m = min(step, n - s)
        z = torch.randn(m, d, generator=g) * std + centres[torch.randint(0, true_k, (m,), generator=g)]
        for j, r in enumerate(rots):
            c = slice(j * blk, min(d, (j + 1) * blk))
            z[:, c] = z[:, c] @ r[: c.stop - c.start, : c.stop - c.start]
        out[s:s + m] = z.numpy()
    return out


# Covariance eigenvalues (relative to the largest) of fc7 features of a trained network, at
# these axes: AlexNet-Sobel (batch norm) after the digits demo's 4 epochs (main.py without DIR,
# --epochs 4), features of the 1,797 digits under the eval transform and 4 training crops
# each (8,985 x 4096), covariance by clustering.covariance, torch.linalg.eigvalsh. Axis 1 holds
# 95% of the variance, lambda_257 / lambda_256 = 0.990, lambda_449 / lambda_256 = 0.25; beyond
# ~1,024 the values are the float32 noise of the covariance (the smallest is -7e-9).
TRAINED_FC7_SPECTRUM = (
    (1, 1.0), (2, 0.0465), (3, 0.0034), (4, 5.77e-4), (8, 1.03e-4), (16, 2.39e-5), (32, 8.23e-6),
    (64, 3.33e-6), (128, 1.26e-6), (192, 6.48e-7), (256, 3.71e-7), (320, 2.26e-7), (448, 9.31e-8),
    (512, 6.27e-8), (768, 1.22e-8), (1024, 2.1e-9), (2048, 1.4e-10), (4096, 1e-10))


def trained_spectrum(d: int) -> torch.Tensor:
    """(d,) eigenvalues, largest 1: TRAINED_FC7_SPECTRUM interpolated in log-log, its axes
    scaled by d / 4096 (at d = 4096 the measured values themselves)."""
    ai, av = (np.array(v, dtype=np.float64) for v in zip(*TRAINED_FC7_SPECTRUM))
    pos = np.log(np.arange(1, d + 1) * 4096.0 / d)
    ev = np.exp(np.interp(pos, np.log(ai), np.log(av)))
    return torch.from_numpy(ev / ev[0])


def trained_fc7_features(n: int, d: int, true_k: int, seed: int) -> np.ndarray:
    """(n, d) float32 shaped like trained fc7: covariance eigenvalues following
    trained_spectrum(d) (one dominant axis, a long flat tail, no gap at 256), true_k blobs
    whose centres follow the same spectrum, a mean of the size of the spread (as measured:
    |mean| / sqrt(trace) = 1.0), rotated by random orthogonal 512 x 512 blocks."""
    g = torch.Generator().manual_seed(seed)
    std = (trained_spectrum(d) / 10).sqrt().float()   # blobs: 1 within + 9 between, as fc7_like
    centres = torch.randn(true_k, d, generator=g) * std * 3
    mean = torch.randn(d, generator=g) * float(std.square().sum().sqrt() * math.sqrt(10.0 / d))
    blk = min(512, d)
    rots = [torch.linalg.qr(torch.randn(blk, blk, generator=g)).Q for _ in range(0, d, blk)]
    out = np.empty((n, d), np.float32)
    for s in range(0, n, 8192):
        m = min(8192, n - s)
        z = torch.randn(m, d, generator=g) * std + centres[torch.randint(0, true_k, (m,), generator=g)]
        for j, r in enumerate(rots):
            c = slice(j * blk, min(d, (j + 1) * blk))
            z[:, c] = z[:, c] @ r[: c.stop - c.start, : c.stop - c.start]
        out[s:s + m] = (z + mean).numpy()
    return out


SPECTRA = {"inv": fc7_like_features, "trained": trained_fc7_features}


def original_pca(x: np.ndarray, pca: int) -> np.ndarray:
    """The original release's preprocessing: faiss PCAMatrix(D, pca, -0.5), then L2."""
    import faiss
    mat = faiss.PCAMatrix(x.shape[1], pca, -0.5)
    mat.train(x)
    xb = mat.apply_py(x)
    xb = xb / np.linalg.norm(xb, axis=1)[:, None]
    return np.ascontiguousarray(xb, dtype=np.float32)


def original_kmeans(xb: np.ndarray, k: int, niter: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    import faiss
    clus = faiss.Clustering(xb.shape[1], k)
    clus.seed, clus.niter, clus.max_points_per_centroid = seed, niter, 10_000_000
    clus.min_points_per_centroid = 1  # silences faiss's "please provide more points" only
    index = faiss.IndexFlatL2(xb.shape[1])
    clus.train(xb, index)
    _, labels = index.search(xb, 1)
    return labels[:, 0].astype(np.int64), faiss.vector_float_to_array(clus.centroids).reshape(k, -1)


def main_grid(args) -> dict:
    """N x k grid, original path vs ours vs the exact-PCA reference, D=args.D."""
    quick = args.grid == "quick"
    if quick:
        args.D, args.pca, args.niter = 96, 16, 5
    grid = [(600, 8), (600, 16)] if quick else [tuple(int(v) for v in c.lower().split("x"))
                                                 for c in args.grid.split(",") if c]
    if args.features is not None:
        args.D = int(np.load(args.features, mmap_mode="r").shape[1])
    d, pca = args.D, min(args.pca, args.D)
    env = environment(torch.device("cpu"))
    peak32 = gemm_peak(512 if quick else 2048)
    peak64 = gemm_peak(512 if quick else 2048, dtype=torch.float64)
    print(f"clustering grid: D={d} -> PCA {pca}, {args.niter} k-means iterations, {env['cpu']} "
          f"({env['cpu_cores']} cores), load {env['loadavg_1min_at_start']}; GEMM peak "
          f"{peak32:.0f} GFLOP/s float32, {peak64:.0f} float64", flush=True)
    if not args.no_warmup:
        xw = fc7_like_features(2000, min(d, 256), 10, args.seed + 1)
        original_kmeans(original_pca(xw, 16), 10, 2, 0)
        clustering.Kmeans(10, pca=16, niter=2, seed=0).cluster(xw)
    rows, limits = [], []
    for spectrum in args.spectra.split(","):
        for n in sorted({n for n, _ in grid}):
            ks = [k for nn, k in grid if nn == n]
            if spectrum == "file":  # the user's matrix: its first n rows
                x = np.array(np.load(args.features, mmap_mode="r")[:n], dtype=np.float32)  # a writable copy
            else:
                x = SPECTRA[spectrum](n, d, max(ks), args.seed)
            load0 = os.getloadavg()[0]
            # the covariance pass alone (ours, float32 GEMM per block, float64 sum)
            t = time.perf_counter()
            xt = torch.from_numpy(x)
            clustering.covariance(xt, xt[:1].mean(0), _row_chunk(d, COV_BLOCK))
            cov_s = time.perf_counter() - t
            t = time.perf_counter()
            xb_orig = None if args.no_original else original_pca(x, pca)
            orig_pca_s = None if args.no_original else time.perf_counter() - t
            t = time.perf_counter()
            xb_ref = clustering.preprocess_features(x, pca, backend="torch", pca_solver="exact")
            shape = dict(clustering.LAST_PCA_INFO.get("spectrum", {}))   # the exact spectrum at the cut
            exact_pca_s = time.perf_counter() - t
            # our whitened matrix once more, untimed, for the extra k-means seeds of the quality check
            xb_ours = clustering.preprocess_features(x, pca, backend="torch", pca_solver=args.pca_solver)
            # k-means' sensitivity to its input: the exact-PCA matrix plus random noise of the size
            # of our deviation from it (median row distance, unit rows), re-normalised
            row_diff = np.linalg.norm(xb_ours - xb_ref, axis=1)
            pert = float(np.median(row_diff))
            gn = np.random.RandomState(args.seed + 7)
            xb_noisy = xb_ref + pert / math.sqrt(xb_ref.shape[1]) * gn.standard_normal(xb_ref.shape).astype(np.float32)
            xb_noisy /= np.linalg.norm(xb_noisy, axis=1, keepdims=True)
            for k in ks:
                seed = args.seed
                t = time.perf_counter()
                lab_o = None if args.no_original else original_kmeans(xb_orig, k, args.niter, seed)[0]
                orig_km_s = None if args.no_original else time.perf_counter() - t
                orig_s = None if args.no_original else orig_pca_s + orig_km_s
                km = clustering.Kmeans(k, niter=args.niter, pca=pca, seed=seed, pca_solver=args.pca_solver)
                t = time.perf_counter()
                km.cluster(x)
                eig = dict(clustering.LAST_PCA_INFO)  # our eigensolver's report for this run
                ours_s = time.perf_counter() - t
                # the exact-PCA result: same k-means (backend, seed) on the exact-PCA matrix
                t = time.perf_counter()
                lab_e = kmeans._kmeans(xb_ref, k, backend=km.backend, seed=seed, niter=args.niter)["labels"].numpy()
                exact_km_s = time.perf_counter() - t
                # k-means' own run-to-run spread: the exact-PCA matrix with the next seed
                lab_e2 = kmeans._kmeans(xb_ref, k, backend=km.backend, seed=seed + 1, niter=args.niter)["labels"].numpy()
                wcss = {name: partition_sse(xb_ref, lab, k) for name, lab in
                        (("original", lab_o), ("ours", km.labels.astype(np.int64)), ("exact", lab_e),
                                          ("exact_seed2", lab_e2)) if lab is not None}
                # the same comparison with further k-means seeds: our PCA vs the exact one, same seed
                # (and the same for the exact matrix + noise of our deviation's size, same seeds)
                seed_pcts, floor_pcts, sse_o, sse_x = [100 * (wcss["ours"] / wcss["exact"] - 1)], [], [wcss["ours"]], [wcss["exact"]]
                for s2 in range(seed, seed + args.quality_seeds):
                    def labels_of(xb):
                        return kmeans._kmeans(xb, k, backend=km.backend, seed=s2, niter=args.niter)["labels"].numpy()
                    lab_x2 = lab_e if s2 == seed else lab_e2 if s2 == seed + 1 else labels_of(xb_ref)
                    sse_ref = partition_sse(xb_ref, lab_x2, k)
                    floor_pcts.append(100 * (partition_sse(xb_ref, labels_of(xb_noisy), k) / sse_ref - 1))
                    if s2 > seed:
                        sse_o.append(partition_sse(xb_ref, labels_of(xb_ours), k))
                        sse_x.append(sse_ref)
                        seed_pcts.append(100 * (sse_o[-1] / sse_ref - 1))
                kflops = 2.0 * n * k * pca * (args.niter + 1)  # distance GEMMs, + the final assignment
                row = {"spectrum": spectrum, "N": n, "k": k, "D": d,
                       "eig_solver": eig.get("solver"), "eig_iterations": eig.get("iterations"),
                       "eig_precision": eig.get("precision"), "eig_residual": eig.get("residual"),
                       "eig_fallback": bool(eig.get("fallback")), "eig_reason": eig.get("reason", ""),
                       "lambda_k_over_1": shape.get("k_over_1"), "lambda_k1_over_k": shape.get("k1_over_k"),
                       "lambda_w_over_k": shape.get("w_over_k"), "original_s": orig_s, "original_pca_s": orig_pca_s,
                       "original_kmeans_s": orig_km_s, "ours_s": ours_s, "ours_pca_s": km.timings["pca"],
                       "ours_kmeans_s": km.timings["kmeans"], "exact_s": exact_pca_s + exact_km_s,
                       "exact_pca_s": exact_pca_s, "speedup": orig_s / ours_s if orig_s else None,
                       "speedup_vs_exact": (exact_pca_s + exact_km_s) / ours_s,
                       "wcss_ours": wcss["ours"], "wcss_exact": wcss["exact"], "wcss_original": wcss.get("original"),
                       "ours_vs_exact_pct": 100 * (wcss["ours"] / wcss["exact"] - 1),
                       "seed_spread_pct": 100 * (wcss["exact_seed2"] / wcss["exact"] - 1),
                       "ours_vs_exact_pct_seeds": seed_pcts,
                       "ours_vs_exact_pct_worst": max(seed_pcts, key=abs),
                       "ours_vs_exact_pct_mean": 100 * (sum(sse_o) / sum(sse_x) - 1),
                       "row_deviation_median": pert, "row_deviation_max": float(row_diff.max()),
                       "noise_pct_seeds": floor_pcts, "noise_pct_worst": max(floor_pcts, key=abs),
                       "noise_pct_mean": sum(floor_pcts) / len(floor_pcts),
                       "original_vs_exact_pct": (100 * (wcss["original"] / wcss["exact"] - 1)
                                                 if "original" in wcss else None),
                       "cov_s_per_Mrows": cov_s * 1e6 / n, "kmeans_gflop": kflops / 1e9,
                       "kmeans_at_peak_s": kflops / (peak32 * 1e9), "load_start": round(load0, 1),
                       "load_end": round(os.getloadavg()[0], 1)}
                rows.append(row)
                print(f"  N={n} k={k}: original {fmt(row['original_s'], 0)}s, ours {ours_s:.2f}s "
                      f"(PCA {row['ours_pca_s']:.2f}) = {fmt(row['speedup'], 0)}x, exact-PCA {row['exact_s']:.1f}s; "
                      f"WCSS vs exact-PCA {row['ours_vs_exact_pct']:+.3f}% (original {fmt(row['original_vs_exact_pct'], 0)}%)",
                      flush=True)
            nb = max(1, min(COV_COL_BLOCKS, d // 256))
            cov_flops = 2.0 * n * d * d * (nb + 1) / (2 * nb)  # only the upper block triangle is multiplied
            limits.append(f"{spectrum} N={n}: covariance pass {cov_s:.2f}s = {cov_s * 1e6 / n:.0f} s per million rows at D={d} "
                          f"({cov_flops / cov_s / 1e9:.0f} GFLOP/s, {100 * cov_flops / cov_s / 1e9 / peak32:.0f}% of "
                          f"the float32 GEMM peak); exact eigh PCA {exact_pca_s:.1f}s, original faiss PCA "
                          f"{fmt(orig_pca_s, 0)}s")
            print(limits[-1], flush=True)
            del x, xt, xb_orig, xb_ref, xb_ours, xb_noisy
            # the cells so far, in case a long run is stopped (the final write replaces this)
            write_json(args.out, {"benchmark": "clustering_grid", "partial": True, "config": vars(args), "env": env,
                                  "rows": rows, "limits": limits})
    text = print_table(rows, [("spectrum", "spectrum"), ("N", "N"), ("k", "k"), ("eig_iterations", "eig it"),
                              ("eig_precision", "eig prec"), ("eig_fallback", "fallback"), ("original_s", "orig s"), ("original_pca_s", "orig PCA s"),
                              ("ours_s", "ours s"), ("ours_pca_s", "ours PCA s"), ("ours_kmeans_s", "ours km s"),
                              ("speedup", "x orig"), ("exact_s", "exact s"), ("speedup_vs_exact", "x exact"), ("ours_vs_exact_pct", "WCSS% exact"), ("ours_vs_exact_pct_mean", "seeds mean %"), ("ours_vs_exact_pct_worst", "worst seed %"),
                              ("row_deviation_median", "row dev"), ("noise_pct_worst", "noise worst %"), ("seed_spread_pct", "seed+1 %"),
                              ("original_vs_exact_pct", "orig WCSS%"), ("kmeans_gflop", "km GFLOP"),
                              ("kmeans_at_peak_s", "km@peak s"), ("load_start", "load0"), ("load_end", "load1")],
                       title=f"\nclustering step grid, D={d}, PCA {pca}, {args.niter} iterations")
    peak32 = max(peak32, gemm_peak(512 if quick else 2048))   # the start's value may be disturbed
    limits.insert(0, f"GEMM peak measured (best at start and end): {peak32:.0f} GFLOP/s float32, {peak64:.0f} GFLOP/s float64 "
                     f"({env['cpu_cores']} cores, shared)")
    for line in limits:
        print(line)
    verdicts = []
    for r in rows:
        cell = f"{r['spectrum']} N={r['N']} k={r['k']}"
        verdicts.append(f"target 'no eigensolver fallback' {cell}: {'MET' if not r['eig_fallback'] else 'MISSED'} "
                        f"({r['eig_solver']}, {r['eig_iterations']} iterations, {r['eig_precision']} products"
                        + (f"; fell back: {r['eig_reason']}" if r["eig_fallback"] else "") + ")")
        if r["speedup"] and not quick:
            verdicts.append(f"target '>= 20x the original' {cell}: {r['speedup']:.1f}x "
                            f"({'MET' if r['speedup'] >= 20 else 'MISSED'})")
        mean = r["ours_vs_exact_pct_mean"]
        ok = abs(mean) <= 0.5
        verdicts.append(f"target 'WCSS within 0.5% of exact PCA' {cell}: "
                        f"{mean:+.3f}% over {len(r['ours_vs_exact_pct_seeds'])} k-means seeds ({'MET' if ok else 'MISSED'}); "
                        f"single seeds {r['ours_vs_exact_pct']:+.3f}% (timed) to {r['ours_vs_exact_pct_worst']:+.3f}%, "
                        f"against {r['noise_pct_worst']:+.3f}% for random noise of the same size "
                        f"({r['row_deviation_median']:.1e} per unit row) on the exact input")
    for v in verdicts:
        print(v)
    payload = {"benchmark": "clustering_grid", "config": vars(args), "env": env, "gemm_peak_gflops": peak32,
               "gemm_peak_gflops_fp64": peak64, "rows": rows, "limits": limits, "targets": verdicts, "table": text}
    write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
