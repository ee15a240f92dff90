"""Plain-torch oracle for the masked SGD update: one parameter at a time, fp32 math."""

from collections.abc import Sequence

import torch
from torch import Tensor


@torch.no_grad()
def masked_sgd_reference_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor],
    masks: Sequence[Tensor | None],
    *,
    lr: float | Tensor,
    momentum: float,
    weight_decay: float,
    nesterov: bool = False,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> None:
    """Masked SGD step in place, written for clarity: the oracle of the tests, not a speed path."""
    # Host syncs (oracle only): found_inf.item() and float(lr) when they are CUDA tensors.
    if found_inf is not None and found_inf.item() != 0:
        return
    lr = float(lr)
    for w, grad, buf, mask in zip(params, grads, momentum_buffers, masks, strict=True):
        g = grad.float()
        if grad_scale is not None:
            g = g / grad_scale.float()
        g = g + weight_decay * w.float()
        keep = None if mask is None else mask.bool()
        if keep is not None:
            g = torch.where(keep, g, 0.0)
        b = momentum * buf.float() + g
        d = g + momentum * b if nesterov else b
        new_w = w.float() - lr * d
        if keep is not None:
            new_w = torch.where(keep, new_w, 0.0)
            b = torch.where(keep, b, 0.0)
        w.copy_(new_w)
        buf.copy_(b)
