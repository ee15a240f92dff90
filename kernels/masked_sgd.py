"""Multi-tensor masked SGD in Triton: reads weight, grad, buffer, mask once, writes w, buf once."""

# Layout choice: a pointer table, not one flat buffer. Weights, autograd's grads and the momentum
# buffers are allocated by their owners, so we cannot assume they are views of one flat buffer.
# Each launch instead gets an int64 table with one row per parameter (addresses of weight, grad,
# buffer and mask, 0 for no mask, and numel) and an int32 table with one row per CHUNK elements
# (parameter row, chunk index). A program updates one chunk in storage order, so any dense layout
# (contiguous or channels_last) is correct as long as a parameter's four tensors share strides.
# One launch per (weight, grad, buffer) dtype triple: an fp32 ResNet-50 is one launch per step,
# and the tables are built and uploaded once per set of tensors (see _key), not every step.
# Masks are uint8 (or bool): 1 of the 21 bytes an fp32 element moves. Bit-packing them was
# bounded by measurement instead of built: on an H200 the update runs at the copy's speed, and
# reading no masks at all took 0.127 ms against 0.132 (benchmarks/results/20261127-nvidia-h200),
# so 1-bit masks could save at most 4% of an update that is under 0.4% of a ResNet-50 step.

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _check_args

Param = tuple[Tensor, Tensor, Tensor, Tensor | None]  # weight, grad, buffer, mask
Launch = tuple[tuple[torch.dtype, ...], Tensor, Tensor, bool]  # dtypes, tables, aligned

BLOCK = 1024  # elements per loop iteration of a program
ITERS = 4  # iterations per program
CHUNK = BLOCK * ITERS  # elements per program
NUM_WARPS = 4
_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16}
_PLANS: dict[tuple, tuple[list[Launch], list[int]]] = {}  # keyed by _key
_PLANS_KEPT = 8  # grads may move when zero_grad(set_to_none=True) frees them: keep a few plans


@triton.jit
def _update(w_ptrs, g_ptrs, b_ptrs, m_ptrs, live, keep_live, lr, scale, momentum, weight_decay,
            NESTEROV: tl.constexpr):  # fmt: skip
    """One BLOCK of the update. `live` (None: every lane) bounds the parameter; masked-out weight
    and buffer entries are written as exact zeros."""
    w = tl.load(w_ptrs, mask=live).to(tl.float32)
    g = tl.load(g_ptrs, mask=live).to(tl.float32)
    b = tl.load(b_ptrs, mask=live).to(tl.float32)
    keep = tl.load(m_ptrs, mask=keep_live, other=1) != 0
    if scale is not None:
        g = g / scale
    g = g + weight_decay * w
    b = momentum * b + g
    d = g + momentum * b if NESTEROV else b
    w = w - lr * d
    # Round to nearest even, as torch does; compiled Triton does by default, but the CPU
    # interpreter truncates unless asked.
    w = tl.where(keep, w, 0.0).to(w_ptrs.dtype.element_ty, fp_downcast_rounding="rtne")
    b = tl.where(keep, b, 0.0).to(b_ptrs.dtype.element_ty, fp_downcast_rounding="rtne")
    tl.store(w_ptrs, w, mask=live)
    tl.store(b_ptrs, b, mask=live)


@triton.jit
def _masked_sgd_kernel(
    tensors_ptr,
    chunks_ptr,
    lr_ptr,
    lr_value,
    scale_ptr,
    found_inf_ptr,
    momentum,
    weight_decay,
    W_DTYPE: tl.constexpr,
    G_DTYPE: tl.constexpr,
    B_DTYPE: tl.constexpr,
    NESTEROV: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
    ITERS: tl.constexpr,
):
    """Update one CHUNK of one parameter; masked-out weight and buffer entries become exact 0."""
    row = tensors_ptr + 5 * tl.load(chunks_ptr + 2 * tl.program_id(0)).to(tl.int64)
    start = tl.load(chunks_ptr + 2 * tl.program_id(0) + 1) * (BLOCK * ITERS)
    w_addr, g_addr = tl.load(row), tl.load(row + 1)
    b_addr, m_addr = tl.load(row + 2), tl.load(row + 3)
    numel = tl.load(row + 4).to(tl.int32)
    w_ptr = w_addr.to(tl.pointer_type(W_DTYPE))
    g_ptr = g_addr.to(tl.pointer_type(G_DTYPE))
    b_ptr = b_addr.to(tl.pointer_type(B_DTYPE))
    m_ptr = m_addr.to(tl.pointer_type(tl.uint8))
    if ALIGNED:  # every address is a multiple of 16 bytes (said of the pointers: a hint on the
        w_ptr = tl.multiple_of(w_ptr, 16)  # integer addresses is lost in the cast)
        g_ptr = tl.multiple_of(g_ptr, 16)
        b_ptr = tl.multiple_of(b_ptr, 16)
        m_ptr = tl.multiple_of(m_ptr, 16)
    has_mask = m_addr != 0
    if found_inf_ptr is not None:  # skipped step: every load and store below is masked off
        numel = tl.where(tl.load(found_inf_ptr) == 0, numel, 0)
    lr = tl.load(lr_ptr).to(tl.float32) if lr_ptr is not None else lr_value
    scale = tl.load(scale_ptr).to(tl.float32) if scale_ptr is not None else None
    # 16-byte accesses also need a whole vector to be in bounds: a bound read from memory has
    # unknown divisibility, so a load masked by it goes one element at a time. Whole chunks (all
    # but each parameter's last) therefore go without a bound.
    if start + BLOCK * ITERS <= numel:
        for i in range(ITERS):
            offs = start + i * BLOCK + tl.arange(0, BLOCK)
            _update(w_ptr + offs, g_ptr + offs, b_ptr + offs, m_ptr + offs, None, has_mask,
                    lr, scale, momentum, weight_decay, NESTEROV)  # fmt: skip
    else:
        for i in range(ITERS):
            offs = start + i * BLOCK + tl.arange(0, BLOCK)
            live = offs < numel
            _update(w_ptr + offs, g_ptr + offs, b_ptr + offs, m_ptr + offs, live,
                    live & has_mask, lr, scale, momentum, weight_decay, NESTEROV)  # fmt: skip


def _dense_strides(t: Tensor) -> tuple[int, ...] | None:
    """Strides of the non-singleton dims if t covers its storage span densely, else None."""
    dims = sorted((s, n) for s, n in zip(t.stride(), t.shape, strict=True) if n != 1)
    expected = 1
    for s, n in dims:
        if s != expected:
            return None
        expected *= n
    return tuple(s for s, n in zip(t.stride(), t.shape, strict=True) if n != 1)


def _shares_layout(*ts: Tensor | None) -> bool:
    """Whether the given tensors are dense with identical strides, so storage order matches."""
    layouts = {_dense_strides(t) for t in ts if t is not None}
    return len(layouts) == 1 and None not in layouts


def _launches(group: Sequence[Param]) -> list[Launch]:
    """Build and upload the (parameter, chunk) tables of each dtype group of dense parameters."""
    by_dtype: dict[tuple[torch.dtype, ...], list[Param]] = {}
    for w, g, b, m in group:
        by_dtype.setdefault((w.dtype, g.dtype, b.dtype), []).append((w, g, b, m))
    launches = []
    for dtypes, ps in by_dtype.items():
        rows = [(w.data_ptr(), g.data_ptr(), b.data_ptr(), m.data_ptr() if m is not None else 0,
                 w.numel()) for w, g, b, m in ps]  # fmt: skip
        chunks = [(i, c) for i, r in enumerate(rows) for c in range(triton.cdiv(r[4], CHUNK))]
        tensors_h = torch.tensor(rows, dtype=torch.int64)
        chunks_h = torch.tensor(chunks, dtype=torch.int32)
        device = ps[0][0].device
        if device.type == "cuda":  # pinned + non_blocking: an async copy, no host sync
            tensors_h, chunks_h = tensors_h.pin_memory(), chunks_h.pin_memory()
        aligned = all(a % 16 == 0 for r in rows for a in r[:4])
        tensors = tensors_h.to(device, non_blocking=True)
        launches.append((dtypes, tensors, chunks_h.to(device, non_blocking=True), aligned))
    return launches


def _plan(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor],
    masks: Sequence[Tensor | None],
) -> tuple[list[Launch], list[int]]:
    """Validate once per tensor layout: the launches for dense parameters, indices of the rest."""
    _check_args(params, grads, momentum_buffers, masks)
    direct, fallback = [], []
    for i, (w, g, b, m) in enumerate(zip(params, grads, momentum_buffers, masks, strict=True)):
        if w.numel() > 2**31 - CHUNK:
            raise ValueError(f"masked_sgd_: {w.numel()} elements exceed the kernel's int32 offsets")
        if any(t.dtype not in _TL_DTYPES for t in (w, g, b)):
            raise TypeError(f"masked_sgd_: unsupported dtypes {w.dtype}, {g.dtype}, {b.dtype}")
        if w.numel() == 0:
            continue
        if _shares_layout(w, g, b, m):
            direct.append((w, g, b, m))
        else:
            fallback.append(i)
    return _launches(direct), fallback


def _key(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor],
    masks: Sequence[Tensor | None],
) -> tuple:
    """What a cached plan depends on: every tensor's address, the weights' sizes, and the grads'
    strides and dtypes.

    Reading this key is the host cost of a step, so it holds only what can change between
    steps: autograd may allocate a new grad (a new address, or in principle another layout or
    dtype), and a new, smaller weight (after filter pruning) may land at a freed one's address.
    Buffers and masks are taken to keep shape, strides and dtype while they keep their address,
    as an optimizer's own tensors do.
    """
    ptr = Tensor.data_ptr
    return (
        params[0].device,
        tuple(map(ptr, params)),
        tuple(map(Tensor.numel, params)),
        tuple(map(ptr, grads)),
        tuple(map(ptr, momentum_buffers)),
        tuple(m.data_ptr() if m is not None else 0 for m in masks),
        tuple(map(Tensor.stride, grads)),
        tuple(g.dtype for g in grads),
    )


def masked_sgd_triton_(
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
    """Masked SGD step in place with one Triton launch per dtype group; no host sync.

    Validation and tables are cached by `_key` (reading it is the host cost of a step): a buffer
    or mask given another shape at the same address, or a weight, buffer or mask given other
    strides or dtype there, is not detected.
    """
    for t in (lr, grad_scale, found_inf):
        if isinstance(t, Tensor) and t.device != params[0].device:
            raise ValueError(
                f"masked_sgd_: lr, grad_scale, found_inf must be on {params[0].device}"
            )
    key = _key(params, grads, momentum_buffers, masks)
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) >= _PLANS_KEPT:
            _PLANS.clear()
        plan = _PLANS[key] = _plan(params, grads, momentum_buffers, masks)
    launches, fallback = plan
    # Safe path for mismatched or non-dense strides: update contiguous copies, then copy back.
    copies = [
        (params[i].contiguous(), grads[i].contiguous(), momentum_buffers[i].contiguous(),
         masks[i].contiguous() if masks[i] is not None else None)
        for i in fallback
    ]  # fmt: skip
    if copies:
        launches = launches + _launches(copies)
    lr_ptr, lr_value = (lr, 0.0) if isinstance(lr, Tensor) else (None, float(lr))
    for (w_dtype, g_dtype, b_dtype), tensors, chunks, aligned in launches:
        _masked_sgd_kernel[(chunks.shape[0],)](
            tensors,
            chunks,
            lr_ptr,
            lr_value,
            grad_scale,
            found_inf,
            float(momentum),
            float(weight_decay),
            W_DTYPE=_TL_DTYPES[w_dtype],
            G_DTYPE=_TL_DTYPES[g_dtype],
            B_DTYPE=_TL_DTYPES[b_dtype],
            NESTEROV=bool(nesterov),
            ALIGNED=aligned,
            BLOCK=BLOCK,
            ITERS=ITERS,
            num_warps=NUM_WARPS,
        )
    for i, (w_c, _, b_c, _) in zip(fallback, copies, strict=True):
        for dst, src in ((params[i], w_c), (momentum_buffers[i], b_c)):
            if src.data_ptr() != dst.data_ptr():
                dst.copy_(src)
