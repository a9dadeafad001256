"""Filter visualisation by gradient ascent (Yosinski et al. 2015, as in DeepCluster).

For every filter of one conv layer, start from noise and climb the filter's spatial mean
activation *against the other filters of the layer*: the loss is the cross-entropy between
the layer's channel means (as logits) and the filter, plus a weight decay on the image. Each
step moves the image by ``lr`` along the L2-normalised gradient; at iterations 0, ``step``,
2 ``step``... the image is blurred (Gaussian, ``sig``).

The defaults are the original's regime: the start is raw-pixel noise (mean 128, std 20, fed
to the network as it is, without the ImageNet normalisation); while the filter is silent after
its ReLU (spatial mean exactly 0, hence no gradient), that iteration climbs the layer's conv
outputs before BatchNorm instead; the saved picture is contrast-stretched (centred, std 0.1
around grey 0.5, clipped). ``--init_mean 0 --init_std 1 --display unnormalise --fallback 0``
optimises in ImageNet-normalised space and shows the normalisation undone.

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
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from visu import common  # noqa: E402
import cli  # noqa: E402
import distributed  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Gradient ascent visualisation",
                                formatter_class=cli.HelpFormatter)
    g = common.add_model_args(p, "draw")
    g.add_argument("--pre_relu", action="store_true",
                   help="always climb the layer's responses before its ReLU (after BatchNorm) "
                        "instead of after it (no --fallback then)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=float, default=3.0, help="learning rate (step length per iteration)")
    g.add_argument("--wd", type=float, default=1e-5, help="weight decay on the image (the original's 10^-5)")
    g.add_argument("--sig", type=float, default=0.3, help="gaussian blur sigma (0: no blur)")
    g.add_argument("--step", type=int, default=5, help="number of iter between gaussian blurs")
    g.add_argument("--niter", type=int, default=1000, help="total number of iterations")
    g.add_argument("--idim", type=int, default=224, help="size of input image")
    g.add_argument("--init_mean", type=float, default=128.0,
                   help="mean of the starting noise, in the network's input units (the original: "
                        "raw 0-255 pixels, not normalised)")
    g.add_argument("--init_std", type=float, default=20.0, help="standard deviation of the starting noise")
    g.add_argument("--fallback", type=int, choices=[0, 1], default=1,
                   help="1: while the filter is zero everywhere after its ReLU, climb the layer's "
                        "conv outputs before BatchNorm instead (the original); 0: never")
    g.add_argument("--display", choices=["stretch", "unnormalise"], default="stretch",
                   help="stretch: centre each picture, std 0.1 around grey, clip (the original); "
                        "unnormalise: undo the ImageNet normalisation and clip")

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


def _reflect_index(n: int, radius: int, device) -> torch.Tensor:
    """Indices of a length-n axis padded by ``radius`` on each side, mirrored about the edges
    with the edge sample repeated (``d c b a | a b c d | d c b a``, scipy's 'reflect')."""
    idx = torch.arange(-radius, n + radius, device=device) % (2 * n)
    return torch.where(idx >= n, 2 * n - 1 - idx, idx)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Blur each channel of (B, C, H, W) with a Gaussian of std ``sigma`` px, as
    ``scipy.ndimage.gaussian_filter`` with its defaults (kernel radius int(4 sigma + 0.5),
    'reflect' borders), which the original applies."""
    if sigma <= 0:
        return x
    radius = int(4.0 * sigma + 0.5)
    if radius == 0:
        return x
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c, (h, w) = x.shape[1], x.shape[-2:]
    x = x.index_select(2, _reflect_index(h, radius, x.device)).index_select(3, _reflect_index(w, radius, x.device))
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1).contiguous(), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1).contiguous(), groups=c)


def contrast_stretch(x: torch.Tensor) -> Image.Image:
    """(3, H, W) image -> RGB picture the original's way: centre, scale to std 0.1 (over all
    channels and pixels), shift to 0.5, clip to [0, 1], times 255, truncated to uint8."""
    x = x.detach().double().cpu()
    x = (x - x.mean()) / (x.std(unbiased=False) + 1e-5) * 0.1 + 0.5
    arr = (x.clamp(0, 1) * 255).permute(1, 2, 0).numpy().astype(np.uint8)
    return Image.fromarray(arr, mode="RGB")


def channel_means(trunk: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, C) spatial mean activation of each filter of the trunk's layer."""
    return trunk(x).mean(dim=(2, 3))


def layer_conv(trunk: torch.nn.Module) -> torch.nn.Conv2d:
    """The conv of the trunk's layer (its last Conv2d): its output comes before BN and ReLU."""
    return [m for m in trunk.modules() if isinstance(m, torch.nn.Conv2d)][-1]


def ascent_logits(trunk: torch.nn.Module, x: torch.Tensor, filters: torch.Tensor, fallback: bool) -> torch.Tensor:
    """(B, C) logits of the cross-entropy: the layer's channel means; with ``fallback``, an
    image whose target filter is zero everywhere after the ReLU uses the channel means of the
    conv outputs before BatchNorm instead (the original's switch, decided per iteration)."""
    if not fallback:
        return channel_means(trunk, x)
    seen: list[torch.Tensor] = []
    hook = layer_conv(trunk).register_forward_hook(lambda m, i, o: seen.append(o))
    try:
        post = channel_means(trunk, x)                      # (B, C)
    finally:
        hook.remove()
    pre = seen[-1].mean(dim=(2, 3))                         # (B, C)
    silent = post.gather(1, filters[:, None]) == 0          # (B, 1)
    return torch.where(silent, pre, post)


def ascend(trunk: torch.nn.Module, filters: list[int], idim: int = 224, niter: int = 1000,
           lr: float = 3.0, wd: float = 1e-5, sig: float = 0.3, step: int = 5, init_std: float = 20.0,
           device: torch.device | str = "cpu", generator: torch.Generator | None = None,
           x0: torch.Tensor | None = None, on_step: Callable[[], object] | None = None,
           init_mean: float = 128.0, fallback: bool = True) -> torch.Tensor:
    """Optimise one image per filter in ``filters`` (all together, independently).

    Minimises ``CE(logits(x_b), filters[b]) + wd * ||x_b||^2`` for each image b by
    ``x_b <- x_b - lr * g_b / (||g_b|| + 1e-8)`` and blurs at iterations 0, step, 2 step...
    (logits: :func:`ascent_logits`). Starts from ``x0`` when given, else Gaussian noise of mean
    ``init_mean`` and std ``init_std``. ``on_step`` is called after each iteration (progress
    bars). Returns (B, 3, idim, idim) images on ``device``.
    """
    device = torch.device(device)
    target = torch.as_tensor(filters, dtype=torch.long, device=device)
    if x0 is not None:
        x = x0.detach().to(device=device, dtype=torch.float32).clone()
    else:
        noise = torch.randn(len(filters), 3, idim, idim, generator=generator)
        x = (noise * init_std + init_mean).to(device)
    for it in range(niter):
        x.requires_grad_(True)
        logits = ascent_logits(trunk, x, target, fallback)
        loss = F.cross_entropy(logits, target, reduction="sum") + wd * x.pow(2).sum()
        (grad,) = torch.autograd.grad(loss, x)
        with torch.no_grad():
            norm = grad.flatten(1).norm(dim=1).view(-1, 1, 1, 1) + 1e-8
            x = x.detach() - lr * grad / norm
            if step > 0 and it % step == 0:
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
                     ("--step", args.step >= 0), ("--sig", args.sig >= 0), ("--batch", args.batch >= 1),
                     ("--seed", 0 <= args.seed < 2**32), ("--sheet_tile", args.sheet_tile >= 0)):
        if not ok:
            raise common.VisuError(f"invalid value for {flag}: {getattr(args, flag[2:])!r}")
    cli.check_writable(args.exp)
    device = distributed.select_device(args.device)
    model, trunk = common.load_trunk(args.model, args.arch, args.conv, relu=not args.pre_relu)
    trunk.to(device)
    fallback = bool(args.fallback) and not args.pre_relu
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
                     "niter": args.niter, "idim": args.idim, "pre_relu": args.pre_relu, "init_mean": args.init_mean,
                     "init_std": args.init_std, "fallback": fallback, "display": args.display, "filters": {}}
    pictures = []
    batches = [filters[i:i + args.batch] for i in range(0, len(filters), args.batch)]
    bar = tqdm(total=len(batches) * args.niter, desc=f"conv{args.conv}: {len(filters)} filters",
               unit="it", disable=cli.progress(args.no_progress))
    for fb in batches:
        x0 = torch.randn(len(fb), 3, args.idim, args.idim, generator=gen) * args.init_std + args.init_mean
        start = target_stats(trunk, x0.to(device), fb)
        x = ascend(trunk, fb, idim=args.idim, niter=args.niter, lr=args.lr, wd=args.wd, sig=args.sig,
                   step=args.step, device=device, x0=x0, on_step=bar.update, fallback=fallback)
        end = target_stats(trunk, x, fb)
        for j, f in enumerate(fb):
            pic = contrast_stretch(x[j]) if args.display == "stretch" else common.deprocess(x[j])
            pic.save(fdir / f"filter_{f:04d}.png")
            pictures.append(pic)
            summary["filters"][str(f)] = {"start_activation": start["activation"][j], "start_share": start["share"][j],
                                          "final_activation": end["activation"][j],
                                          "final_share": end["share"][j], "is_top": end["is_top"][j]}
    bar.close()

    tile = args.sheet_tile or min(args.idim, 128)
    sheet = common.contact_sheet(pictures, tile=tile, labels=[str(f) for f in filters])
    sheet.save(out / f"conv{args.conv}_filters.png")
    (out / f"conv{args.conv}_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    n_top = sum(v["is_top"] for v in summary["filters"].values())
    dead = [f for f, v in summary["filters"].items() if v["final_activation"] <= 0]
    if dead and fallback:
        print(f"note: {len(dead)} filter(s) end silent after their ReLU (e.g. {', '.join(dead[:8])}); "
              f"they were climbed on their conv output before BatchNorm", file=sys.stderr)
    elif dead and not args.pre_relu:
        print(f"warning: {len(dead)} filter(s) stayed silent (e.g. {', '.join(dead[:8])}): no gradient "
              f"reaches a filter that is zero everywhere after its ReLU; try --fallback 1 or --pre_relu",
              file=sys.stderr)
    print(f"conv{args.conv}: {len(filters)} filters drawn into {fdir}/, contact sheet "
          f"{out / f'conv{args.conv}_filters.png'}; {n_top}/{len(filters)} end as the layer's top channel")
    return summary


if __name__ == "__main__":
    sys.exit(cli.run_cli(main, get_args_parser()))
