"""Instance-level image retrieval with R-MAC on VGG-16 conv5_3 (Caron et al. 2018, Table 5).

Usage:
    python eval_retrieval.py --data /data/oxford5k --whiten_data /data/paris6k --model vgg16.pth.tar
    python eval_retrieval.py --data /data/paris6k --whiten_data /data/oxford5k --model vgg16.pth.tar
    python eval_retrieval.py --data /data/roxford5k --gnd /data/roxford5k/gnd_roxford5k.pkl \\
        --whiten_data /data/rparis6k --model vgg16.pth.tar          # revisited: Easy/Medium/Hard
    python eval_retrieval.py --data tiny_oxford --whiten_data tiny_paris --model m.pth.tar --S 96

Each image is resized (bilinear) so that its longest side is S (1024); a query is the box of
its query image (scaled the same way, rounded to pixels). The 20 Paris6k images known to be
corrupt are left out by name, as in the original. The conv5_3 activation after its ReLU (no
last max-pool; the Sobel block runs first when the model has one) is max-pooled over the
R-MAC regions (L=3 scales, 40% overlap, Tolias et al. ICLR 2016); each region vector is
L2-normalised, PCA-whitened to 512 dims (learned on the regions of the *other* dataset;
eigenvalues floored at 1e-5 x the largest), L2-normalised, summed and L2-normalised. Score =
dot product. mAP with the standard protocol: good+ok positive, junk ignored (revisited sets:
Easy, Medium, Hard). Features are cached under
--exp/cache, so a second run only re-scores.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import pickle
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchvision import transforms
from tqdm import tqdm

import checkpoint
import cli
import data
import distributed
import models
from eval_common import EvalError, log, model_fingerprint, model_key, require_dir, write_results

OVERLAP = 0.4
STEPS = (2, 3, 4, 5, 6, 7)  # candidate numbers of l=1 regions along the long side (Tolias et al.)
TOLERANCE_PX = 1.0          # a query box may exceed its image by this much (rounding); it is clipped
EIGEN_FLOOR = 1e-5          # PCA-whitening: eigenvalues below this fraction of the largest are raised to it
# Paris6k images that are corrupt in the distributed archive; the original (like standard practice)
# leaves them out of the database and of the ground truth, by name.
CORRUPT_PARIS6K = frozenset(f"paris_{n}" for n in (
    "louvre_000136", "louvre_000146", "moulinrouge_000422", "museedorsay_001059", "notredame_000188",
    "pantheon_000284", "pantheon_000960", "pantheon_000974", "pompidou_000195", "pompidou_000196",
    "pompidou_000201", "pompidou_000467", "pompidou_000640", "sacrecoeur_000299", "sacrecoeur_000330",
    "sacrecoeur_000353", "triomphe_000662", "triomphe_000833", "triomphe_000863", "triomphe_000867"))


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Instance-level retrieval (Oxford5k / Paris6k, or the revisited ROxford / RParis) "
                    "with R-MAC on a DeepCluster VGG-16. Expects --data DIR with DIR/jpg/*.jpg and "
                    "either DIR/gt/ (or DIR/lab/) <query>_{query,good,ok,junk}.txt (the original ground truth; "
                    "<query>_query.txt holds '<image> x1 y1 x2 y2', an 'oxc1_' prefix is stripped) "
                    "or a revisited gnd_<name>.pkl (dict with 'imlist', 'qimlist', 'gnd': "
                    "[{'bbx', 'easy', 'hard', 'junk'}]) in DIR or given by --gnd. --whiten_data "
                    "is the other dataset (DIR/jpg/*.jpg), whose regions the PCA-whitening is learned on.",
        formatter_class=cli.HelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data", type=str, required=True, help="dataset folder (jpg/ and gt/ or gnd_*.pkl)")
    g.add_argument("--gnd", type=str, default=None,
                   help="revisited ground truth pickle (default: DIR/gnd_*.pkl if present, else DIR/gt/)")
    g.add_argument("--whiten_data", type=str, default=None,
                   help="dataset to learn the PCA-whitening on (the other one: Paris6k for Oxford5k); "
                        "default: the evaluated dataset itself, with a warning")
    g.add_argument("--whiten_max_images", type=int, default=0, help="use at most this many whitening images (0: all)")

    g = p.add_argument_group("model")
    g.add_argument("--model", type=str, required=True, help="path to a VGG-16 model")
    g.add_argument("--S", "--imsize", dest="S", type=int, default=1024, help="longest image side")
    g.add_argument("--L", type=int, default=3, help="number of R-MAC scales")
    g.add_argument("--dim", type=int, default=512, help="dimension after PCA-whitening")

    g = p.add_argument_group("run")
    g.add_argument("--exp", type=str, default="exp_retrieval", help="exp folder (feature cache, results)")
    g.add_argument("--no_cache", action="store_true", help="recompute features even when cached")
    g.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto", help="where to run")
    g.add_argument("--no_progress", action="store_true", help="no progress bars")
    g.add_argument("--verbose", action="store_true", help="chatty")
    return p


# ---------------------------------------------------------------------------------------
# R-MAC regions
# ---------------------------------------------------------------------------------------
def rmac_regions(W: int, H: int, L: int = 3) -> list[tuple[int, int, int, int]]:
    """R-MAC regions ``(x, y, w, h)`` (0-based, feature-map cells) of a W x H map.

    At scale l = 1..L, square regions of side ``floor(2 min(W, H) / (l + 1))`` are spread
    uniformly, ``l + m`` along the long side and ``l`` along the short one, where the extra
    ``m`` (0 for a square map) makes consecutive l = 1 regions overlap as close to 40% as
    possible (Tolias, Sicre, Jegou, ICLR 2016). A square map gives 1 + 4 + 9 = 14 regions.
    """
    w = min(W, H)
    Wd = Hd = 0
    if W != H:
        steps = np.asarray(STEPS, dtype=np.float64)
        b = (max(W, H) - w) / (steps - 1)
        overlap = (w * w - w * b) / (w * w)  # overlap of two consecutive l = 1 regions
        extra = int(np.argmin(np.abs(overlap - OVERLAP))) + 1
        Wd, Hd = (extra, 0) if W > H else (0, extra)
    regions = []
    for l in range(1, L + 1):
        wl = math.floor(2 * w / (l + 1))
        if wl < 1:
            continue
        wl2 = math.floor(wl / 2 - 1)

        def centres(n_extra: int, side: int) -> list[int]:
            n = l + n_extra                     # number of regions along this side
            step = (side - wl) / (n - 1) if n > 1 else 0.0
            return [min(max(math.floor(wl2 + i * step) - wl2, 0), side - wl) for i in range(n)]

        for y in centres(Hd, H):
            for x in centres(Wd, W):
                regions.append((x, y, wl, wl))
    return regions


def region_vectors(fmap: torch.Tensor, L: int) -> torch.Tensor:
    """(C, h, w) activations -> (R, C) L2-normalised max-pooled region vectors."""
    _, h, w = fmap.shape
    vecs = [fmap[:, y:y + rh, x:x + rw].amax(dim=(1, 2)) for x, y, rw, rh in rmac_regions(w, h, L)]
    return nn.functional.normalize(torch.stack(vecs), dim=1)  # (R, C)


# ---------------------------------------------------------------------------------------
# datasets and ground truth
# ---------------------------------------------------------------------------------------
@dataclass
class Query:
    name: str
    path: str
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in original image pixels


@dataclass
class RetrievalSet:
    name: str
    db_names: list[str]
    db_paths: list[str]
    queries: list[Query]
    # protocol -> per query {'pos': indices into db, 'junk': indices into db}
    protocols: dict[str, list[dict[str, np.ndarray]]] = field(default_factory=dict)


def list_jpg(root: Path) -> tuple[list[str], list[str]]:
    jpg = root / "jpg"
    if not jpg.is_dir():
        raise EvalError(f"dataset folder {str(root)!r} has no jpg/ folder of images")
    files = sorted(f for f in os.listdir(jpg) if data.is_image_file(f))
    excluded = [f for f in files if os.path.splitext(f)[0] in CORRUPT_PARIS6K]
    if excluded:
        log.info("%s: %d known-corrupt Paris6k image(s) excluded, as the original does: %s", root.name,
                 len(excluded), ", ".join(excluded))
        files = [f for f in files if os.path.splitext(f)[0] not in CORRUPT_PARIS6K]
    if not files:
        raise EvalError(f"{str(jpg)!r} holds no images")
    return [os.path.splitext(f)[0] for f in files], [str(jpg / f) for f in files]


def _indices(names: list[str], index: dict[str, int], where: str, missing: list[str]) -> np.ndarray:
    out = []
    for n in names:
        if n in index:
            out.append(index[n])
        elif n not in CORRUPT_PARIS6K:  # the excluded ones are absent on purpose
            missing.append(f"{n} ({where})")
    return np.asarray(out, dtype=np.int64)


def load_standard(root: Path) -> RetrievalSet:
    """Oxford5k / Paris6k: gt/<q>_query.txt ('<image> x1 y1 x2 y2') + good/ok/junk lists
    (the folder may also be called lab/, the original's name for it)."""
    gt = root / "gt"
    if not gt.is_dir() and (root / "lab").is_dir():
        gt = root / "lab"
    if not gt.is_dir():
        raise EvalError(f"dataset folder {str(root)!r} has neither a gt/ folder nor a gnd_*.pkl file")
    names, paths = list_jpg(root)
    index = {n: i for i, n in enumerate(names)}
    qfiles = sorted(gt.glob("*_query.txt"))
    if not qfiles:
        raise EvalError(f"{str(gt)!r} holds no <query>_query.txt files")
    queries, per_query, missing = [], [], []
    for qf in qfiles:
        q = qf.name[:-len("_query.txt")]
        parts = qf.read_text().split()
        try:
            img, box = parts[0], tuple(float(v) for v in parts[1:5])
            assert len(box) == 4
        except (IndexError, ValueError, AssertionError):
            raise EvalError(f"{str(qf)!r} is malformed: expected '<image> x1 y1 x2 y2'") from None
        img = img[len("oxc1_"):] if img.startswith("oxc1_") else img
        if img not in index:
            raise EvalError(f"query {q}: image {img!r} is not in {str(root / 'jpg')!r}")
        lists = {}
        for kind in ("good", "ok", "junk"):
            f = gt / f"{q}_{kind}.txt"
            if not f.is_file():
                raise EvalError(f"missing ground-truth file {str(f)!r}")
            lists[kind] = _indices(f.read_text().split(), index, f.name, missing)
        queries.append(Query(q, paths[index[img]], box))
        per_query.append({"pos": np.concatenate([lists["good"], lists["ok"]]), "junk": lists["junk"]})
    if missing:
        log.warning("%d ground-truth image(s) are not in jpg/ and are ignored (e.g. %s)", len(missing), missing[0])
    return RetrievalSet(root.name, names, paths, queries, {"standard": per_query})


def load_revisited(root: Path, gnd_path: Path) -> RetrievalSet:
    """ROxford5k / RParis6k: gnd_*.pkl with imlist, qimlist and per-query bbx/easy/hard/junk."""
    try:
        with open(gnd_path, "rb") as f:
            cfg = pickle.load(f)
        imlist, qimlist, gnd = list(cfg["imlist"]), list(cfg["qimlist"]), list(cfg["gnd"])
    except (OSError, pickle.UnpicklingError, KeyError, TypeError, EOFError) as e:
        raise EvalError(f"cannot read revisited ground truth {str(gnd_path)!r} ({type(e).__name__}: {e})") from None
    if len(gnd) != len(qimlist):
        raise EvalError(f"{str(gnd_path)!r}: {len(qimlist)} query images but {len(gnd)} gnd entries")
    jpg = root / "jpg"
    if not jpg.is_dir():
        raise EvalError(f"dataset folder {str(root)!r} has no jpg/ folder of images")

    def path_of(n: str) -> str:
        p = jpg / (n if data.is_image_file(n) else n + ".jpg")
        if not p.is_file():
            raise EvalError(f"image {str(p)!r} listed in {gnd_path.name} does not exist")
        return str(p)

    db_paths = [path_of(n) for n in imlist]
    queries, prot = [], {"easy": [], "medium": [], "hard": []}
    for q, g in zip(qimlist, gnd):
        try:
            box = tuple(float(v) for v in g["bbx"])
            easy, hard, junk = (np.asarray(g[k], dtype=np.int64).ravel() for k in ("easy", "hard", "junk"))
        except (KeyError, TypeError, ValueError):
            raise EvalError(f"{str(gnd_path)!r}: query {q} lacks 'bbx', 'easy', 'hard' or 'junk'") from None
        if len(box) != 4:
            raise EvalError(f"{str(gnd_path)!r}: query {q} has a bbx of {len(box)} values, expected 4")
        queries.append(Query(str(q), path_of(q), box))
        prot["easy"].append({"pos": easy, "junk": np.concatenate([junk, hard])})
        prot["medium"].append({"pos": np.concatenate([easy, hard]), "junk": junk})
        prot["hard"].append({"pos": hard, "junk": np.concatenate([junk, easy])})
    return RetrievalSet(root.name, [os.path.splitext(n)[0] for n in imlist], db_paths, queries, prot)


def load_dataset(root_s: str, gnd: str | None) -> RetrievalSet:
    root = require_dir(root_s, "dataset folder")
    if gnd is None:
        found = sorted(root.glob("gnd_*.pkl"))
        if found:
            return load_revisited(root, found[0])
        return load_standard(root)
    if not Path(gnd).is_file():
        raise EvalError(f"--gnd {gnd!r} does not exist")
    return load_revisited(root, Path(gnd))


# ---------------------------------------------------------------------------------------
# features
# ---------------------------------------------------------------------------------------
_NORMALISE = transforms.Compose([transforms.ToTensor(), transforms.Normalize(data.IMAGENET_MEAN, data.IMAGENET_STD)])


def resize_longest(img, S: int):
    """Resize so that the longest side is S; returns (image, scale factor)."""
    W, H = img.size
    r = S / max(W, H)
    return img.resize((max(1, round(W * r)), max(1, round(H * r))), resample=2), r  # 2 = bilinear


def check_box(box: tuple[float, float, float, float], W: int, H: int, name: str) -> None:
    """Refuse an empty box or one outside its W x H image (beyond a 1 px rounding slack)."""
    x1, y1, x2, y2 = box
    if not (x1 < x2 and y1 < y2 and x1 >= -TOLERANCE_PX and y1 >= -TOLERANCE_PX
            and x2 <= W + TOLERANCE_PX and y2 <= H + TOLERANCE_PX):
        raise EvalError(f"query {name}: box ({x1:g}, {y1:g}, {x2:g}, {y2:g}) lies outside its "
                        f"{W}x{H} image (or is empty)")


def check_queries(rset: RetrievalSet) -> None:
    """Check every query box against its image size (header only) before any extraction."""
    from PIL import Image
    for q in rset.queries:
        try:
            with Image.open(q.path) as im:
                W, H = im.size
        except Exception as e:
            raise EvalError(f"cannot read query image {q.path!r}: {type(e).__name__}: {e}") from None
        check_box(q.box, W, H, q.name)


def crop_query(img, box: tuple[float, float, float, float], S: int, name: str):
    """Resize the query image to longest side S and crop its box, scaled and rounded to pixels."""
    check_box(box, *img.size, name)
    img, r = resize_longest(img, S)
    w, h = img.size
    x1, y1, x2, y2 = np.round(np.asarray(box, dtype=np.float32) * r).astype(np.int64).tolist()
    return img.crop((max(0, x1), max(0, y1), min(w, x2), min(h, y2)))


@torch.no_grad()
def extract(net: models.Trunk, paths: list[str], boxes: list | None, names: list[str], S: int, L: int,
            device: torch.device, desc: str, args: argparse.Namespace, skip_bad: bool) -> tuple[np.ndarray, np.ndarray]:
    """Region vectors of every image: (sum R_i, 512) float32 and offsets (N + 1,).

    Image i owns rows offsets[i]:offsets[i+1] (none for an unreadable database image,
    which is skipped with a warning when ``skip_bad``).
    """
    out, offsets, bad = [], [0], []
    for i, p in enumerate(tqdm(paths, desc=desc, disable=cli.progress(args.no_progress))):
        try:
            img = data.load_rgb(p)
        except data.BadImageError:
            if not skip_bad:
                raise
            bad.append(p)
            offsets.append(offsets[-1])
            continue
        img = crop_query(img, boxes[i], S, names[i]) if boxes is not None else resize_longest(img, S)[0]
        if min(img.size) < 16:
            raise EvalError(f"{names[i]}: {'query box' if boxes is not None else 'image'} is {img.size[0]}x"
                            f"{img.size[1]} px at S={S}, too small for conv5_3 (needs >= 16 px)")
        fmap = net(_NORMALISE(img).unsqueeze(0).to(device))[0]  # (512, h, w)
        r = region_vectors(fmap.float(), L).cpu().numpy()        # (R, 512)
        out.append(r)
        offsets.append(offsets[-1] + len(r))
    if bad:
        log.warning("%d unreadable image(s) skipped (never retrieved), e.g. %s", len(bad), bad[0])
    regions = np.concatenate(out).astype(np.float32) if out else np.zeros((0, 512), np.float32)
    return regions, np.asarray(offsets, dtype=np.int64)


def cached_regions(kind: str, rset: RetrievalSet, net: models.Trunk, device: torch.device,
                   args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray]:
    """Region vectors of the database ('db') or the queries ('q') of ``rset``, cached as .npz."""
    if kind == "q":
        paths, names, boxes = [q.path for q in rset.queries], [q.name for q in rset.queries], \
            [q.box for q in rset.queries]
    else:
        paths, names, boxes = rset.db_paths, rset.db_names, None
    content = hashlib.sha1(json.dumps([paths, boxes, args.L]).encode()).hexdigest()[:10]
    f = Path(args.exp) / "cache" / f"{rset.name}_{kind}_{model_key(args.model)}_S{args.S}_L{args.L}_{content}.npz"
    if f.is_file() and not args.no_cache:
        z = np.load(f)
        log.info("using cached features %s", f)
        return z["regions"], z["offsets"]
    regions, offsets = extract(net, paths, boxes, names, args.S, args.L, device,
                               f"{rset.name} {'queries' if kind == 'q' else 'images'}", args, skip_bad=kind == "db")
    f.parent.mkdir(parents=True, exist_ok=True)
    tmp = f.with_name(f.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        np.savez(fh, regions=regions, offsets=offsets)
    os.replace(tmp, f)  # atomic: a crash never leaves a half-written cache
    return regions, offsets


# ---------------------------------------------------------------------------------------
# whitening, aggregation, scoring
# ---------------------------------------------------------------------------------------
def learn_pca_whitening(x: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and projection (d, D), d = min(dim, D): (x - mean) @ P.T has identity covariance
    along the top-d principal directions.

    Eigenvalues below 1e-5 times the largest are raised to that floor (the original's rule, so a
    direction without variance is amplified by a bounded factor instead of divided by zero).
    """
    x = x.astype(np.float64)
    mean = x.mean(0)
    cov = np.cov(x - mean, rowvar=False, bias=True)      # (D, D)
    eigval, eigvec = np.linalg.eigh(cov)                 # ascending
    if not eigval.max() > 0:
        raise EvalError(f"the {len(x)} whitening regions are all identical: no PCA-whitening to learn")
    eps = eigval.max() * EIGEN_FLOOR
    n_low = int(np.sum(eigval < eps))
    if n_low:
        log.info("PCA-whitening: %d / %d eigenvalues below 1e-5 x the largest, raised to it", n_low, len(eigval))
        eigval = np.where(eigval < eps, eps, eigval)
    order = np.argsort(eigval)[::-1][:dim]
    log.debug("PCA-whitening keeps %.2f%% of the energy", 100 * eigval[order].sum() / eigval.sum())
    P = eigvec[:, order].T / np.sqrt(eigval[order])[:, None]
    return mean.astype(np.float32), P.astype(np.float32)


def aggregate(regions: np.ndarray, offsets: np.ndarray, mean: np.ndarray, P: np.ndarray) -> np.ndarray:
    """Whiten + L2 each region, sum per image, L2: (N, d). Images without regions get zeros."""
    w = (regions - mean) @ P.T                                             # (R, d)
    w /= np.linalg.norm(w, axis=1, keepdims=True) + 1e-12
    out = np.zeros((len(offsets) - 1, P.shape[0]), np.float32)
    for i in range(len(offsets) - 1):
        if offsets[i + 1] > offsets[i]:
            out[i] = w[offsets[i]:offsets[i + 1]].sum(0)
    return out / (np.linalg.norm(out, axis=1, keepdims=True) + 1e-12)


def retrieval_ap(scores: np.ndarray, pos: np.ndarray, junk: np.ndarray) -> float:
    """AP of one query (Oxford protocol): junk removed from the ranking, trapezoidal precision.

    A positive at rank r (0-based, junk skipped) that is the j-th positive (0-based) adds
    (1 / npos) * (P(r-1) + P(r)) / 2 with P(r-1) = j / r (1 when r = 0), P(r) = (j + 1) / (r + 1).
    NaN when the query has no positive.
    """
    pos = np.unique(pos)
    if len(pos) == 0:
        return float("nan")
    order = np.argsort(-np.asarray(scores), kind="stable")
    order = order[~np.isin(order, np.setdiff1d(junk, pos))]
    ranks = np.nonzero(np.isin(order, pos))[0]            # 0-based, ascending
    j = np.arange(len(ranks))
    p0 = np.where(ranks == 0, 1.0, j / np.maximum(ranks, 1))
    p1 = (j + 1) / (ranks + 1)
    return float(np.sum((p0 + p1) / 2) / len(pos))


def mean_ap(scores: np.ndarray, gts: list[dict[str, np.ndarray]]) -> tuple[float, np.ndarray]:
    """mAP (percent) over the queries that have positives, and the per-query APs."""
    aps = np.array([retrieval_ap(scores[i], g["pos"], g["junk"]) for i, g in enumerate(gts)])
    return float(np.nanmean(aps) * 100) if np.any(~np.isnan(aps)) else float("nan"), aps


def main(args: argparse.Namespace) -> dict:
    """Extract (or load cached) R-MAC features, score, return {protocol: mAP}."""
    for flag, ok in (("--S", args.S >= 32), ("--L", args.L >= 1), ("--dim", args.dim >= 1),
                     ("--whiten_max_images", args.whiten_max_images >= 0)):
        if not ok:
            raise EvalError(f"invalid value for {flag}: {getattr(args, flag[2:])!r}")
    cli.check_writable(args.exp)
    exp = Path(args.exp)
    # EXP and its log are made once data and model are checked: a refused run leaves nothing
    # behind (the lines logged until then are kept for the file)
    cli.setup_logging(log, exp, "eval_retrieval.log", args.verbose, defer=True)
    device = distributed.select_device(args.device)
    rset = load_dataset(args.data, args.gnd)
    wset = load_dataset(args.whiten_data, None) if args.whiten_data else None
    if wset is None:
        log.warning("no --whiten_data: the whitening is learned on %s itself (the paper uses the other "
                    "dataset)", rset.name)
    check_queries(rset)
    model = checkpoint.load_model(args.model, arch="vgg16", purpose="retrieval (R-MAC on conv5_3)")
    # (1, 3, H, W) -> (1, 512, H/16, W/16): up to conv5_3's ReLU, without the last max-pool
    net = model.trunk("conv13").freeze().to(device)
    cli.open_log_file(log)
    log.info("%s: %d images, %d queries | vgg16%s conv5_3, S=%d, L=%d, whitening on %s | %s", rset.name,
             len(rset.db_paths), len(rset.queries), " + Sobel" if model.sobel is not None else "", args.S, args.L,
             wset.name if wset else rset.name, device)

    db_r, db_off = cached_regions("db", rset, net, device, args)
    q_r, q_off = cached_regions("q", rset, net, device, args)
    if wset is not None and wset.name == rset.name and Path(args.whiten_data).resolve() == Path(args.data).resolve():
        w_r, w_off = db_r, db_off
    elif wset is not None:
        if args.whiten_max_images and len(wset.db_paths) > args.whiten_max_images:
            keep = np.random.RandomState(0).choice(len(wset.db_paths), args.whiten_max_images, replace=False)
            keep.sort()
            wset = RetrievalSet(wset.name + f"_sub{args.whiten_max_images}", [wset.db_names[i] for i in keep],
                                [wset.db_paths[i] for i in keep], wset.queries)
        w_r, w_off = cached_regions("db", wset, net, device, args)
    else:
        w_r, w_off = db_r, db_off
    if len(w_r) < 2:
        raise EvalError("not enough whitening regions to learn a PCA (need >= 2)")
    mean, P = learn_pca_whitening(w_r, args.dim)
    db = aggregate(db_r, db_off, mean, P)       # (N, d)
    qv = aggregate(q_r, q_off, mean, P)         # (Q, d)
    scores = qv @ db.T                          # (Q, N)
    results = {}
    for prot, gts in rset.protocols.items():
        results[prot], aps = mean_ap(scores, gts)
        if args.verbose:
            for q, a in zip(rset.queries, aps):
                log.debug("  %-24s %s AP %.2f", q.name, prot, 100 * a)
    table = " | ".join(f"{k} mAP {v:.2f}" for k, v in results.items())
    log.info("%s (whitening: %s, %d dims): %s", rset.name, wset.name if wset else rset.name, P.shape[0], table)
    out = {"model": model_fingerprint(args.model), "layer": "conv5_3", "dataset": rset.name, "whiten": wset.name if wset else rset.name, "S": args.S, "L": args.L,
           "dim": int(P.shape[0]), "mAP": results}
    # strict JSON: a protocol whose queries have no positive has no mAP, written as null (a warning names it)
    return write_results(exp / f"results_{rset.name}.json", out)


def run(argv: list[str] | None = None) -> int:
    return cli.run_cli(main, get_args_parser(), argv)


if __name__ == "__main__":
    sys.exit(run())
