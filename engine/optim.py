"""Optimizer construction: SGD with momentum, weight decay optionally off for BN and biases,
fused on CUDA and foreach on the CPU; MaskedSGD keeps pruned weights exactly zero."""

from __future__ import annotations

import torch

from engine.config import OptimConfig


def param_groups(model: torch.nn.Module, cfg: OptimConfig) -> list[dict]:
    """One group with weight decay; when `decay_bn_bias` is off, a second group without it
    for every parameter of one dimension (BN weights and biases, all biases)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.decay_bn_bias:
        return [{"params": params, "weight_decay": cfg.weight_decay}]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    return [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


class MaskedSGD(torch.optim.SGD):
    """SGD whose masked (pruned) entries stay exactly zero: the update, the momentum buffer and
    the weight decay of a pruned weight are all zero. No forward hooks.

    On CUDA (with `fused` set) one Triton kernel per dtype does the whole update, mask
    included, in one pass over memory (kernels.masked_sgd_); it also takes an fp16 GradScaler's
    scale and found-inf flag on the device, so that path needs no host sync. Elsewhere: one
    multiply of all masked grads, then torch's foreach SGD (a pruned weight is zero, so its
    decay term is zero too). The state dict is torch.optim.SGD's (`momentum_buffer` per
    parameter), so checkpoints move between the two. Masks are bool tensors by parameter.
    """

    def __init__(
        self, params, masks: dict[torch.nn.Parameter, torch.Tensor], fused_masked: bool, **kwargs
    ):
        super().__init__(params, **kwargs)
        self.masks = masks
        self.fused_masked = fused_masked
        # GradScaler and step_unless hand grad_scale / found_inf over as attributes to the
        # Triton path and to torch's fused SGD alike: no host read of found_inf.
        self._step_supports_amp_scaling = fused_masked or bool(kwargs.get("fused"))

    @torch.no_grad()
    def step(self, closure=None):
        if self.fused_masked:
            # GradScaler (and step_unless) hand their device tensors over as attributes,
            # as for torch's fused optimizers.
            return self._fused_step(
                getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
            )
        grads, masks = [], []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and p in self.masks:
                    grads.append(p.grad)
                    masks.append(self.masks[p])
        if grads:
            torch._foreach_mul_(grads, masks)  # one pass over all masked grads
        return super().step(closure)

    def _fused_step(self, grad_scale, found_inf) -> None:
        import kernels

        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            kernels.masked_sgd_(
                params,
                [p.grad for p in params],
                [self.state[p]["momentum_buffer"] for p in params],
                [self.masks.get(p) for p in params],
                lr=group["lr"],
                momentum=group["momentum"],
                weight_decay=group["weight_decay"],
                nesterov=group["nesterov"],
                grad_scale=grad_scale,
                found_inf=found_inf,
            )


def build(
    model: torch.nn.Module,
    cfg: OptimConfig,
    masks: dict[str, torch.Tensor] | None = None,
) -> torch.optim.Optimizer:
    """SGD over `model`'s parameters, MaskedSGD when `masks` (by parameter name) are given; the
    fused CUDA kernel where the parameters live on a GPU (it also lets an fp16 GradScaler skip
    its per-step host sync)."""
    on_cuda = next(model.parameters()).is_cuda
    kwargs = dict(
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov,
        weight_decay=cfg.weight_decay,
        fused=True if on_cuda else None,
        foreach=None if on_cuda else True,
    )
    groups = param_groups(model, cfg)
    if not masks:
        return with_momentum_buffers(torch.optim.SGD(groups, **kwargs))
    named = dict(model.named_parameters())
    by_param = {  # each mask in its weight's memory format: the kernel reads both in one order
        named[name]: torch.empty_like(named[name], dtype=torch.bool).copy_(mask)
        for name, mask in masks.items()
    }
    fused_masked = on_cuda and cfg.fused_masked
    if fused_masked:
        kwargs.update(fused=None, foreach=None)
    return with_momentum_buffers(MaskedSGD(groups, by_param, fused_masked, **kwargs))


def with_momentum_buffers(opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Give every parameter a zero momentum buffer now (with dampening 0, the first step
    then makes it the gradient, as torch's SGD does). torch's fused SGD otherwise makes them
    with empty_like at its first step and keeps them uninitialised when that step is skipped
    (found_inf: an fp16 GradScaler's first steps usually are); the Triton kernel wants them."""
    for group in opt.param_groups:
        for p in group["params"]:
            opt.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
    return opt


def load_state(opt: torch.optim.Optimizer, state: dict) -> None:
    """Load a checkpoint's optimizer state but keep this optimizer's implementation (fused,
    foreach): one written on another device or with another optim.fused_masked brings its own,
    which would not match how this optimizer steps."""
    flags = [{k: g[k] for k in ("fused", "foreach") if k in g} for g in opt.param_groups]
    opt.load_state_dict(state)
    for group, kept in zip(opt.param_groups, flags, strict=True):
        group.update(kept)
    with_momentum_buffers(opt)  # a state saved before its first step has none


def step_unless(opt: torch.optim.Optimizer, found_inf: torch.Tensor) -> None:
    """Step unless `found_inf` is nonzero: on the device for optimizers that take the flag
    (torch's fused SGD, MaskedSGD's Triton path), else by reading it (CPU tensors: no sync)."""
    if getattr(opt, "_step_supports_amp_scaling", False):
        opt.grad_scale, opt.found_inf = None, found_inf
        try:
            opt.step()
        finally:
            del opt.grad_scale, opt.found_inf
    elif not found_inf.item():  # host read: only reached with CPU tensors
        opt.step()
