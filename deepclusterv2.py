"""DeepCluster-v2 (facebookresearch/swav ``main_deepclusterv2.py``), the method.

Each epoch: spherical k-means (per head, on the memory bank of the ``crops_for_assign``
projections of the previous epoch, the heads alternating crops) sets each head's prototypes
to its centroids and gives every image one label per head; then one pass of multi-crop
training with the cross-entropy of the prototype scores / temperature against those labels
(SGD + LARC, warmup then cosine learning rate), the bank refreshed with every step's
projections. The bank of the first epoch comes from a pass over the data before training.

Its state beyond the network: the memory bank (each rank's rows, in the order it processed
them, saved by dataset index), the epoch's labels, the GradScaler. The run itself (folder,
resume, stop protocol, checkpoint policy, records) is :mod:`engine`'s; ``cfg`` below is
``main_deepclusterv2.py``'s read-only config (:class:`cli.Config`).

Memory of the bank per process: ``len(crops_for_assign) x (N / W) x feat_dim x 4`` bytes
(ImageNet, 2 x 160k x 128 x 4 on 8 GPUs: 164 MB) plus its (N / W,) int64 index; the labels
of every head on every process, ``heads x N x 8`` bytes (3 x 1.28 M: 31 MB).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

import checkpoint
import clustering
import data
import distributed
import engine
import fileio
import util
from errors import ScriptError
from knn import KnnMonitor
from models.deepclusterv2 import DeepClusterV2Net, dcv2_loss

log = logging.getLogger("deepcluster")


# ---------------------------------------------------------------------------------------
# data order: every epoch a seeded permutation, cut to whole global batches
# ---------------------------------------------------------------------------------------
def epoch_draws(n: int, global_batch: int, seed: int, epoch: int) -> np.ndarray:
    """(iters * global_batch,) dataset indexes of one epoch, in order (swav: DistributedSampler
    shuffling + drop_last). Step i of every rank covers positions [i B, (i + 1) B) (util.SeededShardSampler)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + max(epoch, 0))  # the first bank: epoch 0's order
    return torch.randperm(n, generator=g)[:(n // global_batch) * global_batch].numpy()


def aug_seed(seed: int, epoch: int) -> int:
    """Base augmentation seed of an epoch (epoch -1: the pass that fills the first bank)."""
    return seed * 7_919 + epoch + 2


def collate_crops(batch):
    """[(index, [crop_j (3, s_j, s_j)])] -> ((B,) int64, [(B, 3, s_j, s_j)])."""
    idx = torch.as_tensor([b[0] for b in batch], dtype=torch.long)
    return idx, [torch.stack([b[1][j] for b in batch]) for j in range(len(batch[0][1]))]


def make_loader(mc_dataset, draws: np.ndarray, base_seed: int, start: int, cfg, rt) -> torch.utils.data.DataLoader:
    sampler = util.SeededShardSampler(draws, base_seed, rt.rank, rt.world_size, start=start)
    return data.make_loader(mc_dataset, cfg.batch_size, cfg.workers, rt.device, sampler, base_seed, collate_crops)


def check_data(ds: data.IndexedImageFolder, cfg, exp: Path, rt) -> int:
    """Every image readable (--check_images, --bad_images), their number against the batch and
    the prototypes. Returns the iterations per epoch."""
    data.check_folder(ds, cfg.check_images, cfg.bad_images, exp / "bad_images.txt", workers=cfg.workers,
                      progress=not cfg.no_progress, write=rt.is_main, rt=rt)
    n, global_batch = len(ds), cfg.batch_size * rt.world_size
    if n // global_batch == 0:
        raise ScriptError(f"--batch_size {cfg.batch_size} x {rt.world_size} processes = {global_batch} exceeds the "
                          f"{n} images of {cfg.data}")
    rows = n // global_batch * (global_batch if cfg.kmeans_init == "index" else cfg.batch_size)
    if max(cfg.nmb_prototypes) > rows:
        raise ScriptError(f"--nmb_prototypes {max(cfg.nmb_prototypes)} exceeds the {rows} rows k-means samples from "
                          f"({'the whole bank' if cfg.kmeans_init == 'index' else 'rank 0s bank shard'}: {n} images, "
                          f"global batch {global_batch}): use fewer prototypes or more images")
    return n // global_batch


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
        """Rows [pos, pos + B) <- this step's images: ``idx`` (B,) on the bank's device, ``emb``
        (n_crops * B, d), crop by crop."""
        b = idx.shape[0]
        self.index[pos:pos + b] = idx
        for i, c in enumerate(crops_for_assign):
            self.emb[i, pos:pos + b] = emb[c * b:(c + 1) * b].float()


@torch.no_grad()
def init_memory(loader, model: nn.Module, bank: Bank, cfg, rt) -> None:
    """swav's first pass: the projections of the crops_for_assign of every image (train mode,
    as swav: BN uses batch statistics and updates its running averages)."""
    pos = 0
    for idx, crops in loader:
        b = idx.shape[0]
        embs = [model(crops[c].to(rt.device, non_blocking=True))[0] for c in cfg.crops_for_assign]
        bank.write(pos, idx.to(rt.device, non_blocking=True), torch.cat(embs), list(range(len(embs))))
        pos += b
    log.info("memory bank filled: %d rows on this process", pos)


@torch.no_grad()
def cluster_memory(core: DeepClusterV2Net, bank: Bank, n: int, epoch: int, cfg, rt) -> tuple[torch.Tensor, list[int]]:
    """Per head, spherical k-means of bank j (heads take the crops_for_assign banks in turn);
    prototypes <- centroids. Returns ((heads, n) int64 labels on the host, -100 for images not
    in the bank; on every rank) and the number of empty clusters of each head."""
    labels = torch.full((len(cfg.nmb_prototypes), n), -100, dtype=torch.long)
    empty, j = [], 0
    for h, k in enumerate(cfg.nmb_prototypes):
        c, a = clustering.spherical_kmeans(bank.emb[j], k, niter=cfg.nmb_kmeans_iters,
                                           seed=cfg.seed * 1_000_003 + epoch * 97 + h,
                                           index=bank.index if cfg.kmeans_init == "index" else None,
                                           reassign_empty=cfg.reassign_empty, rt=rt)
        core.prototypes.head(h).weight.copy_(c)
        labels[h] = clustering.gather_assignments(a, bank.index, n, rt=rt)
        lab = labels[h][labels[h] >= 0]
        empty.append(int(k - torch.unique(lab).numel()))
        j = (j + 1) % len(cfg.crops_for_assign)
    return labels, empty


# ---------------------------------------------------------------------------------------
# model and step
# ---------------------------------------------------------------------------------------
def build_model(cfg, rt) -> tuple[DeepClusterV2Net, nn.Module]:
    core = DeepClusterV2Net(cfg.arch, hidden_mlp=cfg.hidden_mlp, feat_dim=cfg.feat_dim,
                            nmb_prototypes=cfg.nmb_prototypes, input_size=cfg.size_crops[0])
    # swav's --sync_bn pytorch: BatchNorm over the global batch (distributed.AllReduceBatchNorm, any backend)
    core = distributed.sync_batchnorm(core, cfg.sync_bn == "pytorch", rt)
    core = core.to(rt.device)
    if cfg.channels_last:
        core = core.to(memory_format=torch.channels_last)
    distributed.broadcast_module_state(core, rt)  # every rank starts from rank 0's weights
    return core, distributed.wrap_ddp(core, rt)


def labelled_per_step(labels: torch.Tensor, draws: np.ndarray, iters: int, rt) -> list[float] | None:
    """Under torchrun, per step: the global batch's labelled images (the same for every head)
    divided by the number of processes (see :func:`models.deepclusterv2.dcv2_loss`), counted
    on the host once per epoch; None in one process."""
    if not rt.distributed:
        return None
    lab = labels[0].numpy()[draws.reshape(iters, -1)]  # (iters, global batch)
    return ((lab >= 0).sum(1) / rt.world_size).tolist()


def train_step(model, core: DeepClusterV2Net, opt, scaler, schedule: np.ndarray, labels: torch.Tensor, bank: Bank,
               n_labelled: list[float] | None, epoch: int, iters: int, cfg, rt):
    """``step(it, batch)`` of :func:`engine.run_steps` (swav's ``train`` loop body): one
    multi-crop SGD step; the bank takes the step's projections. ``labels`` (heads, N) lives on
    the device: the step copies nothing to the host and waits for nothing."""
    n_crops = sum(cfg.nmb_crops)
    protos = core.prototype_parameters()

    def step(it: int, batch) -> tuple[torch.Tensor, int]:
        idx, crops = batch
        iteration = epoch * iters + it
        for g in opt.param_groups:
            g["lr"] = float(schedule[iteration])
        crops = [c.to(rt.device, non_blocking=True) for c in crops]  # from pinned memory: ordered, no wait
        idx = idx.to(rt.device, non_blocking=True)
        with torch.autocast(rt.device.type, dtype=torch.float16, enabled=cfg.amp):
            emb, output = model(crops)               # (n_crops B, d), [(n_crops B, K_h)]
        loss = dcv2_loss([o.float() for o in output], labels[:, idx], n_crops, cfg.temperature,
                         None if n_labelled is None else n_labelled[it])
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if iteration < cfg.freeze_prototypes_niters:
            for p in protos:  # swav: grad None, so neither momentum nor weight decay moves them
                p.grad = None
        with engine.allowed_sync():  # --amp: GradScaler reads its inf flag on the host (one sync per step)
            scaler.step(opt)
        scaler.update()
        bank.write(it * idx.shape[0], idx, emb.detach(), cfg.crops_for_assign)
        fileio.fault_point("dcv2_train")
        return loss.detach().float(), idx.shape[0]
    return step


# ---------------------------------------------------------------------------------------
# checkpoints: model, optimizer, scaler, the bank by dataset index, labels inside an epoch
# ---------------------------------------------------------------------------------------
def state(core, opt, scaler, epoch: int, iteration: int, bank: Bank, m: int, draws: np.ndarray, bank_epoch: int,
          n_images: int, cfg, rt, mid_epoch: dict | None = None) -> dict | None:
    """A checkpoint (a collective: every rank calls it; rank 0's dict, None elsewhere). The
    first ``m`` rows of every rank's bank are gathered by dataset index. ``mid_epoch``: the
    running epoch's labels, partial loss and clustering time (a checkpoint inside epoch
    ``epoch`` at step ``iteration``); without it ``epoch`` is the next epoch to run."""
    # a copy: gather_rows receives the other ranks' rows into the tensor it is given, which
    # must not be the bank itself (it would overwrite rank 0's rows for the next k-means)
    rows = [distributed.gather_rows(bank.emb[i, :m].clone(), bank.index[:m], n_images, rt)
            for i in range(bank.emb.shape[0])]
    rng = checkpoint.gather_rng_states(rt)
    if not rt.is_main:
        return None
    held = torch.from_numpy(np.sort(draws[:m * rt.world_size])).long()  # union of the ranks' rows 0..m-1
    out = {
        "method": "deepclusterv2", "epoch": epoch, "iteration": iteration,
        "state_dict": core.state_dict(), "config": core.config(), "optimizer": opt.state_dict(),
        "scaler": scaler.state_dict(), "bank_index": held,
        "bank": torch.stack([r[held.to(r.device)].cpu() for r in rows]),
        "bank_epoch": bank_epoch, "n_images": n_images, "global_batch": cfg.batch_size * rt.world_size,
        "world_size": rt.world_size, "nmb_prototypes": list(cfg.nmb_prototypes),
        "crops_for_assign": list(cfg.crops_for_assign), "rng_ranks": rng,
        "args": {k: v for k, v in vars(cfg).items() if isinstance(v, (int, float, str, list, bool, type(None)))},
    }
    if mid_epoch is not None:
        out["mid_epoch"] = mid_epoch
    return out


def restore(path: str, core, opt, scaler, n_images: int, cfg, rt) -> dict:
    """Restore model, optimizer, scaler and this rank's RNG; check the run fits the flags."""
    ck = checkpoint.torch_load(path)
    if ck.get("method") != "deepclusterv2":
        raise checkpoint.CheckpointError(f"{path!r} is not a DeepCluster-v2 checkpoint: a DeepCluster run "
                                         f"resumes with main.py")
    for key, now in (("n_images", n_images), ("nmb_prototypes", list(cfg.nmb_prototypes)),
                     ("crops_for_assign", list(cfg.crops_for_assign))):
        if ck[key] != now:
            raise checkpoint.CheckpointError(f"{path!r} was written with {key} {ck[key]}, not {now}: "
                                             f"use another --exp to start a new run")
    if ck["iteration"] and ck["global_batch"] != cfg.batch_size * rt.world_size:
        raise checkpoint.CheckpointError(
            f"{path!r} stops inside epoch {ck['epoch']} with a global batch of {ck['global_batch']}: resume "
            f"with --batch_size x processes = {ck['global_batch']} (now {cfg.batch_size} x {rt.world_size})")
    checkpoint.restart_from_checkpoint(path, loaded=ck, state_dict=core, optimizer=opt, scaler=scaler)
    states = ck.get("rng_ranks") or []
    if ck["world_size"] == rt.world_size and rt.rank < len(states):
        checkpoint.set_rng_state(states[rt.rank])
    return ck


def restore_bank(ck: dict, n_images: int, cfg, rt, draws_of) -> tuple[Bank, int]:
    """This rank's bank rows from a checkpoint: the rows it held (same global batch), else an
    even share of the saved rows (an epoch boundary with another global batch). Returns the
    bank and the number of valid rows."""
    idx_saved, emb_saved = ck["bank_index"].long(), ck["bank"].float()     # (M,), (n_assign, M, d)
    where = torch.full((n_images,), -1, dtype=torch.long)
    where[idx_saved] = torch.arange(len(idx_saved))
    if ck["global_batch"] == cfg.batch_size * rt.world_size:
        m = len(idx_saved) // rt.world_size
        mine = torch.from_numpy(local_positions(draws_of(ck["bank_epoch"]), rt, m)).long()
    else:
        mine = idx_saved[rt.rank::rt.world_size]
        m = len(mine)
    rows = where[mine]
    if (rows < 0).any():
        raise checkpoint.CheckpointError("the checkpoint's memory bank lacks rows this process needs")
    return Bank(mine.to(rt.device), emb_saved[:, rows].to(rt.device)), m


# ---------------------------------------------------------------------------------------
# records
# ---------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------
# the run's start and each epoch's end
# ---------------------------------------------------------------------------------------
class State:
    """What the loop carries between epochs: the bank, the running epoch's labels and loss."""

    def __init__(self, bank: Bank, epoch: int = 0, it: int = 0, labels: torch.Tensor | None = None,
                 n_empty: list[int] | None = None, losses: util.AverageMeter | None = None,
                 time_clustering: float = 0.0):
        self.bank, self.epoch, self.it, self.labels, self.n_empty = bank, epoch, it, labels, n_empty
        self.losses, self.time_clustering = losses or util.AverageMeter(), time_clustering


def start(run, found: str | None, core, model, opt, scaler, mc, n: int, iters: int, draws_of,
          monitor, cfg, rt) -> State:
    """Restore the checkpoint ``found`` (model, optimizer, scaler, RNG, bank, the running epoch's
    labels and loss), or fill the first bank; record the invocation."""
    if found is None:
        run.begin(0, keep_random_network=False)
        if monitor is not None:
            rec = monitor.evaluate(core, rt.device)
            run.record({"epoch": -1, **rec}, -1)
            log.info("random network |%s", KnnMonitor.text(rec))
        bank = Bank.empty(len(cfg.crops_for_assign), iters * cfg.batch_size, cfg.feat_dim, rt.device)
        init_memory(make_loader(mc, draws_of(-1), aug_seed(cfg.seed, -1), 0, cfg, rt), model, bank, cfg, rt)
        return State(bank)
    ck = restore(found, core, opt, scaler, n, cfg, rt)
    st = State(restore_bank(ck, n, cfg, rt, draws_of)[0], int(ck["epoch"]), int(ck["iteration"]))
    if ck.get("mid_epoch") is not None:
        mid = ck["mid_epoch"]
        st.labels, st.n_empty, st.time_clustering = mid["labels"], mid["n_empty"], float(mid["time_clustering"])
        st.losses = util.AverageMeter.from_sum(float(mid["loss_sum"]), int(mid["loss_count"]))
    if st.epoch < cfg.epochs:
        run.begin(st.epoch, st.it, found)
    log.info("=> loaded checkpoint %r (epoch %d, iteration %d, written by %d process(es))", found, st.epoch, st.it,
             ck["world_size"])
    return st


def end_epoch(run, st: State, epoch: int, time_train: float, core, opt, scaler, schedule, n: int,
              iters: int, draws_of, targets, clog, monitor, cfg, rt) -> dict:
    """The epoch's record (log line first: a kill before the checkpoint redoes the epoch), then
    its checkpoint and, every --checkpoint_freq epochs, a copy of the model."""
    # main.py's keys for the same quantities (head 0's), each head's in *_heads
    record = {"epoch": epoch, "train_loss": st.losses.avg, "lr": float(schedule[(epoch + 1) * iters - 1]),
              "time_clustering": st.time_clustering, "time_train": time_train,
              "time_epoch": st.time_clustering + time_train, "iterations": iters,
              "n_clusters": cfg.nmb_prototypes[0], "n_empty": st.n_empty[0], "n_empty_heads": st.n_empty,
              "world_size": rt.world_size, **label_scores(st.labels, targets, clog, epoch)}
    if monitor is not None:
        record.update(monitor.evaluate(core, rt.device))
    run.record(record, epoch)
    run.ckpt.save_epoch(state(core, opt, scaler, epoch + 1, 0, st.bank, iters * cfg.batch_size, draws_of(epoch),
                              epoch, n, cfg, rt), epoch + 1)
    if rt.is_main and (epoch % cfg.checkpoint_freq == 0 or epoch == cfg.epochs - 1):
        fileio.atomic_torch_save({"epoch": epoch + 1, "state_dict": core.state_dict(), "config": core.config(),
                                  "method": "deepclusterv2"}, run.exp / "checkpoints" / f"ckp-{epoch}.pth")
    nmi = record.get("nmi_labels_heads")
    log.info("epoch %3d | loss %.3f | lr %.4f | NMI labels %s | empty %s | time: cluster %.1fs train %.1fs%s",
             epoch, record["train_loss"], record["lr"], " ".join(f"{x:.3f}" for x in nmi) if nmi else "-",
             record["n_empty_heads"], st.time_clustering, time_train, KnnMonitor.text(record))
    st.labels, st.n_empty, st.it = None, None, 0
    return record
