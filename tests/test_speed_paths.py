"""Speed-up helpers (models.to_channels_last, distributed.FeatureStore, the benchmarks' autocast), and
equivalence of every numerics-changing speed-up with the float32 path.

Stated tolerances (checked below):
* channels-last: fc7 features within 1e-4 relative (L2) of contiguous NCHW; same training loss
  within 1e-4 relative.
* fused SGD (main.py --fused_sgd, on): weights within 1e-6 relative (L2) of the per-tensor update
  after 4 training steps, same losses within 1e-5 relative.
* bf16 autocast: fc7 features within 5% relative (L2); training loss within 2% relative;
  preprocessed bf16 features assigned to the float32 run's final centroids: >= 90% same
  labels, k-means objective within 2%.
* fp16 feature storage: pairwise distances of the preprocessed (PCA-whitened, L2) rows
  within 2e-2 (max abs);
  k-means on it: NMI >= 0.9 with the float32 run and loss within 1%.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import normalized_mutual_info_score as nmi_score

import clustering
import pca
import distributed
import models

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import _common as bench  # noqa: E402


def nmi(a, b) -> float:
    return float(nmi_score(a, b, average_method="geometric"))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.fixture(scope="module")
def class_images():
    """120 images of 64 px from 6 base patterns (structure a random-init net still separates)."""
    g = torch.Generator().manual_seed(0)
    bases = torch.randn(6, 3, 8, 8, generator=g) * 1.5
    bases = torch.nn.functional.interpolate(bases, size=64, mode="bilinear", align_corners=False)
    y = torch.arange(120) % 6
    x = bases[y] + 0.3 * torch.randn(120, 3, 64, 64, generator=g)
    return x, y


def net(seed: int = 0):
    torch.manual_seed(seed)
    return models.alexnet(sobel=True, bn=True, out=6, input_size=64)


def train_loss(model, x, y, steps: int = 2, fused: bool = False) -> list[float]:
    opt = torch.optim.SGD(model.body_parameters(), lr=0.01, momentum=0.9, weight_decay=1e-5, fused=fused)
    crit = torch.nn.CrossEntropyLoss()
    model.train()
    torch.manual_seed(1)  # dropout masks
    out = []
    for _ in range(steps):
        loss = crit(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        out.append(float(loss.detach()))
    return out


# ---------------------------------------------------------------------------------------
def test_channels_last_equivalent(class_images):
    x, y = class_images
    m0, m1 = net().eval(), models.to_channels_last(net()).eval()
    xc = models.to_channels_last(x[:16])
    assert xc.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert rel(m1.forward_features(xc), m0.forward_features(x[:16])) < 1e-4
    l0 = train_loss(net(), x[:16], y[:16])
    l1 = train_loss(models.to_channels_last(net()), models.to_channels_last(x[:16]), y[:16])
    assert l1 == pytest.approx(l0, rel=1e-4)
    # non-4d tensors pass through unchanged
    v = torch.zeros(3)
    assert models.to_channels_last(v) is v


def test_bf16_autocast_equivalent(class_images):
    x, y = class_images
    m = net().eval()
    with torch.no_grad():
        f32 = m.forward_features(x)
        with bench.autocast("cpu", True):
            f16 = m.forward_features(x)
    assert f16.dtype == torch.bfloat16
    assert rel(f16, f32) < 0.05
    # clustering: the bf16 features, whitened with the float32 run's PCA, fall on its
    # centroids (k-means may land in another local optimum from a perturbed start, and two
    # PCA fits may pick other signs or rotations of near-equal axes, so both are held fixed)
    mean, proj = clustering.pca_fit(f32, 16)
    xb32 = clustering.pca_apply(f32, mean, proj)
    xb16 = clustering.pca_apply(f16.float(), mean, proj)
    res = clustering.kmeans_torch(xb32, 6, niter=20, seed=3)
    lab16, d16 = clustering.nearest_centroid(xb16, res["centroids"])
    _, d32 = clustering.nearest_centroid(xb32, res["centroids"])
    assert float((lab16 == res["labels"]).float().mean()) >= 0.9
    assert float(d16.sum()) == pytest.approx(float(d32.sum()), rel=0.02)
    l32 = train_loss(net(), x[:32], y[:32])
    mb = net()
    opt = torch.optim.SGD(mb.body_parameters(), lr=0.01, momentum=0.9)
    mb.train()
    torch.manual_seed(1)
    lb = []
    for _ in range(2):
        with bench.autocast("cpu", True):
            loss = torch.nn.functional.cross_entropy(mb(x[:32]), y[:32])
        opt.zero_grad()
        loss.backward()
        opt.step()
        lb.append(float(loss.detach()))
    assert lb == pytest.approx(l32, rel=0.02)
    assert isinstance(bench.autocast("cpu", False), type(bench.autocast("cuda", False)))


def _blobs(n=3000, d=256, k=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(k, 32, generator=g) * 2
    z = torch.randint(0, k, (n,), generator=g)
    x = (c[z] + 0.5 * torch.randn(n, 32, generator=g)) @ torch.randn(32, d, generator=g)
    return x + 0.3 * torch.randn(n, d, generator=g)


def test_fp16_feature_storage_equivalent():
    x = _blobs()
    store = distributed.FeatureStore(x.shape[0], x.shape[1], dtype="float16")
    perm = torch.randperm(x.shape[0])
    for s in range(0, x.shape[0], 512):  # written by index, out of order
        store.write(perm[s:s + 512], x[perm[s:s + 512]])
    assert store.tensor.dtype == torch.float16 and store.nbytes == x.numel() * 2
    assert store.filled == x.shape[0]
    assert clustering.preprocess_features(store.tensor, 64, backend="torch").dtype == torch.float32
    # The float16 store gives the float32 PCA's mean, and in one common basis (two fits may
    # pick other signs or rotations of the flat noise axes) the same whitened rows.
    mean, proj = clustering.pca_fit(x, 64)
    mean16, _ = clustering.pca_fit(store.tensor, 64)
    assert float((mean16 - mean).abs().max()) < 1e-3 * float(mean.abs().max())
    xb32, xb16 = clustering.pca_apply(x, mean, proj), clustering.pca_apply(store.tensor.float(), mean, proj)
    d32, d16 = torch.cdist(xb32[:400], xb32[:400]), torch.cdist(xb16[:400], xb16[:400])
    assert float((d16 - d32).abs().max()) < 2e-2
    k32 = clustering.Kmeans(20, backend="torch", pca=64, seed=5)
    k16 = clustering.Kmeans(20, backend="torch", pca=64, seed=5)
    l32, l16 = k32.cluster(x), k16.cluster(store.tensor)
    assert nmi(k32.labels, k16.labels) >= 0.9
    assert l16 == pytest.approx(l32, rel=0.01)
    # bfloat16 storage is accepted too
    kb = clustering.Kmeans(20, backend="torch", pca=64, seed=5)
    assert kb.cluster(x.bfloat16()) == pytest.approx(l32, rel=0.03)


def test_float32_preprocessing_unchanged():
    """The float32 path is the plain PCA fit/apply (no block upcast, no dtype change)."""
    x = _blobs(800, 64, 5)
    mean, proj = clustering.pca_fit(x, 16)
    ref = clustering.pca_apply(x, mean, proj)
    out = clustering.preprocess_features(x, 16, backend="torch")
    assert torch.equal(out, ref)
    out_np = clustering.preprocess_features(x.numpy(), 16, backend="torch", device="cpu")
    assert np.array_equal(out_np, ref.numpy())


def test_finite_check_by_blocks(monkeypatch):
    monkeypatch.setattr(pca, "_row_chunk", lambda n_cols, budget=1 << 26: 256)
    x = np.random.RandomState(0).randn(1000, 32).astype(np.float32)
    x[900, 3] = np.nan  # in the 4th block
    with pytest.raises(clustering.ClusteringError, match="NaN"):
        clustering.preprocess_features(x, 8)
    with pytest.raises(clustering.ClusteringError, match="NaN"):
        clustering.preprocess_features(torch.from_numpy(x).half(), 8, backend="torch")


def test_feature_store_numpy_and_dtypes():
    s = distributed.FeatureStore(4, 3, dtype=torch.float32)
    s.write([3, 0], torch.tensor([[1.0, 2, 3], [4, 5, 6]]))
    a = s.numpy()
    assert a.dtype == np.float32 and a[3].tolist() == [1, 2, 3] and a[0].tolist() == [4, 5, 6]
    with pytest.raises(ValueError, match="unknown feature dtype"):
        distributed.FeatureStore(2, 2, dtype="int8")


def test_maybe_compile_off_is_identity_and_snapshot():
    m = torch.nn.Linear(2, 2)
    assert bench.maybe_compile(m, False) is m
    snap = bench.memory_snapshot("cpu")
    assert snap["rss_mb"] > 0 and snap["peak_rss_mb"] >= snap["rss_mb"] * 0.5
    assert snap["gpu_peak_mb"] is None or snap["gpu_peak_mb"] >= 0


# ---------------------------------------------------------------------------------------
def test_cluster_pca_row_blocks_equivalent(monkeypatch):
    """Block-wise float64 mean/covariance (memory fix) gives the one-shot result."""
    x = _blobs(3000, 64, 8, seed=2)
    mean, proj = clustering.pca_fit(x, 16)
    assert torch.allclose(mean.double(), x.double().mean(0).float().double(), atol=1e-6)
    ref = clustering.preprocess_features(x, 16, backend="torch")
    monkeypatch.setattr(pca, "PCA_BLOCK", 300 * 64)  # 10 blocks instead of one
    m2, p2 = clustering.pca_fit(x, 16)
    assert float((m2 - mean).abs().max()) < 1e-6 and float((p2 - proj).abs().max()) < 1e-4 * float(proj.abs().max())
    out = clustering.preprocess_features(x, 16, backend="torch")
    assert float((out - ref).abs().max()) < 1e-5
    k1 = clustering.Kmeans(8, backend="torch", pca=16, seed=1)
    k1.cluster(x)
    monkeypatch.setattr(pca, "PCA_BLOCK", 1 << 25)
    k2 = clustering.Kmeans(8, backend="torch", pca=16, seed=1)
    k2.cluster(x)
    assert (k1.labels == k2.labels).mean() > 0.99


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")])])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("which", ["eval", "train"])
def test_uint8_batches_normalised_on_device_are_bitwise_equal(tmp_path, which, channels_last, device):
    """Loader items as uint8 + data.to_model_input (on ``device``) == ToTensor + Normalize per
    image on the CPU, to the bit, through a real DataLoader (workers, collate) on photo-like
    JPEGs and PNGs of odd sizes."""
    from PIL import Image

    import data
    from conftest import make_image_folder

    root = make_image_folder(tmp_path / "img", n_classes=2, per_class=5, size=83)
    Image.fromarray(np.random.RandomState(3).randint(0, 256, (61, 97, 3), np.uint8)).save(root / "class0" / "odd.png")

    def batches(normalize: bool) -> list[torch.Tensor]:
        tf = (data.eval_transform(48, normalize=normalize) if which == "eval"
              else data.train_transform(48, normalize=normalize))
        ds = data.IndexedImageFolder(root, transform=tf)
        torch.manual_seed(7)   # the train transform's random crops and flips: same draws in both runs
        loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=0)
        dev = torch.device("cpu" if normalize else device)  # the reference: per image, on the CPU
        return [data.to_model_input(x, dev, channels_last).cpu() for x, _ in loader]

    ref, ours = batches(True), batches(False)
    assert len(ref) == len(ours) == 3
    for a, b in zip(ref, ours):
        assert b.dtype == torch.float32 and a.shape == b.shape
        assert torch.equal(a, b)   # bitwise: same arithmetic element by element
        assert b.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert data.eval_transform(48, normalize=False)(Image.new("RGB", (60, 50))).dtype == torch.uint8


def test_fused_sgd_equivalent(class_images):
    """One fused kernel per update against torch's per-tensor SGD (the original's), with the
    momentum and weight decay main.py uses: equal up to float32 rounding."""
    x, y = class_images
    m0, m1 = net(), net()
    l0 = train_loss(m0, x[:16], y[:16], steps=4)
    l1 = train_loss(m1, x[:16], y[:16], steps=4, fused=True)
    assert l1 == pytest.approx(l0, rel=1e-5)
    for i, (a, b) in enumerate(zip(m0.body_parameters(), m1.body_parameters())):
        assert float((b - a).detach().norm()) <= 1e-6 * float(a.detach().norm()), i
