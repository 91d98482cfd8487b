"""CIFAR ResNet-(6n+2) and wide ResNets exactly as Frankle, Schwab & Morcos (ICLR 2021) trained them.

Three stages of ``n`` basic blocks with 16k / 32k / 64k channels (k = ``width``), a 1×1 conv + BatchNorm
shortcut where the shape changes, global average pooling and one linear output layer; the layout and
initialization of OpenLTH's ``cifar_resnet`` (Kaiming-normal conv/linear weights, BatchNorm γ ~ U[0, 1], β = 0).
ResNet-14 has 175,258 parameters, 1,120 of them BatchNorm γ/β.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["CifarResNet", "cifar_resnet"]


class BasicBlock(nn.Module):
    """conv3×3 → BN → ReLU → conv3×3 → BN, plus the (projected) input, then ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU(inplace=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32×32 inputs; ``depth`` = 6n + 2, ``width`` multiplies every stage's channels."""

    def __init__(self, depth: int = 14, width: int = 1, num_classes: int = 10):
        super().__init__()
        if not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
            raise ValueError(f"depth must be 6n + 2 with n >= 1 (8, 14, 20, 32, 56, 110, ...), got {depth!r}")
        if not isinstance(width, int) or width < 1:
            raise ValueError(f"width must be a positive integer channel multiplier, got {width!r}")
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        n = (depth - 2) // 6
        channels = [16 * width, 32 * width, 64 * width]
        self.depth, self.width = depth, width
        self.conv = nn.Conv2d(3, channels[0], 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels[0])
        self.relu = nn.ReLU(inplace=True)
        blocks, in_channels = [], channels[0]
        for stage, out_channels in enumerate(channels):
            for i in range(n):
                blocks.append(BasicBlock(in_channels, out_channels, stride=2 if stage > 0 and i == 0 else 1))
                in_channels = out_channels
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels[-1], num_classes)
        frankle_init_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.relu(self.bn(self.conv(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


@torch.no_grad()
def frankle_init_(model: nn.Module) -> nn.Module:
    """OpenLTH's init: Kaiming-normal conv and linear weights, BatchNorm γ ~ U[0, 1] and β = 0 (in place)."""
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(module.weight)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.uniform_(module.weight, 0.0, 1.0)
            nn.init.zeros_(module.bias)
    return model


def cifar_resnet(depth: int = 14, width: int = 1, num_classes: int = 10, *, seed: int | None = None) -> CifarResNet:
    """Frankle et al.'s CIFAR ResNet-``depth`` (6n + 2) with ``width``× channels, freshly initialized.

    With ``seed`` the weights are those of ``torch.manual_seed(seed)`` followed by the build, bit for bit, without
    touching the global random state: a random-weight base is rebuilt exactly from its seed (the recipes record it).

    >>> net = cifar_resnet(14)                       # 175,258 parameters, 1,120 of them BatchNorm γ/β
    >>> net = cifar_resnet(14, width=4)              # the wide ResNet-14-4 (64/128/256 channels)
    >>> torch.equal(cifar_resnet(14, seed=0).conv.weight, cifar_resnet(14, seed=0).conv.weight)
    True
    """
    if seed is None:
        return CifarResNet(depth, width, num_classes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CifarResNet(depth, width, num_classes)
