"""End-to-end DeepCluster epoch: feature pass + clustering step + one training pass.

Two configurations on the same generated JPEG folder (photo-like 500x375 images), timed in the
same run, stage by stage:

  original   the original release's configuration: contiguous NCHW float32 convnet, faiss
             PCAMatrix(4096, 256, -0.5) + faiss k-means, every JPEG decoded in full
  ours       main.py's defaults: channels-last convnet (float32), clustering.Kmeans with the
             randomized top-256 PCA, reduced-size JPEG decoding in the feature pass, uint8
             batches normalised per batch (data.to_model_input, bitwise equal), fused SGD
  ours_amp   ours + bf16 autocast (main.py --amp, opt-in: not a default)

The physical limit is printed beside them: the FLOPs of one feature batch and one training
step (torch.utils.flop_counter) at the fastest float32 rate measured in the same run (the larger
of a square GEMM and a convolution shaped like conv4: oneDNN's convolutions outrun MKL's GEMM
on AMD EPYC), plus, on the CPU, the data loaders' decode time on the same cores; and where one
training step of ours spends its time (convolutions, fc products, the rest).

Model: AlexNet-Sobel (batch norm) at 224, k clusters, SGD as main.py. bf16 stays off (opt-in).

A second part measures the reduced-size JPEG decoding on large photos (generated 4000x3000
JPEGs): images/s of the feature pass's decode + Resize + CenterCrop with full decoding and with
``Image.draft``, and the agreement of the clusters: PCA + k-means fitted on the full-decode
features, then both feature sets assigned to those fixed centroids (NMI, % same cluster).

    python benchmarks/bench_epoch.py                          # 256 images, k=25: a few minutes idle
    python benchmarks/bench_epoch.py --n_images 2048 --k 200 --out exp_bench/epoch.json
    python benchmarks/bench_epoch.py --n_images 4096 --k 100 --rounds 2 --draft_images 0   # ~25 min
    python benchmarks/bench_epoch.py --quick                  # seconds: the tests' smoke run

The generated photos give the random network's features, whose spectrum is easy for the PCA;
trained fc7 features concentrate their variance on one axis over a flat tail (issue 24), so the
clustering step is timed again, both configurations, on N features of that shape
(``--cluster_features trained``, bench_clustering.trained_fc7_features, or a .npy matrix of
your own), and its share of the epoch reported with the same feature and training passes.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, fp32_peak, pick_device, print_table, sync, write_json  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import clustering  # noqa: E402
import data  # noqa: E402
import models  # noqa: E402
from bench_clustering import original_kmeans, original_pca, trained_fc7_features  # noqa: E402
from bench_throughput import make_jpeg_folder  # noqa: E402

CONFIGS = {
    "original": dict(channels_last=False, pca="faiss", draft=False, amp=False, uint8=False, fused_sgd=False),
    "ours": dict(channels_last=True, pca="auto", draft=True, amp=False, uint8=True, fused_sgd=True),
    # opt-in, not a default: main.py --amp (bf16 autocast in both passes; changes numerics)
    "ours_amp": dict(channels_last=True, pca="auto", draft=True, amp=True, uint8=True, fused_sgd=True),
}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("epoch")
    g.add_argument("--n_images", type=int, default=256, help="images in the generated folder")
    g.add_argument("--jpeg_size", default="500x375", help="WxH of the generated JPEGs")
    g.add_argument("--size", type=int, default=224, help="network input resolution")
    g.add_argument("--k", type=int, default=25, help="clusters")
    g.add_argument("--batch", type=int, default=64)
    g.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    g.add_argument("--configs", default="original,ours,ours_amp", help=f"comma list of {','.join(CONFIGS)}")
    g.add_argument("--cluster_features", default="trained",
                   help="the clustering step timed again on features shaped like a trained network's: "
                        "'trained' (generated, fitted to trained fc7), a (N, 4096) .npy matrix (its first "
                        "--n_images rows), or 'off'")
    g.add_argument("--rounds", type=int, default=1,
                   help="epochs per configuration, interleaved; each stage's shortest time is reported")
    g = p.add_argument_group("large JPEG decoding")
    g.add_argument("--draft_images", type=int, default=24, help="generated large JPEGs (0: skip this part)")
    g.add_argument("--draft_size", default="4000x3000", help="WxH of the large JPEGs")
    g.add_argument("--draft_k", type=int, default=4, help="clusters for the agreement check")
    g = p.add_argument_group("run")
    g.add_argument("--quick", action="store_true", help="tiny sizes (the test suite's smoke run)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu",
                   help="where the convnet and our clustering run (the original's PCA stays on the CPU)")
    g.add_argument("--cache", default=str(Path.home() / ".cache" / "deepcluster_bench"))
    g.add_argument("--out", default=None, help="write the tables as JSON here")
    return p


def check(args, parser) -> None:
    if args.quick:
        args.n_images, args.jpeg_size, args.size, args.k, args.batch = 8, "96x72", 64, 2, 8
        args.draft_images, args.draft_size, args.draft_k, args.workers = 4, "256x192", 2, 0
    args.configs = [c for c in args.configs.split(",") if c]
    bad = [c for c in args.configs if c not in CONFIGS]
    if bad:
        parser.error(f"argument --configs: unknown configuration(s) {bad}: choose from {list(CONFIGS)}")
    if args.rounds < 1:
        parser.error(f"argument --rounds: must be >= 1, got {args.rounds}")
    if args.k > args.n_images:
        parser.error(f"argument --k: {args.k} clusters exceed --n_images {args.n_images}")
    if args.cluster_features not in ("trained", "off"):
        try:
            shape = np.load(args.cluster_features, mmap_mode="r").shape
        except (OSError, ValueError) as e:
            parser.error(f"argument --cluster_features: cannot read {args.cluster_features} as a .npy array: {e}")
        if len(shape) != 2 or shape[0] < args.n_images:
            parser.error(f"argument --cluster_features: {args.cluster_features} has shape {shape}, expected "
                         f"(N, D) with N >= --n_images {args.n_images}")
    if args.draft_images and args.draft_k > args.draft_images:
        parser.error(f"argument --draft_k: {args.draft_k} exceeds --draft_images {args.draft_images}")


# ---------------------------------------------------------------------------------------
# one epoch
# ---------------------------------------------------------------------------------------
def build_model(args, channels_last: bool) -> models.DeepClusterNet:
    torch.manual_seed(args.seed)
    model = models.build_model("alexnet", sobel=True, bn=True, out=args.k, input_size=args.size).to(args.dev)
    return model.to(memory_format=torch.channels_last) if channels_last else model


@torch.no_grad()
def feature_pass(args, root: str, model, channels_last: bool, draft: bool, amp: bool = False,
                 uint8: bool = False) -> np.ndarray:
    """(N, 4096) fc7 features of the folder, as deepcluster.compute_features (eval transform)."""
    ds = data.IndexedImageFolder(root, transform=data.eval_transform(args.size, normalize=not uint8),
                                 draft=data.eval_resize(args.size) if draft else None)
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch, num_workers=args.workers)
    model.eval()
    out = np.zeros((len(ds), models.common.FC_DIM), np.float32)
    for imgs, idx in loader:
        with torch.autocast(args.dev.type, dtype=torch.bfloat16, enabled=amp):
            feats = model.forward_features(data.to_model_input(imgs, args.dev, channels_last))
        out[idx.numpy()] = feats.float().cpu().numpy()
    return out


def cluster_step(args, feats: np.ndarray, pca: str) -> np.ndarray:
    """(N,) labels: the original's faiss PCA + faiss k-means, or clustering.Kmeans."""
    if pca == "faiss":
        xb = original_pca(feats, min(256, feats.shape[0] - 1, feats.shape[1]))
        return original_kmeans(xb, args.k, 20, args.seed)[0]
    km = clustering.Kmeans(args.k, seed=args.seed, pca_solver=pca, device=args.dev)
    km.cluster(feats)
    return km.labels


def trained_shape_clustering(args, rows: list[dict]) -> dict:
    """The clustering step of each configuration on --n_images features shaped like trained fc7
    (or the user's matrix), and its share of the epoch with the measured feature and training
    passes of that configuration (rows gain ``clustering_trained_s`` and ``clustering_trained_pct``)."""
    if args.cluster_features == "trained":
        x, source = trained_fc7_features(args.n_images, models.common.FC_DIM, args.k, args.seed), "generated, trained fc7 spectrum"
    else:
        x = np.array(np.load(args.cluster_features, mmap_mode="r")[:args.n_images], dtype=np.float32)
        source = args.cluster_features
    out = {"source": source, "shape": list(x.shape)}
    for r in rows:
        pca = CONFIGS[r["config"]]["pca"]
        if f"{pca}_s" not in out:
            t = time.perf_counter()
            cluster_step(args, x, pca)
            out[f"{pca}_s"] = time.perf_counter() - t
            if pca != "faiss":
                out["eig"] = dict(clustering.LAST_PCA_INFO)  # our eigensolver: iterations, fallback and why
        c = out[f"{pca}_s"]
        r["clustering_trained_s"] = c
        r["clustering_trained_pct"] = 100 * c / (r["features_s"] + c + r["training_s"])
    return out


def train_pass(args, root: str, model, labels: np.ndarray, channels_last: bool, amp: bool = False,
               uint8: bool = False, fused_sgd: bool = False) -> float:
    """One epoch of training on the pseudo-labels (main.py's step: SGD body + fresh top layer)."""
    ds = data.IndexedImageFolder(root)
    train = clustering.ReassignedDataset(labels, ds, data.train_transform(args.size, normalize=not uint8))
    g = torch.Generator().manual_seed(args.seed)
    loader = torch.utils.data.DataLoader(train, batch_size=args.batch, shuffle=True, generator=g,
                                         num_workers=args.workers)
    opt = torch.optim.SGD(model.body_parameters(), lr=0.05, momentum=0.9, weight_decay=1e-5, fused=fused_sgd)
    top = torch.optim.SGD(model.top_layer.parameters(), lr=0.05, weight_decay=1e-5, fused=fused_sgd)
    crit = nn.CrossEntropyLoss()
    model.train()
    loss = torch.zeros(())
    for imgs, lab, _ in loader:
        with torch.autocast(args.dev.type, dtype=torch.bfloat16, enabled=amp):
            loss = crit(model(data.to_model_input(imgs, args.dev, channels_last)), lab.to(args.dev))
        opt.zero_grad(set_to_none=True)
        top.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        top.step()
    return float(loss.detach())


def run_epoch(args, root: str, name: str) -> dict:
    cfg = CONFIGS[name]
    model = build_model(args, cfg["channels_last"])
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    feats = feature_pass(args, root, model, cfg["channels_last"], cfg["draft"], cfg["amp"], cfg["uint8"])
    t1 = time.perf_counter()
    labels = cluster_step(args, feats, cfg["pca"])
    t2 = time.perf_counter()
    eig = dict(clustering.LAST_PCA_INFO) if cfg["pca"] != "faiss" else {}
    train_pass(args, root, model, labels, cfg["channels_last"], cfg["amp"], cfg["uint8"], cfg["fused_sgd"])
    sync(args.dev)
    t3 = time.perf_counter()
    n = len(labels)
    return {"config": name, "images": n, "features_s": t1 - t0, "clustering_s": t2 - t1, "training_s": t3 - t2,
            "epoch_s": t3 - t0, "features_img_s": n / (t1 - t0), "training_img_s": n / (t3 - t2),
            "load_start": round(load0, 1), "load_end": round(os.getloadavg()[0], 1),
            "eig_solver": eig.get("solver"), "eig_iterations": eig.get("iterations"), "eig_fallback": eig.get("fallback")}


def best_of_rounds(runs: list[dict]) -> dict:
    """One row per configuration: each stage's least disturbed (shortest) time over the rounds,
    the epoch their sum; every round kept under ``rounds``."""
    row, n = dict(runs[0]), runs[0]["images"]
    for key in ("features_s", "clustering_s", "training_s"):
        row[key] = min(r[key] for r in runs)
    row["epoch_s"] = row["features_s"] + row["clustering_s"] + row["training_s"]
    row["clustering_pct"] = 100 * row["clustering_s"] / row["epoch_s"]
    row["features_img_s"], row["training_img_s"] = n / row["features_s"], n / row["training_s"]
    row["load_end"] = runs[-1]["load_end"]
    row["rounds"] = runs
    return row


def epoch_flops(args) -> dict:
    """FLOPs per image of the feature pass (eval forward to fc7) and of a training step
    (forward and backward; the SGD update and the element-wise layers are not counted, so the
    limit is a lower bound on the time), by torch.utils.flop_counter on one batch."""
    from torch.utils.flop_counter import FlopCounterMode
    model = build_model(args, False)
    x = torch.randn(args.batch, 3, args.size, args.size, device=args.dev)
    y = torch.randint(0, args.k, (args.batch,), device=args.dev)
    model.eval()
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model.forward_features(x)
    feat = fc.get_total_flops() / args.batch
    model.train()
    with FlopCounterMode(display=False) as fc:
        nn.CrossEntropyLoss()(model(x), y).backward()
    return {"features_flop_per_img": feat, "training_flop_per_img": fc.get_total_flops() / args.batch}


def loader_seconds_per_img(args, root: str, n: int = 128) -> dict:
    """One process's seconds per image for the data loaders' work, on the first ``n`` images:
    decode + eval transform (feature pass) and decode + train transform (training pass), as
    ``ours`` (reduced-size decoding, uint8 output). On the CPU the loader workers share the
    cores with the convnet."""
    paths = data.IndexedImageFolder(root).paths[:n]
    ev, tr = data.eval_transform(args.size, normalize=False), data.train_transform(args.size, normalize=False)
    draft = data.eval_resize(args.size)
    out = {}
    for key, fn in (("features", lambda p: ev(data.load_rgb(p, draft))), ("training", lambda p: tr(data.load_rgb(p)))):
        fn(paths[0])
        t = time.perf_counter()
        for p in paths:
            fn(p)
        out[f"loader_{key}_s_per_img"] = (time.perf_counter() - t) / len(paths)
    return out


def time_by_kernel(args, channels_last: bool = True, steps: int = 2) -> dict:
    """Where one training step of ``ours`` spends its time on the CPU, and at what rate:
    convolutions (forward + backward), matrix products (fc layers), and everything else (batch
    norm, ReLU, pooling, dropout, loss, SGD update). Each aten call is timed on the host below
    autograd (CPU kernels are synchronous); FLOPs per group from torch.utils.flop_counter."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import FlopCounterMode

    def group(op) -> str | None:
        """op: an OpOverload (dispatch) or OpOverloadPacket (flop counter)."""
        name = getattr(op, "overloadpacket", op).__name__   # convolution, convolution_backward, mm, ...
        return "conv" if name.startswith("convolution") else "gemm" if name in ("mm", "addmm", "bmm") else None

    class OpTimer(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seconds = {"conv": 0.0, "gemm": 0.0}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            t = time.perf_counter()
            out = func(*args, **(kwargs or {}))
            g = group(func)
            if g:
                self.seconds[g] += time.perf_counter() - t
            return out

    model = build_model(args, channels_last)
    model.train()
    x = data.to_model_input(torch.randn(args.batch, 3, args.size, args.size), args.dev, channels_last)
    y = torch.randint(0, args.k, (args.batch,), device=args.dev)
    opt = torch.optim.SGD(model.body_parameters(), lr=0.05, momentum=0.9, weight_decay=1e-5,
                          fused=CONFIGS["ours"]["fused_sgd"])
    crit = nn.CrossEntropyLoss()

    def step():
        loss = crit(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()
    flops = {"conv": 0, "gemm": 0}
    with FlopCounterMode(display=False) as fc:
        step()
    for op, n in fc.get_flop_counts()["Global"].items():
        g = group(op)
        if g:
            flops[g] += n
    timer = OpTimer()
    t = time.perf_counter()
    with timer:
        for _ in range(steps):
            step()
    wall = (time.perf_counter() - t) / steps
    sec = {g: v / steps for g, v in timer.seconds.items()}
    per_img = 1e3 / args.batch
    return {"step_ms_per_img": wall * per_img,
            "conv_ms_per_img": sec["conv"] * per_img, "conv_gflops": flops["conv"] / max(sec["conv"], 1e-9) / 1e9,
            "gemm_ms_per_img": sec["gemm"] * per_img, "gemm_gflops": flops["gemm"] / max(sec["gemm"], 1e-9) / 1e9,
            "other_ms_per_img": (wall - sec["conv"] - sec["gemm"]) * per_img}


# ---------------------------------------------------------------------------------------
# reduced-size decoding of large JPEGs
# ---------------------------------------------------------------------------------------
def decode_rate(paths: list[str], size: int, draft: bool) -> float:
    """Images/s of load_rgb + eval transform (one process: the per-core decode cost)."""
    tf = data.eval_transform(size)
    t = time.perf_counter()
    for p in paths:
        tf(data.load_rgb(p, data.eval_resize(size) if draft else None))
    return len(paths) / (time.perf_counter() - t)


def draft_agreement(args, root: str) -> dict:
    """Full vs reduced-size decoding of large JPEGs: decode speed, cluster agreement at fixed
    centroids (PCA + k-means fitted on the full-decode features)."""
    from sklearn.metrics import normalized_mutual_info_score
    paths = data.IndexedImageFolder(root).paths
    full_rate = decode_rate(paths, args.size, False)
    draft_rate = decode_rate(paths, args.size, True)
    model = build_model(args, True)
    f_full = feature_pass(args, root, model, True, False)
    f_draft = feature_pass(args, root, model, True, True)
    dim = min(256, f_full.shape[0] - 1)
    xf = torch.from_numpy(f_full)
    mean, proj = clustering.pca_fit(xf, dim, solver="exact")
    xb = clustering.pca_apply(xf, mean, proj)
    cent = clustering.kmeans_torch(xb, args.draft_k, seed=args.seed)["centroids"]
    lab_full = clustering.nearest_centroid(xb, cent)[0].numpy()
    lab_draft = clustering.nearest_centroid(clustering.pca_apply(torch.from_numpy(f_draft), mean, proj), cent)[0].numpy()
    rel = float(np.linalg.norm(f_draft - f_full) / max(np.linalg.norm(f_full), 1e-30))
    return {"images": len(paths), "jpeg_size": args.draft_size, "full_img_s": full_rate, "draft_img_s": draft_rate,
            "speedup": draft_rate / full_rate, "nmi": float(normalized_mutual_info_score(lab_full, lab_draft)),
            "same_cluster_pct": 100.0 * float((lab_full == lab_draft).mean()), "feature_rel_diff": rel}


# ---------------------------------------------------------------------------------------
def main(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    args.dev = pick_device(args.device)
    env = environment(args.dev)
    peaks = fp32_peak(args.quick)
    print(f"epoch benchmark: AlexNet-Sobel@{args.size}, {args.n_images} JPEGs {args.jpeg_size}, k={args.k}, "
          f"batch {args.batch}, {args.workers} workers; {env['cpu']} ({env['cpu_cores']} cores), load "
          f"{env['loadavg_1min_at_start']}; float32 peak {peaks['peak_gflops']:.0f} GFLOP/s (GEMM "
          f"{peaks['gemm_gflops']:.0f}, convolution {peaks['conv_gflops']:.0f})", flush=True)
    root = make_jpeg_folder(args.cache, args.n_images, args.jpeg_size, args.seed)
    runs: dict[str, list[dict]] = {name: [] for name in args.configs}
    for rnd in range(args.rounds):   # configurations interleaved: a slow spell of the VM hits all
        for name in args.configs:
            r = run_epoch(args, root, name)
            runs[name].append(r)
            print(f"  round {rnd}: {name:9s} features {r['features_s']:.1f}s clustering {r['clustering_s']:.2f}s "
                  f"training {r['training_s']:.1f}s = epoch {r['epoch_s']:.1f}s", flush=True)
    rows = [best_of_rounds(runs[name]) for name in args.configs]
    base = next((r for r in rows if r["config"] == "original"), None)
    for r in rows:
        for key in ("features", "clustering", "training", "epoch"):
            r[f"{key}_x"] = base[f"{key}_s"] / r[f"{key}_s"] if base else None
    trained = trained_shape_clustering(args, rows) if args.cluster_features != "off" else None
    text = print_table(rows, [("config", "config"), ("features_s", "features s"), ("features_x", "x"),
                              ("clustering_s", "clustering s"), ("clustering_x", "x"),
                              ("clustering_pct", "clust % epoch"), ("clustering_trained_s", "clust s trained-shape"),
                              ("clustering_trained_pct", "% epoch trained-shape"),
                              ("training_s", "training s"), ("training_x", "x"), ("epoch_s", "epoch s"),
                              ("epoch_x", "x epoch"), ("features_img_s", "feat img/s"),
                              ("training_img_s", "train img/s"), ("load_start", "load0"), ("load_end", "load1")],
                       title=f"\none epoch, AlexNet-Sobel@{args.size}, {args.n_images} JPEGs {args.jpeg_size}, k={args.k}")
    # the float32 floor: every FLOP of the two convnet passes at the fastest float32 rate measured
    # (GEMM or convolution, measured again now and the larger kept: the start's may be disturbed)
    end = fp32_peak(args.quick)
    peaks = {k: max(peaks[k], end[k]) for k in peaks}
    peak = peaks["peak_gflops"]
    fl = epoch_flops(args)
    n = args.n_images
    bound = {"features_at_peak_s": fl["features_flop_per_img"] * n / (peak * 1e9),
             "training_at_peak_s": fl["training_flop_per_img"] * n / (peak * 1e9), **fl, **peaks}
    ours = next((r for r in rows if r["config"] == "ours"), None)
    if ours:
        bound["epoch_at_peak_s"] = bound["features_at_peak_s"] + ours["clustering_s"] + bound["training_at_peak_s"]
        for key in ("features", "training"):
            ours[f"{key}_pct_of_peak"] = 100 * bound[f"{key}_at_peak_s"] / ours[f"{key}_s"]
    limit = (f"float32 limit at the fastest rate measured ({peak:.0f} GFLOP/s): features "
             f"{fl['features_flop_per_img'] / 1e9:.2f} GFLOP/img -> {bound['features_at_peak_s']:.1f}s, training "
             f"{fl['training_flop_per_img'] / 1e9:.2f} GFLOP/img -> {bound['training_at_peak_s']:.1f}s")
    if ours:
        limit += f"; ours runs at {ours['features_pct_of_peak']:.0f}% / {ours['training_pct_of_peak']:.0f}% of it"
    if base and ours:
        bound["best_possible_x_epoch_fp32"] = base["epoch_s"] / bound["epoch_at_peak_s"]
        limit += (f"; a float32 epoch at that rate would take {bound['epoch_at_peak_s']:.1f}s = "
                  f"{bound['best_possible_x_epoch_fp32']:.2f}x the original's")
    if ours and args.dev.type == "cpu":
        # the loader workers decode on the same cores: their CPU time, spread over every core,
        # adds to the compute floor
        bound.update(loader_seconds_per_img(args, root))
        loader_s = (bound["loader_features_s_per_img"] + bound["loader_training_s_per_img"]) * n / (os.cpu_count() or 1)
        bound["epoch_floor_with_loading_s"] = bound["epoch_at_peak_s"] + loader_s
        if base:
            bound["best_possible_x_epoch_fp32_with_loading"] = base["epoch_s"] / bound["epoch_floor_with_loading_s"]
        limit += (f"\ndata loading: {1e3 * bound['loader_features_s_per_img']:.1f} + "
                  f"{1e3 * bound['loader_training_s_per_img']:.1f} ms of one core per image (feature + training "
                  f"pass) = {loader_s:.1f}s on {os.cpu_count()} cores shared with the convnet")
        if base:
            limit += (f"; with it the floor is {bound['epoch_floor_with_loading_s']:.1f}s = "
                      f"{bound['best_possible_x_epoch_fp32_with_loading']:.2f}x the original's")
        k = time_by_kernel(args)
        bound.update({key if key.startswith("step") else f"step_{key}": v for key, v in k.items()})
        limit += (f"\none training step of ours, {k['step_ms_per_img']:.1f} ms/img: convolutions "
                  f"{k['conv_ms_per_img']:.1f} ms at {k['conv_gflops']:.0f} GFLOP/s, fc matrix products "
                  f"{k['gemm_ms_per_img']:.1f} ms at {k['gemm_gflops']:.0f} GFLOP/s, everything else (BN, ReLU, "
                  f"pooling, dropout, SGD) {k['other_ms_per_img']:.1f} ms")
    print(limit)
    if trained:
        eig = trained.get("eig", {})
        print(f"clustering step on trained-shaped features ({trained['source']}, {trained['shape'][0]} x "
              f"{trained['shape'][1]}): " + ", ".join(f"{r['config']} {r['clustering_trained_s']:.2f}s = "
                                                       f"{r['clustering_trained_pct']:.1f}% of its epoch" for r in rows)
              + (f"; our eigensolver: {eig.get('solver')}, {eig.get('iterations')} iterations, "
                 f"{'fell back: ' + eig.get('reason', '') if eig.get('fallback') else 'no fallback'}" if eig else ""))
    verdicts = []
    if base and ours:
        verdicts.append(f"target 'epoch >= 2x the original configuration on this CPU': {ours['epoch_x']:.2f}x "
                        f"({'MET' if ours['epoch_x'] >= 2 else 'MISSED'}; float32 ceiling "
                        f"{bound.get('best_possible_x_epoch_fp32_with_loading', bound['best_possible_x_epoch_fp32']):.2f}x)")
    amp = next((r for r in rows if r["config"] == "ours_amp"), None)
    if base and amp:
        verdicts.append(f"opt-in --amp (bf16): epoch {amp['epoch_x']:.2f}x the original")
    draft = None
    if args.draft_images:
        big = make_jpeg_folder(args.cache, args.draft_images, args.draft_size, args.seed + 1)
        draft = draft_agreement(args, big)
        print(f"\nlarge JPEGs ({draft['images']} x {draft['jpeg_size']}): decode + resize {draft['full_img_s']:.2f} "
              f"img/s full, {draft['draft_img_s']:.2f} img/s reduced-size = {draft['speedup']:.1f}x; clusters at "
              f"fixed centroids NMI {draft['nmi']:.3f}, {draft['same_cluster_pct']:.0f}% same cluster; fc7 relative "
              f"difference {draft['feature_rel_diff']:.3f}", flush=True)
        verdicts.append(f"reduced-size decoding default condition 'NMI >= 0.95 at fixed centroids': "
                        f"{draft['nmi']:.3f} ({'MET' if draft['nmi'] >= 0.95 else 'MISSED'})")
    for v in verdicts:
        print(v)
    payload = {"benchmark": "epoch", "config": {k: v for k, v in vars(args).items() if k != "dev"}, "env": env,
               "fp32_peak_gflops": peak, "gemm_peak_gflops": peaks["gemm_gflops"], "rows": rows, "bound": bound,
               "draft": draft, "trained_shape_clustering": trained, "targets": verdicts, "table": text}
    write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    parser = get_args_parser()
    a = parser.parse_args()
    check(a, parser)
    main(a)
