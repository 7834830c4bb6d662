"""ResNet-18/50 for the study: torchvision's, with one ReLU module per call site and a CIFAR stem.

Kept apart from models.py so that torchvision (about 1.7 s to import) loads only when a ResNet is
built, not when the CLI parses its arguments.
"""
from __future__ import annotations

from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from ..engine.fused import routed_input

__all__ = ["build_resnet"]


class _BasicBlock(BasicBlock):
    """torchvision BasicBlock with one ReLU module per call site (same parameters). Once the
    engine fuses conv2 -> bn2 -> + identity -> relu2 (sparsetrain.engine.fused), conv2 takes the
    shortcut as its second argument, and the shortcut reads x through the fused conv1
    (routed_input): its gradient joins conv1's input gradient inside the conv kernel."""

    fused_residual = {"conv2": ("bn2", "relu2")}
    fused_route_input = "conv1"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        del self.relu
        self.relu1 = nn.ReLU(inplace=True)
        self.relu2 = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.conv1(x)
        x = routed_input(self.conv1, x)
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(out))
        if getattr(self.conv2, "residual", False):
            return self.relu2(self.bn2(self.conv2(out, identity)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + identity)


class _Bottleneck(Bottleneck):
    """torchvision Bottleneck with one ReLU module per call site (same parameters); conv3 takes
    the shortcut once fused and the shortcut reads x through conv1 (as _BasicBlock's conv2, conv1)."""

    fused_residual = {"conv3": ("bn3", "relu3")}
    fused_route_input = "conv1"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        del self.relu
        self.relu1 = nn.ReLU(inplace=True)
        self.relu2 = nn.ReLU(inplace=True)
        self.relu3 = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.conv1(x)
        x = routed_input(self.conv1, x)
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(out))
        out = self.relu2(self.bn2(self.conv2(out)))
        if getattr(self.conv3, "residual", False):
            return self.relu3(self.bn3(self.conv3(out, identity)))
        out = self.bn3(self.conv3(out))
        return self.relu3(out + identity)


def build_resnet(depth: int, num_classes: int, in_channels: int, small_input: bool) -> ResNet:
    """ResNet-18 (depth 18, basic blocks) or ResNet-50 (50, bottlenecks); `small_input` (32x32-like
    images) gives the CIFAR stem (He et al. 2022, paper B.1): 3x3 stride-1 conv, no max-pool."""
    block, layers = {18: (_BasicBlock, [2, 2, 2, 2]), 50: (_Bottleneck, [3, 4, 6, 3])}[depth]
    model = ResNet(block, layers, num_classes=num_classes)
    if small_input:
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    return model
