"""DeepCluster (Caron et al., ECCV 2018), the method: one epoch is fc7 features of every image
-> PCA-whitening + k-means (or PIC) -> images drawn uniformly over the clusters -> a new top
layer -> one pass of SGD on the pseudo-labels. Its state beyond the network: the epoch's
clustering, draws and top-layer SGD (a mid-epoch checkpoint holds them, so training continues
exactly there on any number of processes), the previous assignment (NMI) and the cluster log.

The run itself (folder, resume, stop protocol, checkpoint policy, records) is :mod:`engine`'s;
``main.py`` reads the flags and orchestrates. ``cfg`` below is that script's read-only config
(:class:`cli.Config`).
"""
from __future__ import annotations

import logging
import os
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
import models
import train_crops
import util
from knn import KnnMonitor

log = logging.getLogger("deepcluster")

MIN_PER_CLUSTER = 3  # images per cluster below which main.py warns (ImageNet at k = 10,000: 128)
FORMAT_VERSION = 3
# keys of a mid-epoch state (checkpoint["mid_epoch"])
_MID_KEYS = ("iteration", "assignment", "n_clusters", "draws", "top_optimizer", "clustering_loss",
             "loss_sum", "loss_count", "prev_assignment", "time_features", "time_clustering")


# ---------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------
def open_data(cfg, rt) -> tuple[data.IndexedImageFolder, dict]:
    """The training images: DIR, a --file_list, or (the demo) scikit-learn's digits exported
    once to data/digits. Returns the dataset and what the config derives from it: ``data``
    (absolute), ``file_list`` (absolute) and ``file_list_sha256``."""
    derived: dict = {}
    root = cfg.data
    if cfg.demo:
        root = data.export_digits(Path("data") / "digits") if rt.is_main else str(Path("data") / "digits")
        distributed.barrier(rt)
        log.info("demo: no DIR given, training on scikit-learn's digits exported to %s", root)
    transform = data.eval_transform(cfg.size, normalize=False)  # uint8 items, normalised per batch
    draft = data.eval_resize(cfg.size) if cfg.jpeg_draft else None
    if cfg.file_list:
        # DIR (when given) is the root of the list's relative paths; the list's hash goes into every
        # checkpoint, and a resume refuses another list (check_checkpoint)
        ds = data.IndexedImageFolder.from_file_list(cfg.file_list, os.path.abspath(root) if root else None,
                                                    transform=transform, draft=draft)
        derived.update(file_list=os.path.abspath(cfg.file_list), file_list_sha256=ds.paths.sha256,
                       data=ds.paths.root)
        return ds, derived
    derived["data"] = os.path.abspath(root)
    return data.IndexedImageFolder(derived["data"], transform=transform, draft=draft), derived


def check_data(dataset: data.IndexedImageFolder, cfg, exp: Path, rt) -> dict:
    """Every image readable (--check_images, --bad_images) and k against the number of images.
    Returns what the config derives: ``pca`` (lowered above half the images)."""
    data.check_folder(dataset, cfg.check_images, cfg.bad_images, exp / "bad_images.txt", workers=cfg.workers,
                      progress=not cfg.no_progress, write=rt.is_main, rt=rt)
    n, k = len(dataset), cfg.nmb_cluster
    if cfg.clustering == "Kmeans" and k > n:
        raise clustering.ClusteringError(f"--nmb_cluster/--k {k} is larger than the number of images ({n}) in "
                                         f"{cfg.data}")
    if cfg.clustering == "Kmeans" and k == 1:
        log.warning("--k 1 puts every image in one cluster: the training loss is 0 and nothing is learned")
    elif cfg.clustering == "Kmeans" and n < MIN_PER_CLUSTER * k:
        log.warning("--k %d for %d images: %.1f images per cluster, too few to group (--k %d: one image each, "
                    "training loss 0); use --k %d or less", k, n, n / k, n, max(1, n // MIN_PER_CLUSTER))
    pca = cfg.pca
    if pca > max(1, n // 2):  # whitened, N points in >= N - 1 dims are all equidistant (measured: the
        # spread of their distances falls from 0.33 at N/8 dims to 0.23 at N/4, 0.02 at N - 2 and 0 at N - 1)
        pca = max(1, n // 4)
        log.warning("--pca %d is more than half the %d images: PCA-whitened to that many dims they are "
                    "all nearly equidistant (flat clustering loss); clustering at --pca %d instead (give --pca "
                    "N with N <= %d to choose)", cfg.pca, n, pca, pca)
    log.info("%d images%s, %s%s at %d px, %d process(es) on %s", n, f" in {len(dataset.classes)} class folders"
             if dataset.targets is not None and len(dataset.targets) else "", cfg.arch,
             " + Sobel" if cfg.sobel else "", cfg.size, rt.world_size, rt.device)
    return {"pca": pca}


def label_targets(dataset: data.IndexedImageFolder) -> np.ndarray | None:
    """Class-folder labels for the NMI with the labels: at least two classes (one: no information)."""
    if dataset.targets is not None and len(dataset.targets) and len(dataset.classes) > 1:
        return np.asarray(dataset.targets)
    return None


# ---------------------------------------------------------------------------------------
# model and optimisers
# ---------------------------------------------------------------------------------------
def build_model(cfg, device: torch.device) -> models.DeepClusterNet:
    model = models.build_model(cfg.arch, sobel=cfg.sobel, bn=True, out=cfg.nmb_cluster, input_size=cfg.size)
    model = model.to(device)
    return models.to_channels_last(model) if distributed.resolve_channels_last(cfg.channels_last, device) else model


def build_optimizer(model: models.DeepClusterNet, cfg) -> torch.optim.SGD:
    """SGD over the body, built once: its momentum carries across epochs."""
    return torch.optim.SGD(model.body_parameters(), lr=cfg.lr, momentum=cfg.momentum,
                           weight_decay=10 ** cfg.wd, fused=cfg.fused_sgd)


def top_layer_sgd(model: models.DeepClusterNet, cfg) -> torch.optim.SGD:
    """SGD of the current top layer (no momentum; a new head and SGD every epoch, as cluster ids
    have no meaning across epochs)."""
    return torch.optim.SGD(model.top_layer.parameters(), lr=cfg.lr, weight_decay=10 ** cfg.wd,
                           fused=cfg.fused_sgd)


def rank_batch(cfg, rt) -> int:
    """Images per step on this rank: --batch is the global mini-batch, split over the W ranks."""
    return cfg.batch // rt.world_size


# ---------------------------------------------------------------------------------------
# features and clustering
# ---------------------------------------------------------------------------------------
def make_feature_loader(dataset: data.IndexedImageFolder, cfg, rt) -> input_cache.FeatureLoader:
    """Fixed-order loader; under torchrun rank r reads images r, r + W, r + 2W, ... (decoded once,
    then from the --input_cache, see input_cache.py)."""
    return input_cache.feature_loader(dataset, cfg.extract_batch or rank_batch(cfg, rt), cfg.workers, rt.device,
                                      cfg.size, rt.rank, rt.world_size, input_cache.resolve(cfg.input_cache, cfg.exp))


@torch.no_grad()
def compute_features(loader: input_cache.FeatureLoader, model: models.DeepClusterNet, N: int, rt, cfg):
    """Features in --features_dtype: D = 4096 pre-ReLU fc7 (AlexNet, VGG-16), 2048 average-pooled
    (ResNet-50). Kmeans: this rank's rows and their dataset indices (a distributed.FeatureShard; one
    process: the (N, D) matrix, row i = image i); PIC: the (N, D) matrix gathered on rank 0, None elsewhere."""
    model.eval()
    store_on = rt.device if cfg.features_on == "device" else torch.device("cpu")
    store = distributed.RunFeatures(N, len(loader.dataset), model.feature_dim, rt, store_on, cfg.features_dtype,
                                    gather=cfg.clustering == "PIC")
    for imgs, idx in tqdm(loader, desc="features", leave=False, disable=cli.progress(cfg.no_progress)):
        imgs = data.to_model_input(imgs, rt.device, cfg.channels_last)  # uint8 -> normalised float32
        with torch.autocast(rt.device.type, dtype=torch.bfloat16, enabled=cfg.amp):
            out = model.forward_features(imgs)  # (B, D)
        fileio.fault_point("features")
        if cfg.bad_images == "skip" and bool((idx < 0).any()):
            out, idx = data.mark_unreadable(out, idx, loader.dataset, cfg.exp)
        store.write(idx, out)  # the copy to the host overlaps the next batch (distributed.FeatureStore)
    return store.result() if cfg.clustering == "PIC" else store.shard()


def make_clusterer(cfg, device: torch.device):
    if cfg.clustering == "PIC":
        return clustering.PIC(pca=cfg.pca, device=device)
    return clustering.Kmeans(cfg.nmb_cluster, backend=cfg.cluster_backend, niter=cfg.kmeans_iters,
                             pca=cfg.pca, device=device, pca_solver=cfg.pca_solver)


def cluster(features, clusterer, cfg, rt) -> tuple[float, list[list[int]], np.ndarray]:
    """PCA-whiten, L2-normalise and cluster; every rank gets the same result. k-means: sharded, each rank
    keeps its rows (clustering.Kmeans.cluster_shard); PIC: on rank 0, which holds the gathered matrix.

    Returns (clustering loss, images_lists, (N,) cluster id per image). The k-means seed is drawn from the seeded
    numpy RNG on every rank (as the original did per call), so the ranks' RNGs stay in step.
    """
    clusterer.seed = int(np.random.randint(1234))
    fileio.fault_point("clustering")
    if isinstance(features, distributed.FeatureShard):  # unreadable images (NaN rows) get no cluster (-1)
        loss, labels = clusterer.cluster_shard(features.x, features.idx, features.n, rt, cfg.verbose)
        return float(loss), clusterer.images_lists, labels
    if rt.is_main:  # unreadable images (NaN rows with --bad_images skip) get no cluster (-1)
        loss, lists, labels = clustering.cluster_readable(clusterer, features, cfg.verbose)
        meta = np.array([loss, len(lists)], dtype=np.float64)
    else:
        labels, meta = None, None
    if not rt.distributed:
        return loss, lists, labels
    labels = distributed.broadcast_array(labels, rt)
    loss, k = distributed.broadcast_array(meta, rt, dtype=torch.float64)
    return float(loss), clustering.labels_to_lists(labels, int(k)), labels


def draw_samples(images_lists: list[list[int]], N: int, cfg, rt) -> np.ndarray:
    """int(reassign * N) dataset indices, uniform over the non-empty clusters, from the seeded numpy RNG
    (the same on every rank); under torchrun cut to a multiple of W, so every rank runs as many steps."""
    n_draws = max(rt.world_size, int(cfg.reassign * N) // rt.world_size * rt.world_size)
    return util.UnifLabelSampler(n_draws, images_lists).indexes


def make_train_loader(dataset: data.IndexedImageFolder, images_lists: list[list[int]], draws: np.ndarray,
                      epoch: int, cfg, rt, start: int = 0) -> DataLoader:
    """Pseudo-labelled loader over this rank's share of the epoch's draws.

    Rank r serves draws r, r + W, ... (each drawn by exactly one rank), from its
    ``start``-th one on (mid-epoch resume); every draw carries its own augmentation seed.
    """
    order = "index" if cfg.sampler == "uniform" else "cluster"
    # PIL crops collated into one uint8 batch, normalised by data.to_model_input
    transform, collate = train_crops.train_crops(cfg.size, cfg.crop_min_scale), train_crops.CollateCrops()
    if cfg.decode == "cpu_draft":  # the header first: the crop decides the JPEG's decoding scale
        dataset, transform = gpu_decode.EncodedImages(dataset), train_crops.DraftCrop(cfg.size, cfg.crop_min_scale)
    if cfg.decode == "gpu":  # workers read bytes and draw the crops; data.to_model_input decodes on the device
        dataset, transform = gpu_decode.EncodedImages(dataset), gpu_decode.EncodedCrop(cfg.size, cfg.crop_min_scale)
        collate = gpu_decode.CollateEncoded(cfg.size)
    if cfg.bad_images == "skip":
        dataset = data.StandIns(dataset, images_lists, cfg.exp)
    train_set = clustering.cluster_assign(images_lists, dataset, transform, order=order)
    sampler = util.SeededShardSampler(draws, base_seed=cfg.seed * 100_003 + epoch, rank=rt.rank,
                                      world_size=rt.world_size, start=start)
    return data.make_loader(train_set, rank_batch(cfg, rt), cfg.workers, rt.device, sampler, cfg.seed + epoch,
                            collate)


# ---------------------------------------------------------------------------------------
# one epoch
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


def plan_epoch(feature_loader: DataLoader, model: models.DeepClusterNet, clusterer, N: int, cfg, rt) -> EpochPlan:
    """Features -> clustering -> pseudo-labels, draws and a fresh top layer. Under torchrun
    every rank first takes rank 0's weights and BatchNorm statistics (one network for every
    share of the features). Stage times are read after a device synchronisation."""
    distributed.broadcast_module_state(model, rt)
    t0 = distributed.synced_time(rt.device)
    features = compute_features(feature_loader, model, N, rt, cfg)
    t1 = distributed.synced_time(rt.device)
    if rt.device.type == "cuda" and rt.is_main:  # to check against distributed.gather_peak_bytes
        log.debug("GPU memory peak after the features: %.2f GiB", torch.cuda.max_memory_allocated(rt.device) / 2**30)
    clus_loss, images_lists, labels = cluster(features, clusterer, cfg, rt)
    del features
    draws = draw_samples(images_lists, N, cfg, rt)
    model.reset_top_layer(len(images_lists))
    top_opt = top_layer_sgd(model, cfg)
    return EpochPlan(labels, images_lists, clus_loss, draws, top_opt,
                     time_features=t1 - t0, time_clustering=distributed.synced_time(rt.device) - t1)


def train_step(model: nn.Module, crit: nn.Module, opt, plan: EpochPlan, cfg, device: torch.device):
    """``step(i, batch)`` of :func:`engine.run_steps`: one SGD step of body and head on a
    pseudo-labelled batch; returns (loss (), images)."""
    def step(i: int, batch) -> tuple[torch.Tensor, int]:
        imgs, target, _ = batch
        fileio.fault_point("train")
        # host -> device copies from pinned memory: ordered before the kernels that use them
        imgs, target = data.to_model_input(imgs, device, cfg.channels_last), target.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp):
            loss = crit(model(imgs), target)
        opt.zero_grad(set_to_none=True)
        plan.top_opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        plan.top_opt.step()
        return loss, imgs.shape[0]
    return step


def epoch_record(epoch: int, plan: EpochPlan, loss: float, time_train: float, iterations: int,
                 prev_labels: np.ndarray | None, targets: np.ndarray | None, rt) -> dict:
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


def fmt(x: float | None) -> str:
    return "  -  " if x is None else f"{x:.3f}"


# ---------------------------------------------------------------------------------------
# checkpoints: what DeepCluster adds to the network and its optimizer
# ---------------------------------------------------------------------------------------
def state(model, opt: torch.optim.Optimizer, epoch: int, cfg, labels: np.ndarray | None, rt,
          mid_epoch: dict | None = None) -> dict | None:
    """Everything a restart needs, as plain types and tensors (weights_only-loadable); a
    collective (every rank's RNG state is gathered), rank 0's dict, None elsewhere.

    End of epoch: ``epoch`` is the next epoch to run. Inside an epoch (periodic copies),
    ``epoch`` is the running one and ``mid_epoch`` holds its pseudo-labels, draws, position,
    top-layer optimizer and partial loss, so that training continues exactly there.
    """
    rng = checkpoint.gather_rng_states(rt)
    if not rt.is_main:
        return None
    out = {
        "method": "deepcluster", "epoch": epoch, "iteration": 0 if mid_epoch is None else mid_epoch["iteration"],
        "arch": cfg.arch, "state_dict": model.state_dict(), "optimizer": opt.state_dict(),
        "model_config": model.config(),
        "args": {k: v for k, v in vars(cfg).items() if isinstance(v, (int, float, str, bool, type(None)))},
        "rng": checkpoint.get_rng_state(), "rng_ranks": rng,
        "last_assignment": None if labels is None else torch.from_numpy(labels.astype(np.int64)),
        "format_version": FORMAT_VERSION,
    }
    if mid_epoch is not None:
        out["mid_epoch"] = mid_epoch
    return out


def mid_epoch_state(plan: EpochPlan, i: int, meter: util.AverageMeter, prev_labels: np.ndarray | None, cfg,
                    rt) -> dict:
    """What a periodic checkpoint needs to continue this epoch at step i, on any number of
    processes: ``position`` = draws trained on so far (i * global batch), ``world_size``."""
    return {"iteration": i, "position": i * cfg.batch, "batch": cfg.batch, "world_size": rt.world_size,
            "assignment": torch.from_numpy(plan.labels), "n_clusters": len(plan.images_lists),
            "draws": torch.from_numpy(plan.draws), "top_optimizer": plan.top_opt.state_dict(),
            "clustering_loss": plan.clustering_loss, "loss_sum": meter.sum, "loss_count": meter.count,
            "prev_assignment": None if prev_labels is None else torch.from_numpy(prev_labels),
            "time_features": plan.time_features, "time_clustering": plan.time_clustering}


def _position(mid: dict, batch: int) -> int:
    """Draws of the epoch already trained on (older checkpoints: iteration * batch)."""
    return int(mid.get("position", int(mid["iteration"]) * batch))


def check_checkpoint(ckpt: dict, path: str, cfg, n_images: int) -> None:
    """Refuse a checkpoint that does not fit the flags or the data, naming the mismatch."""
    if "state_dict" not in ckpt:
        raise checkpoint.CheckpointError(f"checkpoint {path!r} has no 'state_dict'")
    if ckpt.get("method", "deepcluster") != "deepcluster":
        raise checkpoint.CheckpointError(f"checkpoint {path!r} is a {ckpt['method']} checkpoint: resume it with "
                                         f"main_deepclusterv2.py")
    ck_arch = ckpt.get("arch")
    if ck_arch is not None and ck_arch != cfg.arch:
        raise checkpoint.CheckpointError(f"checkpoint {path!r} holds {models.article(ck_arch)} model but --arch is "
                                         f"{cfg.arch}")
    sd = ckpt["state_dict"]
    has_sobel = any(k.endswith("sobel.0.weight") for k in sd)
    if has_sobel != bool(cfg.sobel):
        raise checkpoint.CheckpointError(f"checkpoint {path!r} was trained with sobel={has_sobel}, "
                                         f"but --sobel is {'on' if cfg.sobel else 'off'}")
    size = (ckpt.get("model_config") or {}).get("input_size")
    if size is not None and int(size) != cfg.size:
        raise checkpoint.CheckpointError(f"checkpoint {path!r} was trained at --size {size}, not {cfg.size}")
    ck_k = (ckpt.get("args") or {}).get("nmb_cluster")
    if ck_k is not None and int(ck_k) != cfg.nmb_cluster and not getattr(cfg, "change_k", False):
        raise checkpoint.CheckpointError(f"checkpoint {path!r} was trained with --k {ck_k}, not {cfg.nmb_cluster} "
                                         f"(add --change_k to cluster into {cfg.nmb_cluster} from the next epoch on)")
    ck_list = (ckpt.get("args") or {}).get("file_list_sha256")
    if ck_list is not None and ck_list != getattr(cfg, "file_list_sha256", None):
        raise checkpoint.CheckpointError(
            f"checkpoint {path!r} was trained on a --file_list with SHA-256 {ck_list[:12]}..., not on this "
            f"{'list' if getattr(cfg, 'file_list', None) else 'folder'}: the image indices would not match")
    if ckpt.get("mid_epoch") is not None:
        check_mid_epoch(ckpt, path, cfg, n_images)


def check_mid_epoch(ckpt: dict, path: str, cfg, n_images: int) -> None:
    mid = ckpt["mid_epoch"]
    missing = [k for k in _MID_KEYS if k not in mid]
    if missing:
        raise checkpoint.CheckpointError(f"checkpoint {path!r} has an incomplete mid-epoch state (no {missing})")
    position = _position(mid, cfg.batch)
    if position % cfg.batch:
        raise checkpoint.CheckpointError(
            f"the checkpoint stopped after {position} draws of its epoch, not a multiple of --batch {cfg.batch}: "
            f"resume with the --batch of that run ({mid.get('batch', 'see its args.json')})")
    n_ckpt = len(mid["assignment"])
    if n_ckpt != n_images:
        raise checkpoint.CheckpointError(f"the checkpoint's epoch was clustered on {n_ckpt} images but {cfg.data} "
                                         f"now has {n_images}: resume from an end-of-epoch checkpoint instead")
    top = ckpt["state_dict"].get("top_layer.weight")
    if top is None or top.shape[0] != int(mid["n_clusters"]):
        raise checkpoint.CheckpointError(f"checkpoint {path!r}: its mid-epoch top layer does not match its "
                                         f"{int(mid['n_clusters'])} clusters")
    draws = mid["draws"]
    if len(draws) == 0 or int(draws.min()) < 0 or int(draws.max()) >= n_images:
        raise checkpoint.CheckpointError(f"checkpoint {path!r}: its epoch's draws do not index {n_images} images")
    if not 0 <= int(mid["iteration"]) or int(mid["loss_count"]) < 0:
        raise checkpoint.CheckpointError(f"checkpoint {path!r}: invalid position in the epoch")


def restore(found: str, model, opt: torch.optim.Optimizer, cfg, n_images: int, rt) -> dict:
    """Check, then restore model, optimizer and RNG (this rank's own torch stream too) from
    the checkpoint ``found``; returns it. Nothing is restored if a check fails."""
    ckpt = checkpoint.torch_load(found)
    check_checkpoint(ckpt, found, cfg, n_images)
    sd = models.clean_state_dict(ckpt["state_dict"])
    top = {k[len("top_layer."):]: v for k, v in sd.items() if k.startswith("top_layer.")}
    sd = {k: v for k, v in sd.items() if not k.startswith("top_layer.")}
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:
        raise checkpoint.CheckpointError(f"checkpoint {found!r} does not fit --arch {cfg.arch} --size {cfg.size}: "
                                         f"{str(e).splitlines()[-1].strip()}") from None
    missing = [k for k in missing if not k.startswith("top_layer") and not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise checkpoint.CheckpointError(f"checkpoint {found!r} does not fit --arch {cfg.arch} --size {cfg.size}: "
                                         f"missing {missing[:4]}, unexpected {unexpected[:4]}")
    if "optimizer" in ckpt:
        try:
            checkpoint.load_optimizer(opt, ckpt["optimizer"])
        except (ValueError, KeyError) as e:
            log.warning("optimizer state in %s not restored (%s): momentum restarts from zero", found, e)
    if "mid_epoch" in ckpt and top:  # the running epoch's top layer comes back too
        model.reset_top_layer(top["weight"].shape[0]).load_state_dict(top)
    if "rng" in ckpt:
        checkpoint.set_rng_state(ckpt["rng"])
    checkpoint.restore_rank_rng(ckpt, cfg.seed, rt)
    return ckpt


def resumed_plan(mid: dict, model: models.DeepClusterNet, cfg, rt) -> EpochPlan:
    """The plan of an epoch interrupted inside training, from a periodic checkpoint. Training
    continues at the same global position of the epoch's draws whatever the number of
    processes now: step i covers draws [i * batch, (i + 1) * batch) for any W."""
    top_opt = top_layer_sgd(model, cfg)
    draws = mid["draws"].numpy()
    position = _position(mid, cfg.batch)
    if len(draws) % rt.world_size:  # from a run on another W: every rank must run as many steps
        cut = len(draws) // rt.world_size * rt.world_size
        log.info("resuming on %d processes: the epoch's last %d draw(s) are dropped so that every rank runs "
                 "the same number of steps", rt.world_size, len(draws) - cut)
        draws = draws[:cut]  # position is a multiple of batch, so of W: still <= cut
    checkpoint.load_optimizer(top_opt, mid["top_optimizer"])
    labels = mid["assignment"].numpy()
    return EpochPlan(labels, clustering.labels_to_lists(labels, int(mid["n_clusters"])),
                     float(mid["clustering_loss"]), draws, top_opt, start_iter=position // cfg.batch,
                     losses=util.AverageMeter.from_sum(float(mid["loss_sum"]), int(mid["loss_count"])),
                     time_features=float(mid["time_features"]), time_clustering=float(mid["time_clustering"]))


def previous_labels(ckpt: dict, n_images: int, cfg) -> np.ndarray | None:
    """The assignment before the checkpoint's epoch (NMI with the previous epoch); None when
    the image set changed since."""
    mid = ckpt.get("mid_epoch")
    prev = mid["prev_assignment"] if mid is not None else ckpt.get("last_assignment")
    if prev is not None and len(prev) != n_images:
        log.warning("the checkpoint was made on %d images, %s now has %d: NMI with the previous epoch "
                    "restarts", len(prev), cfg.data, n_images)
        return None
    return None if prev is None else prev.numpy()


# ---------------------------------------------------------------------------------------
# the run's start and each epoch's end
# ---------------------------------------------------------------------------------------
def resume_or_start(run, found: str | None, model, opt, clog: checkpoint.ClusterLog, n: int, cfg,
                    rt) -> tuple[int, dict | None, np.ndarray | None]:
    """(start epoch, mid-epoch state or None, previous assignment or None): the checkpoint is
    checked and restored, then the invocation recorded and the records of the epochs to redo dropped."""
    ckpt = restore(found, model, opt, cfg, n, rt) if found else {"epoch": cfg.start_epoch}
    epoch, mid = int(ckpt["epoch"]), ckpt.get("mid_epoch")
    if epoch >= cfg.epochs:
        log.warning("nothing to train: the checkpoint is at epoch %d and --epochs is %d (the run is finished; "
                    "raise --epochs to train further)" if found else "nothing to train: --epochs %d (start epoch "
                    "%d)", *((epoch, cfg.epochs) if found else (cfg.epochs, epoch)))
        return epoch, mid, None
    run.begin(epoch, ckpt.get("iteration", 0), found, keep_random_network=found is not None)
    if rt.is_main:
        clog.truncate(epoch)
    if found:
        log.info("=> loaded checkpoint %r (epoch %d, iteration %d)", found, epoch, ckpt.get("iteration", 0))
    return epoch, mid, previous_labels(ckpt, n, cfg) if found else None


def end_epoch(run, epoch: int, plan: EpochPlan, record: dict, model, opt, clog, dataset, cfg, rt) -> None:
    """The epoch's cluster file, log line and TensorBoard record, then its checkpoint (records
    first: killed in between, the resumed run redoes this epoch and writes them again)."""
    if rt.is_main:
        clog.save(epoch, plan.labels, len(plan.images_lists))
    run.record(record, epoch)
    if rt.is_main:
        run.board.learning_rates({"body": opt, "top_layer": plan.top_opt}, epoch)
        run.board.clusters(plan.labels, len(plan.images_lists), epoch, dataset.load)
    run.ckpt.save_epoch(state(model, opt, epoch + 1, cfg, plan.labels, rt), epoch + 1)
    log.info("epoch %3d | clustering loss %.3f | train loss %.3f | NMI prev %s | NMI labels %s | "
             "empty %d | time: features %.1fs cluster %.1fs train %.1fs%s", epoch, plan.clustering_loss,
             record["train_loss"], fmt(record["nmi_prev"]), fmt(record["nmi_labels"]), record["n_empty"],
             plan.time_features, plan.time_clustering, record["time_train"], KnnMonitor.text(record))
