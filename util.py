"""Utilities kept from the original API (``UnifLabelSampler``, ``AverageMeter``, ``Logger``,
``learning_rate_decay``, ``load_model``) plus model-loading, cluster-log and runtime helpers.

Saving and loading checkpoints (atomic writes, RNG state, resume) lives in checkpoint.py.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

import checkpoint
import models

log = logging.getLogger("deepcluster")


# ---------------------------------------------------------------------------------------
# sampling
# ---------------------------------------------------------------------------------------
class UnifLabelSampler(Sampler):
    """Draw ``N`` dataset indices so that every non-empty cluster is drawn equally often.

    Each non-empty cluster contributes ``size = int(N / m) + 1`` draws (m = number of
    non-empty clusters), with replacement only when it holds ``<= size`` images; the
    ``m * size - N`` surplus draws are taken off distinct clusters (one each), so that the
    N shuffled draws serve every cluster ``size`` or ``size - 1`` times. The indices are *dataset* indices: use it with a
    dataset indexed by image (``clustering.cluster_assign(..., order='index')``).

    ``rank``/``world_size`` shard the epoch: rank r serves draws r, r + W, r + 2W, ...
    ``start`` skips the first draws of this shard (mid-epoch resume).
    """

    def __init__(self, N: int, images_lists: Sequence[Sequence[int]], rng: np.random.RandomState | None = None,
                 rank: int = 0, world_size: int = 1, start: int = 0):
        self.N = int(N)
        self.images_lists = images_lists
        self.rng = rng if rng is not None else np.random.mtrand._rand  # the seeded global RNG
        self.rank, self.world_size, self.start = rank, world_size, start
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

    def shard(self) -> np.ndarray:
        return self.indexes[self.rank::self.world_size][self.start:]

    def __iter__(self) -> Iterator[int]:
        return iter(self.shard().tolist())

    def __len__(self) -> int:
        return len(self.shard())


class SeededShardSampler(Sampler):
    """Serve a fixed list of draws as ``(index, augmentation_seed)`` items.

    Rank r takes positions r, r + W, r + 2W, ... of ``draws`` (each draw served by exactly
    one rank), skipping its first ``start`` items (mid-epoch resume). The seed of position
    p is a function of (base_seed, p) only, so a resumed or re-sharded epoch augments every
    sample exactly as an uninterrupted one.
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
# checkpoints and models
# ---------------------------------------------------------------------------------------
def infer_config(sd: dict, arch: str | None = None) -> dict:
    """Architecture, Sobel, BN, input size and k from a (clean) state dict."""
    if "features.0.weight" not in sd:
        raise checkpoint.CheckpointError("state dict has no 'features.0.weight': not a DeepCluster AlexNet/VGG-16")
    w0 = sd["features.0.weight"]
    if arch is None:
        arch = "alexnet" if w0.shape[0] == 96 else "vgg16" if w0.shape[0] == 64 else None
        if arch is None:
            raise checkpoint.CheckpointError(f"cannot infer the architecture from features.0.weight {tuple(w0.shape)}")
    sobel = "sobel.0.weight" in sd
    in_channels = w0.shape[1]
    if in_channels != (2 if sobel else 3):
        raise checkpoint.CheckpointError(f"features.0.weight has {in_channels} input channels, which does not "
                              f"match sobel={sobel}")
    bn = "features.1.running_mean" in sd
    fc6 = sd.get("classifier.1.weight" if arch == "alexnet" else "classifier.0.weight")
    if fc6 is None:
        raise checkpoint.CheckpointError(f"state dict lacks the fc6 weight expected for {arch}")
    input_size = _input_size_for(arch, sobel, bn, fc6.shape[1])
    k = int(sd["top_layer.bias"].shape[0]) if "top_layer.bias" in sd else 0
    return {"arch": arch, "sobel": sobel, "bn": bn, "input_size": input_size, "k": k}


def conv_output_dim(arch: str, input_size: int) -> int:
    """Values out of the conv body for an (S, S) input: 9216 for AlexNet, 25088 for VGG-16 at 224."""
    if arch == "alexnet":
        s = (input_size + 2 * 2 - 11) // 4 + 1          # conv1, stride 4
        for _ in range(3):                               # three MaxPool2d(3, 2)
            s = (s - 3) // 2 + 1
        return 256 * s * s
    s = input_size
    for _ in range(5):                                   # five MaxPool2d(2, 2)
        s //= 2
    return 512 * s * s


def _input_size_for(arch: str, sobel: bool, bn: bool, fc6_in: int) -> int:
    """An input size whose conv output matches fc6: 224 first, then round sizes."""
    rest = range(32, 1025)
    order = [224] + [x for step in (32, 16, 8, 1) for x in rest if x % step == 0]
    for s in dict.fromkeys(order):
        if conv_output_dim(arch, s) == fc6_in:
            return s
    raise checkpoint.CheckpointError(f"fc6 takes {fc6_in} inputs, which matches no input size for {arch}")


def model_from_state_dict(sd: dict, arch: str | None = None, config: dict | None = None) -> models.DeepClusterNet:
    """Build the model a state dict describes and load it (strict, up to BN counters)."""
    sd = checkpoint.clean_state_dict(sd)
    cfg = dict(config) if config else infer_config(sd, arch)
    inferred = infer_config(sd, cfg.get("arch"))
    if cfg.get("arch") and arch and cfg["arch"] != arch:
        raise checkpoint.CheckpointError(f"checkpoint holds a {cfg['arch']} model, not a {arch}")
    for key in ("arch", "sobel", "bn", "k"):
        cfg.setdefault(key, inferred[key])
    cfg.setdefault("input_size", inferred["input_size"])
    model = models.build_model(cfg["arch"], sobel=cfg["sobel"], bn=cfg["bn"], out=cfg["k"],
                               input_size=cfg["input_size"])
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # shape mismatches raise even with strict=False
        raise checkpoint.CheckpointError(f"state dict does not fit {cfg['arch']} (sobel={cfg['sobel']}): "
                              f"{str(e).splitlines()[-1].strip()}") from None
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise checkpoint.CheckpointError(f"state dict does not fit {cfg['arch']} (sobel={cfg['sobel']}): "
                              f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model


def load_model(path: str | os.PathLike, arch: str | None = None) -> models.DeepClusterNet:
    """Load a model from our checkpoints or the released original ones (SPEC 2).

    Accepts ``features.N.*`` and ``features.module.N.*`` keys, missing BN counters,
    Python-2 pickles; Sobel is inferred from ``sobel.0.weight`` and k from ``top_layer.bias``.
    ``arch``, when given, must match the checkpoint's.
    """
    ckpt = checkpoint.torch_load(path)
    sd = ckpt.get("state_dict", ckpt if "features.0.weight" in checkpoint.clean_state_dict(ckpt) else None)
    if sd is None:
        raise checkpoint.CheckpointError(f"checkpoint {str(path)!r} has no 'state_dict'")
    ck_arch = ckpt.get("arch")
    if arch is not None and ck_arch is not None and ck_arch != arch:
        raise checkpoint.CheckpointError(f"checkpoint {str(path)!r} holds a {ck_arch} model, not a {arch}")
    try:
        return model_from_state_dict(sd, arch or ck_arch, ckpt.get("model_config"))
    except checkpoint.CheckpointError as e:
        raise checkpoint.CheckpointError(f"checkpoint {str(path)!r}: {e}") from None


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


def labels_to_images_lists(labels: np.ndarray, k: int | None = None) -> list[list[int]]:
    k = int(labels.max()) + 1 if k is None else k
    lists: list[list[int]] = [[] for _ in range(k)]
    for i, c in enumerate(np.asarray(labels).tolist()):
        if c >= 0:  # -1: an image left out of the clustering
            lists[c].append(i)
    return lists


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
        obj = [labels_to_images_lists(clog.load(e)) for e in epochs]
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


def init_runtime(device: str = "auto") -> Runtime:
    """Decide device and distributed state.

    Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) the process group is created
    with NCCL on GPU and gloo on CPU, and each process takes GPU ``LOCAL_RANK``. A plain
    ``python main.py`` stays single-process.
    """
    import torch.distributed as dist

    if device not in ("auto", "cuda", "cpu"):
        raise ValueError(f"--device must be auto, cuda or cpu, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda requested but CUDA is not available")
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        dev = torch.device("cuda", torch.cuda.current_device())
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", rank=rank, world_size=world_size)
    return Runtime(rank, world_size, local_rank, dev)


def gather_rows(local: torch.Tensor, local_idx: torch.Tensor, n: int, rt: Runtime) -> torch.Tensor | None:
    """Assemble an (n, D) matrix on rank 0 from per-rank rows ``local`` (n_r, D) at ``local_idx``.

    Every rank pads to the same row count (``ceil(n / world)``) so a plain ``gather`` works
    with both NCCL and gloo. Returns the full matrix on rank 0 (on ``local``'s device), None
    elsewhere. Single process: scatters ``local`` into place and returns it.
    """
    import torch.distributed as dist

    d = local.shape[1]
    if not rt.distributed:
        out = torch.empty(n, d, dtype=local.dtype, device=local.device)
        out[local_idx.to(local.device)] = local
        return out
    cap = -(-n // rt.world_size)
    rows = torch.zeros(cap, d, dtype=local.dtype, device=rt.device)
    index = torch.full((cap,), -1, dtype=torch.int64, device=rt.device)  # -1 = padding
    rows[:local.shape[0]] = local.to(rt.device)
    index[:local.shape[0]] = local_idx.to(rt.device)
    row_bufs = [torch.empty_like(rows) for _ in range(rt.world_size)] if rt.is_main else None
    index_bufs = [torch.empty_like(index) for _ in range(rt.world_size)] if rt.is_main else None
    dist.gather(rows, row_bufs, dst=0)
    dist.gather(index, index_bufs, dst=0)
    if not rt.is_main:
        return None
    allrows, allidx = torch.cat(row_bufs), torch.cat(index_bufs)
    keep = allidx >= 0
    out = torch.empty(n, d, dtype=local.dtype, device=rt.device)
    out[allidx[keep]] = allrows[keep]
    return out


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
