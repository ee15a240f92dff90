"""Model zoo: shapes, memory formats, parameter counts, naming and init options."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from engine.errors import UserError
from engine.models import ARCHS, build_model

# Exact counts, derived by hand (weights + biases; BN running stats are buffers, not parameters).
# CIFAR ResNet-(6n+2), 10 classes: stem conv 432 + BN 32 + fc 650; stage 1 blocks 4,672 each;
# stage 2 first block 14,528 (incl. 1x1 shortcut 512 + BN 64), others 18,560; stage 3 first block
# 57,728 (incl. shortcut 2,048 + BN 128), others 73,984. Total = 73,370 + 4,672 n + 92,544 (n-1).
# Minus the 2,752 shortcut parameters these equal the option-A counts usually quoted
# (269,722 / 853,018 / 1,727,962). VGG: conv weights + 2 per BN channel + Linear(512, 10).
EXACT_PARAMS = {
    ("resnet20", 10): 272_474,
    ("resnet56", 10): 855_770,
    ("resnet110", 10): 1_730_714,
    ("vgg16", 10): 14_724_042,
    ("vgg19", 10): 20_035_018,
    ("resnet18", 1000): 11_689_512,
    ("resnet50", 1000): 25_557_032,
}
# Published (rounded) counts: He et al. 2016 table 6, Liu et al. 2017 (network slimming) VGG-19.
PUBLISHED = {"resnet20": 0.27e6, "resnet56": 0.85e6, "resnet110": 1.7e6, "vgg19": 20.04e6}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_shape_and_channels_last(arch: str) -> None:
    model = build_model(arch, num_classes=7).eval()
    inputs = [torch.randn(2, 3, size, size) for size in (32, 40)]
    with torch.no_grad():
        outputs = [model(x) for x in inputs]
        model.to(memory_format=torch.channels_last)
        for x, out in zip(inputs, outputs, strict=True):
            assert out.shape == (2, 7)
            cl_out = model(x.to(memory_format=torch.channels_last))
            torch.testing.assert_close(cl_out, out, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("arch", "num_classes"), list(EXACT_PARAMS))
def test_parameter_counts(arch: str, num_classes: int) -> None:
    count = n_params(build_model(arch, num_classes))
    print(f"{arch} ({num_classes} classes): {count:,} parameters")
    assert count == EXACT_PARAMS[arch, num_classes]
    if arch in PUBLISHED:
        assert count == pytest.approx(PUBLISHED[arch], rel=0.03)


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50"])
def test_torchvision_state_dict_keys(arch: str) -> None:
    ours = build_model(arch, 1000).state_dict().keys()
    assert list(ours) == list(getattr(torchvision.models, arch)().state_dict().keys())


@pytest.mark.parametrize(("arch", "n_blocks"), [("resnet20", 9), ("resnet18", 8), ("resnet50", 16)])
def test_zero_init_residual(arch: str, n_blocks: int) -> None:
    def last_bns(model: nn.Module) -> list[nn.BatchNorm2d]:
        blocks = [m for m in model.modules() if isinstance(m, (BasicBlock, Bottleneck))]
        return [getattr(b, "bn3", b.bn2) for b in blocks]

    zeroed = last_bns(build_model(arch, 10, zero_init_residual=True))
    assert len(zeroed) == n_blocks
    assert all(torch.count_nonzero(bn.weight) == 0 for bn in zeroed)
    assert all(torch.all(bn.weight == 1) for bn in last_bns(build_model(arch, 10)))


def test_zero_init_residual_is_noop_without_residuals() -> None:
    model = build_model("vgg16", 10, zero_init_residual=True)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 13 and all(torch.all(bn.weight == 1) for bn in bns)


def test_unknown_arch_lists_allowed() -> None:
    with pytest.raises(UserError) as info:
        build_model("resnet9000", 10)
    message = str(info.value)
    assert "model.arch" in message and "'resnet9000'" in message
    assert all(arch in message for arch in ARCHS)


def test_cifar_resnet_naming() -> None:
    model = build_model("resnet56", 10)
    for name in ("conv1", "bn1", "relu", "layer1", "layer2", "layer3", "avgpool", "fc"):
        assert hasattr(model, name)
    assert [len(getattr(model, f"layer{i}")) for i in (1, 2, 3)] == [9, 9, 9]
    assert all(block.downsample is None for block in model.layer1)
    shortcut = model.layer2[0].downsample
    assert isinstance(shortcut, nn.Sequential) and isinstance(shortcut[1], nn.BatchNorm2d)
    conv = shortcut[0]
    assert isinstance(conv, nn.Conv2d) and conv.bias is None
    assert conv.kernel_size == (1, 1) and conv.stride == (2, 2)
    assert (conv.in_channels, conv.out_channels) == (16, 32)
    assert model.layer2[1].downsample is None and model.layer3[0].downsample is not None
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Conv2d))


def test_convnet_tiny_has_no_batchnorm() -> None:
    model = build_model("convnet_tiny", 10)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert all(hasattr(model, name) for name in ("conv1", "conv2", "fc"))
