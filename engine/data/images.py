"""Reading image files the way ImageNet stores them, for every backend.

ImageNet's train set holds grayscale JPEGs, 22 CMYK JPEGs, a PNG named .JPEG, progressive JPEGs
and EXIF-rotated photos: each is read as 3-channel RGB with its EXIF orientation applied (as
DALI's decoders do by default). A file that cannot be read raises, and the loaders replace it.
"""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image

ORIENTATION = 0x0112  # the EXIF tag
_TRANSPOSE = {  # EXIF orientation -> the PIL operation that shows the image upright
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def load_rgb(source: str | Path | bytes) -> Image.Image:
    """A file (path or bytes) as an upright RGB image; raises if it cannot be decoded whole."""
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
        orientation = im.getexif().get(ORIENTATION, 1)
        rgb = im.convert("RGB")  # decodes the whole file: a truncated one raises OSError here
    return upright(rgb, orientation)


def upright(image: Image.Image, orientation: int) -> Image.Image:
    """`image` turned (or mirrored) as its EXIF orientation says it is shown."""
    op = _TRANSPOSE.get(orientation)
    return image if op is None else image.transpose(op)


def readable(path: str | Path) -> bool:
    """Whether load_rgb can read `path` (decoders raise many exception types on bad data)."""
    try:
        load_rgb(path)
    except Exception:
        return False
    return True


def device_jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) when nvJPEG can decode `data` as it is: a JPEG (baseline or progressive)
    with 1 or 3 components, upright, ending in its end-of-image marker. None for the rest (PNG,
    CMYK, EXIF-rotated, truncated), which are decoded on the CPU. Reads only the header."""
    with Image.open(io.BytesIO(data)) as im:
        plain = im.format == "JPEG" and im.mode in ("RGB", "L")
        if not plain or im.getexif().get(ORIENTATION, 1) != 1:
            return None
        if not data.rstrip(b"\0").endswith(b"\xff\xd9"):  # cut short (padding zeros allowed)
            return None
        return im.height, im.width
