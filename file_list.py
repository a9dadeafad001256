"""``--file_list``: the images of a dataset too big to list by walking its folder (DIR), held
in numpy buffers rather than Python strings (see :class:`FileList`)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from errors import DataError


class FileList:
    """The images of a ``--file_list``: one path per line, optionally ``PATH<TAB>LABEL``.

    Held in numpy buffers, not Python objects: ``blob`` (uint8) is the file itself and
    ``starts`` / ``ends`` (int64, (N,)) delimit each path in it. A DataLoader worker
    (a fork) reads them without writing to them: a Python list of N str has a reference
    count in every object, which each access writes, so every page of the list is
    gradually copied into every worker (the known copy-on-access growth: 10 M paths ~ 1 GB
    per worker); these buffers stay shared. Item i is ``os.path.join(root, path_i)`` (an
    absolute path stays as is). ``labels``: (N,) int64 class ids of the labels in sorted
    order (``classes``), or None when no line has one. ``sha256``: of the file's bytes.
    """

    def __init__(self, path: str | os.PathLike, root: str | os.PathLike | None = None):
        import hashlib

        path = Path(path)
        try:
            raw = path.read_bytes()
        except OSError as e:
            raise DataError(f"--file_list {str(path)!r} cannot be read: {e}") from e
        self.sha256 = hashlib.sha256(raw).hexdigest()
        self.root = str(root if root is not None else path.resolve().parent)
        blob = np.frombuffer(raw, dtype=np.uint8)
        ends = np.flatnonzero(blob == 10)                        # newline positions
        if len(blob) and blob[-1] != 10:
            ends = np.append(ends, len(blob))                    # no newline at the end
        starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64)
        ends = ends.astype(np.int64)
        cr = (ends > starts) & (blob[np.maximum(ends - 1, 0)] == 13)  # CRLF
        ends = ends - cr
        keep = ends > starts                                     # blank lines carry no image
        starts, ends = starts[keep], ends[keep]
        if not len(starts):
            raise DataError(f"--file_list {str(path)!r} lists no image")
        # optional label after the last tab of a line
        tabs = np.flatnonzero(blob == 9)
        last_tab = np.searchsorted(tabs, ends) - 1               # index of the last tab before each line end
        has = last_tab >= 0
        has[has] = tabs[last_tab[has]] >= starts[has]
        self.labels, self.classes = None, []
        if has.any():
            if not has.all():
                first = int(np.flatnonzero(~has)[0])
                raise DataError(f"--file_list {str(path)!r}: entry {first + 1} (blank lines not counted) has no "
                                f"label (TAB LABEL) but "
                                f"others do: give every line a label or none")
            t = tabs[last_tab]
            # the labels as one (N, widest) byte matrix viewed as fixed-width strings: no Python object per line
            width = ends - t - 1
            w = max(1, int(width.max()))
            cols = np.arange(w)
            names = blob[np.minimum(t[:, None] + 1 + cols, len(blob) - 1)] * (cols < width[:, None])
            classes, inverse = np.unique(np.ascontiguousarray(names).view(f"S{w}")[:, 0], return_inverse=True)
            self.labels = inverse.astype(np.int64).reshape(-1)
            self.classes = [c.decode("utf-8", "replace") for c in classes]
            ends = t
        self.blob, self.starts, self.ends = blob, starts, ends

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> str:
        p = bytes(self.blob[self.starts[i]:self.ends[i]]).decode("utf-8", "surrogateescape")
        return os.path.join(self.root, p)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def select(self, keep: np.ndarray | list[int]) -> "FileList":
        """The entries ``keep`` (dataset indices), sharing the blob."""
        out = object.__new__(FileList)
        out.__dict__.update(self.__dict__)
        keep = np.asarray(keep, dtype=np.int64)
        out.starts, out.ends = self.starts[keep], self.ends[keep]
        out.labels = None if self.labels is None else self.labels[keep]
        return out
