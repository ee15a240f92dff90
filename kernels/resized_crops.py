"""Batched resized crops in Triton: a batch of decoded images of any sizes -> one normalised
training batch, in one launch.

It computes what `engine.data.decode.resized_crops` followed by `DeviceBatcher.normalise` does
image by image (crop, bilinear antialiased resize as F.interpolate's antialias=True, window,
flip, ImageNet normalisation, the output dtype and memory format), which costs three or four
ops per image (float copy, resize, copy into the batch, half of them a flip): about 900 kernel
launches and their Python for a batch of 256, host time that the prefetch thread spends holding
the GIL the training step also needs.

Each output pixel is computed directly in 2-D: its taps span the antialiasing filter's support
in the crop, with torch's span and weight formulas (aten's upsample antialias helpers: center
= scale * (i + 0.5), support = max(scale, 1), triangle filter at (j - center + 0.5) / max(scale,
1), weights normalised per axis), so a tap's weight is the product of the two axes' weights.
Against torch's two passes (rows into a buffer, then columns) that reads up to about twice the
taps, (2s + 1)^2 against (2s + 1)(s + 1) per output pixel at a downscale s, and needs no buffer
nor a second launch.
"""

import contextlib
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK = 256  # output pixels per program
NUM_WARPS = 4
# Columns of the image table: address, channel, row and column strides, crop plan (8), flip.
COLUMNS = 13


@triton.jit
def _axis(i, scale, size):
    """Where output index `i` reads along one axis of a crop of `size` pixels resized by
    1/`scale` (torch's antialias formulas): its span's start and length, the filter's center
    and 1/support."""
    support = tl.maximum(scale, 1.0)
    center = scale * (i.to(tl.float32) + 0.5)
    start = tl.maximum((center - support + 0.5).to(tl.int32), 0)  # truncation, as C's cast
    span = tl.minimum((center + support + 0.5).to(tl.int32), size) - start
    return start, span, center, 1.0 / support


@triton.jit
def _ceil(x):
    """ceil of a positive float, as an int32, from the oldest builtins (GPU machines may have
    older Triton releases than CI)."""
    n = x.to(tl.int32)
    return n + (n.to(tl.float32) < x).to(tl.int32)


@triton.jit
def _weight(j, start, span, center, inv):
    """The triangle filter's weight of tap j of a span (0 past its end)."""
    x = (j + start).to(tl.float32) - center + 0.5
    return tl.where(j < span, tl.maximum(1.0 - tl.abs(x * inv), 0.0), 0.0)


@triton.jit
def _resized_crops_kernel(
    table_ptr,
    out_ptr,
    size,
    stride_b,
    stride_c,
    stride_y,
    stride_x,
    mean0,
    mean1,
    mean2,
    std0,
    std1,
    std2,
    COLUMNS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """BLOCK output pixels (all three channels) of image program_id(0)."""
    b = tl.program_id(0)
    pix = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    live = pix < size * size
    oy, ox = pix // size, pix % size
    row = table_ptr + b * COLUMNS
    src = tl.load(row).to(tl.pointer_type(tl.uint8))
    step_c, step_y, step_x = tl.load(row + 1), tl.load(row + 2), tl.load(row + 3)
    top, left = tl.load(row + 4), tl.load(row + 5)
    h, w = tl.load(row + 6).to(tl.int32), tl.load(row + 7).to(tl.int32)
    rh, rw = tl.load(row + 8), tl.load(row + 9)
    y, x = tl.load(row + 10).to(tl.int32), tl.load(row + 11).to(tl.int32)
    flip = tl.load(row + 12) != 0
    sx = tl.where(flip, size - 1 - ox, ox)  # the window's column this output column shows
    scale_y = h.to(tl.float32) / rh.to(tl.float32)
    scale_x = w.to(tl.float32) / rw.to(tl.float32)
    y0, ny, cy, inv_y = _axis(oy + y, scale_y, h)
    x0, nx, cx, inv_x = _axis(sx + x, scale_x, w)
    # Every span is at most this long (torch's bound: ceil(support) * 2 + 1).
    taps_y = _ceil(tl.maximum(scale_y, 1.0)) * 2 + 1
    taps_x = _ceil(tl.maximum(scale_x, 1.0)) * 2 + 1
    total_y = tl.full((BLOCK,), 0.0, tl.float32)
    for j in range(0, taps_y):
        total_y += _weight(j, y0, ny, cy, inv_y)
    total_x = tl.full((BLOCK,), 0.0, tl.float32)
    for k in range(0, taps_x):
        total_x += _weight(k, x0, nx, cx, inv_x)
    # Lanes past the last pixel have no taps: 1, not 0, keeps their (unstored) values finite.
    total_y = tl.where(live, total_y, 1.0)
    total_x = tl.where(live, total_x, 1.0)
    acc0 = tl.full((BLOCK,), 0.0, tl.float32)
    acc1 = tl.full((BLOCK,), 0.0, tl.float32)
    acc2 = tl.full((BLOCK,), 0.0, tl.float32)
    for j in range(0, taps_y):
        wy = _weight(j, y0, ny, cy, inv_y) / total_y
        line = src + (top + y0 + j).to(tl.int64) * step_y + left * step_x
        for k in range(0, taps_x):
            wx = _weight(k, x0, nx, cx, inv_x)
            tap = live & (j < ny) & (k < nx)
            p = line + (x0 + k).to(tl.int64) * step_x
            weight = wy * wx
            acc0 += weight * tl.load(p, mask=tap, other=0).to(tl.float32)
            acc1 += weight * tl.load(p + step_c, mask=tap, other=0).to(tl.float32)
            acc2 += weight * tl.load(p + 2 * step_c, mask=tap, other=0).to(tl.float32)
    dst = out_ptr + b.to(tl.int64) * stride_b + oy * stride_y + ox * stride_x
    # Compiled, the casts round to nearest even as torch's do; the CPU interpreter truncates
    # to bfloat16 (the tests allow one ulp).
    dtype = out_ptr.dtype.element_ty
    tl.store(dst, ((acc0 / total_x - mean0) / std0).to(dtype), mask=live)
    tl.store(dst + stride_c, ((acc1 / total_x - mean1) / std1).to(dtype), mask=live)
    tl.store(dst + 2 * stride_c, ((acc2 / total_x - mean2) / std2).to(dtype), mask=live)


def resized_crops_triton(
    images: Sequence[Tensor],
    plans: Tensor,
    flips: Tensor,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    dtype: torch.dtype,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> Tensor:
    """Each image's planned window (`plans` (B, 8) and `flips` (B,) as
    engine.data.decode.CropParams makes them, CPU tensors), normalised as (x - mean) / std with
    mean and std on the 0..255 scale: a (B, 3, size, size) batch in `dtype` and `memory_format`
    on the images' device. Images are (3, H, W) uint8 RGB with any strides (CHW, or a view of
    HWC). No host sync: the table goes up pinned, without blocking."""
    device = images[0].device
    rows = []
    for image, plan, flip in zip(images, plans.tolist(), flips.tolist(), strict=True):
        if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(
                f"resized_crops_triton: need (3, H, W) uint8 images, got {image.shape}"
            )
        if image.device != device:
            raise ValueError("resized_crops_triton: the images are on different devices")
        top, left, h, w, rh, rw, y, x = plan
        inside = top + h <= image.shape[1] and left + w <= image.shape[2]
        if min(plan) < 0 or min(h, w) == 0 or not inside or y + size > rh or x + size > rw:
            raise ValueError(f"resized_crops_triton: plan {plan} does not fit {image.shape}")
        rows.append((image.data_ptr(), *image.stride(), *plan, int(flip)))
    table = torch.tensor(rows, dtype=torch.int64)
    on_cuda = device.type == "cuda"
    if on_cuda:  # pinned + non_blocking: an async copy, no host sync
        table = table.pin_memory()
    table = table.to(device, non_blocking=True)
    out = torch.empty((len(images), 3, size, size), device=device, dtype=dtype,
                      memory_format=memory_format)  # fmt: skip
    grid = (len(images), triton.cdiv(size * size, BLOCK))
    # Triton launches on the current device: make it the images'.
    with torch.cuda.device(device) if on_cuda else contextlib.nullcontext():
        _resized_crops_kernel[grid](
            table, out, size, *out.stride(), *mean, *std,
            COLUMNS=COLUMNS, BLOCK=BLOCK, num_warps=NUM_WARPS,
        )  # fmt: skip
    return out
