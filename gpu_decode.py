"""``--decode gpu``: the loader workers read JPEG bytes and draw the crops, the run's device
decodes, crops, resizes and flips.

A worker turns each training image into an :class:`EncodedSample` (:class:`EncodedCrop`: the
JPEG's bytes and its crop box and flip, or a finished crop for the formats the device decoder
does not take); :class:`CollateEncoded` packs a batch of them into one :class:`EncodedBatch`,
two tensors whatever the batch size (the JPEGs' bytes end to end, the other crops stacked) and
lists of offsets and boxes, so a batch crosses the worker's shared memory as two segments instead
of one per image; ``data.to_model_input`` calls :meth:`EncodedBatch.decode` on the device.
"""
from __future__ import annotations

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms

import data

# JPEGs that go to the device decoder: baseline (nvJPEG's batched GPU decode) in grey or RGB.
# Everything else (PNG, CMYK, progressive, 16-bit...) is decoded in the worker by the PIL path.
DEVICE_JPEG_MODES = ("L", "RGB")


class EncodedImage:
    """An image not decoded yet: its header opened (size, mode, format) and its path."""

    def __init__(self, path: str, header: Image.Image):
        self.path, self.header = path, header

    @property
    def on_device(self) -> bool:
        h = self.header
        return h.format == "JPEG" and h.mode in DEVICE_JPEG_MODES and not h.info.get("progressive")


class EncodedImages(Dataset):
    """``dataset`` whose :meth:`load` opens the header only (bad headers raise
    :class:`data.BadImageError` as :func:`data.load_rgb` does); the pixels are decoded later, on
    the run's device for JPEGs (:class:`EncodedBatch`) or in the worker for the other formats."""

    def __init__(self, dataset: data.IndexedImageFolder):
        self.dataset = dataset

    @property
    def paths(self) -> list[str]:
        return self.dataset.paths

    def __len__(self) -> int:
        return len(self.dataset)

    def load(self, idx: int) -> EncodedImage:
        path = self.dataset.paths[idx]
        try:
            header = Image.open(path)  # lazy: reads the header only; the file stays closed afterwards
            header.close()
            if header.width * header.height > data.MAX_PIXELS:
                raise ValueError(f"{header.width}x{header.height} pixels exceeds the {data.MAX_PIXELS} limit")
        except Exception as e:
            raise data.BadImageError(f"cannot read image file {path!r}: {type(e).__name__}: {e}") from None
        return EncodedImage(path, header)


class EncodedSample:
    """What a worker sends for one training image: the JPEG's bytes and its crop box and flip
    (``data`` (n_bytes,) uint8, ``box`` (i, j, h, w, flip)), or for a non-JPEG the finished
    (3, size, size) uint8 crop (``box`` None)."""

    def __init__(self, path: str, data: torch.Tensor, box: tuple[int, int, int, int, int] | None):
        self.path, self.data, self.box = path, data, box


class EncodedCrop:
    """The training transform of ``--decode gpu``, run in the worker on an :class:`EncodedImage`.

    Draws RandomResizedCrop's box and RandomHorizontalFlip's coin from the (seeded) torch RNG
    with torchvision's own code, in the order ``data.train_transform`` draws them, from the
    image's header size: for a given seed the box and the flip are those the PIL path draws.
    """

    def __init__(self, size: int = 224, min_scale: float = 0.08):
        self.size, self.scale, self.ratio = int(size), (float(min_scale), 1.0), (3.0 / 4.0, 4.0 / 3.0)

    def __call__(self, img: EncodedImage) -> EncodedSample:
        i, j, h, w = transforms.RandomResizedCrop.get_params(img.header, list(self.scale), list(self.ratio))
        flip = int(torch.rand(1) < 0.5)  # RandomHorizontalFlip(p=0.5)
        if img.on_device:
            with open(img.path, "rb") as f:
                raw = torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)
            return EncodedSample(img.path, raw, (i, j, h, w, flip))
        pil = data.load_rgb(img.path)  # other formats: the PIL path, same box and flip
        out = transforms.functional.resized_crop(pil, i, j, h, w, [self.size, self.size],
                                                 transforms.InterpolationMode.BILINEAR, antialias=True)
        if flip:
            out = transforms.functional.hflip(out)
        return EncodedSample(img.path, transforms.functional.pil_to_tensor(out), None)


class EncodedBatch:
    """A batch of :class:`EncodedSample` as two tensors, ``raw`` (n_bytes,) uint8 the JPEGs' bytes
    end to end and ``crops`` (B - J, 3, size, size) uint8 the finished crops of the other images,
    and lists: ``offsets`` (J + 1 ints) where each JPEG starts in ``raw`` (and the end), ``boxes``
    the JPEGs' (i, j, h, w, flip), ``jpeg`` / ``other`` their positions in the batch, ``paths`` the
    B file names (error messages). Built in the loader worker, where the two tensors are allocated
    in shared memory: a batch crosses to the main process as two shared-memory segments (each
    costs a file descriptor and a mapping to receive), whatever its size. :meth:`decode` makes the
    (B, 3, size, size) uint8 batch on a device."""

    def __init__(self, samples: list[EncodedSample], size: int):
        self.size, self.paths = int(size), [s.path for s in samples]
        self.jpeg = [k for k, s in enumerate(samples) if s.box is not None]
        self.other = [k for k, s in enumerate(samples) if s.box is None]
        self.offsets = [0]
        for k in self.jpeg:
            self.offsets.append(self.offsets[-1] + samples[k].data.numel())
        self.raw = data.batch_buffer((self.offsets[-1],))
        if self.jpeg:
            torch.cat([samples[k].data for k in self.jpeg], out=self.raw)
        self.boxes = [tuple(samples[k].box) for k in self.jpeg]
        self.crops = data.batch_buffer((len(self.other), 3, self.size, self.size))
        if self.other:
            torch.stack([samples[k].data for k in self.other], out=self.crops)

    def __len__(self) -> int:
        return len(self.paths)

    def pin_memory(self, device=None) -> "EncodedBatch":
        """The DataLoader's pinning thread: the finished crops go to page-locked memory (an
        asynchronous copy to the device); the JPEG bytes are read by the decoder on the host."""
        self.crops = self.crops.pin_memory()
        return self

    def decode(self, device: torch.device) -> torch.Tensor:
        """(B, 3, size, size) uint8 on ``device``: the JPEGs decoded in one batched call
        (``torchvision.io.decode_jpeg``: nvJPEG on CUDA, libjpeg-turbo on CPU, see
        :func:`decode_jpegs`), then per image the crop (a view), an antialiased bilinear resize
        (torchvision's, PIL's filter) and the flip; the other images' crops copied in."""
        device = torch.device(device)
        out = torch.empty(len(self), 3, self.size, self.size, dtype=torch.uint8, device=device)
        if self.jpeg:
            o = self.offsets
            raws = [self.raw[o[n]:o[n + 1]] for n in range(len(self.jpeg))]  # views, no copy
            imgs = decode_jpegs(raws, device, [self.paths[k] for k in self.jpeg])
            for k, img, box in zip(self.jpeg, imgs, self.boxes):
                out[k] = crop_resize_flip(img, box, self.size)
        if self.other:  # from pinned memory: ordered before the kernels that read it, no host sync
            crops = self.crops.to(device, non_blocking=True)
            for n, k in enumerate(self.other):  # Python indices: no index tensor to copy to the device
                out[k] = crops[n]
        return out


def one_line_error(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


# ---------------------------------------------------------------------------------------
# the device decoder, made safe for the caching allocator
# ---------------------------------------------------------------------------------------
_SIDE_STREAMS: dict = {}


def decode_jpegs(raws: list[torch.Tensor], device: torch.device, paths: list[str]) -> list[torch.Tensor]:
    """Decode JPEG bytes ``raws`` (each (n_bytes,) uint8 on the host) to (3, H, W) uint8 images
    on ``device``; a failure names the file (:class:`data.BadImageError`).

    On CUDA, torchvision's ``decode_jpeg`` (0.19 to 0.29 at least: ``CUDAJpegDecoder`` in
    ``decode_jpegs_cuda.cpp``) allocates its outputs with ``torch::empty`` while the *caller's*
    current stream is current, then has nvJPEG write them on a private stream from the pool that
    never waits for the caller's stream (it only makes the caller's stream wait for it afterwards).
    The caching allocator hands out a block as soon as the tensor using it is freed on the host,
    counting on all later use being ordered on that same stream. In a training loop that runs
    ahead of the GPU, the previous step's activations are freed while its kernels are still queued,
    and the decoder can write into them before those kernels run: corrupted gradients or images.
    (nvJPEG's hardware path on H100 was also reported to write before earlier work on its own
    stream completes, so waiting on streams alone would not be enough.)

    Here the decoder runs with a side stream current, so its outputs come from that stream's pool,
    which only ever holds the decoder's own outputs; each output is marked used by the caller's
    stream (``record_stream``), so the allocator gives its block out again only once the kernels
    queued on the caller's stream before the tensor was freed have *finished* (it records an event
    at the free and polls it), not merely been queued. A block the decoder receives is thus never
    owed to pending work on any stream, whatever order the decoder writes in. The caller's stream
    then waits for the side stream, which torchvision has made wait for its decoder stream, so the
    crops read finished images. No host synchronisation is added (torchvision's ``decode_jpeg``
    already blocks the host until its own stream is done).
    """
    if device.type != "cuda":
        return _decode(raws, device, paths)
    main = torch.cuda.current_stream(device)
    side = _SIDE_STREAMS.get(device)
    if side is None:
        side = _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    with torch.cuda.stream(side):
        imgs = _decode(raws, device, paths)
    main.wait_stream(side)
    for img in imgs:
        img.record_stream(main)
    return imgs


def _decode(raws: list[torch.Tensor], device: torch.device, paths: list[str]) -> list[torch.Tensor]:
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        return decode_jpeg(raws, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        pass
    out = []
    for raw, path in zip(raws, paths):  # one by one: the error names the bad file
        try:
            out.append(decode_jpeg(raw, mode=ImageReadMode.RGB, device=device))
        except RuntimeError as e:
            raise data.BadImageError(f"cannot read image file {path!r}: {one_line_error(e)}") from None
    return out


def crop_resize_flip(img: torch.Tensor, box: tuple[int, int, int, int, int], size: int) -> torch.Tensor:
    """(3, H, W) uint8 -> (3, size, size) uint8 on the same device: crop rows i..i+h, columns
    j..j+w, bilinear resize with antialiasing (PIL's filter, as RandomResizedCrop on a PIL
    image), then a horizontal flip when ``box[4]``."""
    i, j, h, w, flip = box
    out = transforms.functional.resize(img[:, i:i + h, j:j + w], [size, size],
                                       transforms.InterpolationMode.BILINEAR, antialias=True)
    return out.flip(-1) if flip else out


class CollateEncoded:
    """Collate ``(EncodedSample, pseudo_label, index)`` items of a training set into
    ``(EncodedBatch, (B,) labels, (B,) indices)``."""

    def __init__(self, size: int):
        self.size = int(size)

    def __call__(self, batch) -> tuple[EncodedBatch, torch.Tensor, torch.Tensor]:
        samples, targets, idx = zip(*batch)
        return (EncodedBatch(list(samples), self.size), torch.as_tensor(targets, dtype=torch.long),
                torch.as_tensor(idx, dtype=torch.long))

