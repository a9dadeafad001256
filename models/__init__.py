"""DeepCluster convnets: AlexNet and VGG-16 with an optional frozen Sobel block.

The constructors keep the original signatures (``alexnet(sobel=, bn=, out=)``) so that
code written for the original release keeps working.
"""
from .alexnet import AlexNet, alexnet
from .common import DeepClusterNet, build_model
from .vgg16 import VGG16, vgg16

ARCHS = ("alexnet", "vgg16")

__all__ = ["AlexNet", "VGG16", "DeepClusterNet", "alexnet", "vgg16", "build_model", "ARCHS"]
