"""The feature pass's input cache: the exact uint8 images the network sees, decoded once.

The feature pass (and the kNN monitor) reads the same pixels every epoch: each image's Resize +
CenterCrop as a (3, S, S) uint8 tensor (``data.eval_transform(S, normalize=False)``, with
``--jpeg_draft``'s reduced decoding when on). During the first pass each process writes the
images it reads to its own shard on a local disk; later passes, resumed runs and the kNN
monitor read the shard instead of decoding the JPEGs. :func:`feature_loader` returns a loader
that yields the same ``((B, 3, S, S) uint8, (B,) int64 indices)`` batches as the uncached one,
bitwise, in the same order.

Shards: under torchrun rank r of W reads images r, r + W, r + 2W, ... of the dataset (as the
feature pass) and writes and reads only ``w{W}-r{r}.bin``. A shard is one file, written to a
temporary name and renamed when complete (a kill leaves no shard, only a temporary file that
the next writer removes): the images (n, 3, S, S) uint8, then per image its index, file size,
file mtime (ns) and CRC-32, then a JSON header (format, image size, transform, a hash of the
shard's file list) and its length and a magic number. Disk: 3 S^2 + 28 bytes per image
(ImageNet's 1.28 M images at 224: 193 GB; at ``--size 64``: 16 GB).

Checked before a pass: the header against this run (the transform, the size, the file list):
any difference is logged and the shard rebuilt. Checked per image while reading, in the loader
workers: the CRC (a damaged shard), the file's size and mtime (an image changed), its index.
An image that fails is decoded from its file instead, and the shard is rebuilt at the next pass
(with a log line saying why). Unreadable images (``--bad_images skip``) are never served from
the cache. Memory: one batch per worker, whatever the shard's size.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import zlib
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

import data
import fileio

log = logging.getLogger("deepcluster")

FORMAT = 1
MAGIC = b"DCINPUT1"
META_BYTES = 8 + 8 + 8 + 4        # per image: index, file size, mtime_ns (int64), CRC-32 (uint32)
# file systems shared over the network: the default ("auto") does not put the cache there
NETWORK_FS = {"nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "beegfs", "ceph", "glusterfs", "9p",
              "afs", "panfs", "wekafs", "orangefs", "pvfs2", "ocfs2", "gfs2", "davfs", "fuse.glusterfs",
              "fuse.sshfs", "fuse.s3fs", "fuse.gcsfuse", "fuse.juicefs", "fuse.cephfs", "fuse.rclone"}
STALE_TMP_S = 600  # a temporary shard unmodified this long in a shared --input_cache DIR is a dead writer's


# ---------------------------------------------------------------------------------------
# where: --input_cache off | auto | DIR
# ---------------------------------------------------------------------------------------
def add_args(g) -> None:
    """The ``--input_cache`` flag, in argument group ``g``."""
    g.add_argument("--input_cache", default="auto", metavar="off|auto|DIR",
                   help="the feature pass's (and kNN monitor's) decoded inputs, written during the first pass and "
                        "read by the later ones and by resumed runs (same results, bitwise): 3 x size^2 bytes per "
                        "image (ImageNet at 224: 193 GB), written only if the disk keeps 5%% (at least 2 GiB) "
                        "free. auto: in EXP/input_cache unless EXP is on a network file system (then off: give a "
                        "node-local DIR); DIR: in DIR, shared by the runs on the same images; off: decode every pass")


def filesystem_type(path: str | os.PathLike) -> str:
    """The type of the file system holding ``path`` (its nearest existing parent), from
    /proc/mounts; '' where unknown (not Linux)."""
    p = os.path.realpath(path)
    while not os.path.exists(p):
        p = os.path.dirname(p)
    best, kind = "", ""
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3:
                    continue
                mnt = parts[1].replace("\\040", " ")
                if (p == mnt or p.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                    best, kind = mnt, parts[2]
    except OSError:
        return ""
    return kind


_SAID: set = set()


def resolve(choice: str, exp: str | os.PathLike) -> Path | None:
    """The cache root for ``--input_cache choice`` of a run in ``exp``: None for ``off``, and for
    ``auto`` when ``exp`` is on a network file system (said once: reading 3 S^2 bytes per image
    every epoch over a shared file system would load it for everyone; a node-local disk is what
    the cache wants); ``exp``/input_cache for ``auto`` elsewhere; the folder ``choice`` otherwise."""
    if choice == "off":
        return None
    if choice != "auto":
        return Path(choice).absolute()
    kind = filesystem_type(exp)
    if kind in NETWORK_FS or kind.startswith("fuse."):
        if (choice, str(exp)) not in _SAID:
            _SAID.add((choice, str(exp)))
            log.info("input cache off: %s is on a network file system (%s); --input_cache DIR on a node-local disk "
                     "decodes the feature pass's images once instead of every epoch", exp, kind)
        return None
    return Path(exp).absolute() / "input_cache"


def folder_name(what: str, root: str) -> str:
    """The sub-folder of one image set in a cache root: ``what`` (features, knn), the set's folder
    name and a hash of its absolute path (several data sets can share a ``--input_cache DIR``)."""
    root = os.path.abspath(root)
    return f"{what}-{Path(root).name or 'root'}-{hashlib.sha256(root.encode('utf-8', 'surrogateescape')).hexdigest()[:12]}"


def disk_space(path: Path) -> tuple[int, int]:
    """(free, total) bytes of the file system holding ``path``."""
    u = shutil.disk_usage(path)
    return u.free, u.total


def reserve_bytes(total: int) -> int:
    """Free space the cache always leaves on its file system: 5% of it, at least 2 GiB."""
    return max(2 << 30, total // 20)


# ---------------------------------------------------------------------------------------
# what a shard must match
# ---------------------------------------------------------------------------------------
def describe_transform(dataset) -> str:
    """The pixels' recipe: the transform, the reduced-size decoding, and the decoders' versions
    (another Pillow or libjpeg-turbo may round differently)."""
    import PIL
    import torchvision
    from PIL import features
    return (f"{dataset.transform!r} draft={getattr(dataset, 'draft', None)} Pillow={PIL.__version__} "
            f"libjpeg={features.version('jpg')} torchvision={torchvision.__version__}")


def list_hash(dataset, positions: range) -> str:
    """sha256 of the file names of the images at ``positions`` (a FileList: of the list's bytes,
    its root and the entries kept, without a Python string per image)."""
    paths = dataset.paths
    h = hashlib.sha256()
    if isinstance(paths, list):
        for i in positions:
            h.update(paths[i].encode("utf-8", "surrogateescape") + b"\n")
    else:  # file_list.FileList
        h.update(f"{paths.sha256}\n{paths.root}\n".encode("utf-8", "surrogateescape"))
        for lo in range(0, len(positions), 1 << 20):  # in blocks: memory O(1 M), not O(N / W)
            block = np.asarray(positions[lo:lo + (1 << 20)], dtype=np.int64)
            h.update(np.ascontiguousarray(paths.starts[block]).tobytes())
            h.update(np.ascontiguousarray(paths.ends[block]).tobytes())
    return h.hexdigest()


class Layout:
    """Byte offsets in a shard of ``n`` images of ``nbytes`` each: images, then the index, size,
    mtime and CRC arrays, then the header."""

    def __init__(self, n: int, nbytes: int):
        self.n, self.nbytes = n, nbytes
        self.idx = n * nbytes
        self.size = self.idx + 8 * n
        self.mtime = self.size + 8 * n
        self.crc = self.mtime + 8 * n
        self.header = self.crc + 4 * n

    def total(self, header: bytes) -> int:
        return self.header + len(header) + 16


def read_header(path: Path) -> tuple[dict | None, str]:
    """A shard's header, or (None, why it cannot be used)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            if size < 16:
                return None, f"{size} bytes"
            f.seek(size - 16)
            tail = f.read(16)
            if tail[8:] != MAGIC:
                return None, "no end marker (incomplete or not a shard)"
            n = int.from_bytes(tail[:8], "little")
            if n > size - 16:
                return None, "header length past the file's start"
            f.seek(size - 16 - n)
            header = json.loads(f.read(n))
        lay = Layout(int(header["n"]), int(np.prod(header["shape"])))
        if lay.total(b"x" * n) != size:
            return None, f"{size} bytes where its header says {lay.total(b'x' * n)}"
        return header, ""
    except (OSError, ValueError, KeyError, TypeError) as e:
        return None, f"{type(e).__name__}: {e}"


def mismatch(header: dict, expected: dict) -> str:
    """'' when a shard's header fits this run, else why not."""
    if header.get("format") != FORMAT:
        return f"its format {header.get('format')} is not this code's {FORMAT}"
    if header["shape"] != expected["shape"]:
        return f"the image size changed ({header['shape'][-1]} -> {expected['shape'][-1]} px)"
    if header["transform"] != expected["transform"]:
        return f"the transform changed ({header['transform']} -> {expected['transform']})"
    if header["n"] != expected["n"] or header["files"] != expected["files"]:
        return f"the file list changed ({header['n']} -> {expected['n']} images of this process)"
    return ""


# ---------------------------------------------------------------------------------------
# the loader workers: one batch per item
# ---------------------------------------------------------------------------------------
def _stat(path: str) -> tuple[int, int]:
    try:
        st = os.stat(path)
        return int(st.st_size), int(st.st_mtime_ns)
    except OSError:
        return -1, -1


class ShardBatches(Dataset):
    """Item b: batch b of this process's images (``positions`` of ``dataset``), ``batch`` per item.

    ``shard`` None (writing): each image's file size and mtime (read before decoding it, so an
    image changed meanwhile counts as changed at the next pass), then the image decoded as the
    dataset decodes it; returns ``(imgs (B, 3, S, S) uint8, idx, sizes, mtimes (B,) int64, crcs
    (B,) int64)``. ``shard`` a path (reading): the images and their records read from the shard,
    each checked (CRC, file size and mtime, index); one that fails is decoded from its file
    instead. Returns ``(imgs, idx, problems)``, problems a list of ``(position, why)``.
    """

    def __init__(self, dataset, positions: range, batch: int, shape: tuple[int, ...], shard: Path | None = None):
        self.dataset, self.positions, self.batch, self.shape = dataset, positions, int(batch), tuple(shape)
        self.shard = None if shard is None else str(shard)
        self.layout = Layout(len(positions), int(np.prod(shape)))

    def __len__(self) -> int:
        return math.ceil(len(self.positions) / self.batch)

    def __getitem__(self, b: int):
        lo, hi = b * self.batch, min(len(self.positions), (b + 1) * self.batch)
        return self._write_item(lo, hi) if self.shard is None else self._read_item(lo, hi)

    def _write_item(self, lo: int, hi: int):
        out = data.batch_buffer((hi - lo, *self.shape))
        idx, sizes, mtimes = (torch.empty(hi - lo, dtype=torch.long) for _ in range(3))
        for k, i in enumerate(self.positions[lo:hi]):
            sizes[k], mtimes[k] = _stat(self.dataset.paths[i])
            out[k], idx[k] = self.dataset[i]
        crcs = torch.tensor([zlib.crc32(out[k].numpy()) for k in range(hi - lo)], dtype=torch.long)
        return out, idx, sizes, mtimes, crcs

    @staticmethod
    def _pread(fd: int, offset: int, nbytes: int, into: np.ndarray | None = None) -> np.ndarray:
        buf = np.empty(nbytes, dtype=np.uint8) if into is None else into.reshape(-1)
        got = os.preadv(fd, [buf], offset)
        if got != nbytes:
            raise OSError(f"short read: {got} of {nbytes} bytes at {offset}")
        return buf

    def _read_item(self, lo: int, hi: int):
        lay, n = self.layout, hi - lo
        out = data.batch_buffer((n, *self.shape))
        pos = self.positions[lo:hi]
        try:
            fd = os.open(self.shard, os.O_RDONLY)  # per batch: ~10 us against ~n x 3 S^2 bytes read
            try:
                self._pread(fd, lo * lay.nbytes, n * lay.nbytes, out.numpy())
                idx = self._pread(fd, lay.idx + 8 * lo, 8 * n).view(np.int64)
                sizes = self._pread(fd, lay.size + 8 * lo, 8 * n).view(np.int64)
                mtimes = self._pread(fd, lay.mtime + 8 * lo, 8 * n).view(np.int64)
                crcs = self._pread(fd, lay.crc + 4 * lo, 4 * n).view(np.uint32)
            finally:
                os.close(fd)
            why = [self._check(out[k], int(idx[k]), int(pos[k]), int(sizes[k]), int(mtimes[k]), int(crcs[k]))
                   for k in range(n)]
        except OSError as e:
            why = [f"read error: {e}"] * n
        problems, served = [], []
        for k, reason in enumerate(why):
            p = int(pos[k])
            if reason is None:
                served.append(p)
                continue
            out[k], i = self.dataset[p]  # decoded from the file, as without the cache
            served.append(int(i))
            if reason:
                problems.append((p, reason))
        return out, torch.tensor(served, dtype=torch.long), problems

    def _check(self, img: torch.Tensor, idx: int, pos: int, size: int, mtime: int, crc: int) -> str | None:
        """None: serve the cached image; '' decode it (an unreadable image, not a fault of the
        cache); else why the shard no longer fits."""
        if idx < 0:
            return ""
        if idx != pos:
            return f"index {idx} where {pos} was expected (damaged)"
        if zlib.crc32(img.numpy()) != crc:
            return "checksum mismatch (damaged)"
        if _stat(self.dataset.paths[pos]) != (size, mtime):
            return f"{self.dataset.paths[pos]} changed since the cache was written (size, mtime)"
        return None



# ---------------------------------------------------------------------------------------
# the loader
# ---------------------------------------------------------------------------------------
def feature_loader(dataset, batch: int, workers: int, device: torch.device, size: int, rank: int = 0,
                   world_size: int = 1, cache: Path | None = None, what: str = "features") -> "FeatureLoader":
    """The feature pass's loader over images ``rank``, ``rank + world_size``, ... of ``dataset``
    (items ``((3, size, size) uint8, index)``, e.g. ``data.IndexedImageFolder`` with
    ``data.eval_transform(size, normalize=False)``): batches ``((B, 3, size, size) uint8, (B,)
    int64)``, through the input cache under ``cache`` (see :func:`resolve`; None: decoded every
    pass, exactly ``data.make_loader`` over the process's share). ``what`` names the image set in
    the cache (a sub-folder per set and data folder, ``dataset.root``)."""
    return FeatureLoader(dataset, batch, workers, device, size, rank, world_size, cache, what)


class FeatureLoader:
    """Iterable of a feature pass's batches; each iteration reads this process's shard when it
    fits the run, else writes it while decoding (disk budget permitting), else decodes."""

    def __init__(self, dataset, batch: int, workers: int, device: torch.device, size: int, rank: int = 0,
                 world_size: int = 1, cache: Path | None = None, what: str = "features"):
        self.source, self.batch, self.workers, self.device = dataset, int(batch), int(workers), torch.device(device)
        self.positions = range(rank, len(dataset), world_size)  # a range: O(1) memory for any N
        # what today's loader iterates (and what mark_unreadable reads the paths of)
        self.dataset = dataset if world_size == 1 else Subset(dataset, self.positions)
        self.shape = (3, int(size), int(size))
        self.rank, self.world = int(rank), int(world_size)
        self.folder = None if cache is None else Path(cache) / folder_name(what, getattr(dataset, "root", what))
        self.shard = None if cache is None else self.folder / f"w{self.world}-r{self.rank}.bin"
        self._expected: dict | None = None
        self.last_mode = ""  # read / write / decode: what the last pass did (tests, benchmarks)

    def __len__(self) -> int:
        return math.ceil(len(self.positions) / self.batch)

    def __iter__(self):
        mode = "decode" if self.shard is None else self._plan()
        self.last_mode = mode
        if mode == "read":
            return self._read_pass()
        if mode == "write":
            return self._write_pass()
        return iter(data.make_loader(self.dataset, self.batch, self.workers, self.device))

    # -- deciding ---------------------------------------------------------------------
    def expected(self) -> dict:
        if self._expected is None:
            self._expected = {"format": FORMAT, "n": len(self.positions), "shape": list(self.shape),
                              "transform": describe_transform(self.source),
                              "files": list_hash(self.source, self.positions)}
        return self._expected

    def _plan(self) -> str:
        reason = "no cache yet"
        if self.shard.exists():
            header, why = read_header(self.shard)
            reason = f"it is damaged or incomplete ({why})" if header is None else mismatch(header, self.expected())
            if not reason:
                return "read"
            log.warning("input cache %s: %s: rebuilding it", self.shard, reason)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._remove_stale()
            return "write" if self._fits() else "decode"
        except OSError as e:
            log.warning("input cache %s cannot be written (%s): decoding every pass", self.shard, e)
            return "decode"

    def _remove_stale(self) -> None:
        """This shard's temporary files left by a killed writer, and the shards of other world
        sizes whose number maps to this rank (each removed by exactly one rank)."""
        for p in self.folder.glob(f".tmp-{self.shard.name}~*"):
            try:
                if _writer_gone(p):
                    p.unlink()
            except OSError:
                pass
        other = [p for p in self.folder.glob("w*-r*.bin") if p != self.shard and _shard_rank(p) % self.world == self.rank]
        for p in other:
            p.unlink(missing_ok=True)
        if other:
            log.info("input cache: removed %d shard(s) of another number of processes from %s", len(other), self.folder)

    def _fits(self) -> bool:
        """Whether this process's shard fits the disk budget: after every process of this node
        (LOCAL_WORLD_SIZE, sharing the disk) writes a shard this size, 5% of the file system, at
        least 2 GiB, stays free."""
        n, nbytes = len(self.positions), int(np.prod(self.shape))
        need = n * (nbytes + META_BYTES) + 4096
        local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
        free, total = disk_space(self.folder)
        if self.shard.exists():
            free += self.shard.stat().st_size  # replaced
        keep = reserve_bytes(total)
        if free - local * need >= keep:
            log.info("input cache: writing %s during this pass (%d images x 3 x %d^2 bytes = %.2f GB)", self.shard, n,
                     self.shape[-1], need / 1e9)
            return True
        log.warning("input cache: not written: %d process(es) x %.2f GB (N/W images x 3 x %d^2 bytes) would leave "
                    "%.2f GB of %s's file system free, under its %.2f GB reserve; decoding every pass "
                    "(--input_cache DIR on a larger local disk)", local, need / 1e9, self.shape[-1],
                    (free - local * need) / 1e9, self.folder, keep / 1e9)
        return False

    # -- passes ---------------------------------------------------------------------------
    def _loader(self, shard: Path | None):
        ds = ShardBatches(self.source, self.positions, self.batch, self.shape, shard)
        return data.make_loader(ds, None, self.workers, self.device)

    def _read_pass(self):
        problems, first = 0, []
        for imgs, idx, probs in self._loader(self.shard):
            problems += len(probs)
            first += probs[:3 - len(first)]
            yield imgs, idx
        if problems:  # the images were decoded from their files; the next pass writes the shard again
            log.warning("input cache %s: %d image(s) no longer match it (first: %s): decoded from their files; "
                        "the cache is rebuilt at the next pass", self.shard, problems,
                        "; ".join(f"image {p}: {why}" for p, why in first))
            self.shard.unlink(missing_ok=True)

    def _write_pass(self):
        lay = Layout(len(self.positions), int(np.prod(self.shape)))
        fd, tmp = tempfile.mkstemp(prefix=f".tmp-{self.shard.name}~{WRITER}~", dir=self.folder)
        writing = True
        try:
            for b, (imgs, idx, sizes, mtimes, crcs) in enumerate(self._loader(None)):
                if writing:
                    writing = self._write_batch(fd, tmp, lay, b * self.batch, imgs, idx, sizes, mtimes, crcs)
                yield imgs, idx
            if writing:
                self._finish(fd, tmp, lay)
        except fileio.FaultInjected:  # a simulated kill leaves its temporary file, as a real one does
            raise
        except BaseException:
            _drop(tmp)
            raise
        finally:
            os.close(fd)

    def _write_batch(self, fd: int, tmp: str, lay: Layout, lo: int, imgs, idx, sizes, mtimes, crcs) -> bool:
        n = len(idx)
        try:
            for offset, arr in ((lo * lay.nbytes, imgs), (lay.idx + 8 * lo, idx), (lay.size + 8 * lo, sizes),
                                (lay.mtime + 8 * lo, mtimes), (lay.crc + 4 * lo, crcs.to(torch.int32))):
                buf = arr.numpy().reshape(-1).view(np.uint8)
                if os.pwrite(fd, buf, offset) != buf.nbytes:
                    raise OSError(f"short write at byte {offset}")
            return True
        except OSError as e:
            log.warning("input cache: writing %s failed at image %d of %d (%s): decoding every pass", self.shard,
                        lo + n, lay.n, e)
            _drop(tmp)
            return False

    def _finish(self, fd: int, tmp: str, lay: Layout) -> None:
        header = json.dumps({**self.expected(), "rank": self.rank, "world_size": self.world}).encode()
        try:
            os.pwrite(fd, header + len(header).to_bytes(8, "little") + MAGIC, lay.header)
            fileio.fault_point("input_cache")  # tests: die with the shard written but not renamed
            if fileio.fsync_enabled():
                os.fsync(fd)
            os.chmod(tmp, 0o666 & ~fileio._umask())
            os.replace(tmp, self.shard)
        except OSError as e:
            log.warning("input cache: finishing %s failed (%s): decoding every pass", self.shard, e)
            _drop(tmp)


def _drop(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


# who writes a temporary shard: host, process id and a token of this process (the name says it)
WRITER = f"{os.uname().nodename.replace('~', '_')}~{os.getpid()}~{os.urandom(4).hex()}"


def _writer_gone(tmp: Path) -> bool:
    """Whether a temporary shard's writer is no longer writing it: this process (a pass it gave
    up), a process of this host that no longer exists, or anyone after STALE_TMP_S seconds
    without a write (another host sharing the folder)."""
    import time
    parts = tmp.name.split("~")
    if len(parts) >= 5 and parts[1] == os.uname().nodename.replace("~", "_"):
        if parts[1:4] == WRITER.split("~"):
            return True
        try:
            os.kill(int(parts[2]), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, ValueError):
            pass
    return tmp.stat().st_mtime < time.time() - STALE_TMP_S


def _shard_rank(p: Path) -> int:
    try:
        return int(p.stem.split("-r")[1])
    except (IndexError, ValueError):
        return -1
