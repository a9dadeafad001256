"""VGG-16 as used by DeepCluster (BN after every conv; no dropout before fc6)."""
from __future__ import annotations

from torch import nn

from .common import DeepClusterNet, conv_stack, fc_head, flat_dim

# 3x3 convs, stride 1, padding 1; "M" = MaxPool2d(2, 2)
CFG = [(c, 3, 1, 1) if c != "M" else c
       for c in [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]]


def make_features(in_channels: int, bn: bool) -> nn.Sequential:
    return conv_stack(CFG, in_channels, bn, pool=(2, 2))


class VGG16(DeepClusterNet):
    arch = "vgg16"
    first_conv_out = 64
    fc6_index = 0
    make_features = staticmethod(make_features)

    def __init__(self, sobel: bool = False, bn: bool = True, out: int | None = 1000, input_size: int = 224):
        in_channels = 2 if sobel else 3
        features = make_features(in_channels, bn)
        dim = flat_dim(features, in_channels, input_size)  # 512 x 7 x 7 = 25088 at 224
        classifier = fc_head(dim, dropout_before_fc6=False)
        super().__init__(features, classifier, out, sobel, bn, input_size)


def vgg16(sobel: bool = False, bn: bool = True, out: int = 1000, input_size: int = 224) -> VGG16:
    """VGG-16 with ``out`` outputs (``out=0``/None: no top layer)."""
    return VGG16(sobel=sobel, bn=bn, out=out, input_size=input_size)
