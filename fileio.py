"""Files that survive a kill: atomic writes, JSON-lines logs, and the fault points of the tests.

A leaf module (imports no project module). Every file a run writes goes through
:func:`atomic_write` (temporary file, fsync, rename), so a kill at any moment leaves the old or
the new file, never a torn one; :func:`fault_point` marks the places where the fault-injection
tests kill the process.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from typing import Any, Callable

import numpy as np
import torch

log = logging.getLogger("deepcluster")


# ---------------------------------------------------------------------------------------
# fault injection (tests): DEEPCLUSTER_FAULT="point:n" stops the process at the n-th hit of
# `point`: SIGKILL by default, or raises FaultInjected when DEEPCLUSTER_FAULT_MODE=raise
# (in-process tests). DEEPCLUSTER_FAULT=count only counts the hits of every point.
# "point:n@r" fires on torchrun rank r only (RANK; the other ranks run on), and only in the
# first launch of a torchrun job (TORCHELASTIC_RESTART_COUNT 0): its restarts run clean.
# ---------------------------------------------------------------------------------------
FAULT_HITS: dict[str, int] = {}
# tests: when set, called as hook(point, hit) at every hit instead of the environment's fault
# (e.g. to copy the experiment folder exactly as a kill there would leave it)
FAULT_HOOK: Callable[[str, int], None] | None = None


class FaultInjected(BaseException):
    """Raised instead of SIGKILL at an injected fault (BaseException: nothing catches it)."""


def fault_point(name: str) -> None:
    """Die abruptly at the n-th time ``name`` is reached, when asked by the environment.

    ``DEEPCLUSTER_FAULT=point:n`` (any process), ``point:n@rank`` (that rank, first launch
    attempt only), or ``spec0;spec1;...``: spec i applies to torchrun's launch attempt i
    (``TORCHELASTIC_RESTART_COUNT``), so one job can be killed at a different point in each
    attempt; n counts the hits of this process (a restarted worker counts from 1).
    """
    if FAULT_HOOK is not None:
        FAULT_HITS[name] = FAULT_HITS.get(name, 0) + 1
        FAULT_HOOK(name, FAULT_HITS[name])
        return
    spec = os.environ.get("DEEPCLUSTER_FAULT")
    if not spec:
        return
    FAULT_HITS[name] = FAULT_HITS.get(name, 0) + 1
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    items = spec.split(";")
    if len(items) > 1:
        if attempt >= len(items):
            return
        spec, attempt = items[attempt], 0
    spec, _, rank = spec.partition("@")
    point, _, count = spec.partition(":")
    if point != name or FAULT_HITS[name] < int(count or 1):
        return
    if rank and (int(os.environ.get("RANK", "0")) != int(rank) or attempt > 0):
        return
    if os.environ.get("DEEPCLUSTER_FAULT_MODE") == "raise":
        raise FaultInjected(f"{name}:{FAULT_HITS[name]}")
    import signal
    os.kill(os.getpid(), signal.SIGKILL)


# ---------------------------------------------------------------------------------------
# atomic files
# ---------------------------------------------------------------------------------------
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_enabled() -> bool:
    """Whether writes are flushed to the disk (``os.fsync``) before their rename: always, unless
    ``DEEPCLUSTER_FSYNC=0``. The test suite sets it: a kill of the process (what the tests
    inflict) keeps the page cache, and only a power loss needs the flush, which on this VM's
    disk took 0.3-2 s per 173 MB checkpoint."""
    return os.environ.get("DEEPCLUSTER_FSYNC", "1") != "0"


def atomic_write(path: str | os.PathLike, write_fn: Callable) -> None:
    """Write ``path`` through ``write_fn(binary file)`` into a temporary file, then rename.

    The file gets the mode a plain ``open`` would give (0666 minus the umask), not
    mkstemp's 0600, so lab-mates can read checkpoints and cluster files.
    """
    path = str(path)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=d)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write_fn(f)
            f.flush()
            # tests: die with the temp file written but not renamed
            fault_point("save" if path.endswith(".pth.tar") else "write")
            if fsync_enabled():
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except FaultInjected:  # a simulated kill leaves its temporary file, as a real one does
        raise
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError) and e.filename is None:  # a failed write names no file: say which
            e.filename = path
        raise
    if not fsync_enabled():
        return
    try:  # make the rename durable
        dfd = os.open(d, os.O_RDONLY)
        os.fsync(dfd)
        os.close(dfd)
    except OSError:
        pass


class _KeepWriteError:
    """A binary file that keeps the OSError of a failed write: torch's zip writer turns it into
    ``RuntimeError: [enforce fail at inline_container.cc] unexpected pos``, which says nothing
    of a full disk."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def __getattr__(self, name: str):
        return getattr(self.f, name)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename over ``path``. A write
    that fails (full disk, quota, file size limit) raises its OSError, naming ``path``."""
    def write(f):
        out = _KeepWriteError(f)
        try:
            torch.save(obj, out)
        except RuntimeError:
            if out.error is not None:
                raise out.error from None
            raise
    atomic_write(path, write)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def atomic_np_save(path: str | os.PathLike, arr: np.ndarray) -> None:
    atomic_write(path, lambda f: np.save(f, arr))


# ---------------------------------------------------------------------------------------
# checksums of checkpoints
# ---------------------------------------------------------------------------------------
CHECKSUM_KEY = "checksum"  # in a checkpoint dict: payload_digest of every other key
CHECKSUM_MISMATCH = "its contents do not match the checksum saved with it (damaged on disk or in a copy)"
_CHUNK = 1 << 24  # tensor bytes are hashed in 16 MiB chunks, in threads (hashlib releases the GIL)


def payload_digest(obj: Any) -> str:
    """``"sha256:<hex>"`` of a checkpoint's payload: its structure and plain values (type and
    ``repr``, dict keys in their order) and every tensor's dtype, shape and bytes (row-major,
    whatever its strides or device). A tensor's bytes enter as the sha256 of each 16 MiB chunk,
    hashed in threads (hashlib releases the GIL): 0.16 s for a 173 MB AlexNet checkpoint on one
    core of our 2-core VM (benchmarks/bench_checksum.py)."""
    items: list = []  # bytes (structure, values) and memoryviews (chunks of tensor data), in order
    _flatten(obj, items)
    chunks = [it for it in items if isinstance(it, memoryview)]
    workers = min(8, os.cpu_count() or 1, len(chunks))
    if workers > 1 and sum(len(c) for c in chunks) >= 4 * _CHUNK:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(workers) as pool:
            digests = iter(list(pool.map(_sha256, chunks)))
    else:
        digests = map(_sha256, chunks)
    h = hashlib.sha256()
    for it in items:
        h.update(next(digests) if isinstance(it, memoryview) else it)
    return "sha256:" + h.hexdigest()


def _sha256(data) -> bytes:
    return hashlib.sha256(data).digest()


def _flatten(x: Any, out: list) -> None:
    if isinstance(x, (torch.Tensor, np.ndarray)):
        t = torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x.detach()
        t = t.cpu().contiguous()  # no copy for a dense CPU tensor
        out.append(f"T{t.dtype}{list(t.shape)}".encode())
        if t.numel():
            data = memoryview(t.reshape(-1).view(torch.uint8).numpy())
            out.extend(data[i:i + _CHUNK] for i in range(0, len(data), _CHUNK))
    elif isinstance(x, dict):
        out.append(b"{%d" % len(x))
        for k, v in x.items():
            _flatten(k, out)
            _flatten(v, out)
    elif isinstance(x, (list, tuple)):
        out.append(b"%s%d" % (b"(" if isinstance(x, tuple) else b"[", len(x)))
        for v in x:
            _flatten(v, out)
    else:  # str, int, float, bool, None, bytes, torch.dtype...
        r = repr(x).encode()
        out.append(b"%s:%d:%s" % (type(x).__name__.encode(), len(r), r))


def with_checksum(state: dict) -> dict:
    """``state`` with :data:`CHECKSUM_KEY` (last): the digest of everything else in it."""
    payload = {k: v for k, v in state.items() if k != CHECKSUM_KEY}
    return {**payload, CHECKSUM_KEY: payload_digest(payload)}


def checksum_mismatch(ckpt: dict) -> bool:
    """True when ``ckpt`` carries a checksum that its contents do not match (damaged on disk or
    in a copy); False when it matches or there is none (checkpoints older than the checksum)."""
    saved = ckpt.get(CHECKSUM_KEY)
    if saved is None:
        return False
    return payload_digest({k: v for k, v in ckpt.items() if k != CHECKSUM_KEY}) != saved


_VERIFIED: dict[str, tuple] = {}  # path -> identity of the file whose checksum matched


def _identity(path: str | os.PathLike) -> tuple:
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def mark_verified(path: str | os.PathLike) -> None:
    """The checksum of the file now at ``path`` matched (:func:`is_verified` until it changes)."""
    with contextlib.suppress(OSError):
        _VERIFIED[os.path.abspath(path)] = _identity(path)


def is_verified(path: str | os.PathLike) -> bool:
    """Whether this process verified the file now at ``path`` (same inode, size and mtime: a
    checkpoint is replaced by a rename, never rewritten in place), so a second full load of it
    skips the digest."""
    try:
        return _VERIFIED.get(os.path.abspath(path)) == _identity(path)
    except OSError:
        return False


# ---------------------------------------------------------------------------------------
# JSON-lines logs
# ---------------------------------------------------------------------------------------
def _ends_torn(path: str) -> bool:
    """True when ``path`` exists, is not empty and does not end with a newline."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() == 0:
                return False
            f.seek(-1, os.SEEK_END)
            return f.read(1) != b"\n"
    except OSError:
        return False


def read_jsonl(path: str | os.PathLike) -> list[Any]:
    """Read a JSON-lines file; a torn last line (crash while appending) is ignored."""
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning("ignoring an unreadable line in %s", path)
    return out
