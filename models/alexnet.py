"""AlexNet as used by DeepCluster (BN after every conv)."""
from __future__ import annotations

from torch import nn

from .common import FC_DIM, DeepClusterNet, flat_dim

# (out_channels, kernel, stride, padding) per conv; "M" = MaxPool2d(3, 2)
CFG = [(96, 11, 4, 2), "M", (256, 5, 1, 2), "M", (384, 3, 1, 1), (384, 3, 1, 1), (256, 3, 1, 1), "M"]


def make_features(in_channels: int, bn: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    c = in_channels
    for v in CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=3, stride=2))
            continue
        out_c, k, s, p = v
        layers.append(nn.Conv2d(c, out_c, kernel_size=k, stride=s, padding=p))
        if bn:
            layers.append(nn.BatchNorm2d(out_c))
        layers.append(nn.ReLU(inplace=True))
        c = out_c
    return nn.Sequential(*layers)


class AlexNet(DeepClusterNet):
    arch = "alexnet"
    first_conv_out = 96
    fc6_index = 1
    make_features = staticmethod(make_features)

    def __init__(self, sobel: bool = False, bn: bool = True, out: int | None = 1000, input_size: int = 224):
        in_channels = 2 if sobel else 3
        features = make_features(in_channels, bn)
        # 256 x 6 x 6 = 9216 at 224; smaller inputs give a smaller fc6 (e.g. 256 at 64).
        dim = flat_dim(features, in_channels, input_size)
        classifier = nn.Sequential(
            nn.Dropout(0.5),
            nn.Linear(dim, FC_DIM),
            nn.ReLU(inplace=True),
            nn.Dropout(0.5),
            nn.Linear(FC_DIM, FC_DIM),
            nn.ReLU(inplace=True),
        )
        super().__init__(features, classifier, out, sobel, bn, input_size)


def alexnet(sobel: bool = False, bn: bool = True, out: int = 1000, input_size: int = 224) -> AlexNet:
    """AlexNet with ``out`` outputs (``out=0``/None: no top layer)."""
    return AlexNet(sobel=sobel, bn=bn, out=out, input_size=input_size)
