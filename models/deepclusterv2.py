"""DeepCluster-v2 network (facebookresearch/swav ``src/resnet50.py``, written anew).

ResNet trunk (torchvision's modules and keys: ``conv1``, ``bn1``, ``layer1`` .. ``layer4``)
-> global average pooling -> projection MLP ``projection_head`` (Linear(C, hidden_mlp) ->
BatchNorm1d -> ReLU -> Linear(hidden_mlp, feat_dim); a single Linear with ``hidden_mlp=0``)
-> L2 normalisation -> ``prototypes.prototypes{i}``: one bias-free Linear(feat_dim, K_i) per
head. C = 2048 (ResNet-50, swav's) or 512 (ResNet-18, for small data).

swav pads the input by 1 with a ``ConstantPad2d`` and gives ``conv1`` a padding of 2; that is
torchvision's padding of 3 (both zero), which is used here: same outputs, same keys.
The state dict matches swav's checkpoints once their ``module.`` prefix is dropped.
"""
from __future__ import annotations

import torch
import torchvision
from torch import nn

from .common import ProbeError, ProbeMixin, StateDictError, clean_state_dict

TRUNK_DIM = {"resnet50": 2048, "resnet18": 512}
# channels after conv1 and after each stage, per architecture
STAGE_CHANNELS = {"resnet50": (64, 256, 512, 1024, 2048), "resnet18": (64, 64, 128, 256, 512)}


class MultiPrototypes(nn.Module):
    """One bias-free Linear(feat_dim, K_i) per head, named ``prototypes{i}`` (swav's keys)."""

    def __init__(self, output_dim: int, nmb_prototypes: list[int]):
        super().__init__()
        self.nmb_heads = len(nmb_prototypes)
        for i, k in enumerate(nmb_prototypes):
            self.add_module(f"prototypes{i}", nn.Linear(output_dim, int(k), bias=False))

    def head(self, i: int) -> nn.Linear:
        return getattr(self, f"prototypes{i}")

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, feat_dim) -> [(B, K_i)] scores of each head."""
        return [self.head(i)(x) for i in range(self.nmb_heads)]


class DeepClusterV2Net(ProbeMixin, nn.Module):
    """ResNet trunk + projection head + L2 + multi-head prototypes.

    ``forward(inputs)``: a tensor or a list of crops (consecutive crops of equal size are
    batched together, as swav) -> (embeddings (sum_c B, feat_dim) L2-normalised, [scores
    (sum_c B, K_i) per head]), the rows ordered crop by crop. ``forward_features(x)``: the
    (B, C) pooled trunk output (kNN monitor, linear probes).
    """

    use_sobel = False
    bn = True

    def __init__(self, arch: str = "resnet50", hidden_mlp: int = 2048, feat_dim: int = 128,
                 nmb_prototypes: list[int] | tuple[int, ...] = (3000, 3000, 3000), normalize: bool = True,
                 input_size: int = 224):
        super().__init__()
        if arch not in TRUNK_DIM:
            raise ValueError(f"unknown architecture {arch!r}: expected one of {', '.join(TRUNK_DIM)}")
        self.arch = arch
        self.sobel = None
        tv = getattr(torchvision.models, arch)(weights=None)  # kaiming fan_out convs, BN 1/0 (= swav's)
        self.conv1, self.bn1, self.relu, self.maxpool = tv.conv1, tv.bn1, tv.relu, tv.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = tv.layer1, tv.layer2, tv.layer3, tv.layer4
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.feature_dim = TRUNK_DIM[arch]
        self.hidden_mlp, self.feat_dim = int(hidden_mlp), int(feat_dim)
        self.nmb_prototypes = [int(k) for k in nmb_prototypes]
        self.l2norm = bool(normalize)
        self.input_size = int(input_size)
        c = self.feature_dim
        if feat_dim == 0:
            self.projection_head = None
        elif hidden_mlp == 0:
            self.projection_head = nn.Linear(c, feat_dim)
        else:
            self.projection_head = nn.Sequential(nn.Linear(c, hidden_mlp), nn.BatchNorm1d(hidden_mlp),
                                                 nn.ReLU(inplace=True), nn.Linear(hidden_mlp, feat_dim))
        out_dim = feat_dim or c
        self.prototypes = MultiPrototypes(out_dim, self.nmb_prototypes) if self.nmb_prototypes else None

    # -- forward passes -------------------------------------------------------------------
    def _stages(self) -> list[nn.Module]:
        return [self.conv1, self.bn1, self.relu, self.maxpool, self.layer1, self.layer2, self.layer3,
                self.layer4]

    def forward_conv(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, C, H/32, W/32) layer4 output."""
        for m in self._stages():
            x = m(x)
        return x

    def forward_backbone(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, C) average-pooled layer4."""
        return torch.flatten(self.avgpool(self.forward_conv(x)), 1)

    forward_features = forward_backbone

    def forward_head(self, x: torch.Tensor):
        """(B, C) -> (B, feat_dim) embeddings [, per-head (B, K_i) scores]."""
        if self.projection_head is not None:
            x = self.projection_head(x)
        if self.l2norm:
            x = nn.functional.normalize(x, dim=1, p=2)
        if self.prototypes is not None:
            return x, self.prototypes(x)
        return x

    def forward(self, inputs):
        if not isinstance(inputs, (list, tuple)):
            inputs = [inputs]
        feats, start = [], 0
        # one trunk pass per run of same-resolution crops (swav's unique_consecutive grouping)
        while start < len(inputs):
            end = start + 1
            while end < len(inputs) and inputs[end].shape[-1] == inputs[start].shape[-1]:
                end += 1
            feats.append(self.forward_backbone(torch.cat(list(inputs[start:end]))))
            start = end
        return self.forward_head(torch.cat(feats) if len(feats) > 1 else feats[0])

    # -- parameters, config ---------------------------------------------------------------
    def prototype_parameters(self) -> list[nn.Parameter]:
        return list(self.prototypes.parameters()) if self.prototypes is not None else []

    def body_parameters(self) -> list[nn.Parameter]:
        """Trunk parameters (what the transfer evaluations freeze or fine-tune)."""
        return [p for m in self._stages() for p in m.parameters()]

    @property
    def conv_body(self) -> nn.Module:
        return nn.Sequential(*self._stages())

    def config(self) -> dict:
        """Plain-type description from which :func:`build_dcv2` rebuilds the same network."""
        return {"arch": f"dcv2_{self.arch}", "trunk": self.arch, "hidden_mlp": self.hidden_mlp,
                "feat_dim": self.feat_dim, "nmb_prototypes": list(self.nmb_prototypes),
                "normalize": self.l2norm, "input_size": self.input_size, "sobel": False, "bn": True, "k": 0}

    # -- probe points (models/common.py conventions) ---------------------------------------
    def probe_points(self) -> list[str]:
        return ["conv1", "layer1", "layer2", "layer3", "layer4", "avgpool"]

    def conv_layers(self) -> list[str]:
        return self.probe_points()

    def _trunk_body(self, i: int, relu: bool) -> tuple[nn.Sequential, int]:
        stages, ch = self._stages(), STAGE_CHANNELS[self.arch]
        if not relu:
            if i != 0:
                raise ProbeError(f"{self.probe_points()[i]!r} has no reachable pre-ReLU responses; only conv1 has")
            return nn.Sequential(*stages[:2]), ch[0]
        if i == 0:
            return nn.Sequential(*stages[:3]), ch[0]
        body = stages[:min(4 + i, len(stages))]
        if i == 5:
            body = body + [self.avgpool]
        return nn.Sequential(*body), ch[min(i, 4)]


def build_dcv2(cfg: dict) -> DeepClusterV2Net:
    """The network a :meth:`DeepClusterV2Net.config` describes."""
    return DeepClusterV2Net(arch=cfg.get("trunk", "resnet50"), hidden_mlp=cfg.get("hidden_mlp", 2048),
                            feat_dim=cfg.get("feat_dim", 128),
                            nmb_prototypes=cfg.get("nmb_prototypes", [3000, 3000, 3000]),
                            normalize=cfg.get("normalize", True), input_size=cfg.get("input_size", 224))


def dcv2_config_from_state_dict(sd: dict) -> dict:
    """Trunk, hidden_mlp, feat_dim and heads of a (``module.``-free) DeepCluster-v2 state dict."""
    if "conv1.weight" not in sd or "layer1.0.conv1.weight" not in sd:
        raise StateDictError("state dict has no 'conv1.weight' / 'layer1.0.conv1.weight': not a ResNet trunk")
    trunk = "resnet50" if "layer1.0.conv3.weight" in sd else "resnet18"
    if "projection_head.0.weight" in sd:
        hidden, feat = int(sd["projection_head.0.weight"].shape[0]), int(sd["projection_head.3.weight"].shape[0])
    elif "projection_head.weight" in sd:
        hidden, feat = 0, int(sd["projection_head.weight"].shape[0])
    else:
        hidden, feat = 0, 0
    heads, i = [], 0
    while f"prototypes.prototypes{i}.weight" in sd:
        heads.append(int(sd[f"prototypes.prototypes{i}.weight"].shape[0]))
        i += 1
    if not heads and "prototypes.weight" in sd:
        raise StateDictError("single-head 'prototypes.weight' (a SwAV checkpoint) is not a DeepCluster-v2 layout")
    return {"arch": f"dcv2_{trunk}", "trunk": trunk, "hidden_mlp": hidden, "feat_dim": feat,
            "nmb_prototypes": heads, "normalize": True, "input_size": 224}


def dcv2_from_state_dict(sd: dict, config: dict | None = None) -> DeepClusterV2Net:
    """Build and load (strictly, up to BN batch counters) a DeepCluster-v2 network from ours or
    swav's released layout (``module.`` prefixes, ``projection_head.*``, ``prototypes.*``)."""
    sd = clean_state_dict(sd)
    cfg = dcv2_config_from_state_dict(sd)
    cfg.update({k: v for k, v in (config or {}).items() if k == "input_size"})
    model = build_dcv2(cfg)
    own = model.state_dict()
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in own]
    wrong = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        raise StateDictError(f"state dict does not fit dcv2 {cfg['trunk']}: {len(missing)} missing keys "
                             f"{missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}, {len(wrong)} "
                             f"shape mismatches {wrong[:2]}")
    model.load_state_dict(sd, strict=False)
    return model


def dcv2_loss(scores: list[torch.Tensor], targets: torch.Tensor, n_crops: int,
              temperature: float = 0.1, n_labelled: float | None = None) -> torch.Tensor:
    """swav's DeepCluster-v2 loss: mean over heads h of CrossEntropy(scores[h] / temperature,
    targets[h] repeated for each crop), ignore_index -100 (images without assignment).

    ``scores[h]``: (n_crops * B, K_h), rows crop by crop; ``targets``: (heads, B) int64.
    ``n_labelled`` (under torchrun): the labelled images of the global batch divided by the
    number of processes. The cross-entropy is then this process's sum over its labelled rows
    divided by ``n_crops * n_labelled``, so the mean over the processes (DDP's gradient
    average) is the global batch's mean, however the labelled images fall on the processes.
    swav takes each process's own mean, which weighs the images differently when a process
    holds more unlabelled ones (the same when every image has a label).
    """
    ce = nn.CrossEntropyLoss(ignore_index=-100, reduction="mean" if n_labelled is None else "sum")
    loss = 0.0
    for h, s in enumerate(scores):
        term = ce(s / temperature, targets[h].repeat(n_crops))
        if n_labelled is not None:
            term = term / (n_crops * n_labelled if n_labelled > 0 else 1.0)  # no label anywhere: 0
        loss = loss + term
    return loss / len(scores)
