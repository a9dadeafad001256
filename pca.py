"""PCA whitening + L2 normalisation of the features (the first half of DeepCluster's
clustering step, faiss ``PCAMatrix(D, 256, -0.5)`` semantics), one process or sharded over
the ranks (each holding only its own rows); the top-k eigensolver it uses."""
from __future__ import annotations

import logging
import math

import numpy as np
import torch

from cluster_util import (ClusteringError, _all_reduce, _broadcast, _default_device, _distributed, _row_chunk,
                          faiss, resolve_backend)

log = logging.getLogger("deepcluster")

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
# sharded PCA: each rank holds only the rows it extracted
# ---------------------------------------------------------------------------------------
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
