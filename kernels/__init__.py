"""Triton kernels: the fused masked SGD update of pruned training (the engine calls `masked_sgd_`
on any device) and the batched resized crops of GPU JPEG decoding (`resized_crops.py`)."""

import os
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["masked_sgd_", "masked_sgd_torch_"]


def _check_args(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor],
    masks: Sequence[Tensor | None],
) -> None:
    """Reject argument lists that the kernels would silently misread or broadcast."""
    if not len(params) == len(grads) == len(momentum_buffers) == len(masks):
        raise ValueError("masked_sgd_: params, grads, momentum_buffers and masks differ in length")
    for w, g, b, m in zip(params, grads, momentum_buffers, masks, strict=True):
        if any(t.device != w.device for t in (g, b, m) if t is not None):
            raise ValueError("masked_sgd_: a parameter's tensors are on different devices")
        if not w.shape == g.shape == b.shape or (m is not None and m.shape != w.shape):
            raise ValueError(f"masked_sgd_: shape mismatch for a parameter of {tuple(w.shape)}")
        if m is not None and m.dtype not in (torch.bool, torch.uint8):
            raise TypeError(f"masked_sgd_: masks must be bool or uint8, got {m.dtype}")


@torch.no_grad()
def masked_sgd_(
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
    """SGD step (momentum, dampening 0) in place that keeps masked-out weights and buffers at zero.

    Per element, in fp32: g = grad / grad_scale + weight_decay * w; buf = momentum * buf + g;
    d = g + momentum * buf if nesterov else buf; w = w - lr * d; where mask == 0, w = buf = 0.
    `masks[i]` is a bool/uint8 tensor shaped like `params[i]`, or None for an unpruned parameter.
    `lr` is a float or a 0-dim tensor on the parameters' device (changing it neither recompiles nor
    syncs); `grad_scale` (fp16 AMP: grads are still scaled) and `found_inf` (nonzero: skip the
    whole step) are optional 0-dim tensors on that device. Weights may be fp32 (grads fp32 or bf16)
    or bf16; momentum buffers have the weights' dtype.

    First step: pass zero-initialised momentum buffers, no flag needed. With dampening 0,
    momentum * 0 + g == g exactly, which is torch.optim.SGD's first-step `buf = g.clone()`.

    Dispatch: CUDA tensors, or any tensors while TRITON_INTERPRET=1, go to the Triton kernel
    (`kernels.masked_sgd.masked_sgd_triton_`, no host sync); other (CPU) tensors go to the
    foreach path `masked_sgd_torch_`, so the engine can call this one function everywhere.
    """
    if not params:
        return
    if params[0].is_cuda or os.environ.get("TRITON_INTERPRET") == "1":
        from .masked_sgd import masked_sgd_triton_  # lazy: triton is only needed on this path

        update = masked_sgd_triton_
    else:
        update = masked_sgd_torch_
    update(
        params,
        grads,
        momentum_buffers,
        masks,
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        nesterov=nesterov,
        grad_scale=grad_scale,
        found_inf=found_inf,
    )


@torch.no_grad()
def masked_sgd_torch_(
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
    """`masked_sgd_` with torch._foreach_* ops: the CPU path; grads are left unmodified.

    Masks are applied by multiplying the updated weights and buffers, which equals zeroing the
    masked grads first and then writing zeros (unlike the kernel, a non-finite masked grad
    becomes NaN here; AMP's found_inf skips such steps).
    """
    _check_args(params, grads, momentum_buffers, masks)
    # Host syncs (free on CPU, the only device masked_sgd_ sends here): found_inf, lr, grad_scale.
    if found_inf is not None and found_inf.item() != 0:
        return
    lr = lr.item() if isinstance(lr, Tensor) else lr
    # fp32 math: .float() returns fp32 tensors themselves and fp32 copies of bf16/fp16 ones.
    ws = [w.float() for w in params]
    bs = [b.float() for b in momentum_buffers]
    gs = [g.float() for g in grads]
    if grad_scale is not None:
        gs = torch._foreach_div(gs, grad_scale.item())
    if weight_decay:
        gs = torch._foreach_add(gs, ws, alpha=weight_decay)
    torch._foreach_mul_(bs, momentum)
    torch._foreach_add_(bs, gs)
    ds = torch._foreach_add(gs, bs, alpha=momentum) if nesterov else bs
    torch._foreach_add_(ws, ds, alpha=-lr)
    idx = [i for i, m in enumerate(masks) if m is not None]
    if idx:
        keep = [masks[i] for i in idx]
        torch._foreach_mul_([ws[i] for i in idx], keep)
        torch._foreach_mul_([bs[i] for i in idx], keep)
    low = [i for i, w in enumerate(params) if w.dtype != torch.float32]
    if low:
        torch._foreach_copy_([params[i] for i in low], [ws[i] for i in low])
        torch._foreach_copy_([momentum_buffers[i] for i in low], [bs[i] for i in low])
