"""Model zoo built by name: torchvision ImageNet ResNets, CIFAR ResNets and VGGs from the pruning
literature, and a tiny BN-free CNN for tests.

CIFAR ResNets reuse torchvision's BasicBlock and its attribute names (`conv1`, `bn1`, `layer1`,
`fc`, ...) so pruning code can walk every ResNet the same way. Every model ends in
AdaptiveAvgPool2d(1), so any input of 32 px or more works, in either memory format.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock

from engine.errors import UserError

VGG_CONFIGS: dict[str, tuple[int | str, ...]] = {
    "vgg16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512),
    "vgg19": (
        64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
        512, 512, 512, 512, "M", 512, 512, 512, 512,
    ),
}  # fmt: skip


def _init_conv_bn(model: nn.Module) -> None:
    """Kaiming-normal (fan_out, relu) convs and identity BNs, as in He et al. and torchvision."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class CifarResNet(nn.Module):
    """He et al. (2016) CIFAR ResNet of depth 6n+2 with 1x1-conv ("option B") shortcuts."""

    def __init__(self, depth: int, num_classes: int, zero_init_residual: bool = False) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._stage(16, 16, n, stride=1)
        self.layer2 = self._stage(16, 32, n, stride=2)
        self.layer3 = self._stage(32, 64, n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        _init_conv_bn(self)
        if zero_init_residual:
            for block in self.modules():
                if isinstance(block, BasicBlock):
                    nn.init.zeros_(block.bn2.weight)

    @staticmethod
    def _stage(in_ch: int, out_ch: int, blocks: int, stride: int) -> nn.Sequential:
        """n BasicBlocks; the first one changes stride/width and gets a conv1x1+BN shortcut."""
        downsample = None
        if stride != 1 or in_ch != out_ch:
            downsample = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
            )
        layers = [BasicBlock(in_ch, out_ch, stride, downsample)]
        layers += [BasicBlock(out_ch, out_ch) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class VGG(nn.Module):
    """CIFAR VGG-BN of Li et al. 2017 / Liu et al. 2019; no residuals, so no zero_init_residual."""

    def __init__(self, config: tuple[int | str, ...], num_classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = 3
        for v in config:
            if isinstance(v, str):
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [
                    nn.Conv2d(in_ch, v, 3, padding=1, bias=False),
                    nn.BatchNorm2d(v),
                    nn.ReLU(inplace=True),
                ]
                in_ch = v
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(in_ch, num_classes)
        _init_conv_bn(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class ConvNetTiny(nn.Module):
    """Two-conv CNN without BN, so 1- and 2-process data-parallel runs give identical results."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.conv2(self.relu(self.conv1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _torchvision(name: str) -> Callable[[int, bool], nn.Module]:
    """A builder for torchvision's randomly initialised ResNet `name` (never pretrained)."""
    fn = getattr(torchvision.models, name)
    return lambda nc, zir: fn(weights=None, num_classes=nc, zero_init_residual=zir)


_BUILDERS: dict[str, Callable[[int, bool], nn.Module]] = {
    "resnet18": _torchvision("resnet18"),
    "resnet34": _torchvision("resnet34"),
    "resnet50": _torchvision("resnet50"),
    "resnet20": lambda nc, zir: CifarResNet(20, nc, zir),
    "resnet56": lambda nc, zir: CifarResNet(56, nc, zir),
    "resnet110": lambda nc, zir: CifarResNet(110, nc, zir),
    "vgg16": lambda nc, zir: VGG(VGG_CONFIGS["vgg16"], nc),
    "vgg19": lambda nc, zir: VGG(VGG_CONFIGS["vgg19"], nc),
    "convnet_tiny": lambda nc, zir: ConvNetTiny(nc),
}
ARCHS: tuple[str, ...] = tuple(_BUILDERS)


def build_model(arch: str, num_classes: int, zero_init_residual: bool = False) -> nn.Module:
    """Randomly initialised `arch`; zero_init_residual is a no-op for VGG and convnet_tiny."""
    if arch not in _BUILDERS:
        raise UserError(
            f"recipe key 'model.arch': unknown architecture {arch!r} (allowed: {', '.join(ARCHS)})"
        )
    return _BUILDERS[arch](num_classes, zero_init_residual)
