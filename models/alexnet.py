"""AlexNet as used by DeepCluster (BN after every conv)."""
from __future__ import annotations

from torch import nn

from .common import DeepClusterNet, conv_stack, fc_head, flat_dim

# (out_channels, kernel, stride, padding) per conv; "M" = MaxPool2d(3, 2)
CFG = [(96, 11, 4, 2), "M", (256, 5, 1, 2), "M", (384, 3, 1, 1), (384, 3, 1, 1), (256, 3, 1, 1), "M"]


def make_features(in_channels: int, bn: bool) -> nn.Sequential:
    return conv_stack(CFG, in_channels, bn, pool=(3, 2))


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
        classifier = fc_head(dim, dropout_before_fc6=True)
        super().__init__(features, classifier, out, sobel, bn, input_size)


def alexnet(sobel: bool = False, bn: bool = True, out: int = 1000, input_size: int = 224) -> AlexNet:
    """AlexNet with ``out`` outputs (``out=0``/None: no top layer)."""
    return AlexNet(sobel=sobel, bn=bn, out=out, input_size=input_size)
