"""The `dali` backend: NVIDIA DALI reads, decodes, crops, resizes, flips and normalises.

On CUDA the decoders run `mixed` (nvJPEG, with the A100/H100 hardware JPEG decoder taking
`data.dali_hw_decoder_load` of each batch; the crop is fused into decoding) and the batch comes
out on the GPU in the autocast dtype (float16 for both fp16 and bf16: DALI has no bfloat16) and
in NHWC when channels_last is on, so no transpose follows. Without CUDA the same graph runs on
the CPU (`device_id=None`), which is what the tests use.

Order. Each epoch the loader gives `fn.readers.file` the epoch's order, exactly the torch
backend's (DistributedSampler's permutation for (seed, epoch), cut to a multiple of the world
size, rank r taking every world-th sample), and the reader shards it by rank (`shard_id`,
`num_shards`, `pad_last_batch`). DALI's own `random_shuffle` is not used: it shuffles within a
small buffer and continues its RNG across epochs, so a resumed epoch could not replay. The
pipeline is built anew each epoch, seeded by (seed, epoch, rank), so epoch e depends on nothing
else and replays identically after a resume; steps per epoch and the last-batch policy (drop)
match the torch backend.

Validation reads the sorted file list in `world` contiguous shards; the padding that
`pad_last_batch` adds to fill the last batch is cut off, so each image counts exactly once.

Unreadable files. A file DALI cannot decode fails the whole pipeline. The loader then finds it
(the error names it, or PIL cannot read it either), replaces it by the next readable file in
ImageFolder order (with that file's label, as the torch backend does), counts it in
`bad_files`, and reads the rest of this rank's share from the failed batch on with a new
pipeline seeded by (seed, epoch, rank, batch): deterministic, so resumes still replay.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from engine.config import DataConfig
from engine.data import train_image_size, val_resize
from engine.data.decode import RATIO
from engine.data.folder import MEAN, STD, check_root, samples
from engine.data.images import readable
from engine.distributed import Dist
from engine.errors import UserError

Batch = tuple[torch.Tensor, torch.Tensor]
PREFETCH = 2  # batches DALI prepares ahead (its prefetch_queue_depth)
# nvJPEG buffer hints sized for ImageNet's largest images, so that the decoders allocate once
# instead of growing during the first epoch (the values of NVIDIA's DALI ResNet-50 example).
DEVICE_MEMORY_PADDING = 211_025_920
HOST_MEMORY_PADDING = 140_544_512


def build(
    cfg: DataConfig,
    *,
    dist: Dist,
    seed: int,
    num_classes: int,
    channels_last: bool,
    dtype: torch.dtype | None = None,
) -> tuple[DaliTrainLoader, DaliValLoader]:
    """Check the folders, then build this rank's train and val loaders."""
    root = Path(cfg.root)
    check_root(root, num_classes)
    gpu = dist.device.type == "cuda"
    graph = Graph(
        cfg=cfg,
        device_id=_device_index(dist.device) if gpu else None,
        layout="HWC" if channels_last else "CHW",
        out_dtype=types.FLOAT if dtype in (None, torch.float32) else types.FLOAT16,
    )
    train = DaliTrainLoader(samples(root / "train"), cfg, dist, seed, graph)
    return train, DaliValLoader(samples(root / "val"), cfg, dist, graph)


@dataclass
class Graph:
    """The DALI pipeline of either split; `device_id` None runs it on the CPU."""

    cfg: DataConfig
    device_id: int | None
    layout: str
    out_dtype: types.DALIDataType

    def pipeline(
        self,
        files: list[tuple[str, int]],
        *,
        augment: bool,
        size: int,
        batch_size: int,
        shard: tuple[int, int],
        seed: int,
    ):
        """A pipeline reading `files` (path, label), shard `shard` = (id, count); `augment`:
        random-resized-crop and flip (train), else resize and center crop (val)."""
        return _graph(
            self,
            files,
            augment,
            size,
            shard,
            batch_size=batch_size,
            num_threads=max(1, self.cfg.workers),
            device_id=self.device_id,
            seed=seed,
            prefetch_queue_depth=PREFETCH,
        )


@pipeline_def
def _graph(g: Graph, files: list[tuple[str, int]], augment: bool, size: int, shard: tuple):
    cfg, gpu = g.cfg, g.device_id is not None
    jpegs, labels = fn.readers.file(
        files=[f for f, _ in files],
        labels=[label for _, label in files],
        shard_id=shard[0],
        num_shards=shard[1],
        pad_last_batch=True,
        random_shuffle=False,  # the loader passes the epoch's order
        name="reader",
    )
    decoder = {"device": "mixed" if gpu else "cpu", "output_type": types.RGB}
    if gpu:
        decoder |= {
            "hw_decoder_load": cfg.dali_hw_decoder_load,
            "device_memory_padding": DEVICE_MEMORY_PADDING,
            "host_memory_padding": HOST_MEMORY_PADDING,
        }
    if augment:
        images = fn.decoders.image_random_crop(
            jpegs,
            random_area=[cfg.min_crop_scale, 1.0],
            random_aspect_ratio=list(RATIO),
            num_attempts=10,
            **decoder,
        )
        images = fn.resize(images, resize_x=size, resize_y=size, interp_type=types.INTERP_LINEAR)
        mirror = fn.random.coin_flip(probability=0.5)
    else:
        images = fn.decoders.image(jpegs, **decoder)
        resize = val_resize(cfg, size)  # scaled with a progressive train size
        images = fn.resize(images, resize_shorter=resize, interp_type=types.INTERP_LINEAR)
        mirror = 0
    images = fn.crop_mirror_normalize(
        images,
        crop=(size, size),  # center crop (val); a no-op after the train resize
        mirror=mirror,
        mean=[m * 255 for m in MEAN],
        std=[s * 255 for s in STD],
        dtype=g.out_dtype,
        output_layout=g.layout,
    )
    labels = fn.cast(labels, dtype=types.INT64)
    return images, labels.gpu() if gpu else labels


class _DaliLoader:
    """Runs pipelines over this rank's samples, replacing unreadable files (module docstring)."""

    def __init__(self, files: list[tuple[str, int]], graph: Graph, batch_size: int) -> None:
        self.files, self.graph, self.batch_size = files, graph, batch_size
        self.bad: set[int] = set()

    @property
    def bad_files(self) -> int:
        """Unreadable files this rank has met so far (each replaced by the next readable one)."""
        return len(self.bad)

    def _run(
        self,
        whole: list[int],
        mine: list[int],
        shard: tuple[int, int],
        *,
        steps: int,
        train: bool,
        augment: bool,
        size: int,
        seeds: tuple[int, ...],
    ) -> Iterator[Batch]:
        """`steps` batches of `mine` (sample indices), which is shard `shard` of `whole`; after
        a failure, the rest of `mine` from the failed batch on, as its only shard. `train`
        drops a last partial batch, val keeps it without the reader's padding."""
        policy = LastBatchPolicy.DROP if train else LastBatchPolicy.PARTIAL
        done, order = 0, whole
        while done < steps:
            files = [self.files[i] for i in order]
            pipe = self.graph.pipeline(
                files,
                augment=augment,
                size=size,
                batch_size=self.batch_size,
                shard=shard,
                seed=_seed(*seeds, done),
            )
            outputs = DALIGenericIterator(
                pipe,
                ["images", "labels"],
                reader_name="reader",
                last_batch_policy=policy,
                prepare_first_batch=False,  # a failure then surfaces in the loop below
            )
            try:
                # Each step waits for DALI's next batch on the host (DALI keeps PREFETCH batches
                # ahead); GPU outputs come with an event the consuming stream waits on (DLPack),
                # so there is no device sync here.
                for out in outputs:
                    yield self._batch(out[0])
                    done += 1
                    if done == steps:
                        return
                return  # val: the shard's last, partial batch was the end
            except RuntimeError as error:
                if not self._replace_unreadable(mine, done, str(error)):
                    raise
            order, shard = mine[done * self.batch_size :], (0, 1)

    def _batch(self, out: dict[str, torch.Tensor]) -> Batch:
        images = out["images"]
        if self.graph.layout == "HWC":
            images = images.permute(0, 3, 1, 2)  # NCHW view with channels_last strides
        return images, out["labels"].view(-1)

    def _replace_unreadable(self, mine: list[int], done: int, error: str) -> bool:
        """Replace, in place, the unreadable files among the batches DALI was working on when
        it failed (batch `done` and those prefetched after it); False if there are none."""
        b = self.batch_size
        window = range(done * b, min(len(mine), (done + PREFETCH + 1) * b))
        found = [p for p in window if self._unreadable(mine[p], error)]
        for p in found:
            self._note_bad(mine[p])
            mine[p] = self._next_readable(mine[p])
        return bool(found)

    def _unreadable(self, index: int, error: str) -> bool:
        path = self.files[index][0]
        return index in self.bad or path in error or not readable(path)

    def _next_readable(self, index: int) -> int:
        n = len(self.files)
        for offset in range(1, n):
            j = (index + offset) % n
            if j not in self.bad and readable(self.files[j][0]):
                return j
        raise RuntimeError("no readable image left in the dataset")

    def _note_bad(self, index: int) -> None:
        if index not in self.bad:
            self.bad.add(index)
            path = self.files[index][0]
            print(f"data: unreadable file replaced by the next one: {path}", file=sys.stderr)


class DaliTrainLoader(_DaliLoader):
    """This rank's shuffled, augmented batches; call set_epoch(e) before each epoch."""

    def __init__(
        self, files: list[tuple[str, int]], cfg: DataConfig, dist: Dist, seed: int, graph: Graph
    ) -> None:
        super().__init__(files, graph, cfg.batch_size)
        self.cfg, self.seed, self.rank, self.world = cfg, seed, dist.rank, dist.world_size
        self.per_rank = len(files) // self.world  # DistributedSampler(drop_last=True)
        full = self.per_rank // cfg.batch_size
        if full == 0:
            raise UserError(
                f"recipe key 'data.batch_size': {len(files)} train images make no full batch of "
                f"{cfg.batch_size} per process x {self.world} processes"
            )
        self.steps = min(full, cfg.steps_per_epoch) if cfg.steps_per_epoch else full
        self._epoch: tuple[int, int] | None = None  # (epoch, start); None: set_epoch not called

    def __len__(self) -> int:
        return self.steps

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Fix the order, augmentation and image size of the next iteration to `epoch`'s, from
        batch `start` on. The batches before it are made and dropped: a pipeline's random
        numbers run on from batch to batch, so it cannot begin in the middle."""
        self._epoch = (epoch, start)

    def __iter__(self) -> Iterator[Batch]:
        if self._epoch is None:
            raise RuntimeError("DaliTrainLoader: call set_epoch(epoch) before each epoch")
        (epoch, start), self._epoch = self._epoch, None
        shares = self.order(epoch)
        batches = self._run(
            [i for share in shares for i in share],
            shares[self.rank],
            (self.rank, self.world),
            steps=self.steps,
            train=True,
            augment=self.cfg.augment,
            size=train_image_size(self.cfg, epoch),
            seeds=(self.seed, epoch, self.rank),
        )
        return itertools.islice(batches, start, None)

    def order(self, epoch: int) -> list[list[int]]:
        """Every rank's samples for `epoch`, in order: DistributedSampler's (shuffle, seed,
        drop_last), so both backends see the same images at each step."""
        g = torch.Generator().manual_seed(self.seed + epoch)
        perm = torch.randperm(len(self.files), generator=g)[: self.per_rank * self.world]
        return [perm[r :: self.world].tolist() for r in range(self.world)]


class DaliValLoader(_DaliLoader):
    """This rank's contiguous share of the val set; each image is yielded by exactly one rank."""

    def __init__(
        self, files: list[tuple[str, int]], cfg: DataConfig, dist: Dist, graph: Graph
    ) -> None:
        super().__init__(files, graph, cfg.val_batch_size or cfg.batch_size)
        self.cfg, self.rank, self.world = cfg, dist.rank, dist.world_size
        self.num_samples = len(files)  # over all ranks
        # the reader's shard bounds
        n = len(files)
        self.share = list(range(n * self.rank // self.world, n * (self.rank + 1) // self.world))

    def __len__(self) -> int:
        return math.ceil(len(self.share) / self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        return self._run(
            list(range(self.num_samples)),
            list(self.share),
            (self.rank, self.world),
            steps=len(self),
            train=False,
            augment=False,
            size=self.cfg.image_size,
            seeds=(0,),
        )


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _seed(*parts: int) -> int:
    """A 31-bit pipeline seed that depends only on `parts`."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % 2**31
