"""The training pass's loader (train_crops.py), --workers' default, and --decode gpu's batch and
device decoder (gpu_decode.py), checked on CPU; the decoder's stream safety also on CUDA."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import clustering
import data
import distributed
import gpu_decode
import deepcluster as dc
import main
import train_crops
import util


@pytest.fixture(scope="module")
def photos(module_tmp):
    """JPEGs of several sizes (one 4x a 32 px crop: cpu_draft reduces it), grey and progressive
    JPEGs and a PNG, in 2 class folders."""
    root = module_tmp.mktemp("photos") / "images"
    for c, items in enumerate([[(61, 97), (150, 200)], [(333, 250), (48, 300)]]):
        (root / f"c{c}").mkdir(parents=True)
        for k, (h, w) in enumerate(items):
            data.synthetic_photo(h, w, 10 * c + k).save(root / f"c{c}" / f"p{k}.jpg", quality=90)
    data.synthetic_photo(120, 90, 5).convert("L").save(root / "c0" / "grey.jpg", quality=90)
    data.synthetic_photo(100, 130, 6).save(root / "c1" / "prog.jpg", quality=90, progressive=True)
    data.synthetic_photo(70, 80, 7).save(root / "c1" / "flat.png")
    return root


def reference_loader(ds, lists, draws, size, batch):
    """Today's training loader: train_transform(normalize=False) per image, the default collate."""
    train = clustering.cluster_assign(lists, ds, data.train_transform(size, 0.08, normalize=False))
    sampler = util.SeededShardSampler(draws, base_seed=31 * 100_003)
    return DataLoader(train, batch_size=batch, sampler=sampler)


@pytest.mark.parametrize("workers", [0, 1])
def test_training_batches_equal_the_per_image_tensors_bitwise(photos, tmp_path, workers):
    """deepcluster.make_train_loader (PIL crops collated into one channels-last uint8 batch) == PILToTensor
    per image + torch.stack, value for value; data.to_model_input gives both the same float batch
    in the layout the network asks for."""
    ds = data.IndexedImageFolder(photos)
    lists = [[0, 1, 2], [3, 4, 5, 6]]
    draws = np.array([6, 0, 3, 3, 5, 1, 2, 4, 0, 5, 6, 1])
    args = main.parse_args([str(photos), "--size", "40", "--arch", "vgg16", "--batch", "4", "--workers", str(workers),
                            "--seed", "31", "--exp", str(tmp_path)])
    got = list(dc.make_train_loader(ds, lists, draws, 0, args, distributed.Runtime()))
    want = list(reference_loader(ds, lists, draws, 40, 4))
    assert len(got) == len(want) == 3
    for (x, y, i), (rx, ry, ri) in zip(got, want):
        assert x.shape == rx.shape == (4, 3, 40, 40) and x.dtype == torch.uint8
        assert torch.equal(x, rx) and torch.equal(y, ry) and torch.equal(i, ri)
        assert x.is_contiguous(memory_format=torch.channels_last)  # the (B, H, W, 3) buffer
        for cl in (True, False):
            a, b = data.to_model_input(x, torch.device("cpu"), cl), data.to_model_input(rx, torch.device("cpu"), cl)
            fmt = torch.channels_last if cl else torch.contiguous_format
            assert torch.equal(a, b) and a.is_contiguous(memory_format=fmt) and b.is_contiguous(memory_format=fmt)


def test_draft_crop_draws_the_same_law_and_reduces_only_large_crops(photos, monkeypatch):
    """--decode cpu_draft: the default path's box and flip for a seed; a crop < 2x the output is
    bitwise the default's; a reduced one is decoded at 1/s and stays close to the full decode."""
    ds = data.IndexedImageFolder(photos)
    enc = gpu_decode.EncodedImages(ds)
    size = 32
    crop = train_crops.DraftCrop(size, 0.08)
    assert [crop.reduction(w, h) for w, h in ((20, 10), (63, 300), (64, 64), (130, 128), (256, 300), (600, 255))] \
        == [1, 1, 2, 4, 8, 4]
    drafts = []
    real = data.load_rgb
    monkeypatch.setattr(data, "load_rgb", lambda p, draft=None: drafts.append(draft) or real(p, draft))
    reduced = same = 0
    for idx in range(len(ds)):
        for seed in range(6):
            ref = clustering._apply(train_crops.train_crops(size, 0.08), ds.load(idx), seed)
            drafts.clear()
            got = clustering._apply(crop, enc.load(idx), seed)
            assert got.size == ref.size == (size, size)
            a, b = np.asarray(got).astype(int), np.asarray(ref).astype(int)
            if drafts[-1] is None or not ds.paths[idx].endswith(".jpg"):
                assert np.array_equal(a, b)
                same += 1
            elif not np.array_equal(a, b):  # a scaled decode: other pixels, same region and flip
                reduced += 1
                assert np.abs(a - b).mean() < 12, ds.paths[idx]
    assert reduced >= 5 and same >= 10


def test_cpu_draft_loader_serves_the_same_images_and_labels(photos, tmp_path):
    ds = data.IndexedImageFolder(photos)
    lists = [[0, 1, 2], [3, 4, 5, 6]]
    draws = np.array([6, 0, 3, 3, 5, 1, 2, 4])
    out = {}
    for mode in ("cpu", "cpu_draft"):
        args = main.parse_args([str(photos), "--size", "32", "--arch", "vgg16", "--batch", "4", "--workers", "0",
                                "--decode", mode, "--exp", str(tmp_path)])
        out[mode] = list(dc.make_train_loader(ds, lists, draws, 0, args, distributed.Runtime()))
    for (a, ya, ia), (b, yb, ib) in zip(out["cpu"], out["cpu_draft"]):
        assert a.shape == b.shape and torch.equal(ya, yb) and torch.equal(ia, ib)
        assert (a.int() - b.int()).abs().float().mean() < 12


def test_workers_default_from_the_cores_and_local_processes(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)))
    for local, want in ((None, 15), ("1", 15), ("4", 3), ("8", 1), ("32", 1)):
        if local is None:
            monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
        else:
            monkeypatch.setenv("LOCAL_WORLD_SIZE", local)
        assert data.default_workers() == want
        assert main.parse_args(["d"]).workers == want and main.parse_args(["d", "--workers", "6"]).workers == 6
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0})
    assert data.default_workers() == 1


# ---------------------------------------------------------------------------------------
# --decode gpu
# ---------------------------------------------------------------------------------------
def samples_of(photos, size: int, seed0: int = 0):
    ds = data.IndexedImageFolder(photos)
    enc, crop = gpu_decode.EncodedImages(ds), gpu_decode.EncodedCrop(size)
    return [clustering._apply(crop, enc.load(i), seed0 + i) for i in range(len(ds))]


def one_by_one(samples, size: int) -> torch.Tensor:
    """The unpacked reference: each JPEG decoded alone, cropped, resized and flipped."""
    from torchvision.io import ImageReadMode, decode_jpeg
    out = []
    for s in samples:
        if s.box is None:
            out.append(s.data)
        else:
            img = decode_jpeg(s.data, mode=ImageReadMode.RGB)
            out.append(gpu_decode.crop_resize_flip(img, s.box, size))
    return torch.stack(out)


def test_encoded_batch_is_three_tensors_through_a_worker(photos):
    """The batch crosses the worker's shared memory as two tensors, the JPEGs' bytes end to end and
    the stacked non-JPEG crops (not a tensor per image), and decodes to the same images."""
    samples = samples_of(photos, 40)
    batch = gpu_decode.EncodedBatch(samples, 40)
    jpeg = [k for k, s in enumerate(samples) if s.box is not None]
    assert batch.jpeg == jpeg and len(batch.other) == len(samples) - len(jpeg) == 2
    assert batch.raw.dtype == torch.uint8 and batch.raw.numel() == sum(samples[k].data.numel() for k in jpeg)
    assert batch.offsets[-1] == batch.raw.numel() and batch.crops.shape == (2, 3, 40, 40)
    assert [k for k, v in vars(batch).items() if isinstance(v, torch.Tensor)] == ["raw", "crops"]
    want = one_by_one(samples, 40)
    assert torch.equal(batch.decode(torch.device("cpu")), want)

    class Prebuilt(torch.utils.data.Dataset):
        def __len__(self):
            return 1

        def __getitem__(self, i):
            return [(s, 0, k) for k, s in enumerate(samples)]
    loader = DataLoader(Prebuilt(), batch_size=None, num_workers=1, collate_fn=gpu_decode.CollateEncoded(40))
    (got, labels, idx), = list(loader)
    assert got.raw.is_shared() and got.crops.is_shared() and idx.tolist() == list(range(len(samples)))
    assert torch.equal(got.decode(torch.device("cpu")), want)


class FakeStream:
    def __init__(self, name, log):
        self.name, self.log = name, log

    def wait_stream(self, other):
        self.log.append(("wait", self.name, other.name))


class FakeImage:
    def __init__(self, log, current):
        self.log, self.alloc_stream = log, current

    def record_stream(self, stream):
        self.log.append(("record", self.alloc_stream, stream.name))


def test_device_decoder_allocates_on_a_side_stream_and_records_the_callers(monkeypatch):
    """The CUDA call pattern of gpu_decode.decode_jpegs, with torch.cuda's stream API replaced by
    fakes that log: the decoder runs (and allocates its outputs) with the side stream current; the
    caller's stream waits for it; every output is marked used by the caller's stream; no host
    synchronisation."""
    import contextlib
    log, current = [], ["main"]
    main_stream = FakeStream("main", log)
    monkeypatch.setattr(gpu_decode, "_SIDE_STREAMS", {})
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: main_stream)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: FakeStream("side", log))

    @contextlib.contextmanager
    def stream(s):
        current.append(s.name)
        yield
        current.pop()
    monkeypatch.setattr(torch.cuda, "stream", stream)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: log.append(("sync",)))

    def fake_decode(raws, device, paths):
        log.append(("decode", current[-1]))
        return [FakeImage(log, current[-1]) for _ in raws]
    monkeypatch.setattr(gpu_decode, "_decode", fake_decode)
    dev = torch.device("cuda", 0)
    for _ in range(2):  # the side stream is made once per device
        log.clear()
        imgs = gpu_decode.decode_jpegs([torch.zeros(3, dtype=torch.uint8)] * 3, dev, ["a", "b", "c"])
        assert len(imgs) == 3
        assert log == [("decode", "side"), ("wait", "main", "side"), *[("record", "side", "main")] * 3]
    assert list(gpu_decode._SIDE_STREAMS) == [dev]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_decoder_never_writes_memory_queued_kernels_still_read(photos):
    """On the GPU: tensors freed while reductions over them are still queued behind a long kernel
    are where the caching allocator puts the next allocation of the caller's stream; the decoder
    must not write there. The reductions must read what was written before, and the decoded
    images equal a decode made on an idle GPU."""
    dev = torch.device("cuda", 0)
    samples = [s for s in samples_of(photos, 64) if s.box is not None]
    raws, paths = [s.data for s in samples], [s.path for s in samples]
    calm = [x.clone() for x in gpu_decode.decode_jpegs(raws, dev, paths)]
    torch.cuda.synchronize(dev)
    bad = 0
    for it in range(50):
        # under 1 MB each: the allocator's small pool, where decoded images of this size come from
        blocks = [torch.full((3, 200, 200), float(k + 1), device=dev) for k in range(16)]
        torch.cuda.synchronize(dev)
        torch.cuda._sleep(20_000_000)  # ~10 ms of queued work ahead of the reductions
        sums = [b.sum() for b in blocks]
        del blocks  # freed on the host while the reductions are queued
        imgs = gpu_decode.decode_jpegs(raws, dev, paths)
        torch.cuda.synchronize(dev)
        bad += sum(float(s) != float(k + 1) * 3 * 200 * 200 for k, s in enumerate(sums))
        assert all(torch.equal(a, b) for a, b in zip(imgs, calm)), it
    assert bad == 0


def test_bench_loader_quick(tmp_path):
    """benchmarks/bench_loader.py at its smallest: every number present, positive and finite (speed
    itself is never asserted), the cached and the new training batches checked equal inside."""
    import json
    import math

    from test_benchmarks import load
    mod = load("bench_loader")
    parser = mod.get_args_parser()
    args = parser.parse_args(["--quick", "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "l.json")])
    mod.check(args, parser)
    mod.main(args)
    res = json.loads((tmp_path / "l.json").read_text())

    def positive(v):
        return isinstance(v, (int, float)) and math.isfinite(v) and v > 0
    for part, keys in (("features", ("decode_img_s", "write_img_s", "cached_img_s", "cache_x")),
                       ("training", ("today_img_s", "ours_img_s", "train_x")),
                       ("ipc", ("train_batch_ms", "gpu_per_image_ms", "gpu_packed_ms"))):
        assert all(positive(res[part][k]) for k in keys), (part, res[part])
    assert res["features"]["bytes_per_image"] > 3 * 64 * 64 and all(positive(v) for v in res["stages"]["us_per_image"].values())
    assert set(res["draft"]) == {"imagenet_like", "large"} and res["draft"]["large"]["reduced_pct"] > 0
    assert positive(res["epoch"]["epoch_x"]) and res["epoch"]["images"] == 8
    rows = res["projection"]
    assert [(r["gpus"], r["loaders"]) for r in rows] == [(1, "today"), (1, "ours"), (8, "today"), (8, "ours")]
    assert all(r["epoch_min"] >= r["gpu_only_min"] > 0 for r in rows)
