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
import itertools
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

import checkpoint
import cli
import clustering
import data
import distributed
import fileio
import gpu_decode
import input_cache
import knn
import models
import preempt
import tb
import train_crops
import util

log = logging.getLogger("deepcluster")

# The no-argument demo: scikit-learn's 1,797 digits on a 2-core CPU. Digits are 8x8 strokes, of which the paper's
# 8% crops keep almost nothing: the demo crops at least half. Its kNN curve uses a train/val split of the same digits.
DEMO_KNN_DATA = str(Path("data") / "digits_split")
DEMO_DEFAULTS = dict(size=64, nmb_cluster=100, epochs=6, batch=64, workers=2, exp="exp_demo",
                     sobel=True, lr=0.05, crop_min_scale=0.5, knn_data=DEMO_KNN_DATA,
                     knn_train_size=400, knn_val_size=200)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="PyTorch Implementation of DeepCluster (unsupervised training)",
                                formatter_class=cli.HelpFormatter)
    p.add_argument("data", metavar="DIR", nargs="?", default=None,
                   help="image folder, with or without class folders (only used to report NMI with the labels); "
                        "omit it to run the demo on scikit-learn's handwritten digits")
    p.add_argument("--file_list", metavar="FILE", default=None,
                   help="the images listed in FILE, one path per line (optionally PATH<TAB>LABEL), relative to DIR "
                        "when given, else to FILE's folder: the folder is never walked (for datasets too big to list)")
    g = p.add_argument_group("model")
    g.add_argument("--arch", "-a", type=str, choices=models.ARCHS, default="alexnet", help="CNN architecture")
    g.add_argument("--sobel", action="store_true", help="Sobel filtering")
    g.add_argument("--size", type=int, default=224, help="input resolution (224: the paper's)")
    g.add_argument("--crop_min_scale", type=float, default=0.08,
                   help="smallest area fraction of the training RandomResizedCrop (0.08: the paper's)")
    g = p.add_argument_group("clustering")
    g.add_argument("--clustering", type=str, choices=["Kmeans", "PIC"], default="Kmeans",
                   help="clustering algorithm; under torchrun Kmeans is sharded (each process keeps its rows), PIC "
                        "gathers the whole (N, D) matrix on rank 0 (about N x D x bytes x 1.125 there, see "
                        "docs/distributed.md)")
    g.add_argument("--nmb_cluster", "--k", type=int, default=10000, help="number of cluster for k-means")
    g.add_argument("--cluster_backend", choices=["auto", "faiss", "torch"], default="auto",
                   help="k-means implementation (auto: torch on CUDA, faiss on CPU when installed)")
    g.add_argument("--pca", type=int, default=256, help="PCA dimension before clustering")
    g.add_argument("--pca_solver", choices=["auto", "randomized", "exact"], default="auto",
                   help="exact: full eigendecomposition; randomized: top --pca axes by checked subspace iteration "
                        "(exact fallback); auto: randomized for matrices of >= 2,048 rows, at least 3.5x --pca")
    g.add_argument("--kmeans_iters", type=int, default=20, help="k-means iterations")
    g.add_argument("--reassign", type=float, default=1.0,
                   help="how many epochs of training between two consecutive reassignments of clusters")
    g.add_argument("--sampler", choices=["uniform", "original"], default="uniform",
                   help="uniform: every cluster drawn equally often (the paper's intent); original: the original "
                        "code's, whose indices pointed at other images")
    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=float, default=0.05, help="learning rate")
    g.add_argument("--wd", type=float, default=-5, help="weight decay exponent: decay = 10**wd (-5: 1e-5)")
    g.add_argument("--momentum", type=float, default=0.9, help="momentum")
    g.add_argument("--batch", type=int, default=256,
                   help="mini-batch of one SGD step; under torchrun the global one: each of the W processes takes "
                        "batch / W images")
    g.add_argument("--epochs", type=int, default=200, help="number of total epochs to run")
    g.add_argument("--start_epoch", type=int, default=0, help="manual epoch number (useful on restarts)")
    g.add_argument("--amp", action="store_true", help="bf16 autocast (changes numerics slightly)")
    g.add_argument("--channels_last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels-last convnet (same results within 1e-4; off: the original NCHW); default auto: on "
                        "for the CPU (measured faster), off on CUDA (not measured there yet: scripts/gpu_check.sh)")
    g.add_argument("--fused_sgd", action=argparse.BooleanOptionalAction, default=True,
                   help="SGD update in one fused kernel (same arithmetic up to rounding, 5x faster on CPU; "
                        "off: the original's per-tensor update)")
    g.add_argument("--jpeg_draft", action=argparse.BooleanOptionalAction, default=True,
                   help="feature pass: decode JPEGs at least twice the resize target at reduced size")
    g.add_argument("--decode", choices=["cpu", "cpu_draft", "gpu"], default="cpu",
                   help="training images: cpu: PIL in the loader workers (the original's pixels); cpu_draft: the "
                        "same, a JPEG decoded at 1/2, 1/4 or 1/8 scale when its crop is at least 2, 4 or 8 times "
                        "--size on both sides (changes those crops' pixels; none of a 500x375 image's at 224); "
                        "gpu: the workers read JPEG bytes and the run's device decodes (nvJPEG on CUDA), crops, "
                        "resizes and flips them, same crop and flip law (other formats stay on the workers)")
    g.add_argument("--features_dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                   help="storage of the (N, D) feature matrix (float16 halves it)")
    g.add_argument("--features_on", choices=["host", "device"], default="host",
                   help="feature matrix (under torchrun: each process's share) in host RAM (the original) or on "
                        "the GPU, where it is clustered")
    g.add_argument("--extract_batch", type=int, default=0,
                   help="images per process per step of the feature pass (no gradients, so it can be larger); "
                        "0: batch / W as in training")
    knn.add_monitor_args(p)
    g = p.add_argument_group("run")
    g.add_argument("--workers", type=int, default=data.default_workers(),
                   help="data loading workers per process (default: the cores this process may use, "
                        "os.sched_getaffinity, divided by the torchrun processes of the node, LOCAL_WORLD_SIZE, "
                        "less one, at least 1: here %(default)s)")
    g.add_argument("--exp", type=str, default="exp", help="path to exp folder")
    input_cache.add_args(g)
    g.add_argument("--resume", default="", type=str, metavar="PATH",
                   help="checkpoint, or an experiment folder (its newest valid checkpoint, mid-epoch copies too); "
                        "a run's folder: --exp and every flag not given default to that run's")
    g.add_argument("--overwrite", action="store_true",
                   help="start anew in an --exp that holds a run: deletes its checkpoints, log and cluster files")
    g.add_argument("--change_k", action="store_true", help="with --resume: allow a --k other than the checkpoint's")
    g.add_argument("--checkpoints", type=int, default=25000, help="how many iterations between two checkpoints")
    g.add_argument("--keep_checkpoints", type=int, default=3,
                   help="periodic copies (EXP/checkpoints/checkpoint_N.pth.tar) kept: the newest N (0: all, as "
                        "the original)")
    g.add_argument("--keep_epoch_checkpoints", action="store_true",
                   help="also keep every epoch's end checkpoint as EXP/checkpoints/epoch_N.pth.tar (N epochs done)")
    g.add_argument("--checkpoint_minutes", type=float, default=0,
                   help="also a checkpoint (checkpoints/checkpoint_latest.pth.tar) at the first step after this many "
                        "minutes since the last one, by rank 0's clock: bounds the work a hard kill loses (0: off)")
    g.add_argument("--seed", type=int, default=31, help="random seed")
    g.add_argument("--check_images", choices=["auto", "full", "header", "off"], default="auto",
                   help="check every image before training (auto: full decode up to 20,000 images, else header)")
    g.add_argument("--bad_images", choices=["error", "skip"], default="error",
                   help="unreadable images: stop naming them (mid-run after a resumable checkpoint), or go on "
                        "without them (listed in EXP/bad_images.txt)")
    g.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto", help="where to run")
    g.add_argument("--deterministic", action="store_true",
                   help="GPU: deterministic algorithms, no cuDNN autotuning, TF32 off (bitwise resume on the same "
                        "GPU and software, slower); the CPU is deterministic without it")
    g.add_argument("--sync_bn", action=argparse.BooleanOptionalAction, default=None,
                   help="under torchrun, BatchNorm statistics over the global batch (default: on with NCCL/GPUs, "
                        "torch's SyncBatchNorm; off on CPU/gloo, where --sync_bn all-reduces the statistics); "
                        "off: per-process statistics, as the original's DataParallel")
    g.add_argument("--dist_timeout", type=float, default=60,
                   help="minutes a torchrun process waits in a collective (e.g. while rank 0 clusters)")
    g.add_argument("--report", action="store_true", help="draw the training report (PNG) at the end")
    g.add_argument("--tensorboard", action="store_true",
                   help="TensorBoard events in EXP/tensorboard: log.jsonl's numbers, lr, cluster sizes, top clusters")
    g.add_argument("--no_progress", action="store_true", help="no progress bars")
    g.add_argument("--verbose", action="store_true", help="chatty")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse flags; with no DIR, the demo's defaults replace the paper's where not given."""
    parser = get_args_parser()
    args = parser.parse_args(argv)
    # --resume EXP continues that run: its folder and its recorded flags, unless given here
    given = cli.explicit_flags(get_args_parser(), argv)
    folder, recorded = checkpoint.recorded_run(args.resume) if args.resume else (None, {})
    recorded = {k: v for k, v in recorded.items() if k in vars(args) and k not in checkpoint.NOT_INHERITED}

    def chosen(flag: str):  # given here, else recorded by the resumed run
        return given[flag] if flag in given else recorded.get(flag)

    if chosen("data") is None and chosen("file_list") is None:
        parser.set_defaults(**DEMO_DEFAULTS)
    parser.set_defaults(**recorded, **({"exp": str(folder)} if folder is not None and "exp" not in given else {}))
    args = parser.parse_args(argv)
    args.demo = args.data is None and args.file_list is None
    changed = [f"--{k} {getattr(args, k)} (the run's: {v})" for k, v in recorded.items()
               if k in given and k != "data" and getattr(args, k) != v]
    if folder is not None:  # said by main() once logging is set up; not a flag of the run
        args.resume_note = f"flags of the run in {folder}" + (f", except {', '.join(changed)}" if changed else "")
    check_args(args, parser)
    return args


def check_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Refuse values that make no sense, naming the flag."""
    rules = [
        ("--nmb_cluster/--k", args.nmb_cluster >= 1, args.nmb_cluster, "must be >= 1"),
        ("--lr", args.lr > 0 and math.isfinite(args.lr), args.lr, "must be a positive number"),
        ("--wd", math.isfinite(args.wd) and args.wd < 0, args.wd,
         "is an exponent (weight decay = 10**wd) and must be < 0: --wd -5 is a decay of 1e-5"),
        ("--momentum", 0 <= args.momentum < 1, args.momentum, "must be in [0, 1)"),
        ("--batch", args.batch >= 1, args.batch, "must be >= 1"),
        ("--epochs", args.epochs >= 0, args.epochs, "must be >= 0"),
        ("--start_epoch", args.start_epoch >= 0, args.start_epoch, "must be >= 0"),
        ("--reassign", args.reassign > 0 and math.isfinite(args.reassign), args.reassign, "must be > 0"),
        ("--workers", args.workers >= 0, args.workers, "must be >= 0"),
        ("--dist_timeout", args.dist_timeout > 0, args.dist_timeout, "must be > 0 (minutes)"),
        ("--checkpoints", args.checkpoints >= 1, args.checkpoints, "must be >= 1 (iterations)"),
        ("--keep_checkpoints", args.keep_checkpoints >= 0, args.keep_checkpoints, "must be >= 0 (0: keep all)"),
        ("--seed", 0 <= args.seed < 2**32, args.seed, "must be in [0, 2**32)"),
        ("--checkpoint_minutes", args.checkpoint_minutes >= 0 and math.isfinite(args.checkpoint_minutes),
         args.checkpoint_minutes, "must be >= 0 (minutes; 0: off)"),
        ("--crop_min_scale", 0 < args.crop_min_scale <= 1, args.crop_min_scale, "must be in (0, 1]"),
        ("--pca", args.pca >= 1, args.pca, "must be >= 1"),
        ("--kmeans_iters", args.kmeans_iters >= 1, args.kmeans_iters, "must be >= 1"),
        ("--extract_batch", args.extract_batch >= 0, args.extract_batch, "must be >= 0 (0: batch / W)"),
        ("--size", args.size >= (64 if args.arch == "alexnet" else 32), args.size,
         "is too small for the architecture (alexnet needs >= 64, vgg16 and resnet50 >= 32)"),
    ] + knn.monitor_arg_rules(args)
    world = int(os.environ.get("WORLD_SIZE", 1))  # torchrun's number of processes
    rules.append(("--batch", args.batch % world == 0, args.batch, f"is the global mini-batch and must be a multiple "
                  f"of the number of processes {world} (each takes batch / {world} images per step)"))
    for flag, ok, value, why in rules:
        if not ok:
            parser.error(f"argument {flag}: invalid value {value!r}: {why}")


# ---------------------------------------------------------------------------------------
# set-up
# ---------------------------------------------------------------------------------------
def build_model(args: argparse.Namespace, device: torch.device) -> models.DeepClusterNet:
    model = models.build_model(args.arch, sobel=args.sobel, bn=True, out=args.nmb_cluster, input_size=args.size)
    model = model.to(device)
    return models.to_channels_last(model) if distributed.resolve_channels_last(args.channels_last, device) else model


def build_optimizer(model: models.DeepClusterNet, args: argparse.Namespace) -> torch.optim.SGD:
    """SGD over the body, built once: its momentum carries across epochs."""
    return torch.optim.SGD(model.body_parameters(), lr=args.lr, momentum=args.momentum,
                           weight_decay=10 ** args.wd, fused=args.fused_sgd)


def rank_batch(args: argparse.Namespace, rt: distributed.Runtime) -> int:
    """Images per step on this rank: --batch is the global mini-batch, split over the W ranks."""
    return args.batch // rt.world_size


# ---------------------------------------------------------------------------------------
# the stages of one epoch
# ---------------------------------------------------------------------------------------
def make_feature_loader(dataset: data.IndexedImageFolder, args: argparse.Namespace,
                        rt: distributed.Runtime) -> input_cache.FeatureLoader:
    """Fixed-order loader; under torchrun rank r reads images r, r + W, r + 2W, ... (decoded once,
    then from the --input_cache, see input_cache.py)."""
    return input_cache.feature_loader(dataset, args.extract_batch or rank_batch(args, rt), args.workers, rt.device,
                                      args.size, rt.rank, rt.world_size, input_cache.resolve(args.input_cache, args.exp))


@torch.no_grad()
def compute_features(loader: input_cache.FeatureLoader, model: models.DeepClusterNet, N: int, rt: distributed.Runtime,
                     args: argparse.Namespace):
    """Features in --features_dtype: D = 4096 pre-ReLU fc7 (AlexNet, VGG-16), 2048 average-pooled
    (ResNet-50). Kmeans: this rank's rows and their dataset indices (a distributed.FeatureShard; one
    process: the (N, D) matrix, row i = image i); PIC: the (N, D) matrix gathered on rank 0, None elsewhere."""
    model.eval()
    store_on = rt.device if args.features_on == "device" else torch.device("cpu")
    store = distributed.RunFeatures(N, len(loader.dataset), model.feature_dim, rt, store_on, args.features_dtype,
                                    gather=args.clustering == "PIC")
    for imgs, idx in tqdm(loader, desc="features", leave=False, disable=cli.progress(args.no_progress)):
        imgs = data.to_model_input(imgs, rt.device, args.channels_last)  # uint8 -> normalised float32
        with torch.autocast(rt.device.type, dtype=torch.bfloat16, enabled=args.amp):
            out = model.forward_features(imgs)  # (B, D)
        fileio.fault_point("features")
        if args.bad_images == "skip" and bool((idx < 0).any()):
            out, idx = data.mark_unreadable(out, idx, loader.dataset, args.exp)
        store.write(idx, out)  # the copy to the host overlaps the next batch (distributed.FeatureStore)
    return store.result() if args.clustering == "PIC" else store.shard()


def make_clusterer(args: argparse.Namespace, device: torch.device):
    if args.clustering == "PIC":
        return clustering.PIC(pca=args.pca, device=device)
    return clustering.Kmeans(args.nmb_cluster, backend=args.cluster_backend, niter=args.kmeans_iters,
                             pca=args.pca, device=device, pca_solver=args.pca_solver)


def cluster(features, clusterer, args: argparse.Namespace,
            rt: distributed.Runtime) -> tuple[float, list[list[int]], np.ndarray]:
    """PCA-whiten, L2-normalise and cluster; every rank gets the same result. k-means: sharded, each rank
    keeps its rows (clustering.Kmeans.cluster_shard); PIC: on rank 0, which holds the gathered matrix.

    Returns (clustering loss, images_lists, (N,) cluster id per image). The k-means seed is drawn from the seeded
    numpy RNG on every rank (as the original did per call), so the ranks' RNGs stay in step.
    """
    clusterer.seed = int(np.random.randint(1234))
    fileio.fault_point("clustering")
    if isinstance(features, distributed.FeatureShard):  # unreadable images (NaN rows) get no cluster (-1)
        loss, labels = clusterer.cluster_shard(features.x, features.idx, features.n, rt, args.verbose)
        return float(loss), clusterer.images_lists, labels
    if rt.is_main:  # unreadable images (NaN rows with --bad_images skip) get no cluster (-1)
        loss, lists, labels = clustering.cluster_readable(clusterer, features, args.verbose)
        meta = np.array([loss, len(lists)], dtype=np.float64)
    else:
        labels, meta = None, None
    if not rt.distributed:
        return loss, lists, labels
    labels = distributed.broadcast_array(labels, rt)
    loss, k = distributed.broadcast_array(meta, rt, dtype=torch.float64)
    return float(loss), clustering.labels_to_lists(labels, int(k)), labels


def draw_samples(images_lists: list[list[int]], N: int, args: argparse.Namespace, rt: distributed.Runtime) -> np.ndarray:
    """int(reassign * N) dataset indices, uniform over the non-empty clusters, from the seeded numpy RNG
    (the same on every rank); under torchrun cut to a multiple of W, so every rank runs as many steps."""
    n_draws = max(rt.world_size, int(args.reassign * N) // rt.world_size * rt.world_size)
    return util.UnifLabelSampler(n_draws, images_lists).indexes


def make_train_loader(dataset: data.IndexedImageFolder, images_lists: list[list[int]], draws: np.ndarray,
                      epoch: int, args: argparse.Namespace, rt: distributed.Runtime, start: int = 0) -> DataLoader:
    """Pseudo-labelled loader over this rank's share of the epoch's draws.

    Rank r serves draws r, r + W, ... (each drawn by exactly one rank), from its
    ``start``-th one on (mid-epoch resume); every draw carries its own augmentation seed.
    """
    order = "index" if args.sampler == "uniform" else "cluster"
    # PIL crops collated into one uint8 batch, normalised by data.to_model_input
    transform, collate = train_crops.train_crops(args.size, args.crop_min_scale), train_crops.CollateCrops()
    if args.decode == "cpu_draft":  # the header first: the crop decides the JPEG's decoding scale
        dataset, transform = gpu_decode.EncodedImages(dataset), train_crops.DraftCrop(args.size, args.crop_min_scale)
    if args.decode == "gpu":  # workers read bytes and draw the crops; data.to_model_input decodes on the device
        dataset, transform = gpu_decode.EncodedImages(dataset), gpu_decode.EncodedCrop(args.size, args.crop_min_scale)
        collate = gpu_decode.CollateEncoded(args.size)
    if args.bad_images == "skip":
        dataset = data.StandIns(dataset, images_lists, args.exp)
    train_set = clustering.cluster_assign(images_lists, dataset, transform, order=order)
    sampler = util.SeededShardSampler(draws, base_seed=args.seed * 100_003 + epoch, rank=rt.rank,
                                      world_size=rt.world_size, start=start)
    return data.make_loader(train_set, rank_batch(args, rt), args.workers, rt.device, sampler, args.seed + epoch,
                            collate)


def top_layer_sgd(model: models.DeepClusterNet, args: argparse.Namespace) -> torch.optim.SGD:
    """SGD of the current top layer (no momentum; a new head and SGD every epoch, as cluster ids
    have no meaning across epochs)."""
    return torch.optim.SGD(model.top_layer.parameters(), lr=args.lr, weight_decay=10 ** args.wd,
                           fused=args.fused_sgd)


MIN_PER_CLUSTER = 3  # images per cluster below which main.py warns (ImageNet at k = 10,000: 128)
SYNC_EVERY = 50  # steps between two host reads of the training loss (distributed.DeviceLossMeter)
SHOW_EVERY_S = 1.0  # seconds between two reads of the loss shown on a progress bar (one sync each)


class LoaderError(data.DataError):
    """The training loader failed other than on an unreadable image (e.g. a killed worker)."""


def train_one_epoch(loader: DataLoader, model: nn.Module, crit: nn.Module,
                    opt: torch.optim.Optimizer, top_opt: torch.optim.Optimizer, device: torch.device,
                    epoch: int, args: argparse.Namespace, on_iteration=None, start_iter: int = 0,
                    losses: util.AverageMeter | None = None, control: preempt.StepControl | None = None) -> float:
    """One pass over the pseudo-labelled loader (``model``: the network or its DDP wrapper);
    returns the average loss. The loss is summed and checked on the device and read every
    ``SYNC_EVERY`` steps, so a diverged run stops before any checkpoint of its weights.
    ``on_iteration(i, flush)`` runs before step i (counted from the epoch's start), where the
    periodic checkpoints are written; ``flush()`` returns the up-to-date meter. Before each step the
    ranks agree (``control``, :class:`preempt.StepControl`): a batch that failed to load on any rank
    or a stop signal raises :class:`preempt.StopTraining` on every rank at that step."""
    model.train()
    losses = losses or util.AverageMeter()
    bar = tqdm(loader, desc=f"train {epoch}", leave=False, disable=cli.progress(args.no_progress),
               initial=start_iter, total=start_iter + len(loader))
    on_device = distributed.DeviceLossMeter(device, losses, epoch, start_iter)
    bar.set_postfix(loss=f"{losses.avg:.3f}" if losses.count else "-")  # "-" until a loss is read, not 0.000
    shown = time.monotonic()

    def flush() -> util.AverageMeter:  # raises distributed.DivergedError on a NaN/inf loss since the last read
        m = on_device.read()
        bar.set_postfix(loss=f"{m.avg:.3f}" if m.count else "-")
        return losses

    control = control or preempt.StepControl(distributed.Runtime(device=device))
    batches = iter(bar)
    try:
        for i in itertools.count(start_iter):
            try:
                imgs, target, _ = next(batches)
                failure = None
            except StopIteration:
                break
            except Exception as e:  # an unreadable image, a dead loader worker: stop where a resume can go on
                failure = e if isinstance(e, data.BadImageError) else LoaderError(
                    f"loading the training batch of epoch {epoch}, step {i} failed: {cli.one_line(e)}")
            control.check(i, failure)  # every rank together, before anything else of step i
            on_device.step = i
            if on_iteration is not None:
                on_iteration(i, flush)
            if i - on_device.first >= SYNC_EVERY:
                flush()
            fileio.fault_point("train")
            # host -> device copies from pinned memory: ordered before the kernels that use them
            imgs, target = data.to_model_input(imgs, device, args.channels_last), target.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
                loss = crit(model(imgs), target)
            opt.zero_grad(set_to_none=True)
            top_opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            top_opt.step()
            on_device.add(loss, imgs.shape[0])
            on_device.step = i + 1
            if not bar.disable and time.monotonic() - shown >= SHOW_EVERY_S:  # a shown bar: one read a second
                bar.set_postfix(loss=f"{on_device.peek():.3f}", refresh=False)
                shown = time.monotonic()
    except preempt.StopTraining:  # the steps done so far count in the meter (a collective: all ranks are here)
        flush()
        raise
    flush()
    return losses.avg


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
               args: argparse.Namespace, rt: distributed.Runtime) -> EpochPlan:
    """Features -> clustering -> pseudo-labels, draws and a fresh top layer. Under torchrun
    every rank first takes rank 0's weights and BatchNorm statistics (one network for every
    share of the features). Stage times are read after a device synchronisation."""
    distributed.broadcast_module_state(model, rt)
    t0 = distributed.synced_time(rt.device)
    features = compute_features(feature_loader, model, N, rt, args)
    t1 = distributed.synced_time(rt.device)
    if rt.device.type == "cuda" and rt.is_main:  # to check against distributed.gather_peak_bytes
        log.debug("GPU memory peak after the features: %.2f GiB", torch.cuda.max_memory_allocated(rt.device) / 2**30)
    clus_loss, images_lists, labels = cluster(features, clusterer, args, rt)
    del features
    draws = draw_samples(images_lists, N, args, rt)
    model.reset_top_layer(len(images_lists))
    top_opt = top_layer_sgd(model, args)
    return EpochPlan(labels, images_lists, clus_loss, draws, top_opt,
                     time_features=t1 - t0, time_clustering=distributed.synced_time(rt.device) - t1)


def epoch_record(epoch: int, plan: EpochPlan, loss: float, time_train: float, iterations: int,
                 prev_labels: np.ndarray | None, targets: np.ndarray | None, rt: distributed.Runtime) -> dict:
    """One line of exp/log.jsonl."""
    return {
        "epoch": epoch, "clustering_loss": plan.clustering_loss, "train_loss": loss,  # NMIs: images in a cluster
        "nmi_prev": None if prev_labels is None else clustering.nmi(prev_labels, plan.labels),
        "nmi_labels": None if targets is None else clustering.nmi(targets, plan.labels),
        "n_clusters": len(plan.images_lists), "n_empty": int(sum(1 for lst in plan.images_lists if len(lst) == 0)),
        "time_features": plan.time_features, "time_clustering": plan.time_clustering, "time_train": time_train,
        "time_epoch": plan.time_features + plan.time_clustering + time_train,
        "iterations": iterations, "world_size": rt.world_size,
    }


def check_data(dataset: data.IndexedImageFolder, args: argparse.Namespace, exp: Path, rt: distributed.Runtime) -> None:
    """Every image readable (--check_images, --bad_images) and k against the number of images."""
    data.check_folder(dataset, args.check_images, args.bad_images, exp / "bad_images.txt", workers=args.workers,
                      progress=not args.no_progress, write=rt.is_main, rt=rt)
    n = len(dataset)
    if args.clustering == "Kmeans" and args.nmb_cluster > n:
        raise clustering.ClusteringError(f"--nmb_cluster/--k {args.nmb_cluster} is larger than the number "
                                         f"of images ({n}) in {args.data}")
    if args.clustering == "Kmeans" and args.nmb_cluster == 1:
        log.warning("--k 1 puts every image in one cluster: the training loss is 0 and nothing is learned")
    elif args.clustering == "Kmeans" and n < MIN_PER_CLUSTER * args.nmb_cluster:
        log.warning("--k %d for %d images: %.1f images per cluster, too few to group (--k %d: one image each, "
                    "training loss 0); use --k %d or less", args.nmb_cluster, n, n / args.nmb_cluster, n,
                    max(1, n // MIN_PER_CLUSTER))
    if args.pca > max(1, n // 2):  # whitened, N points in >= N - 1 dims are all equidistant (measured: the
        # spread of their distances falls from 0.33 at N/8 dims to 0.23 at N/4, 0.02 at N - 2 and 0 at N - 1)
        log.warning("--pca %d is more than half the %d images: PCA-whitened to that many dims they are "
                    "all nearly equidistant (flat clustering loss); clustering at --pca %d instead (give --pca "
                    "N with N <= %d to choose)", args.pca, n, max(1, n // 4), max(1, n // 4))
        args.pca = max(1, n // 4)
    log.info("%d images%s, %s%s at %d px, %d process(es) on %s", n, f" in {len(dataset.classes)} class folders"
             if dataset.targets is not None and len(dataset.targets) else "", args.arch, " + Sobel" if args.sobel else "", args.size, rt.world_size,
             rt.device)


def resumed_plan(mid: dict, model: models.DeepClusterNet, args: argparse.Namespace,
                 rt: distributed.Runtime) -> EpochPlan:
    """The plan of an epoch interrupted inside training, from a periodic checkpoint."""
    fields = checkpoint.restore_epoch(mid, top_layer_sgd(model, args), args, rt.world_size)
    losses = util.AverageMeter.from_sum(fields.pop("loss_sum"), fields.pop("loss_count"))  # exact partial sum
    return EpochPlan(**fields, losses=losses)


def checkpoint_hook(plan: EpochPlan, epoch: int, iters_per_epoch: int, clustered: bool, model, opt, prev_labels,
                    run_id: str, control: preempt.StepControl, args: argparse.Namespace, exp: Path,
                    rt: distributed.Runtime):
    """``on_iteration(i, flush)`` of :func:`train_one_epoch`: a mid-epoch checkpoint every
    ``--checkpoints`` iterations (numbered, pruned to ``--keep_checkpoints``), and
    ``checkpoint_latest`` before the first step after a clustering and when ``--checkpoint_minutes``
    is due. The same decision on every rank (control.due is rank 0's clock): all take part in
    the RNG gather of the save."""
    def on_iteration(i: int, flush) -> None:
        n = iters_per_epoch * epoch + i
        name = f"checkpoint_{n // args.checkpoints}" if n % args.checkpoints == 0 else \
            "checkpoint_latest" if control.due or (clustered and i == 0) else None
        if name is None:
            return
        mid_state = checkpoint.mid_epoch_state(plan, i, flush(), prev_labels, args, rt)
        path = exp / "checkpoints" / f"{name}.pth.tar"
        checkpoint.save_run(path, model, opt, epoch, args, plan.labels, run_id, rt, mid_state)
        if name != "checkpoint_latest":
            checkpoint.prune_periodic(exp / "checkpoints", args.keep_checkpoints, run_id, rt, protect=path)
        control.saved()

    return on_iteration


def end_epoch(epoch: int, plan: EpochPlan, record: dict, loss: float, time_train: float, model, opt, run_id: str,
              clog: checkpoint.ClusterLog, history: util.Logger, board: tb.Board, dataset: data.IndexedImageFolder,
              control: preempt.StepControl, args: argparse.Namespace, exp: Path, rt: distributed.Runtime) -> None:
    """The epoch's cluster file, log line and TensorBoard record, then its checkpoint (history
    first: killed in between, the resumed run redoes this epoch from the previous checkpoint
    and writes these files again)."""
    if rt.is_main:
        clog.save(epoch, plan.labels, len(plan.images_lists))
        history.log(record)
        board.record(record, epoch)
        board.learning_rates({"body": opt, "top_layer": plan.top_opt}, epoch)
        board.clusters(plan.labels, len(plan.images_lists), epoch, dataset.load)
    checkpoint.save_run(exp / "checkpoint.pth.tar", model, opt, epoch + 1, args, plan.labels, run_id, rt)
    if args.keep_epoch_checkpoints:
        checkpoint.keep_epoch_copy(exp, epoch + 1, rt)
    control.saved()
    log.info("epoch %3d | clustering loss %.3f | train loss %.3f | NMI prev %s | NMI labels %s | "
             "empty %d | time: features %.1fs cluster %.1fs train %.1fs%s",
             epoch, plan.clustering_loss, loss, _fmt(record["nmi_prev"]), _fmt(record["nmi_labels"]),
             record["n_empty"], plan.time_features, plan.time_clustering, time_train, knn.KnnMonitor.text(record))


def main(args: argparse.Namespace) -> dict:
    """Run DeepCluster; returns the last epoch's log record."""
    rt = distributed.init_runtime(args.device, timeout_min=args.dist_timeout)
    distributed.configure_backends(args.deterministic)
    args.channels_last = distributed.resolve_channels_last(args.channels_last, rt.device)
    exp = Path(args.exp)
    dataset = data.open_folder(args, rt)  # a missing or empty DIR is refused before anything is written
    checkpoint.check_exp_writable(exp, rt)
    exp.mkdir(parents=True, exist_ok=True)
    cli.setup_logging(log, exp, "train.log", args.verbose, rt.is_main)
    if getattr(args, "resume_note", None):
        log.info("--resume: %s", vars(args).pop("resume_note"))
    if not rt.is_main:  # one set of progress bars, rank 0's
        args.no_progress = True
    distributed.seed_everything(args.seed, rt.rank)
    monitor = knn.KnnMonitor.for_training(args, rt, log, demo=DEMO_KNN_DATA)  # a bad --knn_data stops here
    check_data(dataset, args, exp, rt)
    N = len(dataset)
    # NMI with the labels: with class folders, at least two of them (one class: no information)
    targets = np.asarray(dataset.targets) if dataset.targets is not None and len(dataset.targets) \
        and len(dataset.classes) > 1 else None
    dataset.mark_unreadable = args.bad_images == "skip"

    board = tb.Board(exp / "tensorboard" if args.tensorboard and rt.is_main else None)  # no package: stops here
    model = distributed.sync_batchnorm(build_model(args, rt.device), args.sync_bn, rt)
    opt = build_optimizer(model, args)
    crit = nn.CrossEntropyLoss()
    clog, history = checkpoint.ClusterLog(exp / "clusters"), util.Logger(exp / "log.jsonl")
    run_id, start_epoch, mid, prev_labels = checkpoint.start_or_resume(args, exp, model, opt, history, clog, N, rt)
    if start_epoch >= args.epochs:  # said by start_or_resume
        return {}
    board.start(start_epoch)
    feature_loader = make_feature_loader(dataset, args, rt)
    clusterer = make_clusterer(args, rt.device)

    record: dict = {}
    control = preempt.StepControl(rt, args.checkpoint_minutes)  # the ranks' per-step agreement
    if start_epoch == 0 and mid is None and monitor is not None:
        init = monitor.evaluate(model, rt.device)
        history.log({"epoch": -1, **init})  # epoch -1: the random network, before any training
        board.record(init, -1)
        log.info("random network |%s", knn.KnnMonitor.text(init))
    for epoch in range(start_epoch, args.epochs):
        preempt.raise_if_requested(f" before epoch {epoch}")  # a stop asked for at the end of the last one
        clustered = mid is None  # a new clustering: saved before its first step (never redone after a crash)
        if mid is not None:  # resuming inside this epoch: its clustering is in the checkpoint
            plan, mid = resumed_plan(mid, model, args, rt), None
        else:
            plan = plan_epoch(feature_loader, model, clusterer, N, args, rt)
        t2 = distributed.synced_time(rt.device)
        # step i of the epoch covers draws [i * batch, (i + 1) * batch) on any number of processes
        train_loader = make_train_loader(dataset, plan.images_lists, plan.draws, epoch, args, rt,
                                         start=plan.start_iter * rank_batch(args, rt))
        iters_per_epoch = math.ceil(len(plan.draws) / args.batch)

        periodic_checkpoint = checkpoint_hook(plan, epoch, iters_per_epoch, clustered, model, opt, prev_labels,
                                              run_id, control, args, exp, rt)

        try:
            with preempt.training_phase():
                loss = train_one_epoch(train_loader, distributed.wrap_ddp(model, rt), crit, opt, plan.top_opt,
                                       rt.device, epoch, args, on_iteration=periodic_checkpoint,
                                       start_iter=plan.start_iter, losses=plan.losses, control=control)
        except preempt.StopTraining as stop:  # on every rank at once: a failure on one, or a stop signal
            checkpoint.save_run(exp / "checkpoints" / "checkpoint_stopped.pth.tar", model, opt, epoch, args,
                                plan.labels, run_id, rt,
                                checkpoint.mid_epoch_state(plan, stop.step, plan.losses, prev_labels, args, rt))
            raise stop.cause from None
        time_train = distributed.synced_time(rt.device) - t2
        # before the history and the save: a kill here redoes the epoch
        knn_record = {} if monitor is None else monitor.evaluate(model, rt.device)
        record = {**epoch_record(epoch, plan, loss, time_train, iters_per_epoch, prev_labels, targets, rt),
                  **knn_record}
        end_epoch(epoch, plan, record, loss, time_train, model, opt, run_id, clog, history, board, dataset, control,
                  args, exp, rt)
        prev_labels = plan.labels
    board.close()
    distributed.barrier(rt)
    if args.report and rt.is_main:
        from visu import training_report  # matplotlib only when asked for
        training_report.draw(exp)
    return record


def _fmt(x: float | None) -> str:
    return "  -  " if x is None else f"{x:.3f}"


def explain_error(e: BaseException, args: argparse.Namespace) -> str:
    """The one error line; an unreadable image met mid-run also says how to go on."""
    msg = cli.one_line(e)
    if isinstance(e, data.BadImageError):
        msg += (f" (fix or remove it and continue with --resume {args.exp}, or go on without it "
                f"with --bad_images skip)")
    return msg


def run(argv: list[str] | None = None) -> int:
    """Entry point: known failures become one ``error:`` line (also in EXP/train.log), exit 2."""
    return cli.run_cli(main, parse_args, argv, logger=log, explain=explain_error,
                       on_interrupt=lambda args: checkpoint.interrupted_hint(args.exp),
                       hint=lambda args: checkpoint.resume_hint(args.exp))


if __name__ == "__main__":
    sys.exit(run())
