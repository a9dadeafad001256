"""DeepCluster: unsupervised training of a convnet by alternating k-means and classification.

Usage:
    python main.py DIR [--arch alexnet] [--sobel] [--k 10000] [--exp exp] [...]
    python main.py                      # demo: scikit-learn's digits, on CPU, in minutes
    python main.py DIR --exp exp --resume exp      # continue a run (its newest checkpoint)
    python main.py DIR --exp exp --overwrite       # start over in a folder that holds a run

Each epoch (Caron et al., ECCV 2018): compute the fc7 features of every image, PCA-whiten
and cluster them, train the convnet for one pass to predict the cluster ids (with a fresh
top layer), save a checkpoint. See README.md for the flags and the outputs under --exp.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import normalized_mutual_info_score
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

import checkpoint
import clustering
import data
import models
import util

log = logging.getLogger("deepcluster")

# Settings of the no-argument demo (scikit-learn's 1,797 digits, on a 2-core CPU).
# Digits are 8x8 strokes: crops of 8% of the image (the paper's RandomResizedCrop) would
# keep almost nothing of them, so the demo crops at least half of each image.
# Its kNN curve uses a seeded, stratified train/val split of the same digits.
DEMO_KNN_DATA = str(Path("data") / "digits_split")
DEMO_DEFAULTS = dict(size=64, nmb_cluster=100, epochs=6, batch=64, workers=2, exp="exp_demo",
                     sobel=True, lr=0.05, crop_min_scale=0.5, knn_data=DEMO_KNN_DATA,
                     knn_train_size=400, knn_val_size=200)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="PyTorch Implementation of DeepCluster (unsupervised training)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("data", metavar="DIR", nargs="?", default=None,
                   help="path to dataset: an image folder, with or without class folders "
                        "(class folders are only used to report NMI with the labels). "
                        "Omit it to run the demo on scikit-learn's handwritten digits.")

    g = p.add_argument_group("model")
    g.add_argument("--arch", "-a", type=str, choices=models.ARCHS, default="alexnet", help="CNN architecture")
    g.add_argument("--sobel", action="store_true", help="Sobel filtering")
    g.add_argument("--size", type=int, default=224,
                   help="input resolution (224 reproduces the paper; smaller for small images)")
    g.add_argument("--crop_min_scale", type=float, default=0.08,
                   help="smallest area fraction of the training RandomResizedCrop (0.08: the paper's)")

    g = p.add_argument_group("clustering")
    g.add_argument("--clustering", type=str, choices=["Kmeans", "PIC"], default="Kmeans",
                   help="clustering algorithm")
    g.add_argument("--nmb_cluster", "--k", type=int, default=10000, help="number of cluster for k-means")
    g.add_argument("--cluster_backend", choices=["auto", "faiss", "torch"], default="auto",
                   help="k-means implementation (auto: torch on CUDA, faiss on CPU when installed)")
    g.add_argument("--pca", type=int, default=256, help="PCA dimension before clustering")
    g.add_argument("--kmeans_iters", type=int, default=20, help="k-means iterations")
    g.add_argument("--reassign", type=float, default=1.0,
                   help="how many epochs of training between two consecutive reassignments of clusters")
    g.add_argument("--sampler", choices=["uniform", "original"], default="uniform",
                   help="uniform: every cluster drawn equally often (the paper's intent); original: "
                        "reproduce the original code, whose sampler indices pointed at other images")

    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=float, default=0.05, help="learning rate")
    g.add_argument("--wd", type=float, default=-5, help="weight decay pow")
    g.add_argument("--momentum", type=float, default=0.9, help="momentum")
    g.add_argument("--batch", type=int, default=256,
                   help="mini-batch size of one SGD step; under torchrun the global one, each of the W "
                        "processes taking batch / W images (batch must be a multiple of W)")
    g.add_argument("--epochs", type=int, default=200, help="number of total epochs to run")
    g.add_argument("--start_epoch", type=int, default=0, help="manual epoch number (useful on restarts)")
    g.add_argument("--amp", action="store_true",
                   help="bf16 autocast for feature extraction and training (changes numerics slightly; "
                        "slower on CPUs without bf16 support)")
    g.add_argument("--channels_last", action="store_true",
                   help="channels-last memory format for the convnet (same results within 1e-4)")
    g.add_argument("--features_dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                   help="storage of the (N, 4096) feature matrix (float16 halves it; see README)")
    g.add_argument("--features_on", choices=["host", "device"], default="host",
                   help="keep the feature matrix in host RAM (the original) or on the GPU, where the "
                        "PyTorch clustering backend then runs without a host copy (under torchrun rank 0 "
                        "gathers it on its device and keeps it there)")

    g = p.add_argument_group("kNN monitor")
    g.add_argument("--knn_data", type=str, default="", metavar="DIR",
                   help="labelled DIR/train and DIR/val class folders: weighted-kNN top-1/top-5 of fc7 on "
                        "a fixed seeded subset, at the random network and after every epoch (empty: off)")
    g.add_argument("--knn_train_size", type=int, default=5000, help="train images of the kNN subset (at most)")
    g.add_argument("--knn_val_size", type=int, default=1000, help="val images of the kNN subset (at most)")
    g.add_argument("--knn_k", type=int, default=20, help="nearest train images voting (weights exp(sim/0.07))")
    g.add_argument("--knn_whiten", type=int, default=0, metavar="DIM",
                   help="PCA-whiten fc7 to DIM dims (fitted on the kNN train subset, as the clustering "
                        "does) before the kNN; 0: raw fc7")

    g = p.add_argument_group("run")
    g.add_argument("--workers", type=int, default=4, help="number of data loading workers")
    g.add_argument("--exp", type=str, default="exp", help="path to exp folder")
    g.add_argument("--resume", default="", type=str, metavar="PATH",
                   help="path to checkpoint, or an experiment folder (its newest valid checkpoint, "
                        "periodic mid-epoch copies included)")
    g.add_argument("--overwrite", action="store_true",
                   help="start a new run in an --exp folder that holds one: deletes its checkpoints, "
                        "log.jsonl and cluster files")
    g.add_argument("--change_k", action="store_true",
                   help="with --resume: allow a --k other than the checkpoint's (used from the next clustering)")
    g.add_argument("--checkpoints", type=int, default=25000, help="how many iterations between two checkpoints")
    g.add_argument("--seed", type=int, default=31, help="random seed")
    g.add_argument("--check_images", choices=["auto", "full", "header", "off"], default="auto",
                   help="check every image before training: full decode, header only, or not "
                        "(auto: full up to 20,000 images, else header)")
    g.add_argument("--bad_images", choices=["error", "skip"], default="error",
                   help="unreadable images: stop naming them (before training, or mid-run after a "
                        "resumable checkpoint), or go on without them (listed in EXP/bad_images.txt)")
    g.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto", help="where to run")
    g.add_argument("--dist_timeout", type=float, default=60,
                   help="minutes a torchrun process waits in a collective (the other ranks wait while rank 0 "
                        "clusters) before the run is stopped")
    g.add_argument("--report", action="store_true", help="draw the training report (PNG) at the end")
    g.add_argument("--no_progress", action="store_true", help="no progress bars")
    g.add_argument("--verbose", action="store_true", help="chatty")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse flags; with no DIR, the demo's defaults replace the paper's where not given."""
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.data is None:
        parser.set_defaults(**DEMO_DEFAULTS)
        args = parser.parse_args(argv)
        args.demo = True
    else:
        args.demo = False
    check_args(args, parser)
    return args


def check_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Refuse values that make no sense, naming the flag."""
    rules = [
        ("--nmb_cluster/--k", args.nmb_cluster >= 1, args.nmb_cluster, "must be >= 1"),
        ("--lr", args.lr > 0 and math.isfinite(args.lr), args.lr, "must be a positive number"),
        ("--wd", math.isfinite(args.wd), args.wd, "must be a finite exponent (weight decay = 10**wd)"),
        ("--momentum", 0 <= args.momentum < 1, args.momentum, "must be in [0, 1)"),
        ("--batch", args.batch >= 1, args.batch, "must be >= 1"),
        ("--epochs", args.epochs >= 0, args.epochs, "must be >= 0"),
        ("--start_epoch", args.start_epoch >= 0, args.start_epoch, "must be >= 0"),
        ("--reassign", args.reassign > 0 and math.isfinite(args.reassign), args.reassign, "must be > 0"),
        ("--workers", args.workers >= 0, args.workers, "must be >= 0"),
        ("--dist_timeout", args.dist_timeout > 0, args.dist_timeout, "must be > 0 (minutes)"),
        ("--checkpoints", args.checkpoints >= 1, args.checkpoints, "must be >= 1 (iterations)"),
        ("--crop_min_scale", 0 < args.crop_min_scale <= 1, args.crop_min_scale, "must be in (0, 1]"),
        ("--pca", args.pca >= 1, args.pca, "must be >= 1"),
        ("--kmeans_iters", args.kmeans_iters >= 1, args.kmeans_iters, "must be >= 1"),
        ("--knn_train_size", args.knn_train_size >= 1, args.knn_train_size, "must be >= 1"),
        ("--knn_val_size", args.knn_val_size >= 1, args.knn_val_size, "must be >= 1"),
        ("--knn_k", args.knn_k >= 1, args.knn_k, "must be >= 1"),
        ("--knn_whiten", args.knn_whiten >= 0, args.knn_whiten, "must be >= 0 (0: off)"),
        ("--size", args.size >= (64 if args.arch == "alexnet" else 32), args.size,
         "is too small for the architecture (alexnet needs >= 64, vgg16 and resnet50 >= 32)"),
    ]
    for flag, ok, value, why in rules:
        if not ok:
            parser.error(f"argument {flag}: invalid value {value!r}: {why}")


# ---------------------------------------------------------------------------------------
# set-up
# ---------------------------------------------------------------------------------------
def setup_logging(exp: Path, verbose: bool, is_main: bool = True) -> None:
    """Console + exp/train.log on rank 0; other ranks only print warnings."""
    exp.mkdir(parents=True, exist_ok=True)
    log.setLevel((logging.DEBUG if verbose else logging.INFO) if is_main else logging.WARNING)
    for h in log.handlers:
        h.close()
    log.handlers.clear()
    fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    handlers = [logging.StreamHandler(sys.stdout)]
    if is_main:
        handlers.append(logging.FileHandler(exp / "train.log"))
    for h in handlers:
        h.setFormatter(fmt)
        log.addHandler(h)
    log.propagate = False


def build_model(args: argparse.Namespace, device: torch.device) -> models.DeepClusterNet:
    model = models.build_model(args.arch, sobel=args.sobel, bn=True, out=args.nmb_cluster, input_size=args.size)
    model = model.to(device)
    return util.to_channels_last(model) if args.channels_last else model


def build_optimizer(model: models.DeepClusterNet, args: argparse.Namespace) -> torch.optim.SGD:
    """SGD over the body, built once: its momentum carries across epochs."""
    return torch.optim.SGD(model.body_parameters(), lr=args.lr, momentum=args.momentum,
                           weight_decay=10 ** args.wd)


def rank_batch(args: argparse.Namespace, rt: util.Runtime) -> int:
    """Images per step on this rank: --batch is the global mini-batch, split over the W ranks."""
    return args.batch // rt.world_size


def make_loader(dataset, args: argparse.Namespace, rt: util.Runtime, sampler=None,
                seed: int = 0) -> DataLoader:
    # An explicit generator: creating the iterator then draws nothing from the global RNG,
    # so a resumed run's dropout masks stay in step with an uninterrupted one.
    device = rt.device
    return DataLoader(dataset, batch_size=rank_batch(args, rt), shuffle=False, sampler=sampler,
                      num_workers=args.workers, pin_memory=device.type == "cuda",
                      persistent_workers=False, generator=torch.Generator().manual_seed(seed))


def load_dataset(dataset: data.IndexedImageFolder, args: argparse.Namespace, exp: Path,
                 rt: util.Runtime) -> data.IndexedImageFolder:
    """Check the images of DIR before any training (no crash hours later).

    ``--check_images auto`` decodes every image when there are at most 20,000, else reads
    headers only (a truncated file is then met during the run: see ``--bad_images``).
    """
    mode = args.check_images
    if mode == "auto":
        mode = "full" if len(dataset) <= 20000 else "header"
    if mode == "off":
        return dataset
    bad = data.check_images(dataset.paths, full=mode == "full", workers=args.workers,
                            progress=not args.no_progress)
    if not bad:
        return dataset
    listing = "".join(f"{dataset.paths[i]}\t{why}\n" for i, why in sorted(bad.items()))
    if rt.is_main:
        checkpoint.atomic_write_text(exp / "bad_images.txt", listing)
    first = dataset.paths[min(bad)]
    if args.bad_images == "error":
        raise data.DataError(f"{len(bad)} unreadable image(s) in {args.data}, first {first!r}: {bad[min(bad)]} "
                             f"(all listed in {exp / 'bad_images.txt'}; --bad_images skip trains without them)")
    log.warning("skipping %d unreadable image(s) (listed in %s), first %s: %s",
                len(bad), exp / "bad_images.txt", first, bad[min(bad)])
    dataset.drop(set(bad))
    return dataset


# ---------------------------------------------------------------------------------------
# the stages of one epoch
# ---------------------------------------------------------------------------------------
def make_feature_loader(dataset: data.IndexedImageFolder, args: argparse.Namespace,
                        rt: util.Runtime) -> DataLoader:
    """Fixed-order loader; under torchrun rank r reads images r, r + W, r + 2W, ..."""
    part = dataset if not rt.distributed else Subset(dataset, range(rt.rank, len(dataset), rt.world_size))
    return make_loader(part, args, rt)


@torch.no_grad()
def compute_features(loader: DataLoader, model: models.DeepClusterNet, N: int, rt: util.Runtime,
                     args: argparse.Namespace) -> np.ndarray | torch.Tensor | None:
    """(N, D) features, row i = image i (written by index), in --features_dtype; D = 4096
    pre-ReLU fc7 for AlexNet/VGG-16, 2048 global-average-pooled for ResNet-50.

    One process: rows go straight into the (N, D) store (host, or the GPU with
    --features_on device). Under torchrun each rank fills an (N / W, D) store of its
    share on its device and rank 0 gathers the whole matrix, which stays on rank 0's device
    (where it is clustered: no round trip through the host); the other ranks return None.
    """
    model.eval()
    fc = model.feature_dim
    if rt.distributed:
        n_local = len(loader.dataset)
        store = util.FeatureStore(n_local, fc, rt.device, args.features_dtype)
        local_idx = torch.empty(n_local, dtype=torch.long)  # (n_local,) dataset index of each row
    else:
        store_on = rt.device if args.features_on == "device" else torch.device("cpu")
        store = util.FeatureStore(N, fc, store_on, args.features_dtype)
    pos = 0
    for imgs, idx in tqdm(loader, desc="features", leave=False, disable=_no_bar(args)):
        imgs = imgs.to(rt.device, non_blocking=True)  # host -> device: ordered on the stream, safe
        if args.channels_last:
            imgs = util.to_channels_last(imgs)
        with torch.autocast(rt.device.type, dtype=torch.bfloat16, enabled=args.amp):
            out = model.forward_features(imgs)  # (B, D)
        checkpoint.fault_point("features")
        if args.bad_images == "skip" and bool((idx < 0).any()):
            out, idx = data.mark_unreadable(out, idx, loader.dataset, args.exp)
        if rt.distributed:
            b = len(idx)
            store.write(torch.arange(pos, pos + b), out.float())
            local_idx[pos:pos + b] = idx
            pos += b
        else:
            store.write(idx, out.float())
    if rt.distributed:
        full = util.gather_rows(store.tensor, local_idx, N, rt)
        del store
        if full is None:
            return None
    else:
        full = store.tensor
    # host float32 stays a numpy array (the original's representation, no copy)
    return full.numpy() if full.device.type == "cpu" and full.dtype == torch.float32 else full


def _no_bar(args: argparse.Namespace) -> bool | None:
    return True if args.no_progress else None  # None: auto, off when not a TTY


def make_clusterer(args: argparse.Namespace, device: torch.device):
    if args.clustering == "PIC":
        return clustering.PIC(pca=args.pca, device=device)
    return clustering.Kmeans(args.nmb_cluster, backend=args.cluster_backend, niter=args.kmeans_iters,
                             pca=args.pca, device=device)


def cluster(features: np.ndarray | None, clusterer, args: argparse.Namespace,
            rt: util.Runtime) -> tuple[float, list[list[int]], np.ndarray]:
    """PCA-whiten, L2-normalise and cluster on rank 0; every rank gets the same result.

    Returns (clustering loss, images_lists, (N,) cluster id per image). The k-means seed is drawn from the seeded
    numpy RNG on every rank (as the original did per call), so the ranks' RNGs stay in step.
    """
    clusterer.seed = int(np.random.randint(1234))
    checkpoint.fault_point("clustering")
    if rt.is_main:
        n_rows = len(features)
        kept = readable_rows(features) if args.bad_images == "skip" else None
        if kept is not None:
            features = features[kept if isinstance(features, np.ndarray) else torch.as_tensor(kept, device=features.device)]
        loss = float(clusterer.cluster(features, verbose=args.verbose))
        lists = clusterer.images_lists
        if kept is None:
            labels = clustering.arrange_clustering(lists)
        else:  # back to dataset indices; unreadable images get no cluster (-1)
            lists = [kept[np.asarray(lst, dtype=np.int64)].tolist() for lst in lists]
            labels = np.full(n_rows, -1, dtype=np.int64)
            for c, lst in enumerate(lists):
                labels[lst] = c
        k = len(lists)
        meta = np.array([loss, k], dtype=np.float64)
    else:
        labels, meta = None, None
    if not rt.distributed:
        return loss, lists, labels
    labels = util.broadcast_array(labels, rt)
    loss, k = util.broadcast_array(meta, rt, dtype=torch.float64)
    return float(loss), clustering.labels_to_lists(labels, int(k)), labels


def readable_rows(features: np.ndarray | torch.Tensor) -> np.ndarray | None:
    """Indices of the rows not marked unreadable (NaN), or None when every row is readable."""
    col = features[:, 0]
    nan = np.isnan(col) if isinstance(col, np.ndarray) else torch.isnan(col).cpu().numpy()
    return np.flatnonzero(~nan) if nan.any() else None


def draw_samples(images_lists: list[list[int]], N: int, args: argparse.Namespace, rt: util.Runtime) -> np.ndarray:
    """int(reassign * N) dataset indices, uniform over the non-empty clusters.

    Under torchrun the count is cut to a multiple of W so every rank runs as many steps.
    Drawn from the seeded global numpy RNG, identically on every rank.
    """
    n_draws = max(rt.world_size, int(args.reassign * N) // rt.world_size * rt.world_size)
    return util.UnifLabelSampler(n_draws, images_lists).indexes


def make_train_loader(dataset: data.IndexedImageFolder, images_lists: list[list[int]], draws: np.ndarray,
                      epoch: int, args: argparse.Namespace, rt: util.Runtime, start: int = 0) -> DataLoader:
    """Pseudo-labelled loader over this rank's share of the epoch's draws.

    Rank r serves draws r, r + W, ... (each drawn by exactly one rank), from its
    ``start``-th one on (mid-epoch resume); every draw carries its own augmentation seed.
    """
    order = "index" if args.sampler == "uniform" else "cluster"
    if args.bad_images == "skip":
        dataset = data.StandIns(dataset, images_lists, args.exp)
    train_set = clustering.cluster_assign(images_lists, dataset,
                                          data.train_transform(args.size, args.crop_min_scale), order=order)
    sampler = util.SeededShardSampler(draws, base_seed=args.seed * 100_003 + epoch, rank=rt.rank,
                                      world_size=rt.world_size, start=start)
    return make_loader(train_set, args, rt, sampler=sampler, seed=args.seed + epoch)


def reset_top_layer(model: models.DeepClusterNet, k: int, args: argparse.Namespace) -> torch.optim.SGD:
    """New Linear(4096, k) head (cluster ids have no meaning across epochs) and its own SGD."""
    top = model.reset_top_layer(k)
    return torch.optim.SGD(top.parameters(), lr=args.lr, weight_decay=10 ** args.wd)


class DivergedError(RuntimeError):
    """The training loss became NaN or inf."""


# Steps between two host reads of the training loss. A read (loss.item(), a NaN test in
# Python) waits for the GPU to finish the step, which stalls the pipeline if done every step.
SYNC_EVERY = 50


def train_one_epoch(loader: DataLoader, model: nn.Module, crit: nn.Module,
                    opt: torch.optim.Optimizer, top_opt: torch.optim.Optimizer, device: torch.device,
                    epoch: int, args: argparse.Namespace, on_iteration=None, start_iter: int = 0,
                    losses: util.AverageMeter | None = None) -> float:
    """One pass over the pseudo-labelled loader; returns the average loss.

    ``model`` may be the network or its DistributedDataParallel wrapper. The loss is summed
    and tested for NaN/inf on the device; the host reads both every ``SYNC_EVERY`` steps,
    before a checkpoint and at the end, so a diverged run still stops (naming the range of
    iterations) before any checkpoint of its weights is written. ``on_iteration(i, flush)``
    runs before step i (i counted from the start of the epoch, ``start_iter`` when resuming
    inside it), where the periodic checkpoints are written; ``flush()`` reads the device
    sums and returns the up-to-date meter.
    """
    model.train()
    losses = losses or util.AverageMeter()
    bar = tqdm(loader, desc=f"train {epoch}", leave=False, disable=_no_bar(args),
               initial=start_iter, total=start_iter + len(loader))
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)   # sum of loss * batch since the last read
    finite = torch.ones((), dtype=torch.bool, device=device)         # every loss since the last read finite
    st = {"n": 0, "from": start_iter, "i": start_iter}               # images and first step since the last read

    def flush() -> util.AverageMeter:
        if st["n"]:
            ok = finite.to(torch.int32)
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                # every rank reads at the same steps: all stop together, none left waiting in a collective
                torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)
            if not bool(ok):
                raise DivergedError(f"training loss is {float(loss_sum)} at epoch {epoch}, between iterations "
                                    f"{st['from']} and {st['i'] - 1}: the run diverged (try a lower --lr); "
                                    f"the last checkpoint is kept")
            # raw sums (exact in float64: float32 losses times batch sizes), so the epoch's mean does
            # not depend on where the reads fell (a resume reads at other steps than a straight run)
            total = float(loss_sum)
            losses.val = total / st["n"]
            losses.sum += total
            losses.count += st["n"]
            losses.avg = losses.sum / losses.count
            loss_sum.zero_()
            st["n"] = 0
            bar.set_postfix(loss=f"{losses.avg:.3f}")
        st["from"] = st["i"]
        return losses

    try:
        for i, (imgs, target, _) in enumerate(bar, start=start_iter):
            st["i"] = i
            if on_iteration is not None:
                on_iteration(i, flush)
            if i - st["from"] >= SYNC_EVERY:
                flush()
            checkpoint.fault_point("train")
            # host -> device copies from pinned memory: ordered before the kernels that use them
            imgs, target = imgs.to(device, non_blocking=True), target.to(device, non_blocking=True)
            if args.channels_last:
                imgs = util.to_channels_last(imgs)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
                loss = crit(model(imgs), target)
            opt.zero_grad(set_to_none=True)
            top_opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            top_opt.step()
            finite &= torch.isfinite(loss.detach())
            loss_sum += loss.detach().double() * imgs.shape[0]
            st["n"] += imgs.shape[0]
            st["i"] = i + 1
    except data.BadImageError:  # --bad_images error: the steps done so far count in the meter
        flush()
        raise
    flush()
    return losses.avg


def wrap_for_training(model: models.DeepClusterNet, rt: util.Runtime) -> nn.Module:
    """DistributedDataParallel around the whole network under torchrun (rebuilt every epoch,
    since the top layer is new each epoch); the bare network otherwise."""
    if not rt.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP
    return DDP(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)


def nmi(a: np.ndarray, b: np.ndarray) -> float:
    """Normalised mutual information, I(A;B) / sqrt(H(A) H(B)), over the images with a label
    in both (-1: an unreadable image, left out of a clustering)."""
    a, b = np.asarray(a), np.asarray(b)
    keep = (a >= 0) & (b >= 0)
    if not keep.all():
        a, b = a[keep], b[keep]
    return float(normalized_mutual_info_score(a, b, average_method="geometric"))


def setup_knn(args: argparse.Namespace, rt: util.Runtime):
    """The --knn_data monitor (eval_knn.KnnMonitor) on rank 0, None when off or on other ranks.

    Every rank checks the folders, so a bad --knn_data stops all of them before training; the
    demo's split of the digits is exported on first use. The monitor has its own seeded
    generator: enabling it changes nothing in training.
    """
    if not args.knn_data:
        return None
    import eval_knn
    if args.demo and args.knn_data == DEMO_KNN_DATA:
        if rt.is_main:
            data.export_digits_split(args.knn_data)
        _barrier(rt)
    args.knn_data = os.path.abspath(args.knn_data)
    monitor = eval_knn.KnnMonitor(args.knn_data, args.knn_train_size, args.knn_val_size, seed=args.seed,
                                  size=args.size, k=args.knn_k, batch=args.batch, workers=args.workers,
                                  load=rt.is_main, no_progress=args.no_progress, logger=log,
                                  whiten=args.knn_whiten)
    log.info("kNN monitor: %d train, %d val images of %s, k=%d", len(monitor.train_paths),
             len(monitor.val_paths), args.knn_data, monitor.ks[0])
    return monitor if rt.is_main else None


def knn_stage(monitor, model: models.DeepClusterNet, rt: util.Runtime) -> dict:
    """``{knn_top1, knn_top5, time_knn}`` of the current network ({} when the monitor is off)."""
    return {} if monitor is None else monitor.evaluate(model, rt.device)


def _knn_text(r: dict) -> str:
    return f" knn {r['time_knn']:.1f}s | kNN top-1 {r['knn_top1']:.2f} top-5 {r['knn_top5']:.2f}" \
        if "knn_top1" in r else ""


# ---------------------------------------------------------------------------------------
# orchestration
# ---------------------------------------------------------------------------------------
@dataclass
class EpochPlan:
    """What one epoch trains on: its clustering, draws and head, and where training starts."""
    labels: np.ndarray                 # (N,) cluster id per image
    images_lists: list[list[int]]      # images of each cluster
    clustering_loss: float
    draws: np.ndarray                  # (n_draws,) dataset indices of the epoch, all ranks
    top_opt: torch.optim.Optimizer     # SGD of the new top layer
    start_iter: int = 0                # > 0 when resuming inside the epoch
    losses: util.AverageMeter = field(default_factory=util.AverageMeter)
    time_features: float = 0.0
    time_clustering: float = 0.0


def plan_epoch(feature_loader: DataLoader, model: models.DeepClusterNet, clusterer, N: int,
               args: argparse.Namespace, rt: util.Runtime) -> EpochPlan:
    """Features -> clustering -> pseudo-labels, draws and a fresh top layer.

    Under torchrun every rank first takes rank 0's weights and BatchNorm statistics, so that
    every share of the features comes from the same network. Stage times are read after a
    device synchronisation (CUDA kernels run asynchronously).
    """
    util.broadcast_module_state(model, rt)
    t0 = _now(rt.device)
    features = compute_features(feature_loader, model, N, rt, args)
    t1 = _now(rt.device)
    if rt.device.type == "cuda" and rt.is_main:  # to check against util.gather_peak_bytes
        log.debug("GPU memory peak after feature extraction: %.2f GiB",
                  torch.cuda.max_memory_allocated(rt.device) / 2 ** 30)
    clus_loss, images_lists, labels = cluster(features, clusterer, args, rt)
    del features
    draws = draw_samples(images_lists, N, args, rt)
    top_opt = reset_top_layer(model, len(images_lists), args)
    return EpochPlan(labels, images_lists, clus_loss, draws, top_opt,
                     time_features=t1 - t0, time_clustering=_now(rt.device) - t1)


def _now(device: torch.device) -> float:
    """Wall clock after the device has finished its queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.time()


def epoch_record(epoch: int, plan: EpochPlan, loss: float, time_train: float, iterations: int,
                 prev_labels: np.ndarray | None, targets: np.ndarray | None, rt: util.Runtime) -> dict:
    """One line of exp/log.jsonl."""
    return {
        "epoch": epoch, "clustering_loss": plan.clustering_loss, "train_loss": loss,
        "nmi_prev": None if prev_labels is None else nmi(prev_labels, plan.labels),
        "nmi_labels": None if targets is None else nmi(targets, plan.labels),  # images without a cluster left out
        "n_clusters": len(plan.images_lists),
        "n_empty": int(sum(1 for lst in plan.images_lists if len(lst) == 0)),
        "time_features": plan.time_features, "time_clustering": plan.time_clustering, "time_train": time_train,
        "time_epoch": plan.time_features + plan.time_clustering + time_train,
        "iterations": iterations, "world_size": rt.world_size,
    }


def open_dataset(args: argparse.Namespace, rt: util.Runtime) -> data.IndexedImageFolder:
    """Scan DIR (the demo's digits when no DIR is given): a missing or empty folder is refused
    before anything is written."""
    if args.demo:
        args.data = data.export_digits(Path("data") / "digits") if rt.is_main else str(Path("data") / "digits")
        _barrier(rt)
    args.data = os.path.abspath(args.data)  # args.json then points at the data from anywhere
    return data.IndexedImageFolder(args.data, transform=data.eval_transform(args.size))


def check_dataset(dataset: data.IndexedImageFolder, args: argparse.Namespace, exp: Path,
                  rt: util.Runtime) -> data.IndexedImageFolder:
    """Check the images and k against the data."""
    if args.demo:
        log.info("demo: no DIR given, training on scikit-learn's digits exported to %s", args.data)
    dataset = load_dataset(dataset, args, exp, rt)
    if args.clustering == "Kmeans" and args.nmb_cluster > len(dataset):
        raise clustering.ClusteringError(f"--nmb_cluster/--k {args.nmb_cluster} is larger than the number "
                                         f"of images ({len(dataset)}) in {args.data}")
    if args.clustering == "Kmeans" and args.nmb_cluster == 1:
        log.warning("--k 1 puts every image in one cluster: the training loss is 0 and nothing is learned")
    log.info("%d images%s, %s%s at %d px, %d process(es) on %s", len(dataset),
             f" in {len(dataset.classes)} class folders" if dataset.targets else "",
             args.arch, " + Sobel" if args.sobel else "", args.size, rt.world_size, rt.device)
    return dataset


def start_or_resume(args: argparse.Namespace, exp: Path, model, opt, history: util.Logger,
                    clog: util.ClusterLog, N: int, rt: util.Runtime) -> tuple[str, int, dict | None, np.ndarray | None]:
    """(run id, start epoch, mid-epoch state or None, previous assignment or None).

    --resume: the checkpoint is checked, then the logs of the epochs to redo are dropped.
    Without it, a folder that holds a run is refused unless --overwrite, which retires the
    old checkpoints and logs. Every invocation is appended to EXP/args_history.jsonl.
    """
    if args.resume:
        start, mid, prev, ckpt = checkpoint.restore_run(args, model, opt, history, clog, N, rt)
        run_id = ckpt.get("run_id") or checkpoint.current_run_id(exp) or checkpoint.new_run_id()
        if start >= args.epochs:
            return run_id, start, mid, prev
        if rt.is_main:
            if not (exp / "args.json").exists():
                checkpoint.atomic_write_text(exp / "args.json", json.dumps(vars(args), indent=1, default=str))
            checkpoint.record_invocation(exp, args, run_id, start, ckpt.get("iteration", 0), ckpt["path"])
        return run_id, start, mid, prev
    used = checkpoint.exp_holds_run(exp)
    if used and not args.overwrite:
        raise checkpoint.CheckpointError(
            f"{args.exp} already holds a run ({used[0]}): continue it with --resume {args.exp}, use a new "
            f"--exp, or start over with --overwrite (deletes its checkpoints, log and cluster files)")
    if args.start_epoch >= args.epochs:
        return "", args.start_epoch, None, None
    run_id = checkpoint.new_run_id()
    if rt.is_main:
        if used:
            log.warning("--overwrite: deleting the checkpoints, log and cluster files of the run in %s", args.exp)
            checkpoint.retire_run(exp)
        history.truncate(0)
        clog.truncate(0)
        checkpoint.atomic_write_text(exp / "args.json", json.dumps(vars(args), indent=1, default=str))
        checkpoint.record_invocation(exp, args, run_id, args.start_epoch)
    return run_id, args.start_epoch, None, None


def resumed_plan(mid: dict, model: models.DeepClusterNet, args: argparse.Namespace,
                 rt: util.Runtime) -> EpochPlan:
    """The plan of an epoch interrupted inside training, from a periodic checkpoint."""
    fields = checkpoint.restore_epoch(mid, model, args, rt.world_size)
    losses = util.AverageMeter()  # the exact partial sum, so the epoch's mean is bitwise the same
    losses.sum, losses.count = fields.pop("loss_sum"), fields.pop("loss_count")
    losses.avg = losses.sum / losses.count if losses.count else 0.0
    return EpochPlan(**fields, losses=losses)


class SetupError(util.ScriptError):
    """Flags that cannot work with this launch (e.g. --batch not divisible by the processes)."""


def main(args: argparse.Namespace) -> dict:
    """Run DeepCluster; returns the last epoch's log record."""
    rt = util.init_runtime(args.device, timeout_min=args.dist_timeout)
    if args.batch % rt.world_size:
        raise SetupError(f"--batch {args.batch} is the global mini-batch and must be a multiple of the number of "
                         f"processes {rt.world_size} (each takes batch / {rt.world_size} images per step)")
    util.configure_backends()
    exp = Path(args.exp)
    dataset = open_dataset(args, rt)
    checkpoint.check_exp_writable(exp, rt)
    setup_logging(exp, args.verbose, rt.is_main)
    if not rt.is_main:  # one set of progress bars, rank 0's
        args.no_progress = True
    util.seed_everything(args.seed, rt.rank)
    knn = setup_knn(args, rt)  # a bad --knn_data stops here, before any training
    dataset = check_dataset(dataset, args, exp, rt)
    N = len(dataset)
    targets = np.asarray(dataset.targets) if dataset.targets else None
    dataset.mark_unreadable = args.bad_images == "skip"

    model = build_model(args, rt.device)
    opt = build_optimizer(model, args)
    crit = nn.CrossEntropyLoss()
    clog, history = util.ClusterLog(exp / "clusters"), util.Logger(exp / "log.jsonl")
    run_id, start_epoch, mid, prev_labels = start_or_resume(args, exp, model, opt, history, clog, N, rt)
    if start_epoch >= args.epochs:
        log.warning("nothing to train: %s", f"the checkpoint is at epoch {start_epoch} and --epochs is "
                    f"{args.epochs} (the run is finished; raise --epochs to train further)" if args.resume
                    else f"--epochs {args.epochs} (start epoch {start_epoch})")
        return {}
    feature_loader = make_feature_loader(dataset, args, rt)
    clusterer = make_clusterer(args, rt.device)

    record: dict = {}
    if start_epoch == 0 and mid is None and (init := knn_stage(knn, model, rt)):
        history.log({"epoch": -1, **init})  # epoch -1: the random network, before any training
        log.info("random network |%s", _knn_text(init))
    for epoch in range(start_epoch, args.epochs):
        if mid is not None:  # resuming inside this epoch: its clustering is in the checkpoint
            plan, mid = resumed_plan(mid, model, args, rt), None
        else:
            plan = plan_epoch(feature_loader, model, clusterer, N, args, rt)
        t2 = _now(rt.device)
        # step i of the epoch covers draws [i * batch, (i + 1) * batch) on any number of processes
        train_loader = make_train_loader(dataset, plan.images_lists, plan.draws, epoch, args, rt,
                                         start=plan.start_iter * rank_batch(args, rt))
        iters_per_epoch = math.ceil(len(plan.draws) / args.batch)

        seen: list[int] = []  # the last step started

        def periodic_checkpoint(i: int, flush) -> None:
            seen[:] = [i]
            n = iters_per_epoch * epoch + i
            if n % args.checkpoints == 0:  # the same decision on every rank: all take part in the RNG gather
                meter = flush()
                rng = checkpoint.gather_rng_states(rt)
                if rt.is_main:
                    state = checkpoint.checkpoint_state(
                        model, opt, epoch, args, plan.labels, rng_ranks=rng, run_id=run_id,
                        mid_epoch=checkpoint.mid_epoch_state(plan, i, meter, prev_labels, args, rt))
                    checkpoint.save_checkpoint(state, exp / "checkpoints" / f"checkpoint_{n // args.checkpoints}.pth.tar", rt)

        try:
            loss = train_one_epoch(train_loader, wrap_for_training(model, rt), crit, opt, plan.top_opt, rt.device,
                                   epoch, args, on_iteration=periodic_checkpoint, start_iter=plan.start_iter,
                                   losses=plan.losses)
        except data.BadImageError:  # --bad_images error: stop where a resume can continue
            i = seen[0] + 1 if seen else plan.start_iter  # the batch that failed; steps before it are done
            state = checkpoint.checkpoint_state(
                model, opt, epoch, args, plan.labels, run_id=run_id, rng_ranks=checkpoint.gather_rng_states(rt),
                mid_epoch=checkpoint.mid_epoch_state(plan, i, plan.losses, prev_labels, args, rt))
            checkpoint.save_checkpoint(state, exp / "checkpoints" / "checkpoint_stopped.pth.tar", rt)
            raise
        time_train = _now(rt.device) - t2
        knn_record = knn_stage(knn, model, rt)  # before the history and the save: a kill here redoes the epoch
        record = {**epoch_record(epoch, plan, loss, time_train, iters_per_epoch, prev_labels, targets, rt),
                  **knn_record}
        if rt.is_main:
            # history before the checkpoint: killed in between, the resumed run redoes this
            # epoch from the previous checkpoint and writes these files again
            clog.save(epoch, plan.labels, len(plan.images_lists))
            history.log(record)
        rng = checkpoint.gather_rng_states(rt)  # a collective: every rank takes part
        checkpoint.save_checkpoint(checkpoint.checkpoint_state(model, opt, epoch + 1, args, plan.labels, run_id=run_id,
                                                               rng_ranks=rng), exp / "checkpoint.pth.tar", rt)
        log.info("epoch %3d | clustering loss %.3f | train loss %.3f | NMI prev %s | NMI labels %s | "
                 "empty %d | time: features %.1fs cluster %.1fs train %.1fs%s",
                 epoch, plan.clustering_loss, loss, _fmt(record["nmi_prev"]), _fmt(record["nmi_labels"]),
                 record["n_empty"], plan.time_features, plan.time_clustering, time_train, _knn_text(record))
        prev_labels = plan.labels
    _barrier(rt)
    if args.report and rt.is_main:
        draw_report(exp)
    return record


def draw_report(exp: Path) -> None:
    """PNG curves, cluster sizes and cluster samples under exp/report (visu/report.py)."""
    try:
        from visu import report
    except ImportError:
        log.warning("training report unavailable (visu/report.py missing)")
        return
    report.main(report.get_args_parser().parse_args([str(exp)]))


def _barrier(rt: util.Runtime) -> None:
    if rt.distributed:
        import torch.distributed as dist
        dist.barrier()


def _fmt(x: float | None) -> str:
    return "  -  " if x is None else f"{x:.3f}"


def run(argv: list[str] | None = None) -> int:
    """Entry point: parse, run, turn known failures into one clear line and exit code 2."""
    args = parse_args(argv)
    try:
        main(args)
    except data.BadImageError as e:
        # from a DataLoader worker the message carries the worker's traceback: keep its last line
        return _fail(str(e).strip().splitlines()[-1].split("BadImageError: ")[-1]
                     + f" (fix or remove it and continue with --resume {args.exp}, or go on without it "
                       f"with --bad_images skip)")
    except (data.DataError, checkpoint.CheckpointError, clustering.ClusteringError, DivergedError,
            util.DeviceError, SetupError) as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        return _fail(interrupted_hint(args.exp), 130)
    finally:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


def interrupted_hint(exp: str) -> str:
    """What ``--resume EXP`` would load after an interruption, said plainly."""
    try:
        found = checkpoint.find_checkpoint(exp, quiet=True) if Path(exp).is_dir() else None
    except checkpoint.CheckpointError:
        found = None
    if found is None:
        return "interrupted before the first checkpoint: nothing to resume, run the same command again"
    return f"interrupted; --resume {exp} continues from {found}"


def _fail(msg: str, code: int = 2) -> int:
    """One line on stderr; the same line in EXP/train.log (not echoed a second time on the console)."""
    print(f"error: {msg}", file=sys.stderr)
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, msg, None, None)
    for h in log.handlers:
        if isinstance(h, logging.FileHandler):
            h.handle(record)
    return code


if __name__ == "__main__":
    sys.exit(run())
