"""The training report of a DeepCluster experiment folder as PNG pictures (library of
visu/report.py and ``main.py --report``): the paper's Figure 2 curves, cluster sizes, and sample
images per cluster."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from visu import common  # noqa: E402

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

import checkpoint  # noqa: E402
import data  # noqa: E402
import fileio  # noqa: E402

log = logging.getLogger("deepcluster.report")


class ReportError(common.VisuError):
    """The folder cannot be reported on (not an experiment, unknown epoch...)."""




# ---------------------------------------------------------------------------------------
# reading the experiment
# ---------------------------------------------------------------------------------------
def read_log(exp: Path) -> list[dict]:
    """Per-epoch records of ``exp/log.jsonl``, sorted by epoch (a re-run epoch keeps its last record)."""
    path = exp / "log.jsonl"
    if not exp.is_dir():
        raise ReportError(f"{str(exp)!r} is not a directory: expected an experiment folder written by main.py")
    if not path.is_file():
        raise ReportError(f"{str(exp)!r} is not an experiment folder: it has no log.jsonl")
    records = [r for r in fileio.read_jsonl(path) if isinstance(r, dict) and "epoch" in r]
    if not records:
        raise ReportError(f"{str(path)!r} holds no epoch record yet")
    by_epoch = {int(r["epoch"]): r for r in records}
    return [by_epoch[e] for e in sorted(by_epoch)]


def read_args(exp: Path) -> dict:
    path = exp / "args.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        log.warning("report: %s is unreadable, ignored", path)
        return {}


def resolve_data(exp: Path, given: str, train_args: dict) -> Path | None:
    """The dataset folder: ``--data``, else args.json's path tried as given, beside the
    experiment and from the repository root (main.py's demo stores a relative path)."""
    if given:
        p = Path(given)
        if not p.is_dir():
            raise ReportError(f"--data {given!r} is not a directory")
        return p
    raw = train_args.get("data")
    if not raw:
        return None
    p = Path(raw)
    for cand in ([p] if p.is_absolute() else [p, exp / p, exp.parent / p, common.ROOT / p]):
        if cand.is_dir():
            return cand
    return None


def series(records: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(epochs, values) of the records where ``key`` is a number."""
    pts = [(r["epoch"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    if not pts:
        return np.zeros(0), np.zeros(0)
    e, v = zip(*pts)
    return np.asarray(e), np.asarray(v, dtype=float)


# ---------------------------------------------------------------------------------------
# pictures
# ---------------------------------------------------------------------------------------
CURVES = [  # key, title, y label
    ("nmi_prev", "NMI t-1 / t (stability of the assignments)", "NMI"),
    ("nmi_labels", "NMI with the labels", "NMI"),
    ("knn_top1", "weighted kNN accuracy on --knn_data (fc7)", "accuracy (%)"),
    ("clustering_loss", "Clustering loss (k-means objective)", "loss"),
    ("train_loss", "Training loss (pseudo-label cross-entropy)", "loss"),
]


def plot_curves(records: list[dict], out: Path, title: str, dpi: int = 100) -> Path:
    """One panel per quantity the log has values for (NMI curves in [0, 1])."""
    panels = [(k, t, y, *series(records, k)) for k, t, y in CURVES]
    panels = [p for p in panels if len(p[3])]
    if not panels:
        raise ReportError("log.jsonl has none of nmi_prev, nmi_labels, clustering_loss, train_loss")
    ncols = 2 if len(panels) == 4 else min(3, len(panels))
    nrows = (len(panels) + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 3.6 * nrows), squeeze=False)
    for ax, (key, ptitle, ylabel, e, v) in zip(axes.flat, panels):
        xlabel = "epoch"
        if key == "knn_top1":  # measured after training epoch e (epoch -1: the random network)
            e, xlabel = e + 1, "epochs of training done"
            e5, v5 = series(records, "knn_top5")
            ax.plot(e5 + 1, v5, ls="--", lw=1, color="tab:gray", label="top-5")
        ax.plot(e, v, marker="o" if len(e) <= 50 else None, ms=3, lw=1.5,
                label="top-1" if key == "knn_top1" else None)
        if key == "knn_top1":
            ax.legend(fontsize=8)
        ax.set_title(ptitle, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if key.startswith("nmi"):
            ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if len(e) == 1:
            ax.set_xlim(e[0] - 1, e[0] + 1)
        ax.annotate(f"{v[-1]:.4g}", (e[-1], v[-1]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path = out / "training_curves.png"
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def plot_cluster_sizes(sizes: np.ndarray, epoch: int, out: Path, dpi: int = 100) -> Path:
    """Sorted cluster sizes (log scale) and the histogram of sizes, empty clusters included."""
    n_empty = int((sizes == 0).sum())
    srt = np.sort(sizes)[::-1]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    rank = np.arange(len(srt))
    a1.fill_between(rank, srt, step="post", color="tab:blue", alpha=0.8)
    if srt[0] > 20 * max(1.0, float(np.median(sizes))):  # heavy tail: log scale reads better
        a1.set_yscale("symlog", linthresh=1)
    a1.set_xlim(0, max(1, len(srt) - 1))
    a1.set_xlabel("cluster rank (largest first)")
    a1.set_ylabel("images")
    a1.set_title("cluster sizes, sorted", fontsize=10)
    a1.axhline(sizes.sum() / max(1, len(sizes)), color="tab:red", lw=1, ls="--", label="mean size")
    a1.legend(fontsize=8)
    lo, hi = int(srt[-1]), int(srt[0])
    bins = np.arange(lo, hi + 2) - 0.5 if hi - lo <= 60 else 50  # one bar per size when few
    a2.hist(sizes, bins=bins, color="tab:green")
    a2.set_xlabel("cluster size (images)")
    a2.set_ylabel("clusters")
    a2.set_title("histogram of cluster sizes", fontsize=10)
    fig.suptitle(f"epoch {epoch}: {int(sizes.sum())} images in {len(sizes)} clusters, {n_empty} empty, "
                 f"largest {int(srt[0])}, median {float(np.median(sizes)):g}", fontsize=11)
    fig.tight_layout()
    path = out / f"cluster_sizes_epoch_{epoch:05d}.png"
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def choose_clusters(sizes: np.ndarray, n_largest: int, n_random: int,
                    rng: np.random.RandomState) -> list[tuple[str, int]]:
    """The ``n_largest`` largest clusters, then ``n_random`` other non-empty ones at random."""
    order = np.argsort(-sizes, kind="stable")
    largest = [int(c) for c in order[:n_largest] if sizes[c] > 0]
    taken = set(largest)
    rest = np.asarray([c for c in np.flatnonzero(sizes > 0) if c not in taken], dtype=np.int64)
    chosen = rng.choice(rest, size=min(n_random, len(rest)), replace=False) if len(rest) else []
    return [("largest", c) for c in largest] + [("random", int(c)) for c in chosen]


def plot_cluster_samples(labels: np.ndarray, paths: list[str], targets: list[int] | None, classes: list[str],
                         epoch: int, out: Path, n_largest: int, n_random: int, per_cluster: int,
                         tile: int, seed: int, dpi: int = 100) -> Path | None:
    """One row per chosen cluster: up to ``per_cluster`` random members of it."""
    sizes = np.bincount(labels[labels >= 0])  # -1: an image left out of the clustering
    rng = np.random.RandomState(seed)
    rows = choose_clusters(sizes, n_largest, n_random, rng)
    if not rows or per_cluster < 1:
        return None
    fig, axes = plt.subplots(len(rows), 1, figsize=(1.6 + per_cluster * (tile + 2) / 72.0,
                                                    0.5 + len(rows) * (tile + 6) / 72.0), squeeze=False)
    for ax, (kind, c) in zip(axes[:, 0], rows):
        members = np.flatnonzero(labels == c)
        shown = np.sort(rng.choice(members, size=min(per_cluster, len(members)), replace=False))
        text = f"{kind}\ncluster {c}\n{len(members)} img"
        if targets is not None:
            t = np.bincount(np.asarray(targets)[members])
            text += f"\n{100 * t.max() / len(members):.0f}% '{classes[int(t.argmax())]}'"
        strip = common.contact_sheet([common.tile_picture(paths[i], tile) for i in shown],
                                     ncols=per_cluster, tile=tile, pad=2)
        ax.imshow(np.asarray(strip), interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        for s in ax.spines.values():
            s.set_visible(False)
        ax.set_ylabel(text, rotation=0, ha="right", va="center", fontsize=8,
                      color="tab:blue" if kind == "largest" else "tab:purple")
    fig.suptitle(f"epoch {epoch}: samples of the {sum(k == 'largest' for k, _ in rows)} largest clusters "
                 f"and of {sum(k == 'random' for k, _ in rows)} random clusters", fontsize=10)
    fig.tight_layout(h_pad=0.3, rect=(0, 0, 1, 1 - 0.35 / fig.get_size_inches()[1]))
    path = out / f"clusters_epoch_{epoch:05d}.png"
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------
def draw(exp: str | Path, *, epoch: int = -1, n_largest: int = 8, n_random: int = 8, per_cluster: int = 8,
         seed: int = 0, data_dir: str = "", tile: int = 64, out: str = "", dpi: int = 100) -> list[Path]:
    """Write the report pictures of ``exp`` (under ``out``, default ``exp/report``); returns their
    paths. Raises :class:`ReportError` when the folder is not an experiment; missing cluster files
    or images only skip their pictures. The defaults are what ``main.py --report`` draws."""
    args = argparse.Namespace(epoch=epoch, n_largest=n_largest, n_random=n_random, per_cluster=per_cluster,
                              seed=seed, data=data_dir, tile=tile, out=out, dpi=dpi)
    exp = Path(exp)
    records = read_log(exp)
    train_args = read_args(exp)
    clog_dir = exp / "clusters"
    epochs = checkpoint.ClusterLog(clog_dir).epochs() if clog_dir.is_dir() else []
    epoch = (epochs[-1] if args.epoch < 0 else args.epoch) if epochs else args.epoch
    if epochs and epoch not in epochs:  # before anything is written
        raise ReportError(f"--epoch {epoch}: no assignments stored for it (available: {epochs[0]}..{epochs[-1]})")
    out = Path(args.out) if args.out else exp / "report"
    out.mkdir(parents=True, exist_ok=True)
    desc = ", ".join(f"{k} {train_args[k]}" for k in ("arch", "nmb_cluster", "clustering") if k in train_args)
    n = sum(1 for r in records if r["epoch"] >= 0)  # epoch -1: the random network's kNN record
    written = [plot_curves(records, out, f"{exp.resolve().name}: {n} epoch{'s' if n != 1 else ''}"
                           + (f" ({desc})" if desc else ""), args.dpi)]

    if not epochs:
        log.warning("report: no cluster assignments under %s, cluster pictures skipped", clog_dir)
    else:
        labels = checkpoint.ClusterLog(clog_dir).load(epoch)
        rec = next((r for r in records if r["epoch"] == epoch), {})
        k = max(int(rec.get("n_clusters") or train_args.get("nmb_cluster") or 0), int(labels.max()) + 1)
        # -1: an image left out of the clustering (unreadable, or outside a v2 memory bank)
        written.append(plot_cluster_sizes(np.bincount(labels[labels >= 0], minlength=k), epoch, out, args.dpi))

        root = resolve_data(exp, args.data, train_args)
        if root is None:
            log.warning("report: dataset %r not found, sample pictures skipped (pass --data DIR)",
                        train_args.get("data"))
        else:
            paths, targets, classes = data.scan_image_folder(root)
            if len(paths) != len(labels):
                log.warning("report: %s holds %d images but the assignments cover %d, sample pictures "
                            "skipped (pass --data with the training folder)", root, len(paths), len(labels))
            else:
                p = plot_cluster_samples(labels, paths, targets, classes, epoch, out, args.n_largest,
                                         args.n_random, args.per_cluster, args.tile, args.seed, args.dpi)
                if p is not None:
                    written.append(p)
    print("report: " + ", ".join(str(p) for p in written))
    return written

