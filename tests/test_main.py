"""End-to-end runs of main.py on small real data, resume, and bad input."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import checkpoint
import clustering
import main
from conftest import digits_subset
import fileio


@pytest.fixture(scope="module")
def small_digits(module_tmp, digits_dir) -> str:
    """30 digits per class (300 images, 10 class folders) for fast end-to-end runs."""
    return digits_subset(digits_dir, module_tmp.mktemp("small") / "digits", 30)


def base_args(data: str, exp: Path, *extra: str) -> list[str]:
    return [data, "--exp", str(exp), "--size", "64", "--k", "20", "--batch", "32", "--workers", "0",
            "--sobel", "--no_progress", "--checkpoints", "5", *extra]


@pytest.mark.slow
def test_train_then_resume(small_digits, tmp_path):
    exp = tmp_path / "exp"
    assert main.run(base_args(small_digits, exp, "--epochs", "2")) == 0
    ckpt = torch.load(exp / "checkpoint.pth.tar", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["arch"] == "alexnet"
    first = fileio.read_jsonl(exp / "log.jsonl")
    assert [r["epoch"] for r in first] == [0, 1]
    assert first[0]["nmi_prev"] is None and 0 <= first[1]["nmi_prev"] <= 1
    assert all(0 <= r["nmi_labels"] <= 1 for r in first)
    clog = checkpoint.ClusterLog(exp / "clusters")
    assert clog.epochs() == [0, 1]
    np.testing.assert_array_equal(ckpt["last_assignment"].numpy(), clog.load(1))
    # periodic copies: 10 iterations per epoch (300 / 32), one every 5
    assert sorted(p.name for p in (exp / "checkpoints").iterdir()) == [
        f"checkpoint_{i}.pth.tar" for i in range(4)]

    assert main.run(base_args(small_digits, exp, "--epochs", "3", "--resume",
                              str(exp / "checkpoint.pth.tar"))) == 0
    recs = fileio.read_jsonl(exp / "log.jsonl")
    assert [r["epoch"] for r in recs] == [0, 1, 2]
    # NMI against the previous epoch continues across the restart
    assert recs[2]["nmi_prev"] is not None
    labels1, labels2 = clog.load(1), clog.load(2)
    assert recs[2]["nmi_prev"] == pytest.approx(clustering.nmi(labels1, labels2))
    assert clog.epochs() == [0, 1, 2]
    assert torch.load(exp / "checkpoint.pth.tar", weights_only=True)["epoch"] == 3
    # the stored history converts to the original pickle formats
    import pickle
    out = checkpoint.export_clusters_pickle(exp, tmp_path / "clusters.pkl")
    hist = pickle.load(open(out, "rb"))
    assert len(hist) == 3 and sorted(sum(hist[2], [])) == list(range(300))
    model = checkpoint.load_model(exp / "checkpoint.pth.tar")
    assert model.use_sobel and model.top_layer.out_features == 20


@pytest.mark.slow
def test_resume_restores_rng_and_model(small_digits, tmp_path):
    """A 2-epoch run equals 1 epoch + resume for 1 epoch (CPU, fixed seed, no workers)."""
    a, b = tmp_path / "a", tmp_path / "b"
    assert main.run(base_args(small_digits, a, "--epochs", "2")) == 0
    assert main.run(base_args(small_digits, b, "--epochs", "1")) == 0
    assert main.run(base_args(small_digits, b, "--epochs", "2", "--resume", str(b / "checkpoint.pth.tar"))) == 0
    np.testing.assert_array_equal(checkpoint.ClusterLog(a / "clusters").load(1), checkpoint.ClusterLog(b / "clusters").load(1))
    sa = torch.load(a / "checkpoint.pth.tar", weights_only=True)["state_dict"]
    sb = torch.load(b / "checkpoint.pth.tar", weights_only=True)["state_dict"]
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-5, atol=1e-6, msg=k)


def test_rejects_bad_flags(small_digits, tmp_path, capsys):
    for flag, value in [("--lr", "-1"), ("--batch", "0"), ("--k", "0"), ("--momentum", "1.5"),
                        ("--reassign", "0"), ("--checkpoints", "0"), ("--workers", "-2")]:
        with pytest.raises(SystemExit) as e:
            main.run([small_digits, "--exp", str(tmp_path), flag, value])
        assert e.value.code == 2
        assert flag.lstrip("-") in capsys.readouterr().err


def _run_err(argv, capsys) -> str:
    code = main.run(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    return err


def test_missing_and_empty_data_dir(tmp_path, capsys):
    err = _run_err(base_args(str(tmp_path / "nope"), tmp_path / "e1"), capsys)
    assert "does not exist" in err and "nope" in err
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    err = _run_err(base_args(str(tmp_path / "empty"), tmp_path / "e2"), capsys)
    assert "no images" in err


@pytest.mark.parametrize("workers", ["0", "2"])
def test_unreadable_image_is_named(tiny_image_folder, tmp_path, capsys, workers):
    bad = tiny_image_folder / "class1" / "broken.jpg"
    bad.write_bytes(b"this is not a jpeg")
    argv = base_args(str(tiny_image_folder), tmp_path / "exp", "--k", "3", "--epochs", "1")
    argv[argv.index("--workers") + 1] = workers
    err = _run_err(argv, capsys)
    assert "broken.jpg" in err and "unreadable image" in err and "--bad_images skip" in err
    assert "broken.jpg" in (tmp_path / "exp" / "bad_images.txt").read_text()
    # without the up-front check, the first read names the file too
    err = _run_err(argv + ["--check_images", "off"], capsys)
    assert "broken.jpg" in err and "cannot read image" in err


def test_k_larger_than_dataset(tiny_image_folder, tmp_path, capsys):
    err = _run_err(base_args(str(tiny_image_folder), tmp_path / "exp", "--k", "500"), capsys)
    assert "500" in err and "number of images" in err


def test_bad_checkpoints(tiny_image_folder, tmp_path, capsys):
    args = base_args(str(tiny_image_folder), tmp_path / "exp", "--k", "3", "--epochs", "1")
    err = _run_err(args + ["--resume", str(tmp_path / "missing.pth.tar")], capsys)
    assert "missing.pth.tar" in err and "does not exist" in err
    corrupt = tmp_path / "corrupt.pth.tar"
    corrupt.write_bytes(b"\x00garbage" * 100)
    err = _run_err(args + ["--resume", str(corrupt)], capsys)
    assert "corrupt" in err
    import models
    other = tmp_path / "vgg.pth.tar"
    torch.save({"epoch": 1, "arch": "vgg16", "state_dict": models.vgg16(sobel=True, out=3, input_size=32).state_dict()},
               other)
    err = _run_err(args + ["--resume", str(other)], capsys)
    assert "vgg16" in err


def test_crash_while_saving_keeps_previous_checkpoint(tiny_image_folder, tmp_path, monkeypatch, capsys):
    exp = tmp_path / "exp"
    args = base_args(str(tiny_image_folder), exp, "--k", "3", "--checkpoints", "1000")
    assert main.run(args + ["--epochs", "1"]) == 0
    before = (exp / "checkpoint.pth.tar").read_bytes()

    real_save = torch.save

    def dying_save(obj, f, *a, **kw):
        f.write(b"partial")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(checkpoint.CheckpointError, match="No space left"):
        main.main(main.parse_args(args + ["--epochs", "2", "--resume", str(exp / "checkpoint.pth.tar")]))
    monkeypatch.setattr(torch, "save", real_save)
    assert (exp / "checkpoint.pth.tar").read_bytes() == before
    assert not [p for p in exp.iterdir() if p.name.startswith(".tmp")]
    torch.load(exp / "checkpoint.pth.tar", weights_only=True)


def test_demo_defaults_apply_only_without_dir():
    demo = main.parse_args([])
    assert demo.demo and demo.nmb_cluster == main.DEMO_DEFAULTS["nmb_cluster"] and demo.size == 64
    paper = main.parse_args(["somewhere"])
    assert not paper.demo and paper.nmb_cluster == 10000 and paper.size == 224 and paper.lr == 0.05
    assert paper.wd == -5 and paper.batch == 256 and paper.epochs == 200 and paper.seed == 31
    assert paper.checkpoints == 25000 and paper.reassign == 1 and paper.momentum == 0.9
    assert main.parse_args(["--k", "7"]).nmb_cluster == 7
    # fast paths on by default, each with its way back to the original
    assert paper.channels_last and paper.jpeg_draft and paper.pca_solver == "auto"
    off = main.parse_args(["somewhere", "--no-channels_last", "--no-jpeg_draft", "--pca_solver", "exact"])
    assert not off.channels_last and not off.jpeg_draft and off.pca_solver == "exact"


def test_speed_flags_keep_the_clustering(tiny_image_folder, tmp_path):
    """channels-last + float16 feature storage: same partition and loss within 1% of float32."""
    from sklearn.metrics import adjusted_rand_score
    base = [str(tiny_image_folder), "--size", "64", "--k", "3", "--pca", "8", "--batch", "8",
            "--workers", "0", "--epochs", "1", "--no_progress"]
    assert main.run(base + ["--exp", str(tmp_path / "a"), "--no-channels_last"]) == 0
    assert main.run(base + ["--exp", str(tmp_path / "b"), "--channels_last", "--features_dtype", "float16"]) == 0
    la, lb = (fileio.read_jsonl(tmp_path / x / "log.jsonl")[0] for x in "ab")
    assert lb["clustering_loss"] == pytest.approx(la["clustering_loss"], rel=0.01)
    ca, cb = (checkpoint.ClusterLog(tmp_path / x / "clusters").load(0) for x in "ab")
    assert adjusted_rand_score(ca, cb) > 0.9


def test_resume_after_the_image_set_changed(tiny_image_folder, tmp_path, capsys):
    exp = tmp_path / "exp"
    args = [str(tiny_image_folder), "--exp", str(exp), "--size", "64", "--k", "3", "--pca", "8",
            "--batch", "8", "--workers", "0", "--no_progress", "--checkpoints", "1000"]
    assert main.run(args + ["--epochs", "1"]) == 0
    (tiny_image_folder / "class0" / "img000.jpg").unlink()
    assert main.run(args + ["--epochs", "2", "--resume", str(exp)]) == 0
    assert "NMI with the previous epoch restarts" in capsys.readouterr().out
    recs = fileio.read_jsonl(exp / "log.jsonl")
    assert [r["epoch"] for r in recs] == [0, 1] and recs[1]["nmi_prev"] is None


@pytest.mark.parametrize("extra", [["--sampler", "original"], ["--clustering", "PIC"],
                                   ["--arch", "vgg16", "--size", "32"], ["--reassign", "0.5"]])
def test_variants_run_end_to_end(tiny_image_folder, tmp_path, extra):
    exp = tmp_path / "exp"
    args = [str(tiny_image_folder), "--exp", str(exp), "--size", "64", "--k", "3", "--pca", "8",
            "--batch", "8", "--workers", "0", "--epochs", "2", "--no_progress", "--sobel", *extra]
    assert main.run(args) == 0
    recs = fileio.read_jsonl(exp / "log.jsonl")
    assert [r["epoch"] for r in recs] == [0, 1]
    labels = checkpoint.ClusterLog(exp / "clusters").load(1)
    assert len(labels) == 24 and labels.min() >= 0
    ckpt = torch.load(exp / "checkpoint.pth.tar", weights_only=True)
    assert ckpt["arch"] == ("vgg16" if "vgg16" in extra else "alexnet")
    if "--reassign" in extra:
        assert recs[0]["iterations"] == 2  # int(0.5 * 24) = 12 draws, batch 8
    if "PIC" in extra:
        assert recs[1]["n_clusters"] == ckpt["state_dict"]["top_layer.bias"].shape[0]
