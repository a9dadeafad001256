"""Pieces shared by the visualisation scripts: loading a model cut at a conv layer, turning
tensors into pictures, contact sheets (device choice: ``distributed.select_device``; the CLI wrapper: ``cli.run_cli``)."""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

import checkpoint  # noqa: E402
import data  # noqa: E402
import errors  # noqa: E402
import models  # noqa: E402


class VisuError(errors.ScriptError):
    """A visualisation cannot run (missing file, bad flag value...); the message says why."""


# ---------------------------------------------------------------------------------------
# devices and models
# ---------------------------------------------------------------------------------------
def load_trunk(path: str | Path | None, arch: str | None, conv: int | str,
               relu: bool = True) -> tuple[nn.Module, models.Trunk]:
    """(model, trunk): a checkpoint loaded by ``checkpoint.load_model`` and frozen (eval mode, no
    parameter gradients), and ``model.trunk(conv, relu)``, the network up to that layer.

    An out-of-range ``conv`` becomes a :class:`VisuError` naming the flag.
    """
    model = freeze(checkpoint.load_model(str(path) if path else None, arch=arch))
    try:
        trunk = model.trunk(conv, relu=relu)
    except models.ProbeError as e:
        raise VisuError(f"--conv {e}") from None
    return model, trunk


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode (BN running statistics, no dropout) and no parameter gradients."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def add_model_args(p: argparse.ArgumentParser, verb: str) -> argparse._ArgumentGroup:
    """The "model" flags both visualisations share (--model, --arch, --conv, --filters)."""
    g = p.add_argument_group("model")
    g.add_argument("--model", type=str, default="", help="Model (checkpoint path)")
    g.add_argument("--arch", type=str, choices=models.ARCHS, default=None,
                   help="arch (inferred from the checkpoint when omitted; checked when given)")
    g.add_argument("--conv", type=int, default=1,
                   help="convolutional layer (1-based; ResNet-50: 1..6 = conv1, layer1..layer4, avgpool)")
    g.add_argument("--filters", type=str, default="",
                   help=f"filters to {verb}, e.g. '0,5,9' or '0-15'; empty: all of the layer")
    return g


def parse_filters(spec: str | None, n_filters: int) -> list[int]:
    """``None``/"" -> all filters; "0,5,9" and ranges "0-15" (inclusive) also accepted."""
    if not spec:
        return list(range(n_filters))
    out: list[int] = []
    try:
        for part in spec.split(","):
            part = part.strip()
            if not part:
                continue
            if "-" in part:
                a, b = part.split("-", 1)
                out.extend(range(int(a), int(b) + 1))
            else:
                out.append(int(part))
    except ValueError:
        raise VisuError(f"--filters {spec!r}: expected indices like '0,3,7' or '0-15'") from None
    bad = [f for f in out if not 0 <= f < n_filters]
    if bad:
        raise VisuError(f"--filters: {bad[:5]} out of range, the layer has filters 0..{n_filters - 1}")
    if not out:
        raise VisuError(f"--filters {spec!r} selects no filter")
    return sorted(set(out))


# ---------------------------------------------------------------------------------------
# pictures
# ---------------------------------------------------------------------------------------
_MEAN = torch.tensor(data.IMAGENET_MEAN).view(3, 1, 1)
_STD = torch.tensor(data.IMAGENET_STD).view(3, 1, 1)


def deprocess(x: torch.Tensor) -> Image.Image:
    """(3, H, W) ImageNet-normalised tensor -> RGB picture (normalisation undone, clipped)."""
    x = x.detach().float().cpu() * _STD + _MEAN
    arr = (x.clamp(0, 1).permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8)
    return Image.fromarray(arr, mode="RGB")


def contact_sheet(images: Sequence[Image.Image], ncols: int | None = None, tile: int | None = None,
                  pad: int = 2, labels: Sequence[str] | None = None,
                  background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Lay ``images`` out on a grid (row-major), each resized to ``tile`` x ``tile`` px.

    ``ncols`` defaults to a near-square grid; ``labels`` are written in each tile's corner.
    """
    if not images:
        raise ValueError("contact_sheet: no images")
    n = len(images)
    ncols = ncols or int(math.ceil(math.sqrt(n)))
    nrows = int(math.ceil(n / ncols))
    tile = tile or max(im.size[0] for im in images)
    sheet = Image.new("RGB", (ncols * (tile + pad) + pad, nrows * (tile + pad) + pad), background)
    draw = ImageDraw.Draw(sheet)
    for i, im in enumerate(images):
        r, c = divmod(i, ncols)
        x0, y0 = pad + c * (tile + pad), pad + r * (tile + pad)
        if im.size != (tile, tile):
            im = im.resize((tile, tile), Image.BILINEAR)
        sheet.paste(im.convert("RGB"), (x0, y0))
        if labels is not None and labels[i]:
            tw = 6 * len(labels[i]) + 2
            draw.rectangle([x0, y0, x0 + tw, y0 + 11], fill=(0, 0, 0))
            draw.text((x0 + 1, y0), labels[i], fill=(255, 255, 0))
    return sheet


def tile_picture(path: str, size: int, crop: float = 1.0) -> Image.Image:
    """An image file as a ``size`` px square: shorter side resized to ``size / crop``, then
    centre-cropped (``crop=224/256`` shows what the evaluation transform feeds the network)."""
    img = data.load_rgb(path)
    w, h = img.size
    s = size / crop / min(w, h)
    img = img.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BILINEAR)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))
