"""The `synthetic` backend: one random batch made once on the device and yielded every step,
so that a run measures the model and the trainer, not the input pipeline."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from engine.config import DataConfig
from engine.distributed import Dist
from engine.errors import UserError


class SyntheticLoader:
    """`steps_per_epoch` steps of the same (images, labels) tensors: do not modify them. Images
    come in `dtype`, as the other backends give the autocast dtype, so a compiled step sees the
    same input on synthetic and real data."""

    def __init__(
        self,
        cfg: DataConfig,
        *,
        dist: Dist,
        seed: int,
        num_classes: int,
        channels_last: bool,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if cfg.steps_per_epoch <= 0:
            raise UserError("recipe key 'data.steps_per_epoch': the synthetic backend needs it > 0")
        self.steps = cfg.steps_per_epoch
        g = torch.Generator(device=dist.device).manual_seed(seed + dist.rank)
        b, s = cfg.batch_size, cfg.image_size
        images = torch.randn(b, 3, s, s, generator=g, device=dist.device).to(dtype)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        self.images = images
        self.labels = torch.randint(0, num_classes, (b,), generator=g, device=dist.device)
        self._left: int | None = None  # steps of the next iteration; None: set_epoch not called

    def __len__(self) -> int:
        return self.steps

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Nothing changes between epochs; required anyway, to match the other backends. The
        next iteration yields the steps from `start` on."""
        self._left = max(self.steps - start, 0)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self._left is None:
            raise RuntimeError("SyntheticLoader: call set_epoch(epoch) before each epoch")
        left, self._left = self._left, None
        return iter([(self.images, self.labels)] * left)
