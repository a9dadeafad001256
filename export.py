"""Export a DeepCluster run's cluster assignments and fc7 features in the original's formats.

Usage:
    python export.py EXP                               # assignments of every epoch -> EXP/export/
    python export.py EXP --epoch 4 --features          # epoch 4 + fc7 features of EXP/checkpoint.pth.tar
    python export.py EXP --data DIR --out /tmp/out     # images moved since training: name the folder
    python export.py --read alexnet_cluster_assignment.pickle --out out   # a released (Python 2) pickle -> CSV

Writes, per exported epoch E (5 digits):
    assignments_E.csv      path,cluster (one row per image, in the run's image order)
    assignments_E.npy      (N,) int64 cluster id per image (-1: left out, unreadable)
    assignments_E.pickle   [(path, cluster), ...]: the released *_cluster_assignment.pickle format
    clusters               the original's EXP/clusters log: a list (one per epoch) of images_lists
    features.npy           (N, 4096) float32 fc7 before its ReLU (--features; 2048 for ResNet-50),
    features_paths.csv     with the image of each row: the released *_features format, as an array
The image paths are those of the run's DIR (args.json), listed as main.py lists them.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import pickle
import sys
from pathlib import Path

import numpy as np

import checkpoint
import cli
import data
import distributed
import fileio
from errors import ScriptError


class ExportError(ScriptError):
    """Bad input for the export (no run, no such epoch, images that no longer match)."""


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Export the cluster assignments (per epoch) and fc7 features of a "
                                            "DeepCluster run as CSV, .npy and the original's pickles",
                                formatter_class=cli.HelpFormatter)
    p.add_argument("exp", metavar="EXP", nargs="?", default=None, help="experiment folder of main.py (required "
                   "unless --read)")
    g = p.add_argument_group("what")
    g.add_argument("--epoch", type=str, default="all", help="epoch to export (a number, 'last' or 'all')")
    g.add_argument("--features", action="store_true", help="also compute the fc7 features of every image")
    g.add_argument("--model", type=str, default=None, help="checkpoint for --features (default: EXP/checkpoint.pth.tar)")
    g.add_argument("--read", type=str, default=None, metavar="PICKLE",
                   help="convert a released (Python 2) *_cluster_assignment.pickle to CSV instead")
    g = p.add_argument_group("run")
    g.add_argument("--data", type=str, default=None, help="image folder (default: the run's DIR from EXP/args.json)")
    g.add_argument("--out", type=str, default=None, help="output folder (default: EXP/export)")
    g.add_argument("--batch", type=int, default=64, help="mini-batch of the feature pass")
    g.add_argument("--workers", type=int, default=4, help="number of data loading workers")
    g.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto", help="where to run")
    g.add_argument("--no_progress", action="store_true", help="no progress bars")
    return p


# ---------------------------------------------------------------------------------------
# library part
# ---------------------------------------------------------------------------------------
def load_assignment_pickle(path: str | os.PathLike) -> list[tuple[str, int]]:
    """A released ``*_cluster_assignment.pickle`` (Python 2: byte-string paths) or one of ours.

    Python 2 ``str`` are bytes: read with ``encoding="latin1"`` (every byte maps to one
    character), then turned back into the bytes and decoded as UTF-8 (file names on Linux),
    undecodable bytes kept as surrogate escapes, as ``os.fsdecode`` does.
    """
    with open(path, "rb") as f:
        try:
            obj = pickle.load(f, encoding="latin1")
        except Exception as e:  # truncated, not a pickle
            raise ExportError(f"{str(path)!r} is not a cluster-assignment pickle ({type(e).__name__}: {e})") from None
    if not isinstance(obj, list) or not all(isinstance(t, tuple) and len(t) == 2 for t in obj[:100]):
        raise ExportError(f"{str(path)!r} is not a list of (image path, cluster index) tuples")

    def fix(p):
        if isinstance(p, bytes):
            return os.fsdecode(p)
        return p.encode("latin1").decode("utf-8", "surrogateescape") if not p.isascii() else p

    return [(fix(p), int(c)) for p, c in obj]


def write_csv(path: Path, rows) -> None:
    def write(f):
        text = io.TextIOWrapper(f, encoding="utf-8", errors="surrogateescape", newline="")
        w = csv.writer(text)
        w.writerow(["path", "cluster"])
        w.writerows(rows)
        text.flush()
        text.detach()
    fileio.atomic_write(path, write)


def run_images(exp: Path, data_dir: str | None, n_assigned: int) -> tuple[list[str], dict]:
    """The run's image paths, in its order, and its recorded flags (args.json).

    Images refused by the check before training (``--bad_images skip``, listed in
    EXP/bad_images.txt) were dropped from the run; images found unreadable during it were
    kept (cluster -1). The listing mixes both, so it is applied only when the count says so.
    """
    args_file = exp / "args.json"
    run_args = json.loads(args_file.read_text()) if args_file.exists() else {}
    root = data_dir or run_args.get("data")
    if not root:
        raise ExportError(f"{exp} has no args.json naming its images: pass --data DIR")
    paths, _, _ = data.scan_image_folder(root)
    bad = exp / "bad_images.txt"
    if len(paths) != n_assigned and bad.exists():
        refused = {line.split("\t", 1)[0] for line in bad.read_text().splitlines() if line.strip()}
        paths = [p for p in paths if p not in refused]
    if len(paths) != n_assigned:
        raise ExportError(f"the assignments of {exp} cover {n_assigned} images but {root} lists {len(paths)}: "
                          f"pass --data with the folder the run was trained on")
    return paths, run_args


def export_assignments(exp: Path, out: Path, epochs: list[int], paths: list[str]) -> list[str]:
    """CSV, .npy and release-format pickle per epoch, plus the original's ``clusters`` log."""
    clog = checkpoint.ClusterLog(exp / "clusters")
    written = []
    for e in epochs:
        labels = clog.load(e)  # (N,)
        stem = out / f"assignments_{e:05d}"
        fileio.atomic_np_save(stem.with_suffix(".npy"), labels)
        write_csv(stem.with_suffix(".csv"), [(p, int(c)) for p, c in zip(paths, labels)])
        checkpoint.export_clusters_pickle(exp, stem.with_suffix(".pickle"), epoch=e, image_paths=paths)
        written += [str(stem) + s for s in (".csv", ".npy", ".pickle")]
    written.append(checkpoint.export_clusters_pickle(exp, out / "clusters"))
    return written


def export_features(model, paths: list[str], size: int | None, out: Path, args) -> list[str]:
    """(N, D) fc7 (before its ReLU) of every image, centre crop at the model's input size."""
    import knn
    device = distributed.select_device(args.device)
    model = model.to(device)
    size = size or model.input_size
    net = knn.FeatureNet(model, "fc7", size)
    feats = knn.extract(net, knn.image_batches(paths, size, args.batch, args.workers, "features",
                                               args.no_progress, device), device).numpy()  # (N, D)
    fileio.atomic_np_save(out / "features.npy", feats.astype(np.float32))
    write_csv(out / "features_paths.csv", [(p, i) for i, p in enumerate(paths)])
    return [str(out / "features.npy"), str(out / "features_paths.csv")]


def pick_epochs(available: list[int], which: str) -> list[int]:
    if which == "all":
        return available
    e = available[-1] if which == "last" else None
    if e is None:
        try:
            e = int(which)
        except ValueError:
            raise ExportError(f"--epoch {which!r}: expected a number, 'last' or 'all'") from None
    if e not in available:
        raise ExportError(f"--epoch {e}: not in the run (epochs {available[0]}..{available[-1]})")
    return [e]


def main(args: argparse.Namespace) -> list[str]:
    """Export; returns the paths written."""
    if args.read:
        pairs = load_assignment_pickle(args.read)
        out = Path(args.out or Path(args.read).with_suffix(""))
        if out.suffix != ".csv":
            out = out / (Path(args.read).stem + ".csv")
        cli.check_writable(out.parent, "--out")
        write_csv(out, pairs)
        print(f"{len(pairs)} (path, cluster) pairs -> {out}")
        return [str(out)]
    for flag, ok in (("--batch", args.batch >= 1), ("--workers", args.workers >= 0)):
        if not ok:
            raise ExportError(f"invalid value for {flag}: {getattr(args, flag[2:])!r}")
    if args.exp is None:
        raise ExportError("EXP is required (an experiment folder of main.py), or --read PICKLE")
    exp = Path(args.exp)
    clog_dir = exp / "clusters"
    if not exp.is_dir():
        raise ExportError(f"experiment folder {str(exp)!r} does not exist")
    available = checkpoint.ClusterLog(clog_dir).epochs() if clog_dir.is_dir() else []
    if not available:
        raise ExportError(f"{exp} holds no cluster assignments (no {clog_dir}/epoch_*.npy): nothing to export")
    epochs = pick_epochs(available, args.epoch)
    n_assigned = len(checkpoint.ClusterLog(clog_dir).load(epochs[-1]))
    paths, run_args = run_images(exp, args.data, n_assigned)
    out = Path(args.out) if args.out else exp / "export"
    cli.check_writable(out, "--out" if args.out else "EXP")
    # the model is loaded before anything is written: a bad checkpoint leaves no output folder
    model = checkpoint.load_model(args.model or str(exp / "checkpoint.pth.tar")) if args.features else None
    out.mkdir(parents=True, exist_ok=True)
    written = export_assignments(exp, out, epochs, paths)
    if model is not None:
        written += export_features(model, paths, run_args.get("size"), out, args)
    for w in written:
        print(w)
    return written


def run(argv: list[str] | None = None) -> int:
    return cli.run_cli(main, get_args_parser(), argv)


if __name__ == "__main__":
    sys.exit(run())
