"""Pieces shared by the DeepCluster convnets: Sobel block, initialisation, the head, the
probe-point trunk, and the AlexNet/VGG-16 base class (``features`` + ``classifier``)."""
from __future__ import annotations

import math
import re

import torch
from torch import nn

FC_DIM = 4096  # width of fc6/fc7; the feature DeepCluster clusters is the 4096-d fc7


def make_sobel() -> nn.Sequential:
    """Frozen grayscale + Sobel block: (B, 3, H, W) normalised RGB -> (B, 2, H, W).

    Keys ``sobel.0.*`` (grayscale 1x1 conv) and ``sobel.1.*`` (the two 3x3 Sobel kernels)
    match the released checkpoints.
    """
    grayscale = nn.Conv2d(3, 1, kernel_size=1, stride=1, padding=0)
    sobel_filter = nn.Conv2d(1, 2, kernel_size=3, stride=1, padding=1)
    with torch.no_grad():
        grayscale.weight.fill_(1.0 / 3.0)
        grayscale.bias.zero_()
        sobel_filter.weight[0, 0] = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]])
        sobel_filter.weight[1, 0] = torch.tensor([[1.0, 2.0, 1.0], [0.0, 0.0, 0.0], [-1.0, -2.0, -1.0]])
        sobel_filter.bias.zero_()
    block = nn.Sequential(grayscale, sobel_filter)
    for p in block.parameters():
        p.requires_grad = False
    return block


def init_weights(module: nn.Module) -> None:
    """The original initialisation, applied to every submodule: conv N(0, sqrt(2 / (k*k*out))),
    biases 0, BN weight 1 and bias 0, linear N(0, 0.01)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)


def conv_stack(cfg: list, in_channels: int, bn: bool, pool: tuple[int, int]) -> nn.Sequential:
    """Conv [+ BatchNorm] + ReLU per ``(out_channels, kernel, stride, padding)`` of ``cfg``;
    ``"M"`` = MaxPool2d(``pool`` = (kernel, stride)). Module indices are the released keys'."""
    layers: list[nn.Module] = []
    c = in_channels
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=pool[0], stride=pool[1]))
            continue
        out_c, k, s, p = v
        layers.append(nn.Conv2d(c, out_c, kernel_size=k, stride=s, padding=p))
        if bn:
            layers.append(nn.BatchNorm2d(out_c))
        layers.append(nn.ReLU(inplace=True))
        c = out_c
    return nn.Sequential(*layers)


def fc_head(dim: int, dropout_before_fc6: bool) -> nn.Sequential:
    """fc6 and fc7 (``dim`` -> 4096 -> 4096, ReLU after each, dropout before fc7; AlexNet also
    has one before fc6). The last ReLU is the one bypassed by ``forward_features``."""
    layers: list[nn.Module] = [nn.Dropout(0.5)] if dropout_before_fc6 else []
    layers += [nn.Linear(dim, FC_DIM), nn.ReLU(inplace=True), nn.Dropout(0.5),
               nn.Linear(FC_DIM, FC_DIM), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


def new_top_layer(k: int, in_dim: int = FC_DIM) -> nn.Linear:
    """Linear(in_dim, k), weight ~ N(0, 0.01), bias 0."""
    top = nn.Linear(in_dim, k)
    nn.init.normal_(top.weight, 0.0, 0.01)
    nn.init.zeros_(top.bias)
    return top


class StateDictError(ValueError):
    """A state dict does not describe (or does not fit) the requested network."""


class ProbeError(ValueError):
    """A probe point (layer to cut the network at) that the network does not have."""


_MODULE_RE = re.compile(r"(^|\.)module\.")


def clean_state_dict(sd: dict) -> dict:
    """Drop the ``module.`` of (Distributed)DataParallel wrappers wherever it appears.

    ``features.module.0.weight`` and ``module.features.0.weight`` both become
    ``features.0.weight``; every other key is kept as is.
    """
    return {_MODULE_RE.sub(r"\1", k): v for k, v in sd.items()}


def probe_arg(value: str) -> int | str:
    """Command-line probe point: ``"3"`` -> 3 (1-based position), ``"layer3"`` -> ``"layer3"``."""
    value = value.strip()
    return int(value) if value.lstrip("-").isdigit() else value


class Trunk(nn.Module):
    """The network from its input to one probe point, sharing the model's modules.

    (B, 3, H, W) ImageNet-normalised RGB -> (B, C, h, w) activations of the probe point (the
    Sobel block, when the model has one, runs first). ``n_filters`` = C. ``freeze()`` makes it
    a fixed feature extractor: no parameter gradients, eval-mode BN whatever ``train()`` says.
    """

    def __init__(self, sobel: nn.Module | None, body: nn.Sequential, name: str, n_filters: int):
        super().__init__()
        self.sobel = sobel
        self.body = body
        self.name = name
        self.n_filters = int(n_filters)
        self.frozen = False

    def freeze(self) -> "Trunk":
        for p in self.parameters():
            p.requires_grad = False
        self.frozen = True
        return self.eval()

    def train(self, mode: bool = True) -> "Trunk":
        return super().train(mode and not getattr(self, "frozen", False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            if self.sobel is not None:
                x = self.sobel(x)
            return self.body(x)


class ProbeMixin:
    """``probe_points()`` names, ``probe_index(layer)`` and ``trunk(layer)`` for any network.

    Subclasses define ``probe_points()`` and ``_trunk_body(i, relu)`` -> (Sequential, channels)
    for the 0-based probe point i.
    """

    arch: str = ""

    def probe_points(self) -> list[str]:
        raise NotImplementedError

    def probe_index(self, layer: int | str) -> int:
        """1-based position of ``layer`` (a position 1..n or a probe-point name)."""
        names = self.probe_points()
        if isinstance(layer, str) and layer in names:
            return names.index(layer) + 1
        if isinstance(layer, int) and not isinstance(layer, bool) and 1 <= layer <= len(names):
            return layer
        raise ProbeError(f"{layer!r} is out of range: {self.arch} has probe points 1..{len(names)} "
                         f"({', '.join(names)})")

    def trunk(self, layer: int | str, relu: bool = True) -> Trunk:
        """The network up to probe point ``layer`` (1-based position or name), post-ReLU.

        ``relu=False``: the responses just before that ReLU (where the network allows it).
        """
        i = self.probe_index(layer) - 1
        body, channels = self._trunk_body(i, relu)
        return Trunk(self.sobel, body, self.probe_points()[i], channels)


class DeepClusterNet(ProbeMixin, nn.Module):
    """Convnet body (``features`` + ``classifier``) plus a replaceable ``top_layer``.

    ``classifier`` ends with the fc7 ReLU. ``forward`` uses it (training on pseudo-labels);
    ``forward_features`` stops before it (the pre-ReLU fc7 feature that is clustered).
    """

    arch: str = ""
    feature_dim: int = FC_DIM   # width of forward_features (what is clustered)
    first_conv_out: int = 0     # out channels of features.0: tells the architectures apart
    fc6_index: int = 0          # position of fc6 in ``classifier``

    @staticmethod
    def make_features(in_channels: int, bn: bool) -> nn.Sequential:
        raise NotImplementedError

    def __init__(self, features: nn.Sequential, classifier: nn.Sequential, out: int | None,
                 sobel: bool, bn: bool, input_size: int):
        super().__init__()
        self.sobel = make_sobel() if sobel else None
        self.features = features
        self.classifier = classifier
        self.top_layer = new_top_layer(out) if out else None
        self.use_sobel = bool(sobel)
        self.bn = bool(bn)
        self.input_size = int(input_size)
        init_weights(self.features)
        init_weights(self.classifier)

    # -- forward passes ---------------------------------------------------------------
    def forward_conv(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised RGB -> (B, C, h, w) last conv block output."""
        if self.sobel is not None:
            x = self.sobel(x)
        return self.features(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 4096) fc7 output *before* its ReLU (what DeepCluster clusters)."""
        x = torch.flatten(self.forward_conv(x), 1)
        return self.classifier[:-1](x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, k) logits, or (B, 4096) post-ReLU fc7 when there is no top layer."""
        x = torch.relu(self.forward_features(x))
        if self.top_layer is not None:
            x = self.top_layer(x)
        return x

    # -- head management --------------------------------------------------------------
    def reset_top_layer(self, k: int) -> nn.Linear:
        """Replace the top layer by a fresh Linear(4096, k) on the model's device."""
        ref = self.classifier[-2].weight
        self.top_layer = new_top_layer(k).to(device=ref.device, dtype=ref.dtype)
        return self.top_layer

    def body_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters of the body (everything but the top layer and the Sobel block)."""
        return [p for p in list(self.features.parameters()) + list(self.classifier.parameters())
                if p.requires_grad]

    def conv_layers(self) -> list[int]:
        """Indices in ``features`` of each conv's ReLU: index ``conv_layers()[i]`` ends conv i+1."""
        out, seen_conv = [], False
        for i, m in enumerate(self.features):
            if isinstance(m, nn.Conv2d):
                seen_conv = True
            if isinstance(m, nn.ReLU) and seen_conv:
                out.append(i)
                seen_conv = False
        return out

    def config(self) -> dict:
        """Plain-type description from which ``build_model`` rebuilds the same network."""
        k = self.top_layer.out_features if self.top_layer is not None else 0
        return {"arch": self.arch, "sobel": self.use_sobel, "bn": self.bn,
                "input_size": self.input_size, "k": k}

    # -- probe points -----------------------------------------------------------------
    def probe_points(self) -> list[str]:
        """``conv1`` .. ``convN``: the ReLU output of each conv layer."""
        return [f"conv{i + 1}" for i in range(len(self.conv_layers()))]

    def _trunk_body(self, i: int, relu: bool) -> tuple[nn.Sequential, int]:
        end = self.conv_layers()[i] + (1 if relu else 0)  # the ReLU, or the layer before it
        body = self.features[:end]
        convs = [m for m in body if isinstance(m, nn.Conv2d)]
        return body, int(convs[-1].out_channels)

    @property
    def conv_body(self) -> nn.Module:
        """The convolutional part (frozen by the transfer evaluations)."""
        return self.features

    # -- building from a state dict ------------------------------------------------------
    @classmethod
    def claims(cls, sd: dict) -> bool:
        """Whether a (clean) state dict looks like this architecture."""
        w0 = sd.get("features.0.weight")
        return w0 is not None and w0.dim() == 4 and w0.shape[0] == cls.first_conv_out

    @classmethod
    def adapt_state_dict(cls, sd: dict) -> tuple[dict, list[str]]:
        """(state dict in our key layout, keys ignored): the released layout is already ours."""
        return sd, []

    @classmethod
    def config_from_state_dict(cls, sd: dict) -> dict:
        """Sobel, BN, input size (from fc6's width) and k of a (clean) state dict."""
        w0 = sd.get("features.0.weight")
        if w0 is None:
            raise StateDictError(f"state dict has no 'features.0.weight': not a DeepCluster {cls.arch}")
        sobel = "sobel.0.weight" in sd
        if w0.shape[1] != (2 if sobel else 3):
            raise StateDictError(f"features.0.weight has {w0.shape[1]} input channels, which does not "
                                 f"match sobel={sobel}")
        bn = "features.1.running_mean" in sd
        fc6 = sd.get(f"classifier.{cls.fc6_index}.weight")
        if fc6 is None:
            raise StateDictError(f"state dict lacks the fc6 weight expected for {cls.arch}")
        k = int(sd["top_layer.bias"].shape[0]) if "top_layer.bias" in sd else 0
        return {"arch": cls.arch, "sobel": sobel, "bn": bn,
                "input_size": cls.input_size_for(sobel, bn, int(fc6.shape[1])), "k": k}

    @classmethod
    def input_size_for(cls, sobel: bool, bn: bool, fc6_in: int) -> int:
        """An input size whose conv output has ``fc6_in`` values: 224 first, then round sizes."""
        with torch.device("meta"):  # layer hyper-parameters only, no memory
            features = cls.make_features(2 if sobel else 3, bn)
        rest = range(32, 1025)
        order = [224] + [x for step in (32, 16, 8, 1) for x in rest if x % step == 0]
        for size in dict.fromkeys(order):
            try:
                if flat_dim(features, 2 if sobel else 3, size) == fc6_in:
                    return size
            except ValueError:  # too small for this network
                continue
        raise StateDictError(f"fc6 takes {fc6_in} inputs, which matches no input size for {cls.arch}")


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def flat_dim(features: nn.Sequential, in_channels: int, input_size: int) -> int:
    """Number of values the conv body outputs for one (in_channels, S, S) image.

    Computed from the layer hyper-parameters (a forward pass at 224 costs seconds for
    VGG-16 on CPU); falls back to a forward pass for layers it does not know.
    """
    c, h, w = in_channels, input_size, input_size
    for m in features:
        if isinstance(m, (nn.Conv2d, nn.MaxPool2d)) and not getattr(m, "ceil_mode", False):
            (kh, kw), (sh, sw) = _pair(m.kernel_size), _pair(m.stride)
            (ph, pw), (dh, dw) = _pair(m.padding), _pair(m.dilation)
            h = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
            w = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
            if isinstance(m, nn.Conv2d):
                c = m.out_channels
        elif not isinstance(m, (nn.BatchNorm2d, nn.ReLU, nn.Dropout)):
            # eval mode: a train-mode pass would move the BN running statistics off 0/1
            was_training = features.training
            features.eval()
            with torch.no_grad():
                out = features(torch.zeros(1, in_channels, input_size, input_size))
            features.train(was_training)
            return int(out.numel())
        if h < 1 or w < 1:
            raise ValueError(f"input size {input_size} is too small for this network")
    return int(c * h * w)

def to_channels_last(obj):
    """Module -> converted in place (and returned); 4-d tensor -> channels-last copy/view.

    Other tensors are returned unchanged, so it can wrap any batch.
    """
    if isinstance(obj, nn.Module):
        return obj.to(memory_format=torch.channels_last)
    if isinstance(obj, torch.Tensor) and obj.dim() == 4:
        return obj.contiguous(memory_format=torch.channels_last)
    return obj
