"""The CUDA code paths, checked on CPU: same functions with device="cpu", or their call pattern
(what is copied how, which device is asked for, what init_process_group receives)."""
from __future__ import annotations

import datetime
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import clustering
import main
import checkpoint
import distributed
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


def test_clustering_runs_on_the_given_device_not_the_datas(monkeypatch):
    """float16 host features with device cuda go to cuda (block by block), for PCA and k-means."""
    asked = []
    real = clustering.to_device_blocks

    def fake_move(x, device):  # records the request; stays on the CPU of this machine
        asked.append((torch.device(device), x.dtype))
        return real(x, torch.device("cpu"))
    monkeypatch.setattr(clustering, "to_device_blocks", fake_move)
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(4, 16, generator=g)[torch.arange(200) % 4] + 0.1 * torch.randn(200, 16, generator=g)).half()
    km = clustering.Kmeans(4, backend="torch", pca=8, device=torch.device("cuda", 0), seed=1)
    km.cluster(x)
    assert asked[0] == (torch.device("cuda", 0), torch.float16)  # the host matrix, kept in float16
    assert all(dev == torch.device("cuda", 0) for dev, _ in asked) and len(asked) >= 2
    assert sorted(len(c) for c in km.images_lists) == [50] * 4


def test_to_device_blocks_copies_by_blocks(monkeypatch):
    monkeypatch.setattr(clustering, "PCA_BLOCK", 7 * 5)  # row blocks of 256 rows at least
    x = np.random.RandomState(0).randn(600, 5).astype(np.float32)
    out = clustering.to_device_blocks(x, torch.device("cpu"))
    assert out.dtype == torch.float32 and np.array_equal(out.numpy(), x)
    h = torch.from_numpy(x).bfloat16()
    assert clustering.to_device_blocks(h, torch.device("cpu")) is h  # already there: no copy


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
    top = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    args = main.parse_args(["x", "--no_progress"])
    reads = []
    for name in ("item", "__bool__", "__float__"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, _r=real, _n=name: (reads.append(_n), _r(self))[1])
    try:
        loss = main.train_one_epoch(batches, model, torch.nn.CrossEntropyLoss(), opt, top,
                                    torch.device("cpu"), 0, args)
    finally:
        monkeypatch.undo()
    return loss, reads


def test_train_loop_reads_the_loss_every_few_dozen_steps(monkeypatch):
    monkeypatch.setattr(main, "SYNC_EVERY", 10)
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
    monkeypatch.setattr(main, "SYNC_EVERY", 10)
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
    plan = main.EpochPlan(np.arange(50) % 3, [[0], [1], [2]], 0.0, draws,
                          torch.optim.SGD(net.top_layer.parameters(), lr=0.1))
    return checkpoint.mid_epoch_state(plan, i, util.AverageMeter(), None, args, distributed.Runtime(0, world))


def _served(draws, rt: distributed.Runtime, args, start_iter: int) -> list[list[int]]:
    """Per step, the draws rank ``rt.rank`` trains on from step start_iter."""
    b = main.rank_batch(args, rt)
    items = [d for d, _ in util.SeededShardSampler(draws, 0, rt.rank, rt.world_size, start=start_iter * b)]
    return [items[s:s + b] for s in range(0, len(items), b)]


def test_mid_epoch_resume_on_another_number_of_processes():
    args = main.parse_args(["x", "--batch", "8"])
    draws = np.arange(100, 146)  # 46 draws: 6 steps of 8 (the last one 6), on any W dividing 8 and 46
    mid = _mid_epoch(draws, 3, args, world=2)
    assert mid["position"] == 24 and mid["world_size"] == 2
    before = [d for r in range(2) for step in _served(draws, distributed.Runtime(r, 2), args, 0)[:3] for d in step]
    plan = main.resumed_plan(mid, _Net(), args, distributed.Runtime(0, 1))
    after = [d for step in _served(plan.draws, distributed.Runtime(0, 1), args, plan.start_iter) for d in step]
    assert sorted(before + after) == draws.tolist()  # every draw once: nothing twice, nothing skipped
    assert plan.start_iter + len(_served(plan.draws, distributed.Runtime(0, 1), args, plan.start_iter)) == 6
    # on 4 processes: 46 is not a multiple of 4, the last 2 draws go so every rank runs as many steps
    plan4 = main.resumed_plan(mid, _Net(), args, distributed.Runtime(0, 4))
    steps = {len(_served(plan4.draws, distributed.Runtime(r, 4), args, plan4.start_iter)) for r in range(4)}
    assert steps == {3} and len(plan4.draws) == 44
    after4 = [d for r in range(4) for step in _served(plan4.draws, distributed.Runtime(r, 4), args, plan4.start_iter)
              for d in step]
    assert sorted(before + after4) == draws[:44].tolist()
    # a --batch that cannot reach the checkpoint's position is refused
    with pytest.raises(checkpoint.CheckpointError, match="after 24 draws.*--batch 16"):
        checkpoint.check_checkpoint({"state_dict": {"top_layer.weight": torch.zeros(3, 4)}, "mid_epoch": mid},
                                    "c.pth.tar", main.parse_args(["x", "--batch", "16"]), 50)
