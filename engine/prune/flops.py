"""Compute cost of conv and linear layers, the figure pruning papers compare."""

from __future__ import annotations

import torch
from torch import Tensor, nn


@torch.no_grad()
def count_flops(
    model: nn.Module, image_size: int | tuple[int, int], masks: dict[str, Tensor] | None = None
) -> tuple[int, int]:
    """(dense, effective) multiply-accumulates of all Conv2d and Linear layers for one image,
    reported as FLOPs = MACs (torchvision's convention: 4.09 GFLOPs for ResNet-50 at 224 px).

    Dense counts the model as it is (narrower after structured pruning); effective scales each
    layer by the kept fraction of its weight in `masks` (unstructured pruning). Biases, BN,
    activations and pooling are not counted. Runs one forward pass in eval mode; pass the plain
    module (not DDP- or torch.compile-wrapped) so hooks fire and mask names match.
    """
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    masks = masks or {}
    counts: list[tuple[int, float]] = []

    def hook(name: str):
        def record(m: nn.Module, inputs: tuple[Tensor, ...], out: Tensor) -> None:
            macs = out[0].numel() * m.weight[0].numel()
            mask = masks.get(f"{name}.weight")
            kept = 1.0 if mask is None else int(mask.sum()) / mask.numel()
            counts.append((macs, kept))

        return record

    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    handles = [m.register_forward_hook(hook(n)) for n, m in layers]
    first = next(m for _, m in layers if isinstance(m, nn.Conv2d))
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        model(first.weight.new_zeros(1, first.in_channels, h, w))
    finally:
        for m, training in modes.items():
            m.training = training
        for handle in handles:
            handle.remove()
    return sum(m for m, _ in counts), round(sum(m * k for m, k in counts))
