"""VGG-16 as used by DeepCluster (BN after every conv; no dropout before fc6)."""
from __future__ import annotations

from torch import nn

from .common import FC_DIM, DeepClusterNet, flat_dim

CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


def make_features(in_channels: int, bn: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    c = in_channels
    for v in CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        layers.append(nn.Conv2d(c, v, kernel_size=3, padding=1))
        if bn:
            layers.append(nn.BatchNorm2d(v))
        layers.append(nn.ReLU(inplace=True))
        c = v
    return nn.Sequential(*layers)


class VGG16(DeepClusterNet):
    arch = "vgg16"
    first_conv_out = 64
    fc6_index = 0
    make_features = staticmethod(make_features)

    def __init__(self, sobel: bool = False, bn: bool = True, out: int | None = 1000, input_size: int = 224):
        in_channels = 2 if sobel else 3
        features = make_features(in_channels, bn)
        dim = flat_dim(features, in_channels, input_size)  # 512 x 7 x 7 = 25088 at 224
        classifier = nn.Sequential(
            nn.Linear(dim, FC_DIM),
            nn.ReLU(inplace=True),
            nn.Dropout(0.5),
            nn.Linear(FC_DIM, FC_DIM),
            nn.ReLU(inplace=True),
        )
        super().__init__(features, classifier, out, sobel, bn, input_size)


def vgg16(sobel: bool = False, bn: bool = True, out: int = 1000, input_size: int = 224) -> VGG16:
    """VGG-16 with ``out`` outputs (``out=0``/None: no top layer)."""
    return VGG16(sobel=sobel, bn=bn, out=out, input_size=input_size)
