"""Filter visualisation by gradient ascent (Yosinski et al. 2015, as in DeepCluster).

For every filter of one conv layer, start from noise and climb the filter's spatial mean
activation *against the other filters of the layer*: the loss is the cross-entropy between
the layer's channel means (as logits) and the filter, plus a weight decay on the image. Each
step moves the image by ``lr`` along the L2-normalised gradient; every ``step`` iterations
the image is blurred (Gaussian, ``sig``). Images are optimised in ImageNet-normalised space
and saved with the normalisation undone and clipped to [0, 1].

Usage:
    python visu/gradient_ascent.py --model exp/checkpoint.pth.tar --conv 1 --exp visu_conv1
    python visu/gradient_ascent.py --model vgg16.pth --arch vgg16 --conv 10 --filters 0-15 \\
        --niter 3000 --lr 30 --exp visu_vgg_conv10
    ./visu/gradient_ascent.sh            # the same with MODEL/ARCH/CONV/EXP variables

Writes ``EXP/conv{CONV}/filter_{i:04d}.png`` per filter, the contact sheet
``EXP/conv{CONV}_filters.png`` and ``EXP/conv{CONV}_summary.json`` (start and final mean
activation of each filter and whether it ended as the layer's most active channel).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from visu import common  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Gradient ascent visualisation",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = common.add_model_args(p, "draw")
    g.add_argument("--pre_relu", action="store_true",
                   help="climb the responses before the layer's ReLU (a filter silent everywhere on "
                        "the starting noise gets no gradient after the ReLU)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=float, default=3.0, help="learning rate (step length per iteration)")
    g.add_argument("--wd", type=float, default=1e-5, help="weight decay on the image (the original's 10^-5)")
    g.add_argument("--sig", type=float, default=0.3, help="gaussian blur sigma (0: no blur)")
    g.add_argument("--step", type=int, default=5, help="number of iter between gaussian blurs")
    g.add_argument("--niter", type=int, default=1000, help="total number of iterations")
    g.add_argument("--idim", type=int, default=224, help="size of input image")
    g.add_argument("--init_std", type=float, default=1.0,
                   help="standard deviation of the starting noise (normalised space)")

    g = p.add_argument_group("run")
    g.add_argument("--exp", type=str, default="visu_gradient_ascent", help="path to res")
    g.add_argument("--batch", type=int, default=32,
                   help="filters optimised together (independent images; only speed changes)")
    g.add_argument("--device", type=str, default="auto", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--seed", type=int, default=31, help="random seed of the starting noise")
    g.add_argument("--sheet_tile", type=int, default=0,
                   help="tile size in the contact sheet (0: idim, at most 128)")
    g.add_argument("--no_progress", action="store_true", help="no progress bars")
    return p


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Blur each channel of (B, C, H, W) with a Gaussian of std ``sigma`` px (reflect padding)."""
    if sigma <= 0:
        return x
    radius = min(max(1, int(math.ceil(3.0 * sigma))), min(x.shape[-2:]) - 1)  # reflect needs < size
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    x = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1).contiguous(), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1).contiguous(), groups=c)


def channel_means(trunk: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, C) spatial mean activation of each filter of the trunk's layer."""
    return trunk(x).mean(dim=(2, 3))


def ascend(trunk: torch.nn.Module, filters: list[int], idim: int = 224, niter: int = 1000,
           lr: float = 3.0, wd: float = 1e-5, sig: float = 0.3, step: int = 5, init_std: float = 1.0,
           device: torch.device | str = "cpu", generator: torch.Generator | None = None,
           x0: torch.Tensor | None = None, on_step: Callable[[], object] | None = None) -> torch.Tensor:
    """Optimise one image per filter in ``filters`` (all together, independently).

    Minimises ``CE(channel_means(x_b), filters[b]) + wd * ||x_b||^2`` for each image b by
    ``x_b <- x_b - lr * g_b / ||g_b||`` and blurs every ``step`` iterations. Starts from
    ``x0`` when given, else Gaussian noise of std ``init_std``. ``on_step`` is called after
    each iteration (progress bars). Returns (B, 3, idim, idim) normalised images on ``device``.
    """
    device = torch.device(device)
    target = torch.as_tensor(filters, dtype=torch.long, device=device)
    if x0 is not None:
        x = x0.detach().to(device=device, dtype=torch.float32).clone()
    else:
        noise = torch.randn(len(filters), 3, idim, idim, generator=generator)
        x = (noise * init_std).to(device)
    for it in range(niter):
        x.requires_grad_(True)
        logits = channel_means(trunk, x)
        loss = F.cross_entropy(logits, target, reduction="sum") + wd * x.pow(2).sum()
        (grad,) = torch.autograd.grad(loss, x)
        with torch.no_grad():
            norm = grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
            x = x.detach() - lr * grad / norm
            if step > 0 and (it + 1) % step == 0:
                x = gaussian_blur(x, sig)
        if on_step is not None:
            on_step()
    return x.detach()


@torch.no_grad()
def target_stats(trunk: torch.nn.Module, x: torch.Tensor, filters: list[int]) -> dict[str, list]:
    """Mean activation of each target filter, its softmax share and whether it is the top channel."""
    m = channel_means(trunk, x)
    idx = torch.arange(len(filters), device=m.device)
    t = torch.as_tensor(filters, device=m.device)
    return {"activation": m[idx, t].tolist(),
            "share": torch.softmax(m, dim=1)[idx, t].tolist(),
            "is_top": (m.argmax(dim=1) == t).tolist()}


def main(args: argparse.Namespace) -> dict:
    """Draw the filters of ``args.conv``; returns the summary written next to the images."""
    for flag, ok in (("--niter", args.niter >= 0), ("--idim", args.idim >= 16), ("--lr", args.lr > 0),
                     ("--step", args.step >= 0), ("--sig", args.sig >= 0), ("--batch", args.batch >= 1)):
        if not ok:
            raise common.VisuError(f"invalid value for {flag}: {getattr(args, flag[2:])!r}")
    device = common.select_device(args.device)
    model, trunk = common.load_trunk(args.model, args.arch, args.conv, relu=not args.pre_relu)
    trunk.to(device)
    filters = common.parse_filters(args.filters, trunk.n_filters)
    try:
        with torch.no_grad():
            trunk(torch.zeros(1, 3, args.idim, args.idim, device=device))
    except RuntimeError as e:
        raise common.VisuError(f"--idim {args.idim} is too small for conv{args.conv} of "
                               f"{model.arch}: {str(e).splitlines()[0]}") from None

    out = Path(args.exp)
    fdir = out / f"conv{args.conv}"
    fdir.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(args.seed)
    summary: dict = {"model": str(args.model), "arch": model.arch, "sobel": model.use_sobel,
                     "conv": args.conv, "lr": args.lr, "wd": args.wd, "sig": args.sig, "step": args.step,
                     "niter": args.niter, "idim": args.idim, "pre_relu": args.pre_relu, "filters": {}}
    pictures = []
    batches = [filters[i:i + args.batch] for i in range(0, len(filters), args.batch)]
    bar = tqdm(total=len(batches) * args.niter, desc=f"conv{args.conv}: {len(filters)} filters",
               unit="it", disable=args.no_progress)
    for fb in batches:
        x0 = torch.randn(len(fb), 3, args.idim, args.idim, generator=gen) * args.init_std
        start = target_stats(trunk, x0.to(device), fb)
        x = ascend(trunk, fb, idim=args.idim, niter=args.niter, lr=args.lr, wd=args.wd, sig=args.sig,
                   step=args.step, device=device, x0=x0, on_step=bar.update)
        end = target_stats(trunk, x, fb)
        for j, f in enumerate(fb):
            pic = common.deprocess(x[j])
            pic.save(fdir / f"filter_{f:04d}.png")
            pictures.append(pic)
            summary["filters"][str(f)] = {"start_activation": start["activation"][j],
                                          "final_activation": end["activation"][j],
                                          "final_share": end["share"][j], "is_top": end["is_top"][j]}
    bar.close()

    tile = args.sheet_tile or min(args.idim, 128)
    sheet = common.contact_sheet(pictures, tile=tile, labels=[str(f) for f in filters])
    sheet.save(out / f"conv{args.conv}_filters.png")
    (out / f"conv{args.conv}_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    n_top = sum(v["is_top"] for v in summary["filters"].values())
    dead = [f for f, v in summary["filters"].items() if v["final_activation"] <= 0]
    if dead and not args.pre_relu:
        print(f"warning: {len(dead)} filter(s) stayed silent (e.g. {', '.join(dead[:8])}): no gradient "
              f"reaches a filter that is zero everywhere after its ReLU; try --pre_relu", file=sys.stderr)
    print(f"conv{args.conv}: {len(filters)} filters drawn into {fdir}/, contact sheet "
          f"{out / f'conv{args.conv}_filters.png'}; {n_top}/{len(filters)} end as the layer's top channel")
    return summary


if __name__ == "__main__":
    sys.exit(common.run_cli(main, get_args_parser()))
