"""DeepCluster-v2 pieces against independent computations (swav main_deepclusterv2.py)."""
from __future__ import annotations

import math
import os
import sys

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import clustering
import data
import distributed
import optim
from models.deepclusterv2 import DeepClusterV2Net, dcv2_from_state_dict, dcv2_loss


# ---------------------------------------------------------------------------------------
# optimiser and schedule
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("epochs,warm,ipe", [(5, 2, 3), (10, 0, 4), (3, 3, 2)])
def test_schedule_values_at_iterations(epochs, warm, ipe):
    base, final, start = 4.8, 0.0048, 0.3
    lr = optim.warmup_cosine_schedule(base, final, epochs, warm, start, ipe)
    assert lr.shape == (epochs * ipe,)
    nw, total = warm * ipe, (epochs - warm) * ipe
    for t in range(epochs * ipe):
        if t < nw:  # linspace with both ends: start + t * (base - start) / (nw - 1)
            want = start + t * (base - start) / (nw - 1) if nw > 1 else start
        else:
            want = final + (base - final) * (1 + math.cos(math.pi * (t - nw) / total)) / 2
        assert lr[t] == pytest.approx(want, rel=1e-12, abs=1e-12)
    if nw:
        assert lr[0] == start and lr[nw - 1] == pytest.approx(base)
    if total:
        assert lr[nw] == pytest.approx(base) and lr[-1] > final


def _larc_reference(w, g, buf, lr, wd, trust, eps=1e-8, momentum=0.9):
    """numpy float64: LARC-scaled gradient then SGD momentum (dampening 0) without decay."""
    wn, gn = np.linalg.norm(w), np.linalg.norm(g)
    if wn > 0 and gn > 0:
        g = (g + wd * w) * (trust * wn / (gn + wn * wd + eps))
    buf = g if buf is None else momentum * buf + g
    return w - lr * buf, buf


@pytest.mark.parametrize("wd", [0.0, 1e-6, 0.1])
def test_larc_steps_match_formula(wd):
    torch.manual_seed(0)
    shapes = [(7, 5), (5,), (3, 2, 2, 2)]
    ps = [torch.nn.Parameter(torch.randn(s, dtype=torch.float64)) for s in shapes]
    zero = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))   # ||w|| = 0: plain SGD, no decay
    frozen = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))  # grad None: untouched
    opt = optim.dcv2_sgd(ps + [zero, frozen], base_lr=0.5, wd=wd)
    ref = [(p.detach().numpy().copy(), None) for p in ps + [zero]]
    frozen0 = frozen.detach().clone()
    for step in range(3):
        grads = [torch.randn(s, dtype=torch.float64) for s in shapes] + [torch.randn(4, dtype=torch.float64)]
        for p, g in zip(ps + [zero], grads):
            p.grad = g.clone()
        frozen.grad = None
        lr = 0.5 / (step + 1)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        ref = [_larc_reference(w, g.numpy(), b, lr, wd, 0.001) for (w, b), g in zip(ref, grads)]
        for p, (w, _) in zip(ps + [zero], ref):
            np.testing.assert_allclose(p.detach().numpy(), w, rtol=1e-12, atol=1e-14)
        assert opt.param_groups[0]["weight_decay"] == wd  # restored after the step
    assert torch.equal(frozen.detach(), frozen0)


def test_larc_clip_and_state_dict():
    p = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    opt = optim.LARC(torch.optim.SGD([p], lr=1.0), trust_coefficient=10.0, clip=True)
    p.grad = torch.tensor([0.0, 1.0])
    opt.step()  # local = 10 * 5 / 1 = 50 > lr=1: clipped to factor 1 (plain SGD)
    assert torch.allclose(p.detach(), torch.tensor([3.0, 3.0]))
    sd = opt.state_dict()
    opt2 = optim.LARC(torch.optim.SGD([p], lr=1.0), 10.0, True)
    opt2.load_state_dict(sd)
    assert opt2.param_groups[0]["lr"] == 1.0


# ---------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------
def test_model_shapes_and_swav_release_layout():
    torch.manual_seed(0)
    m = DeepClusterV2Net("resnet18", hidden_mlp=64, feat_dim=16, nmb_prototypes=[5, 7]).eval()
    crops = [torch.randn(2, 3, 32, 32)] * 2 + [torch.randn(2, 3, 24, 24)] * 3
    emb, scores = m(crops)
    assert emb.shape == (10, 16) and [s.shape for s in scores] == [(10, 5), (10, 7)]
    assert torch.allclose(emb.norm(dim=1), torch.ones(10), atol=1e-5)
    # the prototypes are bias-free linear maps of the normalised embedding
    assert torch.allclose(scores[1], emb @ m.prototypes.prototypes1.weight.t(), atol=1e-5)
    # crops are batched per resolution: the same as one crop at a time
    e0, _ = m(crops[3])
    assert torch.allclose(emb[6:8], e0, atol=1e-5)
    assert m.forward_features(crops[0]).shape == (2, 512)
    assert m.trunk("layer2")(crops[0]).shape[1] == 128
    # swav's released layout: DDP's module. prefix, projection_head.{0,1,3}, prototypes.prototypesN
    big = DeepClusterV2Net("resnet50", nmb_prototypes=[30, 30, 30])
    sd = {"module." + k: v.clone() for k, v in big.state_dict().items()}
    assert "module.projection_head.3.weight" in sd and "module.prototypes.prototypes2.weight" in sd
    loaded = dcv2_from_state_dict(sd)
    assert loaded.arch == "resnet50" and loaded.hidden_mlp == 2048 and loaded.feat_dim == 128
    assert loaded.nmb_prototypes == [30, 30, 30]
    for k, v in big.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    # the project's ResNet-50 loader reads its trunk (projection head, prototypes ignored)
    import models

    r50, ignored = models.from_state_dict(sd)
    assert type(r50).__name__ == "ResNet50" and any("prototypes" in k for k in ignored)


def test_loss_matches_hand_computation():
    torch.manual_seed(0)
    B, crops, T = 3, 2, 0.1
    scores = [torch.randn(crops * B, 4), torch.randn(crops * B, 6)]
    targets = torch.tensor([[1, -100, 3], [5, 0, -100]])
    got = dcv2_loss(scores, targets, crops, T)
    per_head = []
    for h in range(2):
        terms = []
        for row in range(crops * B):
            t = int(targets[h, row % B])
            if t == -100:
                continue
            z = scores[h][row].double() / T
            terms.append(-(z[t] - torch.logsumexp(z, 0)))
        per_head.append(sum(terms) / len(terms))
    assert got.item() == pytest.approx(float(sum(per_head) / 2), rel=1e-5)


def test_loss_split_over_processes_averages_to_the_global_batch():
    """Under torchrun each process scores its share of the global batch and DDP averages:
    with ``n_labelled`` (labelled images of the global batch / processes) the mean of the
    processes' losses is the global batch's loss, also when the unlabelled images (-100)
    fall unevenly; swav's per-process means are not."""
    torch.manual_seed(0)
    crops, w = 2, 2
    targets = torch.tensor([[1, -100, 3, 0, -100, -100], [5, 0, -100, 2, -100, -100]])  # 3 labelled
    scores = [torch.randn(crops * 6, 4, dtype=torch.float64), torch.randn(crops * 6, 6, dtype=torch.float64)]
    whole = dcv2_loss(scores, targets, crops)

    def share(r):  # process r's 3 images: their rows of every crop
        rows = torch.cat([torch.arange(c * 6 + 3 * r, c * 6 + 3 * r + 3) for c in range(crops)])
        return [s[rows] for s in scores], targets[:, 3 * r:3 * r + 3]

    n_lab = float((targets[0] >= 0).sum()) / w
    ours = sum(dcv2_loss(*share(r), crops, n_labelled=n_lab) for r in range(w)) / w
    swav = sum(dcv2_loss(*share(r), crops) for r in range(w)) / w
    assert ours.item() == pytest.approx(whole.item(), rel=1e-12)
    assert abs(swav.item() - whole.item()) > 1e-3
    # a global batch without any label: 0, not NaN
    none = torch.full_like(targets, -100)
    assert dcv2_loss(scores, none, crops, n_labelled=0.0).item() == 0.0


# ---------------------------------------------------------------------------------------
# multi-crop
# ---------------------------------------------------------------------------------------
def test_multicrop_shapes_scales_and_seed(tmp_path):
    from PIL import Image

    rng = np.random.RandomState(0)
    img = Image.fromarray(rng.randint(0, 255, (60, 80, 3)).astype(np.uint8))
    mc = data.MultiCrop([32, 16], [2, 3], [0.14, 0.05], [1.0, 0.14])
    crops = mc(img)
    assert [tuple(c.shape) for c in crops] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 3
    # each group's RandomResizedCrop draws its area in the group's scale range
    for t, (lo, hi) in zip((mc.trans[0], mc.trans[2]), ((0.14, 1.0), (0.05, 0.14))):
        rrc = t.transforms[0]
        assert rrc.scale == (lo, hi)
        for _ in range(50):
            i, j, h, w = rrc.get_params(img, rrc.scale, rrc.ratio)
            slack = h + w + 1  # h, w are rounded from the drawn area
            assert lo * 4800 - slack <= h * w <= hi * 4800 + slack or (h, w) in ((60, 60), (60, 80))
    jitter = mc.trans[0].transforms[2].transforms[0]
    assert jitter.p == 0.8 and mc.trans[0].transforms[2].transforms[1].p == 0.2
    assert mc.trans[0].transforms[3].prob == 0.5
    # seeded items: the same crops for the same (image, seed)
    from clustering import _apply

    a, b, c = _apply(mc, img, 7), _apply(mc, img, 7), _apply(mc, img, 8)
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and not torch.equal(a[0], c[0])
    with pytest.raises(data.DataError, match="same number"):
        data.MultiCrop([32], [2, 1], [0.1], [1.0])


# ---------------------------------------------------------------------------------------
# spherical k-means
# ---------------------------------------------------------------------------------------
def numpy_spherical_kmeans(x: np.ndarray, c: np.ndarray, niter: int):
    """Reference: float64, explicit loops over clusters."""
    c = c.astype(np.float64).copy()
    x = x.astype(np.float64)
    for it in range(niter + 1):
        a = np.argmax(x @ c.T, axis=1)
        if it == niter:
            return c, a
        for j in range(len(c)):
            members = x[a == j]
            if len(members):
                c[j] = members.sum(0) / len(members)
        c /= np.linalg.norm(c, axis=1, keepdims=True)


def _bank(n=120, d=8, seed=0):
    rng = np.random.RandomState(seed)
    centers = rng.randn(4, d)
    x = centers[rng.randint(0, 4, n)] + 0.6 * rng.randn(n, d)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_spherical_kmeans_matches_numpy_one_process():
    x = _bank()
    k = 6
    c, a = clustering.spherical_kmeans(torch.from_numpy(x), k, niter=10, seed=3)
    # swav's init: rows randperm(n)[:k] of a generator seeded with the seed
    init = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(3))[:k].numpy()]
    rc, ra = numpy_spherical_kmeans(x, init, 10)
    np.testing.assert_array_equal(a.numpy(), ra)
    np.testing.assert_allclose(c.numpy(), rc, atol=1e-5)
    labels = clustering.gather_assignments(a, torch.arange(len(x)) * 2, 2 * len(x))
    assert (labels[1::2] == -100).all() and torch.equal(labels[::2], a)


def test_spherical_kmeans_empty_clusters():
    # two identical points and k=3: one cluster stays empty
    x = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), dim=1)
    init = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.01], [0.0, 1.0]]), dim=1)
    c, a = clustering.spherical_kmeans(x, 3, niter=3, centroids=init)
    assert torch.allclose(c[1], init[1])                       # swav: the empty one keeps its value
    assert (torch.bincount(a, minlength=3) == torch.tensor([2, 0, 1])).all()
    c2, _ = clustering.spherical_kmeans(x, 3, niter=1, centroids=init, reassign_empty=True)
    assert not torch.allclose(c2[1], init[1])                  # re-seeded by a split
    with pytest.raises(clustering.ClusteringError, match="fewer than"):
        clustering.spherical_kmeans(x, 5)


def _kmeans_worker(rank: int, world: int, store: str, out: str, x: np.ndarray, k: int):
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    rt = distributed.Runtime(rank, world)
    try:
        idx = torch.arange(rank, len(x), world)                # this rank's shard, by dataset index
        shard = torch.from_numpy(x)[idx]
        res = {}
        for init in ("rank0", "index"):
            c, a = clustering.spherical_kmeans(shard, k, niter=10, seed=5,
                                               index=idx if init == "index" else None, rt=rt)
            res[init] = (c.numpy(), clustering.gather_assignments(a, idx, len(x), rt=rt).numpy())
        np.save(f"{out}/r{rank}.npy", np.array([res], dtype=object), allow_pickle=True)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_spherical_kmeans_two_gloo_processes_match_reference(tmp_path):
    x, k = _bank(101, 8, 1), 5
    mp.start_processes(_kmeans_worker, args=(2, str(tmp_path / "store"), str(tmp_path), x, k), nprocs=2,
                       start_method="spawn")
    r0 = np.load(tmp_path / "r0.npy", allow_pickle=True)[0]
    r1 = np.load(tmp_path / "r1.npy", allow_pickle=True)[0]
    # swav's init: rank 0 samples its own shard (rows 0, 2, 4, ...)
    shard0 = x[0::2]
    init = shard0[torch.randperm(len(shard0), generator=torch.Generator().manual_seed(5))[:k].numpy()]
    rc, ra = numpy_spherical_kmeans(x, init, 10)
    for r in (r0, r1):  # every rank has the same centroids and every dataset index's label
        np.testing.assert_allclose(r["rank0"][0], rc, atol=1e-5)
        np.testing.assert_array_equal(r["rank0"][1], ra)
    # by-index init: the same as one process with the same seed
    c1, a1 = clustering.spherical_kmeans(torch.from_numpy(x), k, niter=10, seed=5, index=torch.arange(len(x)))
    for r in (r0, r1):
        np.testing.assert_allclose(r["index"][0], c1.numpy(), atol=1e-5)
        np.testing.assert_array_equal(r["index"][1], a1.numpy())


# ---------------------------------------------------------------------------------------
# main_deepclusterv2.py end to end (ResNet-18 at 32 px, 24 generated images)
# ---------------------------------------------------------------------------------------
def dcv2_argv(folder, exp, *extra) -> list[str]:
    return [str(folder), "--exp", str(exp), "--arch", "resnet18", "--hidden_mlp", "32", "--feat_dim", "16",
            "--nmb_prototypes", "4", "5", "--nmb_crops", "2", "1", "--size_crops", "32", "16",
            "--min_scale_crops", "0.3", "0.1", "--max_scale_crops", "1", "0.3", "--batch_size", "8",
            "--epochs", "2", "--warmup_epochs", "1", "--base_lr", "0.5", "--final_lr", "0.005",
            "--freeze_prototypes_niters", "2", "--workers", "0", "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def dcv2_images(module_tmp):
    from conftest import make_image_folder

    return make_image_folder(module_tmp.mktemp("imgs") / "images", n_classes=2, per_class=8, size=40)


@pytest.fixture(scope="module")
def dcv2_reference(dcv2_images, module_tmp):
    """An uninterrupted 2-epoch run (2 steps per epoch)."""
    import main_deepclusterv2 as m2

    from conftest import make_image_folder

    root = module_tmp.mktemp("ref")
    knn = root / "knn"
    make_image_folder(knn / "train", n_classes=2, per_class=5, size=40)
    make_image_folder(knn / "val", n_classes=2, per_class=3, size=40, seed=1)
    exp = root / "exp"
    # the kNN monitor is on here only: the resume test checks that it changes nothing in training
    assert m2.run(dcv2_argv(dcv2_images, exp, "--knn_data", str(knn), "--knn_size", "32")) == 0
    return exp


def _final(exp):
    import checkpoint

    return checkpoint.torch_load(exp / "checkpoint.pth.tar")


def _newest(exp):
    """The checkpoint --resume EXP takes (mid-epoch copies included)."""
    import checkpoint
    import runfolder

    return checkpoint.torch_load(checkpoint.find_checkpoint(str(exp), runfolder.current_run_id(exp), quiet=True))


@pytest.mark.slow
def test_dcv2_run_outputs(dcv2_reference):
    import fileio

    recs = fileio.read_jsonl(dcv2_reference / "log.jsonl")
    assert [r["epoch"] for r in recs] == [-1, 0, 1]  # -1: the random network's kNN
    assert all(0 <= r["knn_top1"] <= 100 for r in recs)
    recs = recs[1:]
    assert all(np.isfinite(r["train_loss"]) and len(r["nmi_labels_heads"]) == 2 for r in recs)
    assert "nmi_prev" in recs[1]
    # the training report draws a v2 run
    from visu import report

    out = report.main(report.get_args_parser().parse_args([str(dcv2_reference), "--out",
                                                          str(dcv2_reference / "report")]))
    assert any(p.name == "training_curves.png" for p in out)
    ck = _final(dcv2_reference)
    assert ck["epoch"] == 2 and ck["iteration"] == 0 and ck["bank"].shape == (2, 16, 16)
    assert (dcv2_reference / "checkpoints" / "ckp-1.pth").exists()
    # the prototypes moved only after freeze_prototypes_niters (2) steps: they are no longer
    # the unit centroids the k-means set at the start of epoch 1
    w = ck["state_dict"]["prototypes.prototypes0.weight"]
    assert not torch.allclose(w.norm(dim=1), torch.ones(4), atol=1e-4)
    # swav's release layout loads the run's weights
    sd = {"module." + k: v for k, v in ck["state_dict"].items()}
    assert dcv2_from_state_dict(sd).nmb_prototypes == [4, 5]


@pytest.mark.slow
def test_dcv2_resume_at_epoch_end_and_mid_epoch_equals_uninterrupted(dcv2_images, dcv2_reference, tmp_path,
                                                                      monkeypatch):
    import fileio as checkpoint  # fault injection
    import main_deepclusterv2 as m2

    exp = tmp_path / "exp"
    argv = dcv2_argv(dcv2_images, exp, "--checkpoint_iters", "1", "--keep_checkpoints", "0")
    monkeypatch.setenv("DEEPCLUSTER_FAULT_MODE", "raise")
    # hits: epoch 0 steps 1-2 (saved after step 1 and at the end), epoch 1 steps 3-4
    monkeypatch.setenv("DEEPCLUSTER_FAULT", "dcv2_train:3")        # killed in epoch 1's first step
    checkpoint.FAULT_HITS.clear()
    with pytest.raises(checkpoint.FaultInjected):
        m2.run(argv)
    assert (_newest(exp)["epoch"], _newest(exp)["iteration"]) == (1, 0) and _final(exp)["epoch"] == 1
    # --freeze_prototypes_niters 2 = all of epoch 0: its prototypes are still the unit centroids
    for h, k in ((0, 4), (1, 5)):
        w = _final(exp)["state_dict"][f"prototypes.prototypes{h}.weight"]
        assert torch.allclose(w.norm(dim=1), torch.ones(k), atol=1e-5)
    monkeypatch.setenv("DEEPCLUSTER_FAULT", "dcv2_train:2")        # resumed: killed in step 2 of epoch 1
    checkpoint.FAULT_HITS.clear()
    with pytest.raises(checkpoint.FaultInjected):
        m2.run(argv + ["--resume", str(exp)])
    assert (_newest(exp)["epoch"], _newest(exp)["iteration"]) == (1, 1)
    monkeypatch.delenv("DEEPCLUSTER_FAULT")
    assert m2.run(argv + ["--resume", str(exp)]) == 0
    a, b = _final(exp), _final(dcv2_reference)
    for k, v in b["state_dict"].items():
        assert torch.equal(a["state_dict"][k], v), k
    assert torch.equal(a["bank"], b["bank"]) and torch.equal(a["bank_index"], b["bank_index"])
    la, lb = checkpoint.read_jsonl(exp / "log.jsonl"), checkpoint.read_jsonl(dcv2_reference / "log.jsonl")
    lb = [r for r in lb if r["epoch"] >= 0]
    assert [r["train_loss"] for r in la] == [r["train_loss"] for r in lb]
    assert [r["nmi_labels_heads"] for r in la] == [r["nmi_labels_heads"] for r in lb]


def test_dcv2_refuses_more_prototypes_than_images(dcv2_images, tmp_path, capsys):
    import main_deepclusterv2 as m2

    assert m2.run(dcv2_argv(dcv2_images, tmp_path / "e", "--nmb_prototypes", "30")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --nmb_prototypes 30 exceeds the 16 rows") and err.count("\n") == 1


def _max_diff(a: dict, b: dict) -> float:
    """Largest |a - b| over the float tensors of two state dicts, relative to max(1, |b|) per tensor."""
    return max(float((a[k].double() - v.double()).abs().max()) / max(1.0, float(v.double().abs().max()))
               for k, v in b.items() if v.is_floating_point())


@pytest.mark.slow
def test_dcv2_two_processes_equal_one_and_resume_on_one(dcv2_images, tmp_path, monkeypatch):
    """torchrun 2 x batch 3 (gloo) equals 1 process x batch 6, then resumes on 1 process.

    16 images, global batch 6: 2 steps per epoch, and the 4 images left out of each epoch have
    no label in the next one (-100). Both runs stop inside epoch 1, after its first step.
    BatchNorm is synchronised on gloo (``--sync_bn pytorch``, swav's default:
    distributed.AllReduceBatchNorm), the crops are seeded by global position,
    ``--kmeans_init index`` draws the initial centroids by dataset index, the loss is the
    global batch's mean over labelled images and DDP averages the gradients: the loss, every
    head's assignments and the weights are the same up to float rounding (reduction order),
    which the steps amplify. Measured: weights within 5.4e-5 (relative to max(1, |w|)), bank
    3.5e-4 (unit vectors), losses 3e-5 relative (1.3e-3 with swav's per-process loss means).
    The 2-process run then ends on 1 process x batch 6 (resume on another world size).
    """
    import subprocess

    import checkpoint
    import fileio
    import main_deepclusterv2 as m2
    from test_distributed import free_port

    two, one = tmp_path / "two", tmp_path / "one"

    def argv_of(exp, batch: str) -> list[str]:
        return dcv2_argv(dcv2_images, exp, "--checkpoint_iters", "1", "--kmeans_init", "index", "--batch_size", batch)

    argv_two = argv_of(two, "3")  # per process (the last --batch_size wins)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "main_deepclusterv2.py", *argv_two]
    # hits: epoch 0 steps 1-2, epoch 1 steps 3-4; killed at step 2 of epoch 1 (saved after step 1)
    env = dict(os.environ, OMP_NUM_THREADS="1", DEEPCLUSTER_FAULT="dcv2_train:4")
    res = subprocess.run(cmd, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode != 0, res.stdout[-2000:]
    monkeypatch.setenv("DEEPCLUSTER_FAULT_MODE", "raise")
    monkeypatch.setenv("DEEPCLUSTER_FAULT", "dcv2_train:4")
    fileio.FAULT_HITS.clear()
    with pytest.raises(fileio.FaultInjected):
        m2.run(argv_of(one, "6"))
    monkeypatch.delenv("DEEPCLUSTER_FAULT")
    a, b = (_newest(e) for e in (two, one))
    assert (a["epoch"], a["iteration"], a["world_size"]) == (1, 1, 2)
    assert (b["epoch"], b["iteration"], b["world_size"]) == (1, 1, 1)
    assert a["bank"].shape[1] == 6 and torch.equal(a["bank_index"], b["bank_index"])  # the global step's 6 images
    # every head's assignments of epoch 1 (k-means of the bank trained in epoch 0), and head 0's of epoch 0
    labels_a, labels_b = a["mid_epoch"]["labels"], b["mid_epoch"]["labels"]
    assert torch.equal(labels_a, labels_b) and ((labels_a >= 0).sum(1) == 12).all()
    clusters = [checkpoint.ClusterLog(e / "clusters") for e in (two, one)]
    np.testing.assert_array_equal(clusters[0].load(0), clusters[1].load(0))
    log_a, log_b = (fileio.read_jsonl(e / "log.jsonl") for e in (two, one))
    assert log_a[0]["nmi_labels_heads"] == log_b[0]["nmi_labels_heads"]
    assert log_a[0]["train_loss"] == pytest.approx(log_b[0]["train_loss"], rel=2e-4)
    assert a["mid_epoch"]["loss_sum"] == pytest.approx(b["mid_epoch"]["loss_sum"], rel=2e-4)
    assert _max_diff(a["state_dict"], b["state_dict"]) < 5e-4
    assert float((a["bank"] - b["bank"]).abs().max()) < 2e-3  # unit vectors
    # both end on 1 process x batch 6: the 2-process part resumes inside epoch 1
    assert m2.run(argv_of(two, "6") + ["--resume", str(two)]) == 0
    assert m2.run(argv_of(one, "6") + ["--resume", str(one)]) == 0
    log_a, log_b = (fileio.read_jsonl(e / "log.jsonl") for e in (two, one))
    assert [(r["epoch"], r["world_size"]) for r in log_a] == [(0, 2), (1, 1)]
    assert log_a[1]["train_loss"] == pytest.approx(log_b[1]["train_loss"], rel=2e-4)
    np.testing.assert_array_equal(clusters[0].load(1), np.where(labels_a[0] >= 0, labels_a[0], -1))
    np.testing.assert_array_equal(clusters[0].load(1), clusters[1].load(1))
    a, b = (checkpoint.torch_load(e / "checkpoint.pth.tar") for e in (two, one))
    assert len(a["bank_index"]) == 12 and torch.equal(a["bank_index"], b["bank_index"])
    assert _max_diff(a["state_dict"], b["state_dict"]) < 5e-4
    assert float((a["bank"] - b["bank"]).abs().max()) < 2e-3


def _launch_dcv2(tmp_path, **env):
    """main_deepclusterv2.sh with PYTHON = a stub: the parsed main_deepclusterv2.py flags it passes."""
    import subprocess

    import main_deepclusterv2 as m2

    log = tmp_path / "calls.txt"
    stub = tmp_path / "stub.sh"
    stub.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > "{log}"\n')
    stub.chmod(0o755)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run(["bash", os.path.join(root, "main_deepclusterv2.sh")], capture_output=True, text=True,
                       env={**os.environ, "PYTHON": str(stub), "DIR": "/data/train", **env}, timeout=60)
    assert r.returncode == 0, r.stderr
    argv = log.read_text().splitlines()
    script = next(i for i, a in enumerate(argv) if a.endswith("main_deepclusterv2.py"))
    return argv[:script], m2.get_args_parser().parse_args(argv[script + 1:])


def test_launcher_reproduces_swav_recipes(tmp_path):
    # 8 nodes x 8 GPUs x 64: swav's 800-epoch script, value for value
    pre, a = _launch_dcv2(tmp_path, NNODES="8", NGPUS="8")
    assert "--nproc_per_node=8" in pre and "--nnodes=8" in pre
    assert (a.nmb_crops, a.size_crops, a.min_scale_crops, a.max_scale_crops) == ([2, 6], [224, 96], [0.14, 0.05],
                                                                                 [1.0, 0.14])
    assert (a.epochs, a.batch_size, a.base_lr, a.final_lr, a.start_warmup) == (800, 64, 4.8, 0.0048, 0.3)
    assert (a.freeze_prototypes_niters, a.wd, a.warmup_epochs, a.nmb_prototypes, a.crops_for_assign) == \
        (300000, 1e-6, 10, [3000] * 3, [0, 1])
    assert (a.temperature, a.feat_dim, a.arch, a.sync_bn) == (0.1, 128, "resnet50", "pytorch")
    _, a = _launch_dcv2(tmp_path, NNODES="8", RECIPE="400ep")
    assert (a.epochs, a.nmb_crops, a.size_crops, a.min_scale_crops) == (400, [2, 4], [160, 96], [0.08, 0.05])
    _, a = _launch_dcv2(tmp_path, NNODES="8", RECIPE="400ep_2x224")
    assert (a.epochs, a.nmb_crops, a.size_crops, a.min_scale_crops) == (400, [2], [224], [0.08])
    # one node of 8 GPUs: global batch 512, learning rates / 8, prototypes frozen as many images
    _, a = _launch_dcv2(tmp_path)
    assert (a.base_lr, a.final_lr, a.start_warmup, a.freeze_prototypes_niters) == (0.6, 0.0006, 0.0375, 2400000)


# ---------------------------------------------------------------------------------------
# evaluation: v2 checkpoints in the eval scripts, eval_linear --protocol swav
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dcv2_r50_checkpoints(module_tmp):
    """A ResNet-50 DeepCluster-v2 network saved as this project's run does and in swav's release layout."""
    import fileio

    torch.manual_seed(0)
    net = DeepClusterV2Net("resnet50", hidden_mlp=64, feat_dim=16, nmb_prototypes=[7, 7])
    root = module_tmp.mktemp("r50")
    ours, swav = root / "ckp-0.pth", root / "deepclusterv2_800ep_pretrain.pth.tar"
    fileio.atomic_torch_save({"epoch": 1, "state_dict": net.state_dict(), "config": net.config(),
                              "method": "deepclusterv2"}, ours)
    fileio.atomic_torch_save({"state_dict": {"module." + k: v for k, v in net.state_dict().items()}}, swav)
    return net, ours, swav


def test_eval_scripts_load_v2_checkpoints(dcv2_r50_checkpoints):
    import checkpoint

    net, ours, swav = dcv2_r50_checkpoints
    x = torch.randn(2, 3, 64, 64)
    want = net.eval().forward_features(x)
    for path in (ours, swav):  # eval_knn, eval_linear and eval_voc_classif load through this
        m = checkpoint.load_model(str(path))
        assert m.arch == "resnet50" and any(k.startswith(("prototypes", "module.prototypes"))
                                            for k in m.ignored_keys)
        assert torch.allclose(m.eval().forward_features(x), want, atol=1e-5)


def test_eval_scripts_load_resnet18_v2_checkpoints(tmp_path):
    """A ResNet-18 DeepCluster-v2 network (main_deepclusterv2.py --arch resnet18) loads as the
    registry's ResNet-18 trunk at its training size, with what each evaluation uses: pooled
    features (eval_knn), probe trunks (eval_linear), the 512 -> 20 head (eval_voc_classif)."""
    import argparse

    import checkpoint
    import eval_linear
    import eval_voc_classif
    import fileio

    torch.manual_seed(0)
    net = DeepClusterV2Net("resnet18", hidden_mlp=32, feat_dim=16, nmb_prototypes=[4, 5], input_size=32).eval()
    path = tmp_path / "ckp-0.pth"  # main_deepclusterv2.py's checkpoints/ckp-E.pth
    fileio.atomic_torch_save({"epoch": 1, "state_dict": net.state_dict(), "config": net.config(),
                              "method": "deepclusterv2"}, path)
    x = torch.randn(2, 3, 32, 32)
    m = checkpoint.load_model(str(path)).eval()
    assert (m.arch, m.input_size, m.feature_dim) == ("resnet18", 32, 512)
    assert {k.split(".")[0] for k in m.ignored_keys} == {"projection_head", "prototypes"}
    assert torch.allclose(m.forward_features(x), net.forward_features(x), atol=1e-6)
    assert torch.allclose(m.trunk("layer3")(x), net.trunk("layer3")(x), atol=1e-6)
    assert eval_linear.build_reglog(m.trunk(6).freeze(), m.arch, 6, 3, 32).linear.in_features == 512
    params = eval_voc_classif.prepare_model(m, argparse.Namespace(fc6_8=1, train_batchnorm=0))
    assert [tuple(p.shape) for p in params] == [(20, 512), (20,)]
    # a bare state dict in swav's layout (module. prefix) is told apart from a ResNet-50 by its keys
    bare = tmp_path / "r18_swav_layout.pth"
    torch.save({"module." + k: v for k, v in net.state_dict().items()}, bare)
    assert checkpoint.load_model(str(bare)).arch == "resnet18"


@pytest.mark.slow
def test_eval_knn_cli_on_resnet18_v2_run(dcv2_reference, tmp_path):
    """eval_knn.py on the checkpoints main_deepclusterv2.py --arch resnet18 wrote."""
    import json

    import eval_knn

    knn_data = dcv2_reference.parent / "knn"
    for model in (dcv2_reference / "checkpoints" / "ckp-1.pth", dcv2_reference / "checkpoint.pth.tar"):
        exp = tmp_path / model.name
        assert eval_knn.run(["--data", str(knn_data), "--model", str(model), "--exp", str(exp), "--workers", "0",
                             "--device", "cpu", "--nb_knn", "3", "--no_progress"]) == 0
        res = json.loads((exp / "results.json").read_text())
        assert res["dim"] == 512 and 0 <= res["results"]["3"]["top1"] <= 100  # ResNet-18's pooled features


def test_eval_linear_swav_protocol(dcv2_r50_checkpoints, module_tmp):
    import eval_linear
    from conftest import make_split_folder

    a = eval_linear.parse_args(["--data", "d", "--model", "m", "--protocol", "swav"])
    assert (a.conv, a.epochs, a.batch_size, a.lr, a.weight_decay, a.final_lr, a.nesterov) == \
        ("avgpool", 100, 256, 0.3, -6, 0.0, False)
    assert eval_linear.parse_args(["--data", "d", "--model", "m", "--protocol", "swav", "--lr", "0.1"]).lr == 0.1
    assert eval_linear.parse_args(["--data", "d", "--model", "m"]).lr == 0.01  # the paper's protocol unchanged
    # the closed-form schedule equals torch's schedulers stepped once per epoch
    for sched in ("cosine", "step"):
        a = eval_linear.parse_args(["--data", "d", "--model", "m", "--protocol", "swav", "--scheduler_type", sched,
                                    "--epochs", "10", "--decay_epochs", "3", "7", "--final_lr", "0.01"])
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=a.lr)
        s = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, a.epochs, eta_min=a.final_lr) if sched == "cosine"
             else torch.optim.lr_scheduler.MultiStepLR(opt, a.decay_epochs, gamma=a.gamma))
        for e in range(a.epochs):
            assert eval_linear.swav_lr(a, e) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9)
            opt.step()
            s.step()
    # one epoch on a tiny labelled set: the 2048-d pooled features, swav's initial lr
    root = make_split_folder(module_tmp.mktemp("lin"), n_classes=2, size=40)
    _, ours, _ = dcv2_r50_checkpoints
    res = eval_linear.main(eval_linear.parse_args(
        ["--data", str(root), "--model", str(ours), "--protocol", "swav", "--epochs", "1", "--size", "32",
         "--batch_size", "4", "--workers", "0", "--exp", str(root / "exp")]))
    assert res["dim"] == 2048 and res["history"][0]["lr"] == 0.3 and 0 <= res["best_top1"] <= 100
