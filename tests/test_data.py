"""Input pipelines: the demo dataset, the torch (ImageFolder) backend and the synthetic one."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from engine.config import DataConfig
from engine.data import build_loaders, demo
from engine.data.folder import MEAN, STD
from engine.distributed import Dist
from engine.errors import UserError

CLASSES, TRAIN, VAL, SIZE = 4, 12, 3, 32


def fake(rank: int = 0, world: int = 1) -> Dist:
    return Dist(rank=rank, world_size=world, local_rank=0, device=torch.device("cpu"), backend=None)


def config(root: Path, **kw) -> DataConfig:
    base = dict(backend="torch", root=str(root), batch_size=4, image_size=24, workers=0)
    return DataConfig(**{**base, **kw})


def loaders(root: Path, *, rank=0, world=1, seed=0, num_classes=10, channels_last=False, **kw):
    cfg = config(root, **kw)
    dist = fake(rank, world)
    return build_loaders(
        cfg, dist=dist, seed=seed, num_classes=num_classes, channels_last=channels_last
    )


def epoch(train, e: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    train.set_epoch(e)
    return list(train)


def keys(batch) -> list[tuple[int, bytes]]:
    """One hashable key per sample: its label and image bytes."""
    images, labels = batch
    return [(int(y), x.contiguous().numpy().tobytes()) for x, y in zip(images, labels, strict=True)]


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data") / "demo"
    return demo.make_demo_dataset(
        root, classes=CLASSES, train_per_class=TRAIN, val_per_class=VAL, size=SIZE
    )


@pytest.fixture(scope="session")
def odd_root(demo_root, tmp_path_factory) -> Path:
    """The demo set plus one extra val image (a train image): 13 val images."""
    root = tmp_path_factory.mktemp("odd") / "demo"
    shutil.copytree(demo_root, root)
    src = next((root / "train").glob("01_*/*.JPEG"))
    shutil.copy(src, root / "val" / src.parent.name / "extra.JPEG")
    return root


@pytest.fixture
def copy(demo_root, tmp_path) -> Path:
    return Path(shutil.copytree(demo_root, tmp_path / "copy"))


# --------------------------------------------------------------------------------------------
# Demo dataset


def test_demo_layout_and_jpeg(demo_root):
    for split, per_class in (("train", TRAIN), ("val", VAL)):
        folders = sorted((demo_root / split).iterdir())
        assert [f.name for f in folders] == [f"{k:02d}_{demo.KINDS[k]}" for k in range(CLASSES)]
        for f in folders:
            files = sorted(f.iterdir())
            assert len(files) == per_class and all(p.suffix == ".JPEG" for p in files)
            with Image.open(files[0]) as im:
                assert im.format == "JPEG" and im.size == (SIZE, SIZE) and im.mode == "RGB"
    assert not list(demo_root.parent.glob(".*tmp*"))  # no temp folder left


def test_demo_is_deterministic(demo_root, tmp_path):
    kw = dict(classes=2, train_per_class=3, val_per_class=2, size=SIZE)
    again = demo.make_demo_dataset(tmp_path / "a", **kw)
    other = demo.make_demo_dataset(tmp_path / "b", seed=1, **kw)
    files = sorted(p.relative_to(again) for p in again.rglob("*.JPEG"))
    assert len(files) == 2 * 5
    for rel in files:  # a smaller set is a subset of the bigger one, byte for byte
        assert (again / rel).read_bytes() == (demo_root / rel).read_bytes()
        assert (other / rel).read_bytes() != (demo_root / rel).read_bytes()


def test_demo_is_atomic(tmp_path, monkeypatch):
    calls = []

    def failing(*args):
        calls.append(1)
        if len(calls) > 3:
            raise KeyboardInterrupt
        return real(*args)

    real = demo.draw_image
    monkeypatch.setattr(demo, "draw_image", failing)
    with pytest.raises(KeyboardInterrupt):
        demo.make_demo_dataset(tmp_path / "d", classes=2, train_per_class=5, size=SIZE)
    assert list(tmp_path.iterdir()) == []  # neither the dataset nor the temp folder
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").touch()
    with pytest.raises(UserError, match="not an empty folder"):
        demo.make_demo_dataset(tmp_path / "full")


def test_demo_cli(tmp_path, capsys):
    argv = [str(tmp_path / "cli"), "--classes", "2", "--train-per-class", "2"]
    assert demo.main([*argv, "--val-per-class", "1", "--size", "16"]) == 0
    assert len(list((tmp_path / "cli").rglob("*.JPEG"))) == 6
    assert demo.main(argv) == 2  # exists now
    assert "not an empty folder" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# torch backend


@pytest.mark.parametrize("channels_last", [False, True])
def test_torch_batches(demo_root, channels_last):
    train, val = loaders(demo_root, channels_last=channels_last, batch_size=5, val_batch_size=7)
    for images, labels in [next(iter(epoch(train, 0)))] + list(val)[:1]:
        assert images.shape[1:] == (3, 24, 24) and images.dtype == torch.float32
        assert labels.dtype == torch.int64 and images.device.type == "cpu"
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        assert images.is_contiguous(memory_format=fmt)
        lo = min((0 - m) / s for m, s in zip(MEAN, STD, strict=True))
        hi = max((1 - m) / s for m, s in zip(MEAN, STD, strict=True))
        assert lo - 1e-5 <= images.min() and images.max() <= hi + 1e-5
    assert next(iter(epoch(train, 0)))[0].shape[0] == 5
    assert [len(b[1]) for b in val] == [7, 5]  # 12 val images, last batch kept


def test_val_samples_and_labels(demo_root):
    """Val batches are the ImageFolder samples in order, with the reference transform."""
    _, val = loaders(demo_root, val_batch_size=5, image_size=24)
    images = torch.cat([b[0] for b in val])
    labels = torch.cat([b[1] for b in val])
    ref = T.Compose([T.Resize(27), T.CenterCrop(24), T.ToTensor(), T.Normalize(MEAN, STD)])
    expected, expected_labels = [], []
    for k, folder in enumerate(sorted((demo_root / "val").iterdir())):
        for f in sorted(folder.iterdir()):
            with Image.open(f) as im:
                expected.append(ref(im.convert("RGB")))
            expected_labels.append(k)
    assert labels.tolist() == expected_labels
    torch.testing.assert_close(images, torch.stack(expected), atol=1e-5, rtol=0)
    assert val.num_samples == CLASSES * VAL


@pytest.mark.parametrize(("cap", "steps"), [(0, 9), (3, 3), (100, 9)])
def test_len_is_steps(demo_root, cap, steps):
    train, _ = loaders(demo_root, batch_size=5, steps_per_epoch=cap)  # 48 images // 5 = 9
    assert len(train) == steps
    assert len(epoch(train, 0)) == steps
    train2, _ = loaders(demo_root, batch_size=5, steps_per_epoch=cap, rank=1, world=2)
    assert len(train2) == min(steps, 24 // 5)


@pytest.mark.parametrize("workers", [0, 2])
def test_same_epoch_same_batches(demo_root, workers):
    train, _ = loaders(demo_root, seed=3, workers=workers)
    rng = torch.get_rng_state()
    first = epoch(train, 1)
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's RNG stream is untouched
    other = epoch(train, 0)
    again = epoch(train, 1)
    fresh, _ = loaders(demo_root, seed=3, workers=workers)
    skipped = epoch(fresh, 1)
    for a, b, c in zip(first, again, skipped, strict=True):
        for x, y, z in zip(a, b, c, strict=True):
            assert torch.equal(x, y) and torch.equal(x, z)
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(first, other, strict=True))
    with pytest.raises(RuntimeError, match="set_epoch"):
        iter(train)  # each epoch needs its set_epoch


def test_augmentation_uses_the_epoch_seed(demo_root):
    """Same order (world 1, same sampler seed) but another epoch seed: other crops."""
    a = epoch(loaders(demo_root, seed=0)[0], 0)
    train_b, _ = loaders(demo_root, seed=0)
    train_b.seed = 1  # changes only the augmentation seed, not the sampler's
    b = epoch(train_b, 0)
    assert [x[1].tolist() for x in a] == [x[1].tolist() for x in b]
    assert not torch.equal(a[0][0], b[0][0])


def test_two_ranks_see_one_rank_batches(demo_root):
    """augment=False: 2 ranks x batch B == 1 rank x batch 2B, step by step, as sample sets."""
    one, _ = loaders(demo_root, seed=7, batch_size=6, augment=False)
    ranks = [
        loaders(demo_root, seed=7, batch_size=3, augment=False, rank=r, world=2)[0] for r in (0, 1)
    ]
    assert len(one) == len(ranks[0]) == len(ranks[1]) == 8
    for e in (0, 2):
        steps = zip(epoch(one, e), epoch(ranks[0], e), epoch(ranks[1], e), strict=True)
        for whole, r0, r1 in steps:
            assert sorted(keys(whole)) == sorted(keys(r0) + keys(r1))


def test_val_ranks_cover_every_image_once(odd_root):
    _, single = loaders(odd_root, val_batch_size=4)
    everything = [k for b in single for k in keys(b)]
    assert single.num_samples == len(everything) == CLASSES * VAL + 1 == 13
    assert len(set(everything)) == 13
    shards = []
    for r in (0, 1):
        _, val = loaders(odd_root, val_batch_size=4, rank=r, world=2)
        assert val.num_samples == 13
        shards.append([k for b in val for k in keys(b)])
    assert [len(s) for s in shards] == [7, 6]
    assert sorted(shards[0] + shards[1]) == sorted(everything)


def test_generate_demo_on_rank_0_only(tmp_path, monkeypatch):
    small = demo.make_demo_dataset
    monkeypatch.setattr(
        demo, "make_demo_dataset", lambda root: small(root, classes=2, train_per_class=4, size=16)
    )
    root = tmp_path / "gen"
    with pytest.raises(UserError, match="folder not found"):
        loaders(root, rank=1, world=2, generate_demo=True)  # rank 1 waits, never writes
    train, val = loaders(root, generate_demo=True, image_size=16)
    assert len(train) == 2 and val.num_samples == 2 * 50
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").touch()
    with pytest.raises(UserError, match="not empty"):
        loaders(tmp_path / "busy", generate_demo=True)


# --------------------------------------------------------------------------------------------
# Errors


def test_missing_split(copy):
    shutil.rmtree(copy / "val")
    with pytest.raises(UserError, match=r"'data.root': folder not found: .*val"):
        loaders(copy)


def test_empty_split(copy):
    for d in (copy / "train").iterdir():
        shutil.rmtree(d)
    with pytest.raises(UserError, match=r"'data.root': no class folders in .*train"):
        loaders(copy)


def test_class_mismatch(copy):
    (copy / "val" / "00_hstripes").rename(copy / "val" / "zz")
    with pytest.raises(
        UserError, match=r"differ \(missing in val: 00_hstripes; missing in train: zz"
    ):
        loaders(copy)


def test_class_without_images(copy):
    for f in (copy / "val" / "00_hstripes").iterdir():
        f.unlink()
    with pytest.raises(UserError, match="'data.root': .*00_hstripes"):
        loaders(copy)


def test_too_many_classes(demo_root):
    with pytest.raises(
        UserError, match="'model.num_classes': 4 classes in data but the model has 3"
    ):
        loaders(demo_root, num_classes=3)


def test_batch_larger_than_shard(demo_root):
    with pytest.raises(UserError, match="'data.batch_size'"):
        loaders(demo_root, batch_size=25, world=2)


def test_dali_not_available(demo_root):
    with pytest.raises(UserError, match="dali backend is not available yet"):
        loaders(demo_root, backend="dali")


# --------------------------------------------------------------------------------------------
# synthetic backend


@pytest.mark.parametrize("channels_last", [False, True])
def test_synthetic(channels_last):
    cfg = DataConfig(backend="synthetic", batch_size=3, image_size=16, steps_per_epoch=4)
    train, val = build_loaders(cfg, dist=fake(), seed=0, num_classes=5, channels_last=channels_last)
    assert val is None and len(train) == 4
    batches = epoch(train, 0)
    assert len(batches) == 4
    images, labels = batches[0]
    assert images.shape == (3, 3, 16, 16) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and labels.min() >= 0 and labels.max() < 5
    assert images.device == torch.device("cpu") == labels.device
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert images.is_contiguous(memory_format=fmt)
    assert all(b[0] is images and b[1] is labels for b in batches + epoch(train, 1))
    other, _ = build_loaders(cfg, dist=fake(1, 2), seed=0, num_classes=5, channels_last=False)
    assert not torch.equal(next(iter(epoch(other, 0)))[0], images)  # seeded by seed + rank
    with pytest.raises(UserError, match="steps_per_epoch"):
        build_loaders(
            DataConfig(backend="synthetic"), dist=fake(), seed=0, num_classes=5, channels_last=False
        )
