"""Benchmark of images per second: feature extraction and training, AlexNet-Sobel (or VGG-16, ResNet-50).

Two input modes, timed in the same run against the original's loop:

  memory   batches already in memory as normalised float tensors (model cost only)
  jpeg     a folder of JPEG files of ImageNet-like size (500x375, generated once into --cache)
           through the full data pipeline (decode, resize/crop, normalise, model)

Baseline (= the original's loop): float32, contiguous NCHW, no compilation, PIL decoding and
torchvision transforms in DataLoader workers, the same batch size and workers.
Ours: the speed-ups given as flags (--channels_last, --bf16, --compile), with the same data
pipeline as the original. Each speed-up is timed alone and all together.
The 'jpeg' mode also times the loader alone, to say which stage bounds the pipeline.

    python benchmarks/bench_throughput.py                    # quick CPU default (batch 16, 3 batches)
    python benchmarks/bench_throughput.py --arch vgg16 --batch 8 --batches 2
    python benchmarks/bench_throughput.py --arch resnet50 --no_sobel --modes memory --batch 8 --batches 2
    python benchmarks/bench_throughput.py --batch 256 --batches 20 --workers 8 --compile   # GPU
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (PeakRSS, autocast, environment, maybe_compile, pick_device, print_table, sync,  # noqa: E402
                     write_json)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import clustering  # noqa: E402
import data  # noqa: E402
import models  # noqa: E402


def get_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=models.ARCHS, default="alexnet")
    p.add_argument("--no_sobel", action="store_true", help="RGB input instead of the Sobel block")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--batches", type=int, default=3, help="timed batches per measurement")
    p.add_argument("--warmup", type=int, default=1, help="untimed batches first")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--k", type=int, default=1000, help="top layer width for training")
    p.add_argument("--modes", default="memory,jpeg", help="comma list of memory,jpeg")
    p.add_argument("--stages", default="extract,train", help="comma list of extract,train")
    p.add_argument("--channels_last", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: on for CUDA and for CPUs with bf16 instructions)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False, help="torch.compile")
    p.add_argument("--individual", action=argparse.BooleanOptionalAction, default=True,
                   help="also time each speed-up alone (else only the original and all combined)")
    p.add_argument("--n_images", type=int, default=None,
                   help="JPEG files to generate/use (default batch * (batches + warmup))")
    p.add_argument("--jpeg_size", default="500x375", help="WxH of the generated JPEGs")
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "deepcluster_bench"))
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    args.modes = [m for m in args.modes.split(",") if m]
    args.stages = [s for s in args.stages.split(",") if s]
    if args.n_images is None:
        args.n_images = args.batch * (args.batches + args.warmup)
    return args


# ---------------------------------------------------------------------------------------
def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # pragma: no cover
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def make_jpeg_folder(cache: str, n: int, wh: str, seed: int = 0) -> str:
    """n JPEGs of size WxH (quality 90) with natural-image-like content, generated once."""
    from PIL import Image, ImageFilter
    w, h = (int(v) for v in wh.lower().split("x"))
    root = Path(cache) / f"jpeg_{w}x{h}_{n}"
    stamp = root / ".complete"
    if stamp.exists():
        return str(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(seed)
    for i in range(n):
        # smooth colour field + mid-frequency texture + fine noise: JPEG sizes like photos (~50-150 KB)
        base = Image.fromarray((rng.rand(h // 32 + 1, w // 32 + 1, 3) * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC)
        tex = Image.fromarray((rng.rand(h // 4, w // 4, 3) * 255).astype(np.uint8)).resize((w, h), Image.BILINEAR)
        arr = 0.6 * np.asarray(base, np.float32) + 0.3 * np.asarray(tex, np.float32) + rng.randn(h, w, 3) * 12
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).filter(ImageFilter.SMOOTH).save(
            root / f"img_{i:06d}.jpg", quality=90)
    stamp.write_text(f"{n}\n")
    return str(root)


class Variant:
    def __init__(self, name: str, channels_last=False, bf16=False, compile=False):
        self.name, self.channels_last, self.bf16, self.compile = name, channels_last, bf16, compile


def variants(args, mode: str) -> list[Variant]:
    out = [Variant("original")]
    flags = [("channels_last", args.channels_last), ("bf16", args.bf16), ("compile", args.compile)]
    on = [f for f, v in flags if v]
    if len(on) > 1 and args.individual:
        out += [Variant(f, **{f: True}) for f in on]
    if on:
        out.append(Variant("ours(" + "+".join(on) + ")", **{f: True for f in on}))
    return out


def build(args, v: Variant, device: torch.device):
    torch.manual_seed(args.seed)
    model = models.build_model(args.arch, sobel=not args.no_sobel, bn=True, out=args.k, input_size=args.size).to(device)
    if v.channels_last:
        models.to_channels_last(model)
    opt = torch.optim.SGD(model.body_parameters(), lr=0.05, momentum=0.9, weight_decay=1e-5)
    top_opt = torch.optim.SGD(model.top_layer.parameters(), lr=0.05, weight_decay=1e-5)
    fwd = maybe_compile(model, v.compile)
    feat = maybe_compile(model.forward_features, v.compile)
    return model, fwd, feat, opt, top_opt


def step_fn(stage: str, args, v: Variant, device, model, fwd, feat, opt, top_opt):
    crit = nn.CrossEntropyLoss()

    def extract(imgs, labels):
        with torch.no_grad(), autocast(device, v.bf16):
            out = feat(imgs)
        return out.float()

    def train(imgs, labels):
        with autocast(device, v.bf16):
            loss = crit(fwd(imgs), labels)
        opt.zero_grad(set_to_none=True)
        top_opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        top_opt.step()
        return loss

    if stage == "extract":
        model.eval()
        return extract
    model.train()
    return train


def timed_loop(batches, fn, device, warmup: int):
    """Run fn over an iterable of (imgs, labels); the first ``warmup`` batches are untimed.
    Returns (images timed, seconds, seconds spent waiting for the next batch)."""
    n_img, waited, t_start, i = 0, 0.0, None, 0
    if warmup == 0:
        sync(device)
        t_start = time.perf_counter()
    it = iter(batches)
    while True:
        t_w = time.perf_counter()
        try:
            imgs, labels = next(it)
        except StopIteration:
            break
        if i >= warmup:
            waited += time.perf_counter() - t_w
            n_img += imgs.shape[0]
        fn(imgs, labels)
        i += 1
        if i == warmup:
            sync(device)
            t_start = time.perf_counter()
    sync(device)
    return n_img, (time.perf_counter() - t_start) if t_start is not None else 0.0, waited


def memory_batches(args, v: Variant, device, n: int):
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=g).to(device)
    y = torch.randint(0, args.k, (args.batch,), generator=g).to(device)
    if v.channels_last:
        x = models.to_channels_last(x)
    for _ in range(n):
        yield x, y


def jpeg_batches(args, v: Variant, device, root: str, stage: str):
    """The original pipeline: PIL decoding and torchvision transforms in DataLoader workers."""
    ds = data.IndexedImageFolder(root, transform=data.eval_transform(args.size))
    n = len(ds)
    labels = np.random.RandomState(args.seed).randint(0, args.k, n)
    g = torch.Generator().manual_seed(args.seed)
    sampler = torch.randperm(n, generator=g).tolist() if stage == "train" else None
    if stage == "train":
        ds = clustering.ReassignedDataset(labels, ds, data.train_transform(args.size))
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch, sampler=sampler, num_workers=args.workers,
                                         pin_memory=device.type == "cuda")
    for item in loader:
        imgs = item[0].to(device, non_blocking=True)
        lab = item[1].to(device) if stage == "train" else torch.as_tensor(labels[item[1].numpy()]).to(device)
        if v.channels_last:
            imgs = models.to_channels_last(imgs)
        yield imgs, lab


# ---------------------------------------------------------------------------------------
def main(argv=None) -> dict:
    args = get_args(argv)
    device = pick_device(args.device)
    if args.bf16 is None:
        args.bf16 = device.type == "cuda" or cpu_has_bf16()
    env = environment(device)
    name = f"{args.arch}{'' if args.no_sobel else '-Sobel'}@{args.size}"
    print(f"throughput: {name}, batch {args.batch}, {args.batches} timed batches (+{args.warmup} warm-up), "
          f"{args.workers} workers, device {device}, {env['cpu']} ({env['cpu_cores']} cores), "
          f"load {env['loadavg_1min_at_start']}", flush=True)
    rows = []
    root = None
    if "jpeg" in args.modes:
        t = time.perf_counter()
        root = make_jpeg_folder(args.cache, args.n_images, args.jpeg_size, args.seed)
        print(f"JPEG folder {root} ready in {time.perf_counter() - t:.1f}s", flush=True)

    for mode in args.modes:
        if mode == "jpeg":  # the loader alone: decode + augment, no model
            for v in [Variant("original")]:
                for stage in args.stages:
                    with PeakRSS(device) as mem:
                        n, sec, _ = timed_loop(jpeg_batches(args, v, device, root, stage), lambda a, b: None,
                                               device, args.warmup)
                    rows.append({"mode": "jpeg", "stage": f"{stage}:loader", "variant": v.name, "images": n,
                                 "seconds": sec, "img_s": n / sec if sec else None, "rss_peak_mb": mem.peak_mb,
                                 "gpu_peak_mb": mem.gpu_peak_mb, "load_wait_s": None})
                    print(f"  {mode:6s} {stage + ':loader':14s} {v.name:28s} {rows[-1]['img_s'] or 0:8.1f} img/s",
                          flush=True)
        for v in variants(args, mode):
            for stage in args.stages:
                model, fwd, feat, opt, top_opt = build(args, v, device)
                fn = step_fn(stage, args, v, device, model, fwd, feat, opt, top_opt)
                src = (memory_batches(args, v, device, args.batches + args.warmup) if mode == "memory"
                       else jpeg_batches(args, v, device, root, stage))
                try:
                    with PeakRSS(device) as mem:
                        n, sec, waited = timed_loop(src, fn, device, args.warmup)
                    err = None
                except Exception as e:  # e.g. torch.compile without a working compiler
                    n, sec, waited, err = 0, 0.0, None, f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
                rows.append({"mode": mode, "stage": stage, "variant": v.name, "images": n, "seconds": sec,
                             "img_s": n / sec if sec else None, "rss_peak_mb": mem.peak_mb if err is None else None,
                             "gpu_peak_mb": mem.gpu_peak_mb if err is None else None,
                             "load_wait_s": waited, "error": err})
                print(f"  {mode:6s} {stage:14s} {v.name:28s} "
                      f"{(rows[-1]['img_s'] or 0):8.1f} img/s{'  ' + err if err else ''}", flush=True)
                del model, fwd, feat, opt, top_opt

    base = {(r["mode"], r["stage"]): r["img_s"] for r in rows if r["variant"] == "original"}
    for r in rows:
        b = base.get((r["mode"], r["stage"]))
        r["ratio_vs_original"] = r["img_s"] / b if (b and r["img_s"]) else None
    text = print_table(rows, [("mode", "mode"), ("stage", "stage"), ("variant", "variant"), ("images", "images"),
                              ("seconds", "seconds"), ("img_s", "img/s"), ("ratio_vs_original", "x original"),
                              ("load_wait_s", "wait data s"), ("rss_peak_mb", "RSS MB"), ("gpu_peak_mb", "GPU MB")],
                       title=f"\nthroughput, {name}, batch {args.batch}, device {device}")
    bounds = bottlenecks(rows, args.stages)
    for line in bounds:
        print(line)
    verdicts = targets(rows, device)
    for line in verdicts:
        print(line)
    payload = {"benchmark": "throughput", "config": vars(args), "model": name, "env": env, "rows": rows,
               "bounds": bounds, "targets": verdicts, "table": text}
    write_json(args.out, payload)
    return payload


def _get(rows, mode, stage, variant_prefix):
    for r in rows:
        if r["mode"] == mode and r["stage"] == stage and r["variant"].startswith(variant_prefix) and r["img_s"]:
            return r
    return None


def bottlenecks(rows, stages) -> list[str]:
    """Which stage bounds the JPEG pipeline: the loader alone vs the model alone (memory)."""
    out = []
    for stage in stages:
        for prefix in ("original", "ours"):
            pipe = _get(rows, "jpeg", stage, prefix)
            model = _get(rows, "memory", stage, prefix)
            ld = _get(rows, "jpeg", f"{stage}:loader", "original")
            if not (pipe and model and ld):
                continue
            which = "data loading (decode + augment)" if ld["img_s"] < model["img_s"] else "the model (compute)"
            out.append(f"{stage} [{prefix}]: pipeline {pipe['img_s']:.1f} img/s; loader alone {ld['img_s']:.1f}, "
                       f"model alone {model['img_s']:.1f} -> bounded by {which}")
    return out


def targets(rows, device) -> list[str]:
    out = []
    for mode, stage, need in (("memory", "train", 3.0), ("jpeg", "train", 2.0)):
        o, u = _get(rows, mode, stage, "original"), _get(rows, mode, stage, "ours")
        if not (o and u):
            continue
        r = u["img_s"] / o["img_s"]
        where = "GPU target" if device.type == "cuda" else "GPU target (measured on CPU, not applicable)"
        out.append(f"{where} '{stage} from {mode} >= {need:g}x the original loop': {r:.2f}x "
                   f"({'met' if r >= need else f'short by {need / r:.2f}x'})")
    return out


if __name__ == "__main__":
    main()
