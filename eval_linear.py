"""Linear classification on the frozen activations of one layer (Caron et al. 2018, 5).

Usage:
    python eval_linear.py --data /path/to/imagenet --model exp/checkpoint.pth.tar --conv 3 --exp exp_linear
    python eval_linear.py --data DATA --model MODEL --conv 5 --tencrops --exp exp_linear
    python eval_linear.py --data DATA --model MODEL --conv 3 --exp exp_linear --resume exp_linear
    python eval_linear.py --data tiny --model m.pth.tar --conv 2 --size 64 --epochs 2 --workers 0   # small images
    python eval_linear.py --data DATA --model resnet50.pth --conv layer4 --exp exp_linear   # ResNet-50
    python eval_linear.py --data DATA --model dcv2.pth.tar --protocol swav --exp exp_linear  # swav's protocol

The model is frozen and in eval mode. The activation after the conv-th ReLU (before pooling)
is average-pooled to about 9,000 values (AlexNet at 224: conv1 AvgPool(6,6,3) -> 9600,
conv2 (4,4,0) -> 9216, conv3/conv4 (3,3,1) -> 9600, conv5 (2,2,0) -> 9216) and fed to one
Linear layer, trained by SGD with lr_t = lr0 / sqrt(1 + lr0 * wd * t) per iteration.
VGG-16 layers and ResNet-50's conv1, layer1..layer4 are adaptive-average-pooled to about
9,000 values (ResNet-50: 64x12x12, 256x6x6, 512x4x4, 1024x3x3, 2048x2x2, the standard
ResNet-50 linear benchmark); ResNet-50's avgpool gives 2048 values (a BN-free linear head).
Top-1/top-5 on val are reported each epoch; the paper quotes the best top-1.
Checkpoints (EXP/checkpoint.pth.tar, model_best.pth.tar) hold the classifier and its optimizer,
not the frozen network: they name the --model file (path, size, SHA-256), which a resume checks.

``--protocol swav`` is facebookresearch/swav's eval_linear.py (DeepCluster-v2, SwAV): the
2048-d average-pooled ResNet-50 output (``--conv avgpool``), Linear init N(0, 0.01), SGD lr 0.3
momentum 0.9 weight decay 1e-6 (no Nesterov), a per-epoch cosine schedule to ``--final_lr`` 0
(or ``--scheduler_type step``: x ``--gamma`` 0.1 at ``--decay_epochs`` 60 80), 100 epochs,
batch 256 (swav: 8 GPUs x 32), RandomResizedCrop + flip for training, Resize(256) +
CenterCrop(224) for validation, normalisation std (0.228, 0.224, 0.225). Flags given on the
command line win over these defaults.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn
from torch.utils.data import DataLoader
from torchvision import transforms
from tqdm import tqdm

import checkpoint
import cli
import data
import distributed
import engine
import eval_common
import models
import preempt
import tb
import util
from eval_common import EvalError, LabeledImages, check_same_model, log, model_fingerprint, require_dir


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Train a linear classifier on top of frozen convolutional layers of an AlexNet "
                    "(or VGG-16, ResNet-50). Expects --data DIR holding DIR/train/<class>/*.jpg and "
                    "DIR/val/<class>/*.jpg (ImageFolder layout, same class folders in both; "
                    "e.g. ImageNet or Places).",
        formatter_class=cli.HelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data", type=str, required=True, help="path to dataset (with train/ and val/)")
    g.add_argument("--tencrops", action="store_true", help="validation accuracy averaged over 10 crops")
    g.add_argument("--size", type=int, default=224,
                   help="crop size (224 = the paper; the 256 resize is scaled by size/224)")
    g.add_argument("--workers", type=int, default=4, help="number of data loading workers")

    g = p.add_argument_group("model")
    g.add_argument("--model", type=str, required=True, help="path to model (our or the released checkpoints)")
    g.add_argument("--conv", type=models.probe_arg, default=None,
                   help="on top of which convolutional layer train logistic regression "
                        "(AlexNet 1..5, VGG-16 1..13, ResNet-50 1..6 = conv1, layer1..layer4, avgpool; "
                        "a name such as layer4 also works)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=90, help="number of total epochs to run")
    g.add_argument("--batch_size", type=int, default=256, help="mini-batch size")
    g.add_argument("--lr", type=float, default=0.01, help="learning rate")
    g.add_argument("--momentum", type=float, default=0.9, help="momentum")
    g.add_argument("--weight_decay", "--wd", type=float, default=-4,
                   help="weight decay exponent: decay = 10**wd (-4: 1e-4)")
    g.add_argument("--seed", type=int, default=31, help="random seed")

    g = p.add_argument_group("protocol")
    g.add_argument("--protocol", choices=["deepcluster", "swav"], default="deepcluster",
                   help="deepcluster: the paper's probe (above); swav: swav's eval_linear.py (its defaults "
                        "replace the ones not given: --conv avgpool --epochs 100 --lr 0.3 --wd -6)")
    g.add_argument("--scheduler_type", choices=["cosine", "step"], default="cosine",
                   help="--protocol swav: per-epoch cosine to --final_lr, or x --gamma at --decay_epochs")
    g.add_argument("--final_lr", type=float, default=0.0, help="--protocol swav: final learning rate (cosine)")
    g.add_argument("--decay_epochs", type=int, nargs="+", default=[60, 80], help="--protocol swav: step epochs")
    g.add_argument("--gamma", type=float, default=0.1, help="--protocol swav: step decay factor")
    g.add_argument("--nesterov", action="store_true", help="--protocol swav: Nesterov momentum (swav: off)")

    g = p.add_argument_group("run")
    g.add_argument("--exp", type=str, default="exp_linear", help="exp folder")
    g.add_argument("--resume", type=str, default="", metavar="PATH",
                   help="checkpoint to resume from, or the --exp folder of the run (its checkpoint.pth.tar): "
                        "continues in that folder, every flag not given (--data, --model too) as that run's")
    g.add_argument("--overwrite", action="store_true",
                   help="start anew in an --exp that holds a run (deletes every output of that run first)")
    g.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto", help="where to run")
    g.add_argument("--tensorboard", action="store_true",
                   help="TensorBoard events in EXP/tensorboard: each epoch's losses, accuracies and lr")
    g.add_argument("--no_progress", action="store_true", help="no progress bars")
    g.add_argument("--verbose", action="store_true", help="chatty")
    return p


# swav's eval_linear.py values for what --protocol swav changes (flags given explicitly win)
SWAV_DEFAULTS = dict(conv="avgpool", epochs=100, batch_size=256, lr=0.3, weight_decay=-6, momentum=0.9)


# flags a --resume never takes from the recorded run: where it writes, how it resumes, how it talks
NOT_INHERITED = ("resume", "exp", "overwrite", "verbose", "no_progress")
# what a run writes beyond runfolder.OUTPUTS (--overwrite deletes them)
OUTPUTS = ("model_best.pth.tar", "results.json")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse flags; with ``--protocol swav`` swav's defaults replace ours where not given; with
    ``--resume EXP`` the run's recorded flags (``args.resume_note`` says which and what differs)."""
    def swav(chosen) -> dict:
        return SWAV_DEFAULTS if chosen("protocol") == "swav" else {}
    args, note = eval_common.parse_resumable(get_args_parser, argv, "eval_linear", NOT_INHERITED,
                                             ("data", "model"), swav)
    if isinstance(args.conv, str):
        args.conv = models.probe_arg(args.conv)
    args.resume_note = note
    return args


def swav_lr(args: argparse.Namespace, epoch: int) -> float:
    """The learning rate of an epoch under --protocol swav: CosineAnnealingLR(T_max=epochs,
    eta_min=final_lr) or MultiStepLR(decay_epochs, gamma), stepped once per epoch, in closed form."""
    if args.scheduler_type == "step":
        return args.lr * args.gamma ** sum(1 for e in args.decay_epochs if e <= epoch)
    return args.final_lr + (args.lr - args.final_lr) * (1 + math.cos(math.pi * epoch / args.epochs)) / 2


# ---------------------------------------------------------------------------------------
# model: frozen trunk (model.trunk(conv).freeze()) + pooling + linear
# ---------------------------------------------------------------------------------------


class RegLog(nn.Module):
    """(B, C, h, w) -> (B, classes): pooling, flatten, Linear."""

    def __init__(self, pool: nn.Module, dim: int, num_classes: int):
        super().__init__()
        self.pool = pool
        self.linear = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(x)                      # (B, C, h', w')
        return self.linear(torch.flatten(x, 1))  # (B, classes)


def build_reglog(body: models.Trunk, arch: str, conv: int, num_classes: int, size: int) -> RegLog:
    """Pooling and Linear sized by a dummy forward at ``size`` x ``size``."""
    with torch.no_grad():
        fmap = body(torch.zeros(1, 3, size, size))  # (1, C, h, w)
        pool = models.make_pool(arch, conv, fmap.shape[1], tuple(fmap.shape[2:]))
        dim = int(pool(fmap).numel())
    return RegLog(pool, dim, num_classes)


def pooled_dims(arch: str = "alexnet", size: int = 224) -> dict[int, int]:
    """Classifier input size per conv layer (AlexNet at 224: 9600, 9216, 9600, 9600, 9216)."""
    model = models.build_model(arch, out=0, input_size=size)
    out = {}
    for conv in range(1, len(model.probe_points()) + 1):
        out[conv] = build_reglog(model.trunk(conv).freeze(), arch, conv, 1, size).linear.in_features
    return out


# ---------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------
def swav_transforms(size: int) -> tuple[transforms.Compose, transforms.Compose]:
    """swav's eval_linear.py: RandomResizedCrop + flip (train), Resize(256) + CenterCrop (val)."""
    norm = transforms.Normalize(data.SWAV_MEAN, data.SWAV_STD)
    big = int(round(size * 256 / 224))
    return (transforms.Compose([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(),
                                transforms.ToTensor(), norm]),
            transforms.Compose([transforms.Resize(big), transforms.CenterCrop(size), transforms.ToTensor(), norm]))


def train_transform(size: int) -> transforms.Compose:
    big = int(round(size * 256 / 224))
    return transforms.Compose([
        transforms.Resize(big), transforms.CenterCrop(big), transforms.RandomCrop(size),
        transforms.RandomHorizontalFlip(), transforms.ToTensor(),
        transforms.Normalize(data.IMAGENET_MEAN, data.IMAGENET_STD)])


def val_transform(size: int, tencrops: bool) -> transforms.Compose:
    big = int(round(size * 256 / 224))
    norm = transforms.Normalize(data.IMAGENET_MEAN, data.IMAGENET_STD)
    if tencrops:
        return transforms.Compose([
            transforms.Resize(big), transforms.TenCrop(size),
            transforms.Lambda(lambda crops: torch.stack([norm(transforms.functional.to_tensor(c))
                                                         for c in crops]))])  # (10, 3, S, S)
    return transforms.Compose([transforms.Resize(big), transforms.CenterCrop(size), transforms.ToTensor(), norm])


def load_splits(root: str, args: argparse.Namespace) -> tuple[LabeledImages, LabeledImages, list[str]]:
    root_p = require_dir(root, "--data")
    for split in ("train", "val"):
        if not (root_p / split).is_dir():
            raise EvalError(f"--data {root!r} has no {split}/ folder (expected {split}/<class>/<image>)")
    tr_paths, tr_t, tr_classes = data.scan_image_folder(root_p / "train")
    va_paths, va_t, va_classes = data.scan_image_folder(root_p / "val")
    if tr_t is None or va_t is None:
        raise EvalError(f"{root}/train and {root}/val must hold one folder per class")
    if tr_classes != va_classes:
        extra = sorted(set(va_classes) ^ set(tr_classes))
        raise EvalError(f"train/ and val/ of {root!r} have different class folders (e.g. {extra[:3]})")
    if getattr(args, "protocol", "deepcluster") == "swav" and not args.tencrops:
        tr_tf, va_tf = swav_transforms(args.size)
    else:
        tr_tf, va_tf = train_transform(args.size), val_transform(args.size, args.tencrops)
    train = LabeledImages(tr_paths, tr_t, tr_tf)
    val = LabeledImages(va_paths, va_t, va_tf)
    return train, val, tr_classes


# ---------------------------------------------------------------------------------------
# train / validate
# ---------------------------------------------------------------------------------------
def accuracy(logits: torch.Tensor, target: torch.Tensor, topk: tuple[int, ...]) -> list[float]:
    """Percentage of rows whose target is among the top-k scores, for each k."""
    maxk = min(max(topk), logits.shape[1])
    pred = logits.topk(maxk, dim=1).indices            # (B, maxk)
    hit = pred.eq(target[:, None])                       # (B, maxk)
    return [hit[:, :min(k, maxk)].any(1).float().mean().item() * 100 for k in topk]


def train_epoch(loader: DataLoader, body: models.Trunk, reglog: RegLog, crit: nn.Module,
                opt: torch.optim.Optimizer, epoch: int, device: torch.device, args: argparse.Namespace) -> dict:
    reglog.train()
    losses, top1 = util.AverageMeter(), util.AverageMeter()
    bar = tqdm(loader, desc=f"train {epoch}", leave=False, disable=cli.progress(args.no_progress))
    for i, (imgs, target) in enumerate(bar):
        if getattr(args, "protocol", "deepcluster") != "swav":  # swav: set per epoch in main
            util.learning_rate_decay(opt, len(loader) * epoch + i, args.lr)  # per-iteration decay
        imgs, target = imgs.to(device, non_blocking=True), target.to(device, non_blocking=True)
        logits = reglog(body(imgs))                  # (B, classes)
        loss = crit(logits, target)
        if not torch.isfinite(loss):
            raise EvalError(f"training loss is {loss.item()} at epoch {epoch}: diverged (try a lower --lr)")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.update(loss.item(), imgs.shape[0])
        top1.update(accuracy(logits.detach(), target, (1,))[0], imgs.shape[0])
        bar.set_postfix(loss=f"{losses.avg:.3f}")
    return {"train_loss": losses.avg, "train_top1": top1.avg, "lr": opt.param_groups[0]["lr"]}


@torch.no_grad()
def validate(loader: DataLoader, body: models.Trunk, reglog: RegLog, crit: nn.Module, device: torch.device,
             args: argparse.Namespace) -> dict:
    """Top-1/top-5 (percent) and loss; with ten crops the softmax is averaged over crops."""
    reglog.eval()
    losses, top1, top5 = util.AverageMeter(), util.AverageMeter(), util.AverageMeter()
    for imgs, target in tqdm(loader, desc="val", leave=False, disable=cli.progress(args.no_progress)):
        imgs, target = imgs.to(device, non_blocking=True), target.to(device, non_blocking=True)
        if imgs.dim() == 5:                          # (B, 10, 3, S, S)
            b, n = imgs.shape[:2]
            probs = torch.softmax(reglog(body(imgs.flatten(0, 1))), 1).view(b, n, -1).mean(1)  # (B, classes)
            loss = nn.functional.nll_loss(torch.log(probs.clamp_min(1e-12)), target)
        else:
            logits = reglog(body(imgs))
            probs, loss = torch.softmax(logits, 1), crit(logits, target)
        a1, a5 = accuracy(probs, target, (1, 5))
        losses.update(loss.item(), imgs.shape[0])
        top1.update(a1, imgs.shape[0])
        top5.update(a5, imgs.shape[0])
    top5_avg = top5.avg if reglog.linear.out_features > 5 else None  # 5 classes or fewer: always 100, none
    return {"val_loss": losses.avg, "top1": top1.avg, "top5": top5_avg}


def checkpoint_state(model: models.DeepClusterNet, conv: int, reglog: RegLog, opt: torch.optim.Optimizer,
                     epoch: int, best: float, history: list, args: argparse.Namespace, classes: list[str],
                     fingerprint: dict) -> dict:
    """Linear classifier + optimizer + the frozen model's file (``fingerprint``: path, size,
    SHA-256), not its weights again: with that file, enough to evaluate or resume
    (weights_only-loadable)."""
    return {
        "epoch": epoch,  # next epoch to run
        "arch": model.arch,
        "model": fingerprint,
        "model_config": {**model.config(), "k": 0},
        "conv": conv,
        "reglog": reglog.state_dict(),
        "reglog_pool": repr(reglog.pool),
        "optimizer": opt.state_dict(),
        "best_prec1": best,
        "history": json.dumps(history),
        "classes": classes,
        "args": {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, type(None)))},
        "rng": checkpoint.get_rng_state(),
    }


def read_resume(path: str, conv: int, fingerprint: dict) -> dict:
    """The ``--resume`` checkpoint, checked (before EXP is made): an eval_linear one, from the same
    frozen model file (``fingerprint``) and the same ``--conv``."""
    try:
        ckpt = checkpoint.torch_load(path)
    except checkpoint.CheckpointError as e:
        raise EvalError(f"--resume: {e}") from None
    if "reglog" not in ckpt:
        raise EvalError(f"--resume {path!r} is not an eval_linear checkpoint (no 'reglog')")
    check_same_model(ckpt.get("model"), fingerprint, path)
    if ckpt.get("conv") != conv:
        raise EvalError(f"--resume {path!r} was trained on conv{ckpt.get('conv')}, not conv{conv}")
    return ckpt


def resume(path: str, ckpt: dict, reglog: RegLog, opt: torch.optim.Optimizer) -> tuple[int, float, list]:
    """Restore the classifier, its optimizer and the RNG from ``ckpt`` (:func:`read_resume`);
    returns (next epoch, best top-1, history)."""
    run = {"epoch": 0, "best_prec1": -1.0, "history": "[]"}
    try:
        checkpoint.restart_from_checkpoint(path, run_variables=run, loaded=ckpt, reglog=reglog, optimizer=opt)
    except checkpoint.CheckpointError as e:
        raise EvalError(f"--resume {path!r} does not fit this model/data: {e}") from None
    if "rng" in ckpt:
        checkpoint.set_rng_state(ckpt["rng"])
    log.info("=> resumed from %s (epoch %d, best top-1 %.2f)", path, run["epoch"], run["best_prec1"])
    return int(run["epoch"]), float(run["best_prec1"]), json.loads(run["history"])


def check_args(args: argparse.Namespace) -> None:
    for flag, ok, why in (("--epochs", args.epochs >= 0, "must be >= 0"),
                          ("--batch_size", args.batch_size >= 1, "must be >= 1"),
                          ("--lr", args.lr > 0, "must be > 0"), ("--workers", args.workers >= 0, "must be >= 0"),
                          ("--size", args.size >= 32, "must be >= 32: smaller inputs vanish before the "
                                                      "last conv layers"),
                          ("--momentum", 0 <= args.momentum < 1, "must be in [0, 1)"),
                          ("--weight_decay", math.isfinite(args.weight_decay) and args.weight_decay < 0,
                           "is an exponent (weight decay = 10**wd) and must be < 0: --wd -4 is a decay of 1e-4"),
                          ("--seed", 0 <= args.seed < 2**32, "must be in [0, 2**32)")):
        if not ok:
            raise EvalError(f"invalid value for {flag}: {getattr(args, flag[2:])!r} ({why})")


def prepare(args: argparse.Namespace) -> SimpleNamespace:
    """Everything checked before EXP is made (a refused run leaves nothing): device, the frozen
    model and its layer, the data, the --resume checkpoint, TensorBoard's package."""
    device = distributed.select_device(args.device)
    model = checkpoint.load_model(args.model, purpose="eval_linear")
    if args.conv is None:
        raise EvalError(f"--conv is required ({model.arch}: 1..{len(model.probe_points())})")
    try:
        conv = model.probe_index(args.conv)  # a name becomes its 1-based position
    except models.ProbeError as e:
        raise EvalError(f"--conv {e}") from None
    body = model.trunk(conv).freeze()
    train_set, val_set, classes = load_splits(args.data, args)
    fingerprint = model_fingerprint(args.model)
    resume_from = eval_common.resume_checkpoint(args.resume)
    resumed = read_resume(resume_from, conv, fingerprint) if resume_from else None
    tb.Board(Path(args.exp) / "tensorboard" if args.tensorboard else None)  # no package: stops here
    return SimpleNamespace(device=device, model=model, conv=conv, body=body, train_set=train_set, val_set=val_set,
                           classes=classes, fingerprint=fingerprint, resume_from=resume_from, resumed=resumed)


def main(args: argparse.Namespace) -> dict:
    """Train the linear classifier in the run folder EXP (:class:`engine.Run`: locked, refused
    when used unless --resume / --overwrite); returns results.json's content."""
    check_args(args)
    cli.check_writable(args.exp)
    exp = Path(args.exp)
    eval_common.refuse_taken(exp, args.resume, args.overwrite, OUTPUTS)  # before any work
    eval_common.setup_run_logging(exp, args.verbose)
    if getattr(args, "resume_note", None):
        log.info("--resume: %s", args.resume_note)
    distributed.seed_everything(args.seed)
    s = prepare(args)
    flags = {k: v for k, v in vars(args).items() if k != "resume_note"}
    run = engine.Run(exp, distributed.Runtime(device=s.device), "eval_linear", flags, resume=args.resume,
                     overwrite=args.overwrite, outputs=OUTPUTS, verbose=args.verbose, tensorboard=args.tensorboard,
                     no_progress=args.no_progress, setup_log=False)
    run.claim()
    try:
        result = train_probe(run, s, args)
        run.finish()
        return result
    finally:
        run.close()


def train_probe(run: engine.Run, s: SimpleNamespace, args: argparse.Namespace) -> dict:
    """The epochs (from the --resume checkpoint's), a checkpoint after each; results.json."""
    exp, device = run.exp, s.device
    data.check_eval_images(s.train_set.paths + s.val_set.paths, "--data", workers=args.workers,
                           progress=not args.no_progress, listing=exp / "bad_images.txt",
                           hint="fix or remove them (a linear probe is scored on every image)")
    reglog = build_reglog(s.body, s.model.arch, s.conv, len(s.classes), args.size).to(device)
    body = s.body.to(device)
    log.info("%s%s %s -> %s -> %d dims -> %d classes | %d train, %d val images | %s",
             s.model.arch, " + Sobel" if s.model.sobel is not None else "", body.name, reglog.pool,
             reglog.linear.in_features, len(s.classes), len(s.train_set), len(s.val_set), device)
    swav = args.protocol == "swav"
    if swav:  # swav's RegLog: weight N(0, 0.01), bias 0
        nn.init.normal_(reglog.linear.weight, 0.0, 0.01)
        nn.init.zeros_(reglog.linear.bias)
    opt = torch.optim.SGD(reglog.parameters(), lr=args.lr, momentum=args.momentum,
                          weight_decay=10 ** args.weight_decay, nesterov=swav and args.nesterov)
    crit = nn.CrossEntropyLoss()
    start, best, history = resume(s.resume_from, s.resumed, reglog, opt) if s.resumed else (0, -1.0, [])
    run.begin(start)
    run.board.start(start)
    ck = run.checkpoints()
    pin = device.type == "cuda"
    train_loader = DataLoader(s.train_set, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                              pin_memory=pin, worker_init_fn=preempt.loader_worker_init)
    val_bs = max(1, args.batch_size // 10) if args.tencrops else args.batch_size
    val_loader = DataLoader(s.val_set, batch_size=val_bs, shuffle=False, num_workers=args.workers, pin_memory=pin,
                            worker_init_fn=preempt.loader_worker_init)
    record: dict = {}
    for epoch in range(start, args.epochs):
        t0 = time.time()
        if swav:
            for g in opt.param_groups:
                g["lr"] = swav_lr(args, epoch)
        record = {"epoch": epoch, **train_epoch(train_loader, body, reglog, crit, opt, epoch, device, args)}
        record.update(validate(val_loader, body, reglog, crit, device, args))
        record["time"] = time.time() - t0
        is_best = record["top1"] > best
        best = max(best, record["top1"])
        history.append(record)
        run.record(record, epoch)
        state = checkpoint_state(s.model, s.conv, reglog, opt, epoch + 1, best, history, args, s.classes,
                                 s.fingerprint)
        ck.save_epoch(state, epoch + 1)
        if is_best:
            checkpoint.save_checkpoint({**state, "run_id": run.run_id}, exp / "model_best.pth.tar", run.rt)
        log.info("epoch %3d | train loss %.3f | val loss %.3f | top-1 %.2f | top-5 %s | best top-1 %.2f | %.1fs",
                 epoch, record["train_loss"], record["val_loss"], record["top1"],
                 "-" if record["top5"] is None else f"{record['top5']:.2f}", best, record["time"])
    if not history:
        log.info("nothing to train (start epoch %d >= --epochs %d)", start, args.epochs)
    log.info("best top-1: %.2f", best)
    last = {k: record.get(k) for k in ("top1", "top5", "val_loss", "train_loss", "train_top1")}
    result = {"model": s.fingerprint, "arch": s.model.arch, "layer": body.name, "conv": s.conv,
              "protocol": args.protocol, "lr": args.lr, "weight_decay": 10 ** args.weight_decay,
              "epochs": args.epochs, "batch_size": args.batch_size, "size": args.size, "tencrops": args.tencrops,
              "data": str(Path(args.data).absolute()), **last, "best_top1": best, "dim": reglog.linear.in_features,
              "history": history}
    return eval_common.write_results(exp / "results.json", result)


def run(argv: list[str] | None = None) -> int:
    return cli.run_cli(main, parse_args, argv, on_interrupt=lambda args: engine.interrupted_hint(args.exp))


if __name__ == "__main__":
    sys.exit(run())
