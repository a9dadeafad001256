"""Utilities kept from the original API (``UnifLabelSampler``, ``AverageMeter``, ``Logger``,
``learning_rate_decay``, ``load_model``) plus the cluster log, the run's device and process
group (``init_runtime``), the (N, D) feature matrix (``FeatureStore``, ``gather_rows``,
``to_channels_last``) and the script plumbing shared by every CLI (``run_cli``, ...).

Saving and loading checkpoints (atomic writes, RNG state, resume) lives in checkpoint.py.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import pickle
import random
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

import checkpoint
import clustering
import data
import models

log = logging.getLogger("deepcluster")


class ScriptError(RuntimeError):
    """Bad input or a run that cannot go on; the message names the file, flag or value.

    The scripts' own error types derive from it; :func:`run_cli` prints it as one line."""


# ---------------------------------------------------------------------------------------
# sampling
# ---------------------------------------------------------------------------------------
class UnifLabelSampler(Sampler):
    """Draw ``N`` dataset indices so that every non-empty cluster is drawn equally often.

    Each non-empty cluster contributes ``size = int(N / m) + 1`` draws (m = number of
    non-empty clusters), with replacement only when it holds ``<= size`` images; the
    ``m * size - N`` surplus draws are taken off distinct clusters (one each), so that the
    N shuffled draws serve every cluster ``size`` or ``size - 1`` times. The indices are *dataset* indices: use it with a
    dataset indexed by image (``clustering.cluster_assign(..., order='index')``); training
    shards them across ranks with :class:`SeededShardSampler`.
    """

    def __init__(self, N: int, images_lists: Sequence[Sequence[int]], rng: np.random.RandomState | None = None):
        self.N = int(N)
        self.images_lists = images_lists
        self.rng = rng if rng is not None else np.random.mtrand._rand  # the seeded global RNG
        self.indexes = self.generate_indexes_epoch()

    def generate_indexes_epoch(self) -> np.ndarray:
        nonempty = [lst for lst in self.images_lists if len(lst) > 0]
        if not nonempty:
            raise ValueError("UnifLabelSampler: every cluster is empty")
        m = len(nonempty)
        size = int(self.N / m) + 1
        # m * size exceeds N by 1..m draws. Truncating the shuffled draws (the original)
        # takes the excess at random, so per-cluster counts drift by several draws when
        # there are many clusters; taking one draw off `excess` distinct clusters instead
        # keeps every cluster's count within one of the others.
        excess = m * size - self.N
        counts = np.full(m, size, dtype=np.int64)
        counts[self.rng.choice(m, excess, replace=False)] -= 1
        draws = np.empty(self.N, dtype=np.int64)
        pos = 0
        for lst, cnt in zip(nonempty, counts):
            draws[pos:pos + cnt] = self.rng.choice(
                np.asarray(lst, dtype=np.int64), cnt, replace=(len(lst) <= size))
            pos += cnt
        self.rng.shuffle(draws)
        return draws

    def __iter__(self) -> Iterator[int]:
        return iter(self.indexes.tolist())

    def __len__(self) -> int:
        return len(self.indexes)


class SeededShardSampler(Sampler):
    """Serve a fixed list of draws as ``(index, augmentation_seed)`` items.

    Rank r takes positions r, r + W, r + 2W, ... of ``draws`` (each draw served by exactly
    one rank), skipping its first ``start`` items (mid-epoch resume). With a per-rank batch
    of B / W (B the global batch, a multiple of W), step i of every rank thus covers exactly
    the global positions [i B, (i + 1) B): the epoch's steps are the same for any W, and a
    run stopped after i steps resumes on another W at position i B with ``start`` = i B / W.
    The seed of position p is a function of (base_seed, p) only, so a resumed or re-sharded
    epoch augments every sample exactly as an uninterrupted one.
    """

    def __init__(self, draws: np.ndarray, base_seed: int, rank: int = 0, world_size: int = 1, start: int = 0):
        self.draws = np.asarray(draws, dtype=np.int64)
        self.base_seed, self.rank, self.world_size, self.start = int(base_seed), rank, world_size, int(start)

    def positions(self) -> np.ndarray:
        return np.arange(self.rank, len(self.draws), self.world_size)[self.start:]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        pos = self.positions()
        seeds = (self.base_seed * 1_000_003 + pos) % (2 ** 62)
        return iter(zip(self.draws[pos].tolist(), seeds.tolist()))

    def __len__(self) -> int:
        return len(self.positions())


# ---------------------------------------------------------------------------------------
# meters and logs
# ---------------------------------------------------------------------------------------
class AverageMeter:
    """Computes and stores the average and current value."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.val = 0.0
        self.avg = 0.0
        self.sum = 0.0
        self.count = 0

    @classmethod
    def from_sum(cls, total: float, count: int) -> "AverageMeter":
        """A meter holding ``count`` values of sum ``total`` (restored as is, no rounding)."""
        m = cls()
        m.sum, m.count = float(total), int(count)
        m.avg = m.sum / m.count if m.count else 0.0
        return m

    def update(self, val: float, n: int = 1) -> None:
        self.val = float(val)
        self.sum += float(val) * n
        self.count += n
        self.avg = self.sum / self.count


class Logger:
    """Append-only JSON-lines log: ``log(record)`` adds one line (never rewrites history)."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        self.data: list[Any] = read_jsonl(self.path) if os.path.exists(self.path) else []
        if _ends_torn(self.path):
            # A crash mid-append left a line without its newline: the next record would be
            # glued to it and lost. Rewrite the readable records first.
            self.truncate(len(self.data))

    def log(self, record: Any) -> None:
        self.data.append(record)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def truncate(self, keep: int) -> None:
        """Keep the first ``keep`` records (used on resume to drop epochs to be redone)."""
        self.data = self.data[:keep]
        checkpoint.atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.data))


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


def learning_rate_decay(optimizer: torch.optim.Optimizer, t: int, lr_0: float) -> None:
    """lr_t = lr_0 / sqrt(1 + lr_0 * weight_decay * t), per parameter group (the original's)."""
    for group in optimizer.param_groups:
        group["lr"] = float(lr_0 / np.sqrt(1 + lr_0 * group["weight_decay"] * t))


# ---------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------
def load_model(path: str | os.PathLike | None, arch: str | None = None, purpose: str = "") -> torch.nn.Module:
    """Load a model from our checkpoints, the released original ones or torchvision-layout weights.

    Accepts ``{'state_dict': ...}`` checkpoints and bare state dicts; ``features.N.*``,
    ``features.module.N.*`` and ``module.*`` keys; missing BN counters; Python-2 pickles.
    The architecture, Sobel and k are read from the weights (``model_config`` wins when
    present). A ResNet-50 state dict may carry a head this model has no use for (the
    projection head and prototypes of SwAV's DeepCluster-v2 release): those keys are
    ignored, logged and listed in ``model.ignored_keys``. ``arch``, when given, must match;
    ``purpose`` names who needs it in that error ("retrieval needs a vgg16 model, ...").
    """
    if not path:
        raise checkpoint.CheckpointError("no model given: pass --model PATH (a DeepCluster checkpoint)")
    where = f"checkpoint {str(path)!r}"
    ckpt = checkpoint.torch_load(path)
    sd = ckpt.get("state_dict")
    if sd is None and models.detect_arch(models.clean_state_dict(ckpt)) is not None:
        sd = ckpt  # a bare state dict
    if not isinstance(sd, dict):
        raise checkpoint.CheckpointError(f"{where} has no 'state_dict' and is not a state dict of "
                                         f"{', '.join(models.ARCHS)}")
    held = ckpt.get("arch") or (ckpt.get("model_config") or {}).get("arch") or \
        models.detect_arch(models.clean_state_dict(sd))
    if arch is not None and held is not None and held != arch:
        raise checkpoint.CheckpointError(f"{purpose or 'this run'} needs a {arch} model, but {where} holds a {held}")
    try:
        model, ignored = models.from_state_dict(sd, arch or held, ckpt.get("model_config"))
    except models.StateDictError as e:
        raise checkpoint.CheckpointError(f"{where}: {e}") from None
    model.ignored_keys = ignored
    if ignored:
        heads = sorted({k.replace("module.", "").split(".")[0] for k in ignored})
        log.warning("%s: ignored %d keys of heads %s has no use for (%s)", where, len(ignored),
                    model.arch, ", ".join(heads))
    return model


# ---------------------------------------------------------------------------------------
# cluster assignments log: exp/clusters/epoch_00000.npy, one compact array per epoch
# ---------------------------------------------------------------------------------------
class ClusterLog:
    """Per-epoch cluster assignments, one ``.npy`` file per epoch (never rewritten).

    ``labels[i]`` is the cluster of image i (original cluster ids; uint16 when k allows).
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def path(self, epoch: int) -> Path:
        return self.folder / f"epoch_{epoch:05d}.npy"

    def save(self, epoch: int, labels: np.ndarray, k: int) -> None:
        """``labels[i] == -1`` marks an image left out of the clustering (unreadable)."""
        labels = np.asarray(labels)
        dtype = np.uint16 if k <= np.iinfo(np.uint16).max and (labels.size == 0 or labels.min() >= 0) else np.int32
        checkpoint.atomic_np_save(self.path(epoch), np.asarray(labels).astype(dtype))

    def epochs(self) -> list[int]:
        return sorted(int(p.stem.split("_")[1]) for p in self.folder.glob("epoch_*.npy"))

    def load(self, epoch: int) -> np.ndarray:
        return np.load(self.path(epoch)).astype(np.int64)

    def history(self, upto: int | None = None) -> list[np.ndarray]:
        """Assignments of every stored epoch (< upto when given), in epoch order."""
        return [self.load(e) for e in self.epochs() if upto is None or e < upto]

    def truncate(self, upto: int) -> None:
        """Remove epochs >= upto (they will be recomputed after a resume)."""
        for e in self.epochs():
            if e >= upto:
                self.path(e).unlink()


def export_clusters_pickle(exp: str | os.PathLike, out: str | os.PathLike, epoch: int | None = None,
                           image_paths: Sequence[str] | None = None) -> str:
    """Convert the stored assignments to the original pickle formats.

    With ``image_paths`` (one per image, in dataset order): the released format for one epoch
    (default: the last), a list of ``(image_path, cluster_index)``. Without: the original
    ``exp/clusters`` log, a list (one entry per epoch) of ``images_lists``. A relative ``out``
    is taken inside ``exp``. Images left out of a clustering (unreadable) are left out.
    """
    clog = ClusterLog(Path(exp) / "clusters")
    epochs = clog.epochs()
    if not epochs:
        raise FileNotFoundError(f"no cluster assignments under {Path(exp) / 'clusters'}")
    out = Path(out) if Path(out).is_absolute() else Path(exp) / out
    if image_paths is not None:
        labels = clog.load(epochs[-1] if epoch is None else epoch)
        if len(image_paths) != len(labels):
            raise ValueError(f"image_paths has {len(image_paths)} entries but the assignments of "
                             f"{Path(exp) / 'clusters'} cover {len(labels)} images")
        obj: Any = [(p, int(c)) for p, c in zip(image_paths, labels) if c >= 0]
    else:
        obj = [clustering.labels_to_lists(lab, int(lab.max()) + 1) for lab in map(clog.load, epochs)]
    checkpoint.atomic_write(out, lambda f: pickle.dump(obj, f, protocol=2))
    return str(out)


# ---------------------------------------------------------------------------------------
# where the run happens: the one place that decides rank, world size and device
# ---------------------------------------------------------------------------------------
class Runtime:
    """Rank, world size and device of this process (single process unless under torchrun)."""

    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int = 0,
                 device: torch.device | None = None):
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.device = device or torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def __repr__(self) -> str:
        return f"Runtime(rank={self.rank}, world_size={self.world_size}, device={self.device})"


class DeviceError(ScriptError):
    """The requested device set-up cannot work (no CUDA, two processes on one GPU...)."""


def system_sees_gpu() -> bool:
    """True when the machine shows an NVIDIA GPU (device nodes or nvidia-smi), whatever torch says."""
    import glob
    import shutil
    return bool(glob.glob("/dev/nvidia[0-9]*")) or shutil.which("nvidia-smi") is not None


def configure_backends() -> None:
    """Per-run backend switches: cuDNN picks the fastest convolution algorithms for the
    fixed input sizes of training and feature extraction (as the original did)."""
    torch.backends.cudnn.benchmark = True


def select_device(name: str = "auto") -> torch.device:
    """The one device rule of every script. ``auto``: CUDA when torch sees a GPU, else the CPU
    (one code path for both), loudly when the machine shows a GPU that torch cannot use;
    ``cuda`` (or ``cuda:N``) without a usable GPU is a :class:`DeviceError`."""
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(f"--device {name} requested but CUDA is not available to PyTorch (CUDA build "
                          f"{torch.version.cuda or 'none'}): check the driver with nvidia-smi")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if system_sees_gpu():
            log.warning("WARNING: this machine shows an NVIDIA GPU but PyTorch cannot use it (torch %s, CUDA build "
                        "%s; driver too old for this build?): running on the CPU. Pass --device cuda to make this "
                        "an error.", torch.__version__, torch.version.cuda or "none")
        return torch.device("cpu")
    return torch.device(name)


def init_runtime(device: str = "auto", timeout_min: float = 60.0) -> Runtime:
    """Decide device and distributed state.

    Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) the process group is created
    with NCCL on GPU and gloo on CPU, and each process takes GPU ``LOCAL_RANK``; a
    ``LOCAL_RANK`` beyond the visible GPUs is refused (two processes would share one GPU).
    ``timeout_min`` bounds how long a collective waits (rank 0 clusters while the other
    ranks wait in the next collective). A plain ``python main.py`` stays single-process.
    """
    import datetime

    import torch.distributed as dist

    if device not in ("auto", "cuda", "cpu"):
        raise ValueError(f"--device must be auto, cuda or cpu, got {device!r}")
    use_cuda = select_device(device).type == "cuda"
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        n_gpus = torch.cuda.device_count()
        if local_rank >= n_gpus:
            raise DeviceError(f"process with LOCAL_RANK {local_rank} but only {n_gpus} GPU(s) visible: two "
                              f"processes would share one GPU; start at most {n_gpus} processes per node "
                              f"(NGPUS / --nproc_per_node)")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(minutes=timeout_min),
                                device_id=dev if use_cuda else None)
    return Runtime(rank, world_size, local_rank, dev)


# ---------------------------------------------------------------------------------------
# the (N, 4096) feature matrix: storage, memory layout, gathering across ranks
# ---------------------------------------------------------------------------------------
FEATURE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def feature_dtype(name: str | torch.dtype) -> torch.dtype:
    """``--features_dtype`` name (or a dtype) -> torch dtype."""
    if isinstance(name, torch.dtype):
        return name
    try:
        return FEATURE_DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown feature dtype {name!r}: expected one of {', '.join(FEATURE_DTYPES)}") from None


def to_channels_last(obj):
    """Module -> converted in place (and returned); 4-d tensor -> channels-last copy/view.

    Other tensors are returned unchanged, so it can wrap any batch.
    """
    if isinstance(obj, torch.nn.Module):
        return obj.to(memory_format=torch.channels_last)
    if isinstance(obj, torch.Tensor) and obj.dim() == 4:
        return obj.contiguous(memory_format=torch.channels_last)
    return obj


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
        """Store ``batch`` (B, D) at rows ``idx`` (B,) (dataset indices, any order).

        The copy to the store's device is synchronous on purpose: a non-blocking
        device-to-host copy returns before the data has arrived, and ``index_copy_`` would
        then read stale or uninitialised host memory.
        """
        idx = torch.as_tensor(idx, dtype=torch.long).to(self.device)
        self.tensor.index_copy_(0, idx, batch.detach().to(self.device, self.dtype))
        self.filled += int(idx.numel())

    def numpy(self) -> np.ndarray:
        """Host float32 copy (the original's representation)."""
        return self.tensor.float().cpu().numpy()


class RunFeatures:
    """The run's (N, D) feature matrix, written batch by batch by dataset index.

    One process: rows go straight into an (N, D) :class:`FeatureStore` on ``on`` (the host,
    or the GPU). Under torchrun each rank fills an (n_local, D) store of its share on its
    device and :meth:`result` gathers the whole matrix on rank 0, where it stays on rank 0's
    device (where it is clustered: no round trip through the host); the other ranks get None.
    """

    def __init__(self, n: int, n_local: int, dim: int, rt: "Runtime", on: torch.device,
                 dtype: str | torch.dtype = "float32"):
        self.n, self.rt = n, rt
        if rt.distributed:
            self.store = FeatureStore(n_local, dim, rt.device, dtype)
            self.local_idx = torch.empty(n_local, dtype=torch.long)  # (n_local,) dataset index of each row
        else:
            self.store = FeatureStore(n, dim, on, dtype)
        self.pos = 0

    def write(self, idx: torch.Tensor, rows: torch.Tensor) -> None:
        """Rows (B, D) of the images ``idx`` (B,)."""
        if self.rt.distributed:
            b = len(idx)
            self.store.write(torch.arange(self.pos, self.pos + b), rows)
            self.local_idx[self.pos:self.pos + b] = idx
            self.pos += b
        else:
            self.store.write(idx, rows)

    def result(self) -> np.ndarray | torch.Tensor | None:
        """The (N, D) matrix (None on ranks other than 0); host float32 stays a numpy array
        (the original's representation, no copy)."""
        if self.rt.distributed:
            full = gather_rows(self.store.tensor, self.local_idx, self.n, self.rt)
            self.store = None
            if full is None:
                return None
        else:
            full = self.store.tensor
        return full.numpy() if full.device.type == "cpu" and full.dtype == torch.float32 else full


class DivergedError(ScriptError):
    """The training loss became NaN or inf."""


class DeviceLossMeter:
    """Sum of the training loss and a finite flag kept on the device, read every few steps.

    A host read (``loss.item()``, a NaN test in Python) waits for the GPU to finish the step,
    which stalls the pipeline if done every step. :meth:`read` moves the device sums into
    ``meter`` (raw sums, exact in float64 for float32 losses times batch sizes, so the mean
    does not depend on where the reads fell) and raises :class:`DivergedError` when a loss since
    the last read was NaN or inf; under torchrun the flag is combined over the ranks, so all
    ranks stop together.
    """

    def __init__(self, device: torch.device, meter: AverageMeter, epoch: int = 0, start: int = 0):
        self.meter, self.epoch = meter, epoch
        self.first = self.step = start  # first step since the last read, step running
        self.sum = torch.zeros((), dtype=torch.float64, device=device)  # sum of loss * batch since the last read
        self.finite = torch.ones((), dtype=torch.bool, device=device)   # every loss since the last read finite
        self.n = 0

    def add(self, loss: torch.Tensor, batch: int) -> None:
        self.finite &= torch.isfinite(loss.detach())
        self.sum += loss.detach().double() * batch
        self.n += batch

    def read(self) -> AverageMeter:
        """The meter with every step so far; :class:`DivergedError` when a loss was NaN or inf."""
        if self.n:
            ok = self.finite.to(torch.int32)
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)
            if not bool(ok):
                raise DivergedError(f"training loss is {float(self.sum)} at epoch {self.epoch}, between iterations "
                                    f"{self.first} and {self.step - 1}: the run diverged (try a lower --lr); "
                                    f"the last checkpoint is kept")
            total = float(self.sum)
            m = self.meter
            m.val, m.sum, m.count = total / self.n, m.sum + total, m.count + self.n
            m.avg = m.sum / m.count
            self.sum.zero_()
            self.n = 0
        self.first = self.step
        return self.meter


def gather_peak_bytes(n: int, d: int, counts: Sequence[int], element_size: int) -> int:
    """Bytes :func:`gather_rows` holds on rank 0 at its peak (world size > 1).

    ``counts[r]`` rows come from rank r. Rank 0 holds the (n, D) output, its own (n_0, D)
    rows (reused as the receive buffer when no other rank sends more, else one extra
    (m, D) buffer, m = max over the other ranks) and int64 index vectors of n_0 + m entries::

        peak = (n + n_0 + (m if m > n_0 else 0)) * D * b + (n_0 + m) * 8

    ImageNet (n = 1,281,167, D = 4096, 8 GPUs, n_0 = m = 160,146): 22.0 GiB in float32
    (b = 4), 11.0 GiB in float16, i.e. the matrix plus one eighth of it.
    """
    n0 = int(counts[0])
    m = max((int(c) for c in counts[1:]), default=0)
    rows = n + n0 + (m if m > n0 else 0)
    return rows * d * element_size + (n0 + m) * 8


def gather_rows(local: torch.Tensor, local_idx: torch.Tensor, n: int, rt: Runtime,
                stats: dict | None = None) -> torch.Tensor | None:
    """Assemble an (n, D) matrix on rank 0 from per-rank rows ``local`` (n_r, D) at ``local_idx``.

    ``local`` lives on ``rt.device`` (NCCL sends CUDA tensors); the result has its dtype and
    device, so when rank 0 clusters on its GPU the matrix never goes through the host.
    Rank 0 allocates the output once, copies its own rows into place, then receives each
    other rank's rows in turn (point to point) into ``local`` itself, which is consumed as
    the receive buffer, and places them with ``index_copy_``: no per-rank buffers, no
    ``torch.cat``, no masked copy. Peak memory: :func:`gather_peak_bytes` (ImageNet on 8
    GPUs, float32: 22.0 GiB on rank 0 instead of about four 19.5 GiB copies). ``stats``,
    when given, receives ``counts`` and ``peak_bytes`` (the bytes of the buffers actually
    held at the peak). Returns the matrix on rank 0, None elsewhere. Single process:
    scatters ``local`` into place and returns it.
    """
    import torch.distributed as dist

    d = local.shape[1]
    if not rt.distributed:
        out = torch.empty(n, d, dtype=local.dtype, device=local.device)
        out[local_idx.to(local.device)] = local
        return out
    dev = rt.device
    local_idx = local_idx.to(dev, torch.int64)
    count = torch.tensor([local.shape[0]], dtype=torch.int64, device=dev)
    counts_t = [torch.zeros_like(count) for _ in range(rt.world_size)]
    dist.all_gather(counts_t, count)
    counts = [int(c.item()) for c in counts_t]
    if not rt.is_main:
        if counts[rt.rank]:
            dist.send(local.contiguous(), dst=0)
            dist.send(local_idx, dst=0)
        return None
    out = torch.empty(n, d, dtype=local.dtype, device=dev)
    out.index_copy_(0, local_idx, local)
    m = max(counts[1:], default=0)
    rows = local if m <= local.shape[0] and local.is_contiguous() else torch.empty(m, d, dtype=local.dtype, device=dev)
    idx = torch.empty(m, dtype=torch.int64, device=dev)
    if stats is not None:
        held = [out, local, local_idx, idx] + ([rows] if rows is not local else [])
        stats.update(counts=counts, peak_bytes=sum(t.numel() * t.element_size() for t in held))
    for r in range(1, rt.world_size):
        c = counts[r]
        if not c:
            continue
        dist.recv(rows[:c], src=r)
        dist.recv(idx[:c], src=r)
        out.index_copy_(0, idx[:c], rows[:c])
    return out


def broadcast_module_state(model: torch.nn.Module, rt: Runtime) -> None:
    """Copy rank 0's parameters and buffers (BatchNorm running statistics) to every rank.

    DistributedDataParallel keeps parameters equal, but each rank updates its BatchNorm
    buffers from its own batches: without this, rank r would extract its share of the
    features with a slightly different network.
    """
    import torch.distributed as dist

    if not rt.distributed:
        return
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, src=0)


def barrier(rt: Runtime) -> None:
    """Wait for every rank (nothing to do in one process)."""
    if rt.distributed:
        torch.distributed.barrier()


def synced_time(device: torch.device) -> float:
    """Wall clock after the device has finished its queued work (CUDA kernels are asynchronous)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.time()


def wrap_ddp(model: torch.nn.Module, rt: Runtime) -> torch.nn.Module:
    """DistributedDataParallel around the whole network under torchrun (rebuilt every epoch,
    since the top layer is new each epoch); the bare network otherwise."""
    if not rt.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP
    return DDP(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)


def broadcast_array(arr: np.ndarray | None, rt: Runtime, dtype=torch.int64) -> np.ndarray:
    """Send a 1-d array from rank 0 to every rank (its length too)."""
    import torch.distributed as dist

    if not rt.distributed:
        return arr
    n = torch.tensor([len(arr) if rt.is_main else 0], dtype=torch.int64, device=rt.device)
    dist.broadcast(n, src=0)
    t = (torch.as_tensor(arr, dtype=dtype).to(rt.device) if rt.is_main
         else torch.empty(int(n.item()), dtype=dtype, device=rt.device))
    dist.broadcast(t, src=0)
    return t.cpu().numpy()


# ---------------------------------------------------------------------------------------
# script plumbing: one set for main.py, the eval_*.py scripts and visu/
# ---------------------------------------------------------------------------------------
def known_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that :func:`run_cli` reports as one ``error:`` line instead of a traceback."""
    return (ScriptError, checkpoint.CheckpointError, data.DataError, data.BadImageError,
            clustering.ClusteringError, models.StateDictError, models.ProbeError)


def one_line(e: BaseException) -> str:
    """The message of ``e`` on one line. An error raised in a DataLoader worker carries the
    worker's traceback in its text: keep its last line, without the exception's class name."""
    text = str(e).strip()
    if "Traceback" in text:
        last = text.splitlines()[-1]
        text = last.split(f"{type(e).__name__}: ", 1)[-1]
    return " ".join(text.split())


def fail(msg: str, code: int = 2, logger: logging.Logger | None = None) -> int:
    """Print ``error: msg`` on stderr (once), copy it to ``logger``'s log files (not to its
    console handler: the line is not printed twice) and return the exit code."""
    print(f"error: {msg}", file=sys.stderr)
    if logger is not None:
        record = logger.makeRecord(logger.name, logging.ERROR, __file__, 0, msg, None, None)
        for h in logger.handlers:
            if isinstance(h, logging.FileHandler):
                h.handle(record)
    return code


def run_cli(main: Callable[[argparse.Namespace], object], parser: argparse.ArgumentParser | Callable,
            argv: Sequence[str] | None = None, *, logger: logging.Logger | None = None,
            explain: Callable[[BaseException, argparse.Namespace], str] | None = None,
            on_interrupt: Callable[[argparse.Namespace], str] | None = None) -> int:
    """Parse ``argv`` (``parser.parse_args``, or ``parser(argv)`` when given a function) and run
    ``main(args)``. Exit codes: 0 done, 2 a known error (one ``error:`` line on stderr, no
    traceback; ``explain(e, args)`` may word it), 130 Ctrl-C (``on_interrupt(args)`` says what
    to do next). A process group left open is closed in every case."""
    args = parser(argv) if callable(parser) and not isinstance(parser, argparse.ArgumentParser) \
        else parser.parse_args(argv)
    try:
        main(args)
    except known_errors() as e:
        if logger is not None:
            logger.debug("error", exc_info=True)
        return fail(explain(e, args) if explain else one_line(e), 2, logger)
    except KeyboardInterrupt:
        return fail(on_interrupt(args) if on_interrupt else "interrupted", 130, logger)
    finally:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


def setup_logging(logger: logging.Logger, exp: str | os.PathLike | None, filename: str,
                  verbose: bool = False, is_main: bool = True) -> None:
    """``logger`` to stdout and, on the main process when ``exp`` is given, to ``exp/filename``.
    Other ranks print warnings only. Handlers from an earlier call are closed first."""
    logger.setLevel((logging.DEBUG if verbose else logging.INFO) if is_main else logging.WARNING)
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if exp is not None and is_main:
        Path(exp).mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(Path(exp) / filename))
    for h in handlers:
        h.setFormatter(fmt)
        logger.addHandler(h)
    logger.propagate = False


def seed_everything(seed: int, rank: int = 0) -> None:
    """torch (dropout masks, CPU and CUDA) gets ``seed + rank``, so every rank draws its own
    masks; numpy and ``random`` get ``seed`` on every rank: they draw the epoch's samples and
    the k-means seed, which all ranks must share."""
    torch.manual_seed(seed + rank)
    torch.cuda.manual_seed_all(seed + rank)
    np.random.seed(seed)
    random.seed(seed)


def progress(disable: bool) -> bool | None:
    """tqdm's ``disable`` value: None shows bars on a terminal only, True hides them."""
    return True if disable else None
