"""The embedded demo dataset: procedurally drawn shapes and textures, written as JPEG files in
ImageNet's ImageFolder layout (`root/{train,val}/<class>/*.JPEG`).

Each image has its own RNG seeded from (seed, split, class, index), so a dataset is
deterministic for a seed, and a smaller `classes` gives a subset of a larger one. `difficulty`
(0 = clean, 1 = hard) scales background noise, clutter, occluding strokes, object size and
contrast: the default is learnable by a small CNN in a few epochs but not trivially perfect.

CLI: `python -m engine.data.demo DST [--classes N] [--train-per-class N] ...`
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from engine.errors import UserError

SHAPES = ("circle", "square", "triangle", "cross", "ring", "star")
TEXTURES = ("hstripes", "vstripes", "checkerboard", "diagonal")
KINDS = TEXTURES + SHAPES  # class k is KINDS[k], in folder f"{k:02d}_{KINDS[k]}"; textures first:
# a subset of a few classes (as tests use) is then the quickest to learn


def make_demo_dataset(
    root: Path,
    *,
    classes: int = 10,
    train_per_class: int = 260,
    val_per_class: int = 50,
    size: int = 64,
    seed: int = 0,
    difficulty: float = 0.5,
) -> Path:
    """Write the demo dataset at `root` (absent or empty) atomically and return `root`."""
    root = Path(root)
    if not 2 <= classes <= len(KINDS):
        raise UserError(f"demo dataset: classes must be in 2..{len(KINDS)}, got {classes}")
    if min(train_per_class, val_per_class) < 1 or size < 16 or not 0 <= difficulty <= 1:
        raise UserError("demo dataset: need >= 1 image per class, size >= 16, difficulty in [0, 1]")
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise UserError(f"demo dataset: {root} exists and is not an empty folder")
    # Written into a hidden sibling, then renamed: an interrupted run never leaves half a
    # dataset at root (only, at worst after a hard kill, a `.NAME.tmp-PID` folder beside it).
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for split_id, (split, count) in enumerate(
            (("train", train_per_class), ("val", val_per_class))
        ):
            for k, kind in enumerate(KINDS[:classes]):
                folder = tmp / split / f"{k:02d}_{kind}"
                folder.mkdir(parents=True)
                for i in range(count):
                    rng = np.random.default_rng([seed, split_id, k, i])
                    image = draw_image(kind, rng, size, difficulty)
                    image.save(folder / f"{kind}_{i:05d}.JPEG", "JPEG", quality=90)
        if root.exists():
            root.rmdir()  # empty, checked above
        tmp.rename(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def draw_image(kind: str, rng: np.random.Generator, size: int, d: float) -> Image.Image:
    """One RGB image of class `kind` at difficulty `d`."""
    bg = rng.uniform(0, 255, 3)
    fg = _contrasting(rng, bg, 160 - 110 * d)
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    tilt = rng.uniform(0, 2 * math.pi)
    ramp = (xs * math.cos(tilt) + ys * math.sin(tilt)) / size - 0.5
    pixels = bg + ramp[..., None] * rng.uniform(-80, 80, 3)  # background with a colour gradient
    if kind in TEXTURES:
        region = _rectangle(rng, size, 0.5 - 0.2 * d, xs, ys)
        pixels = np.where((_texture(kind, rng, size, xs, ys) & region)[..., None], fg, pixels)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    _clutter(image, rng, int(rng.integers(0, 1 + round(12 * d))))
    if kind in SHAPES:
        image.paste(tuple(int(c) for c in fg), mask=_shape_mask(kind, rng, size, d))
    _clutter(image, rng, int(rng.integers(0, 1 + round(5 * d))))  # strokes over the object
    noisy = np.asarray(image, np.float32) + rng.normal(0, 3 + 30 * d, (size, size, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def _contrasting(rng: np.random.Generator, bg: np.ndarray, distance: float) -> np.ndarray:
    """A random colour at least `distance` away from `bg` (or the farthest of 20 tries)."""
    tries = rng.uniform(0, 255, (20, 3))
    dist = np.linalg.norm(tries - bg, axis=1)
    far = np.flatnonzero(dist >= distance)
    return tries[far[0]] if far.size else tries[dist.argmax()]


def _rectangle(rng: np.random.Generator, size: int, lo: float, xs, ys) -> np.ndarray:
    """A boolean mask of a random axis-aligned rectangle, each side in [lo, 1] x size."""
    w, h = rng.uniform(lo, 1.0, 2) * size
    x0, y0 = rng.uniform(0, size - w), rng.uniform(0, size - h)
    return (xs >= x0) & (xs < x0 + w) & (ys >= y0) & (ys < y0 + h)


def _texture(kind: str, rng: np.random.Generator, size: int, xs, ys) -> np.ndarray:
    """Stripes or a checkerboard, slightly rotated (+-15 degrees: orientation is the class)."""
    base = {"hstripes": 0.0, "vstripes": 90.0, "checkerboard": 0.0}.get(kind)
    if base is None:  # diagonal: either direction
        base = 45.0 if rng.random() < 0.5 else 135.0
    angle = math.radians(base + rng.uniform(-15, 15))
    period = rng.uniform(size / 12, size / 5)
    u = xs * math.cos(angle) + ys * math.sin(angle) + rng.uniform(0, period)
    v = -xs * math.sin(angle) + ys * math.cos(angle) + rng.uniform(0, period)
    if kind == "checkerboard":
        return (np.floor(u / period) + np.floor(v / period)) % 2 == 0
    return np.floor(v / period) % 2 == 0


def _shape_mask(kind: str, rng: np.random.Generator, size: int, d: float) -> Image.Image:
    """An "L" mask of one shape with random size, aspect, rotation and position."""
    r = size * rng.uniform(0.2 - 0.08 * d, 0.42)
    cx, cy = rng.uniform(r * 0.8, size - r * 0.8, 2)
    if kind in ("circle", "ring"):
        outline = _regular(48, 0.0)
    elif kind == "square":
        outline = _regular(4, math.pi / 4)
    elif kind == "triangle":
        outline = _regular(3, math.pi / 2)
    elif kind == "star":
        outline = _regular(10, math.pi / 2) * np.tile([1.0, 0.42], 5)[:, None]
    else:  # cross: a plus sign with arms of half-width w
        w = 0.3
        outline = np.array(
            [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w),
             (-1, w), (-1, -w), (-w, -w)]
        )  # fmt: skip
    aspect = rng.uniform(0.8, 1.25)
    phi = rng.uniform(0, 2 * math.pi)
    rot = np.array([[math.cos(phi), -math.sin(phi)], [math.sin(phi), math.cos(phi)]])

    def place(points: np.ndarray) -> list[tuple[float, float]]:
        p = (points * [aspect, 1 / aspect]) @ rot.T * r + [cx, cy]
        return [tuple(q) for q in p]

    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    draw.polygon(place(outline), fill=255)
    if kind == "ring":
        draw.polygon(place(outline * rng.uniform(0.5, 0.7)), fill=0)
    return mask


def _regular(n: int, start: float) -> np.ndarray:
    """The n vertices of a regular polygon on the unit circle."""
    a = start + 2 * math.pi * np.arange(n) / n
    return np.stack([np.cos(a), np.sin(a)], axis=1)


def _clutter(image: Image.Image, rng: np.random.Generator, n: int) -> None:
    """Draw n short random strokes of random colours."""
    draw = ImageDraw.Draw(image)
    size = image.width
    for _ in range(n):
        x, y = rng.uniform(0, size, 2)
        length, angle = rng.uniform(size / 10, size / 3), rng.uniform(0, 2 * math.pi)
        end = (x + length * math.cos(angle), y + length * math.sin(angle))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        draw.line([(x, y), end], fill=colour, width=int(rng.integers(1, 3)))


def main(argv: list[str] | None = None) -> int:
    """Command line: write the demo dataset to DST."""
    p = argparse.ArgumentParser(
        prog="python -m engine.data.demo", description=__doc__.split("\n")[0]
    )
    p.add_argument("dst", type=Path, help="output folder (must not exist or be empty)")
    p.add_argument("--classes", type=int, default=10, help=f"number of classes, 2..{len(KINDS)}")
    p.add_argument("--train-per-class", type=int, default=260)
    p.add_argument("--val-per-class", type=int, default=50)
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--difficulty", type=float, default=0.5, help="0 = clean .. 1 = hard")
    a = p.parse_args(argv)
    start = time.perf_counter()
    try:
        make_demo_dataset(
            a.dst, classes=a.classes, train_per_class=a.train_per_class,
            val_per_class=a.val_per_class, size=a.size, seed=a.seed, difficulty=a.difficulty,
        )  # fmt: skip
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n = a.classes * (a.train_per_class + a.val_per_class)
    print(f"wrote {n} images to {a.dst} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
