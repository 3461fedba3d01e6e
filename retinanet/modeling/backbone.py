"""ResNet / ResNeXt (with FrozenBatchNorm2d) and the Feature Pyramid Network (Focal Loss paper, sec. 4).

Parameter names follow torchvision's ResNet (conv1, bn1, layer1.0.conv1, ..., downsample.0/1),
so an ImageNet checkpoint from torchvision loads without renaming.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# name -> (block, blocks per stage, groups, width per group)
RESNETS = {
    "resnet18": ("basic", [2, 2, 2, 2], 1, 64),
    "resnet34": ("basic", [3, 4, 6, 3], 1, 64),
    "resnet50": ("bottleneck", [3, 4, 6, 3], 1, 64),
    "resnet101": ("bottleneck", [3, 4, 23, 3], 1, 64),
    "resnext101_32x8d": ("bottleneck", [3, 4, 23, 3], 32, 8),
}


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm with fixed statistics and affine parameters (buffers, not parameters).

    y = (x - running_mean) / sqrt(running_var + eps) * weight + bias, as one per-channel
    scale and shift. Buffer names match nn.BatchNorm2d's, so pretrained BN weights load.

    Evaluated as torchvision's FrozenBatchNorm2d evaluates it, x * scale, then + shift (two roundings),
    so a converted torchvision model computes its features to the bit; the shift is added in place,
    which makes it as fast as a fused multiply-add (benchmarks/bench_frozen_bn.py).
    folded: the conv before this layer applies it (`retinanet.optimize.fold_frozen_bn_for_training`);
      forward then passes x through.
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.folded = False
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.pop(prefix + "num_batches_tracked", None)  # BatchNorm2d has it; we do not
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def scale_shift(self) -> tuple:
        """(C,), (C,): the per-channel affine map this layer applies."""
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        return scale, self.bias - self.running_mean * scale

    def forward(self, x: Tensor) -> Tensor:
        if self.folded:
            return x
        scale, shift = self.scale_shift()
        # in x's dtype and memory format; one fresh tensor (x * scale + shift would allocate two)
        return (x * scale.to(x.dtype).reshape(1, -1, 1, 1)).add_(shift.to(x.dtype).reshape(1, -1, 1, 1))

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}" + (", folded" if self.folded else "")


def make_norm(kind: str, channels: int) -> nn.Module:
    if kind == "frozen_bn":
        return FrozenBatchNorm2d(channels)
    if kind == "bn":
        return nn.BatchNorm2d(channels)
    if kind == "gn":
        groups = 32
        while channels % groups:
            groups //= 2
        return nn.GroupNorm(groups, channels)
    raise ValueError(f"unknown norm '{kind}' (expected frozen_bn, bn or gn)")


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride, norm, groups=1, width_per_group=64):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = make_norm(norm, planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = make_norm(norm, planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), make_norm(norm, planes))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        return F.relu(out + identity, inplace=True)


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck (stride on the 3x3 conv), as torchvision."""

    expansion = 4

    def __init__(self, inplanes, planes, stride, norm, groups=1, width_per_group=64):
        super().__init__()
        width = int(planes * (width_per_group / 64.0)) * groups
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = make_norm(norm, width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, groups=groups, bias=False)
        self.bn2 = make_norm(norm, width)
        self.conv3 = nn.Conv2d(width, out, 1, bias=False)
        self.bn3 = make_norm(norm, out)
        self.downsample = None
        if stride != 1 or inplanes != out:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride, bias=False), make_norm(norm, out))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        y = F.relu(self.bn1(self.conv1(x)), inplace=True)
        y = F.relu(self.bn2(self.conv2(y)), inplace=True)
        y = self.bn3(self.conv3(y))
        return F.relu(y + identity, inplace=True)


class ResNet(nn.Module):
    """ResNet body returning the stage outputs C2..C5 (strides 4, 8, 16, 32).

    Args:
        name: one of RESNETS.
        width: stem channels (64 for the standard nets; smaller gives a tiny ResNet for tests/demo).
        norm: "frozen_bn", "bn" or "gn".
        frozen_stages: 0 trains everything; 1 freezes the stem; k >= 2 also freezes layer1..layer{k-1}.
        norm_eps: the BatchNorm eps (1e-5; torchvision's COCO detection weights were trained with 0).
    """

    def __init__(self, name: str = "resnet50", width: int = 64, norm: str = "frozen_bn", frozen_stages: int = 2,
                 norm_eps: float = 1e-5):
        super().__init__()
        if name not in RESNETS:
            raise ValueError(f"unknown backbone '{name}' (expected one of {', '.join(RESNETS)})")
        kind, depths, groups, width_per_group = RESNETS[name]
        block = BasicBlock if kind == "basic" else Bottleneck
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = make_norm(norm, width)
        inplanes = width
        self.out_channels = []  # C2..C5
        for i, depth in enumerate(depths):
            planes = width * 2 ** i
            layers = []
            for j in range(depth):
                stride = 2 if (i > 0 and j == 0) else 1
                layers.append(block(inplanes, planes, stride, norm, groups, width_per_group))
                inplanes = planes * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
            self.out_channels.append(inplanes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (FrozenBatchNorm2d, nn.BatchNorm2d)):
                m.eps = norm_eps
        self.frozen_stages = frozen_stages
        for stage in [self.conv1, self.bn1, self.layer1, self.layer2, self.layer3, self.layer4][: self._frozen_modules()]:
            for p in stage.parameters():
                p.requires_grad_(False)

    def _frozen_modules(self) -> int:
        return 0 if self.frozen_stages <= 0 else 2 + max(0, self.frozen_stages - 1)

    def train(self, mode: bool = True):
        super().train(mode)
        # Frozen stages keep their BatchNorm statistics in train mode too. _BatchNorm, the base class,
        # also covers the SyncBatchNorm that train.sync_bn converts BatchNorm2d into.
        for stage in [self.bn1, self.layer1, self.layer2, self.layer3, self.layer4][: max(0, self._frozen_modules() - 1)]:
            for m in stage.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def forward(self, x: Tensor) -> list:
        x = F.relu(self.bn1(self.conv1(x)), inplace=True)
        x = F.max_pool2d(x, 3, 2, 1)
        c2 = self.layer1(x)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return [c2, c3, c4, c5]


class FPN(nn.Module):
    """Feature Pyramid Network with RetinaNet's extra levels (sec. 4, footnote 2).

    P_min..P5 from C_min..C5: 1x1 lateral convs, top-down nearest-neighbour upsampling and
    addition, then 3x3 output convs. P6 = 3x3 stride-2 conv on C5 (p6_from "c5") or on P5
    ("p5", torchvision's RetinaNet); P7.. = 3x3 stride-2 conv on ReLU of the level below.
    p6_from "pool": P6 = P5 subsampled with stride 2 (max pooling, kernel 1), no parameters: the
    two-stage detector's P6, used by the RPN only (thesis sec. 4.4 footnote; torchvision's
    LastLevelMaxPool); then max_level is at most 6. All levels have `channels`.
    """

    def __init__(self, in_channels: list, channels: int = 256, min_level: int = 3, max_level: int = 7, p6_from: str = "c5"):
        super().__init__()
        if not 2 <= min_level <= 5 or max_level < 5:
            raise ValueError(f"FPN levels P{min_level}-P{max_level}: need 2 <= min_level <= 5 <= max_level")
        if p6_from not in ("c5", "p5", "pool"):
            raise ValueError(f"p6_from must be 'c5', 'p5' or 'pool', got '{p6_from}'")
        if p6_from == "pool" and max_level > 6:
            raise ValueError(f"p6_from 'pool' gives levels up to P6, not P{max_level}")
        self.min_level, self.max_level, self.p6_from = min_level, max_level, p6_from
        used = in_channels[min_level - 2:]  # C_min..C5
        self.lateral = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in used)
        self.output = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1) for _ in used)
        self.extra = nn.ModuleList()
        for level in range(6, max_level + 1 if p6_from != "pool" else 6):
            cin = in_channels[-1] if (level == 6 and p6_from == "c5") else channels
            self.extra.append(nn.Conv2d(cin, channels, 3, stride=2, padding=1))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)
                nn.init.zeros_(m.bias)

    def forward(self, feats: list) -> list:
        """feats: [C2, C3, C4, C5] -> [P_min, ..., P_max]."""
        cs = feats[self.min_level - 2:]
        top = self.lateral[-1](cs[-1])
        outs = [self.output[-1](top)]
        for i in range(len(cs) - 2, -1, -1):
            lat = self.lateral[i](cs[i])
            top = lat + F.interpolate(top, size=lat.shape[-2:], mode="nearest")
            outs.insert(0, self.output[i](top))
        if self.p6_from == "pool" and self.max_level == 6:
            outs.append(F.max_pool2d(outs[-1], kernel_size=1, stride=2))
        prev = cs[-1] if self.p6_from == "c5" else outs[-1]
        for i, conv in enumerate(self.extra):
            prev = conv(prev if i == 0 else F.relu(prev))
            outs.append(prev)
        return outs
