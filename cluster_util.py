"""What the clustering modules share: the error they raise, the k-means backend choice
(faiss when installed), row-block sizes, and the collectives of the sharded steps (nothing in
one process)."""
from __future__ import annotations

import logging

import numpy as np
import torch

try:  # faiss is optional: the torch backend covers every path
    import faiss  # type: ignore
except ImportError:  # pragma: no cover - depends on the environment
    faiss = None

log = logging.getLogger("deepcluster")


class ClusteringError(ValueError):
    """Clustering cannot run on this input (too few points, degenerate features...)."""


# ---------------------------------------------------------------------------------------
# backend selection
# ---------------------------------------------------------------------------------------
def faiss_has_gpu() -> bool:
    return faiss is not None and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def resolve_backend(backend: str = "auto", device: torch.device | str | None = None) -> str:
    """Return 'faiss' or 'torch' for a requested backend ('auto', 'faiss', 'torch').

    ``auto``: torch on CUDA (whether or not faiss-gpu is installed: the features stay on the
    GPU and the result does not depend on an optional package), else faiss when installed,
    else torch. ``faiss`` on a CUDA machine uses faiss's GPU index when faiss has one."""
    if backend not in ("auto", "faiss", "torch"):
        raise ValueError(f"unknown clustering backend {backend!r}: expected auto, faiss or torch")
    if backend == "faiss" and faiss is None:
        raise RuntimeError("--cluster_backend faiss requested but faiss is not installed "
                           "(pip install faiss-cpu), use --cluster_backend torch")
    if backend != "auto":
        return backend
    dev = torch.device(device) if device is not None else None
    on_cuda = (dev is not None and dev.type == "cuda") or (dev is None and torch.cuda.is_available())
    if on_cuda:
        return "torch"
    return "faiss" if faiss is not None else "torch"


def _default_device(device) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _as_tensor(x, device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(x) if not isinstance(x, torch.Tensor) else x
    return t.to(device=device, dtype=torch.float32)


def _row_chunk(n_cols: int, budget: int = 1 << 26) -> int:
    """Rows per block so that a (rows, n_cols) float32 block stays near 256 MB."""
    return max(256, budget // max(1, n_cols))


def labels_to_lists(labels: np.ndarray, k: int) -> list[list[int]]:
    """(N,) cluster ids -> ``images_lists[c]`` = sorted indices of the images in cluster c.

    A label of -1 (an image left out of the clustering) puts the image in no list.
    """
    labels = np.asarray(labels, dtype=np.int64)
    order = np.argsort(labels, kind="stable")
    order = order[labels[order] >= 0]
    bounds = np.cumsum(np.bincount(labels[order], minlength=k))[:-1]
    return [chunk.tolist() for chunk in np.split(order, bounds)]


# ---------------------------------------------------------------------------------------
# collectives of the sharded steps (one process: nothing)
# ---------------------------------------------------------------------------------------
def _distributed(rt) -> bool:
    return rt is not None and getattr(rt, "distributed", False)


def _all_reduce(t: torch.Tensor, rt, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce over the ranks of ``rt`` (nothing in one process). NCCL needs
    device tensors: a tensor elsewhere goes through ``rt.device`` and back."""
    if not _distributed(rt):
        return t
    import torch.distributed as dist
    red = dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX
    tmp = t.to(rt.device).contiguous()  # collectives read raw memory: a strided view would be garbled
    dist.all_reduce(tmp, op=red)
    if tmp is not t:
        t.copy_(tmp)
    return t


def _broadcast(t: torch.Tensor, rt, src: int = 0) -> torch.Tensor:
    """In-place broadcast from rank ``src`` (nothing in one process)."""
    if not _distributed(rt):
        return t
    import torch.distributed as dist
    tmp = t.to(rt.device).contiguous()
    dist.broadcast(tmp, src)
    if tmp is not t:
        t.copy_(tmp)
    return t
