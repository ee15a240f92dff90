"""Unstructured pruning (DESIGN.md "Pruning"): boolean masks keyed by parameter name, one per
prunable weight, computed by magnitude or at random. The optimizer enforces them; this module
only computes them and zeroes the pruned weights once, at the moment of pruning."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from torch.nn.utils import prune

UNSTRUCTURED: tuple[str, ...] = ("global_magnitude", "layer_magnitude", "random")
_SCOPES = ("global", "layer")


def prunable_weights(
    model: nn.Module,
    include_linear: bool = False,
    exclude_first: bool = False,
    exclude_downsample: bool = False,
) -> dict[str, nn.Parameter]:
    """Conv weights (optionally also linear weights, minus the first conv or the ResNet shortcut
    convs) by parameter name, in module order, so every rank iterates them identically."""
    out: dict[str, nn.Parameter] = {}
    first = next((n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            keep = not (exclude_first and name == first)
            keep &= not (exclude_downsample and "downsample" in name.split("."))
        else:
            keep = include_linear and isinstance(m, nn.Linear)
        if keep:
            out[f"{name}.weight"] = m.weight
    return out


def _bottom_k(scores: Tensor, k: int) -> Tensor:
    """Bool mask of the k lowest scores; ties at the threshold go to the lowest flat index, so
    exactly k entries are chosen and the choice is deterministic."""
    if k == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    threshold = scores.kthvalue(k).values
    chosen = scores < threshold
    ties = (scores == threshold).nonzero().squeeze(1)
    chosen[ties[: k - int(chosen.sum())]] = True
    return chosen


def _scores(weights: list[Tensor], random: bool, generator: torch.Generator | None) -> list[Tensor]:
    """Flat pruning scores per weight: |w|, or uniform noise from `generator` in weight order."""
    if not random:
        return [w.detach().abs().flatten() for w in weights]
    device = generator.device if generator is not None else torch.device("cpu")
    noise = torch.rand(sum(w.numel() for w in weights), generator=generator, device=device)
    return [
        n.to(w.device)
        for n, w in zip(noise.split([w.numel() for w in weights]), weights, strict=True)
    ]


def unstructured_masks(
    model: nn.Module,
    method: str,
    sparsity: float,
    *,
    scope: str | None = None,
    generator: torch.Generator | None = None,
    masks: dict[str, Tensor] | None = None,
    **prunable: bool,
) -> dict[str, Tensor]:
    """Masks (True = kept) pruning `sparsity` of ALL prunable weights, globally or per layer.

    Weights already pruned in `masks` stay pruned and rank below every survivor, so iterative
    pruning only removes more. `scope` is implied by the magnitude methods and defaults to
    "global" for `random`, which draws from `generator` (the global RNG if None): pass a seeded
    generator so every rank computes the same masks. `prunable` goes to `prunable_weights`.
    """
    if method not in UNSTRUCTURED:
        raise ValueError(f"unknown unstructured method {method!r} (allowed: {UNSTRUCTURED})")
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    implied = {"global_magnitude": "global", "layer_magnitude": "layer"}.get(method)
    if scope is None:
        scope = implied or "global"
    if scope not in _SCOPES or (implied and scope != implied):
        raise ValueError(f"scope {scope!r} is not valid for method {method!r}")

    params = prunable_weights(model, **prunable)
    masks = masks or {}
    if unknown := sorted(set(masks) - set(params)):
        raise ValueError(f"masks for parameters outside the prunable set: {unknown}")
    names = list(params)
    weights = [params[n] for n in names]
    old = [masks.get(n, torch.ones_like(params[n], dtype=torch.bool)).flatten() for n in names]
    scores = [
        torch.where(m.to(s.device), s, -1.0)
        for s, m in zip(_scores(weights, method == "random", generator), old, strict=True)
    ]
    groups = [list(range(len(names)))] if scope == "global" else [[i] for i in range(len(names))]
    out: dict[str, Tensor] = {}
    for group in groups:
        total = sum(weights[i].numel() for i in group)
        k = round(sparsity * total)
        already = sum(int((~old[i]).sum()) for i in group)
        if k < already:
            where = "the prunable weights" if scope == "global" else names[group[0]]
            raise ValueError(
                f"sparsity {sparsity} is below the existing {already / total:.4f} of {where}; "
                "pruned weights cannot be revived"
            )
        pruned = _bottom_k(torch.cat([scores[i].to(scores[group[0]].device) for i in group]), k)
        for i, p in zip(group, pruned.split([weights[i].numel() for i in group]), strict=True):
            out[names[i]] = (~p).to(weights[i].device).view_as(weights[i])
    return out


@torch.no_grad()
def apply_masks_(model: nn.Module, masks: dict[str, Tensor]) -> None:
    """Zero the pruned weights in place (once, at pruning time; the optimizer keeps them zero)."""
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        if name not in params or params[name].shape != mask.shape:
            raise ValueError(f"mask {name!r} matches no parameter of that shape in the model")
        params[name].masked_fill_(~mask.to(params[name].device), 0.0)


def torch_reference_masks(model: nn.Module, sparsity: float, **prunable: bool) -> dict[str, Tensor]:
    """The masks of torch.nn.utils.prune global L1Unstructured on a copy of `model`: a check
    for `global_magnitude` (identical wherever |w| has no ties at the threshold)."""
    clone = copy.deepcopy(model)
    names = list(prunable_weights(clone, **prunable))
    modules = [clone.get_submodule(n.rpartition(".")[0]) for n in names]
    prune.global_unstructured(
        [(m, "weight") for m in modules], pruning_method=prune.L1Unstructured, amount=sparsity
    )
    return {n: m.weight_mask.bool() for n, m in zip(names, modules, strict=True)}
