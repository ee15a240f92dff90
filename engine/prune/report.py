"""What pruning left: sparsity, nonzero parameters and a per-layer table for the log."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from engine.prune.masks import prunable_weights


def _alive(p: Tensor, mask: Tensor | None) -> Tensor:
    """Entries that are nonzero and not pruned (a pruned weight counts as zero)."""
    alive = p.detach() != 0
    return alive if mask is None else alive & mask.to(p.device)


@torch.no_grad()
def report(model: nn.Module, masks: dict[str, Tensor] | None = None) -> dict[str, Any]:
    """Sparsity (zero fraction of the masked weights, or of all conv weights without masks),
    nonzero parameter count of the whole model, and rows (name, shape, kept fraction)."""
    params = dict(model.named_parameters())
    masks = masks or {}
    layers = list(masks) or list(prunable_weights(model))
    rows, alive, total = [], 0, 0
    for name in layers:
        kept = int(_alive(params[name], masks.get(name)).sum())
        rows.append((name, tuple(params[name].shape), kept / params[name].numel()))
        alive += kept
        total += params[name].numel()
    nonzero = sum(int(_alive(p, masks.get(n)).sum()) for n, p in params.items())
    return {"sparsity": 1.0 - alive / max(total, 1), "params": nonzero, "layers": rows}


def format_table(rows: list[tuple[str, tuple[int, ...], float]]) -> str:
    """The per-layer rows of `report` as an aligned text table."""
    lines = [(name, "x".join(map(str, shape)), f"{kept:.4f}") for name, shape, kept in rows]
    header = ("layer", "shape", "kept")
    widths = [max(len(r[i]) for r in [header, *lines]) for i in range(3)]
    return "\n".join(
        f"{a:<{widths[0]}}  {b:>{widths[1]}}  {c:>{widths[2]}}" for a, b, c in [header, *lines]
    )
