"""The DALI backend, CPU-only (`device_id=None`), on small generated JPEG folders.

Most tests use a "colour" dataset: every image is one solid colour that encodes its index, so a
batch tells which files it holds whatever the crop, flip and resize did."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed")

from engine.config import DataConfig, ProgressiveConfig  # noqa: E402
from engine.data import build_loaders, demo  # noqa: E402
from engine.data.dali import DaliTrainLoader, DaliValLoader  # noqa: E402
from engine.data.folder import MEAN, STD  # noqa: E402
from engine.distributed import Dist  # noqa: E402

CLASSES, TRAIN_PER_CLASS, VAL_IMAGES = 3, 8, 13  # 24 train images; 13 val: shards of 6 and 7


def colour(i: int, k: int) -> tuple[int, int, int]:
    """The colour of image i (index within its split) of class k."""
    return 12 + 8 * i, 40 + 70 * k, 128


def make_colour_dataset(root: Path, size: int = 32) -> Path:
    """train: CLASSES x TRAIN_PER_CLASS images; val: VAL_IMAGES spread over the classes."""
    counts = {"train": [TRAIN_PER_CLASS] * CLASSES, "val": [5, 4, 4]}
    for split, per_class in counts.items():
        i = 0
        for k, n in enumerate(per_class):
            folder = root / split / f"c{k}"
            folder.mkdir(parents=True)
            for _ in range(n):
                Image.new("RGB", (size + 8, size), colour(i, k)).save(folder / f"{i:03d}.JPEG")
                i += 1
    return root


def ids(images: torch.Tensor) -> list[int]:
    """Image indices read back from the red channel of normalised images."""
    red = images[:, 0].float().mean(dim=(1, 2)) * STD[0] * 255 + MEAN[0] * 255
    return ((red - 12) / 8).round().int().tolist()


def fake(rank: int = 0, world: int = 1) -> Dist:
    return Dist(rank=rank, world_size=world, local_rank=0, device=torch.device("cpu"), backend=None)


def loaders(root: Path, *, rank=0, world=1, seed=0, channels_last=False, dtype=None, **kw):
    base = dict(backend="dali", root=str(root), batch_size=4, image_size=24, workers=2)
    cfg = DataConfig(**{**base, **kw})
    return build_loaders(
        cfg, dist=fake(rank, world), seed=seed, num_classes=10, channels_last=channels_last,
        dtype=dtype,
    )  # fmt: skip


def epoch(train, e: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    train.set_epoch(e)
    return list(train)


@pytest.fixture(scope="module")
def colours(tmp_path_factory) -> Path:
    return make_colour_dataset(tmp_path_factory.mktemp("colours"))


@pytest.fixture(scope="module")
def textures(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("textures") / "demo"
    return demo.make_demo_dataset(root, classes=3, train_per_class=4, val_per_class=4, size=48)


@pytest.mark.parametrize(
    ("channels_last", "dtype", "expected"),
    [(False, None, torch.float32), (True, torch.float16, torch.float16), (True, torch.bfloat16,
     torch.float16)],
)  # fmt: skip
def test_batches(colours, channels_last, dtype, expected):
    train, val = loaders(colours, channels_last=channels_last, dtype=dtype, val_batch_size=5)
    assert isinstance(train, DaliTrainLoader) and isinstance(val, DaliValLoader)
    for images, labels in [epoch(train, 0)[0], next(iter(val))]:
        assert images.shape[1:] == (3, 24, 24) and images.dtype == expected
        assert images.device.type == "cpu" and labels.dtype == torch.int64
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        assert images.is_contiguous(memory_format=fmt) and labels.shape == images.shape[:1]
    assert len(train) == 24 // 4 and len(val) == 3


def test_labels_match_the_images(colours):
    """Every image comes with its own label; val comes in file order."""
    classes = {i: i // TRAIN_PER_CLASS for i in range(CLASSES * TRAIN_PER_CLASS)}
    train, val = loaders(colours)
    seen = []
    for images, labels in epoch(train, 0):
        assert [classes[i] for i in ids(images)] == labels.tolist()
        seen += ids(images)
    assert sorted(seen) == list(range(24))  # world 1, 24 = 6 x 4: each image once
    images = torch.cat([b[0] for b in val])
    labels = torch.cat([b[1] for b in val])
    assert ids(images) == list(range(VAL_IMAGES))
    assert labels.tolist() == [0] * 5 + [1] * 4 + [2] * 4


def test_same_order_as_the_torch_backend(colours):
    """Two ranks: disjoint shards covering the epoch, step by step the torch backend's samples."""
    for e in (0, 1):
        per_rank = []
        for rank in (0, 1):
            dali_train, _ = loaders(colours, rank=rank, world=2, batch_size=3, seed=5)
            torch_train, _ = loaders(
                colours, rank=rank, world=2, batch_size=3, seed=5, backend="torch", workers=0
            )
            assert len(dali_train) == len(torch_train) == 4
            got = [ids(x) for x, _ in epoch(dali_train, e)]
            assert got == [ids(x) for x, _ in epoch(torch_train, e)]
            per_rank.append([i for batch in got for i in batch])
        assert not set(per_rank[0]) & set(per_rank[1])
        assert sorted(per_rank[0] + per_rank[1]) == list(range(24))


def test_val_counts_each_image_once_over_two_shards(colours):
    shards = []
    for rank in (0, 1):
        _, val = loaders(colours, rank=rank, world=2, val_batch_size=4)
        assert val.num_samples == VAL_IMAGES
        batches = list(val)
        assert len(batches) == len(val) == 2  # 6 and 7 images: the padding is cut off
        shards.append([i for x, _ in batches for i in ids(x)])
    assert [len(s) for s in shards] == [6, 7]
    assert sorted(shards[0] + shards[1]) == list(range(VAL_IMAGES))


def test_val_close_to_torchvision(textures):
    """DALI's resize + center crop + normalise against torchvision's, on the same files."""
    kw = dict(image_size=32, val_resize=40, val_batch_size=6)
    _, dali_val = loaders(textures, **kw)
    _, torch_val = loaders(textures, backend="torch", workers=0, **kw)
    a = torch.cat([b[0] for b in dali_val])
    b = torch.cat([b[0] for b in torch_val])
    assert torch.equal(torch.cat([b[1] for b in dali_val]), torch.cat([b[1] for b in torch_val]))
    assert (a - b).abs().mean() < 0.02  # normalised units: about 1 of 255 levels
    assert (a - b).abs().mean() < 0.1 * (a - a.roll(1, 0)).abs().mean()  # vs other images


def test_epochs_replay(textures):
    """Epoch e depends only on (seed, e, rank): again, or in a fresh loader (a resume)."""
    train, _ = loaders(textures, seed=3)
    first = epoch(train, 1)
    other = epoch(train, 0)
    again = epoch(train, 1)
    fresh = epoch(loaders(textures, seed=3)[0], 1)
    for a, b, c in zip(first, again, fresh, strict=True):
        assert torch.equal(a[0], b[0]) and torch.equal(a[0], c[0]) and torch.equal(a[1], c[1])
    assert not torch.equal(first[0][0], other[0][0])
    with pytest.raises(RuntimeError, match="set_epoch"):
        iter(train)
    train.set_epoch(1, start=2)  # a resumed epoch: the batches from 2 on, as in the whole one
    rest = list(train)
    assert len(rest) == len(first) - 2
    assert all(torch.equal(a[0], b[0]) for a, b in zip(rest, first[2:], strict=True))


@pytest.mark.parametrize(("world", "cap", "steps"), [(1, 0, 6), (1, 4, 4), (2, 0, 3), (2, 9, 3)])
def test_steps_per_epoch_match_the_torch_backend(colours, world, cap, steps):
    dali_train, _ = loaders(colours, world=world, steps_per_epoch=cap)
    torch_train, _ = loaders(colours, world=world, steps_per_epoch=cap, backend="torch")
    assert len(dali_train) == len(torch_train) == steps
    assert len(epoch(dali_train, 0)) == steps


def test_progressive_sizes(colours):
    progressive = ProgressiveConfig(start=16, end=32, from_epoch=1, to_epoch=3)
    train, val = loaders(colours, image_size=32, progressive=progressive)
    sizes = [epoch(train, e)[0][0].shape[-1] for e in range(5)]
    assert sizes == [16, 16, 32, 32, 32]  # epoch 2: 24 rounds to 32
    assert next(iter(val))[0].shape[-1] == 32


def test_progressive_without_augmentation_matches_the_torch_backend(textures):
    """augment=False: at each progressive size, val's resize (scaled with the size) and center
    crop, as the torch backend makes them."""
    progressive = ProgressiveConfig(start=16, end=32, from_epoch=0, to_epoch=1)
    kw = dict(augment=False, progressive=progressive, seed=2)
    dali_train, _ = loaders(textures, **kw)
    torch_train, _ = loaders(textures, backend="torch", workers=0, **kw)
    for e, size in [(0, 16), (1, 32)]:
        pairs = zip(epoch(dali_train, e), epoch(torch_train, e), strict=True)
        for (a, labels_a), (b, labels_b) in pairs:
            assert a.shape == b.shape == (4, 3, size, size) and torch.equal(labels_a, labels_b)
            assert (a - b).abs().mean() < 0.1 * (a - a.roll(1, 0)).abs().mean()


def test_unreadable_files_are_replaced_and_counted(colours, tmp_path):
    root = Path(shutil.copytree(colours, tmp_path / "broken"))
    cut = root / "train" / "c0" / "005.JPEG"
    cut.write_bytes(cut.read_bytes()[:200])  # truncated: DALI names it in its error
    (root / "train" / "c1" / "010.JPEG").write_text("not an image\n")  # DALI does not name it
    (root / "val" / "c2" / "012.JPEG").write_bytes(b"")
    classes = {i: i // TRAIN_PER_CLASS for i in range(24)}
    train, val = loaders(root, seed=1)
    first = epoch(train, 0)
    assert train.bad_files == 2 and len(first) == 6
    got = [i for x, y in first for i in ids(x)]
    for x, y in first:
        assert [classes[i] for i in ids(x)] == y.tolist()  # replacements bring their labels
    assert 5 not in got and 10 not in got and got.count(6) == 2 and got.count(11) == 2
    for again in (epoch(train, 0), epoch(loaders(root, seed=1)[0], 0)):
        assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again, strict=True))
    val_ids = [i for x, _ in val for i in ids(x)]
    assert val.bad_files == 1 and val_ids == list(range(12)) + [0]  # 12 wraps around to 0


@pytest.mark.gpu
def test_mixed_decoding_on_cuda(textures, tmp_path):
    """`mixed` decoding: batches on the GPU in float16 NHWC; val close to the CPU pipeline's;
    epochs replay; an unreadable file is replaced and counted there too."""
    cuda = Dist(0, 1, 0, torch.device("cuda", 0), None)
    root = Path(shutil.copytree(textures, tmp_path / "t"))
    (root / "train" / "00_hstripes" / "hstripes_00001.JPEG").write_text("not an image\n")
    cfg = DataConfig(
        backend="dali", root=str(root), batch_size=4, image_size=32, val_resize=40, workers=2
    )
    kw = dict(seed=0, num_classes=10, channels_last=True, dtype=torch.bfloat16)
    train, val = build_loaders(cfg, dist=cuda, **kw)
    first = epoch(train, 0)
    images, labels = first[0]
    assert images.device.type == labels.device.type == "cuda" and images.dtype == torch.float16
    assert images.is_contiguous(memory_format=torch.channels_last) and labels.dtype == torch.int64
    assert train.bad_files == 1 and len(first) == len(train) == 3
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, epoch(train, 0), strict=True))
    _, cpu_val = build_loaders(cfg, dist=fake(), **kw)
    a = torch.cat([b[0].float().cpu() for b in val])
    b = torch.cat([b[0].float() for b in cpu_val])
    assert (a - b).abs().mean() < 0.03  # nvJPEG and GPU resize vs libjpeg-turbo and CPU resize
