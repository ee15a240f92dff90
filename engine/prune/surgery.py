"""Model surgery: swap Conv2d/BatchNorm2d/Linear modules for narrower ones, either keeping
chosen channels (structured pruning) or at given shapes (rebuilding a pruned checkpoint)."""

from __future__ import annotations

import itertools
from collections import defaultdict

import torch
from torch import Tensor, nn

_Resizable = (nn.Conv2d, nn.BatchNorm2d, nn.Linear)


def _size(m: nn.Module) -> tuple[int, int]:
    """(output channels, input channels) of a resizable module; a BN's input is its output."""
    if isinstance(m, nn.Conv2d):
        return m.out_channels, m.in_channels
    if isinstance(m, nn.Linear):
        return m.out_features, m.in_features
    return m.num_features, m.num_features


def _empty_like(m: nn.Module, out_ch: int, in_ch: int) -> nn.Module:
    """A module like `m` (same hyper-parameters, device, dtype, mode) at the given widths."""
    ref = next(itertools.chain(m.parameters(), m.buffers()))
    kw = {"device": ref.device, "dtype": ref.dtype}
    if isinstance(m, nn.Conv2d):
        if m.groups != 1:
            raise ValueError("surgery supports only ungrouped convolutions")
        new: nn.Module = nn.Conv2d(
            in_ch,
            out_ch,
            m.kernel_size,
            m.stride,
            m.padding,
            m.dilation,
            bias=m.bias is not None,
            padding_mode=m.padding_mode,
            **kw,
        )
    elif isinstance(m, nn.BatchNorm2d):
        new = nn.BatchNorm2d(out_ch, m.eps, m.momentum, m.affine, m.track_running_stats, **kw)
    else:
        new = nn.Linear(in_ch, out_ch, bias=m.bias is not None, **kw)
    for p_new, p_old in zip(new.parameters(), m.parameters(), strict=True):
        p_new.requires_grad_(p_old.requires_grad)
    if _is_channels_last(m.weight):
        new.to(memory_format=torch.channels_last)
    return new.train(m.training)


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where submodule `name` was."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)


def _resizable(model: nn.Module, name: str) -> nn.Module:
    m = model.get_submodule(name)
    if not isinstance(m, _Resizable):
        raise ValueError(f"{name!r} is a {type(m).__name__}, not a Conv2d/BatchNorm2d/Linear")
    return m


def _is_channels_last(w: Tensor | None) -> bool:
    """Whether a weight is stored channels_last, so the narrower module keeps that layout."""
    cl = torch.channels_last
    return (
        w is not None
        and w.dim() == 4
        and w.is_contiguous(memory_format=cl)
        and not w.is_contiguous()
    )


@torch.no_grad()
def slice_(model: nn.Module, name: str, out_idx: Tensor | None, in_idx: Tensor | None) -> None:
    """Keep only output channels `out_idx` and input channels `in_idx` (None: all) of module
    `name`, copying the kept weights, biases and BN statistics into a narrower module."""
    m = _resizable(model, name)
    out_ch, in_ch = _size(m)
    out_ch = out_ch if out_idx is None else len(out_idx)
    in_ch = in_ch if in_idx is None else len(in_idx)
    new = _empty_like(m, out_ch, in_ch)
    state = {}
    for key, value in m.state_dict().items():
        if value.dim() >= 1 and out_idx is not None:
            value = value.index_select(0, out_idx.to(value.device))
        if key == "weight" and in_idx is not None and not isinstance(m, nn.BatchNorm2d):
            value = value.index_select(1, in_idx.to(value.device))
        state[key] = value
    new.load_state_dict(state)
    _swap(model, name, new)


def resize_to(model: nn.Module, shapes: dict[str, list[int]]) -> None:
    """Replace the Conv2d/BatchNorm2d/Linear modules named in `shapes` (state-dict key -> shape,
    as `engine.checkpoint.arch_of` records) by modules of those shapes; values are arbitrary,
    since the pruned weights are loaded afterwards."""
    by_module: dict[str, dict[str, list[int]]] = defaultdict(dict)
    for key, shape in shapes.items():
        module, _, tensor = key.rpartition(".")
        by_module[module][tensor] = list(shape)
    for name, entries in by_module.items():
        m = _resizable(model, name)
        out_ch, in_ch = _size(m)
        if isinstance(m, nn.BatchNorm2d):
            out_ch = in_ch = next(s[0] for s in entries.values() if s)
        elif "weight" in entries:
            out_ch, in_ch = entries["weight"][:2]
        elif "bias" in entries:
            out_ch = entries["bias"][0]
        new = _empty_like(m, out_ch, in_ch)
        state = new.state_dict()
        wrong = {k: s for k, s in entries.items() if k not in state or list(state[k].shape) != s}
        if wrong:
            raise ValueError(f"cannot resize {name!r} to {wrong}")
        _swap(model, name, new)
