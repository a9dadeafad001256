"""util: balanced sampler, released checkpoint layouts, atomic saves, RNG state, logs."""
from __future__ import annotations

import json
import os
import pickle
import random
import types

import numpy as np
import pytest
import torch

import checkpoint
import clustering
import fileio
import models
import runfolder
import util
from checkpoint import CheckpointError


# ---------------------------------------------------------------------------------------
# UnifLabelSampler
# ---------------------------------------------------------------------------------------
def unbalanced_lists(seed: int = 0, sizes=(1000, 120, 5, 1, 0, 60)) -> tuple[list[list[int]], int]:
    """images_lists over a shuffled image order (clusters are not contiguous in index)."""
    rng = np.random.RandomState(seed)
    n = sum(sizes)
    perm = rng.permutation(n)
    lists, pos = [], 0
    for s in sizes:
        lists.append(sorted(perm[pos:pos + s].tolist()))
        pos += s
    return lists, n


def cluster_of(lists) -> dict[int, int]:
    return {i: c for c, lst in enumerate(lists) for i in lst}


def served_counts(indices, lists) -> np.ndarray:
    owner = cluster_of(lists)
    return np.bincount([owner[i] for i in indices], minlength=len(lists))


@pytest.mark.parametrize("n_samples", [1186, 500, 3])
def test_sampler_balances_unbalanced_clusters(n_samples):
    lists, n = unbalanced_lists()
    s = util.UnifLabelSampler(n_samples, lists, rng=np.random.RandomState(0))
    idx = list(s)
    assert len(idx) == len(s) == n_samples
    assert all(0 <= i < n for i in idx)
    counts = served_counts(idx, lists)
    assert counts[4] == 0                         # the empty cluster is never drawn
    nonempty = counts[[0, 1, 2, 3, 5]]
    assert nonempty.max() - nonempty.min() <= 1, counts
    # replacement only where the cluster holds <= size images
    size = n_samples // 5 + 1
    owner = cluster_of(lists)
    for c, lst in enumerate(lists):
        drawn = [i for i in idx if owner[i] == c]
        if len(lst) > size:
            assert len(set(drawn)) == len(drawn)
    # the draws are shuffled, not grouped by cluster
    if n_samples > 100:
        runs = sum(owner[a] != owner[b] for a, b in zip(idx, idx[1:]))
        assert runs > n_samples // 2


def test_sampler_balanced_with_many_clusters():
    """100 clusters, N not a multiple: each cluster is served size or size - 1 times."""
    rng = np.random.RandomState(3)
    sizes = rng.randint(1, 40, size=100)
    lists, pos = [], 0
    for sz in sizes:
        lists.append(list(range(pos, pos + sz)))
        pos += sz
    for seed in range(3):
        s = util.UnifLabelSampler(1050, lists, rng=np.random.RandomState(seed))
        counts = served_counts(list(s), lists)
        assert counts.sum() == 1050
        assert set(counts.tolist()) <= {10, 11}, np.bincount(counts)
    # clusters smaller than their share are drawn with replacement: their images repeat
    idx = list(s)
    for c, lst in enumerate(lists):
        drawn = [i for i in idx if lst[0] <= i <= lst[-1]]
        assert set(drawn) <= set(lst)
        if len(lst) < counts[c]:
            assert len(set(drawn)) <= len(lst) < len(drawn)


def test_sampler_uses_the_global_numpy_rng_by_default():
    lists, n = unbalanced_lists()
    np.random.seed(7)
    a = list(util.UnifLabelSampler(n, lists))
    np.random.seed(7)
    b = list(util.UnifLabelSampler(n, lists))
    assert a == b


def test_sampler_rejects_all_empty():
    with pytest.raises(ValueError):
        util.UnifLabelSampler(10, [[], []])


class IndexDataset:
    """An "image" is its index, so what a training set serves can be checked exactly."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, idx):
        return idx, -1


def test_original_relabelled_dataset_is_not_balanced():
    """The original sampler returns dataset indices, but the original dataset is
    ordered by cluster, so the index serves a different image and labels track sizes."""
    lists, n = unbalanced_lists(sizes=(800, 150, 50))
    sampler = util.UnifLabelSampler(n, lists, rng=np.random.RandomState(0))
    idx = list(sampler)
    owner = cluster_of(lists)

    original = clustering.cluster_assign(lists, IndexDataset(n), order="cluster")
    served = [original[i] for i in idx]
    labels = np.bincount([s[1] for s in served], minlength=3)
    # served labels follow cluster sizes (800:150:50), far from the 1/3 each intended
    assert labels[0] > 0.7 * n and labels[2] < 0.1 * n, labels
    assert abs(labels / n - np.array([0.8, 0.15, 0.05])).max() < 0.05
    # and the image served is not the one the sampler drew
    assert sum(s[2] != i for s, i in zip(served, idx)) > n // 2

    fixed = clustering.cluster_assign(lists, IndexDataset(n), order="index")
    served = [fixed[i] for i in idx]
    labels = np.bincount([s[1] for s in served], minlength=3)
    assert labels.max() - labels.min() <= 1, labels
    # the image served is the one drawn, with the label of its own cluster
    assert all(img == i == j and lab == owner[i] for (img, lab, j), i in zip(served, idx))


# ---------------------------------------------------------------------------------------
# load_model: the released checkpoint layouts
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def source_models():
    torch.manual_seed(0)
    out = {
        ("alexnet", True, 7): models.alexnet(sobel=True, out=7, input_size=64),
        ("alexnet", False, 0): models.alexnet(sobel=False, out=0, input_size=64),
        ("vgg16", True, 5): models.vgg16(sobel=True, out=5, input_size=32),
    }
    # non-trivial BN statistics, so that buffers are checked too
    for m in out.values():
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-1, 1)
                mod.running_var.uniform_(0.5, 2)
                mod.num_batches_tracked.fill_(3)
    return out


def _layout(sd: dict, layout: str) -> dict:
    sd = {k: v.clone() for k, v in sd.items()}
    if layout == "features.module":
        sd = {k.replace("features.", "features.module.", 1) if k.startswith("features.") else k: v
              for k, v in sd.items()}
    elif layout == "module.features":
        sd = {("module." + k if k.startswith("features.") else k): v for k, v in sd.items()}
    elif layout == "module.all":
        sd = {"module." + k: v for k, v in sd.items()}
    elif layout == "no_bn_counter":
        sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    return sd


CASES = [
    (("alexnet", True, 7), "features", True),
    (("alexnet", True, 7), "features.module", True),
    (("alexnet", True, 7), "module.features", False),
    (("alexnet", True, 7), "no_bn_counter", True),
    (("alexnet", False, 0), "features.module", False),
    (("alexnet", False, 0), "module.all", True),
    (("vgg16", True, 5), "features.module", True),
    (("vgg16", True, 5), "no_bn_counter", False),
]


@pytest.mark.parametrize("key,layout,with_arch", CASES)
def test_load_model_released_layouts(tmp_path, source_models, key, layout, with_arch):
    arch, sobel, k = key
    src = source_models[key]
    sd = _layout(src.state_dict(), layout)
    ckpt = {"epoch": 12, "state_dict": sd}
    if with_arch:
        ckpt["arch"] = arch
    path = tmp_path / "checkpoint.pth.tar"
    torch.save(ckpt, path)
    model = checkpoint.load_model(path)
    assert model.arch == arch and model.use_sobel == sobel
    assert (model.top_layer.out_features if model.top_layer is not None else 0) == k
    assert model.input_size == src.input_size
    got, want = model.state_dict(), src.state_dict()
    if layout == "no_bn_counter":
        want = {kk: v for kk, v in want.items() if not kk.endswith("num_batches_tracked")}
        got = {kk: v for kk, v in got.items() if kk in want}
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name
    # the Sobel block stays frozen after loading
    if sobel:
        assert all(not p.requires_grad for p in model.sobel.parameters())
    # the same model, explicitly requested, loads too
    if layout == "features.module":
        assert checkpoint.load_model(path, arch=arch).arch == arch


def test_load_model_bare_state_dict(tmp_path, source_models):
    src = source_models[("alexnet", True, 7)]
    path = tmp_path / "bare.pth"
    torch.save(src.state_dict(), path)
    model = checkpoint.load_model(path)
    assert torch.equal(model.top_layer.bias, src.top_layer.bias)
    assert torch.equal(model.features[0].weight, src.features[0].weight)


def test_load_model_errors(tmp_path, source_models):
    with pytest.raises(CheckpointError):
        checkpoint.load_model(tmp_path / "missing.pth.tar")
    empty = tmp_path / "empty.pth.tar"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError):
        checkpoint.load_model(empty)
    junk = tmp_path / "junk.pth.tar"
    junk.write_bytes(os.urandom(2048))
    with pytest.raises(CheckpointError):
        checkpoint.load_model(junk)
    with pytest.raises(CheckpointError):
        checkpoint.load_model(tmp_path)  # a directory
    # a truncated real checkpoint
    src = source_models[("alexnet", False, 0)]
    good = tmp_path / "good.pth.tar"
    torch.save({"epoch": 1, "arch": "alexnet", "state_dict": src.state_dict()}, good)
    cut = tmp_path / "cut.pth.tar"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError):
        checkpoint.load_model(cut)
    # wrong architecture requested, with and without 'arch' in the checkpoint
    with pytest.raises(CheckpointError):
        checkpoint.load_model(good, arch="vgg16")
    noarch = tmp_path / "noarch.pth.tar"
    torch.save({"epoch": 1, "state_dict": src.state_dict()}, noarch)
    with pytest.raises(CheckpointError):
        checkpoint.load_model(noarch, arch="vgg16")
    # a dict that is no model
    other = tmp_path / "other.pth.tar"
    torch.save({"epoch": 1, "optimizer": {}}, other)
    with pytest.raises(CheckpointError):
        checkpoint.load_model(other)
    # a state dict that does not fit (a conv with the wrong width)
    sd = dict(src.state_dict())
    sd["features.4.weight"] = torch.zeros(128, 96, 5, 5)
    bad = tmp_path / "bad.pth.tar"
    torch.save({"state_dict": sd}, bad)
    with pytest.raises(CheckpointError):
        checkpoint.load_model(bad)


# ---------------------------------------------------------------------------------------
# atomic saves
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("env,flushed", [(None, True), ("1", True), ("0", False)])
def test_fsync_by_default(tmp_path, monkeypatch, env, flushed):
    """A write is flushed to the disk (file, then its folder) before the rename, unless
    DEEPCLUSTER_FSYNC=0 (what the suite sets for its own runs); the invocation history too."""
    if env is None:
        monkeypatch.delenv("DEEPCLUSTER_FSYNC", raising=False)
    else:
        monkeypatch.setenv("DEEPCLUSTER_FSYNC", env)
    calls = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real(fd)))
    fileio.atomic_torch_save({"epoch": 1}, tmp_path / "checkpoint.pth.tar")
    assert len(calls) == (2 if flushed else 0)                     # the file, then the folder
    runfolder.record_invocation(tmp_path, {"a": 1}, "run", "deepcluster", 0)
    assert len(calls) == (3 if flushed else 0)
    assert torch.load(tmp_path / "checkpoint.pth.tar", weights_only=True) == {"epoch": 1}


def test_atomic_torch_save_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pth.tar"
    fileio.atomic_torch_save({"epoch": 1, "w": torch.arange(5)}, path)
    assert torch.load(path, weights_only=True)["epoch"] == 1

    real_save = torch.save

    def broken_save(obj, f, *a, **kw):
        f.write(b"PK\x03\x04 partial checkpoint bytes")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        fileio.atomic_torch_save({"epoch": 2, "w": torch.zeros(5)}, path)
    monkeypatch.setattr(torch, "save", real_save)
    back = torch.load(path, weights_only=True)
    assert back["epoch"] == 1 and torch.equal(back["w"], torch.arange(5))
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pth.tar"]
    # a successful save replaces the file and leaves nothing else
    fileio.atomic_torch_save({"epoch": 3}, path)
    assert torch.load(path, weights_only=True) == {"epoch": 3}
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pth.tar"]
    # into a folder that does not exist yet
    fileio.atomic_torch_save({"epoch": 4}, tmp_path / "checkpoints" / "checkpoint_0.pth.tar")
    assert torch.load(tmp_path / "checkpoints" / "checkpoint_0.pth.tar", weights_only=True)["epoch"] == 4


# ---------------------------------------------------------------------------------------
# RNG state
# ---------------------------------------------------------------------------------------
def _draws():
    return (torch.rand(4).tolist(), np.random.rand(3).tolist(), np.random.randn(1).tolist(),
            [random.random() for _ in range(3)], np.random.randint(1234))


def test_rng_state_round_trip(tmp_path):
    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    np.random.randn(1)  # leave a cached gaussian in numpy's state
    state = checkpoint.get_rng_state()
    path = tmp_path / "rng.pth"
    torch.save({"rng": state}, path)
    want = _draws()
    _draws()  # move every generator on
    loaded = torch.load(path, weights_only=True)["rng"]
    checkpoint.set_rng_state(loaded)
    assert _draws() == want
    # the in-memory state works as well, twice
    checkpoint.set_rng_state(state)
    assert _draws() == want


# ---------------------------------------------------------------------------------------
# cluster log and the original pickles
# ---------------------------------------------------------------------------------------
def test_cluster_log_save_load_truncate(tmp_path):
    clog = checkpoint.ClusterLog(tmp_path / "clusters")
    rng = np.random.RandomState(0)
    labs = [rng.randint(0, 10, size=30) for _ in range(3)]
    for e, lab in enumerate(labs):
        clog.save(e, lab, k=10)
    assert clog.epochs() == [0, 1, 2]
    for e, lab in enumerate(labs):
        got = clog.load(e)
        assert got.dtype == np.int64 and np.array_equal(got, lab)
    assert np.load(clog.path(0)).dtype == np.uint16
    assert [h.tolist() for h in clog.history(upto=2)] == [labs[0].tolist(), labs[1].tolist()]
    clog.truncate(1)
    assert clog.epochs() == [0]
    # large k keeps ids beyond uint16
    big = np.array([0, 70_000, 65_536, 12])
    clog.save(5, big, k=80_000)
    assert np.array_equal(clog.load(5), big)
    assert not [p for p in os.listdir(tmp_path / "clusters") if p.startswith(".tmp")]


def test_export_clusters_pickle_both_formats(tmp_path):
    exp = tmp_path / "exp"
    clog = checkpoint.ClusterLog(exp / "clusters")
    e0, e1 = np.array([1, 0, 1, 2]), np.array([0, 0, 1, 1])
    clog.save(0, e0, k=3)
    clog.save(1, e1, k=3)
    paths = [f"/data/img{i}.jpg" for i in range(4)]
    out = checkpoint.export_clusters_pickle(exp, tmp_path / "released.pkl", image_paths=paths)
    with open(out, "rb") as f:
        obj = pickle.load(f)
    assert obj == [(p, int(c)) for p, c in zip(paths, e1)]  # default: last epoch
    assert all(isinstance(t, tuple) and type(t[1]) is int for t in obj)
    checkpoint.export_clusters_pickle(exp, tmp_path / "e0.pkl", epoch=0, image_paths=paths)
    with open(tmp_path / "e0.pkl", "rb") as f:
        assert pickle.load(f, encoding="latin1") == [(p, int(c)) for p, c in zip(paths, e0)]
    checkpoint.export_clusters_pickle(exp, tmp_path / "log.pkl")
    with open(tmp_path / "log.pkl", "rb") as f:
        log = pickle.load(f)
    assert log == [[[1], [0, 2], [3]], [[0, 1], [2, 3]]]
    with pytest.raises(FileNotFoundError):
        checkpoint.export_clusters_pickle(tmp_path / "nothing", tmp_path / "x.pkl")


# ---------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------
def test_learning_rate_decay():
    # only ``param_groups`` is used (a torch optimizer's first construction costs seconds)
    opt = types.SimpleNamespace(param_groups=[{"lr": 0.5, "weight_decay": 1e-4},
                                              {"lr": 0.5, "weight_decay": 1e-2}])
    util.learning_rate_decay(opt, 10_000, 0.01)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01 / np.sqrt(1.01))
    assert opt.param_groups[1]["lr"] == pytest.approx(0.01 / np.sqrt(2.0))
    util.learning_rate_decay(opt, 0, 0.01)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01)


def test_average_meter():
    m = util.AverageMeter()
    m.update(1.0)
    m.update(3.0, n=3)
    assert (m.val, m.sum, m.count, m.avg) == (3.0, 10.0, 4, 2.5)
    m.update(torch.tensor(0.5), n=4)
    assert m.avg == pytest.approx(12.0 / 8) and isinstance(m.val, float)
    m.reset()
    assert (m.val, m.sum, m.count, m.avg) == (0.0, 0.0, 0, 0.0)


def test_logger_appends_json_lines_and_survives_a_torn_line(tmp_path):
    path = tmp_path / "log.jsonl"
    lg = util.Logger(path)
    lg.log({"epoch": 0, "loss": 1.5})
    lg.log({"epoch": 1, "loss": 1.25})
    lines = path.read_text().splitlines()
    assert [json.loads(s) for s in lines] == [{"epoch": 0, "loss": 1.5}, {"epoch": 1, "loss": 1.25}]
    # a crash while appending leaves a torn last line
    with open(path, "a") as f:
        f.write('{"epoch": 2, "lo')
    assert fileio.read_jsonl(path) == [{"epoch": 0, "loss": 1.5}, {"epoch": 1, "loss": 1.25}]
    lg = util.Logger(path)
    assert lg.data == [{"epoch": 0, "loss": 1.5}, {"epoch": 1, "loss": 1.25}]
    # the next record is not glued to the torn line (it would be lost)
    lg.log({"epoch": 2, "loss": 1.0})
    assert [r["epoch"] for r in fileio.read_jsonl(path)] == [0, 1, 2]
    assert [r["epoch"] for r in util.Logger(path).data] == [0, 1, 2]
    lg.truncate(1)
    assert fileio.read_jsonl(path) == [{"epoch": 0, "loss": 1.5}]
    assert sorted(os.listdir(tmp_path)) == ["log.jsonl"]
