"""The data path: feature-pass and training-pass loaders per core, --decode gpu's batch transfer,
one epoch, and the ImageNet epoch they project to.

On generated photo-like JPEGs shaped like ImageNet's (500x375, quality 98: ~105 KB each, as
ImageNet's 100-120 KB), in one run:

  Per-core rates are images per second of the process's CPU time (time.process_time: robust to
  the other processes of a shared machine); the epoch is timed by the wall clock.

  1. feature pass, one process (img/s of one core): decoding every pass (today) against the
     input cache (input_cache.py) read by a later pass; the first pass, which writes it, too.
  2. training pass, one process: today's loader (PIL crop -> PILToTensor per image -> the
     default collate's stack; load_rgb's copy of RGB images) against ours (PIL crops collated
     straight into one channels-last batch, train_crops.py; no copy); where a worker's time goes
     per image (decode, RGB copy, crop box, crop, resize, flip, to tensor + collate), the receive
     time of a batch from a worker process, and --decode cpu_draft's effect (the share of crops
     it reduces, img/s and pixel difference) on these JPEGs and on large photos.
  3. --decode gpu's batch through a worker's shared memory: one tensor per image (before) against
     one bytes tensor + one crops tensor per batch (gpu_decode.EncodedBatch), receive ms per batch.
  4. one epoch (AlexNet-Sobel, feature pass + clustering + training pass, DataLoader workers) on
     --epoch_images JPEGs: today's loaders against ours (the feature pass from the cache written
     by the epoch before), the same network, clusters and steps.
  5. the projected ImageNet epoch (1,281,167 images) on 1 and 8 GPUs from the per-core numbers:
     each pass takes N x max(1 / (workers x per-core img/s), GPU s/img / G) (the loaders and the
     GPUs overlap; the slower bounds), workers = G x (cores per GPU - 1) as --workers' default;
     the cache read is also bounded by the disk (N x 3 x 224^2 bytes at G x --disk_gbs); the GPU's
     s/img = FLOPs per image (torch.utils.flop_counter) / --gpu_tflops (an assumption: nothing
     here ran on a GPU). The clustering step is left out (see bench_clustering.py).

    python benchmarks/bench_loader.py --out benchmarks/results/cpu_loader.json     # ~15-25 min on 2 cores
    python benchmarks/bench_loader.py --epoch_images 0                              # loaders only: minutes
    python benchmarks/bench_loader.py --quick                                       # seconds (tests)
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import warnings
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, print_table, write_json  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402
from torchvision import transforms  # noqa: E402
from torchvision.transforms import functional as F  # noqa: E402

import clustering  # noqa: E402
import data  # noqa: E402
import gpu_decode  # noqa: E402
import input_cache  # noqa: E402
import train_crops  # noqa: E402
import util  # noqa: E402

IMAGENET_N = 1_281_167


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("loaders")
    g.add_argument("--n_images", type=int, default=512, help="JPEGs of the per-core loader measurements")
    g.add_argument("--jpeg_size", default="500x375", help="WxH of the generated JPEGs")
    g.add_argument("--quality", type=int, default=98, help="JPEG quality (98: ~105 KB at 500x375)")
    g.add_argument("--size", type=int, default=224, help="network input resolution")
    g.add_argument("--batch", type=int, default=256, help="loader batch")
    g.add_argument("--large_images", type=int, default=32, help="large photos of the cpu_draft part (0: skip)")
    g.add_argument("--large_size", default="2000x1500", help="WxH of the large photos")
    g = p.add_argument_group("epoch")
    g.add_argument("--epoch_images", type=int, default=4096, help="JPEGs of the epoch part (0: skip)")
    g.add_argument("--epoch_batch", type=int, default=64)
    g.add_argument("--k", type=int, default=100, help="clusters of the epoch")
    g.add_argument("--workers", type=int, default=2, help="DataLoader workers of the epoch")
    g = p.add_argument_group("projection")
    g.add_argument("--cores_per_gpu", type=int, default=16, help="CPU cores per GPU of the projected box")
    g.add_argument("--gpu_tflops", type=float, default=100.0,
                   help="sustained TFLOP/s of one GPU on AlexNet (assumed: nothing here ran on a GPU)")
    g.add_argument("--disk_gbs", type=float, default=2.0,
                   help="node-local disk read GB/s per GPU for the cache (one NVMe drive per GPU, as 8-GPU nodes have)")
    g = p.add_argument_group("run")
    g.add_argument("--quick", action="store_true", help="tiny sizes (the test suite's smoke run)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--cache", default=str(Path.home() / ".cache" / "deepcluster_bench"),
                   help="where the generated JPEGs are kept between runs")
    g.add_argument("--out", default=None, help="write the results as JSON here")
    return p


def check(args, parser) -> None:
    if args.quick:
        args.n_images, args.jpeg_size, args.size, args.batch, args.quality = 12, "96x72", 64, 4, 90
        args.large_images, args.large_size, args.epoch_images, args.epoch_batch = 4, "320x240", 8, 4
        args.k, args.workers = 2, 0
    for flag in ("n_images", "batch", "size"):
        if getattr(args, flag) < 1:
            parser.error(f"argument --{flag}: must be >= 1, got {getattr(args, flag)}")
    if args.epoch_images and args.k > args.epoch_images:
        parser.error(f"argument --k: {args.k} clusters exceed --epoch_images {args.epoch_images}")


def make_photos(cache: str, n: int, wh: str, quality: int, seed: int = 0) -> str:
    """n photo-like JPEGs (data.synthetic_photo) of WxH at ``quality``, generated once."""
    w, h = (int(v) for v in wh.lower().split("x"))
    root = Path(cache) / f"photos_{w}x{h}_q{quality}_{n}"
    if (root / ".complete").exists():
        return str(root)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        data.synthetic_photo(h, w, seed * 1_000_003 + i).save(root / f"img_{i:06d}.jpg", quality=quality)
    (root / ".complete").write_text(f"{n}\n")
    return str(root)


def legacy_load_rgb(path: str) -> Image.Image:
    """data.load_rgb before this work: convert('RGB') always (a copy for an RGB JPEG)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with open(path, "rb") as f:
            img = Image.open(f)
            img.load()
    return img.convert("RGB")


class LegacyImages(Dataset):
    """An IndexedImageFolder whose load() is legacy_load_rgb (today's training images)."""

    def __init__(self, ds):
        self.ds, self.paths = ds, ds.paths

    def __len__(self):
        return len(self.ds)

    def load(self, i):
        return legacy_load_rgb(self.paths[i])


def cpu_clock() -> float:
    """Seconds of CPU this process has used (user + system, all threads; torch runs 1 thread
    here): a per-core rate measured by it does not move with what the machine's other processes
    take, as a wall clock on a shared VM does. Waiting (I/O, another process) is not counted."""
    return time.process_time()


def rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("inf")


# ---------------------------------------------------------------------------------------
# 1. the feature pass
# ---------------------------------------------------------------------------------------
def feature_rates(args, root: str) -> dict:
    """img/s of one process: decoding (main.py's default --jpeg_draft on), writing the cache,
    reading it (best of 2 passes); the cached batches checked equal to the decoded ones."""
    ds = data.IndexedImageFolder(root, transform=data.eval_transform(args.size, normalize=False),
                                 draft=data.eval_resize(args.size))
    cpu = torch.device("cpu")
    folder = Path(tempfile.mkdtemp(prefix="bench_loader_cache-", dir=args.cache))
    try:
        def run(loader) -> tuple[float, list[int]]:
            t = cpu_clock()
            sums = [zlib.crc32(x.numpy()) for x, _ in loader]
            return cpu_clock() - t, sums
        t_plain, ref = run(input_cache.feature_loader(ds, args.batch, 0, cpu, args.size))
        cached = input_cache.feature_loader(ds, args.batch, 0, cpu, args.size, cache=folder)
        t_write, got = run(cached)
        assert cached.last_mode == "write" and got == ref
        t_read = float("inf")
        for _ in range(2):
            t, got = run(cached)
            assert cached.last_mode == "read" and got == ref, "cached batches differ from decoded ones"
            t_read = min(t_read, t)
        shard = sum(p.stat().st_size for p in folder.rglob("*.bin"))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    n = len(ds)
    return {"images": n, "decode_img_s": rate(n, t_plain), "write_img_s": rate(n, t_write),
            "cached_img_s": rate(n, t_read), "cache_x": t_plain / t_read, "bytes_per_image": shard / n,
            "decode_ms": 1e3 * t_plain / n, "cached_ms": 1e3 * t_read / n}


# ---------------------------------------------------------------------------------------
# 2. the training pass
# ---------------------------------------------------------------------------------------
def train_loaders(args, root: str, draws: np.ndarray, decode: str = "cpu"):
    """(today's, ours) training loaders over ``draws`` in one process, as main.make_train_loader
    builds them before and after this work (same seeds: the same crops)."""
    ds = data.IndexedImageFolder(root)
    lists = [list(range(len(ds)))]
    today = clustering.cluster_assign(lists, LegacyImages(ds), data.train_transform(args.size, normalize=False))
    if decode == "cpu_draft":
        ours = clustering.cluster_assign(lists, gpu_decode.EncodedImages(ds), train_crops.DraftCrop(args.size))
    else:
        ours = clustering.cluster_assign(lists, ds, train_crops.train_crops(args.size))
    sampler = util.SeededShardSampler(draws, base_seed=args.seed)
    return (DataLoader(today, batch_size=args.batch, sampler=sampler),
            DataLoader(ours, batch_size=args.batch, sampler=sampler, collate_fn=train_crops.CollateCrops()))


def time_loader(loader) -> tuple[float, list[torch.Tensor]]:
    t = cpu_clock()
    out = [x for x, _, _ in loader]
    return cpu_clock() - t, out


def training_rates(args, root: str) -> dict:
    n = args.n_images
    draws = np.random.RandomState(args.seed).permutation(n)
    today, ours = train_loaders(args, root, draws)
    best = {"today": float("inf"), "ours": float("inf")}
    for _ in range(2 if args.quick else 4):  # interleaved, best of 4
        for name, loader in (("today", today), ("ours", ours)):
            t, out = time_loader(loader)
            best[name] = min(best[name], t)
            if name == "today":
                ref = out
            else:
                assert all(torch.equal(a, b) for a, b in zip(ref, out)), "ours' training batches differ"
    return {"images": n, "today_img_s": rate(n, best["today"]), "ours_img_s": rate(n, best["ours"]),
            "train_x": best["today"] / best["ours"], "today_ms": 1e3 * best["today"] / n,
            "ours_ms": 1e3 * best["ours"] / n}


def best_us(fn, items: list, reps: int = 3) -> float:
    """Best of ``reps`` of the mean microseconds of fn(item) over ``items``."""
    best = float("inf")
    for _ in range(reps):
        t = cpu_clock()
        for it in items:
            fn(it)
        best = min(best, (cpu_clock() - t) / len(items))
    return 1e6 * best


def stage_breakdown(args, root: str) -> dict:
    """Microseconds of one core per training image, stage by stage (today's path, and ours where
    it differs), on up to 64 images."""
    paths = data.IndexedImageFolder(root).paths[:64]
    size = args.size
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        imgs = [legacy_load_rgb(p) for p in paths]
        boxes = [transforms.RandomResizedCrop.get_params(im, [0.08, 1.0], [3 / 4, 4 / 3]) for im in imgs]
    pairs = list(zip(imgs, boxes))
    crops = [F.crop(im, *b) for im, b in pairs]
    outs = [F.resize(c, [size, size], transforms.InterpolationMode.BILINEAR, antialias=True) for c in crops]
    tensors = [F.pil_to_tensor(o) for o in outs]
    collate = train_crops.CollateCrops()

    def open_decode(p):
        with open(p, "rb") as f:
            im = Image.open(f)
            im.load()
    rows = {
        "decode (open + libjpeg)": best_us(open_decode, paths),
        "RGB copy (today only)": best_us(lambda im: im.convert("RGB"), imgs),
        "crop box draw": best_us(lambda im: transforms.RandomResizedCrop.get_params(im, [0.08, 1.0], [3 / 4, 4 / 3]),
                                 imgs),
        "crop": best_us(lambda pb: F.crop(pb[0], *pb[1]), pairs),
        "resize (antialiased bilinear)": best_us(
            lambda c: F.resize(c, [size, size], transforms.InterpolationMode.BILINEAR, antialias=True), crops),
        "flip": best_us(F.hflip, outs),
        "to tensor + stack (today)": best_us(F.pil_to_tensor, outs) + best_us(
            lambda _: torch.stack(tensors), [0]) / len(tensors),
        "into the batch (ours)": best_us(lambda _: collate([(o, 0, 0) for o in outs]), [0]) / len(outs),
    }
    fused = sum(not np.array_equal(np.asarray(F.resized_crop(im, *b, [size, size], antialias=True)),
                                   np.asarray(im.resize((size, size), Image.BILINEAR,
                                                        box=(b[1], b[0], b[1] + b[3], b[0] + b[2]))))
                for im, b in pairs)
    return {"us_per_image": rows, "fused_resize_box_differs": fused, "fused_checked": len(pairs)}


class Prebuilt(Dataset):
    """Item i: a fresh batch made by ``make`` (new tensors each time, as a worker's collate)."""

    def __init__(self, make, n: int):
        self.make, self.n = make, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.make()


def receive_ms(make, n: int = 6, pause: float = 0.5) -> float:
    """Main-process milliseconds to receive one batch from a worker process that is ahead (the
    unpickling: a file descriptor and a mapping per shared-memory tensor), median of ``n``."""
    loader = DataLoader(Prebuilt(make, n + 1), batch_size=None, num_workers=1, prefetch_factor=2, timeout=300)
    it = iter(loader)
    next(it)
    times = []
    for _ in range(n):
        time.sleep(pause)  # the worker has the next batch ready
        t = cpu_clock()
        next(it)
        times.append(cpu_clock() - t)
    return 1e3 * float(np.median(times))


def ipc(args, root: str) -> dict:
    """Receive time per batch of --batch: the training batch (one uint8 tensor, today and ours),
    and --decode gpu's batch before (a tensor per JPEG) and after (two tensors)."""
    ds = data.IndexedImageFolder(root)
    enc, crop = gpu_decode.EncodedImages(ds), gpu_decode.EncodedCrop(args.size)
    samples = [crop(enc.load(i % len(ds))) for i in range(args.batch)]
    size, b = args.size, args.batch

    def fresh():  # --decode gpu's batch before this work: the samples, a tensor each (what it pickled)
        return [gpu_decode.EncodedSample(s.path, s.data.clone(), s.box) for s in samples]
    n, pause = (2, 0.05) if args.quick else (6, 0.5)
    return {"train_batch_ms": receive_ms(lambda: torch.zeros(b, 3, size, size, dtype=torch.uint8), n, pause),
            "gpu_per_image_ms": receive_ms(fresh, n, pause),
            "gpu_packed_ms": receive_ms(lambda: gpu_decode.EncodedBatch(fresh(), size), n, pause),
            "jpeg_kb": float(np.mean([s.data.numel() for s in samples])) / 1e3, "batch": b}


def draft_effect(args, root: str, n: int) -> dict:
    """--decode cpu_draft against cpu (ours) on ``root``: img/s of one process, the share of crops
    decoded at reduced scale, and the mean absolute pixel difference."""
    draws = np.random.RandomState(args.seed + 1).permutation(n)
    _, full = train_loaders(args, root, draws)
    _, draft = train_loaders(args, root, draws, "cpu_draft")
    t_full, a = time_loader(full)
    t_draft, b = time_loader(draft)
    for _ in range(1 if args.quick else 3):  # interleaved, best of 4
        t_full = min(t_full, time_loader(full)[0])
        t_draft = min(t_draft, time_loader(draft)[0])
    a, b = torch.cat(a).int(), torch.cat(b).int()
    differs = (a != b).flatten(1).any(1)
    return {"images": n, "full_img_s": rate(n, t_full), "draft_img_s": rate(n, t_draft),
            "draft_x": t_full / t_draft, "reduced_pct": 100 * float(differs.float().mean()),
            "mean_abs_diff_reduced": float((a - b).abs()[differs].float().mean()) if differs.any() else 0.0}


# ---------------------------------------------------------------------------------------
# 4. one epoch
# ---------------------------------------------------------------------------------------
def epoch(args, root: str) -> dict:
    """One epoch of AlexNet-Sobel with today's loaders and with ours (the cache written by a pass
    before, untimed except as ``write_features_s``); the same initial network, clustering and
    training steps (same crops) in both."""
    from bench_epoch import cluster_step
    import models

    dev = torch.device("cpu")
    ds = data.IndexedImageFolder(root, transform=data.eval_transform(args.size, normalize=False),
                                 draft=data.eval_resize(args.size))
    folder = Path(tempfile.mkdtemp(prefix="bench_loader_cache-", dir=args.cache))
    a = argparse.Namespace(**{**vars(args), "batch": args.epoch_batch, "dev": dev})
    out = {}
    try:
        cached = input_cache.feature_loader(ds, args.epoch_batch, args.workers, dev, args.size, cache=folder)
        t = time.perf_counter()
        for _ in cached:  # the epoch before: writes the cache
            pass
        out["write_features_s"] = time.perf_counter() - t
        draws = np.random.RandomState(args.seed).permutation(len(ds))
        for name, feats in (("today", input_cache.feature_loader(ds, args.epoch_batch, args.workers, dev, args.size)),
                            ("ours", cached)):
            torch.manual_seed(args.seed)
            model = models.build_model("alexnet", sobel=True, bn=True, out=args.k, input_size=args.size)
            model = model.to(memory_format=torch.channels_last)
            t0 = time.perf_counter()
            f = feature_pass(model, feats)
            t1 = time.perf_counter()
            labels = cluster_step(a, f, "auto")
            t2 = time.perf_counter()
            loaders = train_loaders(argparse.Namespace(**{**vars(args), "batch": args.epoch_batch}), root, draws)
            loader = loaders[0] if name == "today" else loaders[1]
            loader = DataLoader(loader.dataset, batch_size=args.epoch_batch, sampler=loader.sampler,
                                collate_fn=loader.collate_fn, num_workers=args.workers)
            train_pass(model, loader, labels, args.k)
            t3 = time.perf_counter()
            out[name] = {"features_s": t1 - t0, "clustering_s": t2 - t1, "training_s": t3 - t2, "epoch_s": t3 - t0,
                         "load": round(os.getloadavg()[0], 1)}
            if name == "ours":
                assert cached.last_mode == "read"
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    for key in ("features", "clustering", "training", "epoch"):
        out[f"{key}_x"] = out["today"][f"{key}_s"] / out["ours"][f"{key}_s"]
    out["images"] = len(ds)
    return out


@torch.no_grad()
def feature_pass(model, loader) -> np.ndarray:
    model.eval()
    n = len(loader.dataset)
    out = np.zeros((n, 4096), np.float32)
    for imgs, idx in loader:
        out[idx.numpy()] = model.forward_features(data.to_model_input(imgs, torch.device("cpu"), True)).numpy()
    return out


def train_pass(model, loader, labels: np.ndarray, k: int) -> None:
    """main.py's step (SGD body with momentum + a fresh top layer), labels by dataset index."""
    model.reset_top_layer(k)
    opt = torch.optim.SGD(model.body_parameters(), lr=0.05, momentum=0.9, weight_decay=1e-5, fused=True)
    top = torch.optim.SGD(model.top_layer.parameters(), lr=0.05, weight_decay=1e-5, fused=True)
    crit = nn.CrossEntropyLoss()
    lab = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    model.train()
    for imgs, _, idx in loader:
        loss = crit(model(data.to_model_input(imgs, torch.device("cpu"), True)), lab[idx])
        opt.zero_grad(set_to_none=True)
        top.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        top.step()


# ---------------------------------------------------------------------------------------
# 5. the projection
# ---------------------------------------------------------------------------------------
def alexnet_flops(size: int) -> dict:
    """FLOPs per image: eval forward to fc7 (feature pass), forward + backward (training)."""
    import models
    from torch.utils.flop_counter import FlopCounterMode
    model = models.build_model("alexnet", sobel=True, bn=True, out=10000, input_size=size)
    x, y = torch.randn(2, 3, size, size), torch.randint(0, 10000, (2,))
    model.eval()
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model.forward_features(x)
    feat = fc.get_total_flops() / 2
    model.train()
    with FlopCounterMode(display=False) as fc:
        nn.CrossEntropyLoss()(model(x), y).backward()
    return {"features": feat, "training": fc.get_total_flops() / 2}


def project(args, feat: dict, train: dict, flops: dict) -> list[dict]:
    """Minutes per ImageNet epoch (feature + training pass; the clustering step left out) on G
    GPUs of a box with --cores_per_gpu cores each: every pass takes N x max(1 / (workers x per-core
    img/s), GPU s/img / G), workers = G x (cores_per_gpu - 1) (--workers' default); the cache read
    is also bounded by the disk: N x 3 x 224^2 bytes / (G x --disk_gbs)."""
    n, img_bytes = IMAGENET_N, 3 * args.size * args.size
    rows = []
    for g in (1, 8):
        workers = g * max(1, args.cores_per_gpu - 1)
        gpu_f = n * flops["features"] / (g * args.gpu_tflops * 1e12)
        gpu_t = n * flops["training"] / (g * args.gpu_tflops * 1e12)
        disk = n * img_bytes / (g * args.disk_gbs * 1e9)
        for name, f_rate, t_rate in (("today", feat["decode_img_s"], train["today_img_s"]),
                                     ("ours", feat["cached_img_s"], train["ours_img_s"])):
            load_f = n / (workers * f_rate)
            if name == "ours":
                load_f = max(load_f, disk)
            load_t = n / (workers * t_rate)
            f_s, t_s = max(load_f, gpu_f), max(load_t, gpu_t)
            rows.append({"gpus": g, "loaders": name, "workers": workers, "features_min": f_s / 60,
                         "features_bound": "loader" if load_f > gpu_f else "GPU", "training_min": t_s / 60,
                         "training_bound": "loader" if load_t > gpu_t else "GPU", "epoch_min": (f_s + t_s) / 60,
                         "gpu_only_min": (gpu_f + gpu_t) / 60})
    return rows


def main(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)  # one core: the loaders are measured per core
    env = environment(torch.device("cpu"))
    Path(args.cache).mkdir(parents=True, exist_ok=True)
    print(f"loader benchmark: {args.n_images} JPEGs {args.jpeg_size} q{args.quality} at {args.size} px, batch "
          f"{args.batch}; {env['cpu']} ({env['cpu_cores']} cores), load {env['loadavg_1min_at_start']}", flush=True)
    root = make_photos(args.cache, args.n_images, args.jpeg_size, args.quality, args.seed)
    kb = float(np.mean([os.path.getsize(p) for p in data.IndexedImageFolder(root).paths])) / 1e3
    res: dict = {"jpeg_kb": kb}
    res["features"] = feat = feature_rates(args, root)
    print(f"feature pass, one core: decode {feat['decode_img_s']:.0f} img/s ({feat['decode_ms']:.2f} ms/img), "
          f"first pass writing the cache {feat['write_img_s']:.0f} img/s, cached {feat['cached_img_s']:.0f} img/s "
          f"({feat['cached_ms']:.3f} ms/img) = {feat['cache_x']:.1f}x (goal >= 10x: "
          f"{'MET' if feat['cache_x'] >= 10 else 'MISSED'}); {feat['bytes_per_image'] / 1e3:.1f} KB per image on disk",
          flush=True)
    res["training"] = train = training_rates(args, root)
    print(f"training pass, one core: today {train['today_img_s']:.0f} img/s ({train['today_ms']:.2f} ms/img), ours "
          f"{train['ours_img_s']:.0f} img/s ({train['ours_ms']:.2f} ms/img) = {train['train_x']:.2f}x, same batches",
          flush=True)
    res["stages"] = st = stage_breakdown(args, root)
    print_table([{"stage": k, "us": v} for k, v in st["us_per_image"].items()], [("stage", "stage"), ("us", "us/img")],
                title=f"where a training worker's time goes ({kb:.0f} KB JPEGs {args.jpeg_size} -> {args.size} px); "
                      f"PIL resize(box=) instead of crop + resize differs in {st['fused_resize_box_differs']} of "
                      f"{st['fused_checked']} crops (its filter reads past the box): not used")
    res["ipc"] = com = ipc(args, root)
    print(f"receive one batch of {com['batch']} from a worker: training batch (one uint8 tensor) "
          f"{com['train_batch_ms']:.1f} ms; --decode gpu ({com['jpeg_kb']:.0f} KB JPEGs) a tensor per image "
          f"{com['gpu_per_image_ms']:.1f} ms -> packed {com['gpu_packed_ms']:.1f} ms", flush=True)
    res["draft"] = {"imagenet_like": draft_effect(args, root, args.n_images)}
    if args.large_images:
        big = make_photos(args.cache, args.large_images, args.large_size, 90, args.seed + 1)
        res["draft"]["large"] = draft_effect(args, big, args.large_images)
    for name, d in res["draft"].items():
        print(f"--decode cpu_draft on {name} JPEGs: {d['reduced_pct']:.0f}% of crops reduced, {d['full_img_s']:.1f} -> "
              f"{d['draft_img_s']:.1f} img/s ({d['draft_x']:.2f}x), reduced crops differ by "
              f"{d['mean_abs_diff_reduced']:.2f} levels on average", flush=True)
    if args.epoch_images:
        eroot = make_photos(args.cache, args.epoch_images, args.jpeg_size, args.quality, args.seed + 2)
        res["epoch"] = ep = epoch(args, eroot)
        print_table([{"loaders": k, **ep[k]} for k in ("today", "ours")],
                    [("loaders", "loaders"), ("features_s", "features s"), ("clustering_s", "clustering s"),
                     ("training_s", "training s"), ("epoch_s", "epoch s"), ("load", "load")],
                    title=f"\none epoch, AlexNet-Sobel@{args.size}, {ep['images']} JPEGs, {args.workers} workers "
                          f"(the cache's first pass: {ep['write_features_s']:.1f} s)")
        print(f"epoch {ep['epoch_x']:.2f}x (features {ep['features_x']:.2f}x, training {ep['training_x']:.2f}x)")
    res["flops_per_image"] = flops = alexnet_flops(args.size)
    res["projection"] = proj = project(args, feat, train, flops)
    print_table(proj, [("gpus", "GPUs"), ("loaders", "loaders"), ("workers", "workers"),
                       ("features_min", "features min"), ("features_bound", "bound"),
                       ("training_min", "training min"), ("training_bound", "bound"), ("epoch_min", "epoch min"),
                       ("gpu_only_min", "GPU alone min")],
                title=f"\nprojected ImageNet epoch ({IMAGENET_N:,} images, clustering left out), "
                      f"{args.cores_per_gpu} cores per GPU at this machine's per-core rates, GPU at "
                      f"{args.gpu_tflops:g} TFLOP/s (assumed; AlexNet-Sobel {flops['features'] / 1e9:.2f} GFLOP "
                      f"per image forward, {flops['training'] / 1e9:.2f} forward + backward), cache read <= "
                      f"{args.disk_gbs:g} GB/s per GPU")
    res["load_end"] = round(os.getloadavg()[0], 2)
    print(f"load at the end: {res['load_end']}")
    payload = {"benchmark": "loader", "config": vars(args), "env": env, **res}
    write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    parser = get_args_parser()
    a = parser.parse_args()
    check(a, parser)
    main(a)
