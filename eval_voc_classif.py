"""PASCAL VOC 2007 multi-label classification transfer (Caron et al. 2018, Table 3).

Usage:
    python eval_voc_classif.py --vocdir /data/VOCdevkit/VOC2007 --model MODEL --split trainval --fc6_8 1
    python eval_voc_classif.py --vocdir VOC2007 --model MODEL --split trainval --fc6_8 0      # all layers
    python eval_voc_classif.py --vocdir VOC2007 --model MODEL --split train --nit 200 --size 64 --workers 0
    python eval_voc_classif.py --vocdir VOC2007 --model MODEL --fc6_8 0 --exp exp_voc --resume exp_voc   # continue

``--split train`` trains on train and tests on val; ``trainval`` trains on trainval and tests
on test (the paper's numbers). The top layer becomes a new Linear(4096, 20) with bias 0.1 and
fc6/fc7 are re-initialised (weights N(0, 0.01), biases 0.1); with ``--fc6_8 1`` the conv layers
are frozen (``--train_batchnorm 1`` still trains the BN scales, which the paper's erratum says
its 72.0 mAP did; frozen: 70.4). Whatever the flags, every BatchNorm stays in eval mode while
training (running statistics, never updated). Training: masked BCE-with-logits (difficult
labels ignored), SGD, lr halved every ``--stepsize`` iterations, batch 16, the images in one
seeded order every pass. Test: 10 random crops (or TenCrop) with summed logits; per-class AP
ignoring difficult images (positives' scores lowered by 1e-5 first), and their mean.
EXP/checkpoint.pth.tar (the trained network, optimizer, schedule, RNG and the --model file's
SHA-256) is rewritten every ``--checkpoints`` iterations and after the last one; ``--resume EXP``
continues from it (the same data order, from the next batch).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
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
from eval_common import EvalError, LabeledImages, average_precision, average_precision_voc07, check_input_size, \
    check_same_model, log, model_fingerprint, require_dir

VOC_CLASSES = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
               "train", "tvmonitor"]
TEST_SPLIT = {"train": "val", "trainval": "test"}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="PASCAL VOC 2007 classification (20 classes, multi-label) on top of a DeepCluster "
                    "model. Expects --vocdir pointing at the devkit's VOC2007 folder: "
                    "VOC2007/JPEGImages/<id>.jpg and VOC2007/ImageSets/Main/<class>_<split>.txt "
                    "(lines '<id> <label>', label 1 positive, -1 negative, 0 difficult); "
                    "the VOCdevkit folder above it is accepted too.",
        formatter_class=cli.HelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--vocdir", type=str, required=True, help="VOC2007 folder (or the VOCdevkit above it)")
    g.add_argument("--split", type=str, choices=["train", "trainval"], default="train",
                   help="training split: train is tested on val, trainval on test")
    g.add_argument("--size", type=int, default=224, help="crop size (224 = the paper)")
    g.add_argument("--workers", type=int, default=4, help="number of data loading workers")

    g = p.add_argument_group("model")
    g.add_argument("--model", type=str, required=True, help="path to model")
    g.add_argument("--fc6_8", type=int, choices=[0, 1], default=1,
                   help="1: freeze the conv layers, train fc6-8; 0: fine-tune all layers")
    g.add_argument("--train_batchnorm", type=int, choices=[0, 1], default=0,
                   help="with --fc6_8 1, still train the BN scale/shift of the conv layers")

    g = p.add_argument_group("optimisation")
    g.add_argument("--nit", type=int, default=80000, help="number of training iterations")
    g.add_argument("--batch_size", type=int, default=16, help="mini-batch size")
    g.add_argument("--lr", type=float, default=0.003, help="learning rate")
    g.add_argument("--momentum", type=float, default=0.9, help="momentum")
    g.add_argument("--wd", type=float, default=1e-6, help="weight decay (absolute value)")
    g.add_argument("--stepsize", type=int, default=5000, help="lr is halved every stepsize iterations")
    g.add_argument("--min_scale", type=float, default=0.1, help="RandomResizedCrop minimum scale")
    g.add_argument("--max_scale", type=float, default=0.5, help="RandomResizedCrop maximum scale")
    g.add_argument("--seed", type=int, default=31, help="random seed")

    g = p.add_argument_group("evaluation")
    g.add_argument("--eval_random_crops", type=int, choices=[0, 1], default=1,
                   help="1: 10 random crops per test image; 0: TenCrop (4 corners + centre, flipped)")
    g.add_argument("--ap", choices=["standard", "voc07"], default="standard",
                   help="AP definition: area under the PR curve, or the devkit's 11-point interpolation")

    g = p.add_argument_group("run")
    g.add_argument("--exp", type=str, default="exp_voc", help="exp folder (log, checkpoint, results.json)")
    g.add_argument("--checkpoints", type=int, default=5000,
                   help="iterations between two saves of EXP/checkpoint.pth.tar (0: only after the last)")
    g.add_argument("--resume", type=str, default="", metavar="PATH",
                   help="checkpoint to continue from, or the --exp folder of the run (its checkpoint.pth.tar): "
                        "continues in that folder, every flag not given (--vocdir, --model too) as that run's")
    g.add_argument("--overwrite", action="store_true",
                   help="start anew in an --exp that holds a run (deletes every output of that run first)")
    g.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto", help="where to run")
    g.add_argument("--no_progress", action="store_true", help="no progress bars")
    g.add_argument("--verbose", action="store_true", help="chatty")
    return p


# ---------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------
def find_voc2007(vocdir: str) -> Path:
    root = require_dir(vocdir, "--vocdir")
    for cand in (root, root / "VOC2007", root / "VOCdevkit" / "VOC2007"):
        if (cand / "ImageSets" / "Main").is_dir() and (cand / "JPEGImages").is_dir():
            return cand
    raise EvalError(f"--vocdir {vocdir!r} is not a VOC2007 folder: expected JPEGImages/ and ImageSets/Main/")


def read_split(voc: Path, split: str) -> tuple[list[str], np.ndarray]:
    """Image ids and their (N, 20) labels in {1, 0 (difficult), -1} from ImageSets/Main."""
    main = voc / "ImageSets" / "Main"
    ids: list[str] | None = None
    cols = []
    for cls in VOC_CLASSES:
        f = main / f"{cls}_{split}.txt"
        if not f.is_file():
            raise EvalError(f"missing split file {str(f)!r} (the {split} split of class {cls})")
        rows = [ln.split() for ln in f.read_text().splitlines() if ln.strip()]
        try:
            these, lab = [r[0] for r in rows], [int(r[1]) for r in rows]
        except (IndexError, ValueError):
            raise EvalError(f"{str(f)!r} is malformed: expected lines '<image id> <1|0|-1>'") from None
        if any(v not in (-1, 0, 1) for v in lab):
            raise EvalError(f"{str(f)!r} holds labels other than -1, 0, 1")
        if ids is None:
            ids = these
        elif these != ids:
            raise EvalError(f"{str(f)!r} lists other images than {VOC_CLASSES[0]}_{split}.txt")
        cols.append(lab)
    assert ids is not None
    if not ids:
        raise EvalError(f"the {split} split of {str(voc)!r} is empty")
    labels = np.asarray(cols, dtype=np.int64).T  # (N, 20)
    missing = [i for i in ids if not (voc / "JPEGImages" / f"{i}.jpg").is_file()]
    if missing:
        raise EvalError(f"{len(missing)} image(s) of the {split} split are missing from JPEGImages/ "
                        f"(e.g. {missing[0]}.jpg)")
    return ids, labels


def voc_dataset(voc: Path, split: str, transform) -> LabeledImages:
    ids, labels = read_split(voc, split)
    paths = [str(voc / "JPEGImages" / f"{i}.jpg") for i in ids]
    return LabeledImages(paths, [torch.from_numpy(r) for r in labels], transform)


def train_transform(args: argparse.Namespace) -> transforms.Compose:
    return transforms.Compose([
        transforms.RandomHorizontalFlip(),
        transforms.RandomResizedCrop(args.size, scale=(args.min_scale, args.max_scale), ratio=(1, 1)),
        transforms.ToTensor(),
        transforms.Normalize(data.IMAGENET_MEAN, data.IMAGENET_STD)])


def test_transform(args: argparse.Namespace) -> transforms.Compose:
    """Ten views per image, stacked (10, 3, S, S): random crops as in training, or TenCrop."""
    norm = transforms.Normalize(data.IMAGENET_MEAN, data.IMAGENET_STD)
    if args.eval_random_crops:
        one = train_transform(args)
        return transforms.Lambda(lambda img: torch.stack([one(img) for _ in range(10)]))
    return transforms.Compose([
        transforms.Resize(int(round(args.size * 256 / 224))), transforms.TenCrop(args.size),
        transforms.Lambda(lambda crops: torch.stack([norm(transforms.functional.to_tensor(c)) for c in crops]))])


# ---------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------
def prepare_model(model: models.DeepClusterNet, args: argparse.Namespace) -> list[nn.Parameter]:
    """New 20-way top layer, fc6/fc7 re-initialised, conv layers frozen with --fc6_8 1.

    As the original: fc6/fc7 weights ~ N(0, 0.01) and biases 0.1; the top layer is a fresh
    ``nn.Linear`` (PyTorch's default weight init, U(-1/sqrt(in), 1/sqrt(in))) with bias 0.1.
    ResNet-50 has no fc6/fc7: its head is avgpool -> Linear(2048, 20), on a frozen body with
    --fc6_8 1.

    Returns the trainable parameters.
    """
    for m in model.classifier.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.constant_(m.bias, 0.1)
    ref = next(model.parameters())  # device and dtype of the loaded weights
    top = nn.Linear(model.feature_dim, len(VOC_CLASSES))  # (4096 or 2048 -> 20)
    nn.init.constant_(top.bias, 0.1)
    model.top_layer = top.to(device=ref.device, dtype=ref.dtype)
    if args.fc6_8:
        for p in model.conv_body.parameters():
            p.requires_grad = False
        if args.train_batchnorm:
            for m in model.conv_body.modules():
                if isinstance(m, nn.BatchNorm2d):
                    for p in m.parameters():
                        p.requires_grad = True
    return [p for p in model.parameters() if p.requires_grad]


def set_train_mode(model: models.DeepClusterNet, args: argparse.Namespace) -> None:
    """Train mode (dropout on), but every conv BatchNorm in eval mode: it normalises with its
    running statistics and never updates them, whatever --fc6_8 / --train_batchnorm say (those
    only decide which parameters learn), as the original's ``model.features.eval()``."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def masked_bce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """BCE-with-logits over non-difficult labels, summed and divided by the batch size.

    logits (B, 20); labels (B, 20) in {1, 0 (ignored), -1}.
    """
    mask = (labels != 0).float()
    target = (labels > 0).float()
    loss = nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return (loss * mask).sum() / logits.shape[0]


def train(model: models.DeepClusterNet, params: list[nn.Parameter], loader: DataLoader, device: torch.device,
          args: argparse.Namespace, resumed: dict | None = None, rest_of_pass=None, save=None) -> list[float]:
    """``--nit`` SGD iterations cycling over the loader; returns the loss per iteration.

    ``resumed``: a checkpoint's optimizer, scheduler, iteration and losses, training then goes on
    with ``rest_of_pass`` (the batches of the interrupted pass after the saved iteration).
    ``save(it, opt, sched, losses)`` runs every ``--checkpoints`` iterations and after the last."""
    opt = torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.wd)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=args.stepsize, gamma=0.5)  # per iteration
    set_train_mode(model, args)
    losses: list[float] = []
    it = 0
    if resumed is not None:
        opt.load_state_dict(resumed["optimizer"])
        sched.load_state_dict(resumed["scheduler"])
        it, losses = int(resumed["iteration"]), [float(x) for x in resumed["losses"]]
    bar = tqdm(total=args.nit, initial=it, desc="train", disable=cli.progress(args.no_progress))
    first = rest_of_pass
    while it < args.nit:
        for imgs, labels in (first if first is not None else loader):
            if it >= args.nit:
                break
            imgs, labels = imgs.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            loss = masked_bce(model(imgs), labels)      # model(imgs): (B, 20)
            if not torch.isfinite(loss):
                raise EvalError(f"training loss is {loss.item()} at iteration {it}: diverged (try a lower --lr)")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(params, 10.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
            it += 1
            bar.update(1)
            if save is not None and (it == args.nit or (args.checkpoints and it % args.checkpoints == 0)):
                save(it, opt, sched, losses)
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}")
            if args.verbose and it % 100 == 0:
                log.debug("iteration %d loss %.4f lr %.2e", it, np.mean(losses[-100:]), opt.param_groups[0]["lr"])
        first = None
    bar.close()
    return losses


@torch.no_grad()
def predict(model: models.DeepClusterNet, loader: DataLoader, device: torch.device,
            args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray]:
    """Scores (N, 20) = logits summed over the 10 views, and labels (N, 20)."""
    model.eval()
    scores, labels = [], []
    for imgs, lab in tqdm(loader, desc="test", leave=False, disable=cli.progress(args.no_progress)):
        b, n = imgs.shape[:2]                                            # (B, 10, 3, S, S)
        logits = model(imgs.flatten(0, 1).to(device, non_blocking=True))  # (B * 10, 20)
        scores.append(logits.view(b, n, -1).sum(1).float().cpu().numpy())
        labels.append(lab.numpy())
    return np.concatenate(scores), np.concatenate(labels)


AP_TIE_SHIFT = 1e-5  # subtracted from the scores of positives before ranking (the original's AP)


def per_class_ap(scores: np.ndarray, labels: np.ndarray, metric: str = "standard") -> np.ndarray:
    """AP of each class (column) of scores (N, C) against labels (N, C) in {1, 0 (ignored), -1}.

    ``standard`` is the original's: the area under the precision-recall curve after lowering
    every positive's score by 1e-5, so a negative tied with a positive ranks before it (a tie
    never counts in the model's favour). ``voc07`` is the devkit's 11-point AP on raw scores.
    """
    if metric == "voc07":
        return np.array([average_precision_voc07(scores[:, c], labels[:, c]) for c in range(labels.shape[1])])
    shifted = np.asarray(scores, dtype=np.float64) - AP_TIE_SHIFT * (np.asarray(labels) > 0)
    return np.array([average_precision(shifted[:, c], labels[:, c]) for c in range(labels.shape[1])])


def format_table(aps: np.ndarray) -> str:
    lines = [f"{'class':<12s} {'AP':>6s}"]
    lines += [f"{c:<12s} {100 * a:6.2f}" if np.isfinite(a) else f"{c:<12s} {'-':>6s}" for c, a in zip(VOC_CLASSES, aps)]
    defined = aps[np.isfinite(aps)]  # a class without positives has no AP ("-")
    lines.append(f"{'mAP':<12s} {100 * defined.mean():6.2f}" if defined.size else f"{'mAP':<12s} {'-':>6s}")
    return "\n".join(lines)


def check_args(args: argparse.Namespace) -> None:
    for flag, ok in (("--nit", args.nit >= 0), ("--batch_size", args.batch_size >= 1), ("--lr", args.lr > 0),
                     ("--stepsize", args.stepsize >= 1), ("--wd", args.wd >= 0), ("--workers", args.workers >= 0),
                     ("--checkpoints", args.checkpoints >= 0),
                     ("--min_scale", 0 < args.min_scale <= args.max_scale <= 1), ("--size", args.size >= 32),
                     ("--seed", 0 <= args.seed < 2**32)):
        if not ok:
            raise EvalError(f"invalid value for {flag}: {getattr(args, flag[2:])!r}")


RESUME_FLAGS = ("split", "fc6_8", "train_batchnorm", "size", "batch_size", "seed", "lr", "stepsize", "momentum", "wd")


def load_resume(path: str, model: models.DeepClusterNet, fingerprint: dict, args: argparse.Namespace) -> dict:
    """A checkpoint of this script for the same --model file and flags; the network's weights are
    restored, the rest (optimizer, schedule, iteration, losses, RNG) is returned for training."""
    try:
        ckpt = checkpoint.torch_load(path)
    except checkpoint.CheckpointError as e:
        raise EvalError(f"--resume: {e}") from None
    if "scheduler" not in ckpt or "iteration" not in ckpt:
        raise EvalError(f"--resume {path!r} is not an eval_voc_classif checkpoint")
    check_same_model(ckpt.get("model"), fingerprint, path)
    for k in RESUME_FLAGS:
        if k in ckpt.get("args", {}) and ckpt["args"][k] != getattr(args, k):
            raise EvalError(f"--resume {path!r} was trained with --{k} {ckpt['args'][k]}, not {getattr(args, k)}")
    if int(ckpt["iteration"]) > args.nit:
        raise EvalError(f"--resume {path!r} is at iteration {ckpt['iteration']}, beyond --nit {args.nit}")
    checkpoint.restart_from_checkpoint(path, loaded=ckpt, state_dict=model)  # the whole trained network
    log.info("=> resumed from %s (iteration %d of %d)", path, ckpt["iteration"], args.nit)
    return ckpt


# flags a --resume never takes from the recorded run: where it writes, how it resumes, how it talks
NOT_INHERITED = ("resume", "exp", "overwrite", "verbose", "no_progress")
OUTPUTS = ("results.json",)  # what a run writes beyond runfolder.OUTPUTS (--overwrite deletes them)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse flags; with ``--resume EXP`` the run's recorded flags (``args.resume_note`` says
    which and what differs)."""
    args, note = eval_common.parse_resumable(get_args_parser, argv, "eval_voc", NOT_INHERITED, ("vocdir", "model"))
    args.resume_note = note
    return args


def prepare(args: argparse.Namespace) -> SimpleNamespace:
    """Everything checked before EXP is made (a refused run leaves nothing): device, data, the
    model with its new head, the --resume checkpoint (its network restored)."""
    device = distributed.select_device(args.device)
    voc = find_voc2007(args.vocdir)
    test_split = TEST_SPLIT[args.split]
    train_set = voc_dataset(voc, args.split, train_transform(args))
    test_set = voc_dataset(voc, test_split, test_transform(args))
    model = checkpoint.load_model(args.model, purpose="eval_voc_classif")
    check_input_size(model, args.size, args.model)
    params = prepare_model(model, args)
    fingerprint = model_fingerprint(args.model)
    resume_from = eval_common.resume_checkpoint(args.resume)
    resumed = load_resume(resume_from, model, fingerprint, args) if resume_from else None
    return SimpleNamespace(device=device, test_split=test_split, train_set=train_set, test_set=test_set,
                           model=model, params=params, fingerprint=fingerprint, resumed=resumed)


def main(args: argparse.Namespace) -> dict:
    """Train on ``--split``, test on the matching split, in the run folder EXP (:class:`engine.Run`:
    locked, refused when used unless --resume / --overwrite); returns results.json's content
    (per-class AP and mAP in percent; null: a class without positives)."""
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
    run = engine.Run(exp, distributed.Runtime(device=s.device), "eval_voc", flags, resume=args.resume,
                     overwrite=args.overwrite, outputs=OUTPUTS, verbose=args.verbose, no_progress=args.no_progress,
                     setup_log=False)
    run.claim()
    try:
        result = fit_and_test(run, s, args)
        run.finish()
        return result
    finally:
        run.close()


def fit_and_test(run: engine.Run, s: SimpleNamespace, args: argparse.Namespace) -> dict:
    """``--nit`` iterations (from the --resume checkpoint's), EXP/checkpoint.pth.tar every
    ``--checkpoints``; the test; results.json."""
    exp, device, model = run.exp, s.device, s.model
    model.to(device)
    log.info("%s%s | %s: %d images, %s: %d images | %s | trainable tensors %d | %s",
             model.arch, " + Sobel" if model.sobel is not None else "", args.split, len(s.train_set),
             s.test_split, len(s.test_set), "fc6-8 only" + (" + BN" if args.train_batchnorm else "")
             if args.fc6_8 else "all layers", len(s.params), device)
    pin = device.type == "cuda"
    # as the original: the images are shuffled once (seeded) and every pass visits them in that
    # same order, the last batch of a pass possibly smaller (BN is in eval mode, so any size works)
    order = np.random.permutation(len(s.train_set)).tolist()
    train_loader = DataLoader(s.train_set, batch_size=args.batch_size, sampler=order, num_workers=args.workers,
                              pin_memory=pin, worker_init_fn=preempt.loader_worker_init)
    rest_of_pass = None
    if s.resumed is not None:  # the interrupted pass goes on from the batch after the saved iteration
        checkpoint.set_rng_state(s.resumed["rng"])
        done = int(s.resumed["iteration"]) % len(train_loader) * args.batch_size
        rest_of_pass = DataLoader(s.train_set, batch_size=args.batch_size, sampler=order[done:],
                                  num_workers=args.workers, pin_memory=pin, worker_init_fn=preempt.loader_worker_init)
    run.begin(0, int(s.resumed["iteration"]) if s.resumed is not None else 0)

    def save(it: int, opt: torch.optim.Optimizer, sched, losses: list[float]) -> None:
        checkpoint.save_checkpoint({
            "iteration": it, "arch": model.arch, "state_dict": model.state_dict(), "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(), "losses": torch.tensor(losses, dtype=torch.float64),
            "rng": checkpoint.get_rng_state(), "model": s.fingerprint, "run_id": run.run_id,
            "args": {k: getattr(args, k) for k in RESUME_FLAGS}}, exp / "checkpoint.pth.tar", run.rt)
    test_loader = DataLoader(s.test_set, batch_size=max(1, args.batch_size // 4), shuffle=False,
                             num_workers=args.workers, pin_memory=pin, worker_init_fn=preempt.loader_worker_init)
    t0 = time.time()
    losses = train(model, s.params, train_loader, device, args, s.resumed, rest_of_pass, save)
    t1 = time.time()
    scores, labels = predict(model, test_loader, device, args)
    aps = per_class_ap(scores, labels, args.ap)
    log.info("%s AP on %s after %d iterations (%.0fs train, %.0fs test):\n%s", args.ap, s.test_split, args.nit,
             t1 - t0, time.time() - t1, format_table(aps))
    return eval_common.write_results(exp / "results.json", results(aps, losses, s, args))


def results(aps: np.ndarray, losses: list[float], s: SimpleNamespace, args: argparse.Namespace) -> dict:
    """results.json: the model file, what was trained and how, per-class AP (None: a class with
    no positive test image, named in a warning) and their mean over the other classes."""
    undefined = [c for c, a in zip(VOC_CLASSES, aps) if not np.isfinite(a)]
    for c in undefined:
        log.warning("class %s has no positive image in the %s split: its AP is undefined, written as null and "
                    "left out of the mAP", c, s.test_split)
    mAP = float(np.nanmean(aps)) * 100 if len(undefined) < len(aps) else None
    return {"model": s.fingerprint, "arch": s.model.arch,
            "layer": ("fc6-8" + (" + conv BN" if args.train_batchnorm else "")) if args.fc6_8 else "all",
            "protocol": f"VOC2007 classification, train {args.split}, test {s.test_split}, {args.ap} AP",
            "lr": args.lr, "iterations": args.nit, "epochs": args.nit * args.batch_size / len(s.train_set),
            "batch_size": args.batch_size, "stepsize": args.stepsize, "wd": args.wd,
            "mAP": mAP, "ap": {c: (float(a) * 100 if np.isfinite(a) else None) for c, a in zip(VOC_CLASSES, aps)},
            "undefined_ap": undefined, "final_loss": float(np.mean(losses[-50:])) if losses else None,
            "split": args.split, "test_split": s.test_split, "fc6_8": args.fc6_8,
            "train_batchnorm": args.train_batchnorm}


def run(argv: list[str] | None = None) -> int:
    return cli.run_cli(main, parse_args, argv, on_interrupt=lambda args: engine.interrupted_hint(args.exp))


if __name__ == "__main__":
    sys.exit(run())
