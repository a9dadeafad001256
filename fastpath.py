"""Optional speed and memory fast paths for DeepCluster (issue 5).

Everything here is opt-in; the default pipeline (float32, PIL decoding in DataLoader
workers, contiguous tensors, no compilation) stays the reference. One code path serves CPU
and CUDA: the device decides where the work lands.

* :func:`to_channels_last`, :func:`autocast`, :func:`maybe_compile`: model/tensor speed-ups.
* :class:`FeatureStore`: the (N, 4096) feature matrix written batch by batch by dataset
  index, on the host or kept on the GPU, in float32 / float16 / bfloat16.
* :func:`gpu_decode_loader`: JPEG bytes read by DataLoader workers, decoded on the GPU with
  ``torchvision.io.decode_jpeg(device='cuda')`` and augmented there (on CPU the same loader
  decodes with libjpeg-turbo through ``torchvision.io`` in the workers).
* :func:`memory_snapshot`: peak host RSS and peak GPU memory.
"""
from __future__ import annotations

import contextlib
import os
import resource
import sys
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

FEATURE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

__all__ = ["to_channels_last", "autocast", "maybe_compile", "FeatureStore", "feature_dtype",
           "EncodedImageDataset", "gpu_decode_loader", "DecodedLoader", "eval_geometry",
           "train_geometry", "normalize_batch", "memory_snapshot", "reset_peak_memory",
           "peak_rss_bytes"]


# ---------------------------------------------------------------------------------------
# model / tensor speed-ups
# ---------------------------------------------------------------------------------------
def to_channels_last(obj):
    """Module -> converted in place (and returned); 4-d tensor -> channels-last copy/view.

    Other tensors are returned unchanged, so it can wrap any batch.
    """
    if isinstance(obj, nn.Module):
        return obj.to(memory_format=torch.channels_last)
    if isinstance(obj, torch.Tensor) and obj.dim() == 4:
        return obj.contiguous(memory_format=torch.channels_last)
    return obj


def autocast(device: torch.device | str, enabled: bool = True, dtype: torch.dtype = torch.bfloat16):
    """bfloat16 autocast on ``device`` (CPU or CUDA) when enabled, else a no-op context."""
    dev = torch.device(device)
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(dev.type, dtype=dtype)


def maybe_compile(model: nn.Module, enabled: bool = True, mode: str | None = None):
    """``torch.compile(model)`` when enabled (and supported), else the model itself.

    The compiled wrapper shares parameters with ``model``: optimizers and checkpoints keep
    using ``model``. Compilation happens lazily, at the first call.
    """
    if not enabled:
        return model
    return torch.compile(model, mode=mode)


# ---------------------------------------------------------------------------------------
# feature storage
# ---------------------------------------------------------------------------------------
def feature_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return FEATURE_DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown feature dtype {name!r}: expected one of {', '.join(FEATURE_DTYPES)}") from None


class FeatureStore:
    """An (N, D) feature matrix filled batch by batch, row i = image i.

    ``device`` cuda keeps the features on the GPU (the host never holds the matrix);
    ``dtype`` float16 halves its size (clustering upcasts block by block). ``tensor`` is what
    :meth:`clustering.Kmeans.cluster` takes.
    """

    def __init__(self, n: int, dim: int, device: torch.device | str = "cpu",
                 dtype: str | torch.dtype = "float32"):
        self.device = torch.device(device)
        self.dtype = feature_dtype(dtype)
        self.tensor = torch.empty(int(n), int(dim), dtype=self.dtype, device=self.device)
        self.filled = 0

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()

    def write(self, idx, batch: torch.Tensor) -> None:
        """Store ``batch`` (B, D) at rows ``idx`` (B,) (dataset indices, any order)."""
        idx = torch.as_tensor(idx, dtype=torch.long).to(self.device, non_blocking=True)
        self.tensor.index_copy_(0, idx, batch.detach().to(self.device, self.dtype, non_blocking=True))
        self.filled += int(idx.numel())

    def numpy(self) -> np.ndarray:
        """Host float32 copy (the original's representation)."""
        return self.tensor.float().cpu().numpy()


# ---------------------------------------------------------------------------------------
# JPEG loading: bytes in workers, decoding + augmentation on the device
# ---------------------------------------------------------------------------------------
def _is_jpeg(data: torch.Tensor) -> bool:
    return data.numel() > 2 and int(data[0]) == 0xFF and int(data[1]) == 0xD8


def _decode_cpu(data: torch.Tensor) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_image
    return decode_image(data, mode=ImageReadMode.RGB)


def eval_geometry(img: torch.Tensor, size: int = 224) -> torch.Tensor:
    """uint8 (3, H, W) -> (3, size, size): Resize(size*256/224) + CenterCrop(size), as
    ``data.eval_transform`` (bilinear with antialiasing, like PIL)."""
    from torchvision.transforms.v2 import functional as F
    img = F.resize(img, [int(round(size * 256 / 224))], antialias=True)
    return F.center_crop(img, [size, size])


def train_geometry(img: torch.Tensor, size: int = 224, generator: torch.Generator | None = None) -> torch.Tensor:
    """uint8 (3, H, W) -> (3, size, size): RandomResizedCrop(size) + RandomHorizontalFlip."""
    from torchvision.transforms import RandomResizedCrop
    from torchvision.transforms.v2 import functional as F
    i, j, h, w = RandomResizedCrop.get_params(img, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3))
    img = F.resized_crop(img, i, j, h, w, [size, size], antialias=True)
    if float(torch.rand(1, generator=generator)) < 0.5:
        img = img.flip(-1)
    return img


def normalize_batch(imgs: torch.Tensor, channels_last: bool = False,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 (B, 3, S, S) -> float, ToTensor scaling + ImageNet Normalize, on imgs' device."""
    mean = torch.tensor(IMAGENET_MEAN, device=imgs.device).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(IMAGENET_STD, device=imgs.device).view(1, 3, 1, 1) * 255.0
    out = (imgs.float() - mean) / std
    if channels_last:
        out = out.contiguous(memory_format=torch.channels_last)
    return out.to(dtype)


class EncodedImageDataset(Dataset):
    """Image files as encoded bytes (``decode=False``, for device decoding) or as fixed-size
    uint8 tensors decoded in the worker with torchvision.io (``decode=True``).

    Item ``i`` is ``(bytes_or_uint8_image, label_i, i)``; ``labels`` defaults to zeros.
    """

    def __init__(self, paths: Sequence[str], labels: Sequence[int] | None = None, decode: bool = True,
                 train: bool = False, size: int = 224):
        self.paths = list(paths)
        self.labels = np.zeros(len(self.paths), np.int64) if labels is None else np.asarray(labels, np.int64)
        self.decode, self.train, self.size = decode, train, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from torchvision.io import read_file
        data = read_file(self.paths[i])
        if self.decode:
            img = _decode_cpu(data)
            data = train_geometry(img, self.size) if self.train else eval_geometry(img, self.size)
        return data, int(self.labels[i]), i


def _collate_list(batch):
    data, labels, idx = zip(*batch)
    return list(data), torch.as_tensor(labels, dtype=torch.long), torch.as_tensor(idx, dtype=torch.long)


def _collate_stack(batch):
    data, labels, idx = zip(*batch)
    return torch.stack(data), torch.as_tensor(labels, dtype=torch.long), torch.as_tensor(idx, dtype=torch.long)


class DecodedLoader:
    """Iterates ``(images, labels, indices)`` with images normalised float on ``device``."""

    def __init__(self, loader: DataLoader, device: torch.device, on_device: bool, train: bool,
                 size: int, channels_last: bool, dtype: torch.dtype):
        self.loader, self.device, self.on_device = loader, device, on_device
        self.train, self.size, self.channels_last, self.dtype = train, size, channels_last, dtype

    def __len__(self) -> int:
        return len(self.loader)

    def _decode_batch(self, blobs: list[torch.Tensor]) -> torch.Tensor:
        from torchvision.io import ImageReadMode, decode_jpeg
        jpeg = [i for i, b in enumerate(blobs) if _is_jpeg(b)]
        imgs: list[torch.Tensor | None] = [None] * len(blobs)
        if jpeg:
            dec = decode_jpeg([blobs[i] for i in jpeg], mode=ImageReadMode.RGB, device=self.device)
            for i, im in zip(jpeg, dec):
                imgs[i] = im
        for i, b in enumerate(blobs):  # PNG & co: decoded on the host, then moved
            if imgs[i] is None:
                imgs[i] = _decode_cpu(b).to(self.device)
        geo = train_geometry if self.train else eval_geometry
        return torch.stack([geo(im, self.size) for im in imgs])

    def __iter__(self):
        for data, labels, idx in self.loader:
            if self.on_device:
                imgs = self._decode_batch(data)
            else:
                imgs = data.to(self.device, non_blocking=True)
            yield normalize_batch(imgs, self.channels_last, self.dtype), labels, idx


def gpu_decode_loader(paths: Sequence[str], batch_size: int, device: torch.device | str = "cuda",
                      train: bool = False, size: int = 224, workers: int = 4, sampler: Iterable[int] | None = None,
                      labels: Sequence[int] | None = None, channels_last: bool = False,
                      dtype: torch.dtype = torch.float32, decode_on_device: bool | None = None) -> DecodedLoader:
    """Loader over image files yielding ``(images, labels, indices)``, images on ``device``.

    On CUDA (default ``decode_on_device``): workers only read the file bytes; JPEGs are
    decoded in a batch by nvjpeg (``decode_jpeg(device='cuda')``), then resized/cropped,
    flipped and normalised on the GPU. On CPU: workers decode with torchvision.io
    (libjpeg-turbo) and resize uint8 tensors; the main process normalises.
    ``train`` selects RandomResizedCrop + flip, else Resize + CenterCrop (data.py's transforms).
    """
    device = torch.device(device)
    if decode_on_device is None:
        decode_on_device = device.type == "cuda"
    ds = EncodedImageDataset(paths, labels, decode=not decode_on_device, train=train, size=size)
    loader = DataLoader(ds, batch_size=batch_size, sampler=sampler, shuffle=False, num_workers=workers,
                        collate_fn=_collate_list if decode_on_device else _collate_stack,
                        pin_memory=device.type == "cuda" and not decode_on_device,
                        persistent_workers=False)
    return DecodedLoader(loader, device, decode_on_device, train, size, channels_last, dtype)


# ---------------------------------------------------------------------------------------
# memory measurements
# ---------------------------------------------------------------------------------------
def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (ru_maxrss, KiB on Linux)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r) if sys.platform == "darwin" else int(r) * 1024


def reset_peak_memory(device: torch.device | str | None = None) -> None:
    dev = torch.device(device) if device is not None else None
    if torch.cuda.is_available() and (dev is None or dev.type == "cuda"):
        torch.cuda.reset_peak_memory_stats(dev)


def memory_snapshot(device: torch.device | str | None = None) -> dict:
    """{'rss_mb', 'peak_rss_mb', 'gpu_peak_mb'} (gpu_peak_mb None without CUDA)."""
    try:
        import psutil
        rss = psutil.Process(os.getpid()).memory_info().rss
    except ImportError:  # pragma: no cover
        rss = peak_rss_bytes()
    gpu = None
    dev = torch.device(device) if device is not None else None
    if torch.cuda.is_available() and (dev is None or dev.type == "cuda"):
        gpu = torch.cuda.max_memory_allocated(dev) / 2 ** 20
    return {"rss_mb": rss / 2 ** 20, "peak_rss_mb": peak_rss_bytes() / 2 ** 20, "gpu_peak_mb": gpu}
