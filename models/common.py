"""Pieces shared by the DeepCluster convnets: Sobel block, initialisation, the head."""
from __future__ import annotations

import math

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
    """The original initialisation (SPEC 2), applied to every submodule."""
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


def new_top_layer(k: int, in_dim: int = FC_DIM) -> nn.Linear:
    """Linear(4096, k), weight ~ N(0, 0.01), bias 0."""
    top = nn.Linear(in_dim, k)
    nn.init.normal_(top.weight, 0.0, 0.01)
    nn.init.zeros_(top.bias)
    return top


class DeepClusterNet(nn.Module):
    """Convnet body (``features`` + ``classifier``) plus a replaceable ``top_layer``.

    ``classifier`` ends with the fc7 ReLU. ``forward`` uses it (training on pseudo-labels);
    ``forward_features`` stops before it (the pre-ReLU fc7 feature that is clustered).
    """

    arch: str = ""

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


def build_model(arch: str, sobel: bool = False, bn: bool = True, out: int = 1000,
                input_size: int = 224) -> DeepClusterNet:
    """Build a model by architecture name (``alexnet`` or ``vgg16``)."""
    from .alexnet import alexnet
    from .vgg16 import vgg16
    ctor = {"alexnet": alexnet, "vgg16": vgg16}.get(arch)
    if ctor is None:
        raise ValueError(f"unknown architecture {arch!r}: expected one of alexnet, vgg16")
    return ctor(sobel=sobel, bn=bn, out=out, input_size=input_size)
