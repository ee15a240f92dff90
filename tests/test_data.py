"""Input pipelines: the demo dataset, the torch (ImageFolder) backend and the synthetic one."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.io import ImageReadMode, decode_image, read_file
from torchvision.transforms import v2

import engine.data
from engine import config as recipe
from engine.config import DataConfig, ProgressiveConfig
from engine.data import build_loaders, demo, train_image_size
from engine.data.decode import RATIO, CropParams, Encoded, read_encoded
from engine.data.folder import MEAN, STD, FolderTrainLoader, FolderValLoader, Images
from engine.distributed import Dist
from engine.errors import UserError

CLASSES, TRAIN, VAL, SIZE = 4, 12, 3, 32

# One uint8 level after normalisation: the workers resize uint8 natively, as torchvision 0.29's
# v2.Resize does (equal there); 0.19's (torch 2.4) rounds a float resize, a level apart at most.
UINT8_LEVEL = 1 / 255 / min(STD) + 1e-5


def fake(rank: int = 0, world: int = 1) -> Dist:
    return Dist(rank=rank, world_size=world, local_rank=0, device=torch.device("cpu"), backend=None)


def config(root: Path, **kw) -> DataConfig:
    base = dict(backend="torch", root=str(root), batch_size=4, image_size=24, workers=0)
    return DataConfig(**{**base, **kw})


def loaders(
    root: Path, *, rank=0, world=1, seed=0, num_classes=10, channels_last=False, dtype=None, **kw
):
    cfg = config(root, **kw)
    dist = fake(rank, world)
    return build_loaders(
        cfg,
        dist=dist,
        seed=seed,
        num_classes=num_classes,
        channels_last=channels_last,
        dtype=dtype,
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


@pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")  # torchvision.io
def test_val_samples_and_labels(demo_root):
    """Val batches are the ImageFolder samples in order, with the reference transform:
    torchvision's decoder and its antialiased resize of uint8 tensors, then the center crop."""
    _, val = loaders(demo_root, val_batch_size=5, image_size=24)
    images = torch.cat([b[0] for b in val])
    labels = torch.cat([b[1] for b in val])
    resize = v2.Compose([v2.Resize(27, antialias=True), v2.CenterCrop(24)])
    expected, expected_labels = [], []
    for k, folder in enumerate(sorted((demo_root / "val").iterdir())):
        for f in sorted(folder.iterdir()):
            pixels = resize(decode_image(read_file(str(f)), mode=ImageReadMode.RGB)).float() / 255
            expected.append(v2.functional.normalize(pixels, MEAN, STD))
            expected_labels.append(k)
    assert labels.tolist() == expected_labels
    torch.testing.assert_close(images, torch.stack(expected), atol=UINT8_LEVEL, rtol=0)
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


def same(a: list, b: list) -> bool:
    """Whether two lists of (images, labels) batches are equal, tensor for tensor."""
    return len(a) == len(b) and all(
        torch.equal(x, y) for p, q in zip(a, b, strict=True) for x, y in zip(p, q, strict=True)
    )


@pytest.mark.parametrize("decode", ["cpu", "gpu"])
def test_an_epoch_resumed_at_a_batch_reads_only_the_rest(demo_root, monkeypatch, decode):
    """set_epoch(e, start=k) yields the whole epoch's batches from k on and reads only their
    files; the number of workers changes no batch."""
    whole = epoch(loaders(demo_root, seed=2, decode=decode)[0], 1)
    train, _ = loaders(demo_root, seed=2, decode=decode)
    reads = []
    real = Images.item
    monkeypatch.setattr(Images, "item", lambda self, i, *a: reads.append(i) or real(self, i, *a))
    train.set_epoch(1, start=3)
    rest = list(train)
    assert same(rest, whole[3:]) and len(reads) == 4 * len(rest)
    monkeypatch.undo()
    assert same(epoch(loaders(demo_root, seed=2, decode=decode, workers=2)[0], 1), whole)


def test_a_samples_crop_is_the_same_on_any_rank(demo_root):
    """Augmentation depends on (seed, epoch, sample) alone: 2 ranks x batch B give the samples
    of 1 rank x batch 2B, step by step, crops included."""
    one, _ = loaders(demo_root, seed=5, batch_size=6)
    ranks = [loaders(demo_root, seed=5, batch_size=3, rank=r, world=2)[0] for r in (0, 1)]
    for whole, a, b in zip(epoch(one, 1), epoch(ranks[0], 1), epoch(ranks[1], 1), strict=True):
        assert sorted(keys(whole)) == sorted(keys(a) + keys(b))


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


def test_generate_demo_refuses_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="'data.root': .*file is a file, not a folder"):
        loaders(tmp_path / "file", generate_demo=True)


def test_crop_draws_match_torchvision():
    """CropParams draws from its own generator the numbers T.RandomResizedCrop and
    T.RandomHorizontalFlip draw from the global RNG, in the same order (fallbacks included),
    and leaves the global RNG alone."""
    rng = torch.get_rng_state()
    for seed in range(40):
        for h, w in [(375, 500), (500, 375), (32, 32), (20, 400), (400, 20)]:
            crop = CropParams(train=True, size=16, resize=18, min_scale=0.08 if seed % 2 else 0.9)
            torch.manual_seed(seed)
            box = T.RandomResizedCrop.get_params(torch.empty(0, h, w), (crop.min_scale, 1), RATIO)
            flip = bool(torch.rand(1) < 0.5)
            state = torch.get_rng_state()
            _, plan, got_flip = crop(
                Encoded(torch.empty(0), h, w), torch.Generator().manual_seed(seed)
            )
            assert plan[:4].tolist() == list(box) and got_flip == flip
            assert torch.equal(torch.get_rng_state(), state)
    torch.set_rng_state(rng)


@pytest.mark.parametrize("workers", [0, 2])
def test_gpu_decode_path_matches_the_cpu_path(demo_root, workers):
    """decode=gpu, run on the CPU here: the same samples, crops and flips as decode=cpu, up to
    the resize arithmetic (float here, PIL's uint8 there) and the JPEG decoder."""
    kw = dict(seed=4, workers=workers, channels_last=True, val_batch_size=5)
    cpu_train, cpu_val = loaders(demo_root, decode="cpu", **kw)
    gpu_train, gpu_val = loaders(demo_root, decode="gpu", **kw)
    assert gpu_train.dataset.on_device and not cpu_train.dataset.on_device
    pairs = list(zip(epoch(cpu_train, 1), epoch(gpu_train, 1), strict=True))
    pairs += list(zip(cpu_val, gpu_val, strict=True))
    for (a, labels_a), (b, labels_b) in pairs:
        assert torch.equal(labels_a, labels_b) and b.dtype == torch.float32
        assert b.is_contiguous(memory_format=torch.channels_last)
        assert (a - b).abs().mean() < 0.03  # vs about 1 between different images
        assert (a - b).abs().mean() < 0.05 * (a - a.flip(0)).abs().mean()


def test_device_decoding_batches_cross_as_one_buffer():
    """decode=gpu workers pack a batch's JPEG bytes and pixels into one uint8 buffer (one
    shared-memory segment per batch); unpack cuts out each item's data unchanged."""
    from engine.data.decode import collate, unpack

    jpeg = torch.arange(7, dtype=torch.uint8)
    pixels = torch.arange(2 * 5 * 3, dtype=torch.uint8).view(2, 5, 3).permute(2, 0, 1)  # CHW view
    plan = torch.arange(8)
    items = [(jpeg, plan, False, 1, -1, 10), (pixels, plan, True, 2, 4, 11)]
    items.append((jpeg, plan, False, 3, -1, 12))
    buffer, spans, plans, flips, labels, bad, index = collate(items)
    assert buffer.dim() == 1 and buffer.numel() == 7 + 30 + 7
    assert spans.tolist() == [[7, 0, 0], [30, 2, 5], [7, 0, 0]]
    got = unpack(buffer, spans)
    assert [x.shape for x in got] == [(7,), (3, 2, 5), (7,)]
    assert all(
        torch.equal(a, b) and a.is_contiguous()
        for a, b in zip(got, [jpeg, pixels, jpeg], strict=True)
    )
    assert all(x.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr() for x in got)
    assert plans.shape == (3, 8) and flips.tolist() == [False, True, False]
    assert labels.tolist() == [1, 2, 3] and bad.tolist() == [-1, 4, -1]
    assert index.tolist() == [10, 11, 12]


@pytest.mark.parametrize("workers", [0, 2])
def test_gpu_decode_in_a_thread_gives_the_same_batches(demo_root, workers):
    """decode=gpu prepares batches in a producer thread: the same batches, in the same order, as
    prepared in the main thread."""
    kw = dict(decode="gpu", seed=3, workers=workers, val_batch_size=5)
    threaded, threaded_val = loaders(demo_root, **kw)
    inline, inline_val = loaders(demo_root, **kw)
    assert threaded.prepare_in_thread and threaded_val.prepare_in_thread
    inline.prepare_in_thread = inline_val.prepare_in_thread = False
    got = epoch(threaded, 2) + list(threaded_val)
    want = epoch(inline, 2) + list(inline_val)
    assert [keys(b) for b in got] == [keys(b) for b in want]


def _prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("prefetch")]


# How torchvision's errors begin: the C++ function and file, both naming cuda for nvJPEG's.
WHERE = "decode_jpegs_cuda, /__w/vision/torchvision/csrc/io/image/cuda/decode_jpegs_cuda.cpp:76, "


def _fake_nvjpeg(bad: Callable[[list[torch.Tensor]], str], calls: list[int]) -> Callable:
    """A decode_jpeg that raises as torchvision does when `bad(batch)` gives a message, and
    appends the size of each batch it gets to `calls`."""

    def decode_jpeg(data, mode, device):
        batch = data if isinstance(data, list) else [data]
        calls.append(len(batch))
        if message := bad(batch):
            raise RuntimeError(f"{WHERE}Error while decoding JPEG images: {message}")
        out = [torch.zeros(3, 2, 2, dtype=torch.uint8) for _ in batch]
        return out if isinstance(data, list) else out[0]

    return decode_jpeg


def test_device_decode_finds_the_bad_image_but_raises_device_errors(monkeypatch):
    """A batch nvJPEG fails is decoded image by image to find the bad one; device errors (out of
    memory, CUDA) and failures that no single image explains are raised, not hidden by
    re-reading the whole batch on the CPU."""
    ok, bad = torch.ones(4, dtype=torch.uint8), torch.zeros(4, dtype=torch.uint8)
    calls: list[int] = []

    def decode_with(images: list[torch.Tensor], fails: Callable) -> list:
        calls.clear()
        monkeypatch.setattr(engine.data.decode, "decode_jpeg", _fake_nvjpeg(fails, calls))
        monkeypatch.setattr(engine.data.decode, "BATCHED_DECODE", True)  # as torchvision >= 0.20
        return engine.data.decode.decode_on_device(images, torch.device("cpu"))

    def broken(batch: list[torch.Tensor]) -> str:
        return "Failed to decode jpeg stream: 7" if any(x[0] == 0 for x in batch) else ""

    assert [x is None for x in decode_with([ok, bad, ok], broken)] == [False, True, False]
    assert calls == [3, 1, 1, 1] and decode_with([bad], broken) == [None]
    with pytest.raises(RuntimeError, match="jpeg stream: 7"):
        decode_with([bad, bad], broken)  # none decodes alone: not one bad image
    with pytest.raises(RuntimeError, match="decode batch: 6"):
        decode_with([ok, ok], lambda batch: "Failed to decode batch: 6" if len(batch) > 1 else "")
    assert calls == [2, 1, 1]  # each decodes alone: not a bad image either
    for error in (
        "CUDA out of memory. Tried to allocate",
        "Failed to synchronize CUDA stream: 700",
        "CUDA error: an illegal memory access was encountered",
    ):
        with pytest.raises(RuntimeError, match=error):
            decode_with([ok, bad], lambda batch, error=error: error)
        assert calls == [2]  # not retried image by image


def test_refused_images_get_the_epochs_crops(demo_root, monkeypatch, capsys):
    """An image nvJPEG refuses is re-read on the CPU (said once) with its crop drawn from the
    epoch's seed and its index: the same epoch replays, another epoch crops it anew."""
    monkeypatch.setattr(
        engine.data.decode, "decode_on_device", lambda images, device: [None] * len(images)
    )
    engine.data.say_once.cache_clear()
    train, _ = loaders(demo_root, decode="gpu", seed=1)

    def by_index(e: int) -> dict[int, torch.Tensor]:
        images = torch.cat([x for x, _ in epoch(train, e)])
        return dict(zip(train.sampler, images, strict=True))

    first, again, other = by_index(1), by_index(1), by_index(2)
    assert len(first) == CLASSES * TRAIN
    assert all(torch.equal(first[i], again[i]) for i in first)
    assert not any(torch.equal(first[i], other[i]) for i in first)
    assert capsys.readouterr().err.count("re-read on the CPU") == 1


def test_prefetch_thread_prepares_ahead_in_order():
    """Batch i+1 is prepared, in another thread, while the consumer still holds batch i."""
    from engine.data import prefetch

    prepared = {i: threading.Event() for i in range(6)}
    threads = set()

    def prepare(i: int):
        threads.add(threading.get_ident())
        prepared[i].set()
        return torch.tensor([i]), torch.tensor([10 * i])

    got = []
    batches = prefetch.to_device(range(6), prepare, torch.device("cpu"), in_thread=True)
    for images, labels in batches:
        i = int(images)
        if i < 5:
            assert prepared[i + 1].wait(timeout=10)  # nobody asked for it yet
        got.append((i, int(labels)))
    assert got == [(i, 10 * i) for i in range(6)]
    assert threads and threading.get_ident() not in threads
    assert not _prefetch_threads()


def test_prefetch_thread_raises_the_producers_error():
    from engine.data import prefetch

    def prepare(i: int):
        if i == 3:
            raise UserError("recipe key 'data.root': broken")
        return torch.tensor([i]), torch.tensor([i])

    got = []
    with pytest.raises(UserError, match="broken"):
        for images, _ in prefetch.to_device(range(8), prepare, torch.device("cpu"), in_thread=True):
            got.append(int(images))
    assert got == [0, 1, 2]
    assert not _prefetch_threads()


def test_prefetch_thread_stops_with_its_consumer():
    """A consumer that stops early (a preempted epoch) leaves no thread behind and reads no
    more than AHEAD + 2 host batches."""
    from engine.data import prefetch

    fetched = []

    def hosts():
        for i in range(100):
            fetched.append(i)
            yield i

    def prepare(i: int):
        return torch.tensor([i]), torch.tensor([i])

    batches = prefetch.to_device(hosts(), prepare, torch.device("cpu"), in_thread=True)
    assert int(next(batches)[0]) == 0
    batches.close()
    assert not _prefetch_threads()
    assert len(fetched) <= prefetch.AHEAD + 2


@pytest.mark.parametrize("decode", ["cpu", "gpu"])
def test_output_dtype(demo_root, decode):
    train, val = loaders(demo_root, decode=decode, dtype=torch.bfloat16, channels_last=True)
    for images, _ in [epoch(train, 0)[0], next(iter(val))]:
        assert images.dtype == torch.bfloat16
        assert images.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("decode", ["cpu", "gpu"])
def test_unreadable_files_are_replaced_and_counted(copy, decode, capsys):
    files = sorted((copy / "train").rglob("*.JPEG"))
    data = files[5].read_bytes()
    files[5].write_bytes(data[: len(data) // 2])  # truncated
    files[20].write_text("not an image\n")
    sos = data.find(b"\xff\xda") + 2  # a broken scan header, intact end: nvJPEG must refuse it
    files[30].write_bytes(data[:sos] + b"\x00\x01\x02" + data[sos + 3 :])
    sorted((copy / "val").rglob("*.JPEG"))[4].write_bytes(b"")
    train, val = loaders(copy, decode=decode, seed=2, workers=2)
    first = epoch(train, 0)
    assert len(first) == len(train) == 12 and all(len(y) == 4 for _, y in first)
    assert train.bad_files == 3
    again = epoch(train, 0)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again, strict=True))
    assert sum(len(y) for _, y in val) == val.num_samples == 12 and val.bad_files == 1
    err = capsys.readouterr().err
    assert all(f"unreadable file replaced by the next one: {files[i]}" in err for i in (5, 20, 30))


def test_auto_decode_prefers_enough_cpu_workers(monkeypatch):
    """`decode: auto` sends decoding to the GPU only on CUDA with few workers (measured: from
    about 9 workers on, PIL workers feed an H200 faster than the main process's nvJPEG)."""
    from engine.data import folder

    monkeypatch.setattr(folder.decode, "nvjpeg_works", lambda device: True)
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert not folder.device_decoding("auto", cuda, folder.AUTO_GPU_DECODE_BELOW_WORKERS)
    assert folder.device_decoding("auto", cuda, folder.AUTO_GPU_DECODE_BELOW_WORKERS - 1)
    assert folder.device_decoding("gpu", cuda, 16) and not folder.device_decoding("auto", cpu, 0)
    assert not folder.device_decoding("cpu", cuda, 0)


def test_train_image_size():
    cfg = DataConfig(image_size=224)
    assert train_image_size(cfg, 7) == 224  # off
    cfg.progressive = ProgressiveConfig(start=160, end=192, from_epoch=0, to_epoch=13)
    sizes = [train_image_size(cfg, e) for e in range(16)]
    assert sizes == [160] * 7 + [192] * 9  # 174.8 -> 160, 177.2 -> 192 (nearest multiple of 32)
    assert train_image_size(cfg, 100_000 + 0) == 160  # stage 1, epoch 0
    cfg.progressive = ProgressiveConfig(start=128, end=0, from_epoch=2, to_epoch=6)
    assert [train_image_size(cfg, e) for e in range(8)] == [128, 128, 128, 160, 192, 192, 224, 224]


@pytest.mark.parametrize("decode", ["cpu", "gpu"])
def test_progressive_resizing(demo_root, decode):
    progressive = ProgressiveConfig(start=16, end=32, from_epoch=1, to_epoch=3)
    train, val = loaders(demo_root, decode=decode, image_size=32, progressive=progressive)
    sizes = [epoch(train, e)[0][0].shape[-1] for e in range(5)]
    assert sizes == [16, 16, 32, 32, 32]
    assert next(iter(val))[0].shape[-1] == 32  # val keeps image_size


@pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")  # torchvision.io
@pytest.mark.parametrize("decode", ["cpu", "gpu"])
def test_progressive_without_augmentation_is_resize_and_center_crop(demo_root, decode):
    """augment=False frames train images as val does at every progressive size: the shorter
    side resized to size * val_resize / image_size (27 / 24 here), then the center crop."""
    progressive = ProgressiveConfig(start=16, end=32, from_epoch=0, to_epoch=1)
    train, _ = loaders(demo_root, decode=decode, augment=False, progressive=progressive)
    for e, size, resize in [(0, 16, 18), (1, 32, 36)]:
        images, labels = epoch(train, e)[0]
        assert images.shape == (4, 3, size, size)
        transform = v2.Compose([v2.Resize(resize, antialias=True), v2.CenterCrop(size)])
        expected = []
        for i in list(train.sampler)[:4]:
            path, label = train.dataset.samples[i]
            pixels = (
                transform(decode_image(read_file(str(path)), mode=ImageReadMode.RGB)).float() / 255
            )
            expected.append(v2.functional.normalize(pixels, MEAN, STD))
            assert labels[len(expected) - 1] == label
        atol = UINT8_LEVEL if decode == "cpu" else 0.05  # gpu: the resize in float, not uint8
        torch.testing.assert_close(images, torch.stack(expected), atol=atol, rtol=0)


def test_progressive_recipe_keys(demo_root):
    raw = {
        "data": {
            "root": str(demo_root),
            "progressive": {"start": 160, "end": 192, "from_epoch": 0, "to_epoch": 13},
        },
        "stages": [{"train": {}}],
    }
    assert recipe.from_raw(raw).data.progressive == ProgressiveConfig(160, 192, 0, 13)
    raw["data"]["progressive"]["ends"] = 1
    with pytest.raises(UserError, match="'data.progressive.ends' \\(did you mean 'end'"):
        recipe.from_raw(raw)


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


def test_dali_missing_falls_back_to_torch(demo_root, monkeypatch, capsys):
    monkeypatch.setattr(engine.data, "dali_installed", lambda: False)
    engine.data.say_once.cache_clear()
    for _ in range(2):
        train, val = loaders(demo_root, backend="dali")
        assert isinstance(train, FolderTrainLoader) and isinstance(val, FolderValLoader)
    err = capsys.readouterr().err
    assert err.count("DALI is not installed") == 1  # said once
    assert "using the torch backend with CPU JPEG decoding" in err


def test_impossible_sizes(demo_root):
    bad = ProgressiveConfig(start=16, end=24, from_epoch=3, to_epoch=2)
    with pytest.raises(UserError, match="'data.progressive.to_epoch': 2 is before from_epoch"):
        loaders(demo_root, progressive=bad)
    with pytest.raises(UserError, match="'data.val_resize': 20 is below data.image_size"):
        loaders(demo_root, val_resize=20)


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
    train.set_epoch(2, start=3)
    assert len(list(train)) == 1  # a resumed epoch: its remaining steps
    other, _ = build_loaders(cfg, dist=fake(1, 2), seed=0, num_classes=5, channels_last=False)
    assert not torch.equal(next(iter(epoch(other, 0)))[0], images)  # seeded by seed + rank
    with pytest.raises(UserError, match="steps_per_epoch"):
        build_loaders(
            DataConfig(backend="synthetic"), dist=fake(), seed=0, num_classes=5, channels_last=False
        )


def test_synthetic_dtype():
    """Synthetic images come in the autocast dtype, like every backend's."""
    cfg = DataConfig(backend="synthetic", batch_size=3, image_size=16, steps_per_epoch=1)
    kw = dict(dist=fake(), seed=0, num_classes=5, channels_last=True)
    ((images, _),) = epoch(build_loaders(cfg, **kw)[0], 0)
    ((half, _),) = epoch(build_loaders(cfg, dtype=torch.bfloat16, **kw)[0], 0)
    assert half.dtype == torch.bfloat16 and half.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(half, images.to(torch.bfloat16))


# --------------------------------------------------------------------------------------------
# CUDA (pytest -m gpu)


class _Pixels:
    """A dataset `read` that returns given decoded images by path (a class: workers pickle it)."""

    def __init__(self, images: dict[str, Encoded]) -> None:
        self.images = images

    def __call__(self, path: str) -> Encoded:
        return self.images[path]


def _nvjpeg_pixels(paths: list[str], device: torch.device) -> _Pixels:
    """Each file as decode=gpu sees it: nvJPEG's pixels (PIL's for files nvJPEG cannot take)."""
    from torchvision.io import decode_jpeg

    images = {}
    for path in paths:
        enc = read_encoded(path)
        if enc.data.dim() == 1:  # JPEG bytes
            pixels = decode_jpeg(enc.data, mode=ImageReadMode.RGB, device=device).cpu()
            enc = Encoded(pixels, enc.height, enc.width)
        images[path] = enc
    return _Pixels(images)


@pytest.mark.gpu
@pytest.mark.parametrize("decode", ["cpu", "gpu"])
def test_cuda_batches_match_the_cpu_device(demo_root, decode):
    """On CUDA, prefetched on a side stream (and decoded by nvJPEG for decode=gpu): the CPU
    device's batches from the same pixels, up to the resize arithmetic and bf16. nvJPEG's own
    pixels differ from PIL's (on the demo's small images, about 0.1 of 1 between images): for
    decode=gpu the reference reads nvJPEG's pixels, and PIL's are compared loosely."""
    device = torch.device("cuda", 0)
    cuda = Dist(0, 1, 0, device, None)
    kw = dict(seed=4, num_classes=10, channels_last=True)
    cfg = config(demo_root, decode=decode, workers=2, val_batch_size=5)
    train, val = build_loaders(cfg, dist=cuda, dtype=torch.bfloat16, **kw)
    assert train.dataset.on_device == (decode == "gpu")
    got = epoch(train, 1) + list(val)

    def reference(pixels: _Pixels | None) -> list:
        ref_cfg = config(demo_root, decode="cpu", workers=2, val_batch_size=5)
        ref_train, ref_val = build_loaders(ref_cfg, dist=fake(), **kw)
        if pixels is not None:
            ref_train.dataset.read = ref_val.dataset.read = pixels
        return epoch(ref_train, 1) + list(ref_val)

    same_pixels, pil = reference(None), None
    if decode == "gpu":
        paths = [p for p, _ in train.dataset.samples + val.dataset.samples]
        pil, same_pixels = same_pixels, reference(_nvjpeg_pixels(paths, device))
    assert len(got) == len(same_pixels)
    for i, (b, labels_b) in enumerate(got):
        a, labels_a = same_pixels[i]
        assert b.device.type == labels_b.device.type == "cuda" and b.dtype == torch.bfloat16
        assert b.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(labels_a, labels_b.cpu())
        b = b.float().cpu()
        assert (a - b).abs().mean() < 0.04  # bf16 rounding adds about 0.01
        if pil is not None:
            between_images = (pil[i][0] - pil[i][0].flip(0)).abs().mean()
            assert (pil[i][0] - b).abs().mean() < 0.25 * between_images


@pytest.mark.gpu
@pytest.mark.parametrize("in_thread", [False, True])
def test_prefetch_hands_batches_over_safely(in_thread):
    """The step may read a prefetched batch long after the side stream moved on: it must see
    the batch's own values (wait_event), and the memory must not be reused early
    (record_stream) while the consumer has dropped its reference. The same from the producer
    thread, which sets its own CUDA device and stream."""
    from engine.data import prefetch

    device = torch.device("cuda", 0)
    hosts = [torch.full((1 << 20,), float(i)).pin_memory() for i in range(12)]

    def prepare(host):
        x = host.to(device, non_blocking=True) * 2
        return x, x[:1]

    results = []
    for x, _ in prefetch.to_device(hosts, prepare, device, in_thread=in_thread):
        torch.cuda._sleep(5_000_000)  # the default stream lags far behind the side stream
        results.append((x * 3).sum())  # queued after the sleep; x itself is dropped now
    torch.cuda.synchronize()
    assert [r.item() for r in results] == [6.0 * i * (1 << 20) for i in range(12)]
