"""ResNet-50: torchvision parity, released-weight layouts, probe points, training and resume.

CPU-sized: 32 px inputs, a handful of images, batch 4.
"""
from __future__ import annotations

import argparse
import logging

import pytest
import torch
import torchvision
from torch import nn

import eval_voc_classif
import main
import checkpoint
import fileio
import models
from conftest import make_image_folder
from checkpoint import CheckpointError

TV_RESNET50_PARAMS = 25_557_032  # torchvision.models.resnet50(): 23,508,032 body + 2,049,000 fc


@pytest.fixture(autouse=True)
def one_thread():
    """ResNet-50 at 32 px in batches of 4 is ~50 small convs: one thread does them faster than
    two threads synchronising on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tv():
    """torchvision's ResNet-50 with non-trivial BN statistics (so buffers are checked too)."""
    torch.manual_seed(0)
    m = torchvision.models.resnet50(weights=None)
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.1, 0.1)
            mod.running_var.uniform_(0.5, 2)
            mod.weight.data.uniform_(0.5, 1.5)
            mod.num_batches_tracked.fill_(7)
    return m.eval()


def count(params) -> int:
    return sum(p.numel() for p in params)


def test_parameter_count_equals_torchvision(tv):
    m = models.resnet50()
    assert count(tv.parameters()) == TV_RESNET50_PARAMS
    assert count(m.parameters()) == TV_RESNET50_PARAMS
    assert {k: v.shape for k, v in m.torchvision_state_dict().items()} == \
        {k: v.shape for k, v in tv.state_dict().items()}
    assert m.top_layer.in_features == 2048 and m.top_layer.out_features == 1000
    assert count(m.body_parameters()) == TV_RESNET50_PARAMS - 2048 * 1000 - 1000
    # Sobel: conv1 takes 2 channels; the frozen Sobel block adds 4 + 20 parameters
    s = models.resnet50(sobel=True, out=10)
    want = TV_RESNET50_PARAMS - 2048 * 1000 - 1000 - 64 * 3 * 7 * 7 + 64 * 2 * 7 * 7
    assert s.conv1.weight.shape == (64, 2, 7, 7)
    assert count(s.body_parameters()) == want
    assert count(s.parameters()) == want + 2048 * 10 + 10 + 24
    assert count(p for p in s.parameters() if p.requires_grad) == want + 2048 * 10 + 10
    assert all(not p.requires_grad for p in s.sobel.parameters())
    assert s.config() == {"arch": "resnet50", "sobel": True, "bn": True, "input_size": 224, "k": 10}
    with pytest.raises(ValueError, match="BatchNorm"):
        models.resnet50(bn=False)


def test_torchvision_state_dict_round_trips(tv):
    model, ignored = models.from_state_dict(tv.state_dict())
    assert model.arch == "resnet50" and not model.use_sobel and ignored == []
    got, want = model.torchvision_state_dict(), tv.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), tv(x), atol=1e-5)  # same body, fc == top_layer


def test_load_deepcluster_v2_layout(tv, tmp_path, caplog):
    """SwAV's DeepCluster-v2 release: a bare state dict, ``module.`` keys, projection head and
    three prototype heads to ignore."""
    sd = {f"module.{k}": v for k, v in tv.state_dict().items() if not k.startswith("fc.")}
    sd.update({"module.projection_head.0.weight": torch.zeros(2048, 2048),
               "module.projection_head.1.running_mean": torch.zeros(2048),
               "module.projection_head.3.weight": torch.zeros(128, 2048),
               **{f"module.prototypes.prototypes{i}.weight": torch.zeros(3000, 128) for i in range(3)}})
    path = tmp_path / "deepclusterv2_800ep_pretrain.pth.tar"
    torch.save(sd, path)
    with caplog.at_level(logging.WARNING, logger="deepcluster"):
        model = checkpoint.load_model(path)
    assert model.arch == "resnet50" and model.top_layer is None
    assert len(model.ignored_keys) == 6
    assert "ignored 6 keys" in caplog.text and "projection_head" in caplog.text and "prototypes" in caplog.text
    want = {k: v for k, v in tv.state_dict().items() if not k.startswith("fc.")}
    got = model.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_mismatches_are_refused(tv, tmp_path):
    # ResNet-18 loads (the trunk of main_deepclusterv2.py --arch resnet18); another ResNet does not
    r34 = tmp_path / "resnet34.pth"
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), r34)
    with pytest.raises(CheckpointError, match=r"resnet34.pth.*does not fit resnet50.*missing"):
        checkpoint.load_model(r34)
    sd = dict(tv.state_dict())
    sd["layer2.0.conv2.weight"] = torch.zeros(64, 128, 3, 3)
    with pytest.raises(models.StateDictError, match="does not fit resnet50"):
        models.from_state_dict(sd)
    sd = dict(tv.state_dict())
    sd["layer4.9.conv1.weight"] = torch.zeros(1)
    with pytest.raises(models.StateDictError, match="unexpected"):
        models.from_state_dict(sd)
    with pytest.raises(CheckpointError, match="eval_x needs a vgg16 model"):
        checkpoint.load_model(r34, arch="vgg16", purpose="eval_x")


def test_probe_points_and_trunks():
    torch.manual_seed(0)
    m = models.resnet50(sobel=True, out=3).eval()
    assert m.probe_points() == m.conv_layers() == ["conv1", "layer1", "layer2", "layer3", "layer4", "avgpool"]
    x = torch.randn(2, 3, 32, 32)
    shapes = {"conv1": (64, 16, 16), "layer1": (256, 8, 8), "layer2": (512, 4, 4), "layer3": (1024, 2, 2),
              "layer4": (2048, 1, 1), "avgpool": (2048, 1, 1)}
    with torch.no_grad():
        for i, name in enumerate(m.probe_points(), start=1):
            t = m.trunk(i)
            assert m.probe_index(name) == i and t.name == name and t.n_filters == shapes[name][0]
            assert t(x).shape == (2, *shapes[name])
        assert torch.allclose(m.trunk("avgpool")(x).flatten(1), m.forward_features(x), atol=1e-6)
        pre = m.trunk("conv1", relu=False)(x)
        assert (pre < 0).any() and torch.allclose(torch.relu(pre), m.trunk("conv1")(x))
    with pytest.raises(models.ProbeError, match="pre-ReLU"):
        m.trunk("layer2", relu=False)
    with pytest.raises(models.ProbeError, match="1..6"):
        m.trunk(7)
    top = m.reset_top_layer(5)
    assert top.in_features == 2048 and top.out_features == 5


def test_linear_probe_dims_and_voc_head():
    # the standard ResNet-50 linear benchmark at 224: about 9k dims per layer, 2048 at avgpool
    maps = [(64, 112), (256, 56), (512, 28), (1024, 14), (2048, 7), (2048, 1)]  # (C, side) at 224
    dims = []
    for i, (c, side) in enumerate(maps, start=1):
        pool = models.make_pool("resnet50", i, c, (side, side))
        dims.append(pool(torch.zeros(1, c, side, side)).numel())
    assert dims == [9216, 9216, 8192, 9216, 8192, 2048]
    m = models.resnet50(out=0)
    args = argparse.Namespace(fc6_8=1, train_batchnorm=0)
    params = eval_voc_classif.prepare_model(m, args)
    assert [tuple(p.shape) for p in params] == [(20, 2048), (20,)]  # avgpool -> Linear(2048, 20)
    eval_voc_classif.check_input_size(m, 32, "m.pth")  # any size is fine
    eval_voc_classif.set_train_mode(m, args)
    assert m.top_layer.training and not m.layer3[0].bn1.training


@pytest.mark.slow
def test_train_one_epoch_then_resume_equals_two_epochs(tmp_path):
    """main.py --arch resnet50 at 32 px: 2 epochs == 1 epoch + resume for 1 (CPU, fixed seed)."""
    folder = make_image_folder(tmp_path / "images", n_classes=2, per_class=4, size=36)
    a, b = tmp_path / "a", tmp_path / "b"
    args = [str(folder), "--arch", "resnet50", "--sobel", "--size", "32", "--k", "2", "--pca", "4",
            "--lr", "0.01", "--batch", "4", "--workers", "0", "--no_progress", "--checkpoints", "1000", "--device", "cpu"]
    assert main.run(args + ["--exp", str(b), "--epochs", "1"]) == 0
    ckpt = torch.load(b / "checkpoint.pth.tar", weights_only=True)
    assert ckpt["arch"] == "resnet50" and ckpt["epoch"] == 1
    assert ckpt["model_config"] == {"arch": "resnet50", "sobel": True, "bn": True, "input_size": 32, "k": 2}
    assert fileio.read_jsonl(b / "log.jsonl")[0]["epoch"] == 0
    assert checkpoint.load_model(b / "checkpoint.pth.tar").top_layer.in_features == 2048
    assert main.run(args + ["--exp", str(b), "--epochs", "2", "--resume", str(b / "checkpoint.pth.tar")]) == 0
    assert main.run(args + ["--exp", str(a), "--epochs", "2"]) == 0
    la, lb = (checkpoint.ClusterLog(x / "clusters").load(1) for x in (a, b))
    assert (la == lb).all()
    sa = torch.load(a / "checkpoint.pth.tar", weights_only=True)["state_dict"]
    sb = torch.load(b / "checkpoint.pth.tar", weights_only=True)["state_dict"]
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-5, atol=1e-6, msg=k)
