"""`python -m engine.data.prepare`: a resized copy of an ImageFolder dataset, resumable."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.data import prepare
from engine.data.images import ORIENTATION


def noise(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture
def src(tmp_path) -> Path:
    """train/{a,b} and val/{a,b} with large, small and odd files, one unreadable."""
    root = tmp_path / "src"
    for split in ("train", "val"):
        for k, cls in enumerate("ab"):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(3):
                noise(80, 60, seed=10 * k + i).save(folder / f"{i}.JPEG", quality=95)
    small = root / "train" / "a" / "small.JPEG"
    noise(24, 20, seed=99).save(small, quality=95)
    noise(70, 50, seed=7).convert("CMYK").save(root / "train" / "b" / "cmyk.JPEG")
    noise(70, 50, seed=8).save(root / "train" / "b" / "png.JPEG", format="PNG")
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    noise(60, 30, seed=9).save(root / "val" / "a" / "rotated.JPEG", exif=exif)
    (root / "val" / "b" / "broken.JPEG").write_bytes(b"not an image")
    (root / "labels.txt").write_text("not an image either, and not one by name\n")
    return root


def run(src: Path, dst: Path, capsys, *extra: str) -> tuple[str, str]:
    """Exit code 0; (stdout, stderr)."""
    assert prepare.main([str(src), str(dst), "--max-side", "32", "--quality", "90", *extra]) == 0
    return capsys.readouterr()


def images(root: Path) -> list[Path]:
    return sorted(p.relative_to(root) for p in root.rglob("*.JPEG"))


def test_layout_sizes_and_report(src, tmp_path, capsys):
    dst = tmp_path / "dst"
    out, err = run(src, dst, capsys, "--workers", "2")
    assert images(dst) == [p for p in images(src) if p.name != "broken.JPEG"]
    assert not (dst / "labels.txt").exists()
    for rel in images(dst):
        with Image.open(dst / rel) as im:
            assert im.format == "JPEG" and im.mode == "RGB" and max(im.size) <= 32
    small = Path("train/a/small.JPEG")
    assert (dst / small).read_bytes() == (src / small).read_bytes()  # small, plain: copied
    with Image.open(dst / "train/a/0.JPEG") as im:
        assert im.size == (32, 24)  # 80 x 60, longer side to 32
    with Image.open(dst / "val/a/rotated.JPEG") as im:
        assert im.size == (16, 32) and ORIENTATION not in im.getexif()  # turned upright
    src_bytes = sum((src / p).stat().st_size for p in images(dst))
    dst_bytes = sum((dst / p).stat().st_size for p in images(dst))
    assert "16 images" in out and "(15 resized, 1 copied, 0 already done, 1 unreadable)" in out
    assert f"{prepare._size(src_bytes - dst_bytes)} saved" in out
    assert err == f"prepare: 1 unreadable files left out: {src / 'val/b/broken.JPEG'}\n"


def test_resume(src, tmp_path, capsys):
    dst = tmp_path / "dst"
    run(src, dst, capsys)
    stamps = {p: (dst / p).stat().st_mtime_ns for p in images(dst)}
    redo = dst / "val/b/0.JPEG"
    redo.unlink()
    stale = dst / "val/b/.0.JPEG.1234.tmp"  # a kill during a write leaves this
    stale.write_bytes(b"half a file")
    out, _ = run(src, dst, capsys)
    assert "(1 resized, 0 copied, 15 already done, 1 unreadable)" in out
    assert not stale.exists() and redo.exists()
    for p, stamp in stamps.items():
        assert p == redo.relative_to(dst) or (dst / p).stat().st_mtime_ns == stamp


def test_a_rerun_with_other_settings_is_refused(src, tmp_path, capsys):
    """A rerun keeps the files already there, so it must not mix sizes: other settings into
    the same folder are a one-line error (exit 2) naming the ones that made it."""
    dst = tmp_path / "dst"
    run(src, dst, capsys)
    assert prepare.main([str(src), str(dst), "--max-side", "64"]) == 2
    err = capsys.readouterr().err
    assert "was made with --max-side 32 --quality 90" in err and err.count("\n") == 1
    run(src, dst, capsys)  # the same settings resume it


def test_interrupted_write_leaves_no_file(src, tmp_path, monkeypatch):
    def kill(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", kill)
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare(src, tmp_path / "dst", max_side=32)
    assert images(tmp_path / "dst") == []  # only a temporary file, which a rerun removes


def test_errors_are_one_line_and_exit_2(src, tmp_path, capsys):
    out = str(tmp_path / "out")
    cases = [
        ([str(tmp_path / "missing"), out], "source folder not found"),
        ([str(src), str(src / "inner")], "must lie outside"),
        ([str(src), out, "--max-side", "4"], "--max-side >= 8"),
    ]
    for args, message in cases:
        assert prepare.main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: prepare: ") and message in err and err.count("\n") == 1


def test_truncated_small_jpeg_is_left_out(src, tmp_path, capsys):
    """A small plain JPEG would be copied as it is: a truncated one is reported, not copied."""
    small = src / "train/a/small.JPEG"
    small.write_bytes(small.read_bytes()[:-100])
    out, err = run(src, tmp_path / "dst", capsys)
    assert "(15 resized, 0 copied, 0 already done, 2 unreadable)" in out
    assert not (tmp_path / "dst/train/a/small.JPEG").exists() and str(small) in err
