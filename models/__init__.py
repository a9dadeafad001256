"""DeepCluster convnets: AlexNet, VGG-16 and ResNet-50, each with an optional frozen Sobel block
(and ResNet-18, the trunk of DeepCluster-v2's small runs, which the evaluations load).

The constructors keep the original signatures (``alexnet(sobel=, bn=, out=)``) so that
code written for the original release keeps working. Every model offers:

- ``forward(x)`` (logits of the top layer), ``forward_features(x)`` (what is clustered:
  ``feature_dim`` values per image), ``reset_top_layer(k)``, ``body_parameters()``, ``config()``;
- ``probe_points()`` (``conv1..conv5`` / ``conv1..conv13`` / ``conv1, layer1..layer4, avgpool``)
  and ``trunk(layer)``: the network up to a probe point, Sobel included;
- the registry below: :func:`build_model` by name (``ARCHS``: what ``main.py`` trains),
  :func:`from_state_dict` from weights (``LOADABLE``: also ResNet-18).
"""
from __future__ import annotations

from torch import nn

from .alexnet import AlexNet, alexnet
from .common import DeepClusterNet, ProbeError, StateDictError, Trunk, clean_state_dict, probe_arg, to_channels_last
from .deepclusterv2 import DeepClusterV2Net, MultiPrototypes, build_dcv2, dcv2_from_state_dict
from .probe import ALEXNET_POOL, TARGET_DIM, make_pool
from .resnet import ResNet18, ResNet50, resnet18, resnet50
from .vgg16 import VGG16, vgg16

REGISTRY: dict[str, type[nn.Module]] = {"alexnet": AlexNet, "vgg16": VGG16, "resnet50": ResNet50}
ARCHS = tuple(REGISTRY)
# what the evaluations load from weights: also ResNet-18 (main_deepclusterv2.py --arch resnet18),
# claimed before ResNet-50, whose claim is any ResNet layout (the others then fail its shape check)
LOADABLE: dict[str, type[nn.Module]] = {"alexnet": AlexNet, "vgg16": VGG16, "resnet18": ResNet18,
                                        "resnet50": ResNet50}

__all__ = ["AlexNet", "VGG16", "ResNet50", "ResNet18", "DeepClusterNet", "Trunk", "ProbeError", "StateDictError",
           "alexnet", "resnet18", "LOADABLE", "vgg16", "resnet50", "build_model", "detect_arch", "from_state_dict",
           "clean_state_dict", "probe_arg", "ARCHS", "REGISTRY", "to_channels_last", "make_pool",
           "ALEXNET_POOL", "TARGET_DIM", "DeepClusterV2Net", "MultiPrototypes", "build_dcv2",
           "dcv2_from_state_dict"]


def article(name: str | None) -> str:
    """``name`` with its indefinite article: "an alexnet", "a vgg16"."""
    name = str(name)
    return ("an " if name[:1].lower() in "aeiou" else "a ") + name


def build_model(arch: str, sobel: bool = False, bn: bool = True, out: int = 1000,
                input_size: int = 224) -> nn.Module:
    """Build a model by architecture name (one of :data:`ARCHS`)."""
    cls = REGISTRY.get(arch)
    if cls is None:
        raise ValueError(f"unknown architecture {arch!r}: expected one of {', '.join(ARCHS)}")
    return cls(sobel=sobel, bn=bn, out=out, input_size=input_size)


def detect_arch(sd: dict) -> str | None:
    """The architecture a (``module.``-free) state dict describes, or None."""
    for name, cls in LOADABLE.items():
        if cls.claims(sd):
            return name
    return None


def from_state_dict(sd: dict, arch: str | None = None, config: dict | None = None) -> tuple[nn.Module, list[str]]:
    """Build the network a state dict describes and load it; returns (model, ignored keys).

    ``arch`` defaults to ``config['arch']``, then to what the keys and shapes say; ``config``
    (a model's ``config()``) wins over what is read from the weights. The load is strict
    up to BN batch counters and the foreign heads listed in the ignored keys (e.g. the
    projection head and prototypes of a DeepCluster-v2 release). Raises StateDictError.
    """
    sd = clean_state_dict(sd)
    cfg_arch = (config or {}).get("arch")
    if cfg_arch and arch and cfg_arch != arch:
        raise StateDictError(f"state dict holds {article(cfg_arch)} model, not {article(arch)}")
    arch = arch or cfg_arch or detect_arch(sd)
    if arch is None:
        w0 = sd.get("features.0.weight")
        if w0 is not None:
            raise StateDictError(f"cannot infer the architecture from features.0.weight {tuple(w0.shape)}")
        raise StateDictError(f"state dict matches none of {', '.join(LOADABLE)} (keys such as "
                             f"{list(sd)[:3]})")
    if arch not in LOADABLE:
        raise StateDictError(f"unknown architecture {arch!r}: expected one of {', '.join(LOADABLE)}")
    cls = LOADABLE[arch]
    sd, ignored = cls.adapt_state_dict(sd)
    cfg = cls.config_from_state_dict(sd)
    cfg.update({k: v for k, v in (config or {}).items() if k in ("sobel", "bn", "input_size", "k")})
    model = cls(sobel=cfg["sobel"], bn=cfg["bn"], out=cfg["k"], input_size=cfg["input_size"])
    where = f"{arch} (sobel={cfg['sobel']})"
    own = model.state_dict()
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in own]
    wrong = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own
             if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        raise StateDictError(f"state dict does not fit {where}: {len(missing)} missing keys {missing[:3]}, "
                             f"{len(unexpected)} unexpected keys {unexpected[:3]}, {len(wrong)} shape "
                             f"mismatches {wrong[:2]}")
    model.load_state_dict(sd, strict=False)  # strict up to the BN counters checked above
    return model, ignored
