"""Pruning library: unstructured masks, structured surgery, FLOPs and reports (CPU, small)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from engine.checkpoint import apply_arch, arch_of
from engine.models import build_model
from engine.prune import (
    apply_masks_,
    count_flops,
    format_table,
    prunable_weights,
    remove_filters_,
    report,
    resize_to,
    select_filters,
    structured_prune_,
    torch_reference_masks,
    unstructured_masks,
)

CASES = [
    ("global_magnitude", None),
    ("layer_magnitude", None),
    ("random", "global"),
    ("random", "layer"),
]


def _model(arch: str = "resnet20", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(arch, 10)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _pruned_counts(model, masks, method, sparsity, scope):
    """(number pruned, number that must be pruned) per scope group."""
    params = prunable_weights(model)
    if method == "global_magnitude" or scope == "global":
        n = sum(p.numel() for p in params.values())
        return [(sum(int((~m).sum()) for m in masks.values()), round(sparsity * n))]
    return [(int((~masks[k]).sum()), round(sparsity * p.numel())) for k, p in params.items()]


# ----------------------------------------------------------------- unstructured


def test_prunable_sets():
    model = _model()
    convs = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    downsample = {"layer2.0.downsample.0.weight", "layer3.0.downsample.0.weight"}
    assert set(prunable_weights(model)) == convs and len(convs) == 21
    assert set(prunable_weights(model, include_linear=True)) == convs | {"fc.weight"}
    assert set(prunable_weights(model, exclude_first=True)) == convs - {"conv1.weight"}
    assert set(prunable_weights(model, exclude_downsample=True)) == convs - downsample
    vgg = prunable_weights(_model("vgg16"), include_linear=True, exclude_first=True)
    assert "features.0.weight" not in vgg and "classifier.weight" in vgg and len(vgg) == 13
    masks = unstructured_masks(model, "global_magnitude", 0.5, exclude_first=True)
    assert set(masks) == convs - {"conv1.weight"}


@pytest.mark.parametrize("method,scope", CASES)
@pytest.mark.parametrize("ties", [False, True])
def test_kept_count_exact(method, scope, ties):
    model = _model()
    if ties:  # a handful of distinct magnitudes: many weights sit exactly at the threshold
        with torch.no_grad():
            for p in prunable_weights(model).values():
                p.copy_(torch.randint(-2, 3, p.shape).float())
    masks = unstructured_masks(model, method, 0.37, scope=scope, generator=torch.Generator())
    params = prunable_weights(model)
    assert masks.keys() == params.keys()
    assert all(m.dtype == torch.bool and m.shape == params[k].shape for k, m in masks.items())
    for got, want in _pruned_counts(model, masks, method, 0.37, scope):
        assert got == want
    if method == "global_magnitude":
        pruned = torch.cat([params[k][~m].abs().flatten() for k, m in masks.items()])
        kept = torch.cat([params[k][m].abs().flatten() for k, m in masks.items()])
        assert pruned.max() <= kept.min()


def test_global_magnitude_matches_torch_prune():
    model = _model()  # random weights: no ties at the threshold
    for opts in ({}, {"include_linear": True, "exclude_first": True}):
        ours = unstructured_masks(model, "global_magnitude", 0.73, **opts)
        ref = torch_reference_masks(model, 0.73, **opts)
        assert ours.keys() == ref.keys()
        assert all(torch.equal(ours[k], ref[k]) for k in ours)
    assert not hasattr(model.conv1, "weight_mask")


@pytest.mark.parametrize("method,scope", CASES)
def test_iterative_pruning_only_removes_more(method, scope):
    model, g = _model(), _gen(1)
    first = unstructured_masks(model, method, 0.5, scope=scope, generator=g)
    apply_masks_(model, first)
    second = unstructured_masks(model, method, 0.8, scope=scope, generator=g, masks=first)
    for got, want in _pruned_counts(model, second, method, 0.8, scope):
        assert got == want
    assert all(not (second[k] & ~first[k]).any() for k in first)
    if method.endswith("magnitude"):  # zeroed weights rank lowest even without the old masks
        again = unstructured_masks(model, method, 0.8)
        assert all(torch.equal(again[k], second[k]) for k in second)
    with pytest.raises(ValueError, match="cannot be revived"):
        unstructured_masks(model, method, 0.3, scope=scope, generator=g, masks=second)


def test_random_is_deterministic_given_generator():
    model = _model()
    for scope in ("global", "layer"):
        a, b, c = (
            unstructured_masks(model, "random", 0.6, scope=scope, generator=_gen(s))
            for s in (7, 7, 8)
        )
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert any(not torch.equal(a[k], c[k]) for k in a)


def test_apply_masks_zeroes_exactly_the_pruned_weights():
    model = _model()
    masks = unstructured_masks(model, "layer_magnitude", 0.5)
    apply_masks_(model, masks)
    params = dict(model.named_parameters())
    assert all(torch.equal(params[k] != 0, m) for k, m in masks.items())
    with pytest.raises(ValueError):
        apply_masks_(model, {"nope.weight": torch.ones(1, dtype=torch.bool)})


def test_invalid_inputs():
    model = _model()
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match="sparsity"):
            unstructured_masks(model, "global_magnitude", bad)
    with pytest.raises(ValueError, match="unknown"):
        unstructured_masks(model, "snip", 0.5)
    with pytest.raises(ValueError, match="scope"):
        unstructured_masks(model, "global_magnitude", 0.5, scope="layer")
    with pytest.raises(ValueError, match="outside"):
        unstructured_masks(model, "random", 0.5, masks={"fc.weight": torch.ones(10, 64).bool()})
    with pytest.raises(ValueError, match="unknown"):
        structured_prune_(model, "resnet20", "l2_filter", 0.5)
    with pytest.raises(ValueError, match="no pruning setting"):
        structured_prune_(model, "resnet20", "l1_filter", "A")
    with pytest.raises(ValueError, match="no pruning setting"):
        structured_prune_(model, "resnet56", "l1_filter", "E")
    with pytest.raises(ValueError, match="does not fit"):
        structured_prune_(model, "resnet56", "l1_filter", "A")  # a resnet20 passed as resnet56
    with pytest.raises(ValueError, match="3 fractions"):
        structured_prune_(model, "resnet20", "l1_filter", [0.1, 0.2, 0.3, 0.4])
    with pytest.raises(ValueError, match="fraction"):
        structured_prune_(model, "resnet20", "l1_filter", 1.0)
    with pytest.raises(ValueError, match="cannot keep 0"):
        structured_prune_(model, "resnet20", "l1_filter", 0.95)


# ------------------------------------------------------------------- structured


def _randomize_bn(model: nn.Module) -> None:
    """Non-trivial BN statistics and affine terms, so zeroed channels are really tested."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)


def _bn_after(model: nn.Module, conv: str) -> nn.BatchNorm2d | None:
    """The BN right after `conv`: bnK after convK (ResNets), the next index (VGG features)."""
    parent, _, leaf = conv.rpartition(".")
    leaf = leaf.replace("conv", "bn") if leaf.startswith("conv") else str(int(leaf) + 1)
    try:
        m = model.get_submodule(f"{parent}.{leaf}" if parent else leaf)
    except AttributeError:
        return None
    return m if isinstance(m, nn.BatchNorm2d) else None


@torch.no_grad()
def _zero_removed(model: nn.Module, keep: dict[str, torch.Tensor]) -> None:
    """Zero the filters surgery will remove, and their BN weight and bias, so each removed
    channel outputs exactly 0 and the dense model computes what the narrow one does."""
    for conv, idx in keep.items():
        m = model.get_submodule(conv)
        drop = torch.ones(m.out_channels, dtype=torch.bool)
        drop[idx] = False
        m.weight[drop] = 0
        if m.bias is not None:
            m.bias[drop] = 0
        if (bn := _bn_after(model, conv)) is not None:
            bn.weight[drop] = 0
            bn.bias[drop] = 0


@pytest.mark.parametrize(
    "arch,method,fraction,size",
    [
        ("resnet20", "l1_filter", 0.5, 32),
        ("resnet20", "random_filter", [0.2, 0.4, 0.6], 32),
        ("resnet56", "l1_filter", "A", 32),
        ("resnet56", "l1_filter", "B", 32),
        ("resnet56", "random_filter", "B", 32),
        ("vgg16", "l1_filter", "A", 32),
        ("vgg16", "random_filter", 0.3, 32),
        ("convnet_tiny", "l1_filter", 0.5, 32),
        ("resnet50", "l1_filter", [0.1, 0.2, 0.3, 0.4], 64),
    ],
)
def test_surgery_preserves_outputs(arch, method, fraction, size):
    model = _model(arch).eval()
    _randomize_bn(model)
    x = torch.randn(1 if arch == "resnet50" else 2, 3, size, size)
    keep = select_filters(model, arch, method, fraction, generator=_gen(0))
    assert keep
    reference = copy.deepcopy(model)
    _zero_removed(reference, keep)
    remove_filters_(model, arch, keep)
    for conv, idx in keep.items():
        assert model.get_submodule(conv).weight.shape[0] == len(idx)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-4, atol=1e-5)


def test_round_to_keeps_gpu_friendly_widths():
    """ResNet-50 with 30% of its inner filters removed keeps 44/89/179/358; rounded to 8,
    48/88/176/360, and the surgery still fits."""
    plain = _model("resnet50")
    structured_prune_(plain, "resnet50", "l1_filter", 0.3)
    assert [plain.get_submodule(f"layer{i}")[0].conv1.out_channels for i in range(1, 5)] == [
        44, 89, 179, 358,
    ]  # fmt: skip
    model = _model("resnet50")
    keep = structured_prune_(model, "resnet50", "l1_filter", 0.3, round_to=8)
    widths = [model.get_submodule(f"layer{i}")[0].conv1.out_channels for i in range(1, 5)]
    assert widths == [48, 88, 176, 360]
    assert all(len(idx) % 8 == 0 for idx in keep.values())
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)
    with pytest.raises(ValueError, match="round_to"):
        select_filters(_model("resnet20"), "resnet20", "l1_filter", 0.3, round_to=0)


def test_resnet_inner_convs_only_and_bottleneck_shares_fraction():
    model = _model("resnet50")
    keep = structured_prune_(model, "resnet50", "l1_filter", [0.5, 0.25, 0.5, 0.75])
    assert all(".conv1" in k or ".conv2" in k for k in keep) and len(keep) == 2 * 16
    assert model.layer2[0].conv1.out_channels == model.layer2[0].conv2.out_channels == 96
    assert model.layer4[2].conv3.in_channels == 128 and model.layer4[2].conv3.out_channels == 2048
    assert model.conv1.out_channels == 64 and model.fc.in_features == 2048


def test_resnet56_settings_layers():
    """PFEC layer numbering: conv 2 + 2b is block b's conv1; skipped layers keep all filters."""
    model = _model("resnet56")
    structured_prune_(model, "resnet56", "l1_filter", "B")
    width = {
        f"{s}.{i}": b.conv1.out_channels
        for s in ("layer1", "layer2", "layer3")
        for i, b in enumerate(getattr(model, s))
    }
    skipped = {
        "layer1.7",
        "layer1.8",
        "layer2.0",
        "layer2.7",
        "layer3.0",
        "layer3.8",
    }  # 16 18 20 34 38 54
    full = {"layer1": 16, "layer2": 32, "layer3": 64}
    pruned = {"layer1": 6, "layer2": 22, "layer3": 57}  # int(16*0.4), int(32*0.7), int(64*0.9)
    for block, w in width.items():
        stage = block.split(".")[0]
        assert w == (full[stage] if block in skipped else pruned[stage]), block


def test_random_filter_deterministic():
    model = _model()
    a, b = (
        select_filters(model, "resnet20", "random_filter", 0.5, generator=_gen(3)) for _ in "ab"
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resnet20_param_and_flop_reduction_by_hand():
    """Pruning half the conv1 filters of every block (f = w/2 of width w, input channels c,
    output map h*h) removes per block: conv1 f*c*9 + BN 2f + conv2 w*f*9 parameters and
    (f*c*9 + w*f*9)*h*h MACs. Stages: w = 16, 32, 64 at h = 32, 16, 8; c = w except in the
    first block of stages 2 and 3 (c = w/2)."""
    blocks = [(16, 16, 32)] * 3 + [(32, 16, 16)] + [(32, 32, 16)] * 2
    blocks += [(64, 32, 8)] + [(64, 64, 8)] * 2
    params = sum((w // 2) * c * 9 + w + w * (w // 2) * 9 for w, c, _ in blocks)
    macs = sum(((w // 2) * c * 9 + w * (w // 2) * 9) * h * h for w, c, h in blocks)
    assert (params, macs) == (133_968, 20_054_016)
    model = _model()
    p0, f0 = _n_params(model), count_flops(model, 32)[0]
    structured_prune_(model, "resnet20", "l1_filter", 0.5)
    assert p0 - _n_params(model) == params
    assert f0 - count_flops(model, 32)[0] == macs


@pytest.mark.parametrize(
    "arch,setting,flops_cut",
    [("resnet56", "A", 0.104), ("resnet56", "B", 0.276), ("vgg16", "A", 0.342)],
)
def test_pfec_settings_match_paper(arch, setting, flops_cut):
    """FLOP reductions of Li et al. 2017, Table 1 (their ResNets have parameter-free shortcuts,
    ours 1x1 convs, hence the tolerance)."""
    model = _model(arch)
    f0 = count_flops(model, 32)[0]
    structured_prune_(model, arch, "l1_filter", setting)
    assert 1 - count_flops(model, 32)[0] / f0 == pytest.approx(flops_cut, abs=0.002)


def test_surgery_keeps_channels_last_and_modes():
    model = _model().to(memory_format=torch.channels_last).train()
    structured_prune_(model, "resnet20", "l1_filter", 0.5)
    conv = model.layer1[0].conv1
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert conv.training and conv.weight.requires_grad


@pytest.mark.parametrize("arch,fraction", [("resnet20", 0.5), ("vgg16", "A")])
def test_resize_to_rebuilds_pruned_checkpoint(arch, fraction):
    pruned = _model(arch).eval()
    _randomize_bn(pruned)
    structured_prune_(pruned, arch, "l1_filter", fraction)
    rebuilt = build_model(arch, 10)
    apply_arch(rebuilt, arch_of(pruned, arch, 10))
    rebuilt.load_state_dict(pruned.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), pruned(x))
    with pytest.raises(ValueError):
        resize_to(build_model(arch, 10), {"avgpool.weight": [3]})


# ------------------------------------------------------------------ FLOPs, report


def test_flops_by_hand_convnet_tiny():
    model = _model("convnet_tiny").train()
    conv1, conv2, fc = 16 * 3 * 9 * 32 * 32, 32 * 16 * 9 * 16 * 16, 32 * 10
    assert count_flops(model, 32) == (conv1 + conv2 + fc,) * 2
    masks = {"conv1.weight": torch.arange(16 * 27).view(16, 3, 3, 3) % 2 == 0}
    assert count_flops(model, 32, masks) == (conv1 + conv2 + fc, conv1 // 2 + conv2 + fc)
    assert model.training


def test_flops_resnet50():
    """torchvision: ResNet-50 at 224 px is 4.09 GFLOPs (multiply-accumulates)."""
    model = build_model("resnet50", 1000)
    dense, _ = count_flops(model, 224)
    assert dense == 4_089_184_256
    linear = 2048 * 1000
    masks = unstructured_masks(model, "random", 0.8, scope="layer", generator=torch.Generator())
    _, effective = count_flops(model, 224, masks)
    assert effective == pytest.approx(0.2 * (dense - linear) + linear, rel=1e-4)


def test_report():
    model = _model()
    masks = unstructured_masks(model, "global_magnitude", 0.5, include_linear=True)
    before = report(model, masks)  # pruned weights count as zero before they are zeroed
    apply_masks_(model, masks)
    after = report(model, masks)
    total = sum(p.numel() for p in prunable_weights(model, include_linear=True).values())
    assert before == after
    assert after["sparsity"] == round(0.5 * total) / total
    assert after["params"] == sum(int((p != 0).sum()) for p in model.parameters())
    assert [r[0] for r in after["layers"]] == list(masks)
    assert after["layers"][0][1] == (16, 3, 3, 3)
    table = format_table(after["layers"])
    assert table.splitlines()[0].split() == ["layer", "shape", "kept"]
    assert "layer1.0.conv1.weight" in table and "16x16x3x3" in table
    dense = report(_model())
    assert dense["sparsity"] == 0.0 and len(dense["layers"]) == 21
