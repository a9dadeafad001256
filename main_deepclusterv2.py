"""DeepCluster-v2: the authors' improved DeepCluster (facebookresearch/swav main_deepclusterv2.py).

Usage:
    python main_deepclusterv2.py DIR --exp EXP [swav's flags: --nmb_crops 2 6 --size_crops 224 96 ...]
    torchrun --nproc_per_node 8 main_deepclusterv2.py DIR --exp EXP --batch_size 64 ...
    python main_deepclusterv2.py DIR --exp EXP --resume EXP   # continue a run (its newest checkpoint)
    bash main_deepclusterv2.sh                                 # swav's 400/800-epoch recipes

Each epoch: spherical k-means of the memory bank per head, then one pass of multi-crop training
against those labels (:mod:`deepclusterv2`); the run (folder, resume, stop protocol,
checkpoints, records) is :mod:`engine`'s. See docs/deepclusterv2.md.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import sys

import numpy as np
import torch

import checkpoint
import cli
import data
import deepclusterv2 as v2
import distributed
import engine
import knn as knn_lib
import optim
import preempt
import runfolder
import util
from errors import ScriptError
from models.deepclusterv2 import TRUNK_DIM

log = logging.getLogger("deepcluster")
NOT_INHERITED = ("resume", "exp", "overwrite", "verbose", "no_progress")


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
    engine.add_data_args(g)
    g = p.add_argument_group("DeepCluster-v2 (swav)")
    g.add_argument("--crops_for_assign", type=int, nargs="+", default=[0, 1],
                   help="crops whose projections fill the memory bank (the heads use them in turn)")
    g.add_argument("--temperature", type=float, default=0.1, help="temperature of the loss")
    g.add_argument("--feat_dim", type=int, default=128, help="projection dimension")
    g.add_argument("--nmb_prototypes", type=int, nargs="+", default=[3000, 3000, 3000], help="clusters of each head")
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
    g.add_argument("--wd", type=float, default=1e-6, help="weight decay (the value itself, as swav)")
    g.add_argument("--warmup_epochs", type=int, default=10, help="number of warmup epochs")
    g.add_argument("--start_warmup", type=float, default=0.0, help="initial warmup learning rate")
    g.add_argument("--amp", action="store_true", help="float16 autocast + GradScaler on CUDA (swav: fp32)")
    g.add_argument("--channels_last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels-last trunk (default auto: on with --amp on CUDA, where fp16 convolutions "
                        "want it; off elsewhere)")
    g = p.add_argument_group("model (swav)")
    g.add_argument("--arch", choices=sorted(TRUNK_DIM), default="resnet50", help="trunk")
    g.add_argument("--hidden_mlp", type=int, default=2048, help="hidden width of the projection head (0: linear)")
    g.add_argument("--sync_bn", choices=["pytorch", "none"], default="pytorch",
                   help="under torchrun, BatchNorm over the global batch (distributed.AllReduceBatchNorm, NCCL and "
                        "gloo: no host sync); none: per-process statistics")
    g = knn_lib.add_monitor_args(p, "the pooled trunk features")
    g.add_argument("--knn_size", type=int, default=0, help="kNN image size (0: the first --size_crops)")
    g = engine.add_run_args(p, exp="exp_dcv2", workers=10, exp_aliases=("--dump_path",))
    g.add_argument("--checkpoint_freq", type=int, default=25, help="keep a copy of the model every N epochs")
    g.add_argument("--checkpoint_iters", type=int, default=0,
                   help="also a resumable checkpoint every N iterations inside an epoch (0: epoch ends only)")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse flags; with --resume EXP, the run's recorded flags (``args.resume_note``)."""
    args, note = runfolder.parse_resumable(get_args_parser, argv, "deepclusterv2", NOT_INHERITED)
    args.resume_note = note
    check_args(args)
    return args


def check_args(args: argparse.Namespace) -> None:
    """Refuse values that make no sense, naming the flag."""
    n, wd = len(args.nmb_crops), args.wd
    rules = [
        ("DIR", args.data is not None or args.data_path is not None, None,
         "no image folder: give DIR (or --data_path)"),
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
        ("--wd", math.isfinite(wd) and wd >= 0, wd, "is the weight decay itself (swav's; 1e-6 by default) and must "
         "be >= 0" + (f"; {wd:g} looks like main.py's exponent: here --wd {10 ** wd:g}" if wd < 0 else "")),
        ("--nmb_kmeans_iters", args.nmb_kmeans_iters >= 0, args.nmb_kmeans_iters, "must be >= 0"),
        ("--checkpoint_iters", args.checkpoint_iters >= 0, args.checkpoint_iters, "must be >= 0"),
        ("--checkpoint_freq", args.checkpoint_freq >= 1, args.checkpoint_freq, "must be >= 1"),
    ] + knn_lib.monitor_arg_rules(args) + engine.run_arg_rules(args)
    for flag, ok, value, why in rules:
        if not ok:
            raise ScriptError(why if value is None else f"{flag} {value}: {why}")


def configure(args: argparse.Namespace, rt: distributed.Runtime) -> cli.Config:
    """The run's read-only config: DIR absolute, channels-last resolved, one set of progress bars."""
    if args.amp and rt.device.type != "cuda":
        raise ScriptError("--amp needs CUDA (float16 autocast with a GradScaler)")
    flags = {k: v for k, v in vars(args).items() if k != "resume_note"}
    auto_cl = args.amp and rt.device.type == "cuda"
    return cli.Config(None, **{**flags, "data": os.path.abspath(args.data or args.data_path),
                               "channels_last": auto_cl if args.channels_last is None else args.channels_last,
                               "no_progress": args.no_progress or not rt.is_main})


def open_data(cfg: cli.Config, rt: distributed.Runtime) -> data.IndexedImageFolder:
    """The images (DIR or --file_list), before anything is written."""
    ds = data.IndexedImageFolder.from_file_list(cfg.file_list, cfg.data) if cfg.file_list else \
        data.IndexedImageFolder(cfg.data)
    if len(ds) == 0:
        raise data.DataError(f"data directory {cfg.data!r} holds no image")
    return ds


def train(run: engine.Run, st: v2.State, epoch: int, core, model, opt, scaler, schedule, mc, n: int, iters: int,
          draws_of, cfg: cli.Config, rt: distributed.Runtime) -> float:
    """The epoch's clustering (unless resumed inside it), then its steps from ``st.it``; seconds of training."""
    clustered = st.labels is None
    if clustered:  # epoch start: cluster the previous epoch's bank
        t0 = distributed.synced_time(rt.device)
        st.labels, st.n_empty = v2.cluster_memory(core, st.bank, n, epoch, cfg, rt)
        st.time_clustering, st.losses = distributed.synced_time(rt.device) - t0, util.AverageMeter()
    st.bank = st.bank.resized(iters * cfg.batch_size)  # a restored bank holds only the rows already written
    draws, labels = draws_of(epoch), st.labels.to(rt.device)
    meter = distributed.DeviceLossMeter(rt.device, st.losses, epoch, st.it)

    def state(i: int) -> dict | None:  # a mid-epoch checkpoint at step i (a collective)
        m = meter.read()
        mid = {"iteration": i, "labels": st.labels, "n_empty": st.n_empty, "loss_sum": m.sum, "loss_count": m.count,
               "time_clustering": st.time_clustering}
        return v2.state(core, opt, scaler, epoch, i, st.bank, i * cfg.batch_size, draws, epoch, n, cfg, rt, mid)

    t1 = distributed.synced_time(rt.device)
    step = v2.train_step(model, core, opt, scaler, schedule, labels, st.bank,
                         v2.labelled_per_step(st.labels, draws, iters, rt), epoch, iters, cfg, rt)
    model.train()
    run.train(v2.make_loader(mc, draws, v2.aug_seed(cfg.seed, epoch), st.it * cfg.batch_size, cfg, rt), step,
              epoch=epoch, start=st.it, iters=iters, meter=meter, state=state, clustered=clustered)
    return distributed.synced_time(rt.device) - t1


def epochs(run: engine.Run, found: str | None, ds, cfg: cli.Config, rt: distributed.Runtime) -> dict:
    """Set up model, optimiser and bank, then train epoch by epoch; the last record."""
    iters, n = v2.check_data(ds, cfg, run.exp, rt), len(ds)
    mc = data.MultiCropDataset(ds, data.MultiCrop(cfg.size_crops, cfg.nmb_crops, cfg.min_scale_crops,
                                                  cfg.max_scale_crops))
    draws_of = lambda e: v2.epoch_draws(n, cfg.batch_size * rt.world_size, cfg.seed, e)  # noqa: E731
    targets = np.asarray(ds.targets) if ds.targets else None
    core, model = v2.build_model(cfg, rt)
    opt, scaler = optim.dcv2_sgd(core.parameters(), cfg.base_lr, cfg.wd), torch.amp.GradScaler("cuda", enabled=cfg.amp)
    schedule = optim.warmup_cosine_schedule(cfg.base_lr, cfg.final_lr, cfg.epochs, cfg.warmup_epochs,
                                            cfg.start_warmup, iters)
    clog = checkpoint.ClusterLog(run.exp / "clusters") if rt.is_main else None
    monitor = knn_lib.KnnMonitor(cfg.knn_data, cfg.knn_train_size, cfg.knn_val_size, seed=cfg.seed,
                                 size=cfg.knn_size or cfg.size_crops[0], k=cfg.knn_k, batch=cfg.batch_size, workers=0,
                                 logger=log, whiten=cfg.knn_whiten) if cfg.knn_data and rt.is_main else None
    st = v2.start(run, found, core, model, opt, scaler, mc, n, iters, draws_of, monitor, cfg, rt)
    if st.epoch >= cfg.epochs:
        log.warning("nothing to train: the checkpoint is at epoch %d and --epochs is %d (the run is finished; raise "
                    "--epochs to train further)", st.epoch, cfg.epochs)
        return {}
    if clog is not None:
        clog.truncate(st.epoch)
    run.checkpoints(cfg.checkpoint_iters, cfg.keep_checkpoints, cfg.keep_epoch_checkpoints, cfg.checkpoint_minutes)
    run.board.start(st.epoch)
    record: dict = {}
    for epoch in range(st.epoch, cfg.epochs):
        preempt.raise_if_requested(f" before epoch {epoch}")  # asked for at the end of the last one
        time_train = train(run, st, epoch, core, model, opt, scaler, schedule, mc, n, iters, draws_of, cfg, rt)
        record = v2.end_epoch(run, st, epoch, time_train, core, opt, scaler, schedule, n, iters, draws_of, targets,
                           clog, monitor, cfg, rt)
    return record


def main(args: argparse.Namespace) -> dict:
    """Run DeepCluster-v2; returns the last epoch's log record."""
    rt = distributed.init_runtime(args.device, args.dist_timeout)
    distributed.configure_backends(False)
    cfg = configure(args, rt)
    ds = open_data(cfg, rt)  # a missing or empty DIR is refused before anything is written
    run = engine.Run(cfg.exp, rt, "deepclusterv2", vars(cfg), resume=cfg.resume, overwrite=cfg.overwrite,
                     verbose=cfg.verbose, tensorboard=cfg.tensorboard, no_progress=cfg.no_progress)
    found = run.claim()
    try:
        if args.resume_note:
            log.info("--resume: %s", args.resume_note)
        distributed.seed_everything(cfg.seed, rt.rank)
        record = epochs(run, found, ds, cfg, rt)
        run.finish(report=cfg.report)
        return record
    finally:
        run.close()


def run(argv: list[str] | None = None) -> int:
    """Entry point: known failures become one ``error:`` line, exit 2 (75 when stopped, 130 on Ctrl-C)."""
    return cli.run_cli(main, parse_args, argv, logger=log,
                       on_interrupt=lambda args: engine.interrupted_hint(args.exp),
                       hint=lambda args: engine.resume_hint(args.exp))


if __name__ == "__main__":
    sys.exit(run())
