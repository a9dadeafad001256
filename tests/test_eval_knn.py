"""eval_knn.py: the weighted kNN against a numpy reference, chunking, end to end, bad input;
main.py --knn_data: per-epoch log fields, no effect on training, same values after a resume."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import data
import eval_knn
import main
import fileio
import knn
import models
from conftest import make_image_folder


def reference_knn(train: np.ndarray, labels: np.ndarray, test: np.ndarray, k: int, T: float, C: int,
                  topn: int = 5) -> np.ndarray:
    """Brute force in float64: every similarity, full sorts, one vote loop per test image."""
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    test = test / np.linalg.norm(test, axis=1, keepdims=True)
    out = []
    for q in test.astype(np.float64):
        sim = train.astype(np.float64) @ q
        nn_idx = np.argsort(-sim, kind="stable")[:k]
        votes = np.zeros(C)
        for i in nn_idx:
            votes[labels[i]] += np.exp(sim[i] / T)
        out.append(np.argsort(-votes, kind="stable")[:min(topn, C)])
    return np.asarray(out)


@pytest.mark.parametrize("T", [0.07, 0.5])
def test_matches_numpy_reference(T):
    rng = np.random.RandomState(0)
    C = 6
    train = rng.randn(150, 12).astype(np.float32)
    labels = rng.randint(0, C, 150)
    test = rng.randn(40, 12).astype(np.float32)
    ks = [1, 3, 20, 150]
    got = knn.knn_classify(torch.from_numpy(train), torch.from_numpy(labels), torch.from_numpy(test), ks, T,
                                num_classes=C)
    assert sorted(got) == ks
    for k in ks:
        np.testing.assert_array_equal(got[k].numpy(), reference_knn(train, labels, test, k, T, C), err_msg=f"k={k}")
    # accuracy from the rankings
    truth = rng.randint(0, C, 40)
    acc = knn.knn_accuracy(got, torch.from_numpy(truth))
    ref = reference_knn(train, labels, test, 20, T, C)
    assert acc[20]["top1"] == pytest.approx(100 * np.mean(ref[:, 0] == truth))
    assert acc[20]["top5"] == pytest.approx(100 * np.mean((ref == truth[:, None]).any(1)))


def test_chunking_does_not_change_predictions():
    rng = np.random.RandomState(1)
    train, test = torch.from_numpy(rng.randn(300, 20).astype(np.float32)), torch.from_numpy(rng.randn(70, 20).astype(np.float32))
    labels = torch.from_numpy(rng.randint(0, 10, 300))
    whole = knn.knn_classify(train, labels, test, [5, 20, 200], chunk=1000, train_chunk=1000)
    for chunk, train_chunk in [(1, 7), (13, 64), (70, 299), (32, 1)]:
        part = knn.knn_classify(train, labels, test, [5, 20, 200], chunk=chunk, train_chunk=train_chunk)
        for k in whole:
            assert torch.equal(whole[k], part[k]), (chunk, train_chunk, k)


def test_separated_classes_are_all_right():
    rng = np.random.RandomState(2)
    centres = 10 * np.eye(8, 32)                    # 8 orthogonal directions
    lab_tr, lab_te = np.repeat(np.arange(8), 25), np.repeat(np.arange(8), 5)
    train = centres[lab_tr] + rng.randn(200, 32)
    test = centres[lab_te] + rng.randn(40, 32)
    got = knn.knn_classify(torch.tensor(train), torch.tensor(lab_tr), torch.tensor(test), [1, 20, 100])
    acc = knn.knn_accuracy(got, torch.tensor(lab_te))
    assert all(a["top1"] == 100.0 and a["top5"] == 100.0 for a in acc.values())
    # a tiny temperature (exp(sim / T) overflows float32) still works
    tiny = knn.knn_classify(torch.tensor(train), torch.tensor(lab_tr), torch.tensor(test), [20], T=1e-3)
    assert knn.knn_accuracy(tiny, torch.tensor(lab_te))[20]["top1"] == 100.0


def test_k_larger_than_train_set_is_clamped(caplog):
    assert knn.clamp_ks([200, 5, 20, 20], 50, "--nb_knn") == [5, 20, 50]
    assert "--nb_knn [200] larger than the 50 train images: clamped to 50" in caplog.text
    with pytest.raises(ValueError):
        knn.knn_classify(torch.randn(4, 3), torch.zeros(4), torch.randn(2, 3), [5])


# ---------------------------------------------------------------------------------------
# data and end to end
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def knn_data(module_tmp) -> Path:
    root = module_tmp.mktemp("knn") / "data"
    make_image_folder(root / "train", n_classes=3, per_class=8, seed=0)
    make_image_folder(root / "val", n_classes=3, per_class=3, seed=0)
    return root


def test_bad_knn_data_is_refused(tmp_path, knn_data):
    for what, make, msg in [
            ("no val", lambda r: make_image_folder(r / "train"), "has no val/ folder"),
            ("val class not in train", lambda r: (make_image_folder(r / "train", n_classes=2),
                                                  make_image_folder(r / "val", n_classes=3)),
             "['class2']"),
            ("one class", lambda r: (make_image_folder(r / "train", n_classes=1),
                                     make_image_folder(r / "val", n_classes=1)), "single class")]:
        root = tmp_path / what.replace(" ", "_")
        make(root)
        with pytest.raises(data.DataError, match="--knn_data") as e:
            knn.load_knn_splits(root, "--knn_data")
        assert msg in str(e.value) and str(root) in str(e.value), what
    # val may have fewer classes than train: labels follow train's numbering
    shutil.copytree(knn_data, tmp_path / "sub")
    shutil.rmtree(tmp_path / "sub" / "val" / "class0")
    s = knn.load_knn_splits(tmp_path / "sub")
    assert s.classes == ["class0", "class1", "class2"] and sorted(set(s.val_labels)) == [1, 2]


def test_cli_end_to_end_with_cache(knn_data, tmp_path, capsys):
    torch.manual_seed(0)
    m = models.alexnet(sobel=False, out=5, input_size=64)  # colour classes: no Sobel
    path = tmp_path / "model.pth.tar"
    torch.save({"arch": "alexnet", "state_dict": m.state_dict(), "model_config": m.config()}, path)
    argv = ["--data", str(knn_data), "--model", str(path), "--exp", str(tmp_path / "exp"), "--size", "64",
            "--workers", "0", "--batch_size", "10", "--no_progress", "--nb_knn", "1", "5", "100"]
    assert eval_knn.run(argv) == 0
    res = json.loads((tmp_path / "exp" / "results.json").read_text())
    assert sorted(res["results"], key=int) == ["1", "5", "24"] and res["dim"] == 4096  # 100 clamped to 24
    assert res["n_train"] == 24 and res["n_val"] == 9
    # the scores are the reference classifier's on the cached features, in folder order
    cache = tmp_path / "exp" / "cache"
    train, val = (np.load(next(cache.glob(f"{s}_fc7_*.npy"))) for s in ("train", "val"))
    assert train.shape == (24, 4096) and val.shape == (9, 4096)
    truth, labels = np.repeat(np.arange(3), 3), np.repeat(np.arange(3), 8)
    for k in (1, 5):
        ref = reference_knn(train, labels, val, k, 0.07, 3)
        assert res["results"][str(k)]["top1"] == pytest.approx(100 * np.mean(ref[:, 0] == truth))
    out = capsys.readouterr().out
    assert "    k |  top-1 |  top-5" in out and "clamped to 24" in out
    assert eval_knn.run(argv + ["--layer", "conv2"]) == 0
    import eval_linear  # conv layers are pooled as the linear probe pools them
    assert json.loads((tmp_path / "exp" / "results.json").read_text())["dim"] == eval_linear.pooled_dims("alexnet", 64)[2]
    assert eval_knn.run(argv + ["--whiten", "8"]) == 0
    assert "using cached features" in capsys.readouterr().out
    assert json.loads((tmp_path / "exp" / "results.json").read_text())["whiten"] == 8
    for bad, msg in [(["--layer", "conv9"], "expected fc7 or one of conv1"), (["--layer", "fc6"], "expected fc7 or one of conv1"),
                     (["--temperature", "0"], "--temperature")]:
        assert eval_knn.run(argv + bad) == 2
        assert msg in capsys.readouterr().err


# ---------------------------------------------------------------------------------------
# main.py --knn_data
# ---------------------------------------------------------------------------------------
def train_args(images: Path, exp: Path, *extra: str) -> list[str]:
    # 24 images, batch 8: 3 iterations an epoch; a periodic copy every 2 iterations
    return [str(images), "--exp", str(exp), "--size", "64", "--k", "3", "--pca", "8", "--batch", "8",
            "--workers", "0", "--epochs", "2", "--no_progress", "--sobel", "--checkpoints", "2", *extra]


def test_monitor_draws_no_random_number_and_keeps_the_model(knn_data):
    """What makes --knn_data leave training unchanged: no global RNG draw, same weights, same mode."""
    import random
    torch.manual_seed(0)
    model = models.alexnet(sobel=True, out=3, input_size=64)
    model.train()
    before = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    results = []
    for load in (True, False):  # images kept in memory, or a DataLoader at every evaluation
        monitor = knn.KnnMonitor(str(knn_data), 10, 5, seed=3, size=64, batch=4, load=load)
        r = monitor.evaluate(model, torch.device("cpu"))
        results.append((r["knn_top1"], r["knn_top5"]))
    assert results[0] == results[1]
    assert torch.equal(before[0], torch.get_rng_state()) and np.array_equal(before[1], np.random.get_state()[1])
    assert before[2] == random.getstate()
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert len(monitor.train_paths) == 10 and len(monitor.val_paths) == 5  # the seeded subset
    again = knn.KnnMonitor(str(knn_data), 10, 5, seed=3, load=False)
    assert again.train_paths == monitor.train_paths and again.val_paths == monitor.val_paths


def test_main_logs_knn_and_resumes_to_the_same_values(tiny_image_folder, knn_data, tmp_path, capsys):
    knn = ["--knn_data", str(knn_data), "--knn_train_size", "20", "--knn_val_size", "6", "--knn_k", "30"]
    a, c = tmp_path / "a", tmp_path / "c"
    assert main.run(train_args(tiny_image_folder, a, *knn)) == 0
    out = capsys.readouterr().out
    assert "--knn_k [30] larger than the 20 train images: clamped to 20" in out
    assert "random network | knn" in out and "kNN top-1" in out
    recs = fileio.read_jsonl(a / "log.jsonl")
    assert [r["epoch"] for r in recs] == [-1, 0, 1]
    for r in recs:
        assert 0 <= r["knn_top1"] <= r["knn_top5"] <= 100 and r["time_knn"] > 0

    # killed inside epoch 0 (periodic copy at its iteration 2): the resumed run logs the same kNN values
    shutil.copytree(a, c)
    ck = torch.load(c / "checkpoints" / "checkpoint_1.pth.tar", weights_only=True)
    assert ck["epoch"] == 0 and ck["iteration"] == 2
    assert main.run(train_args(tiny_image_folder, c, *knn, "--resume",
                               str(c / "checkpoints" / "checkpoint_1.pth.tar"))) == 0
    assert "random network" not in capsys.readouterr().out
    resumed = fileio.read_jsonl(c / "log.jsonl")
    assert [r["epoch"] for r in resumed] == [-1, 0, 1]
    assert [(r["knn_top1"], r["knn_top5"]) for r in resumed] == [(r["knn_top1"], r["knn_top5"]) for r in recs]
    assert [r.get("train_loss") for r in resumed] == [r.get("train_loss") for r in recs]


def test_main_refuses_bad_knn_data_before_training(tiny_image_folder, tmp_path, capsys):
    make_image_folder(tmp_path / "knn" / "train", n_classes=2)
    code = main.run(train_args(tiny_image_folder, tmp_path / "exp", "--knn_data", str(tmp_path / "knn")))
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "--knn_data" in err and "has no val/ folder" in err
    assert not (tmp_path / "exp" / "log.jsonl").exists() and not (tmp_path / "exp" / "checkpoint.pth.tar").exists()
    with pytest.raises(SystemExit):
        main.parse_args([str(tiny_image_folder), "--knn_train_size", "0"])


def test_digits_split_is_stratified_and_seeded(tmp_path):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    a = knn.load_knn_splits(data.export_digits_split(tmp_path / "s", size=8, seed=5))
    assert len(a.train_paths) + len(a.val_paths) == 1797 and len(a.val_paths) == 360
    counts = np.bincount(a.val_labels) / np.bincount(np.r_[a.train_labels, a.val_labels])
    assert np.all(np.abs(counts - 0.2) < 0.01)
    y = load_digits().target
    _, val = train_test_split(np.arange(len(y)), test_size=0.2, stratify=y, random_state=5)
    assert sorted(int(Path(p).stem) for p in a.val_paths) == sorted(val)
    assert data.export_digits_split(tmp_path / "s", size=8, seed=5) == str(tmp_path / "s")  # reused


def test_report_draws_the_knn_curve(tmp_path):
    from PIL import Image
    from visu import report, training_report
    exp = tmp_path / "exp"
    exp.mkdir()
    recs = [{"epoch": -1, "knn_top1": 90.0, "knn_top5": 99.0, "time_knn": 1.0}]
    recs += [{"epoch": e, "clustering_loss": 10.0 - e, "train_loss": 3.0 - e / 10, "nmi_prev": None if e == 0 else 0.6,
              "nmi_labels": 0.5, "knn_top1": 80.0 + e, "knn_top5": 98.0, "time_knn": 1.0} for e in range(3)]
    (exp / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    e, v = training_report.series(training_report.read_log(exp), "knn_top1")
    assert list(e) == [-1, 0, 1, 2] and list(v) == [90.0, 80.0, 81.0, 82.0]
    written = report.main(report.get_args_parser().parse_args([str(exp)]))
    assert [p.name for p in written] == ["training_curves.png"]
    assert Image.open(written[0]).size == (1500, 720)  # 5 panels: 3 columns x 2 rows (4 panels: 1000 wide)
