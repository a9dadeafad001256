"""Where the run happens: rank, world size and device (``init_runtime``), the collectives
every rank calls in the same order, DDP wrapping, and the run's (N, D) feature matrix.

Single process unless started by torchrun (``WORLD_SIZE`` > 1): NCCL on GPUs, gloo on CPUs.
``DEEPCLUSTER_FORCE_DISTRIBUTED=1`` makes a single process a process group of one (every
collective of the trainers then runs, on the run's device): scripts/gpu_check.py uses it to
exercise NCCL on a box with one GPU. ``DEEPCLUSTER_SYNC_DEBUG=warn|error`` audits the training
steps for host synchronisations (:class:`SyncAudit`).
"""
from __future__ import annotations

import contextlib
import logging
import os
import random
import time
from typing import Sequence

import numpy as np
import torch

from errors import ScriptError
from util import AverageMeter

log = logging.getLogger("deepcluster")


# ---------------------------------------------------------------------------------------
# where the run happens: the one place that decides rank, world size and device
# ---------------------------------------------------------------------------------------
class Runtime:
    """Rank, world size and device of this process (single process unless under torchrun)."""

    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int = 0,
                 device: torch.device | None = None, forced: bool = False):
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.device = device or torch.device("cpu")
        self.forced = forced  # a process group of one (FORCE_DISTRIBUTED_ENV): the distributed code paths

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 or self.forced

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


def configure_backends(deterministic: bool = False) -> None:
    """Per-run backend switches. Default: cuDNN picks the fastest convolution algorithms for
    the fixed input sizes of training and feature extraction (as the original did), with
    torch's TF32 convolutions on Ampere and later GPUs: fast, not bitwise reproducible.

    ``deterministic`` (``--deterministic``, for exact resume on a GPU): deterministic
    algorithms (``index_add_`` in k-means and the conv backward without atomics), no
    autotuning, TF32 off for convolutions and matmuls, and the cuBLAS workspace setting
    deterministic matmuls need. Ops with no deterministic CUDA kernel (ResNet-50's adaptive
    average pool backward) warn instead of stopping the run and stay non-deterministic.
    The CPU paths are deterministic either way."""
    if not deterministic:
        torch.backends.cudnn.benchmark = True
        return
    # read when cuBLAS creates its handle (the first CUDA matmul), i.e. after this
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    cudnn = torch.backends.cudnn
    if hasattr(getattr(cudnn, "conv", None), "fp32_precision"):  # torch >= 2.9: mixing the two APIs is refused
        cudnn.conv.fp32_precision = cudnn.rnn.fp32_precision = "ieee"
        torch.backends.cuda.matmul.fp32_precision = "ieee"
    else:
        cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False


def resolve_channels_last(flag: bool | None, device: torch.device) -> bool:
    """``--channels_last`` auto (None): on for the CPU, where it is measured faster
    (docs/performance), off on CUDA until scripts/gpu_check.sh has measured it there."""
    return device.type == "cpu" if flag is None else bool(flag)


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


FORCE_DISTRIBUTED_ENV = "DEEPCLUSTER_FORCE_DISTRIBUTED"


def forced_distributed() -> bool:
    """True when ``DEEPCLUSTER_FORCE_DISTRIBUTED=1`` asks a single process to run as a process group of one."""
    return os.environ.get(FORCE_DISTRIBUTED_ENV, "0") == "1"


def init_runtime(device: str = "auto", timeout_min: float = 60.0) -> Runtime:
    """Decide device and distributed state.

    Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) the process group is created
    with NCCL on GPU and gloo on CPU, and each process takes GPU ``LOCAL_RANK``; a
    ``LOCAL_RANK`` beyond the visible GPUs is refused (two processes would share one GPU).
    ``timeout_min`` bounds how long a collective waits (rank 0 clusters while the other
    ranks wait in the next collective). A plain ``python main.py`` stays single-process,
    unless ``DEEPCLUSTER_FORCE_DISTRIBUTED=1``: then a process group of one is created (NCCL on
    a GPU, gloo on the CPU; an in-memory store, no address or port) and ``rt.distributed`` is
    true, so DDP, the sharded k-means, the synchronised BatchNorm and every other collective
    run exactly as under torchrun, each over one rank (the same results as the plain run up to
    float summation order: tests/test_gpu_check.py).
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
    forced = world_size == 1 and forced_distributed()
    timeout = datetime.timedelta(minutes=timeout_min)
    if forced and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", rank=0, world_size=1, timeout=timeout,
                                device_id=dev if use_cuda else None, store=dist.HashStore())
    if world_size > 1 and not dist.is_initialized():
        store = None
        if "TORCHELASTIC_RESTART_COUNT" in os.environ:  # keys of this attempt only: torchrun keeps its store
            # across restarts, where a restarted group would read the dead attempt's addresses
            # ("connectFullMesh failed ... Connection refused")
            store, _, _ = next(dist.rendezvous("env://", rank, world_size, timeout=timeout))
            store = dist.PrefixStore(f"deepcluster/attempt_{os.environ['TORCHELASTIC_RESTART_COUNT']}/", store)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", rank=rank, world_size=world_size,
                                timeout=timeout, device_id=dev if use_cuda else None, store=store)
    return Runtime(rank, world_size, local_rank, dev, forced=forced)


def seed_everything(seed: int, rank: int = 0) -> None:
    """torch (dropout masks, CPU and CUDA) gets ``seed + rank``, so every rank draws its own
    masks; numpy and ``random`` get ``seed`` on every rank: they draw the epoch's samples and
    the k-means seed, which all ranks must share."""
    torch.manual_seed(seed + rank)
    torch.cuda.manual_seed_all(seed + rank)
    np.random.seed(seed)
    random.seed(seed)


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



class FeatureStore:
    """An (N, D) feature matrix filled batch by batch, row i = image i.

    ``device`` cuda keeps the features on the GPU (the host never holds the matrix);
    ``dtype`` float16 halves its size (clustering upcasts block by block). ``tensor`` is what
    :meth:`clustering.Kmeans.cluster` takes.

    Writes overlap the device-to-host copy with the next batch's forward pass: :meth:`write`
    converts the batch to the store's dtype on its device, starts a non-blocking copy (into
    pinned host memory) and records a CUDA event; the rows are placed into the matrix only by
    the next :meth:`write` or by :meth:`flush` (reading ``tensor`` flushes), after the
    event has completed: a non-blocking device-to-host copy is not ready before that sync.
    On the CPU the same code runs (the copy is then a plain one and there is no event).
    """

    def __init__(self, n: int, dim: int, device: torch.device | str = "cpu",
                 dtype: str | torch.dtype = "float32"):
        self.device = torch.device(device)
        self.dtype = feature_dtype(dtype)
        self._tensor = torch.empty(int(n), int(dim), dtype=self.dtype, device=self.device)
        self._pending: tuple | None = None  # (idx, rows in flight, event or None)
        self.filled = 0

    @property
    def tensor(self) -> torch.Tensor:
        """The (N, D) matrix, every written batch in place."""
        self.flush()
        return self._tensor

    @property
    def nbytes(self) -> int:
        return self._tensor.numel() * self._tensor.element_size()

    def write(self, idx, batch: torch.Tensor) -> None:
        """Store ``batch`` (B, D) at rows ``idx`` (B,) (dataset indices, any order); the
        previous batch is placed first (see the class docstring)."""
        self.flush()
        rows = batch.detach().to(self.dtype)  # on its device: float16 halves the bytes copied
        event = None
        if rows.device != self.device:
            rows = rows.to(self.device, non_blocking=True)
            if batch.device.type == "cuda":
                event = torch.cuda.Event()
                event.record()
        self._pending = (torch.as_tensor(idx, dtype=torch.long), rows, event)

    def flush(self) -> None:
        """Place the batch whose copy may still be in flight (waits for its event)."""
        if self._pending is None:
            return
        idx, rows, event = self._pending
        self._pending = None
        if event is not None:
            event.synchronize()  # the non-blocking copy has landed in host memory
        # (B,) row indices onto a GPU store (--features_on device): non_blocking is safe, since a
        # pageable source is staged before the call returns and a pinned one (the loader's) is kept
        # by the caching host allocator until the copy has run; the copy is ordered before
        # index_copy_ on the stream, and the host does not wait for it (a blocking copy would)
        self._tensor.index_copy_(0, idx.to(self.device, non_blocking=True), rows)
        self.filled += int(idx.numel())

    def numpy(self) -> np.ndarray:
        """Host float32 copy (the original's representation)."""
        return self.tensor.float().cpu().numpy()


class FeatureShard:
    """This rank's rows of the run's feature matrix: ``x`` (n_local, D), ``idx`` (n_local,)
    int64 their dataset indices (None in one process: ``x`` is the whole matrix, row i =
    image i), ``n`` the number of images in all ranks."""

    def __init__(self, x: torch.Tensor, idx: torch.Tensor | None, n: int):
        self.x, self.idx, self.n = x, idx, n


class RunFeatures:
    """The run's (N, D) feature matrix, written batch by batch by dataset index, each rank
    keeping the rows it extracted.

    One process: rows go straight into an (N, D) :class:`FeatureStore` on ``on`` (the host,
    or the GPU with ``--features_on device``). Under torchrun each rank fills an (n_local, D)
    store of its share on ``on`` and remembers each row's dataset index: :meth:`shard` hands
    them to the sharded k-means (no rank ever holds the matrix, see
    :meth:`clustering.Kmeans.cluster_shard`). ``gather=True`` (PIC, which needs the whole
    matrix) keeps the store on the rank's device and :meth:`result` gathers the matrix on
    rank 0 (:func:`gather_rows`).
    """

    def __init__(self, n: int, n_local: int, dim: int, rt: "Runtime", on: torch.device,
                 dtype: str | torch.dtype = "float32", gather: bool = False):
        self.n, self.rt, self.gather = n, rt, gather
        if rt.distributed:
            self.store = FeatureStore(n_local, dim, rt.device if gather else on, dtype)
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

    def shard(self) -> FeatureShard:
        """This rank's rows and their dataset indices (every rank)."""
        x = self.store.tensor
        self.store = None
        return FeatureShard(x, self.local_idx if self.rt.distributed else None, self.n)

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

    def peek(self) -> float:
        """Mean loss of every step so far on this process, for display: one device read, no
        collective, no finiteness check, the sums left in place (NaN before any step)."""
        n = self.meter.count + self.n
        return (self.meter.sum + float(self.sum)) / n if n else float("nan")

    def read(self) -> AverageMeter:
        """The meter with every step so far; :class:`DivergedError` when a loss was NaN or inf.

        Under torchrun the sums are added over the ranks in the one all-reduce that also
        combines the finite flags, so every rank's meter holds the mean over all the images
        of the global batches (what the log and the checkpoints record), not rank 0's share.
        """
        if self.n:
            # (3,) float64: loss sum, images, non-finite count (exact: integers far below 2**53)
            packed = torch.stack([self.sum, self.sum.new_tensor(float(self.n)), (~self.finite).double()])
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(packed, op=torch.distributed.ReduceOp.SUM)
            total, n, bad = packed.tolist()
            if bad:
                raise DivergedError(f"training loss is {total} at epoch {self.epoch}, between iterations "
                                    f"{self.first} and {self.step - 1}: the run diverged (try a lower --lr); "
                                    f"the last checkpoint is kept")
            n = int(n)
            m = self.meter
            m.val, m.sum, m.count = total / n, m.sum + total, m.count + n
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


def resolve_sync_bn(flag: bool | None, rt: Runtime) -> bool:
    """``--sync_bn``: None (auto) = on under NCCL (torchrun on GPUs), off otherwise.

    With W processes each BatchNorm normalises over its rank's batch / W images; synced, over
    the global batch, as one GPU training on --batch would. An explicit ``--sync_bn`` also
    works under gloo (CPU). In one process there is nothing to sync (plain BatchNorm)."""
    nccl = rt.distributed and rt.device.type == "cuda"
    return nccl if flag is None else bool(flag) and rt.distributed


def sync_batchnorm(model: torch.nn.Module, flag: bool | None, rt: Runtime) -> torch.nn.Module:
    """The network with its BatchNorm layers synchronised over the processes when
    :func:`resolve_sync_bn` says so (the same module object otherwise): :class:`AllReduceBatchNorm`
    on every backend. Not torch's SyncBatchNorm: its forward reads the ranks' counts on the host
    (a masked index, one GPU->host synchronisation per layer and step: 53 per ResNet-50 step)
    and it refuses CPU tensors. The parameters are the same objects and the state_dict keys do
    not change, so checkpoints load into the unsynced network and back."""
    if not resolve_sync_bn(flag, rt):
        return model
    log.info("BatchNorm synchronised over the %d processes (--sync_bn)", rt.world_size)
    return convert_allreduce_batchnorm(model)


class _AllReduceSum(torch.autograd.Function):
    """Sum of a tensor over the ranks, with autograd: the gradient of the sum on each rank is
    the sum of the ranks' gradients (what ``torch.distributed.nn.functional.all_reduce``
    does; that one warns it is deprecated on every call)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone(memory_format=torch.contiguous_format)
        torch.distributed.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return _AllReduceSum.apply(grad)


class AllReduceBatchNorm(torch.nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the global batch of all processes, on any backend (NCCL and gloo), with
    no host synchronisation.

    In training under an initialised process group (a group of one included, see
    ``DEEPCLUSTER_FORCE_DISTRIBUTED``) it computes the per-channel statistics of the union of
    the ranks' batches: each rank's variance and mean in one fused pass (``torch.var_mean``,
    Welford's algorithm), turned into float64 sums and sums of squares, all-reduced with the
    count in one collective (with autograd), combined as Chan et al.'s parallel variance (the
    local variances carry no cancellation; the combination loses only float64 digits). The
    input is normalised with them in one pass (``x * scale + shift``), the running statistics are updated as
    BatchNorm does (momentum, or a cumulative mean with ``momentum=None``; unbiased variance
    with the global count; ``num_batches_tracked``), and the backward pass all-reduces the
    gradients of the two sums, so a rank's input gradient is that of the loss summed over the
    ranks. Results equal one BatchNorm on the whole batch up to float rounding (tested: a few
    float32 ulps).

    No value goes to the host: the global count is all-reduced with the sums and stays a device
    tensor (built by a fill kernel, not copied from the host), as does the cumulative-average
    factor. Hence, as torch's SyncBatchNorm, only a rank's own batch is checked for the "more
    than 1 value per channel" rule in one process; with several ranks holding one value in all,
    the running variance becomes inf. float64 only for the (C,) per-channel numbers: the pass over
    the activations is float32 Welford (as cuDNN's statistics), and the cross-rank combination in
    float64 keeps the variance exact to float32 rounding whatever the ranks' means. float16 and
    bfloat16 inputs (autocast) are normalised in float32 and returned in their dtype (as cuDNN's
    BatchNorm does).

    Every rank must call the all-reduces in the same order: it does when every rank runs the
    same forward and backward (the same layers, each rank with its share of the batch, possibly
    empty). Evaluation mode and no process group: exactly ``nn.BatchNorm``.
    Parameters and buffers are BatchNorm's, so state_dict keys and checkpoints are unchanged.
    Input: (N, C) or (N, C, *) like BatchNorm1d/2d/3d.
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected an (N, C, ...) input of at least 2 dimensions, got {x.dim()}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dist = torch.distributed
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(x)
        self._check_input_dim(x)
        c = x.shape[1]
        dims = [0] + list(range(2, x.dim()))    # every axis but the channels
        shape = [1, c] + [1] * (x.dim() - 2)    # (C,) -> broadcastable to x
        n_local = x.numel() // max(c, 1)        # values per channel on this rank
        if n_local <= 1 and dist.get_world_size() == 1:
            raise ValueError(f"expected more than 1 value per channel when training, got {n_local}")
        work = torch.promote_types(x.dtype, torch.float32)  # float16/bfloat16 -> float32
        xw = x.to(work)
        # this rank's per-channel variance and mean in one fused pass (Welford: no cancellation),
        # turned into the sum and the sum of squares, float64; one all-reduce of (2C + 1,)
        # [sums, sums of squares, count], with autograd (one all-reduce of their gradients)
        v_r, m_r = torch.var_mean(xw, dims, correction=0)                        # (C,), (C,)
        m_r, v_r = m_r.double(), v_r.double()
        count = x.new_full((1,), float(n_local), dtype=torch.float64)  # fill kernel: no host->device copy
        packed = _AllReduceSum.apply(torch.cat([m_r * n_local, (v_r + m_r * m_r) * n_local, count]))
        n = packed[2 * c:].detach()                                              # (1,) values per channel
        mean = packed[:c] / n                                                    # (C,) float64
        # Chan's combination: the local variances are exact, so sum / n - mean^2 loses only
        # float64 digits (relative 1e-16 x mean^2 / var)
        var = (packed[c:2 * c] / n - mean * mean).clamp_min(0)                   # (C,) biased
        scale = torch.rsqrt(var + self.eps)                                      # (C,) float64
        if self.affine:
            scale = scale * self.weight
        shift = (self.bias if self.affine else 0) - mean * scale
        # y = x * scale + shift: one pass over the activations
        y = torch.addcmul(shift.to(work).view(shape), xw, scale.to(work).view(shape))
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                rm, rv = self.running_mean, self.running_var
                unbiased = var * (n / (n - 1))
                if self.momentum is None:  # cumulative mean: 1 / batches, a device scalar (no read)
                    f = 1.0 / self.num_batches_tracked.to(rm.dtype)
                    rm.mul_(1 - f).add_(mean.to(rm.dtype) * f)
                    rv.mul_(1 - f).add_(unbiased.to(rv.dtype) * f)
                else:
                    rm.mul_(1 - self.momentum).add_(mean.to(rm.dtype), alpha=self.momentum)
                    rv.mul_(1 - self.momentum).add_(unbiased.to(rv.dtype), alpha=self.momentum)
        return y.to(x.dtype)


def convert_allreduce_batchnorm(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` with every BatchNorm1d/2d/3d replaced by an :class:`AllReduceBatchNorm`
    holding the same parameter and buffer objects (an optimizer built before still updates
    them; state_dict keys unchanged). Returns ``module`` itself unless it is a BatchNorm."""
    bn_types = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)
    if isinstance(module, bn_types) and not isinstance(module, AllReduceBatchNorm):
        new = AllReduceBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                 module.track_running_stats, device="meta")
        if module.affine:
            new.weight, new.bias = module.weight, module.bias
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            setattr(new, name, getattr(module, name))
        new.train(module.training)
        return new
    for name, child in module.named_children():
        module.add_module(name, convert_allreduce_batchnorm(child))
    return module


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
# auditing the training steps for host synchronisations
# ---------------------------------------------------------------------------------------
SYNC_DEBUG_ENV = "DEEPCLUSTER_SYNC_DEBUG"


class SyncAudit:
    """``torch.cuda.set_sync_debug_mode`` over a training loop, outside its documented syncs.

    Active only when ``DEEPCLUSTER_SYNC_DEBUG`` is ``warn`` or ``error`` and ``device`` is
    CUDA (a no-op otherwise: nothing to pay on the CPU or in a normal run). :meth:`step`, called
    at the top of every step, turns the mode on from the ``warmup``-th call on: the first steps
    allocate (the caching allocator, cuDNN autotuning) and DDP rebuilds its gradient buckets at
    its second forward (a one-off broadcast through the host). From then on, every CUDA call that
    synchronises the host with the device (``.item()``, ``float(t)``, a blocking copy either way,
    a masked index, ``nonzero``...) warns or raises, except inside :meth:`allowed`, which marks
    the documented syncs (docs/distributed.md: the loss read every 50 steps, checkpoints, a shown
    progress bar, GradScaler under ``--amp``). :meth:`close` (or leaving the ``with`` block)
    turns it off, so feature extraction and clustering are not audited. Usage::

        with distributed.SyncAudit(device) as audit:
            for batch in loader:
                audit.step()
                ...
                with audit.allowed():
                    meter.read()
    """

    def __init__(self, device: torch.device | str, warmup: int = 2, mode: str | None = None):
        mode = os.environ.get(SYNC_DEBUG_ENV, "") if mode is None else mode
        if mode not in ("", "0", "warn", "error"):
            raise ValueError(f"{SYNC_DEBUG_ENV} must be warn or error, got {mode!r}")
        self.mode = mode if mode in ("warn", "error") and torch.device(device).type == "cuda" else None
        self.warmup, self.steps, self.on = int(warmup), 0, False

    def _set(self, on: bool) -> None:
        if self.mode is not None and on != self.on:
            torch.cuda.set_sync_debug_mode(self.mode if on else "default")
            self.on = on

    def step(self) -> None:
        """Top of a training step: the audit starts at the ``warmup``-th step after the first."""
        self.steps += 1
        if self.steps > self.warmup:
            self._set(True)

    @contextlib.contextmanager
    def allowed(self):
        """A documented synchronisation: the audit is off inside, back on after."""
        was = self.on
        self._set(False)
        try:
            yield
        finally:
            self._set(was)

    def close(self) -> None:
        self._set(False)

    def __enter__(self) -> "SyncAudit":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
