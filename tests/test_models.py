"""Models against the original's architecture: layer shapes, parameter counts, key names, init, Sobel, heads.

Expected values are computed here from the layer lists of the paper and the original code, not from models/.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import models
from models.common import DeepClusterNet

# the original layer lists, written out independently of models/
ALEXNET_CONVS = [(96, 11), (256, 5), (384, 3), (384, 3), (256, 3)]   # (out, kernel)
ALEXNET_POOL_AFTER = {0, 1, 4}                                       # maxpool(3,2) after conv i
VGG_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


def alexnet_conv_keys(bn: bool = True) -> list[int]:
    """Index in ``features`` of each conv: conv, [BN], ReLU, then pool where the original has one."""
    idx, out = 0, []
    for i, _ in enumerate(ALEXNET_CONVS):
        out.append(idx)
        idx += 3 if bn else 2
        if i in ALEXNET_POOL_AFTER:
            idx += 1
    return out


def vgg_conv_keys(bn: bool = True) -> list[int]:
    idx, out = 0, []
    for v in VGG_CFG:
        if v == "M":
            idx += 1
        else:
            out.append(idx)
            idx += 3 if bn else 2
    return out


def expected_shapes(arch: str, sobel: bool, k: int, fc6_in: int, bn: bool = True) -> dict:
    """Every parameter/buffer shape the layer lists imply, keyed like the released checkpoints."""
    shapes: dict[str, tuple] = {}
    c = 2 if sobel else 3
    if sobel:
        shapes.update({"sobel.0.weight": (1, 3, 1, 1), "sobel.0.bias": (1,),
                       "sobel.1.weight": (2, 1, 3, 3), "sobel.1.bias": (2,)})
    if arch == "alexnet":
        convs = list(zip(alexnet_conv_keys(bn), ALEXNET_CONVS))
        fc6, fc7 = "classifier.1", "classifier.4"
    else:
        outs = [v for v in VGG_CFG if v != "M"]
        convs = list(zip(vgg_conv_keys(bn), [(o, 3) for o in outs]))
        fc6, fc7 = "classifier.0", "classifier.3"
    for idx, (out, ks) in convs:
        shapes[f"features.{idx}.weight"] = (out, c, ks, ks)
        shapes[f"features.{idx}.bias"] = (out,)
        if bn:
            for name in ("weight", "bias", "running_mean", "running_var"):
                shapes[f"features.{idx + 1}.{name}"] = (out,)
            shapes[f"features.{idx + 1}.num_batches_tracked"] = ()
        c = out
    shapes.update({f"{fc6}.weight": (4096, fc6_in), f"{fc6}.bias": (4096,),
                   f"{fc7}.weight": (4096, 4096), f"{fc7}.bias": (4096,)})
    if k:
        shapes.update({"top_layer.weight": (k, 4096), "top_layer.bias": (k,)})
    return shapes


def expected_param_count(arch: str, sobel: bool, k: int, fc6_in: int) -> tuple[int, int]:
    """(all parameters, trainable parameters) from the layer lists."""
    total = 0
    c = 2 if sobel else 3
    convs = ALEXNET_CONVS if arch == "alexnet" else [(v, 3) for v in VGG_CFG if v != "M"]
    for out, ks in convs:
        total += out * c * ks * ks + out + 2 * out  # conv weight + bias, BN weight + bias
        c = out
    total += fc6_in * 4096 + 4096 + 4096 * 4096 + 4096 + (4096 * k + k if k else 0)
    sobel_params = (3 + 1) + (2 * 9 + 2) if sobel else 0
    return total + sobel_params, total


def shapes_of(model: nn.Module) -> dict:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------
# full-size models, built once
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def alexnet224():
    torch.manual_seed(0)
    return models.alexnet(sobel=True, out=1000)


@pytest.fixture(scope="module")
def vgg224():
    torch.manual_seed(0)
    return models.vgg16(sobel=False, out=1000)


def test_alexnet_224_shapes_and_counts(alexnet224):
    m = alexnet224
    assert shapes_of(m) == expected_shapes("alexnet", True, 1000, 256 * 6 * 6)
    total, trainable = expected_param_count("alexnet", True, 1000, 9216)
    assert sum(p.numel() for p in m.parameters()) == total
    assert sum(p.numel() for p in m.parameters() if p.requires_grad) == trainable
    # every conv is followed by BN then ReLU
    feats = list(m.features)
    for i in alexnet_conv_keys():
        assert isinstance(feats[i], nn.Conv2d)
        assert isinstance(feats[i + 1], nn.BatchNorm2d)
        assert isinstance(feats[i + 2], nn.ReLU)
    pools = [mod for mod in feats if isinstance(mod, nn.MaxPool2d)]
    assert len(pools) == 3 and all(p.kernel_size == 3 and p.stride == 2 for p in pools)
    convs = [mod for mod in feats if isinstance(mod, nn.Conv2d)]
    assert [(c.stride, c.padding) for c in convs] == [((4, 4), (2, 2)), ((1, 1), (2, 2))] + [((1, 1), (1, 1))] * 3
    # classifier: Dropout, fc6, ReLU, Dropout, fc7, ReLU
    kinds = [type(mod) for mod in m.classifier]
    assert kinds == [nn.Dropout, nn.Linear, nn.ReLU, nn.Dropout, nn.Linear, nn.ReLU]
    assert m.top_layer.in_features == 4096 and m.top_layer.out_features == 1000
    # a real forward at 224 gives 256 x 6 x 6 conv output and k logits
    m.eval()
    with torch.no_grad():
        x = torch.randn(1, 3, 224, 224)
        assert m.forward_conv(x).shape == (1, 256, 6, 6)
        assert m(x).shape == (1, 1000)
    assert m.conv_layers() == [i + 2 for i in alexnet_conv_keys()]


def test_vgg16_224_shapes_and_counts(vgg224):
    m = vgg224
    assert shapes_of(m) == expected_shapes("vgg16", False, 1000, 512 * 7 * 7)
    assert m.sobel is None and m.features[0].weight.shape == (64, 3, 3, 3)
    total, trainable = expected_param_count("vgg16", False, 1000, 25088)
    assert sum(p.numel() for p in m.parameters()) == total
    assert sum(p.numel() for p in m.parameters() if p.requires_grad) == trainable
    convs = [mod for mod in m.features if isinstance(mod, nn.Conv2d)]
    assert len(convs) == 13
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) for c in convs)
    assert sum(isinstance(mod, nn.BatchNorm2d) for mod in m.features) == 13
    pools = [mod for mod in m.features if isinstance(mod, nn.MaxPool2d)]
    assert len(pools) == 5 and all(p.kernel_size == 2 and p.stride == 2 for p in pools)
    # no dropout before fc6: Linear, ReLU, Dropout, Linear, ReLU
    kinds = [type(mod) for mod in m.classifier]
    assert kinds == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear, nn.ReLU]
    m.eval()
    with torch.no_grad():
        assert m.forward_conv(torch.randn(1, 3, 224, 224)).shape == (1, 512, 7, 7)


@pytest.fixture(scope="module")
def small():
    """Small-input models shared by the tests that do not modify them."""
    torch.manual_seed(0)
    return {"alexnet": models.alexnet(sobel=True, out=7, input_size=64),
            "vgg16": models.vgg16(sobel=True, out=7, input_size=32)}


@pytest.mark.parametrize("arch,size,fc6_in,sobel", [("alexnet", 96, 256 * 2 * 2, False)])
def test_small_inputs_and_key_names(arch, size, fc6_in, sobel):
    m = models.build_model(arch, sobel=sobel, out=5, input_size=size)
    assert shapes_of(m) == expected_shapes(arch, sobel, 5, fc6_in)
    m.eval()
    with torch.no_grad():
        out = m(torch.randn(2, 3, size, size))
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    # train mode too (BN with batch statistics)
    m.train()
    assert m(torch.randn(2, 3, size, size)).shape == (2, 5)
    cfg = m.config()
    assert cfg == {"arch": arch, "sobel": sobel, "bn": True, "input_size": size, "k": 5}


@pytest.mark.parametrize("arch,size,fc6_in", [("alexnet", 64, 256), ("vgg16", 32, 512)])
def test_small_input_sobel_models(small, arch, size, fc6_in):
    m = small[arch]
    assert shapes_of(m) == expected_shapes(arch, True, 7, fc6_in)
    m.eval()
    with torch.no_grad():
        out = m(torch.randn(2, 3, size, size))
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    assert m.config() == {"arch": arch, "sobel": True, "bn": True, "input_size": size, "k": 7}


def test_released_key_names(small):
    a = small["alexnet"].state_dict()
    for key in ("features.0.weight", "features.1.running_mean", "classifier.1.weight",
                "classifier.4.weight", "top_layer.weight", "top_layer.bias", "sobel.0.weight",
                "sobel.1.weight"):
        assert key in a, key
    v = small["vgg16"].state_dict()
    for key in ("features.0.weight", "features.40.weight", "classifier.0.weight", "classifier.3.weight",
                "sobel.0.weight", "sobel.1.weight"):
        assert key in v, key
    assert v["features.0.weight"].shape == (64, 2, 3, 3)


def test_no_bn_and_no_top_layer():
    m = models.alexnet(sobel=False, bn=False, out=0, input_size=64)
    assert m.top_layer is None
    assert shapes_of(m) == expected_shapes("alexnet", False, 0, 256, bn=False)
    m.eval()
    with torch.no_grad():
        y = m(torch.randn(2, 3, 64, 64))
    assert y.shape == (2, 4096) and (y >= 0).all()  # post-ReLU fc7 without a head


def test_build_model_rejects_unknown_arch():
    with pytest.raises(ValueError):
        models.build_model("resnet18")


# ---------------------------------------------------------------------------------------
# initialisation as the original: conv N(0, sqrt(2/(k*k*out))), linear N(0, 0.01), biases 0, BN 1/0
# ---------------------------------------------------------------------------------------
def _check_init(m: DeepClusterNet):
    n_conv = 0
    for mod in list(m.features) + list(m.classifier) + [m.top_layer]:
        if isinstance(mod, nn.Conv2d):
            n_conv += 1
            k, out = mod.kernel_size[0], mod.out_channels
            want = math.sqrt(2.0 / (k * k * out))
            w = mod.weight.detach()
            tol = 4 * want / math.sqrt(2 * w.numel()) + 0.02 * want  # std of the sample std
            assert abs(w.std().item() - want) < tol, (mod, w.std().item(), want)
            assert abs(w.mean().item()) < 5 * want / math.sqrt(w.numel())
            assert torch.count_nonzero(mod.bias) == 0
        elif isinstance(mod, nn.BatchNorm2d):
            assert torch.all(mod.weight == 1) and torch.all(mod.bias == 0)
            assert torch.all(mod.running_mean == 0) and torch.all(mod.running_var == 1)
            assert int(mod.num_batches_tracked) == 0  # no batch went through BN at build time
        elif isinstance(mod, nn.Linear):
            w = mod.weight.detach()
            assert abs(w.std().item() - 0.01) < 4 * 0.01 / math.sqrt(2 * w.numel()) + 2e-4
            assert abs(w.mean().item()) < 5 * 0.01 / math.sqrt(w.numel())
            assert torch.count_nonzero(mod.bias) == 0
    return n_conv


def test_init_statistics_alexnet(alexnet224):
    assert _check_init(alexnet224) == 5


def test_init_statistics_vgg16(small):
    assert _check_init(small["vgg16"]) == 13


# ---------------------------------------------------------------------------------------
# Sobel
# ---------------------------------------------------------------------------------------
def test_sobel_is_frozen(small):
    m = copy.deepcopy(small["alexnet"])
    sobel_params = list(m.sobel.parameters())
    assert len(sobel_params) == 4
    assert all(not p.requires_grad for p in sobel_params)
    body = {id(p) for p in m.body_parameters()}
    assert not body & {id(p) for p in sobel_params}
    assert not body & {id(p) for p in m.top_layer.parameters()}
    # body = every trainable parameter of features + classifier
    want = {id(p) for p in list(m.features.parameters()) + list(m.classifier.parameters())}
    assert body == want
    # a backward pass reaches the first conv but leaves the Sobel block without gradients
    m.train()
    loss = nn.functional.cross_entropy(m(torch.randn(4, 3, 64, 64)), torch.tensor([0, 1, 2, 6]))
    loss.backward()
    assert m.features[0].weight.grad is not None and m.features[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in sobel_params)


def test_sobel_weights_and_step_edge_response(small):
    m = small["alexnet"]
    g, s = m.sobel[0], m.sobel[1]
    assert torch.allclose(g.weight, torch.full((1, 3, 1, 1), 1 / 3)) and g.bias.abs().max() == 0
    assert torch.equal(s.weight[0, 0], torch.tensor([[1., 0., -1.], [2., 0., -2.], [1., 0., -1.]]))
    assert torch.equal(s.weight[1, 0], torch.tensor([[1., 2., 1.], [0., 0., 0.], [-1., -2., -1.]]))
    # grayscale is the channel mean
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        assert torch.allclose(g(x), x.mean(1, keepdim=True), atol=1e-6)
    # vertical step edge: 0 on the left half, per-channel values (mean 0.6) on the right
    h, w = 10, 12
    img = torch.zeros(1, 3, h, w)
    img[0, :, :, w // 2:] = torch.tensor([0.3, 0.6, 0.9])[:, None, None]
    with torch.no_grad():
        out = m.sobel(img)
    assert out.shape == (1, 2, h, w)
    inner = out[0, :, 1:-1, 1:-1]       # away from the zero padding
    cols = torch.arange(1, w - 1)
    at_edge = (cols == w // 2 - 1) | (cols == w // 2)
    # horizontal gradient: (1+2+1) * (left - right) = -4 * 0.6 on the two columns at the edge
    assert torch.allclose(inner[0][:, at_edge], torch.full((h - 2, 2), -2.4), atol=1e-5)
    assert torch.allclose(inner[0][:, ~at_edge], torch.zeros(h - 2, int((~at_edge).sum())), atol=1e-6)
    # vertical gradient vanishes in the interior
    assert inner[1].abs().max() < 1e-6


# ---------------------------------------------------------------------------------------
# forward_features and the head
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch,size", [("alexnet", 64), ("vgg16", 32)])
def test_forward_features_is_pre_relu_fc7(small, arch, size):
    m = small[arch].eval()
    x = torch.randn(4, 3, size, size)
    with torch.no_grad():
        f = m.forward_features(x)
        body = m.classifier(torch.flatten(m.forward_conv(x), 1))
        logits = m(x)
    assert f.shape == (4, 4096)
    assert (f < 0).any() and (f > 0).any()        # before the ReLU
    assert torch.allclose(torch.relu(f), body, atol=1e-6)
    assert torch.allclose(logits, m.top_layer(torch.relu(f)), atol=1e-5)
    # forward_features did not modify anything in place: calling it again gives the same
    with torch.no_grad():
        assert torch.equal(m.forward_features(x), f)


@pytest.mark.parametrize("arch,size", [("alexnet", 64), ("vgg16", 32)])
def test_reset_top_layer(small, arch, size):
    m = copy.deepcopy(small[arch])
    old = m.top_layer
    top = m.reset_top_layer(2000)
    assert top is m.top_layer and top is not old
    assert isinstance(top, nn.Linear) and top.in_features == 4096 and top.out_features == 2000
    assert abs(top.weight.std().item() - 0.01) < 2e-4 and abs(top.weight.mean().item()) < 2e-4
    assert torch.count_nonzero(top.bias) == 0
    assert top.weight.requires_grad
    m.eval()
    with torch.no_grad():
        assert m(torch.randn(2, 3, size, size)).shape == (2, 2000)
    # the new layer follows the model's device and dtype
    m.double()
    assert m.reset_top_layer(3).weight.dtype == torch.float64
    m.to("meta")
    top = m.reset_top_layer(5)
    assert top.weight.device.type == "meta" and top.bias.device.type == "meta"


# ---------------------------------------------------------------------------------------
# registry and structure
# ---------------------------------------------------------------------------------------
def test_registry_and_no_import_cycle():
    import ast
    from pathlib import Path

    assert models.ARCHS == ("alexnet", "vgg16", "resnet50")
    # models/common.py is imported by every architecture file: it must import none of them
    src = Path(models.__file__).with_name("common.py").read_text()
    imported = {n.module for n in ast.walk(ast.parse(src)) if isinstance(n, ast.ImportFrom)}
    assert not imported & {"alexnet", "vgg16", "resnet"}, imported


def test_from_state_dict_reads_each_arch(small):
    for arch, m in small.items():
        built, ignored = models.from_state_dict(m.state_dict())
        assert built.config() == m.config() and ignored == []
        with pytest.raises(models.StateDictError, match=f"holds {models.article(arch)}"):
            models.from_state_dict(m.state_dict(), arch="resnet50", config=m.config())
