"""Image datasets for DeepCluster: an indexed image folder, the transforms, the demo data.

Datasets return the dataset index with each sample, so that features are written by index
(never by batch position) and pseudo-labels follow the image, whatever the sampling order.
"""
from __future__ import annotations

import logging
import math
import os
import warnings
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms

import fileio
from errors import DataError
import preempt

_log = logging.getLogger("deepcluster")

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


class BadImageError(RuntimeError):
    """An image file could not be decoded. The message names the file."""


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def scan_image_folder(root: str | os.PathLike) -> tuple[list[str], list[int] | None, list[str]]:
    """List the images under ``root``.

    Two layouts: class folders (``root/<class>/**/<img>``, as torchvision's ImageFolder; the
    class index is returned as a target) or a flat folder of images (targets ``None``).
    Symlinked folders are followed once (a symlink loop is not followed twice).
    Returns ``(paths, targets, classes)`` sorted for a stable image order.
    """
    root = Path(root)
    if not root.exists():
        raise DataError(f"data directory {str(root)!r} does not exist")
    if not root.is_dir():
        raise DataError(f"data path {str(root)!r} is not a directory")
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except PermissionError as e:
        raise DataError(f"data directory {str(root)!r} is not readable: {e}") from e
    classes = [e.name for e in entries if e.is_dir() and not e.name.startswith(".")]
    flat = [e.path for e in entries if e.is_file() and is_image_file(e.name)]
    paths: list[str] = []
    targets: list[int] = []
    if classes:
        for ci, cname in enumerate(classes):
            found = _walk_images(root / cname)
            paths += found
            targets += [ci] * len(found)
        keep = [c for c in range(len(classes)) if c in set(targets)]
        if len(keep) != len(classes):  # drop class folders without images, re-index
            remap = {c: i for i, c in enumerate(keep)}
            classes = [classes[c] for c in keep]
            targets = [remap[t] for t in targets]
        if flat:
            # images beside class folders: keep them all, labels are then not meaningful
            paths, targets, classes = sorted(paths + flat), None, []
    else:
        paths = flat
    if not paths:
        raise DataError(f"data directory {str(root)!r} contains no images "
                        f"(looked for {', '.join(IMG_EXTENSIONS)})")
    return paths, (targets if classes else None), classes


def _walk_images(folder: Path) -> list[str]:
    out, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # symlink loop
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames.sort()
        out += [os.path.join(dirpath, f) for f in sorted(filenames) if is_image_file(f)]
    return out


# Images over this many pixels are refused (PIL's own bomb threshold, ~89 Mpx): a
# decompression bomb would otherwise exhaust memory in a DataLoader worker.
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485


def load_rgb(path: str, draft: int | tuple[int, int] | None = None) -> Image.Image:
    """Open an image as RGB, or raise :class:`BadImageError` naming the file.

    Grayscale, palette, CMYK, 16-bit and alpha images are converted to RGB (alpha is
    dropped); zero-byte, truncated, corrupt, non-image, unreadable and oversized
    (decompression-bomb) files are refused.

    ``draft``: the shorter side the caller resizes to next. A JPEG at least twice that size
    on both sides is then decoded at 1/2, 1/4 or 1/8 scale by libjpeg (DCT-domain scaling,
    the decoder's own reduced-size mode), the smallest scale still >= ``draft`` on both
    sides: a 4000x3000 photo for Resize(256) decodes as 500x375, 64x fewer pixels.
    Other formats and smaller JPEGs decode in full. A pair ``(w, h)``: the same for a target of
    w x h (the scale then is the largest of 1/8, 1/4, 1/2 with both sides still >= the target's).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with open(path, "rb") as f:
                img = Image.open(f)
                if img.width * img.height > MAX_PIXELS:
                    raise ValueError(f"{img.width}x{img.height} pixels exceeds the {MAX_PIXELS} limit "
                                     f"(decompression bomb?)")
                if draft and img.format == "JPEG":
                    img.draft("RGB", (int(draft), int(draft)) if isinstance(draft, int) else tuple(draft))
                img.load()
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            img = img.point(lambda v: v / 256).convert("L")  # 16-bit gray -> 8-bit
        return img if img.mode == "RGB" else img.convert("RGB")  # convert("RGB") of RGB is a copy
    except Exception as e:  # PIL raises many kinds; all mean the same thing here
        msg = str(e) or type(e).__name__
        raise BadImageError(f"cannot read image file {path!r}: {type(e).__name__}: {msg}") from None


def check_image(path: str, full: bool = True) -> str | None:
    """None if ``path`` decodes (``full``) or at least has a valid header; else the reason."""
    try:
        if full:
            load_rgb(path)
        else:
            if os.path.getsize(path) == 0:
                return "empty file (0 bytes)"
            with open(path, "rb") as f, warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # size checked below
                img = Image.open(f)
                if img.width * img.height > MAX_PIXELS:
                    return f"{img.width}x{img.height} pixels exceeds the {MAX_PIXELS} limit"
        return None
    except BadImageError as e:
        return str(e).split(": ", 1)[-1]
    except Exception as e:
        return f"{type(e).__name__}: {e}"


def check_images(paths: list[str], full: bool = True, workers: int = 0, progress: bool = True) -> dict[int, str]:
    """Check every image before training starts; returns {index: reason} of the bad ones."""
    from tqdm import tqdm

    bad: dict[int, str] = {}
    fn = partial(check_image, full=full)
    if workers > 1 and len(paths) > 1000:
        from concurrent.futures import ProcessPoolExecutor
        with ProcessPoolExecutor(workers) as ex:
            results = ex.map(fn, paths, chunksize=256)
            for i, r in enumerate(tqdm(results, total=len(paths), desc="checking images", leave=False,
                                       disable=None if progress else True)):
                if r is not None:
                    bad[i] = r
    else:
        for i, p in enumerate(tqdm(paths, desc="checking images", leave=False, disable=None if progress else True)):
            r = fn(p)
            if r is not None:
                bad[i] = r
    return bad


class IndexedImageFolder(Dataset):
    """Images of a folder; item ``i`` is ``(transform(image_i), i)``.

    ``targets`` holds the class-folder labels when the folder has class folders, else None.
    ``draft``: items (the feature pass) decode large JPEGs at reduced size for a resize to
    this shorter side (see :func:`load_rgb`); :meth:`load` (the training crops) always
    decodes in full.
    """

    def __init__(self, root: str | os.PathLike, transform: Callable | None = None,
                 draft: int | None = None):
        self.root = str(root)
        self.paths, self.targets, self.classes = scan_image_folder(root)
        self.transform = transform
        self.draft = draft
        # True: an unreadable image gives a black stand-in and the index -1 - i (the caller
        # marks it and leaves it out) instead of raising BadImageError
        self.mark_unreadable = False

    def __len__(self) -> int:
        return len(self.paths)

    @classmethod
    def from_file_list(cls, file_list: str | os.PathLike, root: str | os.PathLike | None = None,
                       transform: Callable | None = None, draft: int | None = None) -> "IndexedImageFolder":
        """The images of a :class:`FileList` (the folder is never walked); ``targets`` is then
        an (N,) int64 array (the lines' labels) or None."""
        from file_list import FileList

        self = cls.__new__(cls)
        listing = FileList(file_list, root)
        self.root, self.paths = str(file_list), listing
        self.targets, self.classes = listing.labels, listing.classes
        self.transform, self.draft, self.mark_unreadable = transform, draft, False
        return self

    @classmethod
    def from_paths(cls, paths: list[str], root: str, transform: Callable | None = None) -> "IndexedImageFolder":
        """The images ``paths`` (already listed, e.g. a kNN subset), no targets; ``root`` names them."""
        self = cls.__new__(cls)
        self.root, self.paths, self.targets, self.classes = str(root), list(paths), None, []
        self.transform, self.draft, self.mark_unreadable = transform, None, False
        return self

    def drop(self, indices: set[int]) -> None:
        """Remove images (e.g. the ones a check refused) from the dataset."""
        keep = [i for i in range(len(self.paths)) if i not in indices]
        if not isinstance(self.paths, list):  # a file_list.FileList
            self.paths = self.paths.select(keep)
            self.targets = self.paths.labels
            return
        self.paths = [self.paths[i] for i in keep]
        if self.targets is not None:
            self.targets = [self.targets[i] for i in keep]
        if not self.paths:
            raise DataError(f"data directory {self.root!r} has no readable image left")

    def load(self, idx: int) -> Image.Image:
        return load_rgb(self.paths[idx])

    def __getitem__(self, idx: int):
        try:
            img = load_rgb(self.paths[idx], self.draft)
        except BadImageError:
            if not self.mark_unreadable:
                raise
            img, idx = Image.new("RGB", (8, 8)), -1 - idx
        if self.transform is not None:
            img = self.transform(img)
        return img, idx


def eval_resize(size: int = 224) -> int:
    """Shorter side of :func:`eval_transform`'s Resize: 256 for 224 crops, scaled alike."""
    return int(round(size * 256 / 224))


# ---------------------------------------------------------------------------------------
# images that become unreadable during a run (--bad_images skip)
# ---------------------------------------------------------------------------------------
def mark_unreadable(out: torch.Tensor, idx: torch.Tensor, dataset, exp: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Feature rows ``out`` (B, D) of unreadable images (index ``-1 - i``, see
    ``IndexedImageFolder.mark_unreadable``) become NaN, which leaves them out of the
    clustering whatever process extracted them; returns the rows and the true indices."""
    bad = idx < 0
    idx = torch.where(bad, -idx - 1, idx)
    out = out.clone()
    out[bad.to(out.device)] = float("nan")
    paths = getattr(dataset, "dataset", dataset).paths  # a Subset under torchrun
    for i in idx[bad].tolist():
        note_unreadable(exp, paths[i], "met during feature extraction: left out of the clustering")
    return out, idx


_NOTED: set[tuple[str, str]] = set()


def note_unreadable(exp: str, path: str, what: str) -> None:
    """Warn once and append the image to EXP/bad_images.txt unless listed there already
    (appends of one line are atomic, so DataLoader workers and ranks can all write)."""
    if (exp, path) in _NOTED:
        return
    _NOTED.add((exp, path))
    listing = Path(exp) / "bad_images.txt"
    if listing.exists() and any(line.split("\t", 1)[0] == path for line in listing.read_text().splitlines()):
        return
    _log.warning("unreadable image %s, %s (listed in %s)", path, what, listing)
    with open(listing, "a") as f:
        f.write(f"{path}\t{what}\n")


class StandIns(Dataset):
    """Training images where an unreadable one is replaced by the next readable image of its
    cluster: always the same one, so a resumed run trains on the same pixels."""

    def __init__(self, dataset: IndexedImageFolder, images_lists: list[list[int]], exp: str):
        self.dataset, self.exp = dataset, exp
        self.labels = np.full(len(dataset), -1, dtype=np.int64)  # (N,) cluster of each image
        for c, lst in enumerate(images_lists):
            self.labels[np.asarray(lst, dtype=np.int64)] = c

    def __len__(self) -> int:
        return len(self.dataset)

    def load(self, idx: int):
        try:
            return self.dataset.load(idx)
        except BadImageError:
            note_unreadable(self.exp, self.dataset.paths[idx], "met in training: replaced by another "
                                                               "image of its cluster")
            members = np.flatnonzero(self.labels == self.labels[idx])
            start = int(np.searchsorted(members, idx))
            for j in range(1, len(members)):
                alt = int(members[(start + j) % len(members)])
                try:
                    return self.dataset.load(alt)
                except BadImageError:
                    note_unreadable(self.exp, self.dataset.paths[alt], "met in training")
            raise


def _to_tensor(normalize: bool) -> list:
    if normalize:
        return [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return [transforms.PILToTensor()]


def eval_transform(size: int = 224, normalize: bool = True) -> transforms.Compose:
    """Resize(256) -> CenterCrop(224) (scaled for other sizes) -> ToTensor -> Normalize.

    ``normalize=False`` stops at the (3, H, W) uint8 tensor; :func:`to_model_input` then does
    ToTensor's scaling and Normalize on the whole batch, bitwise equal (see there).
    """
    return transforms.Compose([
        transforms.Resize(eval_resize(size)),
        transforms.CenterCrop(size),
        *_to_tensor(normalize),
    ])


def train_transform(size: int = 224, min_scale: float = 0.08, normalize: bool = True) -> transforms.Compose:
    """RandomResizedCrop(224) -> RandomHorizontalFlip -> ToTensor -> Normalize.

    ``min_scale`` is RandomResizedCrop's smallest crop area (0.08, torchvision's and the
    paper's default; the digits demo uses a milder value). ``normalize``: as
    :func:`eval_transform`.
    """
    return transforms.Compose([
        transforms.RandomResizedCrop(size, scale=(min_scale, 1.0)),
        transforms.RandomHorizontalFlip(),
        *_to_tensor(normalize),
    ])


_NORM: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def to_model_input(imgs: torch.Tensor, device: torch.device, channels_last: bool = False) -> torch.Tensor:
    """A loader's batch -> the network's float32 input on ``device``.

    A (B, 3, H, W) uint8 batch (transforms built with ``normalize=False``) travels as uint8,
    4x fewer bytes through the workers' shared memory and the host-to-device copy, and is
    scaled and normalised here in one pass over the batch instead of image by image in the
    workers, which share this machine's cores with the network. The arithmetic is ToTensor's
    and Normalize's, element by element (float(x) / 255, then - mean, then / std, each
    correctly rounded), so the result is bitwise equal to the per-image transforms. The 255 is
    a tensor on the device, not a Python number: CUDA divides by a Python scalar through its
    reciprocal, which can differ in the last bit. A float batch (already normalised) is only
    moved. The uint8 batch is laid out channels-last (``channels_last``) or contiguous before the
    float ops, which keep the layout: the network sees the layout it asked for, whatever the loader's.
    """
    if not isinstance(imgs, torch.Tensor):  # --decode gpu: JPEG bytes decoded and cropped on the device
        imgs = imgs.decode(device)  # gpu_decode.EncodedBatch
    imgs = imgs.to(device, non_blocking=True)  # host -> device from pinned memory: ordered, safe
    if imgs.dim() == 4:  # training batches arrive channels-last (train_crops.CollateCrops): same values
        imgs = imgs.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    if imgs.dtype != torch.uint8:
        return imgs
    key = str(device)
    if key not in _NORM:
        _NORM[key] = (torch.full((1, 1, 1, 1), 255.0, dtype=torch.float32, device=device),
                      torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=device).view(1, 3, 1, 1),
                      torch.tensor(IMAGENET_STD, dtype=torch.float32, device=device).view(1, 3, 1, 1))
    scale, mean, std = _NORM[key]
    return imgs.float().div_(scale).sub_(mean).div_(std)


# ---------------------------------------------------------------------------------------
# demo data: scikit-learn's handwritten digits as an image folder
# ---------------------------------------------------------------------------------------
def synthetic_photo(h: int, w: int, seed: int) -> Image.Image:
    """An (h, w) photo-like RGB image (tests, the GPU check): smooth gradients, flat discs with
    sharp edges (JPEG's hard case), mild noise; the same for the same ``seed``."""
    r = np.random.RandomState(seed)
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    img = np.stack([np.sin(6 * x + r.rand() * 6), np.cos(9 * y * x + r.rand()), np.sin(4 * (x + y) * r.rand() * 3)], -1)
    img = (img * 0.5 + 0.5) * 255
    yy, xx = np.mgrid[0:h, 0:w]
    for _ in range(6):
        cy, cx, rr = r.randint(0, h), r.randint(0, w), r.randint(5, max(6, h // 3))
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < rr ** 2] = r.randint(0, 255, 3)
    return Image.fromarray(np.clip(img + r.randn(h, w, 3) * 4, 0, 255).astype(np.uint8))


def export_digits(root: str | os.PathLike, size: int = 32) -> str:
    """Write scikit-learn's 1,797 handwritten digits (8x8, 10 classes) as PNGs.

    Layout ``root/<digit>/<index>.png``, upscaled to ``size`` px with bilinear filtering.
    Idempotent: an existing complete export is reused. Returns the folder path.
    """
    from sklearn.datasets import load_digits

    root = Path(root)
    digits = load_digits()
    stamp = root / ".complete"
    if stamp.exists():
        return str(root)
    for i, (img, y) in enumerate(zip(digits.images, digits.target)):
        _save_digit(img, root / str(int(y)) / f"{i:04d}.png", size)
    stamp.write_text(f"{len(digits.images)} images\n")
    return str(root)


def export_digits_split(root: str | os.PathLike, size: int = 32, val_fraction: float = 0.2, seed: int = 0) -> str:
    """The same digits split into ``root/train/<digit>/<index>.png`` and ``root/val/...``.

    Stratified and seeded (``val_fraction`` of each class in val/), for the kNN evaluation of
    the demo. Idempotent like :func:`export_digits`. Returns the folder path.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    root = Path(root)
    stamp = root / ".complete"
    if stamp.exists():
        return str(root)
    digits = load_digits()
    idx = np.arange(len(digits.images))
    train, val = train_test_split(idx, test_size=val_fraction, stratify=digits.target, random_state=seed)
    for split, part in (("train", train), ("val", val)):
        for i in sorted(part):
            _save_digit(digits.images[i], root / split / str(int(digits.target[i])) / f"{i:04d}.png", size)
    stamp.write_text(f"{len(train)} train, {len(val)} val images (seed {seed})\n")
    return str(root)


def _save_digit(img: np.ndarray, path: Path, size: int) -> None:
    """An 8x8 digit (values 0..16) as a ``size`` px grey PNG, bilinear upscaling."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = (img / 16.0 * 255.0).clip(0, 255).astype(np.uint8)
    Image.fromarray(arr, mode="L").resize((size, size), Image.BILINEAR).save(path)


def default_collate_indexed(batch):
    """Collate ``(tensor, index)`` pairs into ``(B, C, H, W)`` and ``(B,)`` int64."""
    imgs, idx = zip(*batch)
    return torch.stack(imgs), torch.as_tensor(idx, dtype=torch.long)


def check_folder(dataset: "IndexedImageFolder", mode: str, on_bad: str, listing: Path, workers: int = 0,
                 progress: bool = True, write: bool = True, rt=None) -> None:
    """Check the images of ``dataset`` before any training (no crash hours later).

    ``mode``: ``full`` decodes every image, ``header`` reads headers only (a truncated file is
    then met during the run), ``auto`` is full up to 20,000 images, ``off`` skips the check.
    Unreadable images are listed in ``listing`` (when ``write``); ``on_bad='error'`` refuses
    the folder naming the first one, ``'skip'`` drops them from ``dataset``. Under torchrun
    (``rt``, a distributed.Runtime) rank r checks images r, r + W, ... and one all-gather
    gives every rank the whole list, so all ranks decide (and drop) alike.
    """
    if mode == "auto":
        mode = "full" if len(dataset) <= 20000 else "header"
    if mode == "off":
        return
    if rt is not None and rt.distributed:
        r, w = rt.rank, rt.world_size
        mine = check_images(dataset.paths[r::w], full=mode == "full", workers=workers, progress=progress)
        parts: list = [None] * w
        torch.distributed.all_gather_object(parts, {r + w * i: why for i, why in mine.items()})
        bad = {i: why for part in parts for i, why in part.items()}
    else:
        bad = check_images(dataset.paths, full=mode == "full", workers=workers, progress=progress)
    if not bad:
        return
    if write:
        fileio.atomic_write_text(listing, "".join(f"{dataset.paths[i]}\t{why}\n" for i, why in sorted(bad.items())))
    first = dataset.paths[min(bad)]
    if on_bad == "error":
        raise DataError(f"{len(bad)} unreadable image(s) in {dataset.root}, first {first!r}: {bad[min(bad)]} "
                        f"(all listed in {listing}; --bad_images skip trains without them)")
    _log.warning("skipping %d unreadable image(s) (listed in %s), first %s: %s", len(bad), listing, first,
                 bad[min(bad)])
    dataset.drop(set(bad))


def make_loader(dataset, batch: int | None, workers: int, device: torch.device, sampler=None,
                seed: int = 0, collate_fn=None) -> torch.utils.data.DataLoader:
    """Unshuffled loader (order from ``sampler``) with its own seeded generator: creating the
    iterator draws nothing from the global RNG, so a resumed run's dropout masks stay in step
    with an uninterrupted one. ``batch`` None: each item of ``dataset`` is a whole batch. Its
    workers leave stop signals and Ctrl-C to the main process (:func:`preempt.loader_worker_init`)."""
    return torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=False, sampler=sampler,
                                       num_workers=workers, pin_memory=device.type == "cuda",
                                       persistent_workers=False, generator=torch.Generator().manual_seed(seed),
                                       collate_fn=collate_fn, worker_init_fn=preempt.loader_worker_init)


def default_workers() -> int:
    """Loader workers per process when --workers is not given: the cores this process may run on
    (``os.sched_getaffinity``: a job scheduler's CPU set, not the machine's) divided among the
    torchrun processes of this node (``LOCAL_WORLD_SIZE``), less one for the process itself,
    at least 1 (16 cores: 15 for one process, 3 each for 4, 1 each for 8)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(1, cores // local - 1)


def batch_buffer(shape: tuple[int, ...], dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """An uninitialised tensor to assemble a batch in: in a DataLoader worker it is allocated in
    shared memory, so sending it to the main process copies nothing (what the default collate
    does for the tensors it stacks); elsewhere ordinary memory."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    proto = torch.empty(0, dtype=dtype)
    return proto.new(proto._typed_storage()._new_shared(math.prod(shape), device="cpu")).view(shape)


def check_eval_images(paths: list[str], flag: str, skip: bool = False, mode: str = "auto", workers: int = 0,
                      progress: bool = True, listing: Path | None = None, hint: str = "") -> set[int]:
    """Check the images of an evaluation set before any work; returns the indices of the
    unreadable ones (to drop, with ``skip``). Without ``skip`` any unreadable image is refused
    (DataError naming ``flag``, how many, the first few files and why, then ``hint``); with a
    ``listing`` path all of them are written there. ``mode`` as main.py's --check_images."""
    if mode == "auto":
        mode = "full" if len(paths) <= 20000 else "header"
    if mode == "off":
        return set()
    bad = check_images(paths, full=mode == "full", workers=workers, progress=progress)
    if not bad:
        return set()
    if listing is not None:
        fileio.atomic_write_text(listing, "".join(f"{paths[i]}\t{why}\n" for i, why in sorted(bad.items())))
    shown = "; ".join(f"{paths[i]!r}: {why}" for i, why in sorted(bad.items())[:3])
    more = f"; and {len(bad) - 3} more" if len(bad) > 3 else ""
    where = f" (all listed in {listing})" if listing is not None else ""
    if not skip:
        raise DataError(f"{len(bad)} unreadable image(s) in {flag}: {shown}{more}{where}"
                        + (f"; {hint}" if hint else ""))
    _log.warning("skipping %d unreadable image(s) of %s%s: %s%s", len(bad), flag, where, shown, more)
    return set(bad)


# ---------------------------------------------------------------------------------------
# DeepCluster-v2 multi-crop (facebookresearch/swav src/multicropdataset.py, written anew)
# ---------------------------------------------------------------------------------------
# swav normalises with std 0.228 for the red channel (torchvision's is 0.229); kept as swav
SWAV_MEAN = [0.485, 0.456, 0.406]
SWAV_STD = [0.228, 0.224, 0.225]


class PILRandomGaussianBlur:
    """With probability ``p``, PIL's GaussianBlur of a radius uniform in [radius_min, radius_max].

    swav draws with numpy and Python's ``random``; this draws from torch's generator (same
    distributions) so that a seeded sample (clustering._apply) is augmented reproducibly.
    """

    def __init__(self, p: float = 0.5, radius_min: float = 0.1, radius_max: float = 2.0):
        self.prob, self.radius_min, self.radius_max = p, radius_min, radius_max

    def __call__(self, img: Image.Image) -> Image.Image:
        u, r = torch.rand(2).tolist()
        if not u <= self.prob:  # swav: np.random.rand() <= p
            return img
        from PIL import ImageFilter

        return img.filter(ImageFilter.GaussianBlur(radius=self.radius_min + r * (self.radius_max - self.radius_min)))


def color_distortion(s: float = 1.0) -> transforms.Compose:
    """swav's colour distortion: ColorJitter(0.8s, 0.8s, 0.8s, 0.2s) with p=0.8, then
    RandomGrayscale(p=0.2)."""
    jitter = transforms.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)
    return transforms.Compose([transforms.RandomApply([jitter], p=0.8), transforms.RandomGrayscale(p=0.2)])


class MultiCrop:
    """img -> list of sum(nmb_crops) (3, s, s) normalised tensors, the crops of each size in turn.

    Crop group i: ``nmb_crops[i]`` crops by RandomResizedCrop(``size_crops[i]``, scale =
    (``min_scale_crops[i]``, ``max_scale_crops[i]``)), horizontal flip p=0.5, colour
    distortion, Gaussian blur p=0.5, ToTensor, Normalize(swav's mean/std).
    """

    def __init__(self, size_crops: list[int], nmb_crops: list[int], min_scale_crops: list[float],
                 max_scale_crops: list[float], mean=None, std=None):
        n = len(nmb_crops)
        if not (len(size_crops) == len(min_scale_crops) == len(max_scale_crops) == n):
            raise DataError(f"--nmb_crops, --size_crops, --min_scale_crops, --max_scale_crops need the same "
                            f"number of values, got {n}, {len(size_crops)}, {len(min_scale_crops)}, "
                            f"{len(max_scale_crops)}")
        for lo, hi in zip(min_scale_crops, max_scale_crops):
            if not 0 < lo <= hi <= 1:
                raise DataError(f"crop scale range ({lo}, {hi}) must satisfy 0 < min <= max <= 1")
        self.nmb_crops = [int(c) for c in nmb_crops]
        self.trans = []
        for size, count, lo, hi in zip(size_crops, nmb_crops, min_scale_crops, max_scale_crops):
            t = transforms.Compose([
                transforms.RandomResizedCrop(int(size), scale=(float(lo), float(hi))),
                transforms.RandomHorizontalFlip(p=0.5),
                color_distortion(), PILRandomGaussianBlur(),
                transforms.ToTensor(),
                transforms.Normalize(mean=mean or SWAV_MEAN, std=std or SWAV_STD)])
            self.trans.extend([t] * int(count))

    def __call__(self, img: Image.Image) -> list[torch.Tensor]:
        return [t(img) for t in self.trans]


class MultiCropDataset(Dataset):
    """Item ``i`` (or ``(i, augmentation seed)``, see util.SeededShardSampler) of an image
    dataset -> ``(i, [crops])``; with a seed the crops depend on (image, seed) only."""

    def __init__(self, dataset, multicrop: MultiCrop):
        self.dataset, self.multicrop = dataset, multicrop

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item):
        from clustering import _apply, _load, _split_item

        idx, seed = _split_item(item)
        return idx, _apply(self.multicrop, _load(self.dataset, idx), seed)
