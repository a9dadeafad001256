"""The CUDA code paths, checked on CPU: same functions with device="cpu", or their call pattern
(what is copied how, which device is asked for, what init_process_group receives)."""
from __future__ import annotations

import contextlib
import datetime
import logging
import math
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import cluster_util
import clustering
import kmeans
import pca
import deepcluster as dc
import engine
import main
import checkpoint
import distributed
import gpu_decode
import preempt
import util


class CopySpy(torch.Tensor):
    """A tensor that records the ``non_blocking`` flag of every ``.to`` made from it."""
    calls: list[bool] = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.to:
            CopySpy.calls.append(bool(kwargs.get("non_blocking", False)))
        return super().__torch_function__(func, types, args, kwargs)


def test_feature_store_copies_to_the_store_synchronously():
    """A non-blocking device -> host copy read at once by index_copy_ gives stale rows on CUDA."""
    CopySpy.calls = []
    store = distributed.FeatureStore(5, 3, "cpu", "float16")
    batch = torch.arange(6, dtype=torch.float32).reshape(2, 3).as_subclass(CopySpy)
    store.write([4, 1], batch)
    assert CopySpy.calls and not any(CopySpy.calls)
    assert store.tensor[4].tolist() == [0, 1, 2] and store.tensor[1].tolist() == [3, 4, 5]
    # the row indices go to the store's device without a blocking copy (a host wait per batch
    # with --features_on device): non_blocking, ordered before index_copy_ on the stream
    CopySpy.calls = []
    store.write(torch.tensor([0, 2]).as_subclass(CopySpy), torch.ones(2, 3))
    store.flush()
    assert CopySpy.calls == [True] and store.tensor[2].tolist() == [1, 1, 1]


def test_clustering_runs_on_the_given_device_not_the_datas(monkeypatch):
    """float16 host features with device cuda go to cuda (block by block), for PCA and k-means."""
    asked = []
    real = pca.to_device_blocks

    def fake_move(x, device):  # records the request; stays on the CPU of this machine
        asked.append((torch.device(device), x.dtype))
        return real(x, torch.device("cpu"))
    monkeypatch.setattr(pca, "to_device_blocks", fake_move)
    monkeypatch.setattr(kmeans, "to_device_blocks", fake_move)
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(4, 16, generator=g)[torch.arange(200) % 4] + 0.1 * torch.randn(200, 16, generator=g)).half()
    km = clustering.Kmeans(4, backend="torch", pca=8, device=torch.device("cuda", 0), seed=1)
    km.cluster(x)
    assert asked[0] == (torch.device("cuda", 0), torch.float16)  # the host matrix, kept in float16
    assert all(dev == torch.device("cuda", 0) for dev, _ in asked) and len(asked) >= 2
    assert sorted(len(c) for c in km.images_lists) == [50] * 4


def test_to_device_blocks_copies_by_blocks(monkeypatch):
    monkeypatch.setattr(pca, "PCA_BLOCK", 7 * 5)  # row blocks of 256 rows at least
    x = np.random.RandomState(0).randn(600, 5).astype(np.float32)
    out = pca.to_device_blocks(x, torch.device("cpu"))
    assert out.dtype == torch.float32 and np.array_equal(out.numpy(), x)
    h = torch.from_numpy(x).bfloat16()
    assert pca.to_device_blocks(h, torch.device("cpu")) is h  # already there: no copy


def _fake_cuda(monkeypatch, n_gpus: int) -> list:
    set_to = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n_gpus)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: set_to.append(d))
    return set_to


def _torchrun_env(monkeypatch, rank: int, world: int = 2) -> list:
    for k, v in dict(WORLD_SIZE=world, RANK=rank, LOCAL_RANK=rank).items():
        monkeypatch.setenv(k, str(v))
    calls = []
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda **kw: calls.append(kw))
    return calls


def test_process_group_gets_timeout_and_device(monkeypatch):
    calls = _torchrun_env(monkeypatch, rank=1)
    rt = distributed.init_runtime("cpu", timeout_min=5)
    assert calls[-1]["backend"] == "gloo" and calls[-1]["device_id"] is None
    assert calls[-1]["timeout"] == datetime.timedelta(minutes=5) and rt.device == torch.device("cpu")
    set_to = _fake_cuda(monkeypatch, 2)
    rt = distributed.init_runtime("auto")
    assert calls[-1]["backend"] == "nccl" and calls[-1]["device_id"] == torch.device("cuda", 1)
    assert calls[-1]["timeout"] == datetime.timedelta(minutes=60)
    assert set_to == [1] and rt.device == torch.device("cuda", 1)


def test_two_processes_on_one_gpu_refused(monkeypatch):
    calls = _torchrun_env(monkeypatch, rank=1)
    _fake_cuda(monkeypatch, 1)
    with pytest.raises(distributed.DeviceError, match="LOCAL_RANK 1 but only 1 GPU.*share one GPU"):
        distributed.init_runtime("cuda")
    assert not calls


def test_gpu_seen_by_the_system_but_not_torch_is_loud(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(distributed, "system_sees_gpu", lambda: True)
    with caplog.at_level(logging.WARNING, logger="deepcluster"):
        assert distributed.init_runtime("auto").device == torch.device("cpu")
    assert "shows an NVIDIA GPU but PyTorch cannot use it" in caplog.text
    with pytest.raises(distributed.DeviceError, match="--device cuda requested"):
        distributed.init_runtime("cuda")
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    distributed.configure_backends()
    assert torch.backends.cudnn.benchmark is True


def test_main_sh_asks_for_cuda_when_gpus_are_requested():
    text = (Path(__file__).resolve().parents[1] / "main.sh").read_text()
    assert 'if [ -n "${NGPUS:-}" ]; then DEVICE="${DEVICE:-cuda}"; else DEVICE="${DEVICE:-auto}"; fi' in text
    assert 'ARGS=(--device "$DEVICE")' in text


def test_seeds_differ_per_rank_for_torch_only():
    distributed.seed_everything(3, rank=0)
    t0, n0 = torch.rand(4), np.random.rand(4)
    distributed.seed_everything(3, rank=1)
    t1, n1 = torch.rand(4), np.random.rand(4)
    assert not torch.equal(t0, t1)           # own dropout masks per rank
    assert np.array_equal(n0, n1)           # shared draws and k-means seeds


def test_rng_restored_by_rank():
    states = []
    for r in range(2):
        torch.manual_seed(10 + r)
        states.append(checkpoint.get_rng_state())
    ckpt = {"rng_ranks": states, "epoch": 3}
    args = main.parse_args(["x", "--seed", "31"])
    seen = []
    for rank in range(3):
        checkpoint.restore_rank_rng(ckpt, args.seed, distributed.Runtime(rank=rank, world_size=3))
        seen.append(torch.rand(3))
    for rank in range(2):
        torch.manual_seed(10 + rank)
        assert torch.equal(seen[rank], torch.rand(3))
    assert not torch.equal(seen[2], seen[0]) and not torch.equal(seen[2], seen[1])  # a stream of its own


class _Batches(list):
    """(imgs, target, index) batches standing for a DataLoader."""


def _batches(n_steps: int, nan_at: int | None = None) -> _Batches:
    g = torch.Generator().manual_seed(0)
    out = _Batches()
    for i in range(n_steps):
        x = torch.randn(4, 6, generator=g)
        if i == nan_at:
            x[0, 0] = float("nan")
        out.append((x, torch.randint(0, 3, (4,), generator=g), torch.arange(4)))
    return out


def _train(batches, monkeypatch):
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    reads = []
    for name in ("item", "__bool__", "__float__", "tolist"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, _r=real, _n=name: (reads.append(_n), _r(self))[1])
    meter = util.AverageMeter()

    def step(i, batch):
        x, y, _ = batch
        lo = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        lo.backward()
        opt.step()
        return lo, x.shape[0]
    try:
        engine.run_steps(batches, step, start=0, total=len(batches), meter=distributed.DeviceLossMeter(
            torch.device("cpu"), meter), control=preempt.StepControl(distributed.Runtime()), no_progress=True)
    finally:
        monkeypatch.undo()
    return meter.avg, reads


def test_train_loop_reads_the_loss_every_few_dozen_steps(monkeypatch):
    monkeypatch.setattr(engine, "SYNC_EVERY", 10)
    steps = 30
    loss, reads = _train(_batches(steps), monkeypatch)
    n_reads = math.ceil(steps / 10)  # syncs: every 10 steps and at the end
    assert 0 < len(reads) <= 2 * n_reads < steps  # two reads (NaN flag, loss sum) per sync, not per step
    # same average as reading every step
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    ref = []
    for x, y, _ in _batches(steps):
        lo = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        lo.backward()
        opt.step()
        ref.append(lo.item())
    assert loss == pytest.approx(float(np.mean(ref)), rel=1e-6)


def test_train_loop_divergence_names_the_iterations(monkeypatch):
    monkeypatch.setattr(engine, "SYNC_EVERY", 10)
    with pytest.raises(distributed.DivergedError, match="loss is nan at epoch 0, between iterations 10 and 19"):
        _train(_batches(30, nan_at=13), monkeypatch)


def test_batch_not_divisible_by_processes_refused(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it
    with pytest.raises(SystemExit) as e:
        main.run(["x", "--batch", "7", "--exp", str(tmp_path / "e")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--batch: invalid value 7" in err and "number of processes 2" in err
    assert not (tmp_path / "e").exists()  # refused before any work


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.top_layer = torch.nn.Linear(4, 3)


def _mid_epoch(draws: np.ndarray, i: int, args, world: int) -> dict:
    """What a periodic checkpoint of a run on ``world`` processes keeps before step i."""
    net = _Net()
    plan = dc.EpochPlan(np.arange(50) % 3, [[0], [1], [2]], 0.0, draws,
                          torch.optim.SGD(net.top_layer.parameters(), lr=0.1))
    return dc.mid_epoch_state(plan, i, util.AverageMeter(), None, args, distributed.Runtime(0, world))


def _served(draws, rt: distributed.Runtime, args, start_iter: int) -> list[list[int]]:
    """Per step, the draws rank ``rt.rank`` trains on from step start_iter."""
    b = dc.rank_batch(args, rt)
    items = [d for d, _ in util.SeededShardSampler(draws, 0, rt.rank, rt.world_size, start=start_iter * b)]
    return [items[s:s + b] for s in range(0, len(items), b)]


def test_mid_epoch_resume_on_another_number_of_processes():
    args = main.parse_args(["x", "--batch", "8"])
    draws = np.arange(100, 146)  # 46 draws: 6 steps of 8 (the last one 6), on any W dividing 8 and 46
    mid = _mid_epoch(draws, 3, args, world=2)
    assert mid["position"] == 24 and mid["world_size"] == 2
    before = [d for r in range(2) for step in _served(draws, distributed.Runtime(r, 2), args, 0)[:3] for d in step]
    plan = dc.resumed_plan(mid, _Net(), args, distributed.Runtime(0, 1))
    after = [d for step in _served(plan.draws, distributed.Runtime(0, 1), args, plan.start_iter) for d in step]
    assert sorted(before + after) == draws.tolist()  # every draw once: nothing twice, nothing skipped
    assert plan.start_iter + len(_served(plan.draws, distributed.Runtime(0, 1), args, plan.start_iter)) == 6
    # on 4 processes: 46 is not a multiple of 4, the last 2 draws go so every rank runs as many steps
    plan4 = dc.resumed_plan(mid, _Net(), args, distributed.Runtime(0, 4))
    steps = {len(_served(plan4.draws, distributed.Runtime(r, 4), args, plan4.start_iter)) for r in range(4)}
    assert steps == {3} and len(plan4.draws) == 44
    after4 = [d for r in range(4) for step in _served(plan4.draws, distributed.Runtime(r, 4), args, plan4.start_iter)
              for d in step]
    assert sorted(before + after4) == draws[:44].tolist()
    # a --batch that cannot reach the checkpoint's position is refused
    with pytest.raises(checkpoint.CheckpointError, match="after 24 draws.*--batch 16"):
        dc.check_checkpoint({"state_dict": {"top_layer.weight": torch.zeros(3, 4)}, "mid_epoch": mid},
                                    "c.pth.tar", main.parse_args(["x", "--batch", "16"]), 50)


# ---------------------------------------------------------------------------------------
# resume across memory formats (issue 23, item 1)
# ---------------------------------------------------------------------------------------
def _grads(model: torch.nn.Module, seed: int) -> None:
    """The same (seeded) gradient values for any memory format of the parameters."""
    g = torch.Generator().manual_seed(seed)
    for p in model.body_parameters():
        p.grad = torch.empty_like(p).copy_(torch.randn(p.shape, generator=g).to(p.device))


def _saved_run(tmp_path: Path, saved_by: str) -> Path:
    """A checkpoint after one momentum step, written by a run of the given layout."""
    flags = ["x", "--size", "64", "--k", "10"] + ([] if saved_by == "channels_last" else ["--no-channels_last"])
    args = main.parse_args(flags)
    torch.manual_seed(0)
    model = dc.build_model(args, torch.device("cpu"))
    opt = dc.build_optimizer(model, args)
    _grads(model, 1)
    opt.step()
    state = {"epoch": 1, "arch": "alexnet", "state_dict": model.state_dict(), "optimizer": opt.state_dict()}
    if saved_by == "original_release":  # features wrapped in DataParallel, PyTorch 0.x param_groups
        state["state_dict"] = {k.replace("features.", "features.module.", 1): v for k, v in model.state_dict().items()}
        for g in state["optimizer"]["param_groups"]:
            for k in ("fused", "foreach", "differentiable", "maximize"):
                g.pop(k, None)
    path = tmp_path / f"{saved_by}.pth.tar"
    torch.save(state, path)
    return path


NEEDS_CUDA = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("saved_by,now,device", [("nchw", [], "cpu"), ("original_release", [], "cpu"),
                                                 ("channels_last", ["--no-channels_last"], "cpu"),
                                                 pytest.param("nchw", ["--channels_last"], "cuda", marks=NEEDS_CUDA)])
def test_resume_gives_momentum_the_parameters_layout(tmp_path, saved_by, now, device):
    """A user's resume (deepcluster.build_model/build_optimizer/restore) of a checkpoint
    of either layout: the fused step equals the per-tensor step within 1e-6 in every tensor.
    Without the layout fix the fused step moves conv1 by ~10% (NCHW state, channels-last)."""
    path = _saved_run(tmp_path, saved_by)
    after, layouts = {}, []
    for fused in (True, False):
        args = main.parse_args(["x", "--size", "64", "--k", "10", "--resume", str(path)] + now
                               + ([] if fused else ["--no-fused_sgd"]))
        model = dc.build_model(args, torch.device(device))
        opt = dc.build_optimizer(model, args)
        dc.restore(args.resume, model, opt, args, 100, distributed.Runtime())  # on CUDA: the fused step used to raise
        layouts += [opt.state[p]["momentum_buffer"].stride() == p.stride() for p in model.body_parameters()]
        assert bool(opt.param_groups[0]["fused"]) == fused
        _grads(model, 2)
        opt.step()
        after[fused] = [p.detach().clone() for p in model.body_parameters()]
    assert model.features[0].weight.is_contiguous(memory_format=torch.channels_last) == ("--no-channels_last" not in now)
    for a, b in zip(after[True], after[False]):
        assert float((a - b).norm() / b.norm()) < 1e-6
    assert all(layouts)


# ---------------------------------------------------------------------------------------
# BatchNorm and the logged loss under DDP (issue 23, item 2)
# ---------------------------------------------------------------------------------------
NCCL2 = distributed.Runtime(0, 2, device=torch.device("cuda", 0))  # a torchrun rank on a GPU (never used as one)
GLOO2 = distributed.Runtime(0, 2)


@pytest.mark.parametrize("flag,rt,expected", [
    (None, NCCL2, True), (False, NCCL2, False), (True, NCCL2, True),
    (None, GLOO2, False), (False, GLOO2, False), (True, GLOO2, True),
    (None, distributed.Runtime(device=torch.device("cuda", 0)), False), (True, distributed.Runtime(), False)])
def test_sync_bn_on_by_default_under_nccl_only(flag, rt, expected):
    assert distributed.resolve_sync_bn(flag, rt) is expected  # explicit on gloo: AllReduceBatchNorm
    assert main.parse_args(["x"]).sync_bn is None and main.parse_args(["x", "--no-sync_bn"]).sync_bn is False


def test_sync_bn_conversion_keeps_parameters_and_checkpoint_keys():
    """Every BatchNorm becomes an AllReduceBatchNorm (NCCL and gloo alike) with the same parameter
    objects (an optimizer built before still updates them) and the same state_dict, which the
    unsynced network loads strictly; without a process group it computes what BatchNorm does,
    bitwise, on CPU."""
    args = main.parse_args(["x", "--size", "64", "--k", "10", "--sobel"])
    torch.manual_seed(0)
    plain = dc.build_model(args, torch.device("cpu"))
    ref = dc.build_model(args, torch.device("cpu"))
    ref.load_state_dict(plain.state_dict())
    params = {id(p) for p in plain.parameters()}
    n_bn = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in plain.modules())
    synced = distributed.sync_batchnorm(plain, None, NCCL2)
    assert synced is plain and n_bn == 5  # one after each conv (AlexNet has none in its classifier)
    assert sum(isinstance(m, distributed.AllReduceBatchNorm) for m in synced.modules()) == n_bn
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.modules())  # it syncs the host
    assert {id(p) for p in synced.parameters()} == params
    assert list(synced.state_dict()) == list(ref.state_dict())
    fresh = dc.build_model(args, torch.device("cpu"))
    fresh.load_state_dict(synced.state_dict(), strict=True)
    x = torch.randn(4, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    synced.train(), ref.train()
    torch.manual_seed(1)
    a = synced(x)
    torch.manual_seed(1)
    assert torch.equal(a, ref(x))
    assert distributed.sync_batchnorm(ref, None, GLOO2) is ref  # gloo: unchanged by default
    assert not any(isinstance(m, distributed.AllReduceBatchNorm) for m in ref.modules())
    params = {id(p) for p in ref.parameters()}
    gloo = distributed.sync_batchnorm(ref, True, GLOO2)
    assert sum(isinstance(m, distributed.AllReduceBatchNorm) for m in gloo.modules()) == n_bn
    assert {id(p) for p in gloo.parameters()} == params and list(gloo.state_dict()) == list(fresh.state_dict())


# ops that make the host wait for a CUDA device: a scalar read, a data-dependent output size, a copy
# between devices (on the CPU they run without a sync; recorded here by their aten name)
SYNC_OPS = ("_local_scalar_dense", "nonzero", "masked_select", "_unique", "unique_", "repeat_interleave",
            "is_nonzero", "equal")


class SyncOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every aten op that would synchronise the host with a CUDA device."""

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []
        self.ops: list[str] = []  # every op

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__ if hasattr(func, "__name__") else str(func)
        self.ops.append(name)
        bool_index = name.startswith("index.") and any(
            isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in (args[1] if len(args) > 1 else []) or [])
        if bool_index or any(op in name for op in SYNC_OPS):
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


@pytest.fixture
def group_of_one(monkeypatch):
    """A gloo process group of one in this process (DEEPCLUSTER_FORCE_DISTRIBUTED=1)."""
    monkeypatch.setenv(distributed.FORCE_DISTRIBUTED_ENV, "1")
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    rt = distributed.init_runtime("cpu")
    try:
        yield rt
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("momentum", [0.1, None])
def test_allreduce_batchnorm_never_reads_a_value_on_the_host(group_of_one, momentum):
    """Forward and backward of the synchronised BatchNorm in a process group of one: no op that
    would sync a CUDA host (torch's SyncBatchNorm does a masked index on the counts), and the
    result is one BatchNorm's on that batch (float64 statistics: within float32 rounding)."""
    assert group_of_one.distributed and group_of_one.forced and group_of_one.world_size == 1
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4, 5, 5, generator=g) * 3 + 2
    ref = torch.nn.BatchNorm2d(4, momentum=momentum)
    bn = distributed.sync_batchnorm(torch.nn.BatchNorm2d(4, momentum=momentum), True, group_of_one)
    assert isinstance(bn, distributed.AllReduceBatchNorm)
    spy = SyncOps()
    outs = []
    for mod, mode in ((bn, spy), (ref, contextlib.nullcontext())):
        xi = x.clone().requires_grad_(True)
        with mode:
            for _ in range(2):
                y = mod(xi)
                (y * torch.arange(4.0).view(1, 4, 1, 1)).pow(2).sum().backward()
        outs.append((y.detach(), xi.grad, mod.running_mean.clone(), mod.running_var.clone()))
    assert spy.seen == []
    assert sum("allreduce" in op for op in spy.ops) == 2 * 2  # 2 steps x (1 forward + 1 backward)
    # float32 rounding: the input gradient (values ~1) is g * scale (terms ~20) minus its projections
    # on the mean and variance, so a few ulps of the terms (2e-6 each) show in it
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=3e-5)
    # the spy sees what the former version did: float() of the all-reduced count
    with spy:
        float(torch.ones(()) + 1)
    assert spy.seen == ["_local_scalar_dense.default"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ranks_worker(rank: int, world: int, port: int, out: str, folder: str) -> None:
    """One gloo rank: the loss meter, then the sharded image check."""
    import data

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    rt = distributed.init_runtime("cpu")
    meter = distributed.DeviceLossMeter(rt.device, util.AverageMeter())
    for step in range(3):  # rank r's losses: 1 + r + step, batches of 2 + r images
        meter.add(torch.tensor(1.0 + rank + step), 2 + rank)
        meter.step = step + 1
    m = meter.read()
    res = {"avg": m.avg, "count": m.count}
    meter.add(torch.tensor(float("nan") if rank == 1 else 1.0), 2)  # one rank diverges: all stop
    try:
        meter.read()
        res["diverged"] = False
    except distributed.DivergedError:
        res["diverged"] = True
    checked, real = [], data.check_image
    data.check_image = lambda path, full=True: (checked.append("/".join(Path(path).parts[-2:])), real(path, full))[1]
    ds = data.IndexedImageFolder(folder)
    data.check_folder(ds, "header", "skip", Path(out + ".bad.txt"), progress=False, write=rt.is_main, rt=rt)
    res.update(checked=checked, kept=[Path(p).name for p in ds.paths])
    torch.save(res, f"{out}.{rank}")
    torch.distributed.destroy_process_group()


def test_ranks_log_the_mean_loss_and_share_the_image_check(tmp_path, tiny_image_folder):
    """Two gloo ranks: the logged loss is the mean over every rank's images, a NaN on one rank
    stops both; the header check is split (each file checked by one rank) and every rank
    drops the same unreadable files."""
    bad = ["class0/img001.jpg", "class2/img007.jpg"]
    for name in bad:
        (tiny_image_folder / name).write_bytes(b"broken")
    mp.spawn(_ranks_worker, args=(2, _free_port(), str(tmp_path / "res"), str(tiny_image_folder)), nprocs=2)
    got = [torch.load(tmp_path / f"res.{r}") for r in range(2)]
    losses = [(1.0 + r + s, 2 + r) for r in range(2) for s in range(3)]
    mean = sum(l * b for l, b in losses) / sum(b for _, b in losses)
    for res in got:
        assert res["avg"] == pytest.approx(mean, rel=1e-12) and res["count"] == 15 and res["diverged"]
    assert len(got[0]["checked"]) == len(got[1]["checked"]) == 12  # 24 images, each checked once
    assert not set(got[0]["checked"]) & set(got[1]["checked"])
    assert got[0]["kept"] == got[1]["kept"] and len(got[0]["kept"]) == 22
    assert len((tmp_path / "res.bad.txt").read_text().splitlines()) == 2  # written once, by rank 0


# ---------------------------------------------------------------------------------------
# honest GPU claims (issue 23, item 4)
# ---------------------------------------------------------------------------------------
def test_deterministic_switches(monkeypatch):
    """--deterministic: deterministic algorithms (warn-only where none exists), no autotuning,
    TF32 off, cuBLAS workspace set; the default keeps the original's cuDNN autotuning."""
    cudnn = torch.backends.cudnn
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             cudnn.benchmark, cudnn.deterministic, cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision,
             torch.backends.cuda.matmul.fp32_precision)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        assert main.parse_args(["x"]).deterministic is False
        distributed.configure_backends(main.parse_args(["x", "--deterministic"]).deterministic)
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        assert not cudnn.benchmark and cudnn.deterministic
        assert cudnn.conv.fp32_precision == cudnn.rnn.fp32_precision == "ieee"
        assert torch.backends.cuda.matmul.fp32_precision == "ieee"
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        cudnn.benchmark, cudnn.deterministic = saved[2], saved[3]
        cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision = saved[4], saved[5]
        torch.backends.cuda.matmul.fp32_precision = saved[6]


@pytest.mark.parametrize("flag,device,on", [(None, "cpu", True), (None, "cuda", False), (True, "cuda", True),
                                            (False, "cpu", False)])
def test_channels_last_auto_is_on_for_the_cpu_only(flag, device, on):
    assert distributed.resolve_channels_last(flag, torch.device(device)) is on
    argv = ["x", "--size", "64", "--k", "10"] + ({True: ["--channels_last"], False: ["--no-channels_last"]}.get(flag, []))
    model = dc.build_model(main.parse_args(argv), torch.device("cpu"))  # cpu: auto is on
    assert model.features[0].weight.is_contiguous(memory_format=torch.channels_last) == (flag is not False)


def test_auto_backend_is_torch_on_cuda_even_with_faiss_gpu(monkeypatch):
    """What --cluster_backend's help and docs/flags.md say: torch on CUDA, faiss on CPU when installed."""
    monkeypatch.setattr(cluster_util, "faiss_has_gpu", lambda: True)
    monkeypatch.setattr(cluster_util, "faiss", object())  # installed
    assert clustering.resolve_backend("auto", torch.device("cuda", 0)) == "torch"
    assert clustering.resolve_backend("auto", torch.device("cpu")) == "faiss"
    assert clustering.resolve_backend("faiss", torch.device("cuda", 0)) == "faiss"
    monkeypatch.setattr(cluster_util, "faiss", None)
    assert clustering.resolve_backend("auto", torch.device("cpu")) == "torch"


# ---------------------------------------------------------------------------------------
# --decode gpu: its CPU twin against the PIL path (issue 23, item 3)
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def photos(module_tmp) -> Path:
    """Baseline JPEGs of odd sizes (device path) and a grey one; a progressive JPEG and a PNG
    (worker path)."""
    import data

    root = module_tmp.mktemp("photos") / "images"
    for c, items in enumerate([[(61, 97), (150, 200)], [(333, 250), (48, 300)]]):
        (root / f"c{c}").mkdir(parents=True)
        for k, (h, w) in enumerate(items):
            data.synthetic_photo(h, w, 10 * c + k).save(root / f"c{c}" / f"p{k}.jpg", quality=90)
    data.synthetic_photo(120, 90, 5).convert("L").save(root / "c0" / "grey.jpg", quality=90)
    data.synthetic_photo(100, 130, 6).save(root / "c1" / "prog.jpg", quality=90, progressive=True)
    data.synthetic_photo(70, 80, 7).save(root / "c1" / "flat.png")
    return root

def test_decode_gpu_twin_draws_the_pil_boxes_and_pixels(photos):
    """For a given seed, EncodedCrop draws RandomResizedCrop's box and the flip that the PIL
    path draws (same torchvision code, same RNG order, size from the header): the same law.
    Pixels: both decoders are libjpeg-turbo, so the only difference is the antialiased
    bilinear resize's rounding (torchvision's uint8 kernel vs PIL's fixed point): at most 1
    level, on average under 0.25."""
    import data
    from torchvision import transforms as T

    ds = data.IndexedImageFolder(photos)
    enc = gpu_decode.EncodedImages(ds)
    pil_tf, crop = data.train_transform(40, 0.08, normalize=False), gpu_decode.EncodedCrop(40, 0.08)
    flips, kinds = set(), []
    for idx in range(len(ds)):
        kinds.append(enc.load(idx).on_device)
        for seed in range(8):
            with torch.random.fork_rng(devices=[]):
                torch.random.default_generator.manual_seed(seed)
                box = T.RandomResizedCrop.get_params(ds.load(idx), [0.08, 1.0], [3 / 4, 4 / 3])
                flip = int(torch.rand(1) < 0.5)
            ref = clustering._apply(pil_tf, ds.load(idx), seed)
            sample = clustering._apply(crop, enc.load(idx), seed)
            got = gpu_decode.EncodedBatch([sample], 40).decode(torch.device("cpu"))[0]
            if sample.box is not None:
                assert sample.box == (*box, flip)
            diff = (ref.int() - got.int()).abs()
            assert got.shape == ref.shape == (3, 40, 40) and int(diff.max()) <= 1 and float(diff.float().mean()) < 0.25
            flips.add(flip)
    assert flips == {0, 1} and kinds.count(True) == 5 and kinds.count(False) == 2  # both paths exercised


def test_decode_gpu_loader_serves_the_same_batches(photos, tmp_path):
    """deepcluster.make_train_loader with --decode gpu (a worker process) and data.to_model_input on
    the CPU: the same images, labels and order as --decode cpu, pixels within 1 level."""
    import data

    ds = data.IndexedImageFolder(photos)
    lists = [[0, 1, 2], [3, 4, 5, 6]]
    draws = np.array([6, 0, 3, 3, 5, 1, 2, 4])
    batches = {}
    for mode in ("cpu", "gpu"):
        args = main.parse_args([str(photos), "--size", "64", "--batch", "4", "--workers", "1", "--decode", mode,
                                "--exp", str(tmp_path)])
        loader = dc.make_train_loader(ds, lists, draws, 0, args, distributed.Runtime())
        batches[mode] = [(data.to_model_input(x, torch.device("cpu")), y, i) for x, y, i in loader]
    assert len(batches["gpu"]) == 2
    for (a, ya, ia), (b, yb, ib) in zip(batches["cpu"], batches["gpu"]):
        assert torch.equal(ya, yb) and torch.equal(ia, ib) and ia.tolist() != sorted(ia.tolist())
        std = torch.tensor(data.IMAGENET_STD).view(1, 3, 1, 1)
        assert float(((a - b).abs() * std * 255).max()) <= 1 + 1e-3


def test_decode_gpu_names_a_broken_jpeg(tmp_path):
    """Header fine, data truncated: the device decoder's failure names the file."""
    import data

    root = tmp_path / "images" / "c"
    root.mkdir(parents=True)
    data.synthetic_photo(64, 64, 0).save(root / "ok.jpg", quality=90)
    raw = (root / "ok.jpg").read_bytes()
    (root / "cut.jpg").write_bytes(raw[: len(raw) // 3])
    (root / "junk.jpg").write_bytes(b"not an image")
    enc, crop = gpu_decode.EncodedImages(data.IndexedImageFolder(tmp_path / "images")), gpu_decode.EncodedCrop(32)
    names = [Path(p).name for p in enc.paths]
    with pytest.raises(data.BadImageError, match="junk.jpg"):
        enc.load(names.index("junk.jpg"))
    batch = gpu_decode.EncodedBatch([crop(enc.load(names.index(n))) for n in ("ok.jpg", "cut.jpg")], 32)
    with pytest.raises(data.BadImageError, match="cut.jpg"):
        batch.decode(torch.device("cpu"))


def test_spherical_kmeans_assigns_by_row_blocks_bitwise(monkeypatch):
    """The (n, k) score matrix is computed by row blocks: every block height (dividing n or not,
    one row, more than n) gives the assignment of the whole matrix bitwise, and the k-means run
    with small blocks equals the one computed on whole score matrices."""
    import spherical_kmeans as sk

    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(1000, 24, generator=g), dim=1)
    c = torch.nn.functional.normalize(torch.randn(37, 24, generator=g), dim=1)
    whole = (x @ c.t()).argmax(dim=1)
    for block in (1, 7, 256, 999, 1000, 4096, None):
        assert torch.equal(sk.assign_nearest(x, c, block), whole), block
    assert sk.assign_nearest(x[:0], c).shape == (0,)
    ref = sk.spherical_kmeans(x, 37, niter=5, seed=3)
    monkeypatch.setattr(sk, "_row_chunk", lambda n_cols: 13)  # blocks of 13 rows
    seen = []
    real = sk.assign_nearest
    monkeypatch.setattr(sk, "assign_nearest", lambda x, c, block=None: (seen.append(1), real(x, c, block))[1])
    got = sk.spherical_kmeans(x, 37, niter=5, seed=3)
    assert len(seen) == 6 and torch.equal(ref[0], got[0]) and torch.equal(ref[1], got[1])
    # the former whole-matrix assignment, for the reference run
    monkeypatch.setattr(sk, "assign_nearest", lambda x, c, block=None: (x @ c.t()).argmax(dim=1))
    old = sk.spherical_kmeans(x, 37, niter=5, seed=3)
    assert torch.equal(old[0], ref[0]) and torch.equal(old[1], ref[1])


def test_sync_audit_is_off_exactly_around_the_documented_reads(monkeypatch):
    """DEEPCLUSTER_SYNC_DEBUG=error: the audit turns on at the third step (after the warm-up and
    DDP's bucket rebuild), every host read of engine.run_steps (the loss every SYNC_EVERY steps,
    the checkpoint hook, the end of the epoch) happens while it is off, and it is off after."""
    modes = []
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", lambda m: modes.append(m))
    monkeypatch.setenv(distributed.SYNC_DEBUG_ENV, "error")
    real_init = distributed.SyncAudit.__init__

    def on_cpu_too(self, device, warmup=2, mode=None):  # the audit only acts on CUDA: pretend
        real_init(self, "cuda", warmup, mode)
    monkeypatch.setattr(distributed.SyncAudit, "__init__", on_cpu_too)
    monkeypatch.setattr(engine, "SYNC_EVERY", 10)
    state_at_reads = []
    real_read = distributed.DeviceLossMeter.read
    monkeypatch.setattr(distributed.DeviceLossMeter, "read",
                        lambda self: (state_at_reads.append(modes[-1] if modes else "default"), real_read(self))[1])
    hooks = []
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def step(i, batch):
        x, y, _ = batch
        lo = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        lo.backward()
        opt.step()
        return lo, x.shape[0]
    engine.run_steps(_batches(25), step, start=0, total=25, control=preempt.StepControl(distributed.Runtime()),
                     meter=distributed.DeviceLossMeter(torch.device("cpu"), util.AverageMeter()), no_progress=True,
                     before_step=lambda i: hooks.append(modes[-1] if modes else "default"))
    assert modes[0] == "error" and modes[-1] == "default"
    assert len(hooks) == 25 and set(hooks) == {"default"}  # off inside the checkpoint hook
    assert len(state_at_reads) == 3 and set(state_at_reads) == {"default"}  # steps 10, 20 and the end
    on = [m for m in modes if m == "error"]
    assert len(on) >= 3  # back on after each allowed section
    monkeypatch.setattr(distributed.SyncAudit, "__init__", real_init)
    with pytest.raises(ValueError, match="DEEPCLUSTER_SYNC_DEBUG must be warn or error"):
        distributed.SyncAudit("cuda", mode="loud")
    assert distributed.SyncAudit("cpu", mode="error").mode is None  # nothing to audit on the CPU
