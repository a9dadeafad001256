"""DeepCluster: unsupervised training of a convnet by alternating k-means and classification.

Usage:
    python main.py DIR [--arch alexnet] [--sobel] [--k 10000] [--exp exp] [...]
    python main.py                      # demo: scikit-learn's digits, on CPU, in minutes
    python main.py DIR --exp exp --resume exp      # continue a run (its newest checkpoint)
    python main.py DIR --exp exp --overwrite       # start over in a folder that holds a run

Each epoch (Caron et al., ECCV 2018): compute the fc7 features of every image, PCA-whiten
and cluster them, train the convnet for one pass to predict the cluster ids (with a fresh
top layer), save a checkpoint. The method is :mod:`deepcluster`, the run (folder, resume, stop
protocol, checkpoints, records) :mod:`engine`'s. See README.md for the flags and the outputs.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from pathlib import Path

from torch import nn

import checkpoint
import cli
import data
import deepcluster as dc
import distributed
import engine
import input_cache
import knn
import models
import preempt
import runfolder

log = logging.getLogger("deepcluster")

# The no-argument demo: scikit-learn's 1,797 digits on a 2-core CPU. Digits are 8x8 strokes, of which the paper's
# 8% crops keep almost nothing: the demo crops at least half. Its kNN curve uses a train/val split of the same digits.
DEMO_KNN_DATA = str(Path("data") / "digits_split")
DEMO_DEFAULTS = dict(size=64, nmb_cluster=100, epochs=6, batch=64, workers=2, exp="exp_demo",
                     sobel=True, lr=0.05, crop_min_scale=0.5, knn_data=DEMO_KNN_DATA,
                     knn_train_size=400, knn_val_size=200)
# flags a --resume never takes from the recorded run: where it writes, how it resumes, how it talks
NOT_INHERITED = ("resume", "exp", "overwrite", "start_epoch", "change_k", "verbose", "no_progress")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="PyTorch Implementation of DeepCluster (unsupervised training)",
                                formatter_class=cli.HelpFormatter)
    p.add_argument("data", metavar="DIR", nargs="?", default=None,
                   help="image folder, with or without class folders (only used to report NMI with the labels); "
                        "omit it to run the demo on scikit-learn's handwritten digits")
    engine.add_data_args(p)
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
    add_speed_args(g)
    knn.add_monitor_args(p)
    g = engine.add_run_args(p, exp="exp")
    input_cache.add_args(g)
    g.add_argument("--change_k", action="store_true", help="with --resume: allow a --k other than the checkpoint's")
    g.add_argument("--checkpoints", type=int, default=25000, help="how many iterations between two checkpoints")
    g.add_argument("--deterministic", action="store_true",
                   help="GPU: deterministic algorithms, no cuDNN autotuning, TF32 off (bitwise resume on the same "
                        "GPU and software, slower); the CPU is deterministic without it")
    g.add_argument("--sync_bn", action=argparse.BooleanOptionalAction, default=None,
                   help="under torchrun, BatchNorm statistics over the global batch (distributed.AllReduceBatchNorm: "
                        "no host sync; default: on with NCCL/GPUs, off on CPU/gloo); off: per-process statistics, "
                        "as the original's DataParallel")
    return p


def add_speed_args(g) -> None:
    """The flags of the speed paths (same results up to rounding, or opt-in)."""
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse flags; with no DIR, the demo's defaults replace the paper's where not given; with
    --resume EXP, the run's recorded flags (``args.resume_note`` says which and what differs)."""
    def demo(chosen) -> dict:
        return DEMO_DEFAULTS if chosen("data") is None and chosen("file_list") is None else {}
    args, note = runfolder.parse_resumable(get_args_parser, argv, "deepcluster", NOT_INHERITED, demo)
    args.resume_note, args.demo = note, args.data is None and args.file_list is None
    check_args(args, get_args_parser())
    return args


def check_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Refuse values that make no sense, naming the flag."""
    rules = [
        ("--nmb_cluster/--k", args.nmb_cluster >= 1, args.nmb_cluster, "must be >= 1"),
        ("--lr", args.lr > 0 and math.isfinite(args.lr), args.lr, "must be a positive number"),
        ("--wd", math.isfinite(args.wd) and args.wd < 0, args.wd,
         "is an exponent (weight decay = 10**wd) and must be < 0: --wd -5 is a decay of 1e-5"
         + (f"; {args.wd:g} is a decay itself, as main_deepclusterv2.py's --wd takes: here --wd "
            f"{math.log10(args.wd):g}" if 0 < args.wd < 1 else "")),
        ("--momentum", 0 <= args.momentum < 1, args.momentum, "must be in [0, 1)"),
        ("--batch", args.batch >= 1, args.batch, "must be >= 1"),
        ("--epochs", args.epochs >= 0, args.epochs, "must be >= 0"),
        ("--start_epoch", args.start_epoch >= 0, args.start_epoch, "must be >= 0"),
        ("--reassign", args.reassign > 0 and math.isfinite(args.reassign), args.reassign, "must be > 0"),
        ("--checkpoints", args.checkpoints >= 1, args.checkpoints, "must be >= 1 (iterations)"),
        ("--crop_min_scale", 0 < args.crop_min_scale <= 1, args.crop_min_scale, "must be in (0, 1]"),
        ("--pca", args.pca >= 1, args.pca, "must be >= 1"),
        ("--kmeans_iters", args.kmeans_iters >= 1, args.kmeans_iters, "must be >= 1"),
        ("--extract_batch", args.extract_batch >= 0, args.extract_batch, "must be >= 0 (0: batch / W)"),
        ("--size", args.size >= (64 if args.arch == "alexnet" else 32), args.size,
         "is too small for the architecture (alexnet needs >= 64, vgg16 and resnet50 >= 32)"),
    ] + knn.monitor_arg_rules(args) + engine.run_arg_rules(args)
    world = int(os.environ.get("WORLD_SIZE", 1))  # torchrun's number of processes
    rules.append(("--batch", args.batch % world == 0, args.batch, f"is the global mini-batch and must be a multiple "
                  f"of the number of processes {world} (each takes batch / {world} images per step)"))
    for flag, ok, value, why in rules:
        if not ok:
            parser.error(f"argument {flag}: invalid value {value!r}: {why}")


# ---------------------------------------------------------------------------------------
# orchestration
# ---------------------------------------------------------------------------------------
def configure(args: argparse.Namespace, rt: distributed.Runtime) -> cli.Config:
    """The run's read-only config: the flags, the demo switch, channels-last resolved, one set of
    progress bars (rank 0's)."""
    flags = {k: v for k, v in vars(args).items() if k != "resume_note"}
    channels_last = distributed.resolve_channels_last(args.channels_last, rt.device)
    return cli.Config(None, **{**flags, "channels_last": channels_last,
                               "no_progress": args.no_progress or not rt.is_main, "file_list_sha256": None})


def train(run: engine.Run, plan: dc.EpochPlan, epoch: int, model, opt, prev, dataset, cfg: cli.Config,
          rt: distributed.Runtime, clustered: bool) -> tuple[float, float, int]:
    """One pass of SGD on the plan's draws, from its start (the engine's stop protocol and
    checkpoint policy; ``clustered``: the plan is new, saved before its first step so that a
    crash never redoes its clustering); returns (mean loss, seconds, iterations of the epoch)."""
    t0 = distributed.synced_time(rt.device)
    # step i of the epoch covers draws [i * batch, (i + 1) * batch) on any number of processes
    loader = dc.make_train_loader(dataset, plan.images_lists, plan.draws, epoch, cfg, rt,
                                  start=plan.start_iter * dc.rank_batch(cfg, rt))
    iters = math.ceil(len(plan.draws) / cfg.batch)
    meter = distributed.DeviceLossMeter(rt.device, plan.losses, epoch, plan.start_iter)

    def state(i: int) -> dict | None:  # a mid-epoch checkpoint at step i (a collective)
        mid = dc.mid_epoch_state(plan, i, meter.read(), prev, cfg, rt)
        return dc.state(model, opt, epoch, cfg, plan.labels, rt, mid)

    model.train()
    step = dc.train_step(distributed.wrap_ddp(model, rt), nn.CrossEntropyLoss(), opt, plan, cfg, rt.device)
    run.train(loader, step, epoch=epoch, start=plan.start_iter, iters=iters, meter=meter, state=state,
              clustered=clustered)
    return plan.losses.avg, distributed.synced_time(rt.device) - t0, iters


def epochs(run: engine.Run, found: str | None, dataset, cfg: cli.Config, rt: distributed.Runtime) -> dict:
    """Set up the model and the run's state, then train epoch by epoch; the last record."""
    monitor = knn.KnnMonitor.for_training(cfg, rt, log, demo=DEMO_KNN_DATA)  # a bad --knn_data stops here
    cfg = cfg.replace(**dc.check_data(dataset, cfg, run.exp, rt))
    run.flags = {k: v for k, v in vars(cfg).items() if k != "demo"}  # recorded as run: --pca lowered
    n, targets = len(dataset), dc.label_targets(dataset)
    dataset.mark_unreadable = cfg.bad_images == "skip"
    model = distributed.sync_batchnorm(dc.build_model(cfg, rt.device), cfg.sync_bn, rt)
    opt, clog = dc.build_optimizer(model, cfg), checkpoint.ClusterLog(run.exp / "clusters")
    first, mid, prev = dc.resume_or_start(run, found, model, opt, clog, n, cfg, rt)
    run.checkpoints(cfg.checkpoints, cfg.keep_checkpoints, cfg.keep_epoch_checkpoints, cfg.checkpoint_minutes)
    run.board.start(first)
    feature_loader, clusterer = dc.make_feature_loader(dataset, cfg, rt), dc.make_clusterer(cfg, rt.device)
    record: dict = {}
    if first == 0 and mid is None and monitor is not None and first < cfg.epochs:
        init = monitor.evaluate(model, rt.device)
        run.record({"epoch": -1, **init}, -1)  # epoch -1: the random network, before any training
        log.info("random network |%s", knn.KnnMonitor.text(init))
    for epoch in range(first, cfg.epochs):
        preempt.raise_if_requested(f" before epoch {epoch}")  # a stop asked for at the end of the last one
        clustered = mid is None
        plan = dc.plan_epoch(feature_loader, model, clusterer, n, cfg, rt) if clustered else \
            dc.resumed_plan(mid, model, cfg, rt)
        mid = None
        loss, time_train, iters = train(run, plan, epoch, model, opt, prev, dataset, cfg, rt, clustered)
        knn_record = {} if monitor is None else monitor.evaluate(model, rt.device)  # a kill here redoes the epoch
        record = {**dc.epoch_record(epoch, plan, loss, time_train, iters, prev, targets, rt), **knn_record}
        dc.end_epoch(run, epoch, plan, record, model, opt, clog, dataset, cfg, rt)
        prev = plan.labels
    return record


def main(args: argparse.Namespace) -> dict:
    """Run DeepCluster; returns the last epoch's log record."""
    rt = distributed.init_runtime(args.device, timeout_min=args.dist_timeout)
    distributed.configure_backends(args.deterministic)
    cfg = configure(args, rt)
    dataset, derived = dc.open_data(cfg, rt)  # a missing or empty DIR is refused before anything is written
    cfg = cfg.replace(**derived)
    run = engine.Run(cfg.exp, rt, "deepcluster", {k: v for k, v in vars(cfg).items() if k != "demo"},
                     resume=cfg.resume, overwrite=cfg.overwrite, verbose=cfg.verbose, tensorboard=cfg.tensorboard,
                     no_progress=cfg.no_progress)
    found = run.claim()
    try:
        if getattr(args, "resume_note", None):
            log.info("--resume: %s", args.resume_note)
        distributed.seed_everything(cfg.seed, rt.rank)
        record = epochs(run, found, dataset, cfg, rt)
        run.finish(report=cfg.report)
        return record
    finally:
        run.close()


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
                       on_interrupt=lambda args: engine.interrupted_hint(args.exp),
                       hint=lambda args: engine.resume_hint(args.exp))


if __name__ == "__main__":
    sys.exit(run())
