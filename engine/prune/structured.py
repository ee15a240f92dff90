"""Structured filter pruning (DESIGN.md "Pruning"): rank each prunable conv's filters by L1 norm
(PFEC, Li et al. 2017) or at random, then physically remove the losers together with their BN
entries and the next layer's input channels. The residual stream keeps its width: in ResNets
only the inner convs of each block are pruned."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torchvision.models.resnet import Bottleneck

from engine.models import build_model
from engine.prune import settings
from engine.prune.surgery import slice_

STRUCTURED: tuple[str, ...] = ("l1_filter", "random_filter")


@dataclass(frozen=True)
class _Unit:
    """A prunable conv, its BN (if any), the layer reading its output, and its group: the stage
    (ResNets) or the conv's index (VGG, convnet_tiny) that a per-group fraction addresses."""

    conv: str
    bn: str | None
    consumer: str
    group: int
    block: int


def _resnet_units(model: nn.Module) -> list[_Unit]:
    """BasicBlock conv1, or Bottleneck conv1 and conv2, of every block, in order."""
    units, block = [], 0
    stages = [s for s in ("layer1", "layer2", "layer3", "layer4") if hasattr(model, s)]
    for group, stage in enumerate(stages):
        for i, b in enumerate(getattr(model, stage)):
            inner = (1, 2) if isinstance(b, Bottleneck) else (1,)
            p = f"{stage}.{i}"
            for k in inner:
                units.append(_Unit(f"{p}.conv{k}", f"{p}.bn{k}", f"{p}.conv{k + 1}", group, block))
            block += 1
    return units


def _vgg_units(model: nn.Module) -> list[_Unit]:
    """Every conv of `features`; the last one feeds the classifier."""
    feats = model.features
    convs = [i for i, m in enumerate(feats) if isinstance(m, nn.Conv2d)]
    units = []
    for j, i in enumerate(convs):
        bn = f"features.{i + 1}" if isinstance(feats[i + 1], nn.BatchNorm2d) else None
        nxt = f"features.{convs[j + 1]}" if j + 1 < len(convs) else "classifier"
        units.append(_Unit(f"features.{i}", bn, nxt, j, j))
    return units


def _units(model: nn.Module, arch: str) -> list[_Unit]:
    if arch.startswith("resnet") and hasattr(model, "layer1"):
        return _resnet_units(model)
    if arch.startswith("vgg") and hasattr(model, "features"):
        return _vgg_units(model)
    if arch == "convnet_tiny":
        return [_Unit("conv1", None, "conv2", 0, 0), _Unit("conv2", None, "fc", 1, 1)]
    raise ValueError(f"structured pruning does not support arch {arch!r} with this model")


def _kept(n: int, fraction: float) -> int:
    """Filters kept of n when pruning `fraction`: int(n * (1 - fraction)) as in PFEC's code (the
    epsilon only absorbs float error such as 10 * (1 - 0.9) = 0.99...)."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"filter fraction must be in [0, 1), got {fraction}")
    return math.floor(n * (1.0 - fraction) + 1e-9)


def _widths(
    model: nn.Module, arch: str, units: list[_Unit], fraction: float | Sequence[float] | str
) -> list[int]:
    """Filters to keep per unit, from one fraction, one per group, or a named setting."""
    n = [model.get_submodule(u.conv).out_channels for u in units]
    if isinstance(fraction, str):
        if fraction in settings.VGG.get(arch, {}):
            widths = settings.VGG[arch][fraction]
            if len(widths) != len(units):
                raise ValueError(f"setting {fraction!r} of {arch} needs {len(widths)} convs")
            return list(widths)
        if fraction not in settings.RESNET.get(arch, {}):
            own = ", ".join(settings.SETTINGS.get(arch, ())) or "none"
            where = [a for a, s in settings.SETTINGS.items() if fraction in s]
            hint = f"; {fraction!r} is a setting of {', '.join(where)}" if where else ""
            raise ValueError(
                f"no pruning setting {fraction!r} for {arch} (its settings: {own}{hint})"
            )
        if units[-1].block + 1 != settings.RESNET_BLOCKS[arch]:
            raise ValueError(f"setting {fraction!r} of {arch} does not fit this model")
        per_stage, skip = settings.RESNET[arch][fraction]
        return [
            c if 2 + 2 * u.block in skip else _kept(c, per_stage[u.group])
            for u, c in zip(units, n, strict=True)
        ]
    if isinstance(fraction, Sequence):
        groups = units[-1].group + 1
        if len(fraction) != groups:
            raise ValueError(
                f"{arch} needs {groups} fractions (one per stage/conv), got {fraction}"
            )
        return [_kept(c, fraction[u.group]) for u, c in zip(units, n, strict=True)]
    return [_kept(c, fraction) for c in n]


def check_fraction(arch: str, num_classes: int, fraction: float | Sequence[float] | str) -> None:
    """Raise select_filters' ValueError for a setting name or fractions that do not fit `arch`,
    from layer shapes alone (a weightless meta-device model): recipes are checked up front."""
    with torch.device("meta"):
        model = build_model(arch, num_classes)
    units = _units(model, arch)
    for u, k in zip(units, _widths(model, arch, units, fraction), strict=True):
        n = model.get_submodule(u.conv).out_channels
        if not 1 <= k <= n:
            raise ValueError(f"cannot keep {k} of the {n} filters of {u.conv}")


def _rounded(k: int, n: int, multiple: int) -> int:
    """k rounded to the nearest multiple of `multiple` (halves up), at least one multiple; past
    n, the largest multiple below n (n itself if there is none)."""
    if multiple <= 1:
        return k
    nearest = max(multiple, (2 * k + multiple) // (2 * multiple) * multiple)
    return nearest if nearest <= n else (n // multiple * multiple or n)


def select_filters(
    model: nn.Module,
    arch: str,
    method: str,
    fraction: float | Sequence[float] | str,
    *,
    generator: torch.Generator | None = None,
    round_to: int = 1,
) -> dict[str, Tensor]:
    """Ascending indices of the filters to keep, per conv that loses any, all ranked on the
    unpruned model (PFEC's "independent" strategy). `fraction` is one fraction for every
    prunable conv, one per stage (ResNets: 3 for CIFAR, 4 for ImageNet) or per conv (VGG,
    convnet_tiny), or a setting name from `settings.SETTINGS`; `generator` drives random_filter.
    `round_to` > 1 rounds each kept count to its nearest multiple: GPU convolutions run slower
    at other widths (on an H200, ResNet-50 keeping 44/89/179 filters trained at 0.77x dense).
    """
    if method not in STRUCTURED:
        raise ValueError(f"unknown structured method {method!r} (allowed: {STRUCTURED})")
    if round_to < 1:
        raise ValueError(f"round_to must be at least 1, got {round_to}")
    units = _units(model, arch)
    keep: dict[str, Tensor] = {}
    for u, k in zip(units, _widths(model, arch, units, fraction), strict=True):
        w = model.get_submodule(u.conv).weight.detach()
        if not 1 <= k <= len(w):
            raise ValueError(f"cannot keep {k} of the {len(w)} filters of {u.conv}")
        k = _rounded(k, len(w), round_to)
        if k == len(w):
            continue
        if method == "l1_filter":
            score = w.abs().sum(dim=(1, 2, 3))
        else:
            device = generator.device if generator is not None else torch.device("cpu")
            score = torch.rand(len(w), generator=generator, device=device)
        keep[u.conv] = score.argsort(descending=True, stable=True)[:k].sort().values.cpu()
    return keep


def remove_filters_(model: nn.Module, arch: str, keep: dict[str, Tensor]) -> None:
    """Surgery: keep only filters `keep[conv]` of each conv, its BN entries and the matching
    input channels of the next layer."""
    units = {u.conv: u for u in _units(model, arch)}
    if unknown := sorted(set(keep) - set(units)):
        raise ValueError(f"not prunable convs of {arch}: {unknown}")
    for conv, idx in keep.items():
        u = units[conv]
        slice_(model, conv, idx, None)
        if u.bn is not None:
            slice_(model, u.bn, idx, None)
        slice_(model, u.consumer, None, idx)


def structured_prune_(
    model: nn.Module,
    arch: str,
    method: str,
    fraction: float | Sequence[float] | str,
    *,
    generator: torch.Generator | None = None,
    round_to: int = 1,
) -> dict[str, Tensor]:
    """Select filters and remove the rest in place; returns the kept indices per pruned conv.
    Parameters are new objects afterwards: build the optimizer (and masks) after this."""
    keep = select_filters(model, arch, method, fraction, generator=generator, round_to=round_to)
    remove_filters_(model, arch, keep)
    return keep
