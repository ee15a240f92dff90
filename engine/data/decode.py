"""Decoding and cropping for the torch backend, in the workers or on the GPU.

Both `data.decode` modes read a file the same way (`read_encoded`: the JPEG bytes, or PIL's
pixels for files nvJPEG cannot take as they are: PNG, CMYK, EXIF-rotated, cut short) and draw
its crop and flip the same way (`CropParams`, torchvision's RandomResizedCrop and
RandomHorizontalFlip draws in their order, from the sample's own generator). Then:
- `cpu`: the worker decodes with torchvision (libjpeg-turbo; `read_decoded`), crops and resizes
  on uint8 (`crop_on_host`) and sends size x size HWC uint8;
- `gpu`: the worker sends the bytes (a batch's packed in one buffer: `collate`) and the plan;
  the main process decodes the batch with nvJPEG, then crops, resizes, flips and normalises
  on the device: in one Triton launch on CUDA (kernels/resized_crops.py), image by image in
  torch elsewhere (`resized_crops`, float, the kernel's reference).
`resized_crops` runs on CPU tensors too, so the tests check the two modes against each other.
"""

from __future__ import annotations

import functools
import io
import math
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch.utils.data import get_worker_info
from torchvision.io import ImageReadMode, decode_jpeg

from engine.data import say_once
from engine.data.images import device_jpeg_size, load_rgb

RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's aspect-ratio range
_LOG_RATIO = torch.log(torch.tensor(RATIO)).tolist()  # in float32, as torchvision draws them
# Errors of the device rather than of an image (torchvision rewraps them as "Error while
# decoding JPEG images: ..."): decoding image by image would only hide them. Case-sensitive
# phrases: every torchvision message begins with its source file, decode_jpegs_cuda.cpp.
_DEVICE_ERROR = re.compile(r"out of memory|CUDA error|CUDA stream|cudaError")
# torchvision decodes a list of JPEGs in one call (one nvJPEG batch on CUDA) from 0.20 on;
# 0.19, torch 2.4's, takes one image per call.
BATCHED_DECODE = tuple(int(p) for p in torchvision.__version__.split(".")[:2]) >= (0, 20)


@dataclass
class Encoded:
    """One file as a worker sends it: JPEG bytes for the device (1-D uint8) or CHW uint8 pixels."""

    data: torch.Tensor
    height: int
    width: int


def read_encoded(path: str, *, on_cpu: bool = False) -> Encoded:
    """Read `path`: the JPEG bytes when nvJPEG (and so torchvision's CPU decoder) can take them
    as they are, else PIL's pixels, as for every file when `on_cpu`. Raises if the file cannot be
    read."""
    raw = Path(path).read_bytes()
    size = None
    if not on_cpu:
        try:
            size = device_jpeg_size(raw)
        except Exception:  # not a format PIL knows: load_rgb below decides
            size = None
    if size is not None:
        return Encoded(torch.frombuffer(bytearray(raw), dtype=torch.uint8), *size)
    pixels = torch.from_numpy(np.array(load_rgb(raw))).permute(2, 0, 1)  # CHW view of HWC
    return Encoded(pixels, pixels.shape[1], pixels.shape[2])


def read_decoded(path: str) -> Encoded:
    """Read and decode `path` here, to CHW uint8 pixels: torchvision's libjpeg-turbo (faster
    than PIL's decode and resize) for the JPEGs `read_encoded` passes on, PIL for the rest.
    Raises if the file cannot be read."""
    image = read_encoded(path)
    if image.data.dim() == 1:  # JPEG bytes
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torchvision.io -> TorchCodec
            pixels = decode_jpeg(image.data, mode=ImageReadMode.RGB)
        image = Encoded(pixels, image.height, image.width)
    return image


class CropParams:
    """Encoded image -> (data, plan, flip). The plan (8 ints) says how to make the output:
    crop (top, left, height, width) of the image, resize that to (height, width), then take the
    size x size window at (top, left). Train draws the crop from `rng` (None: the global RNG)
    exactly as T.RandomResizedCrop + T.RandomHorizontalFlip draw from the global RNG (and
    resizes it to size x size); val resizes the shorter side to `resize` and takes the center,
    as T.Resize + T.CenterCrop."""

    def __init__(self, *, train: bool, size: int, resize: int, min_scale: float) -> None:
        self.train, self.size, self.resize, self.min_scale = train, size, resize, min_scale

    def __call__(
        self, image: Encoded, rng: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, bool]:
        h, w, s = image.height, image.width, self.size
        if self.train:
            box = random_resized_crop(h, w, self.min_scale, rng)
            plan, flip = (*box, s, s, 0, 0), bool(torch.rand(1, generator=rng) < 0.5)
        else:
            rh, rw = _resized(h, w, self.resize)
            # CenterCrop's offsets (Python's round, as torchvision)
            plan, flip = (0, 0, h, w, rh, rw, round((rh - s) / 2), round((rw - s) / 2)), False
        return image.data, torch.tensor(plan), flip


def random_resized_crop(
    height: int, width: int, min_scale: float, rng: torch.Generator | None
) -> tuple[int, int, int, int]:
    """T.RandomResizedCrop.get_params(scale=(min_scale, 1), ratio=RATIO) drawing the same numbers
    in the same order from `rng`: the global RNG cannot be swapped safely while other threads
    draw from it."""
    area = height * width
    for _ in range(10):
        target = area * torch.empty(1).uniform_(min_scale, 1.0, generator=rng).item()
        ratio = torch.empty(1).uniform_(*_LOG_RATIO, generator=rng).exp().item()
        w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=rng))
            left = int(torch.randint(0, width - w + 1, (1,), generator=rng))
            return top, left, h, w
    w, h = width, height  # fallback: the central crop of the nearest allowed ratio
    if width / height < RATIO[0]:
        h = round(width / RATIO[0])
    elif width / height > RATIO[1]:
        w = round(height * RATIO[1])
    return (height - h) // 2, (width - w) // 2, h, w


def _resized(height: int, width: int, shorter: int) -> tuple[int, int]:
    """T.Resize(shorter)'s output size: the shorter side to `shorter`, the longer truncated."""
    if height <= width:
        return shorter, int(shorter * width / height)
    return int(shorter * height / width), shorter


def _window(image: torch.Tensor, plan: list[int], flip: bool, size: int, *, exact: bool):
    """CHW uint8 `image` cropped, resized (bilinear, antialiased) and cut to size x size as
    `plan` says (CropParams), mirrored if `flip`: in float32 when `exact`, else in uint8 (CPU
    only; rounded, about twice as fast) and in NHWC memory, the only layout torch's uint8
    antialiased resize vectorises (3.8x faster on a 300 x 250 crop, same pixels)."""
    top, left, h, w, rh, rw, y, x = plan
    crop = image[None, :, top : top + h, left : left + w]
    crop = crop.float() if exact else crop.contiguous(memory_format=torch.channels_last)
    resized = F.interpolate(crop, size=(rh, rw), mode="bilinear", antialias=True)
    window = resized[0, :, y : y + size, x : x + size]
    return window.flip(-1) if flip else window


def crop_on_host(image: torch.Tensor, plan: torch.Tensor, flip: bool, size: int) -> torch.Tensor:
    """What a worker sends in the cpu mode: the planned window of a CHW uint8 image as HWC
    uint8 (a quarter of float32's bytes to the device, NHWC for free; the resize leaves the
    window in HWC memory, so a train crop needs no copy here)."""
    return _window(image, plan.tolist(), flip, size, exact=False).permute(1, 2, 0).contiguous()


def resized_crops(
    images: list[torch.Tensor],
    plans: torch.Tensor,
    flips: torch.Tensor,
    size: int,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> torch.Tensor:
    """Each CHW uint8 image's planned window (`_window`, in float32): a float32 batch in
    [0, 255] on the images' device. `plans` (B, 8) and `flips` (B,) are CPU tensors, so
    reading them is no sync."""
    out = torch.empty(
        (len(images), 3, size, size), device=images[0].device, memory_format=memory_format
    )
    for i, (image, plan, flip) in enumerate(
        zip(images, plans.tolist(), flips.tolist(), strict=True)
    ):
        out[i] = _window(image, plan, flip, size, exact=True)
    return out


def decode_on_device(images: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """Decode JPEG byte tensors (on the CPU) into CHW uint8 RGB on `device`, as one nvJPEG batch
    on CUDA (`BATCHED_DECODE`); None for each image it cannot decode."""
    if device.type == "cuda":
        # Host sync with the current (side) stream only, usually idle by now: nvJPEG writes
        # from its own stream into memory allocated on this one, without waiting for the
        # kernels queued here (such as the previous batch's crop kernel, still reading the
        # images whose memory the allocator hands out again), so none may be pending
        # (pytorch/vision#9606).
        torch.cuda.current_stream(device).synchronize()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torchvision.io points to TorchCodec
        try:
            # Blocks this thread (the loader's prefetch thread, prefetch.py) while nvJPEG parses
            # and decodes: torchvision synchronizes its decoder's own stream. The current stream
            # then waits for the result on the device.
            if BATCHED_DECODE:
                return list(decode_jpeg(images, mode=ImageReadMode.RGB, device=device))
            return [decode_jpeg(x, mode=ImageReadMode.RGB, device=device) for x in images]
        except RuntimeError as error:  # one bad image fails the batch: find it
            if _DEVICE_ERROR.search(str(error)):
                raise
            decoded = [_decode_one(image, device) for image in images]
            refused = sum(x is None for x in decoded)
            if refused == 0 or (refused == len(images) and len(images) > 1):
                raise  # every image decodes alone, or none does: no bad image to blame
            return decoded


def _decode_one(image: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    try:
        return decode_jpeg(image, mode=ImageReadMode.RGB, device=device)
    except RuntimeError as error:
        if _DEVICE_ERROR.search(str(error)):
            raise
        return None


@functools.cache
def nvjpeg_works(device: torch.device) -> bool:
    """Whether this torchvision decodes JPEGs on `device` (built with nvJPEG for CUDA)."""
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buffer, format="JPEG")
    data = torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        except (RuntimeError, ValueError):
            return False
    return True


class DeviceDecoder:
    """Encoded host batch -> normalised batch on the device: decode, crop, resize, flip and
    normalise there. An image nvJPEG refuses is decoded by PIL here instead, or, when it cannot
    be read at all, replaced like in the workers (`redo(index)` gives the whole item again) and
    reported through `note_bad(index)`."""

    def __init__(
        self,
        batcher,
        redo: Callable[[int], tuple],
        note_bad: Callable[[int], None],
    ) -> None:
        self.batcher, self.redo, self.note_bad = batcher, redo, note_bad

    def __call__(self, batch: tuple, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        buffer, spans, plans, flips, labels, _, index = batch
        device = self.batcher.device
        data = unpack(buffer, spans)
        images: list[torch.Tensor | None] = list(data)
        jpeg = [i for i, x in enumerate(data) if x.dim() == 1]
        if jpeg:
            for i, x in zip(jpeg, decode_on_device([data[i] for i in jpeg], device), strict=True):
                images[i] = x
        for i, x in enumerate(images):
            if x is None:  # rare: re-read on the CPU, with the crop drawn anew
                say_once(
                    "data.decode=gpu: nvJPEG refused an image; such images are re-read on the CPU"
                )
                pixels, plan, flip, label, bad, _ = self.redo(int(index[i]))
                x, plans[i], flips[i], labels[i] = pixels, plan, flip, label
                if bad >= 0:
                    self.note_bad(bad)
            # non_blocking: pixels decoded in a worker come pinned on CUDA (a rare re-read
            # here is not pinned: that copy blocks the host)
            images[i] = x.to(device, non_blocking=True)
        x = self.batcher.crops(images, plans, flips, size)
        return x, labels.to(device, non_blocking=True)


def collate(items: list[tuple]) -> tuple:
    """Encoded items -> (buffer, spans (B, 3), plans (B, 8), flips (B,), labels, bad, index):
    every item's data in one flat uint8 buffer, its span (bytes, height, width; height 0 for
    JPEG bytes) saying how to cut it out (`unpack`). One tensor per batch crosses from the
    worker: with a tensor per image (a shared-memory segment each), receiving a batch of 256
    files of 110 kB from 2 workers took the main process 44-53 ms of CPU time against 6.5 ms
    packed, unpacking included (this project's 2-core CPU machine): a ceiling near 5,000
    img/s for the thread that receives (the DataLoader's pin-memory thread on CUDA), all of it
    holding the GIL the step's launches need. A module-level function: workers pickle it."""
    data, plans, flips, labels, bad, index = zip(*items, strict=True)
    spans = [(x.numel(), 0, 0) if x.dim() == 1 else (x.numel(), *x.shape[1:]) for x in data]
    buffer = torch.empty(0, dtype=torch.uint8)
    if get_worker_info() is not None:  # as default_collate: in shared memory from the start,
        # so that sending it to the main process copies nothing
        buffer.set_(torch.UntypedStorage._new_shared(sum(n for n, _, _ in spans)))
    torch.cat([x.reshape(-1) for x in data], out=buffer)  # CHW pixels flatten in CHW order
    return (
        buffer,
        torch.tensor(spans),
        torch.stack(plans),
        torch.tensor(flips),
        torch.tensor(labels),
        torch.tensor(bad),
        torch.tensor(index),
    )


def unpack(buffer: torch.Tensor, spans: torch.Tensor) -> list[torch.Tensor]:
    """`collate`'s buffer cut back into its items' data: 1-D JPEG bytes or CHW uint8 pixels,
    views of the buffer (contiguous, as nvJPEG needs). `spans` is a CPU tensor: no sync."""
    rows = spans.tolist()
    pieces = torch.split(buffer, [n for n, _, _ in rows])
    return [x if h == 0 else x.view(3, h, w) for x, (_, h, w) in zip(pieces, rows, strict=True)]
