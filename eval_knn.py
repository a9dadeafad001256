"""Weighted k-nearest-neighbour classification on frozen features (a quick feature-quality check).

Usage:
    python eval_knn.py --data /path/to/imagenet --model exp/checkpoint.pth.tar --exp exp_knn
    python eval_knn.py --data DATA --model MODEL --nb_knn 10 20 100 200 --temperature 0.07
    python eval_knn.py --data DATA --model MODEL --layer conv5 --exp exp_knn_conv5
    python eval_knn.py --data data/digits_split --model exp_demo/checkpoint.pth.tar --workers 0

--data DIR holds DIR/train/<class>/* and DIR/val/<class>/* (every class of val/ must be in
train/). Each image is resized and centre-cropped (Resize(256) -> CenterCrop(224), scaled
for other --size), its feature computed by the frozen network -- fc7 before its ReLU (what
DeepCluster clusters) or a conv layer average-pooled as by eval_linear.py -- and
L2-normalised. A val image is classified by its k most cosine-similar train images, each
voting for its class with weight exp(similarity / T) (Wu et al. 2018; DINO's eval_knn).
Several k are scored in one pass. Top-1/top-5 (percent) are printed as a table and written
to EXP/results.json; features are cached under EXP/cache, so a second run only re-scores.

main.py --knn_data DIR uses the same classifier on a fixed subset after every epoch
(:class:`KnnMonitor`).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

import checkpoint
import cli
import data
import distributed
import fileio
import knn
from eval_common import EvalError, check_input_size, log, model_fingerprint, model_key, write_results


# ---------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------
def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Weighted k-nearest-neighbour classification on the frozen features of a DeepCluster "
                    "model. Expects --data DIR holding DIR/train/<class>/* and DIR/val/<class>/*.",
        formatter_class=cli.HelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data", type=str, required=True, help="dataset with train/ and val/ class folders")
    g.add_argument("--size", type=int, default=0,
                   help="crop size (the 256 resize is scaled by size/224); 0: the model's input size "
                        "(224 for the released models)")
    g.add_argument("--workers", type=int, default=4, help="number of data loading workers")
    g.add_argument("--batch_size", type=int, default=256, help="images per forward pass")
    g.add_argument("--bad_images", choices=["error", "skip"], default="error",
                   help="unreadable images (all checked first, listed in EXP/bad_images.txt): stop, or score "
                        "without them")

    g = p.add_argument_group("model")
    g.add_argument("--model", type=str, required=True, help="path to model (our or the released checkpoints)")
    g.add_argument("--layer", type=str, default="fc7",
                   help="fc7 (before its ReLU, as clustered) or convN (pooled as by eval_linear.py)")

    g = p.add_argument_group("classifier")
    g.add_argument("--nb_knn", type=int, nargs="+", default=[knn.DEFAULT_K],
                   help="number(s) of nearest train images, several scored in one pass (e.g. 10 20 100 200)")
    g.add_argument("--temperature", "--T", dest="temperature", type=float, default=knn.DEFAULT_T,
                   help="votes are weighted by exp(similarity / T)")
    g.add_argument("--chunk", type=int, default=256, help="val images per block of similarities")
    g.add_argument("--whiten", type=int, default=0, metavar="DIM",
                   help="PCA-whiten the features to DIM dims (fitted on train/, as the clustering does "
                        "before k-means) before the kNN; 0: raw features")

    g = p.add_argument_group("run")
    g.add_argument("--exp", type=str, default="exp_knn", help="exp folder (feature cache, results.json)")
    g.add_argument("--no_cache", action="store_true", help="recompute features even when cached")
    g.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto", help="where to run")
    g.add_argument("--no_progress", action="store_true", help="no progress bars")
    g.add_argument("--verbose", action="store_true", help="chatty")
    return p


def check_args(args: argparse.Namespace) -> None:
    for flag, ok in (("--nb_knn", min(args.nb_knn) >= 1),
                     ("--temperature", args.temperature > 0 and math.isfinite(args.temperature)),
                     ("--chunk", args.chunk >= 1), ("--whiten", args.whiten >= 0), ("--batch_size", args.batch_size >= 1),
                     ("--workers", args.workers >= 0), ("--size", args.size == 0 or args.size >= 32)):
        if not ok:
            raise EvalError(f"invalid value for {flag}: {getattr(args, flag[2:])!r}")


def cached_features(split: str, paths: list[str], net: knn.FeatureNet, device: torch.device,
                    args: argparse.Namespace) -> np.ndarray:
    """(N, D) float32 features of ``paths``, from EXP/cache when this model, layer, size and
    image list were seen before."""
    content = hashlib.sha1(json.dumps(paths).encode()).hexdigest()[:10]
    f = Path(args.exp) / "cache" / f"{split}_{args.layer}_{model_key(args.model)}_S{args.size}_{content}.npy"
    if f.is_file() and not args.no_cache:
        log.info("using cached features %s", f)
        return np.load(f)
    feats = knn.extract(net, knn.image_batches(paths, args.size, args.batch_size, args.workers, f"{split} features",
                                       args.no_progress, device), device).numpy()
    f.parent.mkdir(parents=True, exist_ok=True)
    fileio.atomic_np_save(f, feats)  # a crash never leaves a half-written cache
    return feats


def drop_unreadable(splits: knn.KnnSplits, args: argparse.Namespace) -> knn.KnnSplits:
    """Every image checked before any feature: the unreadable ones are all named (and listed in
    EXP/bad_images.txt), then refused, or left out of both splits with --bad_images skip."""
    n = len(splits.train_paths)
    bad = data.check_eval_images(splits.train_paths + splits.val_paths, "--data", args.bad_images == "skip",
                                 workers=args.workers, progress=not args.no_progress,
                                 listing=Path(args.exp) / "bad_images.txt",
                                 hint="fix or remove them, or add --bad_images skip to score without them")
    if not bad:
        return splits
    tr = [i for i in range(n) if i not in bad]
    va = [i for i in range(len(splits.val_paths)) if i + n not in bad]
    if not tr or not va:
        raise EvalError(f"--data {args.data!r} has no readable {'train' if not tr else 'val'} image left")
    return knn.KnnSplits([splits.train_paths[i] for i in tr], splits.train_labels[tr],
                         [splits.val_paths[i] for i in va], splits.val_labels[va], splits.classes)


def format_table(acc: dict[int, dict[str, float]]) -> str:
    lines = ["    k |  top-1 |  top-5", "------+--------+-------"]
    lines += [f"{k:5d} | {a['top1']:6.2f} | " + ("     -" if a["top5"] is None else f"{a['top5']:6.2f}")
              for k, a in sorted(acc.items())]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> dict:
    """Features (or the cache) -> weighted kNN for every k -> table and EXP/results.json."""
    check_args(args)
    cli.check_writable(args.exp)
    # model, size and folders checked before EXP is made: a refused run leaves no folder behind
    model = checkpoint.load_model(args.model, purpose="eval_knn")
    args.size = args.size or model.input_size
    if args.layer == "fc7":  # fc6 fixes the input size; pooled conv layers take any
        check_input_size(model, args.size, args.model)
    splits = knn.load_knn_splits(args.data)
    exp = Path(args.exp)
    cli.setup_logging(log, exp, "eval_knn.log", args.verbose)
    splits = drop_unreadable(splits, args)
    ks = knn.clamp_ks(args.nb_knn, len(splits.train_paths), "--nb_knn")
    device = distributed.select_device(args.device)
    model = model.to(device)
    net = knn.FeatureNet(model, args.layer, args.size)
    log.info("%s%s %s | %d classes, %d train, %d val images | k %s, T %g | %s", model.arch,
             " + Sobel" if model.sobel is not None else "", args.layer, len(splits.classes),
             len(splits.train_paths), len(splits.val_paths), ks, args.temperature, device)
    train = cached_features("train", splits.train_paths, net, device, args)
    val = cached_features("val", splits.val_paths, net, device, args)
    t0 = time.time()
    train_t, val_t = torch.from_numpy(train).to(device), torch.from_numpy(val).to(device)
    if args.whiten:
        train_t, val_t = knn.pca_whiten(train_t, val_t, args.whiten)
    ranks = knn.knn_classify(train_t, torch.from_numpy(splits.train_labels), val_t, ks, args.temperature,
                         chunk=args.chunk, num_classes=len(splits.classes))
    acc = knn.knn_accuracy(ranks, torch.from_numpy(splits.val_labels), len(splits.classes))
    log.info("weighted kNN on %s (%d dims%s), %.1fs:\n%s", args.layer, train.shape[1],
             f", PCA-whitened to {train_t.shape[1]}" if args.whiten else "", time.time() - t0, format_table(acc))
    out = {"model": str(args.model), "model_file": model_fingerprint(args.model), "data": str(args.data), "layer": args.layer, "dim": int(train.shape[1]),
           "whiten": int(train_t.shape[1]) if args.whiten else 0,
           "temperature": args.temperature, "n_train": len(splits.train_paths), "n_val": len(splits.val_paths),
           "n_classes": len(splits.classes), "results": {str(k): v for k, v in acc.items()}}
    return write_results(exp / "results.json", out)  # strict JSON: an undefined number is null


def run(argv: list[str] | None = None) -> int:
    return cli.run_cli(main, get_args_parser(), argv)


if __name__ == "__main__":
    sys.exit(run())
