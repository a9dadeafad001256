"""Resume after a kill at every fault point, and the checks a resume makes first.

The sweep counts how often each fault point (fileio.fault_point) is reached in an
uninterrupted 2-epoch run, then, for every point and every hit count, stops a run there and
resumes it from its folder: weights, log records and cluster files must equal the
uninterrupted run's, bit for bit. The runs are in-process (the fault raises FaultInjected,
which nothing catches and which leaves temporary files behind as a kill does) with a small
DeepClusterNet, so the ~50 kill/resume pairs take seconds; test_faults.py keeps real SIGKILLs
of the real AlexNet in subprocesses.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import checkpoint
import deepcluster as dc
import main
import fileio
import models
import runfolder
from conftest import make_image_folder

RECORD_KEYS = ("epoch", "clustering_loss", "train_loss", "nmi_prev", "nmi_labels", "n_clusters", "n_empty",
               "iterations")


class SmallNet(models.DeepClusterNet):
    """Conv(8x8, stride 8) body and a narrow fc6; fc7 keeps the 4096-d feature the pipeline expects."""
    arch = "alexnet"


def small_model(args, device):
    features = nn.Sequential(nn.Conv2d(3, 4, 8, stride=8), nn.BatchNorm2d(4), nn.ReLU(inplace=True))
    dim = 4 * (args.size // 8) ** 2
    classifier = nn.Sequential(nn.Dropout(0.5), nn.Linear(dim, 16), nn.ReLU(inplace=True), nn.Dropout(0.5),
                               nn.Linear(16, models.common.FC_DIM), nn.ReLU(inplace=True))
    return SmallNet(features, classifier, args.nmb_cluster, False, True, args.size).to(device)


@pytest.fixture
def small(monkeypatch):
    monkeypatch.setattr(dc, "build_model", small_model)
    monkeypatch.delenv("DEEPCLUSTER_FAULT", raising=False)
    monkeypatch.setenv("DEEPCLUSTER_FAULT_MODE", "raise")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: more threads only add contention
    yield monkeypatch
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def images36(module_tmp) -> str:
    return str(make_image_folder(module_tmp.mktemp("img36") / "images", n_classes=3, per_class=12, size=16))


def argv(images: str, exp: Path, *extra: str) -> list[str]:
    # 36 images, batch 8: 5 iterations an epoch; a periodic copy every 3 iterations
    return [images, "--exp", str(exp), "--size", "64", "--k", "6", "--pca", "16", "--batch", "8",
            "--workers", "0", "--epochs", "2", "--checkpoints", "3", "--no_progress", "--keep_checkpoints", "0",
            "--device", "cpu",
            *extra]  # every periodic copy kept: the tests resume from chosen ones


def run(args: list[str], fault: str | None = None) -> bool:
    """main.main in this process; False when stopped by the injected fault."""
    fileio.FAULT_HITS.clear()
    if fault:
        os.environ["DEEPCLUSTER_FAULT"] = fault
    try:
        main.main(main.parse_args(args))
        return True
    except fileio.FaultInjected:
        return False
    finally:
        os.environ.pop("DEEPCLUSTER_FAULT", None)


def outcome(exp: Path) -> tuple[dict, list[dict], list[np.ndarray]]:
    ck = torch.load(exp / "checkpoint.pth.tar", weights_only=True)
    recs = [{k: r[k] for k in RECORD_KEYS} for r in fileio.read_jsonl(exp / "log.jsonl")]
    clog = checkpoint.ClusterLog(exp / "clusters")
    return ck, recs, [clog.load(e) for e in clog.epochs()]


APPENDED = {"log.jsonl", "train.log", runfolder.HISTORY}  # the only files written in place


def snapshot(exp: Path, dst: Path) -> None:
    """The folder as a kill at this moment leaves it. Every other file is written once (temporary
    file + rename) and never modified, so a hard link is an exact, free copy."""
    def link_or_copy(src, d):
        if Path(src).name in APPENDED:
            return shutil.copy2(src, d)
        os.link(src, d)
    shutil.copytree(exp, dst, copy_function=link_or_copy)


def test_kill_at_every_fault_point_then_resume_equals_uninterrupted(small, images36, tmp_path):
    ref, snaps = tmp_path / "ref", tmp_path / "snaps"

    def kill_here(point: str, hit: int) -> None:
        if ref.exists():
            snapshot(ref, snaps / f"{point}_{hit}")
        else:  # killed before the folder exists: nothing on disk
            (snaps / f"{point}_{hit}").mkdir(parents=True)
    small.setattr(fileio, "FAULT_HOOK", kill_here)
    assert run(argv(images36, ref))
    small.setattr(fileio, "FAULT_HOOK", None)
    hits = dict(fileio.FAULT_HITS)
    # 2 epochs x 5 batches of features and of training, 2 clusterings, 4 periodic + 2 end
    # checkpoints + 1 after epoch 1's clustering (epoch 0's falls on a periodic one), and the
    # small files (args.json, cluster files)
    assert hits["features"] == 10 and hits["train"] == 10 and hits["clustering"] == 2
    assert hits["save"] == 7 and hits["write"] >= 3
    ref_ck, ref_recs, ref_clusters = outcome(ref)
    assert [r["epoch"] for r in ref_recs] == [0, 1] and len(ref_clusters) == 2

    cases = [(p, n) for p in sorted(hits) for n in range(1, hits[p] + 1)]
    assert sorted(p.name for p in snaps.iterdir()) == sorted(f"{p}_{n}" for p, n in cases)
    for point, n in cases:
        exp = snaps / f"{point}_{n}"
        assert run(argv(images36, exp, "--resume", str(exp))), f"{point}:{n}"
        ck, recs, clusters = outcome(exp)
        assert ck["epoch"] == 2, f"{point}:{n}"
        for k, v in ref_ck["state_dict"].items():
            assert torch.equal(v, ck["state_dict"][k]), f"{point}:{n} {k}"
        assert recs == ref_recs, f"{point}:{n}"
        assert len(clusters) == len(ref_clusters), f"{point}:{n}"
        for a, b in zip(ref_clusters, clusters):
            np.testing.assert_array_equal(a, b, err_msg=f"{point}:{n}")
        assert not list(exp.rglob(".tmp-*")), f"{point}:{n}"
        shutil.rmtree(exp)
    assert len(cases) >= 30


def test_injected_fault_stops_the_run_in_process(small, images36, tmp_path):
    """DEEPCLUSTER_FAULT_MODE=raise: the fault raises FaultInjected and leaves the temporary file."""
    exp = tmp_path / "exp"
    assert not run(argv(images36, exp), fault="save:2")
    assert len(list((exp / "checkpoints").glob(".tmp-checkpoint_1.pth.tar-*"))) == 1
    assert run(argv(images36, exp, "--resume", str(exp)))
    assert torch.load(exp / "checkpoint.pth.tar", weights_only=True)["epoch"] == 2


def test_resume_checks_everything_before_touching_the_run(small, images36, tmp_path, capsys):
    exp = tmp_path / "exp"
    assert run(argv(images36, exp))
    before = {p: p.read_bytes() for p in [exp / "log.jsonl", *sorted((exp / "clusters").iterdir())]}
    for extra, words in [(["--k", "5"], ["--k 6", "--change_k"]), (["--size", "72"], ["--size 64"]),
                         (["--sobel"], ["sobel"])]:
        assert main.run(argv(images36, exp, "--epochs", "3", "--resume", str(exp), *extra)) == 2
        out, err = capsys.readouterr()
        assert all(w in err for w in words), err
        assert err.count("error:") == 1 and err.split("error: ")[1].strip() not in out  # printed once
        assert err.split("error: ")[1].strip() in (exp / "train.log").read_text()
        assert {p: p.read_bytes() for p in before} == before
    # a truncated end-of-epoch checkpoint: the folder falls back to the newest periodic copy
    (exp / "checkpoint.pth.tar").write_bytes(b"\x80truncated")
    assert main.run(argv(images36, exp, "--resume", str(exp))) == 0
    assert [r["epoch"] for r in fileio.read_jsonl(exp / "log.jsonl")] == [0, 1]


def test_fresh_run_in_a_used_folder_and_run_ids(small, images36, tmp_path, capsys):
    exp = tmp_path / "exp"
    assert run(argv(images36, exp, "--epochs", "1"))
    assert main.run(argv(images36, exp)) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--resume" in err and "--overwrite" in err
    old_periodic = exp / "checkpoints" / "checkpoint_1.pth.tar"
    assert old_periodic.exists()
    stale, old_id = old_periodic.read_bytes(), runfolder.current_run_id(exp)
    # --overwrite retires the old run (every output, its record too); its copies can no longer be resumed
    assert run(argv(images36, exp, "--epochs", "1", "--checkpoints", "100", "--overwrite", "--seed", "5"))
    assert not old_periodic.exists()
    (exp / "checkpoints" / "checkpoint_9.pth.tar").write_bytes(stale)  # a stale copy put back by hand
    hist = runfolder.read_history(exp)
    assert len(hist) == 1 and hist[-1]["args"]["seed"] == 5 and hist[0]["run_id"] != old_id
    assert checkpoint.find_checkpoint(str(exp), runfolder.current_run_id(exp)) == str(exp / "checkpoint.pth.tar")
    assert "earlier run" in capsys.readouterr().out
    # args history: one line per invocation, each saying where it started
    assert run(argv(images36, exp, "--epochs", "2", "--checkpoints", "100", "--seed", "5", "--resume", str(exp)))
    hist = runfolder.read_history(exp)
    assert [h["start_epoch"] for h in hist] == [0, 1] and hist[1]["args"]["epochs"] == 2
    assert hist[0]["run_id"] == hist[1]["run_id"]
    assert json.loads((exp / "args.json").read_text())["epochs"] == 1  # the flags the run started with
    # a finished run resumed says so and touches nothing
    log_before = (exp / "log.jsonl").read_bytes()
    assert main.run(argv(images36, exp, "--epochs", "2", "--seed", "5", "--resume", str(exp))) == 0
    assert "the run is finished" in capsys.readouterr().out
    assert (exp / "log.jsonl").read_bytes() == log_before and len(runfolder.read_history(exp)) == 2


def test_interrupt_hint_names_what_resume_loads(small, images36, tmp_path, capsys, monkeypatch):
    exp = tmp_path / "exp"
    real = dc.train_step

    def interrupted(*a, **kw):  # Ctrl-C in the first step, after the periodic copy at iteration 0
        def step(i, batch):
            raise KeyboardInterrupt
        return step
    monkeypatch.setattr(dc, "train_step", interrupted)
    assert main.run(argv(images36, exp)) == 130
    err = capsys.readouterr().err
    assert f"--resume {exp} continues from {exp / 'checkpoints' / 'checkpoint_0.pth.tar'}" in err
    monkeypatch.setattr(dc, "train_step", real)
    assert main.run(argv(images36, exp, "--resume", str(exp))) == 0


def test_files_follow_the_umask_and_corrupt_checkpoints_are_named(tmp_path):
    old = os.umask(0o027)
    try:
        fileio.atomic_torch_save({"a": torch.zeros(2)}, tmp_path / "c.pth.tar")
        fileio.atomic_write_text(tmp_path / "t.json", "{}")
    finally:
        os.umask(old)
    assert (tmp_path / "c.pth.tar").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "t.json").stat().st_mode & 0o777 == 0o640
    for junk in (b"\x00garbage" * 50, b"\x89PNG\r\n\x1a\n" + bytes(100)):
        (tmp_path / "bad.pth.tar").write_bytes(junk)
        with pytest.raises(checkpoint.CheckpointError) as e:
            checkpoint.torch_load(tmp_path / "bad.pth.tar")
        assert "is not a checkpoint" in str(e.value) and "weights_only" not in str(e.value)


def test_invalid_dir_creates_no_experiment_folder(tmp_path, capsys):
    assert main.run([str(tmp_path / "nope"), "--exp", str(tmp_path / "exp")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "exp").exists()


def test_export_clusters_pickle_into_exp(tmp_path):
    exp = tmp_path / "exp"
    checkpoint.ClusterLog(exp / "clusters").save(0, np.array([0, 1, -1, 1]), 2)
    out = checkpoint.export_clusters_pickle(exp, "clusters.pkl", image_paths=["a", "b", "c", "d"])
    assert Path(out) == exp / "clusters.pkl"
    import pickle
    assert pickle.load(open(out, "rb")) == [("a", 0), ("b", 1), ("d", 1)]  # "c" was unreadable
    with pytest.raises(ValueError, match="3 entries"):
        checkpoint.export_clusters_pickle(exp, "x.pkl", image_paths=["a", "b", "c"])


def corrupt_later(monkeypatch, epoch: int, draw: int) -> dict:
    """Just before epoch ``epoch``'s training (after its features), make the image of its
    ``draw``-th draw unreadable; returns {"path", "bytes"} of that image as it was."""
    real, hit = dc.make_train_loader, {}

    def loader(dataset, images_lists, draws, ep, *a, **kw):
        if ep == epoch:
            hit["path"] = path = Path(dataset.paths[int(draws[draw])])
            hit["bytes"] = path.read_bytes()
            path.write_bytes(b"truncated")
        return real(dataset, images_lists, draws, ep, *a, **kw)
    monkeypatch.setattr(dc, "make_train_loader", loader)
    return hit


def test_bad_images_met_mid_run_are_skipped(small, images36, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(images36, images)
    early = images / "class0" / "img003.jpg"
    early.write_bytes(b"not a jpeg")  # past a header-only check: met in feature extraction
    hit = corrupt_later(small, epoch=0, draw=3)  # readable for the features, not in training
    exp = tmp_path / "exp"
    assert run(argv(str(images), exp, "--check_images", "off", "--bad_images", "skip"))
    late = hit["path"]
    listing = (exp / "bad_images.txt").read_text()
    assert f"{early}\tmet during feature extraction" in listing and f"{late}\tmet in training" in listing
    ds = data_paths(images)
    labels0, labels1 = (checkpoint.ClusterLog(exp / "clusters").load(e) for e in (0, 1))
    assert labels0[ds.index(str(early))] == -1 and labels0[ds.index(str(late))] >= 0
    assert labels1[ds.index(str(late))] == -1  # unreadable by epoch 1's features
    assert (np.delete(labels1, [ds.index(str(early)), ds.index(str(late))]) >= 0).all()
    recs = fileio.read_jsonl(exp / "log.jsonl")
    assert [r["epoch"] for r in recs] == [0, 1] and all(np.isfinite(r["train_loss"]) for r in recs)


def data_paths(images: Path) -> list[str]:
    import data
    return data.IndexedImageFolder(str(images)).paths


def test_bad_image_in_training_stops_after_a_resumable_checkpoint(small, images36, tmp_path, capsys):
    ref = tmp_path / "ref"
    assert run(argv(images36, ref))
    images = tmp_path / "images"
    shutil.copytree(images36, images)
    hit = corrupt_later(small, epoch=1, draw=12)  # the second batch of epoch 1
    exp = tmp_path / "exp"
    assert main.run(argv(str(images), exp)) == 2
    err = capsys.readouterr().err
    assert str(hit["path"]) in err and "--resume" in err and err.count("error:") == 1
    stopped = torch.load(exp / "checkpoints" / "checkpoint_stopped.pth.tar", weights_only=True)
    assert stopped["epoch"] == 1 and stopped["iteration"] == 1 and "mid_epoch" in stopped
    hit["path"].write_bytes(hit["bytes"])
    small.undo()
    small.setattr(dc, "build_model", small_model)
    assert run(argv(str(images), exp, "--resume", str(exp)))
    ck, recs, clusters = outcome(exp)
    ref_ck, ref_recs, ref_clusters = outcome(ref)
    assert recs == ref_recs
    for k, v in ref_ck["state_dict"].items():
        assert torch.equal(v, ck["state_dict"][k]), k


def test_honest_messages_for_odd_requests(small, images36, tmp_path, capsys):
    exp = tmp_path / "exp"
    assert main.run(argv(images36, exp, "--epochs", "0")) == 0
    assert "nothing to train" in capsys.readouterr().out and not (exp / "checkpoint.pth.tar").exists()
    assert main.run(argv(images36, exp, "--k", "1", "--epochs", "1", "--checkpoints", "100")) == 0
    assert "--k 1 puts every image in one cluster" in capsys.readouterr().out


def test_too_small_sizes_are_refused_with_the_reason(tmp_path, capsys):
    import importlib.util

    import eval_linear
    m = models.alexnet(out=3, input_size=64)
    torch.save({"arch": "alexnet", "state_dict": m.state_dict(), "model_config": m.config()}, tmp_path / "m.pth.tar")
    images = make_image_folder(tmp_path / "images", n_classes=2, per_class=2, size=16)
    script = Path(main.__file__).parent / "visu" / "activ-retrieval.py"
    spec = importlib.util.spec_from_file_location("activ_retrieval", script)
    ar = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ar)
    assert ar.cli.run_cli(ar.main, ar.get_args_parser(), [
        "--model", str(tmp_path / "m.pth.tar"), "--data", str(images), "--conv", "5", "--size", "16",
        "--exp", str(tmp_path / "ar"), "--workers", "0"]) != 0
    err = capsys.readouterr().err
    assert "--size 16 is too small for conv5" in err and "Traceback" not in err
    assert eval_linear.run(["--data", str(images), "--model", str(tmp_path / "m.pth.tar"), "--conv", "1",
                            "--size", "16", "--exp", str(tmp_path / "el")]) != 0
    assert "--size: 16 (must be >= 32" in capsys.readouterr().err


@pytest.mark.parametrize("saved_by", ["per_tensor", "fused", "original_release"])
@pytest.mark.parametrize("now_fused", [True, False])
def test_optimizer_state_restores_momentum_but_keeps_this_runs_kernel(saved_by, now_fused):
    """The saved param_groups carry the writer's fused/foreach flags (none in the original's
    checkpoints): the momentum comes back, the kernel stays the one this run chose."""
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(5, 3)), nn.Parameter(torch.randn(5))]
    writer = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-5, fused=saved_by == "fused")
    for p in params:
        p.grad = torch.randn_like(p)
    writer.step()
    state = writer.state_dict()
    if saved_by == "original_release":   # PyTorch 0.x wrote no kernel flags
        for g in state["param_groups"]:
            g.pop("fused", None), g.pop("foreach", None), g.pop("differentiable", None), g.pop("maximize", None)
    reader = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-5, fused=now_fused)
    checkpoint.load_optimizer(reader, state)
    assert bool(reader.param_groups[0]["fused"]) == now_fused
    for p in params:
        assert torch.equal(reader.state[p]["momentum_buffer"], writer.state[p]["momentum_buffer"])
    reader.step()   # runs with the kept flags
