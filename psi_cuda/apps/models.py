"""The nets of the training runs: a small ResNet with BatchNorm and its BatchNorm-free twin."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..groups import param_groups
from .data import NUM_CLASSES


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus a shortcut (1x1 conv + BN when the shape changes), ReLU.
    With ``norm=False`` every BN is left out and the convs get a bias instead (the BN-free twin
    that BNP trains)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, norm: bool = True):
        super().__init__()
        bn = nn.BatchNorm2d if norm else (lambda c: nn.Identity())
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=not norm)
        self.bn1 = bn(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=not norm)
        self.bn2 = bn(out_channels)
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=not norm), bn(out_channels))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class SmallResNet(nn.Module):
    """Stem conv3x3(in -> w)-BN-ReLU, BasicBlock(w -> w), BasicBlock(w -> 2w, stride 2), global
    average pool, Linear(2w -> classes). With ``norm=True`` all convs have bias=False and feed a
    BatchNorm; with ``norm=False`` there is no BatchNorm and the convs have biases."""

    def __init__(self, width: int = 16, num_classes: int = NUM_CLASSES, in_channels: int = 1,
                 norm: bool = True):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=not norm),
                                  nn.BatchNorm2d(width) if norm else nn.Identity(), nn.ReLU())
        self.block1 = BasicBlock(width, width, norm=norm)
        self.block2 = BasicBlock(width, 2 * width, stride=2, norm=norm)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.block2(self.block1(self.stem(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def rescale_channels(model: nn.Module, spread: float, seed: int) -> dict[str, Tensor]:
    """Multiplies every output channel (row of ``W.view(out, -1)``) of every conv weight that
    feeds a BatchNorm by its own factor, log-uniform in ``[1/spread, spread]`` (drawn from
    ``seed``). The network computes the same function (BatchNorm in training mode undoes the
    scales, up to its ``eps``); returns the factors by parameter name."""
    if not spread >= 1.0:
        raise ValueError(f"rescale spread must be >= 1; got {spread}")
    gen = torch.Generator().manual_seed(seed)
    groups = param_groups(model, 1.0)
    channel = {id(p) for g in groups if g["manifold"] == "channel" for p in g["params"]}
    factors = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if id(p) not in channel:
                continue
            u = torch.rand(p.shape[0], generator=gen, dtype=torch.float64)
            c = torch.exp((2 * u - 1) * math.log(spread))
            p.mul_(c.to(p.dtype).view(-1, *([1] * (p.dim() - 1))))
            factors[name] = c
    return factors
