"""The original release's helpers, under their original names: ``UnifLabelSampler``,
``AverageMeter``, ``Logger``, ``learning_rate_decay`` and ``load_model``; plus
:class:`SeededShardSampler`, which shards the sampler's draws across ranks.

``load_model`` is :func:`checkpoint.load_model` (loading lives with the checkpoints).
"""
from __future__ import annotations

import json
import os
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

import fileio


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
        self.data: list[Any] = fileio.read_jsonl(self.path) if os.path.exists(self.path) else []
        if fileio._ends_torn(self.path):
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
        fileio.atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.data))


def learning_rate_decay(optimizer: torch.optim.Optimizer, t: int, lr_0: float) -> None:
    """lr_t = lr_0 / sqrt(1 + lr_0 * weight_decay * t), per parameter group (the original's)."""
    for group in optimizer.param_groups:
        group["lr"] = float(lr_0 / np.sqrt(1 + lr_0 * group["weight_decay"] * t))


def load_model(path: str | os.PathLike | None, arch: str | None = None, purpose: str = "") -> torch.nn.Module:
    """The original's ``util.load_model``: :func:`checkpoint.load_model`."""
    import checkpoint  # above this module: imported on use, so util stays importable alone

    return checkpoint.load_model(path, arch, purpose)
