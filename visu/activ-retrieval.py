"""Top images per filter: for each filter of one conv layer, the ``--count`` images of a
dataset with the highest spatial mean activation (after the layer's ReLU).

Images go through the evaluation transform (resize, centre crop to ``--size``, ImageNet
normalisation); the pictures show that crop. The dataset is an image folder, with or
without class folders.

Usage:
    python visu/activ-retrieval.py --model exp/checkpoint.pth.tar --conv 5 --data DIR --exp top9
    python visu/activ-retrieval.py --model vgg16.pth --arch vgg16 --conv 13 --data DIR \\
        --count 9 --filters 0-63 --exp top9_vgg
    ./visu/activ-retrieval.sh            # the same with MODEL/ARCH/CONV/DATA/EXP variables

Writes ``EXP/conv{CONV}/filter_{i:04d}.png`` (a grid of the filter's top images, best first,
row-major), the contact sheet ``EXP/conv{CONV}_top{COUNT}.png`` (one block per filter) and
``EXP/conv{CONV}_top{COUNT}.json`` (image paths and scores per filter).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Iterable

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from visu import common  # noqa: E402
import cli  # noqa: E402
import data  # noqa: E402  (on sys.path once visu.common is imported)
import distributed  # noqa: E402
import preempt  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Retrieve the images that maximally activate each filter",
                                formatter_class=cli.HelpFormatter)
    common.add_model_args(p, "show")

    g = p.add_argument_group("data")
    g.add_argument("--data", type=str, default="", help="path to dataset (an image folder)")
    g.add_argument("--count", type=int, default=9, help="number of images per filter")
    g.add_argument("--bad_images", choices=["error", "skip"], default="error",
                   help="unreadable images (all checked first): stop naming them, or rank without them")
    g.add_argument("--size", type=int, default=0,
                   help="network input size (0: the model's training size, 224 for released models)")

    g = p.add_argument_group("run")
    g.add_argument("--exp", type=str, default="visu_activ_retrieval", help="path to res")
    g.add_argument("--batch", type=int, default=64, help="mini-batch size")
    g.add_argument("--workers", type=int, default=2, help="number of data loading workers")
    g.add_argument("--device", type=str, default="auto", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--tile", type=int, default=96, help="size of one image in the pictures (px)")
    g.add_argument("--no_progress", action="store_true", help="no progress bars")
    return p


def merge_topk(best_val: torch.Tensor, best_idx: torch.Tensor, val: torch.Tensor, idx: torch.Tensor,
               count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge running (C, <=count) top lists with a new (C, B) block; ties keep the lower index.

    ``idx`` holds dataset indices larger than any in ``best_idx`` (images come in order), so
    a stable descending sort of the concatenation keeps the earlier image first on ties.
    """
    allv = torch.cat([best_val, val], dim=1)
    alli = torch.cat([best_idx, idx], dim=1)
    order = torch.sort(allv, dim=1, descending=True, stable=True).indices[:, :count]
    return allv.gather(1, order), alli.gather(1, order)


@torch.no_grad()
def top_images(trunk: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
               count: int = 9, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Scan ``(images, dataset_indices)`` batches in dataset order; for each filter of the
    trunk's layer return the ``count`` best (scores, indices), each (C, count), best first."""
    device = torch.device(device)
    best_val = best_idx = None
    for x, idx in batches:
        means = trunk(x.to(device, non_blocking=True)).mean(dim=(2, 3)).float().t()  # (C, B)
        idx = idx.to(device).view(1, -1).expand_as(means)
        if best_val is None:
            best_val = means.new_empty((means.shape[0], 0))
            best_idx = idx.new_empty((means.shape[0], 0))
        best_val, best_idx = merge_topk(best_val, best_idx, means, idx, count)
    if best_val is None:
        raise common.VisuError("the dataset yielded no image")
    return best_val.cpu(), best_idx.cpu()


def main(args: argparse.Namespace) -> dict:
    """Find and draw each filter's top images; returns {filter: [(path, score), ...]}."""
    if args.count < 1:
        raise common.VisuError(f"invalid value for --count: {args.count!r} (must be >= 1)")
    for flag, ok in (("--batch", args.batch >= 1), ("--workers", args.workers >= 0), ("--tile", args.tile >= 8),
                     ("--size", args.size == 0 or args.size >= 16)):
        if not ok:
            raise common.VisuError(f"invalid value for {flag}: {getattr(args, flag[2:])!r}")
    if not args.data:
        raise common.VisuError("no dataset given: pass --data DIR (an image folder)")
    cli.check_writable(args.exp)  # before the pass over the whole dataset
    device = distributed.select_device(args.device)
    model, trunk = common.load_trunk(args.model, args.arch, args.conv)
    trunk.to(device)
    filters = common.parse_filters(args.filters, trunk.n_filters)
    size = args.size or model.input_size
    try:  # a too small input vanishes inside the conv layers: say so before reading the data
        with torch.no_grad():
            trunk(torch.zeros(1, 3, size, size, device=device))
    except RuntimeError as e:
        raise common.VisuError(f"--size {size} is too small for conv{args.conv} of "
                               f"{model.arch}: {str(e).splitlines()[0]}") from None
    dataset = data.IndexedImageFolder(args.data, transform=data.eval_transform(size))
    bad = data.check_eval_images(dataset.paths, "--data", args.bad_images == "skip", workers=args.workers,
                                 progress=not args.no_progress,
                                 hint="fix or remove them, or add --bad_images skip to rank without them")
    if bad:
        dataset.drop(bad)
    if args.count > len(dataset):
        raise common.VisuError(f"--count {args.count} is larger than the dataset ({len(dataset)} images)")
    loader = DataLoader(dataset, batch_size=args.batch, shuffle=False, num_workers=args.workers,
                        collate_fn=data.default_collate_indexed, pin_memory=device.type == "cuda",
                        worker_init_fn=preempt.loader_worker_init)
    batches = tqdm(loader, desc=f"conv{args.conv} activations", disable=cli.progress(args.no_progress))
    scores, indices = top_images(trunk, batches, args.count, device)

    out = Path(args.exp)
    fdir = out / f"conv{args.conv}"
    fdir.mkdir(parents=True, exist_ok=True)
    ncols = int(math.ceil(math.sqrt(args.count)))
    cache: dict[int, object] = {}
    result: dict = {}
    blocks = []
    for f in tqdm(filters, desc="pictures", disable=cli.progress(args.no_progress)):
        pics = []
        for i in indices[f].tolist():
            if i not in cache:
                cache[i] = common.tile_picture(dataset.paths[i], args.tile, crop=224 / 256)
            pics.append(cache[i])
        block = common.contact_sheet(pics, ncols=ncols, tile=args.tile, pad=1)
        block.save(fdir / f"filter_{f:04d}.png")
        blocks.append(block)
        result[str(f)] = [(dataset.paths[i], s) for i, s in zip(indices[f].tolist(), scores[f].tolist())]
    sheet_tile = max(48, min(block.size[0] for block in blocks) // 2)
    sheet = common.contact_sheet(blocks, tile=sheet_tile, pad=4, labels=[str(f) for f in filters])
    sheet.save(out / f"conv{args.conv}_top{args.count}.png")
    (out / f"conv{args.conv}_top{args.count}.json").write_text(json.dumps(
        {"model": str(args.model), "data": str(args.data), "conv": args.conv, "size": size,
         "count": args.count, "filters": result}, indent=1) + "\n")
    print(f"conv{args.conv}: top {args.count} of {len(dataset)} images for {len(filters)} filters in "
          f"{fdir}/, contact sheet {out / f'conv{args.conv}_top{args.count}.png'}")
    return result


if __name__ == "__main__":
    sys.exit(cli.run_cli(main, get_args_parser()))
