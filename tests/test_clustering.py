"""Clustering step: PCA-whitening, k-means backends, splits, PIC, relabelling."""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

import clustering
import pca
from clustering import ClusteringError

needs_faiss = pytest.mark.skipif(clustering.faiss is None, reason="faiss not installed")


def spread_data(n: int, d: int, seed: int = 0, offset: float = 3.0) -> np.ndarray:
    """Gaussian data with well-separated variances per axis, rotated, not centred."""
    rng = np.random.RandomState(seed)
    x = rng.randn(n, d) * np.linspace(3.0, 0.1, d)
    q, _ = np.linalg.qr(rng.randn(d, d))
    return (x @ q + offset).astype(np.float32)


def blobs(k: int, per: int, d: int, seed: int = 0, sep: float = 3.0, noise: float = 0.05):
    rng = np.random.RandomState(seed)
    centers = rng.randn(k, d) * sep
    y = np.repeat(np.arange(k), per)
    x = centers[y] + noise * rng.randn(k * per, d)
    perm = rng.permutation(len(y))
    return x[perm].astype(np.float32), y[perm]


def sse(x: np.ndarray, centroids: np.ndarray) -> float:
    """Sum over points of the squared distance to the nearest centroid (float64)."""
    x, c = x.astype(np.float64), centroids.astype(np.float64)
    d = (x * x).sum(1)[:, None] - 2 * x @ c.T + (c * c).sum(1)[None, :]
    return float(np.maximum(d.min(1), 0).sum())


# ---------------------------------------------------------------------------------------
# PCA-whitening + L2
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,d,dim", [(800, 48, 24), (120, 300, 32)])
def test_pca_whitening_gives_identity_covariance(n, d, dim):
    x = spread_data(n, d)
    mean, proj = clustering.pca_fit(torch.from_numpy(x), dim)
    y = clustering.pca_apply(torch.from_numpy(x), mean, proj, l2=False).double()
    assert y.shape == (n, dim)
    assert y.mean(0).abs().max() < 1e-3
    cov = y.T @ y / n
    assert torch.allclose(cov, torch.eye(dim, dtype=torch.float64), atol=2e-3)
    # the axes are the top principal axes: their total variance (before whitening) is the
    # top-dim eigenvalue sum of the covariance
    xc = x.astype(np.float64) - x.mean(0)
    evals = np.linalg.eigvalsh(xc.T @ xc / n)[::-1]
    p = proj.double().numpy()
    raw_var = ((xc @ (p / np.linalg.norm(p, axis=0))) ** 2).mean(0)
    assert np.allclose(raw_var, evals[:dim], rtol=1e-3)
    # preprocess = the same projection, L2-normalised
    z = clustering.preprocess_features(x, dim, backend="torch")
    assert isinstance(z, np.ndarray) and z.dtype == np.float32 and z.shape == (n, dim)
    assert np.allclose(np.linalg.norm(z, axis=1), 1.0, atol=1e-5)
    y = y.numpy()
    assert np.allclose(z, y / np.linalg.norm(y, axis=1, keepdims=True), atol=1e-4)


def test_preprocess_keeps_tensors_as_tensors():
    x = torch.from_numpy(spread_data(300, 32))
    z = clustering.preprocess_features(x, 16)
    assert isinstance(z, torch.Tensor) and z.shape == (300, 16) and z.dtype == torch.float32
    assert torch.allclose(z.norm(dim=1), torch.ones(300), atol=1e-5)


@needs_faiss
@pytest.mark.parametrize("n,d,dim", [(800, 48, 24), (120, 300, 32)])
def test_preprocess_matches_faiss_pcamatrix(n, d, dim):
    x = spread_data(n, d, seed=1)
    a = clustering.preprocess_features(x, dim, backend="faiss")
    b = clustering.preprocess_features(x, dim, backend="torch")
    assert a.shape == b.shape == (n, dim)
    # the same up to a sign per output column
    signs = np.sign((a * b).sum(0))
    assert np.all(signs != 0)
    assert np.abs(a * signs - b).max() < 1e-3


def test_preprocess_rank_deficient_features_do_not_collapse():
    """N <= dim or dead units: the null directions must not be blown up by the whitening."""
    rng = np.random.RandomState(0)
    # 200 points of rank 40 in 64 dims (24 dims are combinations of the others)
    base = rng.randn(200, 40) * np.linspace(2, 0.5, 40)
    x = np.concatenate([base, base[:, :24] @ rng.randn(24, 24)], 1).astype(np.float32)
    mean, proj = clustering.pca_fit(torch.from_numpy(x), 64)
    y = clustering.pca_apply(torch.from_numpy(x), mean, proj, l2=False).double()
    assert torch.isfinite(y).all()
    var = (y * y).mean(0)
    live = var > 0.5
    assert int(live.sum()) == 40
    assert torch.allclose(var[live], torch.ones(40, dtype=torch.float64), atol=1e-3)
    assert var[~live].max() < 1e-6
    z = clustering.preprocess_features(x, 64)
    # no single axis dominates every row (the collapse the blow-up produced)
    assert np.abs(z).max(0).max() < 0.99
    assert np.allclose(np.linalg.norm(z, axis=1), 1.0, atol=1e-5)
    # fewer points than output dims (a small image folder): finite, unit rows, N - 1 live axes
    x = spread_data(24, 512)
    for backend in ("torch", "faiss") if clustering.faiss is not None else ("torch",):
        z = clustering.preprocess_features(x, 64, backend=backend)
        assert z.shape == (24, 64) and np.isfinite(z).all()
        assert np.allclose(np.linalg.norm(z, axis=1), 1.0, atol=1e-5)
        assert int((np.abs(z).max(0) > 1e-3).sum()) == 23
        assert np.abs(z).max() < 0.99


def test_preprocess_rejects_bad_input():
    with pytest.raises(ClusteringError):
        clustering.preprocess_features(np.zeros((1, 8), np.float32))
    bad = spread_data(50, 8)
    bad[3, 2] = np.nan
    with pytest.raises(ClusteringError):
        clustering.preprocess_features(bad, 4)


# ---------------------------------------------------------------------------------------
# k-means
# ---------------------------------------------------------------------------------------
def _run(backend: str, x: np.ndarray, k: int, seed: int, niter: int = 20) -> dict:
    if backend == "torch":
        res = clustering.kmeans_torch(torch.from_numpy(x), k, niter=niter, seed=seed)
    else:
        res = clustering.kmeans_faiss(x, k, niter=niter, seed=seed)
    return {"labels": res["labels"].numpy(), "obj": list(res["obj"]),
            "centroids": res["centroids"].numpy(), "nsplit": res["nsplit"]}


BACKENDS = ["torch", pytest.param("faiss", marks=needs_faiss)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_kmeans_recovers_separated_clusters(backend):
    # k = 2: Lloyd's iterations recover two separated blobs from any initialisation
    x, y = blobs(2, 150, 16, seed=3)
    for seed in (0, 1, 2):
        res = _run(backend, x, 2, seed)
        assert adjusted_rand_score(y, res["labels"]) > 0.999
    # k = 3: random initialisation can put two seeds in one blob; the best of a few
    # restarts (lowest objective) recovers the blobs exactly
    x, y = blobs(3, 100, 16, seed=4)
    runs = [_run(backend, x, 3, seed) for seed in range(8)]
    best = min(runs, key=lambda r: r["obj"][-1])
    assert normalized_mutual_info_score(y, best["labels"]) > 0.999
    assert adjusted_rand_score(y, best["labels"]) > 0.999
    # labels are the nearest final centroid
    c = best["centroids"]
    d = ((x[:, None, :] - c[None]) ** 2).sum(-1)
    assert np.array_equal(d.argmin(1), best["labels"])


@needs_faiss
def test_backends_reach_the_same_objective():
    rng = np.random.RandomState(5)
    x = rng.randn(1000, 16).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    objs = {b: np.mean([_run(b, x, 20, s)["obj"][-1] for s in range(3)]) for b in ("torch", "faiss")}
    assert abs(objs["torch"] - objs["faiss"]) / objs["faiss"] < 0.03, objs
    # on separated blobs both find the global optimum
    xb, _ = blobs(3, 100, 16, seed=4)
    best = {b: min(_run(b, xb, 3, s)["obj"][-1] for s in range(8)) for b in ("torch", "faiss")}
    assert best["torch"] == pytest.approx(best["faiss"], rel=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_objective_is_the_sum_of_squared_distances(backend):
    """obj[i] is the SSE of the assignment step of iteration i (centroids of iteration i-1)."""
    rng = np.random.RandomState(6)
    x = rng.randn(600, 8).astype(np.float32)
    short = _run(backend, x, 10, seed=7, niter=5)
    longer = _run(backend, x, 10, seed=7, niter=6)
    assert len(short["obj"]) == 5 and len(longer["obj"]) == 6
    assert np.allclose(longer["obj"][:5], short["obj"], rtol=1e-5)
    assert longer["obj"][5] == pytest.approx(sse(x, short["centroids"]), rel=1e-4)
    # Lloyd's iterations never increase the objective (no empty clusters here)
    assert all(b <= a * (1 + 1e-6) for a, b in zip(longer["obj"], longer["obj"][1:]))


@pytest.mark.parametrize("backend", ["torch", pytest.param("faiss", marks=needs_faiss)])
def test_kmeans_class_loss_lists_and_labels(backend):
    x, y = blobs(3, 60, 40, seed=8, sep=4.0)
    km = clustering.Kmeans(3, backend=backend, pca=8, seed=11)
    loss = km.cluster(x)
    assert loss == km.obj[-1] and 1 <= len(km.obj) <= 20  # (faiss stops once converged)
    lists = km.images_lists
    assert len(lists) == 3
    assert sorted(i for lst in lists for i in lst) == list(range(len(x)))
    assert all(lst == sorted(lst) for lst in lists)
    assert np.array_equal(clustering.arrange_clustering(lists), km.labels)
    # the loss is measured in the preprocessed space
    xb = clustering.preprocess_features(x, 8)
    assert loss > 0 and loss < len(x) * 4  # unit rows: every squared distance <= 4


def test_kmeans_draws_its_seed_from_numpy():
    x, _ = blobs(3, 30, 8, seed=9)
    np.random.seed(0)
    a = clustering.Kmeans(5, backend="torch", pca=4).cluster(x)
    np.random.seed(0)
    b = clustering.Kmeans(5, backend="torch", pca=4).cluster(x)
    assert a == b


def test_k_larger_than_n_raises():
    x = spread_data(5, 8)
    with pytest.raises(ClusteringError):
        clustering.Kmeans(10, backend="torch").cluster(x)
    with pytest.raises(ClusteringError):
        clustering.kmeans_torch(torch.from_numpy(x), 6)
    if clustering.faiss is not None:
        with pytest.raises(ClusteringError):
            clustering.Kmeans(10, backend="faiss").cluster(x)
    with pytest.raises(ValueError):
        clustering.Kmeans(0)


# ---------------------------------------------------------------------------------------
# empty clusters
# ---------------------------------------------------------------------------------------
def test_split_empty_clusters_symmetric_perturbation():
    rng = np.random.RandomState(0)
    c = torch.tensor([[9.0, 9.0, 9.0, 9.0, 9.0],
                      [1.0, 2.0, 3.0, 4.0, 5.0],
                      [7.0, 7.0, 7.0, 7.0, 7.0]])
    old = c.clone()
    # only cluster 1 holds more than one point: it is the one split
    n = clustering.split_empty_clusters(c, torch.tensor([0, 10, 1]), 11, rng)
    assert n == 1
    eps = 1.0 / 1024
    sign = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0])
    assert torch.allclose(c[0], old[1] * (1 + eps * sign))
    assert torch.allclose(c[1], old[1] * (1 - eps * sign))
    assert torch.allclose((c[0] + c[1]) / 2, old[1])
    assert torch.equal(c[2], old[2])
    assert not torch.equal(c[0], c[1])


def test_split_empty_clusters_counts():
    rng = np.random.RandomState(0)
    c = torch.randn(4, 6)
    assert clustering.split_empty_clusters(c.clone(), torch.tensor([3, 2, 4, 1]), 10, rng) == 0
    c2 = c.clone()
    assert clustering.split_empty_clusters(c2, torch.tensor([0, 0, 20, 0]), 20, rng) == 3
    # every centroid is now a perturbed copy of centroid 2, all distinct
    assert len({tuple(r.tolist()) for r in c2}) == 4
    assert torch.allclose(c2, c[2].expand(4, 6), rtol=4 / 1024)
    # nothing can be split when every cluster holds <= 1 point: no split is counted
    c3 = c.clone()
    assert clustering.split_empty_clusters(c3, torch.tensor([0, 1, 1, 1]), 3, rng) == 0
    assert torch.equal(c3, c)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kmeans_reseeds_empty_clusters(backend):
    # two distinct points, 30 copies each, k = 4: at least two initial centroids coincide,
    # so an empty cluster is guaranteed at the first iteration
    rng = np.random.RandomState(1)
    pts = rng.randn(2, 8).astype(np.float32)
    x = np.repeat(pts, 30, axis=0)
    res = _run(backend, x, 4, seed=3, niter=10)
    assert res["nsplit"] >= 1
    assert set(np.unique(res["labels"])) <= set(range(4))
    # every point sits on (a 1/1024-perturbed copy of) its centroid
    assert res["obj"][-1] < 1e-4 * float((x.astype(np.float64) ** 2).sum())
    # and on real data with many clusters the result has no empty cluster left to split
    xb, _ = blobs(5, 40, 8, seed=2, noise=0.5)
    res = _run(backend, xb, 30, seed=1)
    assert len(np.unique(res["labels"])) >= 28


# ---------------------------------------------------------------------------------------
# pseudo-labelled datasets
# ---------------------------------------------------------------------------------------
class ToyDataset:
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, idx):
        return f"img{idx}", -1


LISTS = [[2, 5], [], [0, 1, 4], [3], []]


def test_arrange_clustering_inverts_images_lists():
    labels = clustering.arrange_clustering(LISTS)
    assert labels.tolist() == [2, 2, 0, 3, 2, 0]
    for c, lst in enumerate(LISTS):
        assert all(labels[i] == c for i in lst)
    rng = np.random.RandomState(0)
    lab = rng.randint(0, 7, size=50)
    lists = clustering.labels_to_lists(lab, 9)
    assert len(lists) == 9 and lists[7] == [] and lists[8] == []
    assert np.array_equal(clustering.arrange_clustering(lists), lab)


def test_cluster_assign_index_order():
    ds = clustering.cluster_assign(LISTS, ToyDataset(6), transform=lambda s: s.upper())
    assert len(ds) == 6
    # compacted labels: cluster 0 -> 0, 2 -> 1, 3 -> 2 (empty clusters 1 and 4 dropped)
    want = {0: 1, 1: 1, 2: 0, 3: 2, 4: 1, 5: 0}
    for idx in range(6):
        img, label, i = ds[idx]
        assert (img, label, i) == (f"IMG{idx}", want[idx], idx)


def test_cluster_assign_cluster_order():
    ds = clustering.cluster_assign(LISTS, ToyDataset(6), order="cluster")
    assert len(ds) == 6
    served = [ds[p] for p in range(6)]
    assert [s[2] for s in served] == [2, 5, 0, 1, 4, 3]
    assert [s[1] for s in served] == [0, 0, 1, 1, 1, 2]
    assert all(s[0] == f"img{s[2]}" for s in served)
    with pytest.raises(ValueError):
        clustering.cluster_assign(LISTS, ToyDataset(6), order="random")


# ---------------------------------------------------------------------------------------
# PIC
# ---------------------------------------------------------------------------------------
def test_make_graph_self_first():
    x = np.repeat(np.random.RandomState(0).randn(10, 4), 2, axis=0).astype(np.float32)
    I, D = clustering.make_graph(x, 3)
    assert I.shape == (20, 4) and D.shape == (20, 4)
    assert np.array_equal(I[:, 0], np.arange(20))  # self first, even with duplicates
    assert np.all(D[:, 0] == 0) and np.all(np.diff(D, axis=1) >= -1e-6)
    # the duplicate is the nearest other point
    assert np.array_equal(I[:, 1], np.arange(20) ^ 1)


def test_run_pic_clusters_are_pure():
    x, y = blobs(4, 30, 2, seed=1, sep=10.0, noise=0.3)
    I, D = clustering.make_graph(x, 5)
    labels = clustering.run_pic(I, D, sigma=1.0, alpha=0.001)
    assert labels.shape == (120,) and labels.min() == 0
    assert set(np.unique(labels)) == set(range(labels.max() + 1))
    for c in np.unique(labels):
        assert len(set(y[labels == c])) == 1
    assert 4 <= labels.max() + 1 <= 30


def test_pic_class_assigns_every_point():
    x, y = blobs(4, 30, 16, seed=2, sep=5.0, noise=0.05)
    pic = clustering.PIC(pca=3)  # 4 blobs span 3 dims
    assert pic.cluster(x) == 0.0
    lists = pic.images_lists
    assert sorted(i for lst in lists for i in lst) == list(range(120))
    assert all(len(lst) > 1 for lst in lists)  # singletons distributed
    labels = clustering.arrange_clustering(lists)
    for c in range(len(lists)):
        assert len(set(y[labels == c])) == 1
    assert len(lists) >= 4


# Two identical triangles {1, 3, 4} and {2, 5, 6} (hubs 1 and 2) and node 0 pointing to both hubs at
# the same distance: v_1 == v_2 exactly, so node 0's two candidate pointers tie.
_TIE_I = np.array([[0, 1, 2], [1, 3, 4], [2, 5, 6], [3, 1, 4], [4, 1, 3], [5, 2, 6], [6, 2, 5]])
_TIE_D = np.array([[0.0, 0.01, 0.01]] * 7, dtype=np.float32)


@pytest.mark.parametrize("row3, expected", [
    # every row sorted: A + A^T stores each row by node index, row 0 is [1, 2]: node 0 joins hub 1
    ([3, 1, 4], [0, 0, 1, 0, 0, 1, 1]),
    # one unsorted row: scipy's A + A^T then stores each row's own neighbours last-inserted first,
    # row 0 is [2, 1]: the first candidate in storage order, hub 2, wins (the original's strict >)
    ([3, 4, 1], [1, 0, 1, 0, 0, 1, 1]),
])
def test_run_pic_ties_go_to_the_first_neighbour_in_storage_order(row3, expected):
    I = _TIE_I.copy()
    I[3] = row3
    W = clustering.pic_graph(I, _TIE_D, 0.2)
    assert W.indices[W.indptr[0]:W.indptr[1]].tolist() == ([1, 2] if expected[0] == 0 else [2, 1])
    assert clustering.run_pic(I, _TIE_D, sigma=0.2, alpha=0.001).tolist() == expected


def test_distribute_singletons_decided_on_the_initial_clustering():
    # node 2 joins cluster 0; node 3's neighbours 2 and 4 were singletons at the start, so node 3
    # stays alone even though 2 has moved meanwhile; so does 4
    labels = np.array([0, 0, 1, 2, 3])
    I = np.array([[0, 1, 2], [1, 0, 2], [2, 0, 1], [3, 2, 4], [4, 3, 2]])
    assert clustering.distribute_singletons(labels, I).tolist() == [0, 0, 0, 2, 3]


def test_pic_takes_no_args_parameter():
    import inspect
    assert "args" not in inspect.signature(clustering.PIC).parameters
    pic = clustering.PIC(sigma=0.3, nnn=4)
    assert (pic.sigma, pic.nnn, pic.alpha, pic.distribute_singletons) == (0.3, 4, 0.001, True)


def test_distribute_singletons():
    labels = np.array([0, 0, 1, 1, 1, 2, 3, 4])
    I = np.array([[0, 1, 2], [1, 0, 2], [2, 3, 4], [3, 2, 4], [4, 3, 2],
                  [5, 6, 0],   # singleton; nearest neighbour 6 is a singleton too, then 0
                  [6, 3, 5],   # singleton whose nearest neighbour is in cluster 1
                  [7, 7, 7]])  # singleton with no other neighbour: stays alone
    out = clustering.distribute_singletons(labels, I)
    assert out[5] == 0 and out[6] == 1 and out[7] == 4
    assert np.array_equal(out[:5], labels[:5])
    assert labels.tolist() == [0, 0, 1, 1, 1, 2, 3, 4]  # input untouched
    sizes = np.bincount(out)
    assert sizes[out[:7]].min() > 1


# ---------------------------------------------------------------------------------------
# randomized top-k PCA eigensolver vs the exact one
# ---------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _decaying_spectrum_features(n: int = 2000, d: int = 512, k: int = 10, seed: int = 0) -> np.ndarray:
    """(n, d) features with an fc7-like covariance: eigenvalues decaying as 1/i over all d
    axes (randomly rotated), plus k cluster centres in the leading axes."""
    rng = np.random.RandomState(seed)
    std = np.arange(1, d + 1) ** -0.5
    z = rng.randn(n, d) * std
    centres = rng.randn(k, d) * std * 3
    z += centres[rng.randint(0, k, n)]
    rot, _ = np.linalg.qr(rng.randn(d, d))
    return (z @ rot.T).astype(np.float32)


def test_randomized_pca_matches_exact():
    x = torch.from_numpy(_decaying_spectrum_features())
    mean = x.double().mean(0)
    cov = clustering.covariance(x, mean.float(), 512)
    ev_r, v_r, info = clustering.top_eigh(cov, 64, "randomized")
    ev_e, v_e, _ = clustering.top_eigh(cov, 64, "exact")
    assert info["solver"] == "randomized" and not info["fallback"] and info["residual"] <= clustering.EIG_TOL
    assert torch.allclose(cov, (x.double() - mean).T @ (x.double() - mean) / len(x), rtol=0, atol=1e-6)
    assert ((ev_r - ev_e).abs() / ev_e).max() < 0.01
    cos = torch.linalg.svdvals(v_r.T @ v_e)  # cosines of the principal angles of the subspaces
    assert torch.rad2deg(torch.arccos(cos.min().clamp(max=1))) < 2.0
    # the whitened, L2-normalised outputs: row by row the same points
    out_r = clustering.preprocess_features(x, 64, pca_solver="randomized")
    out_e = clustering.preprocess_features(x, 64, pca_solver="exact")
    assert (out_r * out_e).sum(1).min() > 0.99
    assert torch.allclose(out_r.T @ out_r, out_e.T @ out_e, atol=0.02 * len(x) / 64)


def test_randomized_pca_same_clustering():
    x = _decaying_spectrum_features()
    kms = {s: clustering.Kmeans(10, backend="torch", pca=64, seed=3, pca_solver=s) for s in ("randomized", "exact")}
    loss = {s: km.cluster(x) for s, km in kms.items()}
    assert abs(loss["randomized"] / loss["exact"] - 1) < 0.005
    assert normalized_mutual_info_score(kms["exact"].labels, kms["randomized"].labels) > 0.95


def test_randomized_pca_falls_back_to_exact(caplog):
    x = torch.from_numpy(_decaying_spectrum_features(n=300, d=64))
    cov = clustering.covariance(x, x.mean(0), 256)
    with caplog.at_level("WARNING", logger="deepcluster"):
        ev, v, info = clustering.top_eigh(cov, 16, "randomized", tol=1e-12, max_iter=1)
    assert info["fallback"] and info["solver"] == "exact"
    assert "falling back to the exact" in caplog.text
    ev_e, v_e, _ = clustering.top_eigh(cov, 16, "exact")
    assert torch.equal(ev, ev_e) and torch.equal(v, v_e)


@pytest.mark.parametrize("power", [1.0, 2.0])
def test_shifted_subspace_iteration_converges_faster_to_the_same_pairs(power):
    d, k = 512, 64
    g = torch.Generator().manual_seed(1)
    rot = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64)).Q
    ev = torch.arange(1, d + 1, dtype=torch.float64) ** -power
    cov = (rot * ev) @ rot.T
    out = {s: pca._randomized_eigh(cov, k, clustering.EIG_TOL, 40, 0, shift=s) for s in (True, False)}
    assert all(o[0] is not None and o[2]["residual"] <= clustering.EIG_TOL for o in out.values())
    assert out[True][2]["iterations"] < out[False][2]["iterations"]   # fewer iterations with the shift
    for evals, evecs, _ in out.values():
        assert ((evals - ev[:k]).abs() / ev[:k]).max() < 1e-3
        assert torch.linalg.svdvals(evecs.T @ rot[:, :k]).min() > 0.99


def test_auto_solver_top_256_of_a_2048_covariance_matches_exact():
    # the size where 'auto' switches to the iterative solver, fc7-like 1/i spectrum
    d, k = pca.RANDOMIZED_MIN_DIM, 256
    g = torch.Generator().manual_seed(4)
    rot = torch.linalg.qr(torch.randn(d, d, generator=g)).Q.double()
    ev = torch.arange(1, d + 1, dtype=torch.float64) ** -1.0
    cov = (rot * ev) @ rot.T
    evals, evecs, info = clustering.top_eigh(cov, k)
    assert info["solver"] == "randomized" and not info["fallback"]
    assert ((evals - ev[:k]).abs() / ev[:k]).max() < 0.01
    cos = torch.linalg.svdvals(evecs.T @ rot[:, :k])
    assert torch.rad2deg(torch.arccos(cos.min().clamp(max=1))) < 2.0


def test_randomized_solver_on_a_rank_deficient_matrix():
    # dead units: only 40 of 256 axes carry variance; the null pairs are held to an
    # absolute residual, and the whitening zeroes them
    g = torch.Generator().manual_seed(2)
    basis = torch.linalg.qr(torch.randn(256, 40, generator=g, dtype=torch.float64)).Q
    cov = (basis * torch.linspace(2.0, 0.5, 40, dtype=torch.float64)) @ basis.T
    evals, evecs, info = clustering.top_eigh(cov, 64, "randomized")
    ev_e, _, _ = clustering.top_eigh(cov, 64, "exact")
    assert torch.allclose(evals[:40], ev_e[:40], rtol=1e-3)
    assert evals[40:].abs().max() < 1e-6 * evals[0]
    assert torch.linalg.svdvals(evecs[:, :40].T @ basis).min() > 0.999


@pytest.mark.parametrize("store", ["numpy", "float32", "float16", "bfloat16"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("row", [0, 299])
def test_check_features_finds_every_non_finite_value(monkeypatch, store, bad, row):
    monkeypatch.setattr(pca, "PCA_BLOCK", 64 * 8)          # 64-row blocks: 5 of them
    a = np.ones((300, 8), np.float32)
    a[row, 5] = bad
    conv = {"numpy": lambda v: v, "float32": torch.from_numpy,
            "float16": lambda v: torch.from_numpy(v).half(), "bfloat16": lambda v: torch.from_numpy(v).bfloat16()}
    with pytest.raises(clustering.ClusteringError, match="NaN or inf"):
        pca._check_features(conv[store](a))
    a[row, 5] = 1.0
    big = {"float16": 6e4, "bfloat16": 3e38}.get(store, 3e38)      # finite values whose sum overflows
    pca._check_features(conv[store](np.full((300, 8), big, np.float32)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_pca_apply_equals_centred_projection(dtype):
    # a mean 100x the spread: centring after the product would lose ~1e-4 here
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(700, 96, generator=g) * 0.1 + 10).to(dtype)
    mean, proj = x.double().mean(0).float(), torch.randn(96, 16, generator=g) * 10
    ref = (x.double() - mean.double()) @ proj.double()
    ref = ref / ref.norm(dim=1, keepdim=True)
    assert torch.allclose(clustering.pca_apply(x, mean, proj).double(), ref, atol=2e-6)
    raw = (x.double() - mean.double()) @ proj.double()
    assert torch.allclose(clustering.pca_apply(x, mean, proj, l2=False).double(), raw, rtol=1e-5, atol=1e-3)


def test_pca_solver_choice():
    assert clustering.resolve_pca_solver("auto", 4096, 256) == "randomized"
    assert clustering.resolve_pca_solver("auto", 300, 256) == "exact"  # block ~ matrix: no gain
    assert clustering.resolve_pca_solver("auto", 2047, 64) == "exact"  # small: the exact one is cheap
    assert clustering.resolve_pca_solver("auto", 2048, 64) == "randomized"
    assert clustering.resolve_pca_solver("randomized", 300, 64) == "randomized"
    with pytest.raises(ValueError, match="unknown PCA solver 'lobpcg'"):
        clustering.pca_fit(torch.zeros(4, 3), 2, solver="lobpcg")


@pytest.mark.parametrize("n,d,step", [(200, 50, 64), (700, 1030, 256)])
def test_covariance_upper_block_triangle_equals_float64_reference(n, d, step):
    g = torch.Generator().manual_seed(d)
    x = torch.randn(n, d, generator=g) * torch.linspace(0.1, 3.0, d) + 5.0
    mean = x.double().mean(0)
    cov = clustering.covariance(x, mean.float(), step)
    ref = (x.double() - mean).T @ (x.double() - mean) / n
    assert torch.equal(cov, cov.T)  # the mirrored triangle is exact
    assert float((cov - ref).abs().max()) <= 1e-5 * float(ref.abs().max())


# ---------------------------------------------------------------------------------------
# the eigensolver on a spectrum shaped like trained fc7 features (issue 24): one axis with
# most of the variance, a long flat tail, no gap at the cut (lambda_257 / lambda_256 ~ 0.99)
# ---------------------------------------------------------------------------------------
# (axis, eigenvalue / the largest) at d = 1024, k = 128 (the solver's block: 224 vectors);
# trained fc7 at d = 4096, k = 256 has the same shape (benchmarks/bench_clustering.py)
TRAINED_LIKE = ((1, 1.0), (2, 0.05), (3, 3e-3), (8, 1e-4), (32, 1e-5), (128, 2e-6), (224, 6e-7), (1024, 1e-8))


@functools.lru_cache(maxsize=None)
def _trained_like_basis(d: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(eigenvalues (d,) descending, orthonormal eigenbasis (d, d)), float64."""
    ai, av = (np.array(v, dtype=np.float64) for v in zip(*TRAINED_LIKE))
    ev = torch.from_numpy(np.exp(np.interp(np.log(np.arange(1, d + 1)), np.log(ai), np.log(av))))
    rot = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(5), dtype=torch.float64)).Q
    return ev, rot


def test_randomized_pca_converges_on_a_dominant_axis_and_flat_tail(caplog):
    ev, rot = _trained_like_basis()
    k = 128
    assert 0.98 < ev[k] / ev[k - 1] < 1 and ev[k - 1] / ev[0] < 1e-5      # no gap at the cut, 5e5 range
    cov = (rot * ev) @ rot.T
    with caplog.at_level("WARNING", logger="deepcluster"):
        evals, evecs, info = clustering.top_eigh(cov, k, "randomized")
    assert info["solver"] == "randomized" and not info["fallback"] and "falling back" not in caplog.text
    # float32 cannot resolve 1e-3 x theta_256 beside theta_1: the products went to float64
    assert info["precision"] == "float64" and info["iterations"] <= 10 and info["residual"] <= clustering.EIG_TOL
    assert ((evals - ev[:k]).abs() / ev[:k]).max() < 1e-4
    # principal angles with the exact top-k subspace: the whole block but a few pairs at the cut,
    # where eigenvalues 1% apart may mix (any basis of them is as good once whitened)
    cos = torch.linalg.svdvals(evecs.T @ rot[:, :k])
    assert torch.rad2deg(torch.arccos(cos[k - 8].clamp(max=1))) < 1.0
    assert torch.rad2deg(torch.arccos(cos.min().clamp(max=1))) < 10.0
    # the whitened projection: C^1/2 V Theta^-1/2 spans the exact top-k eigenspace
    # (sum of the squared sines of the principal angles, per axis)
    z = (rot.T @ evecs) * ev.sqrt()[:, None] / evals.sqrt()              # in the eigenbasis, (d, k)
    assert (k - z[:k].square().sum()) / k < 1e-5


def test_randomized_pca_on_trained_like_features_clusters_as_exact(caplog):
    ev, rot = _trained_like_basis()
    g = torch.Generator().manual_seed(6)
    std = (ev / 10).sqrt().float()
    centres = torch.randn(50, len(ev), generator=g) * std * 3
    z = torch.randn(2000, len(ev), generator=g) * std + centres[torch.randint(0, 50, (2000,), generator=g)]
    x = (z @ rot.T.float() + 1.0).numpy()                                # (2000, 1024), not centred
    with caplog.at_level("WARNING", logger="deepcluster"):
        kms = {s: clustering.Kmeans(50, backend="torch", pca=128, seed=3, pca_solver=s) for s in ("randomized", "exact")}
        loss = {}
        for s, km in kms.items():
            loss[s] = km.cluster(x)
            if s == "randomized":
                info = dict(clustering.LAST_PCA_INFO)
    assert info["solver"] == "randomized" and not info["fallback"] and "falling back" not in caplog.text
    assert abs(loss["randomized"] / loss["exact"] - 1) < 0.005


@pytest.mark.parametrize("spectrum,tol,max_iter,reason", [
    ("linear", clustering.EIG_TOL, 8, "iteration limit"),   # no gap anywhere: too slow to converge
    ("inverse", 1e-15, 40, "no progress"),                  # below float64's resolution: stagnates
])
def test_randomized_pca_failure_falls_back_and_says_why(caplog, spectrum, tol, max_iter, reason):
    d = 256
    rot = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)).Q
    ev = (torch.linspace(1, 0.5, d, dtype=torch.float64) if spectrum == "linear"
          else torch.arange(1, d + 1, dtype=torch.float64) ** -1.0)
    cov = (rot * ev) @ rot.T
    with caplog.at_level("WARNING", logger="deepcluster"):
        evals, evecs, info = clustering.top_eigh(cov, 32, "randomized", tol=tol, max_iter=max_iter)
    assert info["fallback"] and info["solver"] == "exact" and info["reason"].startswith(reason)
    assert "falling back to the exact eigendecomposition" in caplog.text and reason in caplog.text
    assert "worst residual" in caplog.text                    # the value that failed the criterion
    ev_e, v_e, _ = clustering.top_eigh(cov, 32, "exact")
    assert torch.equal(evals, ev_e) and torch.equal(evecs, v_e)


def test_whitening_keeps_the_small_real_axes_of_a_trained_like_spectrum():
    """Trained fc7 keeps real variance down to its 256th axis at 7e-8 to 6e-7 of the largest:
    every such axis is whitened to unit variance as faiss does, none is zeroed as noise
    (a floor of 1e-6 x lambda_1 used to zero half of them, 1e-7 a sixth)."""
    ev, rot = _trained_like_basis()
    dim = 480                                                          # lambda_480 / lambda_1 ~ 8e-8
    assert 5e-8 < float(ev[dim - 1] / ev[0]) < 1e-7
    g = torch.Generator().manual_seed(8)
    z = torch.randn(4000, len(ev), generator=g, dtype=torch.float64) * ev.sqrt()
    x = (z @ rot.T + 0.5).float()                                       # (4000, 1024), not centred
    mean, proj = clustering.pca_fit(x, dim, solver="exact")
    assert int((proj.norm(dim=0) == 0).sum()) == 0                       # no axis zeroed
    y = clustering.pca_apply(x, mean, proj, l2=False).double()
    var = y.var(0, unbiased=False)
    # each axis whitened (its eigenvalue carries the float32 covariance's rounding, ~1e-8 x lambda_1:
    # measured within 0.7%); a zeroed axis would give 0
    assert float((var - 1).abs().max()) < 0.05


def test_live_axes_zero_a_null_space_after_a_cliff_and_keep_a_smooth_tail():
    smooth = torch.logspace(0, -8.5, 300, dtype=torch.float64)        # 7% per axis down to 3e-9
    assert bool(clustering.live_axes(smooth).all())
    cliff = torch.cat([torch.linspace(1, 0.1, 40, dtype=torch.float64),
                       torch.tensor([2.6e-8, 1.1e-8, -3e-9, 4e-9], dtype=torch.float64)])
    assert clustering.live_axes(cliff).tolist() == [True] * 40 + [False] * 4
    tiny = torch.tensor([1.0, 0.5, 1e-10, 5e-11], dtype=torch.float64)  # below any float32 meaning
    assert clustering.live_axes(tiny).tolist() == [True, True, False, False]
    assert clustering.live_axes(torch.zeros(3, dtype=torch.float64)).tolist() == [False] * 3
