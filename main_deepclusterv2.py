"""DeepCluster-v2: the authors' improved DeepCluster (facebookresearch/swav main_deepclusterv2.py).

Usage:
    python main_deepclusterv2.py DIR --exp EXP [swav's flags: --nmb_crops 2 6 --size_crops 224 96 ...]
    torchrun --nproc_per_node 8 main_deepclusterv2.py DIR --exp EXP --batch_size 64 ...
    python main_deepclusterv2.py DIR --exp EXP ...     # again: resumes from EXP/checkpoint.pth.tar
    bash main_deepclusterv2.sh                          # swav's 400/800-epoch recipes

Each epoch: spherical k-means (per head, on the memory bank of the ``crops_for_assign``
projections of the previous epoch, the heads alternating crops) sets each head's prototypes
to its centroids and gives every image one label per head; then one pass of multi-crop
training with the cross-entropy of the prototype scores / temperature against those labels
(SGD + LARC, warmup then cosine learning rate), the bank refreshed with every step's
projections. The bank of the first epoch comes from a pass over the data before training.
See docs/deepclusterv2.md for the flags, the outputs and the deviations from swav.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

import checkpoint
import cli
import clustering
import data
import distributed
import fileio
import knn as knn_lib
import optim
import util
from errors import ScriptError
from models.deepclusterv2 import TRUNK_DIM, DeepClusterV2Net, dcv2_loss

log = logging.getLogger("deepcluster")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="DeepCluster-v2 (unsupervised training, swav's recipe)",
                                formatter_class=cli.HelpFormatter)
    p.add_argument("data", metavar="DIR", nargs="?", default=None, help="image folder (class folders optional: "
                   "only used for the NMI with the labels)")
    g = p.add_argument_group("data (swav)")
    g.add_argument("--data_path", type=str, default=None, help="swav's name for DIR")
    g.add_argument("--nmb_crops", type=int, default=[2], nargs="+", help="number of crops of each size")
    g.add_argument("--size_crops", type=int, default=[224], nargs="+", help="crop resolutions")
    g.add_argument("--min_scale_crops", type=float, default=[0.14], nargs="+", help="RandomResizedCrop min scale")
    g.add_argument("--max_scale_crops", type=float, default=[1.0], nargs="+", help="RandomResizedCrop max scale")
    g = p.add_argument_group("DeepCluster-v2 (swav)")
    g.add_argument("--crops_for_assign", type=int, nargs="+", default=[0, 1],
                   help="crops whose projections fill the memory bank (the heads use them in turn)")
    g.add_argument("--temperature", type=float, default=0.1, help="temperature of the loss")
    g.add_argument("--feat_dim", type=int, default=128, help="projection dimension")
    g.add_argument("--nmb_prototypes", type=int, nargs="+", default=[3000, 3000, 3000],
                   help="clusters of each head")
    g.add_argument("--nmb_kmeans_iters", type=int, default=10, help="spherical k-means iterations")
    g.add_argument("--kmeans_init", choices=["rank0", "index"], default="rank0",
                   help="initial centroids: rank0 = a random sample of rank 0's bank shard (swav); index = a "
                        "random sample of the whole bank drawn by dataset index (the same for any world size)")
    g.add_argument("--reassign_empty", action="store_true",
                   help="re-seed empty clusters by splitting a populated one (faiss-style); swav keeps them")
    g = p.add_argument_group("optimisation (swav)")
    g.add_argument("--epochs", type=int, default=100, help="number of total epochs to run")
    g.add_argument("--batch_size", type=int, default=64, help="batch size per process (global: x world size)")
    g.add_argument("--base_lr", type=float, default=4.8, help="base learning rate")
    g.add_argument("--final_lr", type=float, default=0.0, help="final learning rate")
    g.add_argument("--freeze_prototypes_niters", type=int, default=int(1e10),
                   help="the prototypes get no update during this many iterations from the start")
    g.add_argument("--wd", type=float, default=1e-6, help="weight decay")
    g.add_argument("--warmup_epochs", type=int, default=10, help="number of warmup epochs")
    g.add_argument("--start_warmup", type=float, default=0.0, help="initial warmup learning rate")
    g.add_argument("--amp", action="store_true", help="float16 autocast + GradScaler on CUDA (swav: fp32)")
    g = p.add_argument_group("model (swav)")
    g.add_argument("--arch", choices=sorted(TRUNK_DIM), default="resnet50", help="trunk")
    g.add_argument("--hidden_mlp", type=int, default=2048, help="hidden width of the projection head (0: linear)")
    g.add_argument("--sync_bn", choices=["pytorch", "none"], default="pytorch",
                   help="under torchrun, BatchNorm over the global batch (torch's SyncBatchNorm on CUDA, "
                        "distributed.AllReduceBatchNorm on CPU/gloo); none: per-process statistics")
    g = knn_lib.add_monitor_args(p, "the pooled trunk features")
    g.add_argument("--knn_size", type=int, default=0, help="kNN image size (0: the first --size_crops)")
    g = p.add_argument_group("run")
    g.add_argument("--exp", "--dump_path", dest="exp", type=str, default="exp_dcv2",
                   help="experiment folder (swav's --dump_path); a run there is resumed")
    g.add_argument("--workers", type=int, default=10, help="number of data loading workers")
    g.add_argument("--checkpoint_freq", type=int, default=25, help="keep a copy of the model every N epochs")
    g.add_argument("--checkpoint_iters", type=int, default=0,
                   help="also save a resumable checkpoint every N iterations inside an epoch (0: epoch ends only)")
    g.add_argument("--seed", type=int, default=31, help="seed")
    g.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto", help="where to run")
    g.add_argument("--dist_timeout", type=float, default=60, help="minutes a process waits in a collective")
    g.add_argument("--verbose", action="store_true", help="chatty")
    return p


def check_args(args: argparse.Namespace) -> None:
    """Refuse values that make no sense, naming the flag."""
    if args.data is None:
        args.data = args.data_path
    if args.data is None:
        raise ScriptError("no image folder: give DIR (or --data_path)")
    n = len(args.nmb_crops)
    rules = [
        ("--size_crops", len(args.size_crops) == n, args.size_crops, f"needs {n} values, one per --nmb_crops"),
        ("--min_scale_crops", len(args.min_scale_crops) == n, args.min_scale_crops, f"needs {n} values"),
        ("--max_scale_crops", len(args.max_scale_crops) == n, args.max_scale_crops, f"needs {n} values"),
        ("--nmb_crops", all(c >= 1 for c in args.nmb_crops), args.nmb_crops, "must be >= 1"),
        ("--crops_for_assign", all(0 <= c < sum(args.nmb_crops) for c in args.crops_for_assign)
         and len(args.crops_for_assign) >= 1, args.crops_for_assign, f"must be crop ids in [0, {sum(args.nmb_crops)})"),
        ("--nmb_prototypes", all(k >= 1 for k in args.nmb_prototypes), args.nmb_prototypes, "must be >= 1"),
        ("--feat_dim", args.feat_dim >= 1, args.feat_dim, "must be >= 1"),
        ("--temperature", args.temperature > 0, args.temperature, "must be > 0"),
        ("--batch_size", args.batch_size >= 1, args.batch_size, "must be >= 1"),
        ("--epochs", args.epochs >= 1, args.epochs, "must be >= 1"),
        ("--warmup_epochs", 0 <= args.warmup_epochs <= args.epochs, args.warmup_epochs, "must be in [0, --epochs]"),
        ("--base_lr", args.base_lr > 0 and math.isfinite(args.base_lr), args.base_lr, "must be > 0"),
        ("--nmb_kmeans_iters", args.nmb_kmeans_iters >= 0, args.nmb_kmeans_iters, "must be >= 0"),
        ("--checkpoint_iters", args.checkpoint_iters >= 0, args.checkpoint_iters, "must be >= 0"),
    ] + knn_lib.monitor_arg_rules(args)
    for flag, ok, value, why in rules:
        if not ok:
            raise ScriptError(f"{flag} {value}: {why}")


# ---------------------------------------------------------------------------------------
# data order: every epoch a seeded permutation, cut to whole global batches
# ---------------------------------------------------------------------------------------
def epoch_draws(n: int, global_batch: int, seed: int, epoch: int) -> np.ndarray:
    """(iters * global_batch,) dataset indexes of one epoch, in order (swav: DistributedSampler
    shuffling + drop_last). Step i of every rank covers positions [i B, (i + 1) B) (util.SeededShardSampler)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)[:(n // global_batch) * global_batch].numpy()


def aug_seed(seed: int, epoch: int) -> int:
    """Base augmentation seed of an epoch (epoch -1: the pass that fills the first bank)."""
    return seed * 7_919 + epoch + 2


def collate_crops(batch):
    """[(index, [crop_j (3, s_j, s_j)])] -> ((B,) int64, [(B, 3, s_j, s_j)])."""
    idx = torch.as_tensor([b[0] for b in batch], dtype=torch.long)
    return idx, [torch.stack([b[1][j] for b in batch]) for j in range(len(batch[0][1]))]


def make_loader(mc_dataset, draws: np.ndarray, base_seed: int, start: int, args, rt) -> torch.utils.data.DataLoader:
    sampler = util.SeededShardSampler(draws, base_seed, rt.rank, rt.world_size, start=start)
    return torch.utils.data.DataLoader(mc_dataset, batch_size=args.batch_size, sampler=sampler,
                                       num_workers=args.workers, collate_fn=collate_crops,
                                       pin_memory=rt.device.type == "cuda",
                                       generator=torch.Generator().manual_seed(base_seed))


def local_positions(draws: np.ndarray, rt, m: int) -> np.ndarray:
    """Dataset indexes of this rank's first ``m`` samples of an epoch (its bank rows 0..m-1)."""
    return draws[np.arange(rt.rank, len(draws), rt.world_size)[:m]]


# ---------------------------------------------------------------------------------------
# memory bank: this rank's rows, in the order it processed them (swav's layout)
# ---------------------------------------------------------------------------------------
@dataclass
class Bank:
    index: torch.Tensor  # (L,) int64 dataset index of each row
    emb: torch.Tensor    # (len(crops_for_assign), L, feat_dim) float32 projections

    @classmethod
    def empty(cls, n_assign: int, size: int, dim: int, device: torch.device) -> "Bank":
        return cls(torch.zeros(size, dtype=torch.long, device=device),
                   torch.zeros(n_assign, size, dim, device=device))

    def resized(self, size: int) -> "Bank":
        """A bank of ``size`` rows holding this one's first rows (itself when the size fits)."""
        if self.index.shape[0] == size:
            return self
        out = Bank.empty(self.emb.shape[0], size, self.emb.shape[2], self.emb.device)
        m = min(size, self.index.shape[0])
        out.index[:m], out.emb[:, :m] = self.index[:m], self.emb[:, :m]
        return out

    def write(self, pos: int, idx: torch.Tensor, emb: torch.Tensor, crops_for_assign: list[int]) -> None:
        """Rows [pos, pos + B) <- this step's images: ``emb`` (n_crops * B, d), crop by crop."""
        b = idx.shape[0]
        self.index[pos:pos + b] = idx.to(self.index.device)
        for i, c in enumerate(crops_for_assign):
            self.emb[i, pos:pos + b] = emb[c * b:(c + 1) * b].float()


@torch.no_grad()
def init_memory(loader, model: nn.Module, bank: Bank, args, rt) -> None:
    """swav's first pass: the projections of the crops_for_assign of every image (train mode,
    as swav: BN uses batch statistics and updates its running averages)."""
    pos = 0
    for idx, crops in loader:
        b = idx.shape[0]
        embs = [model(crops[c].to(rt.device, non_blocking=True))[0] for c in args.crops_for_assign]
        bank.write(pos, idx, torch.cat(embs), list(range(len(embs))))
        pos += b
    log.info("memory bank filled: %d rows on this process", pos)


@torch.no_grad()
def cluster_memory(core: DeepClusterV2Net, bank: Bank, n: int, epoch: int, args,
                   rt: distributed.Runtime) -> tuple[torch.Tensor, list[int]]:
    """Per head, spherical k-means of bank j (heads take the crops_for_assign banks in turn);
    prototypes <- centroids. Returns ((heads, n) int64 labels, -100 for images not in the
    bank; on every rank) and the number of empty clusters of each head."""
    labels = torch.full((len(args.nmb_prototypes), n), -100, dtype=torch.long)
    empty, j = [], 0
    for h, k in enumerate(args.nmb_prototypes):
        c, a = clustering.spherical_kmeans(bank.emb[j], k, niter=args.nmb_kmeans_iters,
                                           seed=args.seed * 1_000_003 + epoch * 97 + h,
                                           index=bank.index if args.kmeans_init == "index" else None,
                                           reassign_empty=args.reassign_empty, rt=rt)
        core.prototypes.head(h).weight.copy_(c)
        labels[h] = clustering.gather_assignments(a, bank.index, n, rt=rt)
        lab = labels[h][labels[h] >= 0]
        empty.append(int(k - torch.unique(lab).numel()))
        j = (j + 1) % len(args.crops_for_assign)
    return labels, empty


# ---------------------------------------------------------------------------------------
# checkpoints: model, optimizer, scaler, labels, the bank by dataset index, RNG
# ---------------------------------------------------------------------------------------
def save_state(path: Path, core, opt, scaler, epoch: int, iteration: int, labels, bank: Bank, m: int,
               draws: np.ndarray, bank_epoch: int, loss_sum: torch.Tensor, args, rt,
               n_empty: list[int] | None = None) -> None:
    """Collective (every rank calls it): the first ``m`` rows of every rank's bank are
    gathered by dataset index; rank 0 writes the file atomically."""
    # a copy: gather_rows receives the other ranks' rows into the tensor it is given, which
    # must not be the bank itself (it would overwrite rank 0's rows for the next k-means)
    rows = [distributed.gather_rows(bank.emb[i, :m].clone(), bank.index[:m], args.n_images, rt)
            for i in range(bank.emb.shape[0])]
    rng = checkpoint.gather_rng_states(rt)
    loss = loss_sum.clone()
    if rt.distributed:
        torch.distributed.all_reduce(loss)
    if not rt.is_main:
        return
    held = torch.from_numpy(np.sort(draws[:m * rt.world_size])).long()  # union of the ranks' rows 0..m-1
    state = {
        "method": "deepclusterv2", "epoch": epoch, "iteration": iteration,
        "state_dict": core.state_dict(), "config": core.config(), "optimizer": opt.state_dict(),
        "scaler": scaler.state_dict(), "labels": labels, "n_empty": n_empty,
        "bank_index": held, "bank": torch.stack([r[held.to(r.device)].cpu() for r in rows]),
        "bank_epoch": bank_epoch, "loss_sum": loss.cpu(), "n_images": args.n_images,
        "global_batch": args.batch_size * rt.world_size, "world_size": rt.world_size,
        "nmb_prototypes": list(args.nmb_prototypes), "crops_for_assign": list(args.crops_for_assign),
        "rng_ranks": rng, "args": {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, list))},
    }
    checkpoint.save_checkpoint(state, path, rt)


def load_state(path: Path, core, opt, scaler, args, rt) -> dict:
    """Restore model, optimizer, scaler and this rank's RNG; check the run fits the flags."""
    ck = checkpoint.torch_load(path)
    if ck.get("method") != "deepclusterv2":
        raise checkpoint.CheckpointError(f"{str(path)!r} is not a DeepCluster-v2 checkpoint of this script")
    for key, now in (("n_images", args.n_images), ("nmb_prototypes", list(args.nmb_prototypes)),
                     ("crops_for_assign", list(args.crops_for_assign))):
        if ck[key] != now:
            raise checkpoint.CheckpointError(f"{str(path)!r} was written with {key} {ck[key]}, not {now}: "
                                             f"use another --exp to start a new run")
    if ck["iteration"] and ck["global_batch"] != args.batch_size * rt.world_size:
        raise checkpoint.CheckpointError(
            f"{str(path)!r} stops inside epoch {ck['epoch']} with a global batch of {ck['global_batch']}: resume "
            f"with --batch_size x processes = {ck['global_batch']} (now {args.batch_size} x {rt.world_size})")
    checkpoint.restart_from_checkpoint(path, loaded=ck, state_dict=core, optimizer=opt, scaler=scaler)
    states = ck.get("rng_ranks") or []
    if ck["world_size"] == rt.world_size and rt.rank < len(states):
        checkpoint.set_rng_state(states[rt.rank])
    return ck


def restore_bank(ck: dict, args, rt, draws_of) -> tuple[Bank, int]:
    """This rank's bank rows from a checkpoint: the rows it held (same global batch), else an
    even share of the saved rows (an epoch boundary with another global batch). Returns the
    bank and the number of valid rows."""
    idx_saved, emb_saved = ck["bank_index"].long(), ck["bank"].float()     # (M,), (n_assign, M, d)
    where = torch.full((args.n_images,), -1, dtype=torch.long)
    where[idx_saved] = torch.arange(len(idx_saved))
    if ck["global_batch"] == args.batch_size * rt.world_size:
        m = len(idx_saved) // rt.world_size
        mine = torch.from_numpy(local_positions(draws_of(ck["bank_epoch"]), rt, m)).long()
    else:
        mine = idx_saved[rt.rank::rt.world_size]
        m = len(mine)
    rows = where[mine]
    if (rows < 0).any():
        raise checkpoint.CheckpointError("the checkpoint's memory bank lacks rows this process needs")
    bank = Bank(mine.to(rt.device), emb_saved[:, rows].to(rt.device))
    return bank, m


# ---------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------
def build_model(args, rt) -> tuple[DeepClusterV2Net, nn.Module]:
    core = DeepClusterV2Net(args.arch, hidden_mlp=args.hidden_mlp, feat_dim=args.feat_dim,
                            nmb_prototypes=args.nmb_prototypes, input_size=args.size_crops[0])
    # swav's --sync_bn pytorch: torch's SyncBatchNorm on CUDA, the all-reduce BatchNorm on gloo
    core = distributed.sync_batchnorm(core, args.sync_bn == "pytorch", rt)
    core = core.to(rt.device)
    distributed.broadcast_module_state(core, rt)  # every rank starts from rank 0's weights
    return core, distributed.wrap_ddp(core, rt)


def train_epoch(loader, model, core, opt, scaler, schedule: np.ndarray, labels: torch.Tensor, bank: Bank,
                draws: np.ndarray, epoch: int, start: int, iters: int, loss_sum: torch.Tensor, args, rt,
                on_step) -> None:
    """Steps ``start`` .. ``iters - 1`` of an epoch (swav's ``train``); ``draws``: the epoch's order."""
    model.train()
    global_batch = args.batch_size * rt.world_size
    n_crops = sum(args.nmb_crops)
    protos = core.prototype_parameters()
    for it, (idx, crops) in enumerate(loader, start=start):
        iteration = epoch * iters + it
        for g in opt.param_groups:
            g["lr"] = float(schedule[iteration])
        crops = [c.to(rt.device, non_blocking=True) for c in crops]
        with torch.autocast(rt.device.type, dtype=torch.float16, enabled=args.amp):
            emb, output = model(crops)               # (n_crops B, d), [(n_crops B, K_h)]
        emb = emb.detach()
        b = idx.shape[0]
        n_labelled = None
        if rt.distributed:  # the global batch's labelled images (the same for every head), per process
            step_draws = draws[it * global_batch:(it + 1) * global_batch]
            n_labelled = float((labels[0, torch.from_numpy(step_draws)] >= 0).sum()) / rt.world_size
        loss = dcv2_loss([o.float() for o in output], labels[:, idx].to(rt.device), n_crops, args.temperature,
                         n_labelled)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if iteration < args.freeze_prototypes_niters:
            for p in protos:  # swav: grad None, so neither momentum nor weight decay moves them
                p.grad = None
        scaler.step(opt)
        scaler.update()
        bank.write(it * b, idx, emb, args.crops_for_assign)
        loss_sum += torch.stack([loss.detach().float() * b, torch.tensor(float(b), device=loss.device)])
        on_step(it + 1)


def main(args: argparse.Namespace) -> dict:
    check_args(args)
    rt = distributed.init_runtime(args.device, args.dist_timeout)
    if args.amp and rt.device.type != "cuda":
        raise ScriptError("--amp needs CUDA (float16 autocast with a GradScaler)")
    exp = Path(args.exp)
    dataset = data.IndexedImageFolder(args.data)
    if len(dataset) == 0:
        raise data.DataError(f"data directory {args.data!r} holds no image")
    args.data = str(Path(args.data).resolve())
    checkpoint.check_exp_writable(exp, rt)
    cli.setup_logging(log, exp, "train.log", args.verbose, rt.is_main)
    distributed.seed_everything(args.seed, rt.rank)
    N = args.n_images = len(dataset)
    B = args.batch_size * rt.world_size
    iters = N // B
    if iters == 0:
        raise ScriptError(f"--batch_size {args.batch_size} x {rt.world_size} processes = {B} exceeds the "
                               f"{N} images of {args.data}")
    bank_rows = iters * (B if args.kmeans_init == "index" else args.batch_size)
    if max(args.nmb_prototypes) > bank_rows:
        raise ScriptError(
            f"--nmb_prototypes {max(args.nmb_prototypes)} exceeds the {bank_rows} rows k-means samples from "
            f"({'the whole bank' if args.kmeans_init == 'index' else 'rank 0s bank shard'}: {N} images, global "
            f"batch {B}): use fewer prototypes or more images")
    mc = data.MultiCropDataset(dataset, data.MultiCrop(args.size_crops, args.nmb_crops, args.min_scale_crops,
                                                       args.max_scale_crops))
    draws_of = lambda e: epoch_draws(N, B, args.seed, max(e, 0))  # noqa: E731 (the first bank: epoch 0's order)
    targets = np.asarray(dataset.targets) if dataset.targets else None

    core, model = build_model(args, rt)
    opt = optim.dcv2_sgd(core.parameters(), args.base_lr, args.wd)
    scaler = torch.amp.GradScaler("cuda", enabled=args.amp)
    schedule = optim.warmup_cosine_schedule(args.base_lr, args.final_lr, args.epochs, args.warmup_epochs,
                                            args.start_warmup, iters)
    history = util.Logger(exp / "log.jsonl") if rt.is_main else None
    clog = checkpoint.ClusterLog(exp / "clusters") if rt.is_main else None
    ckpt_path = exp / "checkpoint.pth.tar"
    knn = None
    if args.knn_data and rt.is_main:
        knn = knn_lib.KnnMonitor(args.knn_data, args.knn_train_size, args.knn_val_size, seed=args.seed,
                                  size=args.knn_size or args.size_crops[0], k=args.knn_k, batch=args.batch_size,
                                  workers=0, logger=log, whiten=args.knn_whiten)

    start_epoch, start_it, labels, n_empty = 0, 0, None, None
    loss_sum = torch.zeros(2, device=rt.device)
    if ckpt_path.exists():
        ck = load_state(ckpt_path, core, opt, scaler, args, rt)
        start_epoch, start_it = int(ck["epoch"]), int(ck["iteration"])
        bank, m = restore_bank(ck, args, rt, draws_of)
        if start_it:
            labels, n_empty = ck["labels"], ck.get("n_empty")
            loss_sum = ck["loss_sum"].to(rt.device) / rt.world_size  # summed again over ranks at the end
        log.info("resumed from %s: epoch %d, iteration %d (written by %d process(es))", ckpt_path, start_epoch,
                 start_it, ck["world_size"])
        if history is not None:
            history.truncate(sum(1 for r in history.data if r.get("epoch", -2) < start_epoch))
        del ck
    else:
        if rt.is_main:
            fileio.atomic_write_text(exp / "args.json", json.dumps(
                {**{k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, list, bool))},
                 "nmb_cluster": args.nmb_prototypes[0]}, indent=1))
        if knn is not None:
            rec = knn.evaluate(core, rt.device)
            history.log({"epoch": -1, **rec})
            log.info("random network |%s", knn_lib.KnnMonitor.text(rec))
        bank = Bank.empty(len(args.crops_for_assign), iters * args.batch_size, args.feat_dim, rt.device)
        init_memory(make_loader(mc, draws_of(-1), aug_seed(args.seed, -1), 0, args, rt), model, bank, args, rt)

    record: dict = {}
    for epoch in range(start_epoch, args.epochs):
        t0 = distributed.synced_time(rt.device)
        time_cluster = 0.0
        if labels is None:  # epoch start: cluster the previous epoch's bank
            labels, n_empty = cluster_memory(core, bank, N, epoch, args, rt)
            time_cluster = distributed.synced_time(rt.device) - t0
            loss_sum = torch.zeros(2, device=rt.device)
        # full size for this epoch's rows (a restored bank holds only the rows already written)
        bank = bank.resized(iters * args.batch_size)
        draws = draws_of(epoch)
        loader = make_loader(mc, draws, aug_seed(args.seed, epoch), start_it * args.batch_size, args, rt)

        def on_step(done: int) -> None:
            fileio.fault_point("dcv2_train")
            if args.checkpoint_iters and done % args.checkpoint_iters == 0 and done < iters:
                save_state(ckpt_path, core, opt, scaler, epoch, done, labels, bank, done * args.batch_size,
                           draws, epoch, loss_sum, args, rt, n_empty)

        t1 = distributed.synced_time(rt.device)
        train_epoch(loader, model, core, opt, scaler, schedule, labels, bank, draws, epoch, start_it, iters,
                    loss_sum, args, rt, on_step)
        time_train = distributed.synced_time(rt.device) - t1
        total = loss_sum.clone()
        if rt.distributed:
            torch.distributed.all_reduce(total)
        record = {"epoch": epoch, "loss": float(total[0] / total[1].clamp_min(1)),
                  "lr": float(schedule[(epoch + 1) * iters - 1]), "time_clustering": time_cluster,
                  "time_train": time_train, "n_clusters": args.nmb_prototypes[0], "world_size": rt.world_size}
        if n_empty is not None:
            record["n_empty"] = n_empty
        record.update(label_scores(labels, targets, clog, epoch))
        if knn is not None:
            record.update(knn.evaluate(core, rt.device))
        save_state(ckpt_path, core, opt, scaler, epoch + 1, 0, None, bank, iters * args.batch_size, draws, epoch,
                   torch.zeros(2, device=rt.device), args, rt)
        if rt.is_main:
            history.log(record)
            if epoch % args.checkpoint_freq == 0 or epoch == args.epochs - 1:
                fileio.atomic_torch_save({"epoch": epoch + 1, "state_dict": core.state_dict(),
                                              "config": core.config(), "method": "deepclusterv2"},
                                             exp / "checkpoints" / f"ckp-{epoch}.pth")
        nmi = record.get("nmi_labels_heads")
        log.info("epoch %3d | loss %.3f | lr %.4f | NMI labels %s | empty %s | time: cluster %.1fs train %.1fs%s",
                 epoch, record["loss"], record["lr"], " ".join(f"{x:.3f}" for x in nmi) if nmi else "-",
                 record.get("n_empty"),
                 time_cluster, time_train, knn_lib.KnnMonitor.text(record))
        labels, n_empty, start_it = None, None, 0
    distributed.barrier(rt)
    return record


def label_scores(labels: torch.Tensor, targets: np.ndarray | None, clog, epoch: int) -> dict:
    """NMI of each head's labels with the class folders and with the previous epoch's head-0
    labels (images without an assignment left out); head 0's labels go to EXP/clusters."""
    out: dict = {}
    lab = labels.numpy()
    if clog is None:
        return out
    prev = clog.load(epoch - 1) if clog.path(epoch - 1).exists() else None
    keep = lab[0] >= 0
    clog.save(epoch, np.where(keep, lab[0], -1), int(lab.max()) + 1)
    if prev is not None:
        both = keep & (prev >= 0)
        out["nmi_prev"] = clustering.nmi(lab[0][both], prev[both])
    if targets is not None:
        heads = [clustering.nmi(lab[h][lab[h] >= 0], targets[lab[h] >= 0]) for h in range(len(lab))]
        out["nmi_labels"], out["nmi_labels_heads"] = heads[0], heads
    return out


def run(argv: list[str] | None = None) -> int:
    """Entry point: known failures become one ``error:`` line, exit 2."""
    return cli.run_cli(main, get_args_parser(), argv, logger=log)


if __name__ == "__main__":
    sys.exit(run())
