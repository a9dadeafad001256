"""Probe pooling: how a linear probe (eval_linear.py) or the kNN (knn.py) pools a conv layer's
(B, C, h, w) map before flattening it, so that every layer gives about 9k values."""
from __future__ import annotations

import math

from torch import nn

# AvgPool2d(kernel, stride, padding) per AlexNet conv layer, as in the paper (about 9k dims at 224)
ALEXNET_POOL = {1: (6, 6, 3), 2: (4, 4, 0), 3: (3, 3, 1), 4: (3, 3, 1), 5: (2, 2, 0)}
TARGET_DIM = 9216  # other layers: adaptive pooling to the side closest to sqrt(9216 / C)

def make_pool(arch: str, conv: int, channels: int, hw: tuple[int, int]) -> nn.Module:
    """The per-layer pooling: the paper's AvgPool table for AlexNet, adaptive for the others.

    For input sizes other than 224 the AlexNet kernel is shrunk to fit the feature map.
    """
    h, w = hw
    if arch == "alexnet":
        k, s, pad = ALEXNET_POOL[conv]
        k = max(1, min(k, h, w))
        s = max(1, min(s, k))
        pad = min(pad, k // 2)
        return nn.AvgPool2d(k, stride=s, padding=pad)
    side = max(1, round(math.sqrt(TARGET_DIM / channels)))
    return nn.AdaptiveAvgPool2d(min(side, h, w))
