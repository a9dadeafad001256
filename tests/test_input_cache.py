"""The feature pass's input cache (input_cache.py): the same batches as decoding, bitwise, in every
state the cache can be in; what invalidates it; a kill while writing; 2 processes under torchrun."""
from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Subset

import data
import fileio
import input_cache
from test_resume import images36, small  # noqa: F401 (fixtures)

ROOT = Path(__file__).resolve().parents[1]
SIZE = 32


@pytest.fixture(scope="module")
def photos(module_tmp) -> Path:
    """14 JPEGs in 2 class folders, sizes around the resize target (some >= 2x: --jpeg_draft
    decodes those at reduced size), and a PNG."""
    root = module_tmp.mktemp("photos") / "images"
    shapes = [(40, 50), (75, 90), (90, 130), (37, 37), (120, 80), (64, 96), (100, 100)]
    for c in range(2):
        (root / f"c{c}").mkdir(parents=True)
        for k, (h, w) in enumerate(shapes):
            data.synthetic_photo(h, w, 10 * c + k).save(root / f"c{c}" / f"p{k}.jpg", quality=90)
    data.synthetic_photo(50, 60, 99).save(root / "c1" / "z.png")
    return root


def folder(root: Path, size: int = SIZE, draft: bool = True) -> data.IndexedImageFolder:
    return data.IndexedImageFolder(root, transform=data.eval_transform(size, normalize=False),
                                   draft=data.eval_resize(size) if draft else None)


def decoded(ds, batch: int, rank: int = 0, world: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Today's feature loader, the reference: DataLoader over the rank's Subset."""
    part = ds if world == 1 else Subset(ds, range(rank, len(ds), world))
    return list(data.make_loader(part, batch, 0, torch.device("cpu")))


def through(loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), i.clone()) for x, i in loader]


def assert_same(a, b) -> None:
    assert len(a) == len(b)
    for (xa, ia), (xb, ib) in zip(a, b):
        assert xa.dtype == xb.dtype == torch.uint8 and torch.equal(xa, xb) and torch.equal(ia, ib)


def make(ds, cache: Path, batch: int = 4, rank: int = 0, world: int = 1, size: int = SIZE, workers: int = 0):
    return input_cache.feature_loader(ds, batch, workers, torch.device("cpu"), size, rank, world, cache)


def shard_of(loader) -> Path:
    return loader.shard


def test_passes_equal_decoding_bitwise_and_the_second_reads(photos, tmp_path):
    ds = folder(photos)
    ref = decoded(ds, 4)
    loader = make(ds, tmp_path / "cache", workers=1)  # through a worker process: shared-memory batches
    assert_same(through(loader), ref)
    assert loader.last_mode == "write" and shard_of(loader).name == "w1-r0.bin"
    size = shard_of(loader).stat().st_size
    assert size > len(ds) * (3 * SIZE * SIZE + input_cache.META_BYTES)  # + the header
    for batch in (4, 5):  # a later pass, with another batch size too
        again = make(ds, tmp_path / "cache", batch=batch)
        assert_same(through(again), decoded(ds, batch))
        assert again.last_mode == "read"
    assert not list((tmp_path / "cache").rglob(".tmp-*"))


def damage(shard: Path, where: str) -> None:
    raw = bytearray(shard.read_bytes())
    if where == "pixels":
        raw[3 * SIZE * SIZE * 5 + 17] ^= 0xFF  # image 5
    elif where == "index":
        n = len(raw)
        header_len = int.from_bytes(raw[n - 16:n - 8], "little")
        count = (n - 16 - header_len) // (3 * SIZE * SIZE + input_cache.META_BYTES)
        raw[count * 3 * SIZE * SIZE + 8 * 2] ^= 0x01  # image 2's index
    elif where == "truncated":
        raw = raw[: len(raw) // 2]
    elif where == "end marker":
        raw[-1] ^= 0xFF
    shard.write_bytes(bytes(raw))


# (what is done to the cache or the images, the log's reason, whether the pass itself reads the cache)
CASES = [
    ("pixels", "checksum mismatch", True),
    ("index", "index 3 where 2 was expected", True),
    ("truncated", "damaged or incomplete", False),
    ("end marker", "damaged or incomplete", False),
    ("touched", "changed since the cache was written", True),
    ("rewritten", "changed since the cache was written", True),
    ("added image", "the file list changed", False),
    ("removed image", "the file list changed", False),
    ("size", "the image size changed (32 -> 40 px)", False),
    ("transform", "the transform changed", False),
    ("left by a kill", "", False),
]


@pytest.mark.parametrize("case,reason,reads", CASES, ids=[c[0] for c in CASES])
def test_every_invalidation_is_said_and_the_batches_stay_equal(photos, tmp_path, caplog, case, reason, reads):
    """Each change makes the pass decode what no longer fits (the same batches as without the
    cache, bitwise), says why, and the next pass writes the shard anew and reads equal batches."""
    images = tmp_path / "images"
    shutil.copytree(photos, images)
    cache = tmp_path / "cache"
    first = make(folder(images), cache)
    through(first)
    shard = shard_of(first)
    size, draft = SIZE, True
    victim = images / "c0" / "p3.jpg"
    if case in ("pixels", "index", "truncated", "end marker"):
        damage(shard, case)
    elif case == "touched":
        st = victim.stat()
        os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    elif case == "rewritten":  # other pixels, same size and mtime are not detectable: a real edit moves both
        data.synthetic_photo(37, 37, 123).save(victim, quality=70)
    elif case == "added image":
        data.synthetic_photo(60, 60, 7).save(images / "c1" / "new.jpg", quality=90)
    elif case == "removed image":
        victim.unlink()
    elif case == "size":
        size = 40
    elif case == "transform":
        draft = False
    elif case == "left by a kill":  # a temporary shard of a dead writer, and no shard
        tmp = shard.parent / f".tmp-{shard.name}~{os.uname().nodename}~999999999~0~x"
        shutil.move(shard, tmp)
    ds = folder(images, size, draft)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="deepcluster"):
        loader = make(ds, cache, size=size)
        assert_same(through(loader), decoded(ds, 4))
    assert loader.last_mode == ("read" if reads else "write")
    text = caplog.text
    if reason:
        assert reason in text and str(shard) in text, text
    if reads:  # found while reading: the shard is dropped, the next pass writes it
        assert "rebuilt at the next pass" in text and not shard.exists()
        loader = make(ds, cache, size=size)
        assert_same(through(loader), decoded(ds, 4))
        assert loader.last_mode == "write"
    loader = make(ds, cache, size=size)
    assert_same(through(loader), decoded(ds, 4))
    assert loader.last_mode == "read" and not list(cache.rglob(".tmp-*"))


def test_unreadable_images_are_never_served_from_the_cache(photos, tmp_path):
    """--bad_images skip: an unreadable image is a black stand-in with index -1 - i; cached or not,
    the pass gives the same, and a fixed image is then read from its file."""
    images = tmp_path / "images"
    shutil.copytree(photos, images)
    bad = images / "c1" / "p2.jpg"
    good = bad.read_bytes()
    bad.write_bytes(good[:40])
    ds = folder(images)
    ds.mark_unreadable = True
    loader = make(ds, tmp_path / "cache")
    got = through(loader)
    assert_same(got, decoded(ds, 4))
    assert (torch.cat([i for _, i in got]) < 0).sum() == 1
    assert_same(through(make(ds, tmp_path / "cache")), decoded(ds, 4))
    bad.write_bytes(good)
    assert_same(through(make(ds, tmp_path / "cache")), decoded(ds, 4))


def test_shards_per_rank_and_a_change_of_world_size(photos, tmp_path, caplog):
    """Rank r of W reads images r, r + W, ... (today's Subset) from w{W}-r{r}.bin only; 3 ranks
    after 2: the old shards are removed (once each) and the new ones written, batches equal."""
    ds = folder(photos)
    cache = tmp_path / "cache"
    for world in (2, 3):
        with caplog.at_level(logging.INFO, logger="deepcluster"):
            for rank in range(world):
                loader = make(ds, cache, 3, rank, world)
                assert_same(through(loader), decoded(ds, 3, rank, world))
                assert loader.last_mode == "write"
                assert len(loader.dataset) == len(range(rank, len(ds), world))
        names = sorted(p.name for p in loader.folder.iterdir())
        assert names == [f"w{world}-r{r}.bin" for r in range(world)]
    assert "removed 1 shard(s) of another number of processes" in caplog.text  # ranks 0 and 1 of 3
    for rank in range(3):  # and reading them
        loader = make(ds, cache, 3, rank, 3)
        assert_same(through(loader), decoded(ds, 3, rank, 3))
        assert loader.last_mode == "read"


def test_over_budget_decodes_and_says_why(photos, tmp_path, caplog, monkeypatch):
    ds = folder(photos)
    need = len(ds) * (3 * SIZE * SIZE + input_cache.META_BYTES) + 4096
    # one byte short of the shard + the reserve (2 GiB: 5% of a 10 GiB disk is less)
    monkeypatch.setattr(input_cache, "disk_space", lambda p: ((2 << 30) + need - 1, 10 << 30))
    with caplog.at_level(logging.INFO, logger="deepcluster"):
        loader = make(ds, tmp_path / "cache")
        assert_same(through(loader), decoded(ds, 4))
    assert loader.last_mode == "decode" and not list((tmp_path / "cache").rglob("*.bin"))
    assert "not written" in caplog.text and "reserve" in caplog.text
    monkeypatch.setattr(input_cache, "disk_space", lambda p: ((2 << 30) + need, 10 << 30))
    loader = make(ds, tmp_path / "cache")
    through(loader)
    assert loader.last_mode == "write"


def test_resolve_the_flag(tmp_path, monkeypatch, caplog):
    assert input_cache.resolve("off", tmp_path) is None
    assert input_cache.resolve("auto", tmp_path / "exp") == tmp_path.absolute() / "exp" / "input_cache"
    assert input_cache.resolve(str(tmp_path / "c"), tmp_path / "exp") == tmp_path / "c"
    assert input_cache.filesystem_type("/proc/self") == "proc"
    monkeypatch.setattr(input_cache, "filesystem_type", lambda p: "nfs4")
    with caplog.at_level(logging.INFO, logger="deepcluster"):
        assert input_cache.resolve("auto", tmp_path / "nfs_exp") is None
    assert "network file system (nfs4)" in caplog.text


KILLED = """import os, sys
sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
import torch, fileio, input_cache
from test_input_cache import folder, make
from pathlib import Path
for imgs, idx in make(folder(Path({images!r})), Path({cache!r})):
    fileio.fault_point("features")  # as main.compute_features
"""


def test_killed_while_writing_leaves_no_shard_and_the_next_pass_rebuilds(photos, tmp_path):
    """SIGKILL in the middle of the pass: only a temporary file remains, never read; the next pass
    writes the shard and removes it. (A kill at every other point, the one between the shard's
    last byte and its rename included, is swept in process by test_resume.py.)"""
    fault = "features:2"
    script = tmp_path / "killed.py"
    script.write_text(KILLED.format(root=str(ROOT), tests=str(ROOT / "tests"), images=str(photos),
                                    cache=str(tmp_path / "cache")))
    res = subprocess.run([sys.executable, str(script)], env=dict(os.environ, DEEPCLUSTER_FAULT=fault),
                         stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    assert not list((tmp_path / "cache").rglob("*.bin")) and len(list((tmp_path / "cache").rglob(".tmp-*"))) == 1
    ds = folder(photos)
    loader = make(ds, tmp_path / "cache")
    assert_same(through(loader), decoded(ds, 4))
    assert loader.last_mode == "write" and not list((tmp_path / "cache").rglob(".tmp-*"))
    again = make(ds, tmp_path / "cache")
    assert_same(through(again), decoded(ds, 4))
    assert again.last_mode == "read"


def test_knn_monitor_reads_the_cache_and_gives_the_same_values(tmp_path):
    """Images over the monitor's memory budget: decoded once into the cache, read afterwards; the
    same accuracies as decoding every time (and as the images kept in memory)."""
    import knn
    import models
    from conftest import make_split_folder

    root = make_split_folder(tmp_path / "knn", train_per_class=4, val_per_class=2, size=40)
    model = models.alexnet(sobel=True, out=3, input_size=64)
    kw = dict(seed=3, size=64, batch=4)
    plain = knn.KnnMonitor(str(root), 12, 6, cache_mb=0, **kw)
    memory = knn.KnnMonitor(str(root), 12, 6, **kw)
    cached = knn.KnnMonitor(str(root), 12, 6, cache_mb=0, input_cache=tmp_path / "cache", **kw)
    want = plain.evaluate(model, torch.device("cpu"))
    assert plain.loader.last_mode == "decode" and memory.images is not None
    for monitor, mode in ((memory, "decode"), (cached, "write"), (cached, "read")):
        got = monitor.evaluate(model, torch.device("cpu"))
        assert (got["knn_top1"], got["knn_top5"]) == (want["knn_top1"], want["knn_top5"])
        assert monitor.loader.last_mode == mode
    assert [p.name for p in (tmp_path / "cache").iterdir()][0].startswith("knn-knn-")


def test_main_with_and_without_the_cache_and_a_resume_are_bitwise_equal(small, images36, tmp_path):
    """main.py, one process: 2 epochs with the cache (the second reads it) and with --input_cache
    off, then both resumed for a third: the same weights, clusters and log, bitwise."""
    from test_resume import argv, outcome, run

    cached, plain = tmp_path / "cached", tmp_path / "plain"
    for exp, extra in ((cached, ()), (plain, ("--input_cache", "off"))):
        assert run(argv(images36, exp, *extra))
        assert run(argv(images36, exp, "--epochs", "3", "--resume", str(exp)))
    assert [p.name for p in (cached / "input_cache").rglob("*.bin")] == ["w1-r0.bin"]
    assert not (plain / "input_cache").exists()
    (ca, ra, la), (cb, rb, lb) = outcome(cached), outcome(plain)
    assert ca["epoch"] == cb["epoch"] == 3 and ra == rb and len(la) == len(lb) == 3
    assert all(torch.equal(v, cb["state_dict"][k]) for k, v in ca["state_dict"].items())
    assert all(np.array_equal(x, y) for x, y in zip(la, lb))
    assert (cached / "train.log").read_text().count("input cache: writing") == 1  # the resumed run read it


# ---------------------------------------------------------------------------------------
# main.py under torchrun: 2 processes with and without the cache
# ---------------------------------------------------------------------------------------
SPY = """import sys
sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
import deepcluster, main
from test_resume import small_model
deepcluster.build_model = small_model  # a small network: the test is about the data path
sys.exit(main.run(sys.argv[1:]))
"""


def run_spy(nproc: int, argv: list[str], tmp_path: Path) -> None:
    from test_distributed import free_port
    spy = tmp_path / "spy_main.py"
    spy.write_text(SPY.format(root=str(ROOT), tests=str(ROOT / "tests")))
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", str(spy), *argv]
    res = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), stdin=subprocess.DEVNULL,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


@pytest.mark.slow
def test_torchrun_two_processes_with_and_without_the_cache(photos, tmp_path):
    """2 gloo processes, 2 epochs (the second reads each rank's shard), with the cache and with
    --input_cache off: the same weights, clusters and losses, bitwise. (A resume on another number
    of processes rebuilds the shards: test_shards_per_rank_and_a_change_of_world_size; main.py
    does it in test_sharded.py and test_distributed.py, whose runs use the cache by default.)"""
    import checkpoint

    def argv(exp: Path, *extra: str) -> list[str]:
        return [str(photos), "--exp", str(exp), "--size", "64", "--k", "4", "--pca", "8", "--batch", "4",
                "--workers", "0", "--epochs", "2", "--no_progress", "--device", "cpu", "--checkpoints", "1000",
                "--cluster_backend", "torch", *extra]
    cached, plain = tmp_path / "cached", tmp_path / "plain"
    run_spy(2, argv(cached), tmp_path)
    run_spy(2, argv(plain, "--input_cache", "off"), tmp_path)
    shards = sorted(p.name for p in (cached / "input_cache").rglob("*.bin"))
    assert shards == ["w2-r0.bin", "w2-r1.bin"] and not (plain / "input_cache").exists()
    a = torch.load(cached / "checkpoint.pth.tar", weights_only=True)
    b = torch.load(plain / "checkpoint.pth.tar", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    ca, cb = checkpoint.ClusterLog(cached / "clusters"), checkpoint.ClusterLog(plain / "clusters")
    assert ca.epochs() == cb.epochs() == [0, 1]
    for e in ca.epochs():
        np.testing.assert_array_equal(ca.load(e), cb.load(e))
    la, lb = fileio.read_jsonl(cached / "log.jsonl"), fileio.read_jsonl(plain / "log.jsonl")
    assert [r["world_size"] for r in la] == [2, 2]
    for ra, rb in zip(la, lb):
        assert (ra["clustering_loss"], ra["train_loss"], ra["nmi_prev"]) == \
            (rb["clustering_loss"], rb["train_loss"], rb["nmi_prev"])
