"""The training pass's loader on the CPU workers: RandomResizedCrop + flip as PIL images,
collated straight into one uint8 batch (:class:`CollateCrops`), and ``--decode cpu_draft``
(:class:`DraftCrop`: JPEGs decoded at reduced scale when the crop allows it).

Where a worker's time goes per 500x375 JPEG of ~105 KB (``benchmarks/bench_loader.py``): the
decode is about 2/3, the antialiased resize about 1/5; the crop, the flip, the conversion to a
tensor and the collate are the rest. :class:`CollateCrops` copies each crop once, row-major (H, W,
3) as PIL holds it, into a batch allocated in shared memory, instead of a (3, H, W) tensor per image
stacked with a strided gather; the batch is the (B, 3, H, W) view of that (B, H, W, 3) buffer
(channels-last strides): the same values, which ``data.to_model_input`` lays out as the network
wants on the device.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torchvision import transforms

import data
from gpu_decode import EncodedImage


def train_crops(size: int = 224, min_scale: float = 0.08) -> transforms.Compose:
    """RandomResizedCrop(size, scale=(min_scale, 1)) -> RandomHorizontalFlip, PIL in and out:
    ``data.train_transform(normalize=False)`` without its PILToTensor (:class:`CollateCrops`
    makes the tensor), same draws."""
    return transforms.Compose([transforms.RandomResizedCrop(size, scale=(min_scale, 1.0)),
                               transforms.RandomHorizontalFlip()])


class CollateCrops:
    """``(PIL RGB crop, pseudo_label, index)`` items -> ``((B, 3, S, S) uint8, (B,) labels, (B,)
    indices)``; the images are the channels-last view of one (B, S, S, 3) buffer, in shared memory
    when built in a worker. Values equal to PILToTensor + the default collate's stack."""

    def __call__(self, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        imgs, targets, idx = zip(*batch)
        w, h = imgs[0].size
        out = data.batch_buffer((len(imgs), h, w, 3))
        arr = out.numpy()
        for k, img in enumerate(imgs):
            arr[k] = np.asarray(img)  # (h, w, 3): PIL's own layout, one copy
        return (out.permute(0, 3, 1, 2), torch.as_tensor(targets, dtype=torch.long),
                torch.as_tensor(idx, dtype=torch.long))


class DraftCrop:
    """``--decode cpu_draft``: the training crop of an :class:`gpu_decode.EncodedImage` (header
    only), decoding a JPEG at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling, ``Image.draft``) when
    the crop is at least twice, 4 or 8 times ``size`` on both sides.

    The box and the flip are drawn from the header's size with torchvision's code in
    :func:`train_crops`' order, so for a seed they are the default path's. A crop that is not
    reduced (most crops of a 500x375 image at 224) is bitwise the default path's; a reduced one
    is resampled from the scaled decode over the same region (box / scale, fractional), which
    changes its pixels (measured in ``benchmarks/bench_loader.py``).
    """

    def __init__(self, size: int = 224, min_scale: float = 0.08):
        self.size, self.scale, self.ratio = int(size), (float(min_scale), 1.0), (3.0 / 4.0, 4.0 / 3.0)

    def reduction(self, w: int, h: int) -> int:
        """The libjpeg scale denominator for a crop of w x h pixels: the largest of 8, 4, 2 that
        leaves both sides >= size, else 1."""
        return next((s for s in (8, 4, 2) if w // s >= self.size and h // s >= self.size), 1)

    def __call__(self, img: EncodedImage) -> Image.Image:
        i, j, h, w = transforms.RandomResizedCrop.get_params(img.header, list(self.scale), list(self.ratio))
        flip = bool(torch.rand(1) < 0.5)  # RandomHorizontalFlip(p=0.5)
        s = self.reduction(w, h)
        W, H = img.header.size
        pil = data.load_rgb(img.path, draft=(W // s, H // s) if s > 1 else None)  # PIL then picks scale 1/s
        s = next((c for c in (8, 4, 2) if pil.size == (-(-W // c), -(-H // c))), 1)  # what libjpeg did
        if s == 1:  # decoded in full (a small crop, or not a JPEG): the default path's pixels
            out = transforms.functional.resized_crop(pil, i, j, h, w, [self.size, self.size],
                                                     transforms.InterpolationMode.BILINEAR, antialias=True)
        else:  # libjpeg scaled by s: pixel x of the file is x / s here
            box = (j / s, i / s, (j + w) / s, (i + h) / s)
            out = pil.resize((self.size, self.size), Image.BILINEAR, box=box)
        return transforms.functional.hflip(out) if flip else out
