"""TensorBoard logging (``--tensorboard`` of main.py and eval_linear.py); a no-op when off.

Each epoch, under EXP/tensorboard/: every number of the epoch's log.jsonl record as a scalar
(``log/<key>``, step = epoch), the learning rate of each optimizer (``lr/<name>``), and for
main.py the cluster sizes (a histogram, ``clusters/size``) and a few images of the largest
clusters (``clusters/top<r>``). View with ``tensorboard --logdir EXP/tensorboard``.

A resumed run continues the same folder: events of the epochs it redoes are discarded
(SummaryWriter's ``purge_step``), so each epoch has one value; main.py's --overwrite and
eval_linear.py's --overwrite delete the folder.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
import numpy as np
import torch

from errors import ScriptError

PIN = "tensorboard==2.21.0"  # the version of requirements.txt


class Board:
    """Writer of one run's TensorBoard events; every method does nothing when ``logdir`` is None."""

    def __init__(self, logdir: str | os.PathLike | None):
        self.logdir = None if logdir is None else Path(logdir)
        self.writer = None
        if self.logdir is not None:
            try:  # fail at start-up, not after the first epoch
                from torch.utils.tensorboard import SummaryWriter  # noqa: F401
            except ImportError as e:
                raise ScriptError(f"--tensorboard needs the tensorboard package ({e}): pip install {PIN}") from None

    @property
    def on(self) -> bool:
        return self.logdir is not None

    def start(self, first_step: int = 0) -> None:
        """Open the writer; events of steps >= ``first_step`` from an earlier invocation are dropped."""
        if not self.on or self.writer is not None:
            return
        from torch.utils.tensorboard import SummaryWriter
        # purge_step: TensorBoard drops the earlier events of steps >= first_step (a redone epoch,
        # or what a run killed before its first checkpoint left), so each step has one value
        self.writer = SummaryWriter(str(self.logdir), purge_step=first_step)

    def record(self, record: dict, step: int, prefix: str = "log") -> None:
        """Every finite number of ``record`` (a log.jsonl line) as ``prefix/<key>``."""
        if not self.on:
            return
        self.start()
        for key, value in record.items():
            if key == "epoch" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(value):
                self.writer.add_scalar(f"{prefix}/{key}", value, step)

    def learning_rates(self, optimizers: dict[str, torch.optim.Optimizer], step: int) -> None:
        if not self.on:
            return
        self.start()
        for name, opt in optimizers.items():
            self.writer.add_scalar(f"lr/{name}", opt.param_groups[0]["lr"], step)

    def clusters(self, labels: np.ndarray, k: int, step: int, load_image=None, top: int = 3,
                 per_cluster: int = 8, size: int = 64) -> None:
        """Histogram of the k cluster sizes; ``per_cluster`` images (``load_image(i)`` -> PIL)
        of each of the ``top`` largest clusters as a (n, 3, size, size) batch."""
        if not self.on:
            return
        self.start()
        labels = np.asarray(labels)
        sizes = np.bincount(labels[labels >= 0], minlength=k)  # (k,), -1: unreadable, left out
        self.writer.add_histogram("clusters/size", sizes, step)
        if load_image is None:
            return
        from torchvision.transforms import functional as F
        for rank, c in enumerate(np.argsort(-sizes, kind="stable")[:top]):
            members = np.flatnonzero(labels == c)[:per_cluster]
            if len(members) == 0:
                break
            imgs = [F.to_tensor(F.center_crop(F.resize(load_image(int(i)), size), size)) for i in members]
            self.writer.add_images(f"clusters/top{rank + 1}", torch.stack(imgs), step)  # (n, 3, S, S)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def read_scalars(logdir: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(step, value), ...]}`` of the events under ``logdir`` (TensorBoard's reader)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}

