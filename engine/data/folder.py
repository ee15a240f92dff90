"""The `torch` backend: ImageFolder + DataLoader, decoding on the CPU or on the GPU.

The work is split in two halves:
- host (DataLoader workers): every file is read and its crop and flip drawn the same way
  (decode.py); with `data.decode: cpu` the workers also decode, crop and resize, and return
  HWC uint8, so a batch crosses to the device at a quarter of float32's size; with `gpu` they
  send the file bytes and the plan;
- device (main process, prefetch.py): the copy, and for `gpu` nvJPEG decoding, crop and
  resize; then uint8 -> float, ImageNet normalisation, the autocast dtype and the memory format
  (NHWC is free: it is the host layout). Prepared ahead on a side stream on CUDA; for `gpu`,
  whose decoding blocks the host, in a producer thread besides.

An unreadable file (truncated, not an image) never stops an epoch: it is replaced by the next
readable file in ImageFolder order, with that file's label, and counted in `bad_files`.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler
from torch.utils.data.dataloader import default_collate
from torchvision.datasets import ImageFolder

from engine.config import DataConfig
from engine.data import decode, prefetch, sample_seed, say_once, train_image_size, val_resize
from engine.distributed import Dist
from engine.errors import UserError
from engine.preemption import leave_stops_to_the_main_process

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
Batch = tuple[torch.Tensor, torch.Tensor]


def build(
    cfg: DataConfig,
    *,
    dist: Dist,
    seed: int,
    num_classes: int,
    channels_last: bool,
    dtype: torch.dtype = torch.float32,
) -> tuple[FolderTrainLoader, FolderValLoader]:
    """Check the folders, then build this rank's train and val loaders."""
    root = Path(cfg.root)
    check_root(root, num_classes)
    on_device = device_decoding(cfg.decode, dist.device, cfg.workers)
    batcher = DeviceBatcher(dist.device, channels_last, dtype)
    train = Images(root / "train", cfg, train=cfg.augment, on_device=on_device)
    val = Images(root / "val", cfg, train=False, on_device=on_device)
    return (
        FolderTrainLoader(train, cfg, dist, seed, batcher),
        FolderValLoader(val, cfg, dist, batcher),
    )


# `decode: auto` decodes on the device only with fewer workers than this. Measured on an H200
# machine with 16 CPUs (benchmarks/results/20261127-nvidia-h200): ResNet-50 eager bf16 trained
# at 2,271 img/s with nvJPEG in the main process and 4,166 img/s with 16 workers decoding with
# PIL, about 260 img/s per worker, so workers win from about 9 on (and the workers' torchvision
# decoding since then is faster).
AUTO_GPU_DECODE_BELOW_WORKERS = 8


def device_decoding(choice: str, device: torch.device, workers: int) -> bool:
    """Whether `data.decode` (auto, cpu, gpu) sends JPEG decoding to the device. `auto` does on
    CUDA with few workers. `gpu` on a CPU device runs the same code on the CPU (the tests use it).
    """
    if choice == "cpu" or (choice == "auto" and device.type != "cuda"):
        return False
    if choice == "auto" and workers >= AUTO_GPU_DECODE_BELOW_WORKERS:
        return False
    if decode.nvjpeg_works(device):
        return True
    if choice == "gpu":
        raise UserError(
            f"recipe key 'data.decode': this torchvision cannot decode JPEGs on {device} "
            "(built without nvJPEG); use cpu or auto"
        )
    say_once(f"data.decode=auto: torchvision cannot decode JPEGs on {device}; decoding on CPU")
    return False


def check_root(root: Path, num_classes: int) -> list[str]:
    """The class names of `root/train` after checking both splits; UserError if unusable."""
    found = {}
    for split in ("train", "val"):
        folder = root / split
        if not folder.is_dir():
            raise UserError(f"recipe key 'data.root': folder not found: {folder}")
        found[split] = sorted(e.name for e in folder.iterdir() if e.is_dir())  # = ImageFolder's
        if not found[split]:
            raise UserError(f"recipe key 'data.root': no class folders in {folder}")
    train, val = set(found["train"]), set(found["val"])
    if train != val:
        parts = [
            f"missing in {s}: {_names(a - b)}"
            for s, a, b in (("val", train, val), ("train", val, train))
            if a - b
        ]
        raise UserError(
            f"recipe key 'data.root': train and val class sets differ ({'; '.join(parts)})"
        )
    if len(train) > num_classes:
        raise UserError(
            f"recipe key 'model.num_classes': {len(train)} classes in data "
            f"but the model has {num_classes}"
        )
    return found["train"]


def samples(folder: Path) -> list[tuple[str, int]]:
    """(path, label) of every image under `folder`, in ImageFolder order (both backends)."""
    with _user_error():
        return ImageFolder(str(folder)).samples


class Images(ImageFolder):
    """ImageFolder whose items survive bad files and carry what the device half needs.

    Items: `(hwc_uint8, label, bad)` when decoding on the CPU; `(data, plan, flip, label, bad,
    index)` when decoding on the device (decode.py). `bad` is the index of the unreadable
    file this item replaces, or -1. The crop and flip of item i are drawn from a generator of
    its own, seeded by sample_seed(seed, epoch, i): never from the global RNG, which other
    threads use meanwhile, and the same whichever worker or rank draws them.
    """

    def __init__(self, folder: Path, cfg: DataConfig, *, train: bool, on_device: bool) -> None:
        with _user_error():
            super().__init__(str(folder))
        self.cfg, self.train, self.on_device = cfg, train, on_device
        self.read: Callable = decode.read_encoded if on_device else decode.read_decoded
        self.seed, self.epoch = 0, 0  # set by the train loader's set_epoch
        self.set_size(cfg.image_size)

    def set_size(self, size: int) -> None:
        """Output size (the crops drawn for it; the device half resizes in the gpu mode)."""
        self.size = size
        self.transform = decode.CropParams(
            train=self.train,
            size=size,
            resize=val_resize(self.cfg, size),
            min_scale=self.cfg.min_crop_scale,
        )

    def collate(self, items: list[tuple]) -> tuple:
        """Items -> a batch (the device-decoding items keep their own sizes)."""
        return decode.collate(items) if self.on_device else default_collate(items)

    def __getitem__(self, index: int) -> tuple:
        return self.item(index, self.read, self.rng(index) if self.train else None)

    def rng(self, index: int) -> torch.Generator:
        """The generator of item `index`'s crop and flip in this epoch."""
        return torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, index))

    def item(self, index: int, read: Callable, rng: torch.Generator | None) -> tuple:
        """The item of `index`, or of the next readable file if `read` cannot read it, its crop
        drawn from `rng` (None for val, which draws nothing)."""
        n = len(self.samples)
        for offset in range(n):
            path, label = self.samples[(index + offset) % n]
            try:
                image = read(path)
            except Exception:  # decoders raise many types on bad data; all mean "unreadable"
                continue
            bad = index if offset else -1
            data, plan, flip = self.transform(image, rng)
            if self.on_device:
                return data, plan, flip, label, bad, index
            return decode.crop_on_host(data, plan, flip, self.size), label, bad
        raise RuntimeError(f"no readable image in {self.root}")

    def redo_on_cpu(self, index: int) -> tuple:
        """The item of `index` decoded by PIL, for an image that nvJPEG refused in the main
        process, with the crop its worker drew."""
        return self.item(
            index, functools.partial(decode.read_encoded, on_cpu=True), self.rng(index)
        )


class DeviceBatcher:
    """Host HWC uint8 batch -> normalised NCHW batch on the device, in the autocast dtype."""

    def __init__(
        self, device: torch.device, channels_last: bool, dtype: torch.dtype = torch.float32
    ) -> None:
        self.device, self.channels_last, self.dtype = device, channels_last, dtype
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        # Made once: building them per batch would be a blocking host->device copy.
        self.mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(STD, device=device).view(1, 3, 1, 1) * 255

    def __call__(self, batch: tuple, size: int) -> Batch:
        """(images, labels, bad) -> (images, labels) on the device; `size` is unused (the
        workers made the images at their size)."""
        images, labels, _ = batch
        # non_blocking: no host sync (the DataLoader pinned the host tensors on CUDA).
        x = images.to(self.device, non_blocking=True).permute(0, 3, 1, 2)  # NCHW view, NHWC strides
        if not self.channels_last:
            x = x.contiguous()  # on uint8: 4x cheaper than on float
        return self.normalise(x), labels.to(self.device, non_blocking=True)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """NCHW in [0, 255] (uint8, or float32 which is overwritten) -> normalised, in dtype."""
        x = x.float().sub_(self.mean).div_(self.std)  # .float() keeps the memory format
        return x.to(self.dtype)  # no copy for float32

    def crops(
        self, images: list[torch.Tensor], plans: torch.Tensor, flips: torch.Tensor, size: int
    ) -> torch.Tensor:
        """CHW uint8 images on the device -> their planned windows (decode.CropParams),
        normalised: one Triton launch on CUDA (or under TRITON_INTERPRET=1), else image by
        image in torch (decode.resized_crops, the kernel's reference)."""
        if self.device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
            from kernels.resized_crops import resized_crops_triton  # lazy: needs triton

            mean, std = [m * 255 for m in MEAN], [s * 255 for s in STD]
            return resized_crops_triton(
                images, plans, flips, size, mean, std, self.dtype, self.memory_format
            )
        return self.normalise(decode.resized_crops(images, plans, flips, size, self.memory_format))


class _Loader:
    """What the train and val loaders share: the device half and the bad-file count."""

    def __init__(self, dataset: Images, batcher: DeviceBatcher) -> None:
        self.dataset, self.device = dataset, batcher.device
        self.bad: set[int] = set()
        # Device decoding blocks the host (nvJPEG), so it runs in a producer thread while the
        # main thread steps; benchmarks/throughput.py turns this off to measure the difference.
        self.prepare_in_thread = dataset.on_device
        self.prepare: Callable[[tuple, int], Batch] = (
            decode.DeviceDecoder(batcher, dataset.redo_on_cpu, self._note_bad)
            if dataset.on_device
            else batcher
        )

    @property
    def bad_files(self) -> int:
        """Unreadable files this rank has met so far (each replaced by the next readable one)."""
        return len(self.bad)

    def _note_bad(self, index: int) -> None:
        if index not in self.bad:
            self.bad.add(index)
            path = self.dataset.samples[index][0]
            print(f"data: unreadable file replaced by the next one: {path}", file=sys.stderr)

    def _device_batches(self, host: Iterator[tuple], size: int) -> Iterator[Batch]:
        return prefetch.to_device(
            self._counted(host),
            lambda b: self.prepare(b, size),
            self.device,
            in_thread=self.prepare_in_thread,
        )

    def _counted(self, host: Iterator[tuple]) -> Iterator[tuple]:
        for batch in host:
            bad = batch[-2] if self.dataset.on_device else batch[-1]
            for index in bad[bad >= 0].tolist():  # a CPU tensor: no sync
                self._note_bad(index)
            yield batch


class FolderTrainLoader(_Loader):
    """This rank's shuffled, augmented batches; call set_epoch(e) before each epoch.

    Epoch e depends only on (seed, e, rank): the order comes from DistributedSampler(seed) with
    set_epoch(e), each sample's crop and flip from sample_seed(seed, e, index) (Images), so a
    resumed epoch starts at its batch without reading the ones before, and the number of
    workers changes nothing. Workers are not persistent: each epoch they take the dataset with
    its epoch and size. The global torch RNG is never used, so the caller's stream is untouched.
    The train image size of epoch e is `train_image_size(cfg, e)` (progressive resizing).
    """

    def __init__(
        self, dataset: Images, cfg: DataConfig, dist: Dist, seed: int, batcher: DeviceBatcher
    ) -> None:
        super().__init__(dataset, batcher)
        self.cfg, self.seed = cfg, seed
        self.sampler = _From(
            DistributedSampler(
                dataset,
                num_replicas=dist.world_size,
                rank=dist.rank,
                shuffle=True,
                seed=seed,
                drop_last=True,
            )
        )
        self.loader = DataLoader(
            dataset,
            batch_size=cfg.batch_size,
            sampler=self.sampler,
            num_workers=cfg.workers,
            collate_fn=dataset.collate,
            pin_memory=dist.device.type == "cuda",
            drop_last=True,
            persistent_workers=False,
            worker_init_fn=leave_stops_to_the_main_process,
            generator=torch.Generator(),  # its base seed draw leaves the global RNG alone
        )
        full = len(self.loader)
        if full == 0:
            raise UserError(
                f"recipe key 'data.batch_size': {len(dataset)} train images make no full batch of "
                f"{cfg.batch_size} per process x {dist.world_size} processes"
            )
        self.steps = min(full, cfg.steps_per_epoch) if cfg.steps_per_epoch else full
        self.size = cfg.image_size
        self._epoch_set = False  # set_epoch called for the next iteration

    def __len__(self) -> int:
        return self.steps

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Fix the order, augmentation and image size of the next iteration to `epoch`'s, from
        batch `start` on (the ones before are not read)."""
        self.sampler.set_epoch(epoch)
        self.sampler.start = start * self.cfg.batch_size
        self.dataset.seed, self.dataset.epoch = self.seed, epoch
        self.size = train_image_size(self.cfg, epoch)
        self.dataset.set_size(self.size)  # workers start per epoch: they pickle it anew
        self.left = max(self.steps - start, 0)
        self._epoch_set = True

    def __iter__(self) -> Iterator[Batch]:
        if not self._epoch_set:
            raise RuntimeError("FolderTrainLoader: call set_epoch(epoch) before each epoch")
        self._epoch_set = False
        it = iter(self.loader)  # starts the workers now
        return self._device_batches(itertools.islice(it, self.left), self.size)


class _From(Sampler):
    """A sampler's indices from the `start`-th on: a resumed epoch's remaining batches."""

    def __init__(self, sampler: DistributedSampler) -> None:
        self.sampler, self.start = sampler, 0

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(iter(self.sampler), self.start, None)

    def __len__(self) -> int:
        return max(len(self.sampler) - self.start, 0)


class FolderValLoader(_Loader):
    """This rank's share of the val set, every image on exactly one rank (no padding).

    Ranks may yield different numbers of batches: reduce metrics only after the loop.
    """

    def __init__(
        self, dataset: Images, cfg: DataConfig, dist: Dist, batcher: DeviceBatcher
    ) -> None:
        super().__init__(dataset, batcher)
        self.size = cfg.image_size
        self.num_samples = len(dataset)  # over all ranks
        self.loader = DataLoader(
            dataset,
            batch_size=cfg.val_batch_size or cfg.batch_size,
            sampler=range(dist.rank, len(dataset), dist.world_size),
            num_workers=cfg.workers,
            collate_fn=dataset.collate,
            pin_memory=dist.device.type == "cuda",
            worker_init_fn=leave_stops_to_the_main_process,
            generator=torch.Generator(),
        )  # own generator: the workers' base seed is not drawn from the global RNG

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Batch]:
        return self._device_batches(iter(self.loader), self.size)


@contextlib.contextmanager
def _user_error() -> Iterator[None]:
    """ImageFolder's FileNotFoundError (e.g. a class folder without images) as a UserError."""
    try:
        yield
    except FileNotFoundError as e:
        raise UserError(f"recipe key 'data.root': {e}") from None


def _names(names: set[str], limit: int = 5) -> str:
    shown = sorted(names)[:limit]
    return ", ".join(shown) + (f" and {len(names) - limit} more" if len(names) > limit else "")
