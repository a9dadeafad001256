"""ResNet-50 for DeepCluster, on torchvision's ResNet-50 (same module and key names); ResNet-18,
the trunk of DeepCluster-v2's small-data runs, for the evaluations.

The body is torchvision's (``conv1``, ``bn1``, ``layer1`` .. ``layer4``, ``avgpool``), so a
torchvision-format state dict loads as is; its ``fc`` becomes our ``top_layer`` (the
replaceable head DeepCluster re-creates every epoch). What DeepCluster clusters is the
2048-d global-average-pooled output (``forward_features``). With ``sobel=True`` the frozen
grayscale + Sobel block runs first and ``conv1`` takes 2 channels.

:class:`ResNet18` is the same network on torchvision's ResNet-18 (512-d): what
``main_deepclusterv2.py --arch resnet18`` trains, loaded by ``checkpoint.load_model`` for
eval_knn, eval_linear and eval_voc_classif. ``main.py`` does not train it (not in ``ARCHS``).
"""
from __future__ import annotations

import torch
import torchvision
from torch import nn

from .common import ProbeError, ProbeMixin, StateDictError, make_sobel, new_top_layer

FEATURE_DIM = 2048  # avgpool output of ResNet-50
# (probe point, channels): conv1 is after its BN and ReLU (before the max-pool), layerN after
# its last block, avgpool the (B, 2048, 1, 1) pooled map
PROBES = [("conv1", 64), ("layer1", 256), ("layer2", 512), ("layer3", 1024), ("layer4", 2048),
          ("avgpool", 2048)]
PROBES_18 = [("conv1", 64), ("layer1", 64), ("layer2", 128), ("layer3", 256), ("layer4", 512), ("avgpool", 512)]
# heads found in released self-supervised checkpoints that this model has no use for
# (SwAV / DeepCluster-v2: projection_head, prototypes; mmselfsup: neck, head)
FOREIGN_HEADS = ("projection_head.", "prototypes.", "neck.", "head.")


class ResNet50(ProbeMixin, nn.Module):
    """torchvision's ResNet-50 body, optional Sobel block, a replaceable ``top_layer``.

    ``forward``: (B, 3, H, W) -> (B, k) logits, or the (B, 2048) features without a head.
    Any input size of at least 32 px works (global average pooling).
    """

    arch = "resnet50"
    feature_dim = FEATURE_DIM
    probes = PROBES
    torchvision_builder = staticmethod(torchvision.models.resnet50)

    def __init__(self, sobel: bool = False, bn: bool = True, out: int | None = 1000, input_size: int = 224):
        if not bn:
            raise ValueError(f"{self.arch} is only built with BatchNorm (bn=False is for alexnet/vgg16)")
        super().__init__()
        tv = self.torchvision_builder(weights=None)  # torchvision's init (He fan-out, BN 1/0)
        self.sobel = make_sobel() if sobel else None
        if sobel:
            tv.conv1 = nn.Conv2d(2, 64, kernel_size=7, stride=2, padding=3, bias=False)
            nn.init.kaiming_normal_(tv.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.conv1, self.bn1, self.relu, self.maxpool = tv.conv1, tv.bn1, tv.relu, tv.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = tv.layer1, tv.layer2, tv.layer3, tv.layer4
        self.avgpool = tv.avgpool
        # no fc6/fc7: an empty classifier keeps code written for the AlexNet/VGG-16 heads running
        self.classifier = nn.Sequential()
        self.top_layer = new_top_layer(out, self.feature_dim) if out else None
        self.use_sobel = bool(sobel)
        self.bn = True
        self.input_size = int(input_size)

    # -- forward passes ---------------------------------------------------------------
    def _stages(self) -> list[nn.Module]:
        return [self.conv1, self.bn1, self.relu, self.maxpool, self.layer1, self.layer2, self.layer3,
                self.layer4]

    def forward_conv(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 2048, H/32, W/32) layer4 output."""
        if self.sobel is not None:
            x = self.sobel(x)
        for m in self._stages():
            x = m(x)
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 2048) global-average-pooled layer4 (what DeepCluster clusters)."""
        return torch.flatten(self.avgpool(self.forward_conv(x)), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, k) logits, or (B, 2048) features when there is no top layer."""
        x = self.forward_features(x)  # already post-ReLU: no extra ReLU before the head
        if self.top_layer is not None:
            x = self.top_layer(x)
        return x

    # -- head management --------------------------------------------------------------
    def reset_top_layer(self, k: int) -> nn.Linear:
        """Replace the top layer by a fresh Linear(2048, k) on the model's device and dtype."""
        ref = self.conv1.weight
        self.top_layer = new_top_layer(k, self.feature_dim).to(device=ref.device, dtype=ref.dtype)
        return self.top_layer

    def body_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters of the body (everything but the top layer and the Sobel block)."""
        return [p for m in self._stages() for p in m.parameters() if p.requires_grad]

    def config(self) -> dict:
        """Plain-type description from which ``models.build_model`` rebuilds the same network."""
        k = self.top_layer.out_features if self.top_layer is not None else 0
        return {"arch": self.arch, "sobel": self.use_sobel, "bn": True, "input_size": self.input_size, "k": k}

    # -- probe points -----------------------------------------------------------------
    def probe_points(self) -> list[str]:
        return [name for name, _ in self.probes]

    def conv_layers(self) -> list[str]:
        """The probe points (conv1, layer1..layer4, avgpool)."""
        return self.probe_points()

    def _trunk_body(self, i: int, relu: bool) -> tuple[nn.Sequential, int]:
        stages = self._stages()
        if not relu:
            if i != 0:  # a block's last ReLU follows its residual sum, inside the block
                raise ProbeError(f"{self.probes[i][0]!r} has no reachable pre-ReLU responses (a residual "
                                 f"block applies its last ReLU inside it); only conv1 has")
            return nn.Sequential(*stages[:2]), self.probes[0][1]
        end = 3 if i == 0 else 4 + i                     # conv1: conv, bn, relu; layerN: + maxpool
        body = stages[:min(end, len(stages))]
        if i == len(self.probes) - 1:
            body = body + [self.avgpool]                 # (B, 2048, 1, 1)
        return nn.Sequential(*body), self.probes[i][1]

    @property
    def conv_body(self) -> nn.Module:
        """Everything but the head (frozen by the transfer evaluations)."""
        return nn.Sequential(*self._stages())

    # -- building from a state dict ------------------------------------------------------
    @classmethod
    def claims(cls, sd: dict) -> bool:
        keys = {_strip_backbone(k) for k in sd}
        return "conv1.weight" in keys and "layer1.0.conv1.weight" in keys

    @classmethod
    def adapt_state_dict(cls, sd: dict) -> tuple[dict, list[str]]:
        """torchvision / SwAV / mmselfsup layouts -> ours; returns (state dict, ignored keys).

        ``backbone.`` prefixes are dropped, torchvision's ``fc.*`` becomes ``top_layer.*``,
        and heads this model has no use for (``projection_head``, ``prototypes``, ``neck``,
        ``head``) are ignored.
        """
        out, ignored = {}, []
        for k, v in sd.items():
            k2 = _strip_backbone(k)
            if k2.startswith(FOREIGN_HEADS):
                ignored.append(k)
                continue
            if k2.startswith("fc."):
                k2 = "top_layer." + k2[len("fc."):]
            out[k2] = v
        return out, ignored

    @classmethod
    def config_from_state_dict(cls, sd: dict) -> dict:
        w0 = sd.get("conv1.weight")
        if w0 is None:
            raise StateDictError(f"state dict has no 'conv1.weight': not a {cls.arch}")
        sobel = "sobel.0.weight" in sd
        if w0.dim() != 4 or w0.shape[1] != (2 if sobel else 3):
            raise StateDictError(f"conv1.weight has shape {tuple(w0.shape)}, which does not match "
                                 f"sobel={sobel} (expected (64, {2 if sobel else 3}, 7, 7))")
        k = int(sd["top_layer.bias"].shape[0]) if "top_layer.bias" in sd else 0
        return {"arch": cls.arch, "sobel": sobel, "bn": True, "input_size": 224, "k": k}

    def torchvision_state_dict(self) -> dict:
        """Our state dict in torchvision's layout (``top_layer`` -> ``fc``; no Sobel keys)."""
        return {("fc." + k[len("top_layer."):] if k.startswith("top_layer.") else k): v
                for k, v in self.state_dict().items() if not k.startswith("sobel.")}


class ResNet18(ResNet50):
    """torchvision's ResNet-18 body (basic blocks, 512-d pooled features), otherwise as
    :class:`ResNet50`: the trunk of ``main_deepclusterv2.py --arch resnet18`` checkpoints."""

    arch = "resnet18"
    feature_dim = 512
    probes = PROBES_18
    torchvision_builder = staticmethod(torchvision.models.resnet18)

    @classmethod
    def claims(cls, sd: dict) -> bool:
        """ResNet-18's exact layout: basic blocks (no ``conv3``), two per stage."""
        keys = {_strip_backbone(k) for k in sd}
        return ("conv1.weight" in keys and "layer1.0.conv1.weight" in keys and "layer1.0.conv3.weight" not in keys
                and all(f"layer{i}.1.conv1.weight" in keys and f"layer{i}.2.conv1.weight" not in keys
                        for i in range(1, 5)))


def _strip_backbone(key: str) -> str:
    return key[len("backbone."):] if key.startswith("backbone.") else key


def resnet50(sobel: bool = False, bn: bool = True, out: int = 1000, input_size: int = 224) -> ResNet50:
    """ResNet-50 with ``out`` outputs (``out=0``/None: no top layer, forward gives 2048-d)."""
    return ResNet50(sobel=sobel, bn=bn, out=out, input_size=input_size)


def resnet18(sobel: bool = False, bn: bool = True, out: int = 1000, input_size: int = 224) -> ResNet18:
    """ResNet-18 with ``out`` outputs (``out=0``/None: no top layer, forward gives 512-d)."""
    return ResNet18(sobel=sobel, bn=bn, out=out, input_size=input_size)
