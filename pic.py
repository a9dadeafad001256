"""PIC: power iteration clustering (Lin & Cohen) on the exact kNN graph of the whitened
features, the original's ``--clustering PIC``."""
from __future__ import annotations

import time

import numpy as np
import torch

from cluster_util import _as_tensor, _default_device, _row_chunk, labels_to_lists
from pca import preprocess_features


def make_graph(xb, nnn: int, device=None) -> tuple[np.ndarray, np.ndarray]:
    """Exact kNN graph: (N, d) -> I, D of shape (N, nnn + 1) (self first, squared L2)."""
    dev = _default_device(device)
    x = _as_tensor(xb, dev)
    n = x.shape[0]
    kk = min(nnn + 1, n)
    sq = (x * x).sum(1)
    I = torch.empty(n, kk, dtype=torch.long)
    D = torch.empty(n, kk, dtype=torch.float32)
    step = _row_chunk(n)
    for s in range(0, n, step):
        xbk = x[s:s + step]
        d = (sq[s:s + step, None] - 2 * xbk @ x.T + sq[None, :]).clamp_min(0)
        # guarantee that a point is its own first neighbour even with duplicates
        rows = torch.arange(xbk.shape[0], device=dev)
        d[rows, rows + s] = -1.0
        dv, di = d.topk(kk, dim=1, largest=False)
        I[s:s + step], D[s:s + step] = di.cpu(), dv.clamp_min(0).cpu()
    return I.numpy(), D.numpy()


def pic_graph(I: np.ndarray, D: np.ndarray, sigma: float):
    """Symmetric kNN affinity W = A + A^T, A_ij = exp(-d_ij / sigma^2) for the nnn neighbours.

    Built as the original does (one CSR row per node, its neighbours in kNN order, column 0,
    self, dropped; then scipy's A + A^T): the order in which a row stores its entries decides
    which neighbour wins a tie in :func:`pic_pointers`, so it is kept as scipy makes it.
    """
    from scipy.sparse import csr_matrix

    n, kk = I.shape
    vals = np.exp(-D[:, 1:].astype(np.float64) / sigma ** 2).ravel()
    A = csr_matrix((vals, I[:, 1:].ravel(), (kk - 1) * np.arange(n + 1)), shape=(n, n))
    return A + A.transpose()


def pic_pointers(W, v: np.ndarray) -> np.ndarray:
    """Each node points to the neighbour j maximising W_ij (v_j - v_i) when it is > 0 (else to
    itself); among equal maxima, the first one in the row's storage order (the original's
    strict ``>`` scan)."""
    n = W.shape[0]
    row = np.repeat(np.arange(n), np.diff(W.indptr))
    col = W.indices
    score = W.data * (v[col] - v[row])
    keep = score > 0
    pos = np.flatnonzero(keep)                     # storage positions of the candidates
    r, c, sc = row[keep], col[keep], score[keep]
    order = np.lexsort((-pos, sc, r))  # by row, score ascending, then later positions first
    r, c = r[order], c[order]
    last = np.r_[r[1:] != r[:-1], True]            # per row: the best score, earliest position
    ptr = np.arange(n)
    ptr[r[last]] = c[last]
    return ptr


def run_pic(I: np.ndarray, D: np.ndarray, sigma: float, alpha: float, niter: int = 200) -> np.ndarray:
    """Power iteration clustering on the kNN graph -> (N,) cluster id per node.

    Clusters are numbered by their head (the node every pointer chain ends at), in node order.
    """
    n = I.shape[0]
    W = pic_graph(I, D, sigma)
    WT = W.transpose().tocsr()
    v = np.full(n, 1.0 / n, dtype=np.float32)  # the original starts in float32; W is float64
    for _ in range(niter):
        v = alpha * (WT @ v) + (1 - alpha) / n
        v /= v.sum()
    ptr = pic_pointers(W, v)
    # follow pointers to the heads (v strictly increases along pointers: no cycles)
    while True:
        nxt = ptr[ptr]
        if np.array_equal(nxt, ptr):
            break
        ptr = nxt
    _, labels = np.unique(ptr, return_inverse=True)
    return labels


class PIC:
    """Power iteration clustering (Lin & Cohen), as the original's ``--clustering PIC``."""

    def __init__(self, sigma: float = 0.2, nnn: int = 5, alpha: float = 0.001,
                 distribute_singletons: bool = True, pca: int = 256, device=None, backend: str = "auto"):
        self.sigma, self.nnn, self.alpha = sigma, nnn, alpha
        self.distribute_singletons = distribute_singletons
        self.pca, self.device, self.backend = pca, device, backend
        self.images_lists: list[list[int]] = []
        self.labels: np.ndarray | None = None
        self.timings: dict[str, float] = {}

    def cluster(self, data, verbose: bool = False) -> float:
        """Cluster (N, D) features; fills ``images_lists``. PIC has no objective: returns 0."""
        t0 = time.time()
        xb = preprocess_features(data, self.pca, backend=self.backend, device=self.device)
        I, D = make_graph(xb, self.nnn, device=self.device)
        labels = run_pic(I, D, self.sigma, self.alpha)
        if self.distribute_singletons:
            labels = distribute_singletons(labels, I)
        _, labels = np.unique(labels, return_inverse=True)
        self.labels = labels
        self.images_lists = labels_to_lists(labels, int(labels.max()) + 1)
        self.timings = {"pic": time.time() - t0}
        return 0.0


def distribute_singletons(labels: np.ndarray, I: np.ndarray) -> np.ndarray:
    """A node alone in its cluster joins the cluster of its nearest neighbour that is not
    alone *in the initial clustering* (every decision is taken on ``labels`` as given, as the
    original; a singleton whose neighbours are all singletons stays alone)."""
    sizes = np.bincount(labels)
    out = labels.copy()
    for i in np.flatnonzero(sizes[labels] == 1):
        for j in I[i, 1:]:
            if sizes[labels[j]] > 1:
                out[i] = labels[j]
                break
    return out
