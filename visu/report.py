"""Training report of a DeepCluster experiment folder (written by main.py), as PNG pictures.

Usage:
    python visu/report.py EXP                      # writes EXP/report/*.png
    python visu/report.py EXP --epoch 10 --n_largest 6 --n_random 6 --per_cluster 10
    python visu/report.py EXP --data /new/path/to/images   # dataset moved since training
    python main.py DIR --exp EXP --report          # the same, at the end of training

Pictures (``EXP/report/``):
  training_curves.png            the curves of the paper's Figure 2 that the log supports:
                                 NMI between consecutive assignments (t-1, t), NMI with the
                                 labels (only when the dataset has class folders), kNN top-1
                                 and top-5 on --knn_data (when trained with it; at the random
                                 network, then after each epoch), clustering loss and training
                                 loss, per epoch
  cluster_sizes_epoch_XXXXX.png  cluster sizes of one epoch, sorted, and their histogram
  clusters_epoch_XXXXX.png       sample images of the largest clusters, then of randomly
                                 chosen clusters, one row per cluster
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from visu import training_report  # noqa: E402
import cli  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Draw the training report of a DeepCluster experiment",
                                formatter_class=cli.HelpFormatter)
    p.add_argument("exp", metavar="EXP", help="experiment folder written by main.py (holds log.jsonl)")

    g = p.add_argument_group("clusters")
    g.add_argument("--epoch", type=int, default=-1,
                   help="epoch whose clusters are drawn (-1: the last one stored)")
    g.add_argument("--n_largest", type=int, default=8, help="number of largest clusters shown")
    g.add_argument("--n_random", type=int, default=8, help="number of randomly chosen clusters shown")
    g.add_argument("--per_cluster", type=int, default=8, help="sample images per cluster")
    g.add_argument("--seed", type=int, default=0, help="seed of the random choices")

    g = p.add_argument_group("data and output")
    g.add_argument("--data", type=str, default="",
                   help="dataset folder (default: the one in EXP/args.json)")
    g.add_argument("--tile", type=int, default=64, help="size of one sample image (px)")
    g.add_argument("--out", type=str, default="", help="output folder (default: EXP/report)")
    g.add_argument("--dpi", type=int, default=100, help="resolution of the figures")
    return p


def main(args: argparse.Namespace) -> list[Path]:
    """Write the report pictures of ``args.exp``; returns their paths."""
    for flag, ok in (("--n_largest", args.n_largest >= 0), ("--n_random", args.n_random >= 0),
                     ("--per_cluster", args.per_cluster >= 1), ("--tile", args.tile >= 8), ("--dpi", args.dpi >= 1),
                     ("--seed", 0 <= args.seed < 2**32)):
        if not ok:  # before anything is written
            raise training_report.ReportError(f"invalid value for {flag}: {getattr(args, flag[2:])!r}")
    if args.out or Path(args.exp).is_dir():  # a missing EXP: training_report says what it expects
        cli.check_writable(args.out or Path(args.exp) / "report", "--out" if args.out else "EXP")
    return training_report.draw(args.exp, epoch=args.epoch, n_largest=args.n_largest, n_random=args.n_random,
                                per_cluster=args.per_cluster, seed=args.seed, data_dir=args.data, tile=args.tile,
                                out=args.out, dpi=args.dpi)


if __name__ == "__main__":
    sys.exit(cli.run_cli(main, get_args_parser()))
