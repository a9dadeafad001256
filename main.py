"""DeepCluster: unsupervised training of a convnet by alternating k-means and classification.

Usage:
    python main.py DIR [--arch alexnet] [--sobel] [--k 10000] [--exp exp] [...]
    python main.py                      # demo: scikit-learn's digits, on CPU, in minutes
    python main.py DIR --exp exp --resume exp/checkpoint.pth.tar

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

import clustering
import data
import fastpath
import models
import util

log = logging.getLogger("deepcluster")

# Settings of the no-argument demo (scikit-learn's 1,797 digits, on a 2-core CPU).
# Digits are 8x8 strokes: crops of 8% of the image (the paper's RandomResizedCrop) would
# keep almost nothing of them, so the demo crops at least half of each image.
DEMO_DEFAULTS = dict(size=64, nmb_cluster=100, epochs=6, batch=64, workers=2, exp="exp_demo",
                     sobel=True, lr=0.05, crop_min_scale=0.5)


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
    g.add_argument("--pca_solver", choices=["auto", "randomized", "exact"], default="auto",
                   help="PCA eigensolver: exact (full eigendecomposition), randomized (top --pca axes by "
                        "subspace iteration, checked, exact fallback), auto (randomized when --pca is small "
                        "beside the feature dimension)")
    g.add_argument("--reassign", type=float, default=1.0,
                   help="how many epochs of training between two consecutive reassignments of clusters")
    g.add_argument("--sampler", choices=["uniform", "original"], default="uniform",
                   help="uniform: every cluster drawn equally often (the paper's intent); original: "
                        "reproduce the original code, whose sampler indices pointed at other images")

    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=float, default=0.05, help="learning rate")
    g.add_argument("--wd", type=float, default=-5, help="weight decay pow")
    g.add_argument("--momentum", type=float, default=0.9, help="momentum")
    g.add_argument("--batch", type=int, default=256, help="mini-batch size")
    g.add_argument("--epochs", type=int, default=200, help="number of total epochs to run")
    g.add_argument("--start_epoch", type=int, default=0, help="manual epoch number (useful on restarts)")
    g.add_argument("--amp", action="store_true",
                   help="bf16 autocast for feature extraction and training (changes numerics slightly; "
                        "slower on CPUs without bf16 support)")
    g.add_argument("--channels_last", action=argparse.BooleanOptionalAction, default=True,
                   help="channels-last memory format for the convnet (same results within 1e-4, faster "
                        "on CPU; --no-channels_last: the original contiguous NCHW)")
    g.add_argument("--jpeg_draft", action=argparse.BooleanOptionalAction, default=True,
                   help="feature pass: decode JPEGs at least twice the resize target at reduced size "
                        "(libjpeg DCT scaling); --no-jpeg_draft decodes every image in full")
    g.add_argument("--features_dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                   help="storage of the (N, 4096) feature matrix (float16 halves it; see README)")
    g.add_argument("--features_on", choices=["host", "device"], default="host",
                   help="keep the feature matrix in host RAM (the original) or on the GPU, where the "
                        "PyTorch clustering backend then runs without a host copy")

    g = p.add_argument_group("run")
    g.add_argument("--workers", type=int, default=4, help="number of data loading workers")
    g.add_argument("--exp", type=str, default="exp", help="path to exp folder")
    g.add_argument("--resume", default="", type=str, metavar="PATH",
                   help="path to checkpoint, or an experiment folder (its newest valid checkpoint, "
                        "periodic mid-epoch copies included)")
    g.add_argument("--checkpoints", type=int, default=25000, help="how many iterations between two checkpoints")
    g.add_argument("--seed", type=int, default=31, help="random seed")
    g.add_argument("--check_images", choices=["auto", "full", "header", "off"], default="auto",
                   help="check every image before training: full decode, header only, or not "
                        "(auto: full up to 20,000 images, else header)")
    g.add_argument("--bad_images", choices=["error", "skip"], default="error",
                   help="unreadable images: refuse to start (naming them), or train without them "
                        "(listed in EXP/bad_images.txt)")
    g.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto", help="where to run")
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
        ("--checkpoints", args.checkpoints >= 1, args.checkpoints, "must be >= 1 (iterations)"),
        ("--crop_min_scale", 0 < args.crop_min_scale <= 1, args.crop_min_scale, "must be in (0, 1]"),
        ("--pca", args.pca >= 1, args.pca, "must be >= 1"),
        ("--kmeans_iters", args.kmeans_iters >= 1, args.kmeans_iters, "must be >= 1"),
        ("--size", args.size >= (64 if args.arch == "alexnet" else 32), args.size,
         "is too small for the architecture (alexnet needs >= 64, vgg16 >= 32)"),
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
    log.handlers.clear()
    fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    handlers = [logging.StreamHandler(sys.stdout)]
    if is_main:
        handlers.append(logging.FileHandler(exp / "train.log"))
    for h in handlers:
        h.setFormatter(fmt)
        log.addHandler(h)
    log.propagate = False


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    np.random.seed(seed)
    import random
    random.seed(seed)


def build_model(args: argparse.Namespace, device: torch.device) -> models.DeepClusterNet:
    model = models.build_model(args.arch, sobel=args.sobel, bn=True, out=args.nmb_cluster, input_size=args.size)
    model = model.to(device)
    return fastpath.to_channels_last(model) if args.channels_last else model


def build_optimizer(model: models.DeepClusterNet, args: argparse.Namespace) -> torch.optim.SGD:
    """SGD over the body, built once: its momentum carries across epochs."""
    return torch.optim.SGD(model.body_parameters(), lr=args.lr, momentum=args.momentum,
                           weight_decay=10 ** args.wd)


def make_loader(dataset, args: argparse.Namespace, device: torch.device, sampler=None,
                seed: int = 0) -> DataLoader:
    # An explicit generator: creating the iterator then draws nothing from the global RNG,
    # so a resumed run's dropout masks stay in step with an uninterrupted one.
    return DataLoader(dataset, batch_size=args.batch, shuffle=False, sampler=sampler,
                      num_workers=args.workers, pin_memory=device.type == "cuda",
                      persistent_workers=False, generator=torch.Generator().manual_seed(seed))


def load_dataset(args: argparse.Namespace, exp: Path, rt: util.Runtime) -> data.IndexedImageFolder:
    """Scan DIR and check its images before any training (SPEC 7: no crash hours later).

    ``--check_images auto`` decodes every image when there are at most 20,000, else reads
    headers only (truncated files then fail at first use, with the file named).
    """
    dataset = data.IndexedImageFolder(args.data, transform=data.eval_transform(args.size),
                                      draft=data.eval_resize(args.size) if args.jpeg_draft else None)
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
        util.atomic_write_text(exp / "bad_images.txt", listing)
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
    return make_loader(part, args, rt.device)


@torch.no_grad()
def compute_features(loader: DataLoader, model: models.DeepClusterNet, N: int, rt: util.Runtime,
                     args: argparse.Namespace) -> np.ndarray | torch.Tensor | None:
    """(N, 4096) float32 pre-ReLU fc7 features, row i = image i (written by index).

    Under torchrun each rank extracts its share and rank 0 receives the whole matrix;
    the other ranks return None.
    """
    model.eval()
    store_on = rt.device if args.features_on == "device" else torch.device("cpu")
    # single process: rows go straight into the (N, 4096) store; under torchrun each rank
    # keeps its rows and rank 0 gathers them
    store = None if rt.distributed else fastpath.FeatureStore(N, models.common.FC_DIM, store_on, args.features_dtype)
    rows, index = [], []
    for imgs, idx in tqdm(loader, desc="features", leave=False, disable=_no_bar(args)):
        imgs = imgs.to(rt.device, non_blocking=True)
        if args.channels_last:
            imgs = fastpath.to_channels_last(imgs)
        with torch.autocast(rt.device.type, dtype=torch.bfloat16, enabled=args.amp):
            out = model.forward_features(imgs)  # (B, 4096)
        util.fault_point("features")
        if store is not None:
            store.write(idx, out.float())
        else:
            rows.append(out.float())
            index.append(idx)
    if store is not None:
        full = store.tensor
    else:
        local = torch.cat(rows) if rows else torch.zeros(0, models.common.FC_DIM, device=rt.device)
        local_idx = torch.cat(index) if index else torch.zeros(0, dtype=torch.long)
        full = util.gather_rows(local, local_idx, N, rt)
        if full is None:
            return None
        full = full.to(store_on, fastpath.feature_dtype(args.features_dtype))
    # host float32 stays a numpy array (the original's representation, no copy)
    return full.numpy() if full.device.type == "cpu" and full.dtype == torch.float32 else full


def _no_bar(args: argparse.Namespace) -> bool | None:
    return True if args.no_progress else None  # None: auto, off when not a TTY


def make_clusterer(args: argparse.Namespace, device: torch.device):
    if args.clustering == "PIC":
        return clustering.PIC(pca=args.pca, device=device)
    return clustering.Kmeans(args.nmb_cluster, backend=args.cluster_backend, niter=args.kmeans_iters,
                             pca=args.pca, device=device, pca_solver=args.pca_solver)


def cluster(features: np.ndarray | None, clusterer, args: argparse.Namespace,
            rt: util.Runtime) -> tuple[float, list[list[int]], np.ndarray]:
    """PCA-whiten, L2-normalise and cluster on rank 0; every rank gets the same result.

    Returns (clustering loss, images_lists, (N,) cluster id per image). The k-means seed is drawn from the seeded
    numpy RNG on every rank (as the original did per call), so the ranks' RNGs stay in step.
    """
    clusterer.seed = int(np.random.randint(1234))
    util.fault_point("clustering")
    if rt.is_main:
        loss = float(clusterer.cluster(features, verbose=args.verbose))
        labels, k = clustering.arrange_clustering(clusterer.images_lists), len(clusterer.images_lists)
        meta = np.array([loss, k], dtype=np.float64)
    else:
        labels, meta = None, None
    if not rt.distributed:
        return loss, clusterer.images_lists, labels
    labels = util.broadcast_array(labels, rt)
    loss, k = util.broadcast_array(meta, rt, dtype=torch.float64)
    return float(loss), clustering.labels_to_lists(labels, int(k)), labels


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
    train_set = clustering.cluster_assign(images_lists, dataset,
                                          data.train_transform(args.size, args.crop_min_scale), order=order)
    sampler = util.SeededShardSampler(draws, base_seed=args.seed * 100_003 + epoch, rank=rt.rank,
                                      world_size=rt.world_size, start=start)
    return make_loader(train_set, args, rt.device, sampler=sampler, seed=args.seed + epoch)


def reset_top_layer(model: models.DeepClusterNet, k: int, args: argparse.Namespace) -> torch.optim.SGD:
    """New Linear(4096, k) head (cluster ids have no meaning across epochs) and its own SGD."""
    top = model.reset_top_layer(k)
    return torch.optim.SGD(top.parameters(), lr=args.lr, weight_decay=10 ** args.wd)


class DivergedError(RuntimeError):
    """The training loss became NaN or inf."""


def train_one_epoch(loader: DataLoader, model: nn.Module, crit: nn.Module,
                    opt: torch.optim.Optimizer, top_opt: torch.optim.Optimizer, device: torch.device,
                    epoch: int, args: argparse.Namespace, on_iteration=None, start_iter: int = 0,
                    losses: util.AverageMeter | None = None) -> float:
    """One pass over the pseudo-labelled loader; returns the average loss.

    ``model`` may be the network or its DistributedDataParallel wrapper. ``on_iteration(i,
    losses)`` runs before step i (i counted from the start of the epoch, ``start_iter`` when
    resuming inside it), where the periodic checkpoints are written.
    """
    model.train()
    losses = losses or util.AverageMeter()
    bar = tqdm(loader, desc=f"train {epoch}", leave=False, disable=_no_bar(args),
               initial=start_iter, total=start_iter + len(loader))
    for i, (imgs, target, _) in enumerate(bar, start=start_iter):
        if on_iteration is not None:
            on_iteration(i, losses)
        util.fault_point("train")
        imgs, target = imgs.to(device, non_blocking=True), target.to(device, non_blocking=True)
        if args.channels_last:
            imgs = fastpath.to_channels_last(imgs)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
            loss = crit(model(imgs), target)
        if not torch.isfinite(loss):
            raise DivergedError(f"training loss is {loss.item()} at epoch {epoch}, iteration {i}: "
                                f"the run diverged (try a lower --lr); the last checkpoint is kept")
        opt.zero_grad(set_to_none=True)
        top_opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        top_opt.step()
        losses.update(loss.item(), imgs.shape[0])
        bar.set_postfix(loss=f"{losses.avg:.3f}")
    return losses.avg


def checkpoint_state(model: models.DeepClusterNet, opt: torch.optim.Optimizer, epoch: int,
                     args: argparse.Namespace, labels: np.ndarray | None, mid_epoch: dict | None = None) -> dict:
    """Everything a restart needs, as plain types and tensors (weights_only-loadable).

    End of epoch: ``epoch`` is the next epoch to run. Inside an epoch (periodic copies),
    ``epoch`` is the running one and ``mid_epoch`` holds its pseudo-labels, draws, position,
    top-layer optimizer and partial loss, so that training continues exactly there.
    """
    state = {
        "epoch": epoch,
        "iteration": 0 if mid_epoch is None else mid_epoch["iteration"],
        "arch": args.arch,
        "state_dict": model.state_dict(),
        "optimizer": opt.state_dict(),
        "model_config": model.config(),
        "args": {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, type(None)))},
        "rng": util.get_rng_state(),
        "last_assignment": None if labels is None else torch.from_numpy(labels.astype(np.int64)),
        "format_version": 2,
    }
    if mid_epoch is not None:
        state["mid_epoch"] = mid_epoch
    return state


def save_checkpoint(state: dict, path: Path, rt: util.Runtime) -> None:
    """Write a checkpoint atomically (temporary file + rename), on rank 0 only.

    A failed write (full disk, read-only folder) leaves the previous file intact and is
    reported as a CheckpointError naming the path.
    """
    if not rt.is_main:
        return
    try:
        util.atomic_torch_save(state, path)
    except OSError as e:
        raise util.CheckpointError(f"cannot write checkpoint {str(path)!r}: {e.strerror or e}; "
                                   f"the previous checkpoint there is intact") from None


def wrap_for_training(model: models.DeepClusterNet, rt: util.Runtime) -> nn.Module:
    """DistributedDataParallel around the whole network under torchrun (rebuilt every epoch,
    since the top layer is new each epoch); the bare network otherwise."""
    if not rt.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP
    return DDP(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)


def nmi(a: np.ndarray, b: np.ndarray) -> float:
    """Normalised mutual information, I(A;B) / sqrt(H(A) H(B))."""
    return float(normalized_mutual_info_score(a, b, average_method="geometric"))


def find_checkpoint(path: str) -> str | None:
    """``--resume`` target: a file, or an experiment folder whose newest valid checkpoint
    (exp/checkpoint.pth.tar or a periodic copy, by epoch and iteration) is taken; corrupt
    files are skipped with a warning. A folder with no checkpoint at all (a run stopped
    before its first save) gives None: the run starts from the beginning."""
    p = Path(path)
    if not p.is_dir():
        return path
    candidates = [p / "checkpoint.pth.tar"] + sorted((p / "checkpoints").glob("checkpoint_*.pth.tar"))
    if not any(c.exists() for c in candidates):
        log.warning("no checkpoint in %s yet: starting from the beginning", path)
        return None
    best, best_key = None, None
    for c in candidates:
        if not c.exists():
            continue
        try:
            ck = util.torch_load(c)
        except util.CheckpointError as e:
            log.warning("skipping %s", e)
            continue
        # a periodic copy at iteration 0 of epoch e already holds epoch e's clustering
        key = (int(ck.get("epoch", 0)), int(ck.get("iteration", 0)), "mid_epoch" in ck)
        if best_key is None or key > best_key:
            best, best_key = c, key
    if best is None:
        raise util.CheckpointError(f"no valid checkpoint in experiment folder {path!r}")
    return str(best)


def resume(path: str, model: models.DeepClusterNet, opt: torch.optim.Optimizer,
           args: argparse.Namespace) -> dict:
    """Restore model, optimizer and RNG; returns the checkpoint (epoch, last assignment, ...)."""
    path = find_checkpoint(path)
    if path is None:
        return {"epoch": args.start_epoch}
    ckpt = util.torch_load(path)
    if "state_dict" not in ckpt:
        raise util.CheckpointError(f"checkpoint {path!r} has no 'state_dict'")
    ck_arch = ckpt.get("arch")
    if ck_arch is not None and ck_arch != args.arch:
        raise util.CheckpointError(f"checkpoint {path!r} holds a {ck_arch} model but --arch is {args.arch}")
    sd = util.clean_state_dict(ckpt["state_dict"])
    top = {k[len("top_layer."):]: v for k, v in sd.items() if k.startswith("top_layer.")}
    sd = {k: v for k, v in sd.items() if not k.startswith("top_layer.")}
    if ("sobel.0.weight" in sd) != bool(args.sobel):
        raise util.CheckpointError(f"checkpoint {path!r} was trained with sobel={'sobel.0.weight' in sd}, "
                                   f"but --sobel is {'on' if args.sobel else 'off'}")
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:
        raise util.CheckpointError(f"checkpoint {path!r} does not fit --arch {args.arch} --size {args.size}: "
                                   f"{str(e).splitlines()[-1].strip()}") from None
    missing = [k for k in missing if not k.startswith("top_layer") and not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise util.CheckpointError(f"checkpoint {path!r} does not fit --arch {args.arch} --size {args.size}: "
                                   f"missing {missing[:4]}, unexpected {unexpected[:4]}")
    if "optimizer" in ckpt:
        try:
            opt.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError) as e:
            log.warning("optimizer state in %s not restored (%s): momentum restarts from zero", path, e)
    if "mid_epoch" in ckpt and top:  # the running epoch's top layer comes back too
        model.reset_top_layer(top["weight"].shape[0]).load_state_dict(top)
    if "rng" in ckpt:
        util.set_rng_state(ckpt["rng"])
    log.info("=> loaded checkpoint %r (epoch %d, iteration %d)", path, ckpt.get("epoch", 0), ckpt.get("iteration", 0))
    return ckpt


# ---------------------------------------------------------------------------------------
# orchestration
# ---------------------------------------------------------------------------------------
def check_exp_writable(exp: Path, rt: util.Runtime) -> None:
    """Fail before any work if the experiment folder cannot take files (read-only, full)."""
    try:
        exp.mkdir(parents=True, exist_ok=True)
        (exp / "checkpoints").mkdir(exist_ok=True)
        probe = exp / f".write_test.{os.getpid()}"  # one per process: ranks share the folder
        probe.write_bytes(b"0" * 4096)
        probe.unlink()
    except OSError as e:
        raise util.CheckpointError(f"experiment folder {str(exp)!r} is not writable: {e.strerror or e}") from None
    if not rt.is_main:  # only rank 0 writes files, so only it cleans up
        return
    # temporary files of a save that was killed before its rename: never valid, remove them
    for stale in list(exp.glob(".tmp-*")) + list((exp / "checkpoints").glob(".tmp-*")) \
            + list((exp / "clusters").glob(".tmp-*")):
        stale.unlink(missing_ok=True)


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
    """Features -> clustering -> pseudo-labels, draws and a fresh top layer."""
    t0 = time.time()
    features = compute_features(feature_loader, model, N, rt, args)
    t1 = time.time()
    clus_loss, images_lists, labels = cluster(features, clusterer, args, rt)
    del features
    draws = draw_samples(images_lists, N, args, rt)
    top_opt = reset_top_layer(model, len(images_lists), args)
    return EpochPlan(labels, images_lists, clus_loss, draws, top_opt,
                     time_features=t1 - t0, time_clustering=time.time() - t1)


def restore_epoch(mid: dict, model: models.DeepClusterNet, args: argparse.Namespace) -> EpochPlan:
    """The plan of an epoch interrupted inside training, from a periodic checkpoint."""
    labels = mid["assignment"].numpy()
    top_opt = torch.optim.SGD(model.top_layer.parameters(), lr=args.lr, weight_decay=10 ** args.wd)
    top_opt.load_state_dict(mid["top_optimizer"])
    losses = util.AverageMeter()
    losses.update(mid["loss_sum"] / max(1, mid["loss_count"]), int(mid["loss_count"]))
    return EpochPlan(labels, clustering.labels_to_lists(labels, int(mid["n_clusters"])),
                     float(mid["clustering_loss"]), mid["draws"].numpy(), top_opt,
                     start_iter=int(mid["iteration"]), losses=losses,
                     time_features=float(mid["time_features"]), time_clustering=float(mid["time_clustering"]))


def mid_epoch_state(plan: EpochPlan, i: int, meter: util.AverageMeter, prev_labels: np.ndarray | None) -> dict:
    """What a periodic checkpoint needs to continue this epoch at step i."""
    return {"iteration": i, "assignment": torch.from_numpy(plan.labels), "n_clusters": len(plan.images_lists),
            "draws": torch.from_numpy(plan.draws), "top_optimizer": plan.top_opt.state_dict(),
            "clustering_loss": plan.clustering_loss, "loss_sum": meter.sum, "loss_count": meter.count,
            "prev_assignment": None if prev_labels is None else torch.from_numpy(prev_labels),
            "time_features": plan.time_features, "time_clustering": plan.time_clustering}


def epoch_record(epoch: int, plan: EpochPlan, loss: float, time_train: float, iterations: int,
                 prev_labels: np.ndarray | None, targets: np.ndarray | None, rt: util.Runtime) -> dict:
    """One line of exp/log.jsonl."""
    return {
        "epoch": epoch, "clustering_loss": plan.clustering_loss, "train_loss": loss,
        "nmi_prev": None if prev_labels is None else nmi(prev_labels, plan.labels),
        "nmi_labels": None if targets is None else nmi(targets, plan.labels),
        "n_clusters": len(plan.images_lists),
        "n_empty": int(sum(1 for lst in plan.images_lists if len(lst) == 0)),
        "time_features": plan.time_features, "time_clustering": plan.time_clustering, "time_train": time_train,
        "time_epoch": plan.time_features + plan.time_clustering + time_train,
        "iterations": iterations, "world_size": rt.world_size,
    }


def open_dataset(args: argparse.Namespace, exp: Path, rt: util.Runtime) -> data.IndexedImageFolder:
    """The demo's digits when no DIR is given; checks the images and k against the data."""
    if args.demo:
        args.data = data.export_digits(Path("data") / "digits") if rt.is_main else str(Path("data") / "digits")
        _barrier(rt)
        log.info("demo: no DIR given, training on scikit-learn's digits exported to %s", args.data)
    args.data = os.path.abspath(args.data)  # args.json then points at the data from anywhere
    dataset = load_dataset(args, exp, rt)
    if args.clustering == "Kmeans" and args.nmb_cluster > len(dataset):
        raise clustering.ClusteringError(f"--nmb_cluster/--k {args.nmb_cluster} is larger than the number "
                                         f"of images ({len(dataset)}) in {args.data}")
    if rt.is_main:
        util.atomic_write_text(exp / "args.json", json.dumps(vars(args), indent=1, default=str))
    log.info("%d images%s, %s%s at %d px, %d process(es) on %s", len(dataset),
             f" in {len(dataset.classes)} class folders" if dataset.targets else "",
             args.arch, " + Sobel" if args.sobel else "", args.size, rt.world_size, rt.device)
    return dataset


def restore_run(args: argparse.Namespace, model, opt, history: util.Logger, clog: util.ClusterLog,
                N: int, rt: util.Runtime) -> tuple[int, dict | None, np.ndarray | None]:
    """--resume: (start epoch, mid-epoch state or None, previous assignment); logs of the
    epochs to redo are dropped. Without --resume, an old log in --exp is started anew."""
    if not args.resume:
        if history.data and rt.is_main:
            log.warning("%s already holds a log: a fresh run (no --resume) starts it anew", args.exp)
            history.truncate(0)
            clog.truncate(0)
        return args.start_epoch, None, None
    ckpt = resume(args.resume, model, opt, args)
    start_epoch, mid = int(ckpt.get("epoch", 0)), ckpt.get("mid_epoch")
    prev = mid["prev_assignment"] if mid is not None else ckpt.get("last_assignment")
    n_ckpt = len(mid["assignment"]) if mid is not None else (len(prev) if prev is not None else N)
    if n_ckpt != N:  # the image set changed (files added, removed or skipped as unreadable)
        if mid is not None:
            raise util.CheckpointError(f"the checkpoint's epoch was clustered on {n_ckpt} images but {args.data} "
                                       f"now has {N}: resume from an end-of-epoch checkpoint instead")
        log.warning("the checkpoint was made on %d images, %s now has %d: NMI with the previous epoch "
                    "restarts", n_ckpt, args.data, N)
        prev = None
    if rt.is_main:
        history.truncate(sum(1 for r in history.data if r.get("epoch", 0) < start_epoch))
        clog.truncate(start_epoch)
    return start_epoch, mid, None if prev is None else prev.numpy()


def main(args: argparse.Namespace) -> dict:
    """Run DeepCluster; returns the last epoch's log record."""
    rt = util.init_runtime(args.device)
    exp = Path(args.exp)
    check_exp_writable(exp, rt)
    setup_logging(exp, args.verbose, rt.is_main)
    if not rt.is_main:  # one set of progress bars, rank 0's
        args.no_progress = True
    seed_everything(args.seed)
    dataset = open_dataset(args, exp, rt)
    N = len(dataset)
    targets = np.asarray(dataset.targets) if dataset.targets else None

    model = build_model(args, rt.device)
    opt = build_optimizer(model, args)
    crit = nn.CrossEntropyLoss()
    clog, history = util.ClusterLog(exp / "clusters"), util.Logger(exp / "log.jsonl")
    start_epoch, mid, prev_labels = restore_run(args, model, opt, history, clog, N, rt)
    feature_loader = make_feature_loader(dataset, args, rt)
    clusterer = make_clusterer(args, rt.device)

    record: dict = {}
    for epoch in range(start_epoch, args.epochs):
        if mid is not None:  # resuming inside this epoch: its clustering is in the checkpoint
            plan, mid = restore_epoch(mid, model, args), None
        else:
            plan = plan_epoch(feature_loader, model, clusterer, N, args, rt)
        t2 = time.time()
        train_loader = make_train_loader(dataset, plan.images_lists, plan.draws, epoch, args, rt,
                                         start=plan.start_iter * args.batch)
        iters_per_epoch = math.ceil(len(plan.draws) // rt.world_size / args.batch)

        def periodic_checkpoint(i: int, meter: util.AverageMeter) -> None:
            n = iters_per_epoch * epoch + i
            if n % args.checkpoints == 0 and rt.is_main:
                state = checkpoint_state(model, opt, epoch, args, plan.labels,
                                         mid_epoch=mid_epoch_state(plan, i, meter, prev_labels))
                save_checkpoint(state, exp / "checkpoints" / f"checkpoint_{n // args.checkpoints}.pth.tar", rt)

        loss = train_one_epoch(train_loader, wrap_for_training(model, rt), crit, opt, plan.top_opt, rt.device,
                               epoch, args, on_iteration=periodic_checkpoint, start_iter=plan.start_iter,
                               losses=plan.losses)
        time_train = time.time() - t2
        save_checkpoint(checkpoint_state(model, opt, epoch + 1, args, plan.labels), exp / "checkpoint.pth.tar", rt)
        record = epoch_record(epoch, plan, loss, time_train, iters_per_epoch, prev_labels, targets, rt)
        if rt.is_main:
            clog.save(epoch, plan.labels, len(plan.images_lists))
            history.log(record)
        log.info("epoch %3d | clustering loss %.3f | train loss %.3f | NMI prev %s | NMI labels %s | "
                 "empty %d | time: features %.1fs cluster %.1fs train %.1fs",
                 epoch, plan.clustering_loss, loss, _fmt(record["nmi_prev"]), _fmt(record["nmi_labels"]),
                 record["n_empty"], plan.time_features, plan.time_clustering, time_train)
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
        return _fail(str(e).strip().splitlines()[-1].split("BadImageError: ")[-1])
    except (data.DataError, util.CheckpointError, clustering.ClusteringError, DivergedError) as e:
        return _fail(str(e))
    except RuntimeError as e:
        if "CUDA is not available" in str(e):
            return _fail(str(e))
        raise
    except KeyboardInterrupt:
        return _fail("interrupted; resume with --resume " + str(Path(args.exp) / "checkpoint.pth.tar"), 130)
    finally:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


def _fail(msg: str, code: int = 2) -> int:
    print(f"error: {msg}", file=sys.stderr)
    log.error(msg)
    return code


if __name__ == "__main__":
    sys.exit(run())
