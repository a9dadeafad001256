"""Clustering step of DeepCluster: PCA-whitening + L2, then k-means (or PIC).

Public API kept from the original release::

    xb = preprocess_features(features)          # (N, D) -> (N, 256) whitened, unit rows
    km = Kmeans(k); loss = km.cluster(features) # fills km.images_lists
    train_set = cluster_assign(km.images_lists, dataset)
    labels = arrange_clustering(km.images_lists)

Two k-means backends with faiss semantics:

* ``faiss``: ``faiss.Clustering`` (GPU flat index when faiss was built with GPU support and
  CUDA is present, else CPU).
* ``torch``: the same algorithm in pure PyTorch (exact L2 assignment, mean update, empty
  clusters re-seeded by splitting a populated centroid with a symmetric 1/1024 perturbation).
  It runs on a CUDA GPU without faiss-gpu, and on CPU.

``backend="auto"`` picks torch on CUDA (even with faiss-gpu installed), else faiss when
installed, else torch.
"""
from __future__ import annotations

import logging
import math
import time
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

try:  # faiss is optional: the torch backend covers every path
    import faiss  # type: ignore
except ImportError:  # pragma: no cover - depends on the environment
    faiss = None

log = logging.getLogger("deepcluster")

__all__ = ["preprocess_features", "pca_fit", "pca_apply", "top_eigh", "covariance", "PCA_SOLVERS", "Kmeans", "PIC", "run_kmeans",
           "kmeans_torch", "cluster_assign", "arrange_clustering", "ReassignedDataset",
           "OrderedReassignedDataset", "make_graph", "run_pic", "resolve_backend",
           "ClusteringError"]

SPLIT_EPS = 1.0 / 1024.0  # faiss's relative perturbation when splitting a centroid
# Null directions of the PCA (no variance: fewer images than dims, dead or duplicate units) are
# zeroed by the whitening instead of being scaled up (faiss divides by whatever eigenvalue its
# float32 covariance gives them). Their computed eigenvalues are float32 rounding: within about
# 1e-8 of 0 relative to the largest (measured: -9.5e-9 to +1.5e-10 in the null space of 2,400
# real-photo fc7 rows, +-7.6e-9 on the digits demo's fc7; +2.6e-8 for 200 points of rank 40 in
# 64 dims), which is where trained fc7's real tail ends up: its 256th eigenvalue is 7.1e-8 of the
# largest on those photo features after 4 epochs, 2.1e-7 on the digits. No fixed floor separates
# the two (1e-7 zeroed 40 of the photos' 256 real axes, 1e-6 143 of the digits'), but rank
# deficiency shows as a cliff: an axis whose eigenvalue is below NULL_EIG_CLIFF x the previous
# one's starts the null space (real spectra fall by at most ~25x between neighbours, to the
# noise it is >= 3e4x). An axis is zeroed from the first cliff on, or below NULL_EIG_REL x the
# largest (an eigenvalue with no float32 meaning at all); a smooth tail is whitened, as faiss does.
NULL_EIG_REL = 1e-9
NULL_EIG_CLIFF = 1e-3


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


# Row blocks of the (N, D) feature matrix in the PCA and the input checks: 2**25 values
# (128 MB in float32), so the temporaries stay small beside the matrix itself.
PCA_BLOCK = 1 << 25
# Row blocks of the covariance pass: 2**26 values (16,384 rows of fc7, 256 MB float32): 7%
# faster than 2**25 on this 2-core CPU (longer GEMMs), 2**27 no faster.
COV_BLOCK = 1 << 26


# ---------------------------------------------------------------------------------------
# PCA whitening + L2 normalisation
# ---------------------------------------------------------------------------------------
PCA_SOLVERS = ("auto", "randomized", "exact")
# Randomized top-k eigensolver: a block of k + oversampling vectors, shifted subspace
# iteration until every wanted Ritz pair has ||C v - theta v|| <= EIG_TOL * theta_k, theta_k
# the k-th (smallest kept) Ritz value: the scale of the spectrum at the cut, to which the
# whitening brings every kept axis (see _randomized_eigh for what this guarantees).
# 1e-3: at 1e-2 the k-means objective at k = 1,000 (8 points per cluster) moved by up to
# 1.1% from the exact-PCA one (single seeds), at 1e-3 by at most 0.1% (N = 8,000, D = 4096).
EIG_TOL = 1e-3
EIG_MAX_ITER = 40
EIG_FIRST_CHECK = 2  # first Rayleigh-Ritz + residual check (later ones: when predicted to pass)
EIG_MAX_SKIP = 4     # at most this many iterations between two checks
# No progress: a check whose worst residual is above EIG_STALL x the previous check's (same
# precision) ends the iteration: a floor or a stagnation. A descent slow enough to lose less
# than 10% between two checks would not reach the tolerance within EIG_MAX_ITER anyway.
EIG_STALL = 0.9
# Float32 products resolve a residual down to ~2 eps32 * theta_1 (measured on trained fc7
# features, theta_256 / theta_1 ~ 5e-7: the float32 rounding of C Q along the dominant axis
# alone is 2e-7 theta_1 = 0.4 theta_256, 400x the tolerance, and the old solver never
# converged). When tol * theta_k is below EIG_FP32_MARGIN eps32 theta_1 (theta_k / theta_1
# < 1.9e-3 at tol = 1e-3), the iteration continues in float64 products (a float64 GEMM is
# ~2x a float32 one here; on the 1/i spectrum, theta_256 / theta_1 = 3.9e-3, float32 stays).
EIG_FP32_MARGIN = 16.0


def _oversampled(k: int, d: int) -> int:
    """Block width of the subspace iteration: k plus max(3k/4, 32) guard vectors (448 for
    k = 256: 8 iterations to a 1e-3 residual on a 1/i spectrum; 384 needed 11, the same time)."""
    return min(d, k + max(3 * k // 4, 32))


# Below this matrix size the exact eigendecomposition is cheap (measured here: 0.14 s at
# d = 1024, 0.31 s at 1437, 0.9 s at 2048, 4.2 s at 3072, 12-65 s at 4096) and, unlike the
# randomized solver, never slow on a flat spectrum (the digits demo's Gram matrix, d = 1437).
RANDOMIZED_MIN_DIM = 2048


def resolve_pca_solver(solver: str, d: int, k: int) -> str:
    """'auto' -> 'randomized' when the matrix has at least RANDOMIZED_MIN_DIM rows and the
    block is at most half of it (where it pays off), else 'exact'. Raises ValueError naming
    the value for an unknown solver."""
    if solver not in PCA_SOLVERS:
        raise ValueError(f"unknown PCA solver {solver!r}: expected one of {', '.join(PCA_SOLVERS)}")
    if solver == "auto":
        return "randomized" if d >= RANDOMIZED_MIN_DIM and 2 * _oversampled(k, d) <= d else "exact"
    return solver


# The eigensolver's report of the last PCA fitted (solver, iterations, residual, precision,
# fallback and its reason): read by the benchmarks; the log has it at DEBUG level.
LAST_PCA_INFO: dict = {}


def top_eigh(mat: torch.Tensor, k: int, solver: str = "auto", tol: float = EIG_TOL,
             max_iter: int = EIG_MAX_ITER, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Top-``k`` eigenpairs of a symmetric PSD matrix (float64, (d, d)), largest first.

    Returns ``evals`` (k,) float64, ``evecs`` (d, k) float64 and an info dict: ``solver``
    used, ``iterations``, ``residual`` (the worst ||C v - theta v|| / theta_k), ``precision``
    of the products ('float32', or 'float64' when the spectrum's range needs it), ``fallback``
    and ``reason``. ``randomized``: shifted subspace iteration with Rayleigh-Ritz checks, until
    every wanted pair's residual is <= ``tol`` x the k-th Ritz value (see
    :func:`_randomized_eigh`; cost on this 2-core CPU at d = 4096, k = 256: 1/i spectrum, 8
    float32 iterations, ~1.2 s; trained fc7, 5 iterations, 2 float32 then float64; against
    11-65 s for the full eigendecomposition). When the iteration fails (non-finite values, no progress
    between two checks, ``max_iter`` reached) it falls back to ``torch.linalg.eigh`` and logs
    a warning saying which criterion failed, with its value.
    """
    d = mat.shape[0]
    k = min(k, d)
    used = resolve_pca_solver(solver, d, k)
    info = {"solver": used, "iterations": 0, "residual": 0.0, "precision": "float64",
            "fallback": False, "reason": ""}
    if used == "randomized":
        evals, evecs, out = _randomized_eigh(mat, k, tol, max_iter, seed)
        info.update(out)
        if evals is not None:
            return evals, evecs, info
        info["fallback"] = True
        log.warning("PCA: the randomized eigensolver stopped after %d iterations (%s; top %d axes, "
                    "residual tolerance %.0e x theta_%d): falling back to the exact eigendecomposition",
                    info["iterations"], info["reason"], k, tol, k)
    evals, evecs = torch.linalg.eigh(mat)           # ascending
    info["solver"] = "exact"
    info["spectrum"] = _spectrum_summary(evals.flip(0)[:_oversampled(k, d)], k)
    return evals.flip(0)[:k], evecs.flip(1)[:, :k], info


def _spectrum_summary(theta: torch.Tensor, k: int) -> dict:
    """The shape of the spectrum at the cut, from the descending (Ritz) values theta (w,):
    theta_1 and theta_k / theta_1, theta_{k+1} / theta_k (the gap at the cut), theta_w /
    theta_k (w = the solver's block: its convergence rate)."""
    t = [float(v) for v in theta]
    out = {"theta_1": t[0], "k_over_1": t[k - 1] / t[0] if t[0] else 0.0}
    if len(t) > k and t[k - 1]:
        out["k1_over_k"] = t[k] / t[k - 1]
        out["w_over_k"] = t[-1] / t[k - 1]
    return out


def _orthonormalize(y: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis (d, w) of the columns of y (d, w): CholeskyQR2 on the columns scaled
    to unit norm (two passes of Q = Y R^-1, R the Cholesky factor of Y^T Y: GEMMs and a
    triangular solve, 4-15x faster than Householder QR here at 4096 x 448: LAPACK's QR ran at
    2-5 GFLOP/s on these 2 cores), Householder QR when the Gram matrix is too ill-conditioned
    (Cholesky fails, or the first pass leaves Q^T Q further than 0.5 from the identity)."""
    ys = y / y.norm(dim=0).clamp_min(torch.finfo(y.dtype).tiny)    # same span, better conditioned
    for second in (False, True):
        g = ys.T @ ys                                                # (w, w)
        r, bad = torch.linalg.cholesky_ex(g, upper=True)
        if bad or (second and float((g - torch.eye(g.shape[0], dtype=g.dtype, device=g.device)).abs().max()) > 0.5):
            return torch.linalg.qr(y).Q
        ys = torch.linalg.solve_triangular(r, ys, upper=True, left=False)   # Y R^-1
    return ys


def _rayleigh_ritz(q: torch.Tensor, y: torch.Tensor, k: int):
    """Ritz pairs of the block q (d, w) orthonormal, y = C q (d, w), both in the iteration's
    precision: all w Ritz values (descending, float64), the top-k Ritz vectors (d, k, float64)
    and their residual norms ||C v - theta v|| (k,) float64.

    In float32 the products stay in float32 (y itself is a float32 GEMM, so float64 here
    would add cost, not accuracy); only the small (w, w) eigenproblem is solved in float64.
    """
    b = q.T @ y                                      # B = Q^T C Q, (w, w)
    theta, u = torch.linalg.eigh(((b + b.T) / 2).double())
    theta, u = theta.flip(0), u.flip(1)[:, :k].to(q.dtype)
    v = q @ u                                        # Ritz vectors (d, k)
    res = (y @ u - v * theta[:k].to(q.dtype)).norm(dim=0).double()   # ||C v - theta v||, C v = Y u
    return theta, v.double(), res


def _randomized_eigh(mat: torch.Tensor, k: int, tol: float, max_iter: int, seed: int, shift: bool = True):
    """Shifted subspace iteration: (evals (k,), evecs (d, k), info) or (None, None, info)
    with info['reason'] saying why it stopped without converging.

    Each iteration is one GEMM Y = C Q (d x d x w) and a QR of Y - sigma Q. The shift
    sigma = theta_w / 2 (half the smallest Ritz value of the block, so at most half of
    lambda_w) centres the unwanted spectrum [0, lambda_{w+1}] on 0: an unwanted component
    shrinks against the i-th wanted one by rho_i = (theta_w / 2) / (theta_i - theta_w / 2)
    per iteration instead of lambda_{w+1} / lambda_i (1/i spectrum, k = 256, w = 448: 0.40
    instead of 0.57; trained fc7: ~0.15). A Rayleigh-Ritz + residual check (~as costly as one
    iteration) is made at EIG_FIRST_CHECK, then where the residual is predicted (from rho_k) to
    reach ``tol``, at most EIG_MAX_SKIP iterations later. ``shift=False``: plain subspace
    iteration (sigma = 0), for comparison.

    Criterion: ||C v_i - theta_i v_i|| <= tol * s for every wanted pair, s = theta_k (floored
    at NULL_EIG_REL theta_1: pairs below that are zeroed by the whitening). Why theta_k: the
    whitened output is the projection on span(V) scaled so that each kept axis has unit
    variance; since Rayleigh-Ritz makes V^T C V diagonal, only the subspace span(V) can be
    wrong, by components of v_i on eigenvectors u_j outside the top k. The residual bounds
    each such component c_j by ||r_i|| / |theta_i - lambda_j|: directions whose eigenvalue is
    below the cut by a fraction g of theta_k enter with c_j <= tol / g, and a component from a
    direction of nearly the same eigenvalue (a flat tail: lambda_257 / lambda_256 = 0.99 on
    trained fc7) changes the captured variance by c_j^2 (theta_i - lambda_j) only; any basis
    of such a cluster is as good after the whitening, and none is asked for: the Ritz pairs
    inside the block converge together at the rate of the block's cut (w + 1), whatever the
    gaps between them. Every theta_i is within tol * theta_k of an eigenvalue, so the
    whitening scale 1/sqrt(theta_i) is within tol / 2 relative. Measured against the exact
    eigendecomposition on trained fc7 features (the demo's checkpoint, 8,985 x 4096, 3 seeds):
    5 iterations, eigenvalues within 1.8e-7 relative, whitened projector within 1.4e-9 of the
    exact one (squared sines of the principal angles of C^1/2 V and the top-k eigenspace,
    summed, / k). The old criterion (each pair relative to its own theta_i, float32 products
    only) hit its 40 iterations at a float32 floor of 1.4e-2 on the same matrix.

    Precision: float32 products until the first check; when tol * theta_k is below
    EIG_FP32_MARGIN eps32 theta_1 (float32 cannot resolve it), float64 from then on.
    Stops without converging when a residual is non-finite, when a check does not improve on
    the previous one by EIG_STALL (no progress), or at ``max_iter``.
    """
    d = mat.shape[0]
    width = _oversampled(k, d)
    m = mat.float()                                  # float32 copy: the products until the switch
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    q = torch.randn(d, width, generator=gen, dtype=torch.float32).to(mat.device)
    q = _orthonormalize(m @ q)                       # (d, width)
    sigma, check, worst, prev = 0.0, EIG_FIRST_CHECK, float("inf"), float("inf")
    info = {"iterations": 0, "residual": worst, "precision": "float32", "reason": ""}
    for it in range(1, max_iter + 1):
        info["iterations"] = it
        y = m @ q                                    # (d, width): one GEMM per iteration
        if it >= check or it == max_iter:
            theta, v, res = _rayleigh_ritz(q, y, k)
            scale = max(float(theta[k - 1]), float(theta[0]) * NULL_EIG_REL, torch.finfo(torch.float64).tiny)
            worst = float(res.max()) / scale
            info["residual"] = worst
            if not math.isfinite(worst):             # NaN/inf in the matrix: let the exact solver say so
                info["reason"] = f"non-finite residual {worst} (NaN or inf in the matrix)"
                break
            if worst <= tol:
                info["spectrum"] = _spectrum_summary(theta, k)
                return theta[:k], v, info
            fp32_floor = EIG_FP32_MARGIN * torch.finfo(torch.float32).eps * max(float(theta[0]), 0.0)
            if m.dtype == torch.float32 and tol * scale < fp32_floor:
                # float32 cannot resolve the residual asked for (dominant axis): float64 from here
                m, q, y = mat.double(), q.double(), y.double()
                info["precision"] = "float64"
                prev = float("inf")
            elif worst > EIG_STALL * prev:
                info["reason"] = (f"no progress: worst residual {worst:.3g} x theta_{k} after {it} iterations, "
                                  f"{prev:.3g} at the previous check ({info['precision']} products)")
                break
            else:
                prev = worst
            sigma = max(0.0, float(theta[-1]) / 2) if shift else 0.0
            # rate of the slowest wanted pair; unshifted: lambda_{w+1} / lambda_k ~ theta_w / theta_k
            rho = (sigma if shift else float(theta[-1])) / max(float(theta[k - 1]) - sigma, 1e-300)
            steps = math.log(tol / worst) / math.log(rho) if 0 < rho < 1 else EIG_MAX_SKIP
            check = it + min(EIG_MAX_SKIP, max(1, math.ceil(steps)))
        q = _orthonormalize(y - sigma * q if sigma else y)
    else:
        info["reason"] = f"iteration limit: worst residual {worst:.3g} x theta_{k} after {max_iter} iterations"
    log.debug("randomized eigensolver: %s", info["reason"])
    return None, None, info


COV_COL_BLOCKS = 8  # column blocks of the covariance: only the upper block triangle is computed


def _col_edges(d: int) -> list[int]:
    nb = max(1, min(COV_COL_BLOCKS, d // 256))
    return [round(i * d / nb) for i in range(nb + 1)]


def _centre_into(buf: torch.Tensor | None, rows: torch.Tensor,
                 mean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows (m, D) - mean as float32, the buffer holding it): written into ``buf`` (a reused
    (step, D) float32 buffer; a new one when None or too small, returned for the next block).
    Reusing it spares a fresh block-sized allocation per block and its page faults (the
    allocator returns large blocks to the system)."""
    m = rows.shape[0]
    if buf is None or buf.shape[0] < m or buf.device != rows.device:
        buf = torch.empty(max(m, 1), rows.shape[1], dtype=torch.float32, device=rows.device)
    return torch.sub(rows, mean, out=buf[:m]), buf


def scatter_upper_(acc: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, step: int) -> torch.Tensor:
    """Add the scatter sum_i (x_i - mean)^T (x_i - mean) of x (N, D) to the upper block
    triangle of ``acc`` (D, D) float64, in place (the blocks below it are left as they are:
    :func:`mirror_upper_` fills them once at the end). Float32 GEMMs per row block of ``step``
    rows, added to the float64 accumulator; float16/bfloat16 rows are upcast per block, so
    the matrix is never copied whole.

    With the columns cut into B blocks, only the blocks on and above the diagonal are
    multiplied ((B + 1) / 2B of a full ``xc.T @ xc``: 56% for B = 8, 1.5x faster measured at
    8,000 x 4,096; 77-83% of the float32 GEMM peak at 8,000-50,000 rows). Each float32 block is added to the float64
    accumulator in place (no float64 temporary). Each block holds the same dot products as
    the full product. Peak: step x D float32 plus one product block beside the accumulator.
    """
    edges = _col_edges(acc.shape[0])
    buf = None
    for s in range(0, x.shape[0], step):
        xc, buf = _centre_into(buf, x[s:s + step], mean)               # (m, D) float32
        for a, b in zip(edges[:-1], edges[1:]):
            acc[a:b, a:].add_(xc[:, a:b].T @ xc[:, a:])                # (b - a, D - a)
    return acc


def mirror_upper_(acc: torch.Tensor) -> torch.Tensor:
    """Copy the upper block triangle written by :func:`scatter_upper_` into the lower one."""
    edges = _col_edges(acc.shape[0])
    for a, b in zip(edges[:-1], edges[1:]):
        acc[b:, a:b] = acc[a:b, b:].T
    return acc


def covariance(x: torch.Tensor, mean: torch.Tensor, step: int) -> torch.Tensor:
    """(D, D) float64 covariance of x (N, D) around ``mean`` (D,) float32 (see
    :func:`scatter_upper_`: float32 GEMMs per row block, accumulated in float64, upper block
    triangle only, mirrored)."""
    d = x.shape[1]
    cov = torch.zeros(d, d, dtype=torch.float64, device=x.device)
    return mirror_upper_(scatter_upper_(cov, x, mean, step)).div_(x.shape[0])


def pca_fit(x: torch.Tensor, dim: int, eigen_power: float = -0.5,
            solver: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Fit a PCA like faiss ``PCAMatrix(d, dim, eigen_power)``.

    x: (N, D) float32 (float16/bfloat16 storage accepted: upcast block by block).
    Returns ``mean`` (D,) and ``proj`` (D, dim) such that
    ``(x - mean) @ proj`` is the projection on the top ``dim`` principal axes, each scaled
    by ``eigenvalue ** eigen_power`` where eigenvalues are those of the covariance (scatter / N),
    so the output has identity covariance. faiss uses the scatter matrix itself, so its
    whitened output is ours divided by sqrt(N): the same after L2 normalisation.
    ``solver``: 'exact' (full ``torch.linalg.eigh``), 'randomized' (top-``dim`` subspace
    iteration with a residual check and exact fallback, see :func:`top_eigh`) or 'auto'
    (randomized when ``dim`` is small beside D).
    """
    n, d = x.shape
    resolve_pca_solver(solver, d, dim)  # unknown name: fail before the costly pass
    step = _row_chunk(max(d, n if n < d else 0), PCA_BLOCK)
    # Mean: float32 sums of row blocks accumulated in float64. ``x.sum(0, dtype=float64)``
    # on the whole matrix materialises a float64 copy of it (2x the features: 42 GB for
    # ImageNet). float16/bfloat16 storage is upcast one block at a time.
    mean = torch.zeros(d, dtype=torch.float64, device=x.device)
    for s in range(0, n, step):
        mean += x[s:s + step].float().sum(0).double()
    mean /= n
    mean32 = mean.float()
    if n < d:
        # Fewer points than dims: eigen-decompose the (N, N) Gram matrix instead of the
        # (D, D) covariance (what faiss does too); G u = l u  =>  S (Xc^T u) = l (Xc^T u).
        xc = x.float() - mean32
        gram = (xc @ xc.T).double() / n
        evals, u, info = top_eigh(gram, dim, solver)
        evecs = xc.T.double() @ u                                    # (D, dim)
        evecs = evecs / evecs.norm(dim=0, keepdim=True).clamp_min(1e-30)
    else:
        evals, evecs, info = top_eigh(covariance(x, mean32, _row_chunk(d, COV_BLOCK)), dim, solver)
    log.debug("PCA eigensolver: %s", info)
    LAST_PCA_INFO.clear()
    LAST_PCA_INFO.update(info)
    return mean32, pca_projection(evals, evecs, dim, eigen_power)


def live_axes(evals: torch.Tensor) -> torch.Tensor:
    """(m,) bool: the axes of the descending eigenvalues ``evals`` (m,) that carry variance,
    i.e. above NULL_EIG_REL x the largest and before the first cliff (an eigenvalue below
    NULL_EIG_CLIFF x its predecessor); the others are the null space, zeroed by the whitening."""
    e = evals.clamp_min(0)
    live = e > e[:1] * NULL_EIG_REL
    if len(e) > 1:
        cliff = torch.nonzero(e[1:] < e[:-1] * NULL_EIG_CLIFF)
        if len(cliff):
            live[int(cliff[0]) + 1:] = False
    return live


def pca_projection(evals: torch.Tensor, evecs: torch.Tensor, dim: int, eigen_power: float = -0.5) -> torch.Tensor:
    """(D, dim) float32 projection from the top eigenpairs ``evals`` (m,), ``evecs`` (D, m)
    float64 (m <= dim): signs fixed, axes scaled by eigenvalue ** eigen_power, zero-padded."""
    d = evecs.shape[0]
    # Sign convention: make the largest-magnitude coordinate of each axis positive, so
    # that repeated fits are reproducible (faiss's sign is arbitrary too).
    idx = evecs.abs().argmax(0)
    signs = torch.sign(evecs[idx, torch.arange(evecs.shape[1], device=evecs.device)])
    evecs = evecs * torch.where(signs == 0, torch.ones_like(signs), signs)
    if eigen_power != 0:
        # Eigenvalues of a rank-deficient covariance (N <= dim, dead units) are ~0 or slightly
        # negative. Scaling those noise directions by ~1e19 made them dominate every row after
        # L2 normalisation (all points collapsed onto one axis): zero them instead (live_axes).
        scale = evals.clamp_min(torch.finfo(torch.float32).tiny).pow(eigen_power)
        if eigen_power < 0:
            scale = torch.where(live_axes(evals), scale, torch.zeros_like(scale))
        evecs = evecs * scale
    if evecs.shape[1] < dim:  # N < dim: the missing axes carry no variance, output zeros
        evecs = torch.cat([evecs, evecs.new_zeros(d, dim - evecs.shape[1])], 1)
    return evecs.float()


def pca_apply(x: torch.Tensor, mean: torch.Tensor, proj: torch.Tensor, l2: bool = True) -> torch.Tensor:
    """(N, D) -> (N, dim): project with a fitted PCA, then L2-normalise rows.

    Rows are centred before the product: x @ proj - mean @ proj would skip that copy but
    loses float32 accuracy as |mean| / std grows (measured on ReLU features: 7e-5 per unit row
    at mean / std = 34, against 1e-6 centred first).
    """
    out = torch.empty(x.shape[0], proj.shape[1], dtype=torch.float32, device=x.device)
    step = _row_chunk(x.shape[1], PCA_BLOCK)
    buf = None
    for s in range(0, x.shape[0], step):
        xc, buf = _centre_into(buf, x[s:s + step], mean)               # (m, D) float32
        y = torch.matmul(xc, proj, out=out[s:s + step])
        if l2:
            y /= y.norm(dim=1, keepdim=True).clamp_min(1e-10)
    return out


def _check_features(x, what: str = "features") -> None:
    if x.ndim != 2:
        raise ClusteringError(f"{what} must be a 2-d (N, D) array, got shape {tuple(x.shape)}")
    if x.shape[0] < 2:
        raise ClusteringError(f"{what}: need at least 2 rows to cluster, got {x.shape[0]}")
    # Checked by row blocks: a whole-matrix isfinite() would allocate an (N, D) bool array
    # (5 GB for ImageNet's 1.28M x 4096 features) just to answer yes or no.
    step = _row_chunk(x.shape[1], PCA_BLOCK)
    is_t = isinstance(x, torch.Tensor)
    for s in range(0, x.shape[0], step):
        blk = x[s:s + step]
        # A sum is finite only if every term is (NaN and inf propagate): one read of the
        # block, 8x faster than isfinite().all(); a non-finite sum can also be an overflow
        # of finite values, so that case is decided element-wise.
        if is_t:
            total = blk.sum(dtype=torch.float32)
        else:
            with np.errstate(over="ignore", invalid="ignore"):
                total = blk.sum(dtype=np.float32)
        if math.isfinite(float(total)):
            continue
        finite = torch.isfinite(blk).all() if is_t else np.isfinite(blk).all()
        if not bool(finite):
            raise ClusteringError(f"{what} contain NaN or inf values: the network has diverged")


LOW_PRECISION = (torch.float16, torch.bfloat16)


def to_device_blocks(x, device: torch.device) -> torch.Tensor:
    """(N, D) features (numpy or tensor, any device) as a tensor on ``device``, copied by
    row blocks into one preallocated tensor; float16/bfloat16 storage is kept as is
    (halving the memory of the matrix: the PCA upcasts each row block to float32 itself),
    anything else becomes float32. Already there in that dtype: returned as is. Each block
    copy is synchronous, so host memory is read before the call returns."""
    t = torch.as_tensor(x) if not isinstance(x, torch.Tensor) else x
    dtype = t.dtype if t.dtype in LOW_PRECISION else torch.float32
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:  # "cuda" is the current GPU: compare as cuda:i,
        device = torch.device("cuda", torch.cuda.current_device())  # not a second copy of the matrix
    if t.device == device and t.dtype == dtype:
        return t
    out = torch.empty(t.shape, dtype=dtype, device=device)
    step = _row_chunk(t.shape[1] if t.ndim > 1 else 1, PCA_BLOCK)
    for s in range(0, t.shape[0], step):
        out[s:s + step].copy_(t[s:s + step])
    return out


def preprocess_features(npdata, pca: int = 256, backend: str = "auto", device=None,
                        pca_solver: str = "auto"):
    """PCA-reduce to ``pca`` dims with whitening (eigen power -0.5), then L2-normalise rows.

    npdata: (N, D) float32 numpy array or torch tensor (a float16/bfloat16 tensor is read
    block by block, never copied whole to float32); the result has the same kind
    ((N, min(pca, D)) float32). The work runs on ``device`` (None: CUDA when available),
    never on the device the data happens to be on: host float16 features of a GPU run are
    moved there block by block (:func:`to_device_blocks`) and the result stays there.
    ``pca_solver`` picks the eigensolver of the torch PCA (see :func:`pca_fit`).
    """
    is_tensor = isinstance(npdata, torch.Tensor)
    if npdata.ndim != 2:
        _check_features(npdata)
    n, d = npdata.shape
    dim = min(pca, d)
    if backend == "auto":
        # PyTorch's eigensolver beats faiss's PCAMatrix on CPU too (20 s vs 1 s measured
        # for 1,797 x 4,096 on 2 cores), so "auto" means torch here.
        backend = "torch"
    else:
        backend = resolve_backend(backend, device)
    if backend == "faiss" and not is_tensor and n > dim:
        # (faiss's PCAMatrix cannot output more dims than N - 1 axes carry: torch path then)
        _check_features(npdata)
        x = np.ascontiguousarray(npdata, dtype=np.float32)
        mat = faiss.PCAMatrix(d, dim, -0.5)
        mat.train(x)
        if not mat.is_trained:
            raise ClusteringError("faiss PCA training failed")
        x = mat.apply_py(x)
        norms = np.linalg.norm(x, axis=1)
        x = x / np.maximum(norms, 1e-10)[:, None]
        return x.astype(np.float32, copy=False)
    dev = _default_device(device)
    xt = to_device_blocks(npdata, dev)
    _check_features(xt)
    mean, proj = pca_fit(xt, dim, solver=pca_solver)
    out = pca_apply(xt, mean, proj)
    return out if is_tensor else out.cpu().numpy()


# ---------------------------------------------------------------------------------------
# k-means
# ---------------------------------------------------------------------------------------
def nearest_centroid(x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact L2 search: x (N, d), c (k, d) -> (labels (N,) int64, squared distances (N,))."""
    c_sq = (c * c).sum(1)                                  # (k,)
    labels = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    dists = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    step = _row_chunk(c.shape[0])
    for s in range(0, x.shape[0], step):
        xb = x[s:s + step]
        # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2, the first term added after the argmin
        d = torch.addmm(c_sq, xb, c.T, beta=1.0, alpha=-2.0)  # (rows, k)
        dmin, amin = d.min(1)
        labels[s:s + step] = amin
        dists[s:s + step] = (dmin + (xb * xb).sum(1)).clamp_min(0)
    return labels, dists


def split_empty_clusters(centroids: torch.Tensor, counts: torch.Tensor, n: int,
                         rng: np.random.RandomState) -> int:
    """Re-seed empty clusters in place, as faiss does; returns the number of splits.

    Each empty cluster ci takes the centroid of a cluster cj drawn with probability
    proportional to (count_j - 1); both are pushed apart by a symmetric relative
    perturbation of 1/1024 on alternate coordinates, and cj's count is shared between them.
    """
    k, d = centroids.shape
    counts_np = counts.detach().cpu().numpy().astype(np.float64)
    empty = np.flatnonzero(counts_np == 0)
    if len(empty) == 0:
        return 0
    sign = torch.ones(d, device=centroids.device)
    sign[1::2] = -1                                          # +, -, +, - ...
    nsplit = 0
    for ci in empty:
        weights = np.maximum(counts_np - 1.0, 0.0)
        if weights.sum() <= 0:  # every cluster holds <= 1 point: nothing can be split
            break
        cj = int(rng.choice(k, p=weights / weights.sum()))
        centroids[ci] = centroids[cj] * (1 + SPLIT_EPS * sign)
        centroids[cj] = centroids[cj] * (1 - SPLIT_EPS * sign)
        counts_np[ci] = counts_np[cj] / 2  # faiss keeps fractional counts (float hassign)
        counts_np[cj] -= counts_np[ci]
        nsplit += 1
    return nsplit


def kmeans_torch(x: torch.Tensor, k: int, niter: int = 20, seed: int = 1234,
                 verbose: bool = False) -> dict:
    """Lloyd's k-means with faiss's semantics, in PyTorch, on ``x``'s device.

    x: (N, d) float32. Returns a dict with ``centroids`` (k, d), ``labels`` (N,) = nearest
    final centroid, ``obj`` (niter,) per-iteration objective (sum of squared distances to
    the centroids in force at that iteration, as faiss's iteration_stats) and ``nsplit``.
    The one-process case of :func:`kmeans_sharded` (same code, no collective).
    """
    return kmeans_sharded(x, k, niter=niter, seed=seed, verbose=verbose)


def kmeans_faiss(x: np.ndarray, k: int, niter: int = 20, seed: int = 1234, verbose: bool = False) -> dict:
    """The original's k-means call, through faiss (GPU flat index when available)."""
    n, d = x.shape
    if n < k:
        raise ClusteringError(f"k-means: {n} points cannot make {k} clusters (k must be <= N)")
    x = np.ascontiguousarray(x, dtype=np.float32)
    clus = faiss.Clustering(d, k)
    clus.seed = int(seed)
    clus.niter = niter
    clus.max_points_per_centroid = 10_000_000  # never subsample (the original's setting)
    clus.min_points_per_centroid = 1  # only silences faiss's "please provide more points" warning
    clus.verbose = verbose
    if faiss_has_gpu():
        res = faiss.StandardGpuResources()
        cfg = faiss.GpuIndexFlatConfig()
        cfg.useFloat16 = False
        index = faiss.GpuIndexFlatL2(res, d, cfg)
    else:
        index = faiss.IndexFlatL2(d)
    clus.train(x, index)
    _, labels = index.search(x, 1)
    stats = clus.iteration_stats
    obj = [stats.at(i).obj for i in range(stats.size())]
    centroids = faiss.vector_float_to_array(clus.centroids).reshape(k, d)
    nsplit = sum(stats.at(i).nsplit for i in range(stats.size()))
    return {"centroids": torch.from_numpy(centroids), "labels": torch.from_numpy(labels[:, 0].astype(np.int64)),
            "obj": obj, "nsplit": int(nsplit)}


def run_kmeans(x, nmb_clusters: int, verbose: bool = False, backend: str = "auto",
               seed: int | None = None, niter: int = 20, device=None) -> tuple[list[int], float]:
    """Original API: k-means on preprocessed (N, d) data -> (labels as list, final objective)."""
    res = _kmeans(x, nmb_clusters, verbose=verbose, backend=backend, seed=seed, niter=niter, device=device)
    return res["labels"].cpu().tolist(), res["obj"][-1]


def _kmeans(x, k: int, verbose=False, backend="auto", seed=None, niter=20, device=None) -> dict:
    if seed is None:
        seed = int(np.random.randint(1234))  # the original draws a fresh seed per call
    is_tensor = isinstance(x, torch.Tensor)
    dev = _default_device(device)  # the run's device, not the data's
    backend = resolve_backend(backend, dev)
    if backend == "faiss":
        xn = x.detach().cpu().numpy() if is_tensor else x
        return kmeans_faiss(xn, k, niter=niter, seed=seed, verbose=verbose)
    return kmeans_torch(to_device_blocks(x, dev), k, niter=niter, seed=seed, verbose=verbose)


def count_distinct_rows(x) -> int:
    """Number of distinct rows of (N, d) data, via a random projection (exact with
    probability 1 for distinct rows; O(N d) instead of sorting whole rows)."""
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
    g = torch.Generator(device="cpu").manual_seed(0)
    r = torch.randn(t.shape[1], 2, generator=g, dtype=torch.float64).to(t.device)
    step = _row_chunk(t.shape[1])
    # (N, 2) projections, block by block: no float64 copy of the whole matrix
    proj = torch.cat([t[s:s + step].double() @ r for s in range(0, t.shape[0], step)]).cpu().numpy()
    return int(len(np.unique(proj, axis=0)))


def check_not_collapsed(n_distinct: int, n: int, k: int) -> None:
    """k-means needs at least k distinct points: a :class:`ClusteringError` saying why otherwise."""
    if n_distinct < k:
        raise ClusteringError(
            f"the features hold only {n_distinct} distinct point(s) among {n} images, fewer "
            f"than k={k}: the network's features have collapsed (or the images are duplicates); "
            f"lower --k or restart from an earlier checkpoint")


def labels_to_lists(labels: np.ndarray, k: int) -> list[list[int]]:
    """(N,) cluster ids -> ``images_lists[c]`` = sorted indices of the images in cluster c.

    A label of -1 (an image left out of the clustering) puts the image in no list.
    """
    labels = np.asarray(labels, dtype=np.int64)
    order = np.argsort(labels, kind="stable")
    order = order[labels[order] >= 0]
    bounds = np.cumsum(np.bincount(labels[order], minlength=k))[:-1]
    return [chunk.tolist() for chunk in np.split(order, bounds)]


class Kmeans:
    """k-means on PCA-whitened, L2-normalised features (the DeepCluster clustering step)."""

    def __init__(self, k: int, backend: str = "auto", niter: int = 20, pca: int = 256,
                 device=None, seed: int | None = None, pca_solver: str = "auto"):
        if int(k) < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k, self.backend, self.niter, self.pca = int(k), backend, niter, pca
        self.device, self.seed, self.pca_solver = device, seed, pca_solver
        self.images_lists: list[list[int]] = []
        self.labels: np.ndarray | None = None
        self.centroids: torch.Tensor | None = None
        self.obj: list[float] = []
        self.nsplit = 0
        self.timings: dict[str, float] = {}

    def cluster(self, data, verbose: bool = False) -> float:
        """Cluster (N, D) features; fills ``images_lists`` and returns the k-means loss."""
        if data.shape[0] < self.k:
            raise ClusteringError(f"k={self.k} clusters requested but only {data.shape[0]} images "
                                  f"(k must be <= the number of images)")
        t0 = time.time()
        xb = preprocess_features(data, self.pca, backend=self.backend, device=self.device,
                                 pca_solver=self.pca_solver)
        check_not_collapsed(count_distinct_rows(xb), data.shape[0], self.k)
        t1 = time.time()
        res = _kmeans(xb, self.k, verbose=verbose, backend=self.backend, seed=self.seed,
                      niter=self.niter, device=self.device)
        self.labels = res["labels"].cpu().numpy()
        self.centroids = res["centroids"]  # (k, pca) final centroids (labels = nearest of them)
        self.obj, self.nsplit = [float(o) for o in res["obj"]], res["nsplit"]
        self.images_lists = labels_to_lists(self.labels, self.k)
        self.timings = {"pca": t1 - t0, "kmeans": time.time() - t1}
        if verbose:
            log.info("k-means time: %.1f s", time.time() - t0)
        return self.obj[-1]

    def cluster_shard(self, x: torch.Tensor, idx: torch.Tensor | None, n: int, rt=None, verbose: bool = False,
                      stats: dict | None = None) -> tuple[float, np.ndarray]:
        """Cluster the features of all ranks, each holding only its own rows (any world size).

        x (n_local, D): this rank's rows (host or device, any float dtype; never copied whole),
        ``idx`` (n_local,) int64 their dataset indices (None: x is the whole (n, D) matrix).
        Rows whose first value is NaN (images found unreadable, ``--bad_images skip``) are left
        out without copying the matrix and get the label -1. PCA: :func:`pca_fit_sharded`;
        k-means: :func:`kmeans_sharded` (``faiss`` on one process: the original's
        ``faiss.Clustering``; under torchrun: the same sharded Lloyd with faiss's search on
        each shard). Labels come back by one all-reduce of an (n,) int32 buffer. Every rank
        returns (loss, (n,) int64 labels) and fills ``images_lists``. Peak memory:
        :func:`cluster_peak_bytes`; ``stats`` receives the bytes of the buffers held per phase.
        """
        t0 = time.time()
        dev = _default_device(self.device)
        n_local, d = x.shape
        idx = torch.arange(n_local) if idx is None else torch.as_tensor(idx, dtype=torch.int64).cpu()
        nan = torch.isnan(x[:, 0]).cpu()                   # (n_local,) unreadable images
        n_bad = int(_all_reduce(nan.sum().reshape(1).to(torch.int64), rt))
        keep = None if n_bad == 0 else ~nan
        n_kept = n - n_bad
        if n_kept < self.k:
            raise ClusteringError(f"k={self.k} clusters requested but only {n_kept} images "
                                  f"(k must be <= the number of images)")
        kept_idx = idx if keep is None else idx[keep]
        if keep is None:
            pos = kept_idx
        else:  # position of each kept row among all kept images (dataset order): an (n,) int32 scan
            flags = torch.zeros(n, dtype=torch.int32)
            flags[kept_idx] = 1
            _all_reduce(flags, rt)
            pos = (torch.cumsum(flags, 0, dtype=torch.int32) - 1)[kept_idx].long()
            del flags
        seed = int(np.random.randint(1234)) if self.seed is None else self.seed
        stats = {} if stats is None else stats
        dim = min(self.pca, d)
        mean, proj = pca_fit_sharded(x, dim, rt, keep, pos, n_kept, self.pca_solver, dev, stats=stats)
        xb = pca_apply_kept(x, keep, mean, proj, dev)      # (n_kept_local, dim) float32
        check_not_collapsed(count_distinct_sharded(xb, self.k, rt), n_kept, self.k)
        t1 = time.time()
        backend = resolve_backend(self.backend, dev)
        if backend == "faiss" and not _distributed(rt):
            res = kmeans_faiss(xb.cpu().numpy(), self.k, niter=self.niter, seed=seed, verbose=verbose)
            stats["kmeans"] = 0
        else:
            res = kmeans_sharded(xb, self.k, niter=self.niter, seed=seed, verbose=verbose, rt=rt,
                                 pos=pos if _distributed(rt) or keep is not None else None, n=n_kept,
                                 assign=faiss_nearest if backend == "faiss" else None, stats=stats)
        # one collective: each rank writes label + 1 at its rows' dataset indices, zeros elsewhere
        buf = torch.zeros(n, dtype=torch.int32, device=rt.device if _distributed(rt) else dev)
        buf[kept_idx.to(buf.device)] = res["labels"].to(buf.device, torch.int32) + 1
        _all_reduce(buf, rt)
        labels = buf.cpu().numpy().astype(np.int64) - 1
        stats["exchange"] = buf.numel() * 4 + labels.nbytes + res["labels"].numel() * 8
        stats["shard"] = x.numel() * x.element_size()
        stats["xb"] = xb.numel() * 4
        stats["peak_bytes"] = stats["shard"] + max(stats["pca"], stats["xb"] + max(stats["kmeans"], stats["exchange"]))
        del buf, xb
        self.labels = labels
        self.centroids = res["centroids"]
        self.obj, self.nsplit = [float(o) for o in res["obj"]], res["nsplit"]
        self.images_lists = labels_to_lists(labels, self.k)
        self.timings = {"pca": t1 - t0, "kmeans": time.time() - t1}
        if verbose:
            log.info("k-means time: %.1f s", time.time() - t0)
        return self.obj[-1], labels


# ---------------------------------------------------------------------------------------
# sharded clustering: each rank holds only the rows it extracted (one code path for any W)
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


def cluster_sums(x: torch.Tensor, assign: torch.Tensor, k: int, rt=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-cluster sums and sizes over every rank's rows: the one reduction of a sharded Lloyd step.

    x (n_local, d) float rows of this rank, assign (n_local,) int64 cluster of each row.
    Returns ``sums`` (k, d) float64 and ``counts`` (k,) int64, all-reduced (every rank gets the
    totals). Rows are summed in float64 (upcast one block at a time), so the order in which
    ranks, blocks or atomics add them moves a sum by at most ~n_c * 2**-53 of its magnitude
    (see :func:`kmeans_sharded`).
    """
    n, d = x.shape
    sums = torch.zeros(k, d, dtype=torch.float64, device=x.device)
    step = _row_chunk(d, PCA_BLOCK)
    for s in range(0, n, step):
        sums.index_add_(0, assign[s:s + step], x[s:s + step].double())
    counts = torch.bincount(assign, minlength=k)
    _all_reduce(sums, rt)
    _all_reduce(counts, rt)
    return sums, counts


def _kept_blocks(x: torch.Tensor, keep: torch.Tensor | None, step: int, device: torch.device):
    """x's rows (those where ``keep``) ``step`` at a time, on ``device`` as float32: a block
    copy at most, never one of the whole matrix."""
    for s in range(0, x.shape[0], step):
        blk = x[s:s + step]
        if keep is not None:
            kb = keep[s:s + step]
            if not bool(kb.all()):
                blk = blk[kb.to(blk.device)]
        yield blk.to(device).float()


def pca_fit_sharded(x: torch.Tensor, dim: int, rt=None, keep: torch.Tensor | None = None,
                    pos: torch.Tensor | None = None, n: int | None = None, solver: str = "auto",
                    device=None, eigen_power: float = -0.5, stats: dict | None = None):
    """:func:`pca_fit` over the rows of every rank, each rank holding only its own.

    x (n_local, D) this rank's rows (any float dtype, any device; read block by block and
    moved to ``device``), ``keep`` (n_local,) bool rows to use (None: all), ``pos``
    (n_kept_local,) int64 global position of each kept row among the ``n`` kept rows of all
    ranks (dataset order). The mean and the (D, D) covariance are accumulated per rank in
    float64 and all-reduced; rank 0 runs the top-``dim`` eigensolver (:func:`top_eigh`) and
    broadcasts the (D, dim) projection. Fewer rows than dims (n < D): the n kept rows (n x D
    < D x D values) are assembled on every rank and :func:`pca_fit` takes its Gram-matrix
    path, as one process does. Returns (mean (D,), proj (D, dim)) float32 on ``device``.
    """
    n_local, d = x.shape
    dev = _default_device(device)
    resolve_pca_solver(solver, d, dim)
    step = _row_chunk(d, PCA_BLOCK)
    acc = torch.zeros(d + 1, dtype=torch.float64, device=dev)  # sum of the kept rows, their count
    for blk in _kept_blocks(x, keep, step, dev):
        acc[:d] += blk.sum(0).double()
        acc[d] += blk.shape[0]
    _all_reduce(acc, rt)
    n_all = int(acc[d])
    if n is not None and n != n_all:
        raise ValueError(f"pca_fit_sharded: the ranks hold {n_all} kept rows, not {n}")
    if n_all < 2:
        raise ClusteringError(f"features: need at least 2 rows to cluster, got {n_all}")
    if not bool(torch.isfinite(acc).all()):  # the same all-reduced value on every rank: all raise
        raise ClusteringError("features contain NaN or inf values: the network has diverged")
    if n_all < d:
        if not _distributed(rt) and keep is None:
            full = to_device_blocks(x, dev)
        else:  # each kept row at its global position; the sum adds zeros to it (exact)
            full = torch.zeros(n_all, d, dtype=torch.float32, device=dev)
            o = 0
            for blk in _kept_blocks(x, keep, step, dev):
                full[pos[o:o + len(blk)].to(dev)] = blk
                o += len(blk)
            _all_reduce(full, rt)
        if stats is not None:
            stats["pca"] = full.numel() * 4 if full is not x else 0
        mean32, proj = pca_fit(full, dim, eigen_power, solver)
        return mean32, proj
    mean32 = (acc[:d] / n_all).float()
    cov = torch.zeros(d, d, dtype=torch.float64, device=dev)
    cstep = _row_chunk(d, COV_BLOCK)
    for blk in _kept_blocks(x, keep, cstep, dev):
        scatter_upper_(cov, blk, mean32, cstep)
    _all_reduce(mirror_upper_(cov), rt)
    cov /= n_all
    if stats is not None:
        stats["pca"] = cov.numel() * cov.element_size()
    proj = torch.empty(d, min(dim, d), dtype=torch.float32, device=dev)
    if rt is None or getattr(rt, "rank", 0) == 0:
        evals, evecs, info = top_eigh(cov, dim, solver)
        log.debug("PCA eigensolver: %s", info)
        LAST_PCA_INFO.clear()
        LAST_PCA_INFO.update(info)
        proj = pca_projection(evals, evecs, dim, eigen_power).contiguous()
    del cov
    return mean32, _broadcast(proj, rt)


def pca_apply_kept(x: torch.Tensor, keep: torch.Tensor | None, mean: torch.Tensor, proj: torch.Tensor,
                   device=None) -> torch.Tensor:
    """:func:`pca_apply` (centre, project, L2-normalise) of x's kept rows, block by block:
    (n_kept_local, dim) float32 on ``device``."""
    dev = _default_device(device)
    rows = x.shape[0] if keep is None else int(keep.sum())
    out = torch.empty(rows, proj.shape[1], dtype=torch.float32, device=dev)
    o, buf = 0, None
    for blk in _kept_blocks(x, keep, _row_chunk(x.shape[1], PCA_BLOCK), dev):
        xc, buf = _centre_into(buf, blk, mean)                         # (m, D) float32
        y = torch.matmul(xc, proj, out=out[o:o + len(blk)])
        y /= y.norm(dim=1, keepdim=True).clamp_min(1e-10)
        o += len(blk)
    return out


def count_distinct_sharded(xb: torch.Tensor, k: int, rt=None) -> int:
    """Distinct rows over every rank's ``xb`` (n_local, d), exact when below ``k``; else a
    number >= k (all a collapse check needs). When every rank holds fewer than k distinct
    rows, their keys ((< k, 2) each) are all-gathered: O(W k), never O(N)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    r = torch.randn(xb.shape[1], 2, generator=g, dtype=torch.float64).to(xb.device)
    step = _row_chunk(xb.shape[1])
    keys = np.unique(torch.cat([xb[s:s + step].double() @ r for s in range(0, xb.shape[0], step)]).cpu().numpy()
                     if len(xb) else np.zeros((0, 2)), axis=0)
    most = _all_reduce(torch.tensor([len(keys)], dtype=torch.int64), rt, op="max")
    if int(most) >= k or not _distributed(rt):
        return len(keys) if not _distributed(rt) else int(most)
    import torch.distributed as dist
    pad = torch.full((k, 2), float("nan"), dtype=torch.float64)
    pad[:len(keys)] = torch.from_numpy(keys)
    pad = pad.to(rt.device)
    parts = [torch.empty_like(pad) for _ in range(rt.world_size)]
    dist.all_gather(parts, pad)
    allk = torch.cat(parts).cpu().numpy()
    return int(len(np.unique(allk[~np.isnan(allk[:, 0])], axis=0)))


def _init_centroids(x: torch.Tensor, pos: torch.Tensor, init: torch.Tensor, rt) -> torch.Tensor:
    """(k, d) rows of global positions ``init`` (k,), each taken from the rank holding it."""
    if not _distributed(rt) and pos is None:
        return x[init].clone()
    k = len(init)
    sorted_init, slot = init.sort()
    j = torch.searchsorted(sorted_init, pos).clamp_max(k - 1)
    hit = sorted_init[j] == pos                          # (n_local,) rows that start a centroid
    centroids = torch.zeros(k, x.shape[1], dtype=x.dtype, device=x.device)
    centroids[slot[j[hit]]] = x[hit]
    return _all_reduce(centroids, rt)                    # one non-zero term per centroid: exact


def faiss_nearest(x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`nearest_centroid` through a faiss flat L2 index (GPU when faiss has one)."""
    d = c.shape[1]
    if faiss_has_gpu():
        cfg = faiss.GpuIndexFlatConfig()
        cfg.useFloat16 = False
        index = faiss.GpuIndexFlatL2(faiss.StandardGpuResources(), d, cfg)
    else:
        index = faiss.IndexFlatL2(d)
    index.add(np.ascontiguousarray(c.detach().cpu().numpy(), dtype=np.float32))
    dist_, lab = index.search(np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32), 1)
    return (torch.from_numpy(lab[:, 0].astype(np.int64)).to(x.device),
            torch.from_numpy(dist_[:, 0]).to(x.device))


def kmeans_sharded(x: torch.Tensor, k: int, niter: int = 20, seed: int = 1234, verbose: bool = False,
                   rt=None, pos: torch.Tensor | None = None, n: int | None = None,
                   assign=None, stats: dict | None = None) -> dict:
    """Lloyd's k-means with faiss's semantics over rows spread across ranks.

    x (n_local, d) float32: this rank's rows; ``pos`` (n_local,) int64 their global positions
    among the ``n`` rows of all ranks (None: one process, x is everything). Every rank takes
    the same decisions: the k initial centroids are the rows at ``randperm(n)[:k]`` of a
    generator seeded with ``seed`` (the one-process draw), each assignment is local
    (``assign``, default :func:`nearest_centroid`), per-cluster sums and sizes are
    all-reduced (:func:`cluster_sums`), empty clusters are split from the all-reduced sizes
    with a numpy RNG seeded alike, and rank 0's centroids are broadcast after every update.

    Same result as one process: the sums are float64, so the order of summation (ranks,
    blocks, atomics) moves a sum of n_c unit rows by at most about n_c * 2**-53 * n_c, i.e. a
    centroid coordinate by ~n_c * 1.1e-16 (1e-10 for a million rows) before it is rounded to
    float32, whose spacing near 1 is 6e-8: the float32 centroid is the same or one ulp away
    (when the float64 value falls within that bound of a rounding boundary). An assignment
    can then flip only for a row whose two nearest centroids are within ~1e-7 of each other
    in squared distance; on data without such near-ties the labels equal the one-process run's.
    Returns ``centroids`` (k, d), local ``labels`` (n_local,), ``obj`` (niter,) all-reduced,
    ``nsplit``. ``stats`` receives ``kmeans_bytes``: the largest sum of the buffers held
    here (see :func:`cluster_peak_bytes`).
    """
    n_local, d = x.shape
    n = n_local if n is None else int(n)
    if n < k:
        raise ClusteringError(f"k-means: {n} points cannot make {k} clusters (k must be <= N)")
    assign = assign or nearest_centroid
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    perm = torch.randperm(n, generator=gen)             # (n,) int64: the one-process draw
    init = perm[:k].to(x.device)
    held = perm.numel() * 8 + k * d * 4
    del perm
    centroids = _init_centroids(x, None if pos is None else pos.to(x.device), init, rt)
    rng = np.random.RandomState(int(seed) % (2 ** 32))
    obj, nsplit = [], 0
    for it in range(niter):
        labels, dists = assign(x, centroids)
        obj.append(float(_all_reduce(dists.sum(dtype=torch.float64).reshape(1), rt)))
        sums, counts = cluster_sums(x, labels, k, rt)
        held = max(held, sum(t.numel() * t.element_size() for t in (labels, dists, centroids, sums, counts)))
        nonempty = counts > 0
        centroids[nonempty] = (sums[nonempty] / counts[nonempty, None]).float()
        del sums
        nsplit += split_empty_clusters(centroids, counts, n, rng)
        _broadcast(centroids, rt)  # guards against a backend whose all-reduce differs by rank
        if verbose:
            log.info("k-means iter %d/%d objective %.4f", it + 1, niter, obj[-1])
    labels, _ = assign(x, centroids)
    if stats is not None:
        stats["kmeans"] = held
    return {"centroids": centroids, "labels": labels, "obj": obj, "nsplit": nsplit}


def cluster_peak_bytes(n: int, n_local: int, d: int, k: int, pca: int, element_size: int) -> int:
    """Bytes one rank holds at the peak of the sharded clustering step (:meth:`Kmeans.cluster_shard`).

    ``n`` images in all, ``n_local`` on this rank, D-dim features of ``element_size`` bytes,
    k clusters, PCA to p = min(pca, D). The rank keeps its shard S = n_local D b throughout;
    on top of it, the largest of:

    * PCA: the float64 (D, D) covariance, 8 D^2 (n < D: the n kept rows, 4 n D < 4 D^2);
    * k-means, beside the (n_local, p) float32 whitened rows X = 4 n_local p, the largest of:
      the initial draw ``randperm(n)`` (8 n) with the float32 centroids (4 k p); one Lloyd
      iteration: centroids, float64 sums and int64 sizes (12 k p + 8 k), int64 labels and
      float32 distances of the rows (12 n_local); the label exchange: an (n,) int32 buffer
      and the int64 labels (4 n + 8 n), with the local labels (8 n_local).

    ::

        peak = S + max(8 D^2, X + max(8 n + 4 k p, 12 k p + 8 k + 12 n_local, 12 n + 8 n_local))

    Not counted: block temporaries of fixed size (row blocks of 2**25 values, 2**26 in the
    covariance pass, the (rows, k)
    distance block of :func:`nearest_centroid`, 2**26 values), the eigensolver's float32
    (D, D) copy on rank 0 (4 D^2, 64 MiB at D = 4096).

    Examples (D = 4096, p = 256, shards of ceil(n / W) rows, ``cluster_peak_bytes(...) / 2**30``):

    ========================================  ========  =========  ===================
    run                                        float32   float16   gather, on rank 0
    ========================================  ========  =========  ===================
    ImageNet, n = 1,281,167, W = 8, k = 10^4   2.63 GiB  1.41 GiB  22.0 / 11.0 GiB
    YFCC100M, n = 95.9 M, W = 64, k = 10^4     25.4 GiB  13.9 GiB  1.60 / 0.80 TB
    YFCC100M, n = 95.9 M, W = 64, k = 10^5     25.4 GiB  13.9 GiB  1.60 / 0.80 TB
    ========================================  ========  =========  ===================

    The shard is 2.44 / 1.22 GiB (ImageNet) and 22.9 / 11.4 GiB (YFCC100M) of these; at
    YFCC100M scale the label exchange (12 n = 1.07 GiB) outweighs the k terms (12 k p = 0.29
    GiB at k = 10^5), so both k give the same peak: every rank fits a GPU of 80 GB with room
    for the network, the gather does not fit any.
    """
    p = min(pca, d)
    shard = n_local * d * element_size
    pca_b = 8 * d * d if n >= d else 4 * n * d
    x = 4 * n_local * p
    init = 8 * n + 4 * k * p
    lloyd = 12 * k * p + 8 * k + 12 * n_local
    exchange = 12 * n + 8 * n_local
    return shard + max(pca_b, x + max(init, lloyd, exchange))


# ---------------------------------------------------------------------------------------
# PIC: power iteration clustering on a kNN graph
# ---------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------
# pseudo-labelled datasets
# ---------------------------------------------------------------------------------------
def compact_labels(images_lists: Sequence[Sequence[int]], n: int | None = None) -> np.ndarray:
    """(N,) pseudo-label per image, empty clusters compacted out; -1 for unassigned images."""
    if n is None:
        n = 1 + max((max(lst) for lst in images_lists if len(lst)), default=-1)
    labels = np.full(n, -1, dtype=np.int64)
    c = 0
    for lst in images_lists:
        if len(lst):
            labels[np.asarray(lst, dtype=np.int64)] = c
            c += 1
    return labels


class ReassignedDataset(Dataset):
    """Dataset indexed like the base dataset, each sample labelled with its pseudo-label.

    Item ``idx`` is ``(image, pseudo_label, idx)``: the sampler draws dataset indices, so a
    cluster-balanced sampler really serves balanced clusters (the paper's intent).
    """

    def __init__(self, labels: np.ndarray, dataset, transform=None):
        self.labels = np.asarray(labels, dtype=np.int64)
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, item):
        idx, seed = _split_item(item)
        img = _load(self.dataset, idx)
        return _apply(self.transform, img, seed), int(self.labels[idx]), idx


class OrderedReassignedDataset(Dataset):
    """The original's relabelled dataset: position p holds the p-th image in cluster order.

    Combined with a sampler that returns *dataset* indices (as the original's), position
    and image disagree and the per-cluster balance is lost. Kept only to reproduce the
    published runs (``--sampler original``).
    """

    def __init__(self, images_lists: Sequence[Sequence[int]], dataset, transform=None):
        labels = compact_labels(images_lists, None)
        self.image_indexes = np.concatenate([np.asarray(l, dtype=np.int64) for l in images_lists if len(l)])
        self.pseudolabels = labels[self.image_indexes]
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.image_indexes)

    def __getitem__(self, item):
        pos, seed = _split_item(item)
        idx = int(self.image_indexes[pos])
        img = _load(self.dataset, idx)
        return _apply(self.transform, img, seed), int(self.pseudolabels[pos]), idx


def _split_item(item) -> tuple[int, int | None]:
    """A sampler item is an index, or (index, augmentation seed) (see util.SeededShardSampler)."""
    if isinstance(item, (tuple, list)):
        return int(item[0]), int(item[1])
    return int(item), None


def _load(dataset, idx: int):
    return dataset.load(idx) if hasattr(dataset, "load") else dataset[idx][0]


def _apply(transform, img, seed: int | None):
    """Apply the (random) transform; with a seed, its draws depend on that seed alone, so a
    sample's augmentation is the same whatever the worker, the world size or a restart."""
    if transform is None:
        return img
    if seed is None:
        return transform(img)
    with torch.random.fork_rng(devices=[]):
        # the CPU generator only: torch.manual_seed would also queue a CUDA re-seed (with a
        # recorded stack trace, ~8 ms and a never-freed entry per sample when CUDA is unused)
        torch.random.default_generator.manual_seed(seed)
        return transform(img)


def cluster_assign(images_lists: Sequence[Sequence[int]], dataset, transform=None,
                   order: str = "index") -> Dataset:
    """Pseudo-labelled training set from ``images_lists`` (empty clusters compacted out).

    ``order='index'`` (default) indexes by dataset index; ``order='cluster'`` reproduces the
    original's cluster-ordered dataset (see :class:`OrderedReassignedDataset`).
    """
    if order == "cluster":
        return OrderedReassignedDataset(images_lists, dataset, transform)
    if order != "index":
        raise ValueError(f"order must be 'index' or 'cluster', got {order!r}")
    return ReassignedDataset(compact_labels(images_lists, len(dataset)), dataset, transform)


def arrange_clustering(images_lists: Sequence[Sequence[int]]) -> np.ndarray:
    """``images_lists`` -> (N,) cluster index of each image (original cluster ids, not compacted)."""
    idx = np.concatenate([np.asarray(l, dtype=np.int64) for l in images_lists]) if images_lists else np.zeros(0, np.int64)
    lab = np.concatenate([np.full(len(l), c, dtype=np.int64) for c, l in enumerate(images_lists)]) if images_lists else idx
    out = np.empty(len(idx), dtype=np.int64)
    out[idx] = lab
    return out


def nmi(a: np.ndarray, b: np.ndarray) -> float:
    """Normalised mutual information of two assignments, I(A;B) / sqrt(H(A) H(B)), over the
    images that have a label in both (-1: no cluster)."""
    from sklearn.metrics import normalized_mutual_info_score
    keep = (np.asarray(a) >= 0) & (np.asarray(b) >= 0)
    return float(normalized_mutual_info_score(np.asarray(a)[keep], np.asarray(b)[keep], average_method="geometric"))


def cluster_readable(clusterer, features, verbose: bool = False) -> tuple[float, list[list[int]], np.ndarray]:
    """Cluster the rows of ``features`` (N, D) that are not marked unreadable (NaN rows).

    Returns (loss, images_lists in dataset indices, (N,) cluster id per image, -1 for the
    unreadable ones)."""
    col = features[:, 0]
    nan = np.isnan(col) if isinstance(col, np.ndarray) else torch.isnan(col).cpu().numpy()
    if not nan.any():
        loss = float(clusterer.cluster(features, verbose=verbose))
        return loss, clusterer.images_lists, arrange_clustering(clusterer.images_lists)
    kept = np.flatnonzero(~nan)
    rows = kept if isinstance(features, np.ndarray) else torch.as_tensor(kept, device=features.device)
    loss = float(clusterer.cluster(features[rows], verbose=verbose))
    lists = [kept[np.asarray(lst, dtype=np.int64)].tolist() for lst in clusterer.images_lists]
    labels = np.full(len(features), -1, dtype=np.int64)
    for c, lst in enumerate(lists):
        labels[lst] = c
    return loss, lists, labels


# ---------------------------------------------------------------------------------------
# DeepCluster-v2: spherical k-means on a memory bank sharded over ranks
# (facebookresearch/swav main_deepclusterv2.py ``cluster_memory``, written anew)
# ---------------------------------------------------------------------------------------
def all_gather_varlen(t: torch.Tensor, rt=None) -> torch.Tensor:
    """Concatenation over the ranks of ``rt`` (rank order) of each rank's ``t`` (n_r, ...);
    n_r may differ. ``t`` lives on ``rt.device`` (NCCL gathers device tensors)."""
    if not _distributed(rt):
        return t
    world = rt.world_size
    n = torch.tensor([t.shape[0]], dtype=torch.long, device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    torch.distributed.all_gather(sizes, n)
    sizes = [int(s.item()) for s in sizes]
    pad = t.new_zeros((max(sizes),) + tuple(t.shape[1:]))
    pad[:t.shape[0]] = t
    out = [torch.empty_like(pad) for _ in range(world)]
    torch.distributed.all_gather(out, pad)
    return torch.cat([o[:s] for o, s in zip(out, sizes)])


def sample_centroids(x: torch.Tensor, k: int, seed: int, index: torch.Tensor | None = None, rt=None) -> torch.Tensor:
    """(k, d) initial centroids: k distinct rows of the bank drawn at random, the same on every rank.

    ``index=None`` (swav): rank 0 draws k of *its own* rows (``randperm`` of a generator
    seeded with ``seed``) and broadcasts them. With ``index`` (the dataset index of each
    local row), the k rows are drawn among all ranks' rows by dataset index, so the draw does
    not depend on how the bank is sharded (the world size). Raises ClusteringError when the
    bank holds fewer than k rows.
    """
    g = torch.Generator().manual_seed(int(seed))
    if index is None:
        rank0 = not _distributed(rt) or rt.rank == 0
        c = torch.empty(k, x.shape[1], dtype=x.dtype, device=x.device)
        if rank0:
            if x.shape[0] < k:
                raise ClusteringError(f"the memory bank of rank 0 holds {x.shape[0]} rows, fewer than "
                                      f"{k} clusters: reduce --nmb_prototypes or use more images")
            c = x[torch.randperm(x.shape[0], generator=g)[:k].to(x.device)].clone()
        return _broadcast(c, rt)
    all_idx = torch.sort(all_gather_varlen(index.to(x.device).long(), rt))[0].cpu()  # (N_bank,)
    if len(all_idx) < k:
        raise ClusteringError(f"the memory bank holds {len(all_idx)} rows, fewer than {k} clusters: "
                              f"reduce --nmb_prototypes or use more images")
    chosen = all_idx[torch.randperm(len(all_idx), generator=g)[:k]]                 # (k,) dataset indexes
    # each rank writes the chosen rows it holds; the sum over ranks assembles them
    where = {int(i): j for j, i in enumerate(chosen.tolist())}
    c = torch.zeros(k, x.shape[1], dtype=x.dtype, device=x.device)
    local = [(r, where[i]) for r, i in enumerate(index.cpu().tolist()) if i in where]
    if local:
        rows, slots = zip(*local)
        c[torch.tensor(slots, device=x.device)] = x[torch.tensor(rows, device=x.device)]
    return _all_reduce(c, rt)


def spherical_kmeans(x: torch.Tensor, k: int, niter: int = 10, centroids: torch.Tensor | None = None,
                     seed: int = 0, index: torch.Tensor | None = None,
                     reassign_empty: bool = False, rt=None) -> tuple[torch.Tensor, torch.Tensor]:
    """swav's distributed spherical k-means on this rank's shard ``x`` (n_local, d), unit rows.

    Initial centroids: ``centroids`` or :func:`sample_centroids` (``seed``, ``index``). Then
    ``niter`` times: assign each row to the centroid of largest dot product; per-cluster sums
    and counts, all-reduced over the ranks of ``rt`` (:func:`cluster_sums`, float64: the same
    sums whatever the sharding); each centroid
    with members becomes the L2-normalised mean, an empty one keeps its previous value
    (swav), or with ``reassign_empty`` is re-seeded by splitting a populated cluster as
    faiss does (same draws on every rank). A last assignment follows the last update.
    Returns (centroids (k, d), local assignments (n_local,) int64).
    """
    if centroids is None:
        centroids = sample_centroids(x, k, seed, index, rt)
    centroids = centroids.to(device=x.device, dtype=x.dtype).clone()
    rng = np.random.RandomState(int(seed) % (2 ** 32))
    n_total = int(_all_reduce(torch.tensor([x.shape[0]], dtype=torch.long, device=x.device), rt).item())
    for it in range(niter + 1):
        assign = (x @ centroids.t()).argmax(dim=1) if x.shape[0] else torch.zeros(0, dtype=torch.long,
                                                                                 device=x.device)
        if it == niter:
            break
        sums, counts = cluster_sums(x, assign, k, rt)                                 # (k, d) f64, (k,)
        mask = counts > 0
        centroids[mask] = (sums[mask] / counts[mask].unsqueeze(1)).to(centroids.dtype)
        if reassign_empty:
            split_empty_clusters(centroids, counts, n_total, rng)
        centroids = torch.nn.functional.normalize(centroids, dim=1, p=2)
    return centroids, assign


def gather_assignments(local_assign: torch.Tensor, local_index: torch.Tensor, n: int,
                       fill: int = -100, rt=None) -> torch.Tensor:
    """(n,) int64 label of every dataset index from every rank's (assignments, indexes);
    indexes no rank holds get ``fill`` (swav: -100, the loss's ignore_index)."""
    labels = torch.full((n,), fill, dtype=torch.long)
    idx = all_gather_varlen(local_index.long(), rt).cpu()
    lab = all_gather_varlen(local_assign.long(), rt).cpu()
    labels[idx] = lab
    return labels
