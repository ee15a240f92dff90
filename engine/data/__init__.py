"""Input pipelines. `build_loaders` picks the backend named by `data.backend`:

- `synthetic`: one random batch made on the device, yielded every step (measures the model);
- `torch`: torchvision ImageFolder + DataLoader, decoding JPEGs on the CPU or the GPU
  (engine/data/folder.py, decode.py);
- `dali`: NVIDIA DALI, decoding on the GPU (`mixed`) or, without CUDA, on the CPU
  (engine/data/dali.py); without DALI installed, the torch backend stands in (said once).

Every backend yields `(images, labels)` already on `dist.device`: images (B, 3, S, S),
ImageNet-normalised, in the autocast dtype (`dtype`; DALI has no bfloat16 and gives float16
then, which autocast converts), channels_last when asked; labels int64. Train batches are per
process, drop the last incomplete batch, give every rank the same number of steps, and depend
only on (seed, epoch, rank) once `set_epoch(epoch)` is called, which is required before each
epoch; `set_epoch(epoch, start)` resumes an epoch at a batch (image folders skip the batches
before it unread; DALI replays them). Loaders from image folders count the unreadable files
they replaced in `bad_files`.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import torch

from engine.config import DataConfig
from engine.distributed import Dist
from engine.errors import UserError

# engine.stages numbers epochs across stages as stage * EPOCH_KEY_STRIDE + epoch (the data-order
# key passed to set_epoch); progressive resizing follows the epoch within the stage.
EPOCH_KEY_STRIDE = 100_000


class TrainLoader(Protocol):
    def __len__(self) -> int:
        """Steps per epoch (after the data.steps_per_epoch cap)."""

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Fix the order, augmentation and image size of the next iteration to `epoch`'s; it
        yields the epoch's batches from batch `start` on (a resumed epoch), each exactly as in
        a whole epoch."""

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


class ValLoader(Protocol):
    num_samples: int  # val images over all ranks; each is yielded by exactly one rank

    def __len__(self) -> int:
        """Batches on this rank (may differ between ranks by one)."""

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


def build_loaders(
    cfg: DataConfig,
    *,
    dist: Dist,
    seed: int,
    num_classes: int,
    channels_last: bool,
    dtype: torch.dtype | None = None,
) -> tuple[TrainLoader, ValLoader | None]:
    """This rank's train loader and val loader (None for the synthetic backend). `dtype` is the
    autocast dtype (None: float32)."""
    if cfg.backend == "synthetic":
        from engine.data.synthetic import SyntheticLoader

        kw = dict(dist=dist, seed=seed, num_classes=num_classes, channels_last=channels_last)
        return SyntheticLoader(cfg, dtype=dtype or torch.float32, **kw), None
    if cfg.backend not in ("torch", "dali"):
        raise UserError(f"recipe key 'data.backend': unknown backend {cfg.backend!r}")
    if not cfg.root:
        raise UserError(f"recipe key 'data.root': required by the {cfg.backend} backend")
    check_sizes(cfg)
    root = Path(cfg.root)
    if cfg.generate_demo:
        if root.exists() and not root.is_dir():  # every rank, before the barrier below
            raise UserError(f"recipe key 'data.root': {root} is a file, not a folder")
        if dist.is_main and not (root / "train").is_dir():
            from engine.data import demo

            if root.exists() and any(root.iterdir()):
                raise UserError(
                    f"recipe key 'data.root': {root} has no train/ but is not empty, so the demo "
                    "dataset is not generated there"
                )
            print(f"data: generating the demo dataset in {root}", file=sys.stderr)
            demo.make_demo_dataset(root)
        dist.barrier()  # every rank, every time: the others wait for rank 0's dataset
    kw = dict(dist=dist, seed=seed, num_classes=num_classes, channels_last=channels_last)
    if cfg.backend == "dali" and dali_installed():
        from engine.data import dali

        return dali.build(cfg, dtype=dtype, **kw)
    from engine.data import folder

    if cfg.backend == "dali":
        on_device = folder.device_decoding(cfg.decode, dist.device, cfg.workers)
        say_once(
            "data.backend=dali: NVIDIA DALI is not installed (pip install 'engine[dali-cu13]'); "
            f"using the torch backend with {'GPU' if on_device else 'CPU'} JPEG decoding"
        )

    return folder.build(cfg, dtype=dtype or torch.float32, **kw)


def dali_installed() -> bool:
    """Whether NVIDIA DALI can be imported (it is an optional extra)."""
    return importlib.util.find_spec("nvidia") is not None and (
        importlib.util.find_spec("nvidia.dali") is not None
    )


@functools.cache
def say_once(message: str) -> None:
    """Print a notice to stderr once per process."""
    print(message, file=sys.stderr)


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """A 63-bit seed that depends only on (seed, epoch, rank), well mixed (no collisions of
    nearby triples as with seed + epoch + rank)."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{rank}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of sample `index`'s augmentation in `epoch`: its crop and flip depend on nothing
    else (not the rank, the number of workers, or where an epoch resumed)."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/sample {index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def val_resize(cfg: DataConfig, size: int | None = None) -> int:
    """The shorter side's resize before a center crop of `size` (default data.image_size):
    data.val_resize, or image_size * 256 / 224, scaled by size / image_size (so that train
    without augmentation keeps val's framing at every progressive size)."""
    resize = cfg.val_resize or round(cfg.image_size * 256 / 224)
    return resize if size is None else round(size * resize / cfg.image_size)


def train_image_size(cfg: DataConfig, epoch: int) -> int:
    """Train image size of an epoch (key): data.image_size, or with `data.progressive` (as FFCV
    trains ResNets) `start` until from_epoch, `end` from to_epoch on, and in between the linear
    ramp rounded to a multiple of 32, within [start, end]. Epochs count within the stage."""
    p = cfg.progressive
    if not p.start:
        return cfg.image_size
    end, e = p.end or cfg.image_size, epoch % EPOCH_KEY_STRIDE
    if e <= p.from_epoch:
        return p.start
    if e >= p.to_epoch:
        return end
    size = p.start + (end - p.start) * (e - p.from_epoch) / (p.to_epoch - p.from_epoch)
    rounded = 32 * math.floor(size / 32 + 0.5)
    return min(max(rounded, min(p.start, end)), max(p.start, end))


def check_sizes(cfg: DataConfig) -> None:
    """UserError for image sizes the loaders cannot make."""
    if val_resize(cfg) < cfg.image_size:
        raise UserError(
            f"recipe key 'data.val_resize': {cfg.val_resize} is below data.image_size "
            f"({cfg.image_size}), the center crop taken from it"
        )
    p = cfg.progressive
    if p.start and p.to_epoch < p.from_epoch:
        raise UserError(
            f"recipe key 'data.progressive.to_epoch': {p.to_epoch} is before from_epoch "
            f"({p.from_epoch})"
        )
    if p.start and min(p.start, p.end or cfg.image_size) < 8:
        raise UserError("recipe key 'data.progressive.start': sizes must be at least 8 px")
