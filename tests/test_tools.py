"""What a research user needs around a run (issue 25, items 12-15): periodic checkpoints pruned
(--keep_checkpoints), features and assignments exported (export.py), TensorBoard events
(--tensorboard), eval_linear / eval_voc_classif checkpoints and resume.

One small training run (the small network of test_resume, 36 images, 2 epochs) serves the
pruning, export and TensorBoard tests.
"""
from __future__ import annotations

import csv
import importlib.util
import json
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import checkpoint
import deepcluster as dc
import export
import fileio
import main
import models
from conftest import make_image_folder, make_split_folder
from test_resume import small_model

HAS_TB = importlib.util.find_spec("tensorboard") is not None


@pytest.fixture(scope="module")
def images36(module_tmp) -> str:
    return str(make_image_folder(module_tmp.mktemp("img36") / "images", n_classes=3, per_class=12, size=16))


def train_argv(images: str, exp: Path, *extra: str) -> list[str]:
    # 36 images, batch 8: 5 iterations an epoch; a periodic copy every 2 -> checkpoint_0 .. checkpoint_4
    return [images, "--exp", str(exp), "--size", "64", "--k", "6", "--pca", "16", "--batch", "8",
            "--workers", "0", "--epochs", "2", "--checkpoints", "2", "--no_progress", *extra]


@pytest.fixture(scope="module")
def trained(images36, module_tmp) -> Path:
    exp = module_tmp.mktemp("run") / "exp"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dc, "build_model", small_model)
        extra = ["--keep_checkpoints", "2", "--keep_epoch_checkpoints"] + (["--tensorboard"] if HAS_TB else [])
        assert main.run(train_argv(images36, exp, *extra)) == 0
    return exp


# ---------------------------------------------------------------------------------------
# item 14: --keep_checkpoints, --keep_epoch_checkpoints
# ---------------------------------------------------------------------------------------
def test_periodic_copies_pruned_epoch_copies_kept(trained):
    ck = trained / "checkpoints"
    # the two newest numbered copies; checkpoint_latest (after each clustering) is not a numbered one
    assert sorted(p.name for p in ck.glob("checkpoint_*")) == ["checkpoint_3.pth.tar", "checkpoint_4.pth.tar",
                                                                 "checkpoint_latest.pth.tar"]
    for e in (1, 2):  # a copy of every epoch's end, N epochs done
        assert torch.load(ck / f"epoch_{e:05d}.pth.tar", weights_only=True)["epoch"] == e
    assert (ck / "epoch_00002.pth.tar").read_bytes() == (trained / "checkpoint.pth.tar").read_bytes()
    assert checkpoint.find_checkpoint(str(trained), quiet=True) == str(trained / "checkpoint.pth.tar")
    assert not list(ck.glob(".tmp-*"))


def test_pruning_keeps_what_a_resume_needs(tmp_path):
    """Newest by (epoch, iteration), not by the number in the name; other runs' files, the
    stopped copy and unreadable files are left alone."""
    class Rt:
        is_main = True

    d = tmp_path / "checkpoints"
    d.mkdir()

    def put(name, epoch, it, run="r1"):
        fileio.atomic_torch_save({"epoch": epoch, "iteration": it, "run_id": run, "mid_epoch": {}}, d / name)

    put("checkpoint_7.pth.tar", 1, 2)
    put("checkpoint_8.pth.tar", 1, 4)
    put("checkpoint_1.pth.tar", 2, 1)  # written after a resume with a larger --checkpoints: the newest
    put("checkpoint_9.pth.tar", 5, 0, run="old")
    put("checkpoint_stopped.pth.tar", 0, 1)
    (d / "checkpoint_5.pth.tar").write_bytes(b"junk")
    gone = checkpoint.prune_periodic(d, 1, "r1", Rt(), protect=d / "checkpoint_1.pth.tar")
    assert sorted(Path(p).name for p in gone) == ["checkpoint_7.pth.tar", "checkpoint_8.pth.tar"]
    assert sorted(p.name for p in d.iterdir()) == ["checkpoint_1.pth.tar", "checkpoint_5.pth.tar",
                                                   "checkpoint_9.pth.tar", "checkpoint_stopped.pth.tar"]
    assert checkpoint.prune_periodic(d, 0, "r1", Rt()) == []  # 0: keep all


def test_keep_checkpoints_flag_checked(images36, tmp_path, capsys):
    exp = tmp_path / "exp"
    with pytest.raises(SystemExit) as e:
        main.run(train_argv(images36, exp, "--keep_checkpoints", "-1"))
    assert e.value.code == 2 and "--keep_checkpoints: invalid value -1" in capsys.readouterr().err
    assert not exp.exists()


# ---------------------------------------------------------------------------------------
# item 13: export.py
# ---------------------------------------------------------------------------------------
def test_export_assignments_in_the_original_formats(trained, images36, tmp_path, capsys):
    out = tmp_path / "out"
    assert export.run([str(trained), "--out", str(out)]) == 0
    clog = checkpoint.ClusterLog(trained / "clusters")
    paths = sorted(str(p) for p in Path(images36).rglob("*.jpg"))
    for e in (0, 1):
        labels = clog.load(e)
        np.testing.assert_array_equal(np.load(out / f"assignments_{e:05d}.npy"), labels)
        rows = list(csv.reader(open(out / f"assignments_{e:05d}.csv")))
        assert rows[0] == ["path", "cluster"] and rows[1:] == [[p, str(c)] for p, c in zip(paths, labels)]
        with open(out / f"assignments_{e:05d}.pickle", "rb") as f:  # the release's format
            assert pickle.load(f, encoding="latin1") == [(p, int(c)) for p, c in zip(paths, labels)]
    with open(out / "clusters", "rb") as f:  # the original's EXP/clusters: images_lists per epoch
        hist = pickle.load(f)
    assert len(hist) == 2 and sorted(sum(hist[1], [])) == list(range(36))
    # one epoch; a bad epoch and a missing run are one error line each
    assert export.run([str(trained), "--epoch", "last", "--out", str(tmp_path / "one")]) == 0
    assert sorted(p.name for p in (tmp_path / "one").glob("assignments_*")) == [
        "assignments_00001.csv", "assignments_00001.npy", "assignments_00001.pickle"]
    capsys.readouterr()
    assert export.run([str(trained), "--epoch", "7", "--out", str(tmp_path / "no")]) == 2
    assert "error: --epoch 7: not in the run (epochs 0..1)" in capsys.readouterr().err
    assert export.run([str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "no").exists() and not (tmp_path / "nowhere").exists()


@pytest.mark.slow
def test_export_features(trained, tmp_path):
    """fc7 (before its ReLU) of every image, in the run's order, from a real AlexNet checkpoint."""
    import knn
    model = models.build_model("alexnet", sobel=True, out=6, input_size=64)
    torch.save({"state_dict": model.state_dict(), "arch": "alexnet"}, tmp_path / "m.pth.tar")
    out = tmp_path / "out"
    assert export.run([str(trained), "--epoch", "last", "--features", "--model", str(tmp_path / "m.pth.tar"),
                       "--out", str(out), "--workers", "0", "--no_progress"]) == 0
    feats = np.load(out / "features.npy")
    rows = list(csv.reader(open(out / "features_paths.csv")))[1:]
    assert feats.shape == (36, 4096) and feats.dtype == np.float32 and len(rows) == 36
    loaded = checkpoint.load_model(tmp_path / "m.pth.tar")
    first = knn.extract(knn.FeatureNet(loaded, "fc7", 64), knn.image_batches([rows[0][0]], 64, 1, 0),
                        torch.device("cpu")).numpy()
    np.testing.assert_allclose(feats[0], first[0], rtol=1e-4, atol=1e-4)
    assert (feats < 0).any()  # before the ReLU


def test_read_python2_release_pickle(tmp_path):
    """The release's pickles were written by Python 2: paths are byte strings (UTF-8 on disk)."""
    name = "n01440764/café.JPEG".encode("utf-8")
    py2 = (b"\x80\x02]q\x00(U" + bytes([len(name)]) + name + b"M\x10'\x86q\x01U\x05b.jpgK\x00\x86q\x02e.")
    (tmp_path / "alexnet_cluster_assignment.pickle").write_bytes(py2)
    assert export.load_assignment_pickle(tmp_path / "alexnet_cluster_assignment.pickle") == [
        ("n01440764/café.JPEG", 10000), ("b.jpg", 0)]
    assert export.run(["--read", str(tmp_path / "alexnet_cluster_assignment.pickle"), "--out", str(tmp_path / "o")]) == 0
    rows = list(csv.reader(open(tmp_path / "o" / "alexnet_cluster_assignment.csv", encoding="utf-8")))
    assert rows == [["path", "cluster"], ["n01440764/café.JPEG", "10000"], ["b.jpg", "0"]]


# ---------------------------------------------------------------------------------------
# item 12: --tensorboard
# ---------------------------------------------------------------------------------------
@pytest.mark.skipif(not HAS_TB, reason="tensorboard not installed (requirements.txt pins it)")
def test_tensorboard_scalars_match_the_log(trained):
    import tb
    scalars = tb.read_scalars(trained / "tensorboard")
    recs = fileio.read_jsonl(trained / "log.jsonl")
    assert [r["epoch"] for r in recs] == [0, 1]
    for key in ("clustering_loss", "train_loss", "nmi_labels", "n_clusters", "time_train"):
        assert scalars[f"log/{key}"] == [(r["epoch"], pytest.approx(r[key], rel=1e-6)) for r in recs], key
    assert [s for s, _ in scalars["log/nmi_prev"]] == [1]  # None in epoch 0: not logged
    assert scalars["lr/body"] == [(0, pytest.approx(0.05)), (1, pytest.approx(0.05))]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(trained / "tensorboard"), size_guidance={"images": 0, "histograms": 0})
    acc.Reload()
    assert "clusters/size" in acc.Tags()["histograms"] and "clusters/top1" in acc.Tags()["images"]
    assert [e.step for e in acc.Images("clusters/top1")] == [0, 1]


def test_tensorboard_missing_is_one_error_line(images36, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as when not installed
    monkeypatch.setattr(dc, "build_model", small_model)
    exp = tmp_path / "exp"
    assert main.run(train_argv(images36, exp, "--tensorboard")) == 2
    err = capsys.readouterr().err
    assert "error: --tensorboard needs the tensorboard package" in err and "pip install tensorboard==" in err
    assert not (exp / "checkpoint.pth.tar").exists() and not (exp / "args.json").exists()


# ---------------------------------------------------------------------------------------
# item 15: eval_linear / eval_voc_classif checkpoints and resume, --device everywhere
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def alexnet64(module_tmp) -> Path:
    from test_eval_common import save_our_format
    torch.manual_seed(0)
    return save_our_format(models.alexnet(sobel=True, out=0, input_size=64), module_tmp.mktemp("m") / "a.pth.tar")


@pytest.fixture(scope="module")
def linear_data(module_tmp) -> Path:
    return make_split_folder(module_tmp.mktemp("linear") / "data", size=40)


def linear_argv(data: Path, model: Path, exp: Path, *extra: str) -> list[str]:
    return ["--data", str(data), "--model", str(model), "--exp", str(exp), "--conv", "5", "--size", "64",
            "--workers", "0", "--batch_size", "4", "--epochs", "1", "--no_progress", "--device", "cpu", *extra]


@pytest.mark.slow
def test_eval_linear_folder_resume_overwrite_and_model_check(linear_data, alexnet64, tmp_path, capsys):
    import eval_linear
    exp = tmp_path / "exp"
    assert eval_linear.run(linear_argv(linear_data, alexnet64, exp)) == 0
    ck = torch.load(exp / "checkpoint.pth.tar", weights_only=True)
    # the classifier and optimizer, not the frozen network: a few KB instead of the model's size
    assert "state_dict" not in ck and ck["model"]["sha256"] and (exp / "checkpoint.pth.tar").stat().st_size < 200_000
    before = {p.name: p.read_bytes() for p in exp.iterdir() if p.is_file() and p.suffix != ".log"}

    # a second run into the same folder is refused, nothing changes
    capsys.readouterr()
    assert eval_linear.run(linear_argv(linear_data, alexnet64, exp)) == 2
    err = capsys.readouterr().err
    assert f"error: {exp} already holds a run" in err and f"--resume {exp}" in err and "--overwrite" in err
    assert {n: (exp / n).read_bytes() for n in before} == before

    # --resume EXP (the folder) continues: epoch 1 only
    assert eval_linear.run(linear_argv(linear_data, alexnet64, exp, "--epochs", "2", "--resume", str(exp))) == 0
    hist = json.loads((exp / "results.json").read_text())["history"]
    assert [r["epoch"] for r in hist] == [0, 1]

    # another frozen network (same architecture) is refused by its hash
    other = tmp_path / "other.pth.tar"
    m = models.alexnet(sobel=True, out=0, input_size=64)
    torch.save({"arch": "alexnet", "state_dict": m.state_dict(), "model_config": m.config()}, other)
    capsys.readouterr()
    assert eval_linear.run(linear_argv(linear_data, other, exp, "--epochs", "3", "--resume", str(exp))) == 2
    err = capsys.readouterr().err
    assert "was trained on the model" in err and "is another file" in err
    assert torch.load(exp / "checkpoint.pth.tar", weights_only=True)["epoch"] == 2  # nothing lost

    # --overwrite starts anew (with --tensorboard when installed: the epoch's numbers, as results.json)
    tbflag = ["--tensorboard"] if HAS_TB else []
    assert eval_linear.run(linear_argv(linear_data, alexnet64, exp, "--overwrite", *tbflag)) == 0
    hist = json.loads((exp / "results.json").read_text())["history"]
    assert [r["epoch"] for r in hist] == [0]
    if HAS_TB:
        import tb
        scalars = tb.read_scalars(exp / "tensorboard")
        for key in ("top1", "top5", "train_loss", "val_loss", "lr"):
            if hist[0][key] is None:  # top-5 of 5 classes or fewer: not measured, not logged
                assert f"log/{key}" not in scalars
                continue
            assert scalars[f"log/{key}"] == [(0, pytest.approx(hist[0][key], rel=1e-6))], key


@pytest.mark.slow
def test_eval_scripts_ctrl_c_hint_and_device(linear_data, alexnet64, tmp_path, monkeypatch, capsys):
    import eval_knn
    import eval_linear
    import eval_retrieval
    import eval_voc_classif
    for mod in (eval_linear, eval_voc_classif, eval_knn, eval_retrieval):
        assert "--device" in mod.get_args_parser().format_help(), mod.__name__
    exp = tmp_path / "exp"
    assert eval_linear.run(linear_argv(linear_data, alexnet64, exp)) == 0
    calls = []

    def interrupt(*a, **k):
        calls.append(1)
        raise KeyboardInterrupt
    monkeypatch.setattr(eval_linear, "train_epoch", interrupt)
    capsys.readouterr()
    assert eval_linear.run(linear_argv(linear_data, alexnet64, exp, "--epochs", "3", "--resume", str(exp))) == 130
    assert calls and f"interrupted; --resume {exp} continues from {exp / 'checkpoint.pth.tar'}" in capsys.readouterr().err
    assert eval_linear.run(linear_argv(linear_data, alexnet64, tmp_path / "new")) == 130
    assert "interrupted before the first checkpoint" in capsys.readouterr().err


@pytest.fixture(scope="module")
def voc(module_tmp) -> Path:
    from test_eval_common import make_voc
    return make_voc(module_tmp.mktemp("voc"), n_per_split=6)


def voc_argv(voc: Path, model: Path, exp: Path, *extra: str) -> list[str]:
    return ["--vocdir", str(voc), "--model", str(model), "--exp", str(exp), "--size", "64", "--workers", "0",
            "--batch_size", "4", "--fc6_8", "0", "--no_progress", "--device", "cpu", *extra]


@pytest.mark.slow
def test_eval_voc_classif_checkpoints_and_resume(voc, alexnet64, tmp_path, capsys, monkeypatch):
    """Killed after iteration 3 of 5 (checkpoint every 3): the resume trains the last 2 from the
    saved network, optimizer and schedule, on the rest of the interrupted pass."""
    import eval_voc_classif as ev
    exp = tmp_path / "exp"
    seen = []
    real = ev.masked_bce

    def stop_at_4(logits, labels):
        seen.append(len(labels))
        if len(seen) == 4:
            raise KeyboardInterrupt
        return real(logits, labels)
    monkeypatch.setattr(ev, "masked_bce", stop_at_4)
    assert ev.run(voc_argv(voc, alexnet64, exp, "--nit", "5", "--checkpoints", "3", "--stepsize", "2")) == 130
    assert f"--resume {exp} continues from" in capsys.readouterr().err
    ck = torch.load(exp / "checkpoint.pth.tar", weights_only=True)
    assert ck["iteration"] == 3 and len(ck["losses"]) == 3 and ck["scheduler"]["last_epoch"] == 3
    first_losses = ck["losses"].tolist()
    resumed_sizes = []
    monkeypatch.setattr(ev, "masked_bce", lambda lo, la: resumed_sizes.append(len(la)) or real(lo, la))
    # a fresh run into that folder is refused; a resume with other flags too
    assert ev.run(voc_argv(voc, alexnet64, exp, "--nit", "5")) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert ev.run(voc_argv(voc, alexnet64, exp, "--nit", "5", "--resume", str(exp), "--fc6_8", "1")) == 2
    assert "was trained with --fc6_8 0, not 1" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)  # --resume EXP alone: EXP's flags (--vocdir, --model, --nit...), in EXP
    assert ev.run(["--resume", str(exp)]) == 0
    assert not (tmp_path / "exp_voc").exists()
    ck = torch.load(exp / "checkpoint.pth.tar", weights_only=True)
    assert ck["iteration"] == 5 and ck["losses"][:3].tolist() == first_losses and len(ck["losses"]) == 5
    # 6 train images, batch 4: passes of 4 + 2; iteration 4 is the second batch of pass 2
    assert resumed_sizes[:2] == [2, 4]
    assert ck["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.003 / 4)  # halved at 2 and 4
    res = json.loads((exp / "results.json").read_text())
    assert 0 <= res["mAP"] <= 100


@pytest.mark.skipif(not HAS_TB, reason="tensorboard not installed (requirements.txt pins it)")
def test_tensorboard_resume_keeps_one_value_per_epoch(trained, images36, tmp_path, monkeypatch):
    """Resumed inside epoch 1 (a periodic copy): epoch 1 is redone, its earlier events dropped."""
    import shutil

    import tb
    exp = tmp_path / "exp"
    shutil.copytree(trained, exp)
    ck = exp / "checkpoints" / "checkpoint_4.pth.tar"
    assert torch.load(ck, weights_only=True)["epoch"] == 1
    monkeypatch.setattr(dc, "build_model", small_model)
    assert main.run(train_argv(images36, exp, "--tensorboard", "--resume", str(ck))) == 0
    recs = fileio.read_jsonl(exp / "log.jsonl")
    scalars = tb.read_scalars(exp / "tensorboard")
    assert scalars["log/train_loss"] == [(r["epoch"], pytest.approx(r["train_loss"], rel=1e-6)) for r in recs]
