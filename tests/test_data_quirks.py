"""ImageNet's odd files (grayscale, CMYK, a PNG named .JPEG, progressive, EXIF-rotated JPEGs)
come out as upright 3-channel RGB from every backend and decode mode, looking like the same
picture stored as a plain RGB JPEG."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine.config import DataConfig
from engine.data import build_loaders
from engine.data.images import ORIENTATION, load_rgb
from engine.distributed import Dist

W, H = 56, 40


def picture() -> Image.Image:
    """Smooth gradients (little JPEG loss) with a red block top left (any rotation shows)."""
    y, x = np.mgrid[0:H, 0:W]
    rgb = np.stack([x * 4, y * 5, 255 - x * 3], axis=-1).astype(np.uint8)
    rgb[:12, :16] = (230, 20, 20)
    return Image.fromarray(rgb)


def write_quirks(folder: Path) -> dict[str, Image.Image]:
    """Write each odd kind of file; return what each should decode to."""
    folder.mkdir(parents=True)
    im = picture()
    gray = im.convert("L")
    gray.save(folder / "gray.JPEG", quality=95)
    im.convert("CMYK").save(folder / "cmyk.JPEG", quality=95)
    im.save(folder / "png.JPEG", format="PNG")
    im.save(folder / "progressive.JPEG", quality=95, progressive=True)
    exif = Image.Exif()
    exif[ORIENTATION] = 6  # stored turned a quarter left: viewers turn it back right
    im.transpose(Image.Transpose.ROTATE_90).save(folder / "rotated.JPEG", exif=exif, quality=95)
    expected = {"gray": gray.convert("RGB"), "cmyk": im, "png": im, "progressive": im}
    return {**expected, "rotated": im}


@pytest.fixture(scope="module")
def quirks(tmp_path_factory) -> Path:
    """{train,val}/quirks/<kind>.JPEG and {train,val}/plain/<kind>.JPEG, the plain RGB JPEG of
    what each kind should decode to."""
    root = tmp_path_factory.mktemp("quirks")
    for split in ("train", "val"):
        expected = write_quirks(root / split / "quirks")
        (root / split / "plain").mkdir()
        for kind, image in expected.items():
            image.save(root / split / "plain" / f"{kind}.JPEG", quality=95)
    return root


def test_files_are_what_they_claim(quirks):
    folder = quirks / "val" / "quirks"
    modes = {}
    for f in sorted(folder.iterdir()):
        with Image.open(f) as im:
            modes[f.stem] = (im.format, im.mode, im.size, im.info.get("progressive", 0))
        out = load_rgb(f)
        assert out.mode == "RGB" and out.size == (W, H)
    assert modes == {
        "cmyk": ("JPEG", "CMYK", (W, H), 0),
        "gray": ("JPEG", "L", (W, H), 0),
        "png": ("PNG", "RGB", (W, H), 0),
        "progressive": ("JPEG", "RGB", (W, H), 1),
        "rotated": ("JPEG", "RGB", (H, W), 0),
    }


BACKENDS = [("torch", "cpu"), ("torch", "gpu"), ("dali", "auto")]  # gpu: the same code on CPU


@pytest.mark.parametrize(("backend", "decode"), BACKENDS)
def test_quirky_files_decode_like_plain_ones(quirks, backend, decode):
    if backend == "dali":
        pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed")
    cfg = DataConfig(
        backend=backend,
        root=str(quirks),
        decode=decode,
        batch_size=5,
        val_batch_size=10,
        image_size=32,
        val_resize=32,
        workers=1,
    )
    dist = Dist(0, 1, 0, torch.device("cpu"), None)
    train, val = build_loaders(cfg, dist=dist, seed=0, num_classes=2, channels_last=False)
    (images, labels), *_ = list(val)
    assert images.shape == (10, 3, 32, 32) and labels.tolist() == [0] * 5 + [1] * 5
    plain, odd = images[:5], images[5:]  # both sorted by kind: cmyk gray png progressive rotated
    diff = (plain - odd).abs().mean(dim=(1, 2, 3))
    assert (diff < 0.06).all(), diff  # a wrong turn or inverted CMYK gives about 1
    train.set_epoch(0)
    assert all(x.shape == (5, 3, 32, 32) for x, _ in train)
    assert train.bad_files == val.bad_files == 0
