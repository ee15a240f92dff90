"""Images/s of each input pipeline alone (no model), train and val, on the same files and
thread count: the torch backend (DataLoader, decoding on the CPU, and on CUDA also on the GPU)
and DALI (CPU-only without CUDA, `mixed` with it), on full-size files and on a copy prepared at
--max-side px (engine.data.prepare).

    python benchmarks/data.py --make 2000              # generate 500x375 JPEGs (ImageNet's median)
    python benchmarks/data.py --root /data/imagenet    # or measure a real ImageFolder root

Writes data_<device>.json and .md to --out.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repo root, not benchmarks/
from benchmarks.common import device_name, version, write_results  # noqa: E402
from engine.config import DataConfig  # noqa: E402
from engine.data import build_loaders, dali_installed, decode, prepare  # noqa: E402
from engine.data.folder import MEAN, STD, DeviceBatcher  # noqa: E402
from engine.data.images import load_rgb  # noqa: E402
from engine.distributed import Dist  # noqa: E402

CLASSES = 10


def make_dataset(root: Path, n: int, width: int = 500, height: int = 375) -> Path:
    """n photo-like JPEGs (smooth shapes plus grain, quality 90) in train/<class>/; val/ holds
    hard links to the same files, so both splits read the same bytes."""
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / "train" / f"c{i % CLASSES}"
        folder.mkdir(parents=True, exist_ok=True)
        coarse = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
        smooth = np.asarray(coarse.resize((width, height), Image.Resampling.BICUBIC), np.int16)
        grain = rng.integers(-12, 13, smooth.shape, dtype=np.int16)
        pixels = np.clip(smooth + grain, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:06d}.JPEG", quality=90)
    for f in (root / "train").rglob("*.JPEG"):
        link = root / "val" / f.relative_to(root / "train")
        link.parent.mkdir(parents=True, exist_ok=True)
        os.link(f, link)
    return root


def link_up(root: Path, entries: int) -> None:
    """Hard links in train/<class>/ and val/<class>/ until each split lists `entries` files: an
    epoch long enough to time after the start-up burst, with only the distinct files' bytes in
    the page cache."""
    for split in ("train", "val"):
        files = sorted(f for f in (root / split).rglob("*") if f.is_file())
        for i in range(len(files), entries):
            src = files[i % len(files)]
            os.link(src, src.with_name(f"link{i:07d}{src.suffix}"))


def skipped_batches(workers: int) -> int:
    """Batches taken before the clock starts: every worker builds its first two batches (the
    DataLoader's prefetch) at once, so they arrive together, faster than the pipeline runs."""
    return 2 * max(workers, 1) + 1


def images_per_second(loader, skip: int, device: torch.device, train: bool) -> float:
    """Steady-state rate: the clock starts after `skip` batches and stops when the epoch's
    last batch is on the device."""
    if train:
        loader.set_epoch(0)
    it = iter(loader)
    for _ in range(skip):
        next(it)
    count, start = 0, time.perf_counter()
    for images, _ in it:
        count += images.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize()  # host sync: the last batch is ready, not just queued
    return count / (time.perf_counter() - start)


def measure(root: Path, backend: str, mode: str, args, device: torch.device) -> dict:
    cfg = DataConfig(
        backend=backend,
        root=str(root),
        decode=mode,
        batch_size=args.batch_size,
        image_size=args.image_size,
        workers=args.threads,
    )
    dist = Dist(0, 1, 0, device, None)
    dtype = torch.bfloat16 if device.type == "cuda" else None
    train, val = build_loaders(
        cfg, dist=dist, seed=0, num_classes=CLASSES, channels_last=True, dtype=dtype
    )
    skip = skipped_batches(args.threads)
    if min(len(train), len(val)) < 2 * skip:
        raise SystemExit(
            f"{root}: {min(len(train), len(val))} batches per epoch, too few to time after the "
            f"first {skip}; give a larger --root or --make"
        )
    return {
        "train": images_per_second(train, skip, device, train=True),
        "val": images_per_second(val, skip, device, train=False),
    }


def per_image_ms(root: Path, size: int, resize: int) -> dict:
    """Milliseconds per image on one core, train and val, over up to 64 of the root's files (best
    of 3 passes): the usual PIL pipeline (PIL decode, torchvision's PIL transforms) beside the
    engine's worker path (decode.read_decoded, CropParams, crop_on_host)."""
    files = sorted(str(f) for f in (root / "train").rglob("*") if f.is_file())[:64]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = {}
    for split, train in (("train", True), ("val", False)):
        usual = T.Compose(
            [T.RandomResizedCrop(size, ratio=decode.RATIO), T.RandomHorizontalFlip()]
            if train
            else [T.Resize(resize), T.CenterCrop(size)]
        )
        plan = decode.CropParams(train=train, size=size, resize=resize, min_scale=0.08)

        def pil(path: str, usual: T.Compose = usual) -> None:
            np.array(usual(load_rgb(path)), dtype=np.uint8)

        def engine(path: str, plan: decode.CropParams = plan) -> None:
            decode.crop_on_host(*plan(decode.read_decoded(path)), size)

        for name, one in (("pil", pil), ("engine", engine)):
            passes = []
            for _ in range(3):
                start = time.perf_counter()
                for path in files:
                    one(path)
                passes.append((time.perf_counter() - start) / len(files) * 1e3)
            out[f"{split} {name}"] = min(passes)
    torch.set_num_threads(threads)
    return out


def _timed_ms(work: Callable[[], object], device: torch.device, repeats: int) -> dict:
    """Median milliseconds of `work()`: `host` until the call returns (what the prefetch thread
    spends), `total` until the device is done; after 3 warm-up calls (and compilations)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    host, total = [], []
    for _ in range(repeats + 3):
        sync()  # host syncs: each call timed alone
        start = time.perf_counter()
        work()
        host.append(time.perf_counter() - start)
        sync()
        total.append(time.perf_counter() - start)
    return {"host": statistics.median(host[3:]) * 1e3, "total": statistics.median(total[3:]) * 1e3}


def device_ms(root: Path, args, device: torch.device, repeats: int = 20) -> dict:
    """Milliseconds per batch of the gpu decode mode's device work, apart: nvJPEG decoding the
    root's first files, and the crops (crop, resize, normalise) image by image in torch
    (decode.resized_crops, as before the kernel) and in one Triton launch
    (kernels/resized_crops.py), on those files' pixels and on random 2000x1500 images
    (downscales of 7x or so: the kernel's 2-D filter reads up to twice the taps of torch's two
    passes, its worst case)."""
    from kernels.resized_crops import resized_crops_triton

    files = sorted(str(f) for f in (root / "train").rglob("*") if f.is_file())[: args.batch_size]
    out = {}
    encoded = [decode.read_encoded(f).data for f in files]
    if device.type == "cuda" and all(x.dim() == 1 for x in encoded) and decode.nvjpeg_works(device):
        out["files | nvJPEG decode"] = _timed_ms(
            lambda: decode.decode_on_device(encoded, device), device, repeats
        )
    large = (3, 1500, 2000)
    batches = {
        "files": [decode.read_decoded(f).data for f in files],
        "2000x1500": [
            torch.randint(0, 256, large, dtype=torch.uint8, device=device) for _ in files
        ],
    }
    crop = decode.CropParams(train=True, size=args.image_size, resize=0, min_scale=0.08)
    batcher = DeviceBatcher(device, channels_last=True, dtype=torch.bfloat16)
    mean, std = [m * 255 for m in MEAN], [s * 255 for s in STD]
    size, fmt = args.image_size, torch.channels_last
    ways = {
        "torch crops, per image": lambda images, plans, flips: batcher.normalise(
            decode.resized_crops(images, plans, flips, size, fmt)
        ),
        "Triton crops, one launch": lambda images, plans, flips: resized_crops_triton(
            images, plans, flips, size, mean, std, torch.bfloat16, fmt
        ),
    }
    for batch, pixels in batches.items():
        drawn = [crop(decode.Encoded(x, *x.shape[1:]), torch.Generator().manual_seed(i))
                 for i, x in enumerate(pixels)]  # fmt: skip
        inputs = (
            [x.to(device) for x, _, _ in drawn],
            torch.stack([p for _, p, _ in drawn]),
            torch.tensor([f for _, _, f in drawn]),
        )
        for name, way in ways.items():
            out[f"{batch} | {name}"] = _timed_ms(functools.partial(way, *inputs), device, repeats)
    return out


def pipelines(device: torch.device) -> list[tuple[str, str, str]]:
    """(name, backend, data.decode mode) of every pipeline that runs on this device."""
    rows = [("torch DataLoader, decode in the workers", "torch", "cpu")]
    if device.type == "cuda":
        rows.append(("torch, nvJPEG decode in the prefetch thread", "torch", "gpu"))
    if dali_installed():
        kind = "mixed (GPU)" if device.type == "cuda" else "CPU-only"
        rows.append((f"DALI {kind}", "dali", "auto"))
    return rows


def _dali_version() -> str | None:
    return version("nvidia-dali-cuda130") or version("nvidia-dali-cuda120")


def _files(root: Path) -> dict:
    sizes = [f.stat().st_size for f in (root / "train").rglob("*") if f.is_file()]
    first = next(f for f in (root / "train").rglob("*") if f.is_file())
    with Image.open(first) as im:
        width, height = im.size
    return {"files": len(sizes), "mean_kB": sum(sizes) / len(sizes) / 1e3, "size": [width, height]}


def main() -> None:
    """Measure every pipeline on full-size and prepared files; print and write the table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", type=Path, help="ImageFolder root with train/ and val/")
    p.add_argument("--make", type=int, default=500, help="without --root: generate N JPEGs")
    p.add_argument("--max-side", type=int, default=256, help="prepared copy; 0 = skip it")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    # Generated files are linked up to 4x the batches skipped: 3x that many are timed.
    entries = 4 * skipped_batches(args.threads) * args.batch_size
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        roots = {"full size": args.root or make_dataset(Path(tmp) / "full", args.make)}
        prep_seconds = None
        if args.max_side:
            start = time.perf_counter()
            prepared = Path(tmp) / f"{args.max_side}px"
            prepare.prepare(
                roots["full size"], prepared, max_side=args.max_side, workers=args.threads
            )
            prep_seconds = time.perf_counter() - start
            roots[f"prepared {args.max_side} px"] = prepared
        files = {name: _files(root) for name, root in roots.items()}
        resize = round(args.image_size * 256 / 224)
        per_image = {
            name: per_image_ms(root, args.image_size, resize) for name, root in roots.items()
        }
        for root in roots.values():
            if root != args.root:
                link_up(root, entries)
        rates = {
            f"{name} | {data}": measure(root, backend, mode, args, device)
            for name, backend, mode in pipelines(device)
            for data, root in roots.items()
        }
        work, work_error = None, None
        if device.type == "cuda":
            try:  # after the pipelines: a failure here (said, and kept) costs none of their rows
                work = device_ms(roots["full size"], args, device)
            except Exception as e:
                work_error = f"{type(e).__name__}: {e}"
                print(f"device work not timed: {work_error}", file=sys.stderr)

    result = {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "torchvision": version("torchvision"),
        "dali": _dali_version(),
        "pillow": version("pillow"),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "datasets": files,
        "skipped_batches": skipped_batches(args.threads),
        "entries_per_split": None if args.root else entries,
        "prepare_seconds": prep_seconds,
        "images_per_s": rates,
        "per_image_ms_one_core": per_image,
        "device_ms_per_batch": work,
        "device_ms_error": work_error,
    }
    lines = [
        f"Input pipelines alone: images/s, batch {args.batch_size}, {args.image_size} px crops, "
        f"{args.threads} threads/workers",
        f"{result['device']} ({os.cpu_count()} CPUs), torch {result['torch']}, torchvision "
        f"{result['torchvision']}, DALI {result['dali']}, {result['date_utc']}",
        f"Timed from batch {result['skipped_batches'] + 1} to the epoch's end"
        + ("" if args.root else f"; generated files hard-linked up to {entries} per split"),
        "",
        "| pipeline | files | train img/s | val img/s |",
        "|---|---|---:|---:|",
    ]
    lines += [f"| {name} | {r['train']:.0f} | {r['val']:.0f} |" for name, r in rates.items()]
    lines += ["", "| files | count | mean size | first image |", "|---|---:|---:|---|"]
    lines += [
        f"| {name} | {f['files']} | {f['mean_kB']:.1f} kB | {f['size'][0]}x{f['size'][1]} |"
        for name, f in files.items()
    ]
    lines += [
        "",
        "Per image on one core (ms): PIL decode + torchvision's PIL transforms, the usual way,",
        "beside the engine's workers (torchvision decode, the crop on uint8 tensors)",
        "",
        "| files | split | PIL + transforms | engine | speed-up |",
        "|---|---|---:|---:|---:|",
    ]
    lines += [
        f"| {name} | {split} | {ms[f'{split} pil']:.2f} | {ms[f'{split} engine']:.2f} "
        f"| {ms[f'{split} pil'] / ms[f'{split} engine']:.2f}x |"
        for name, ms in per_image.items()
        for split in ("train", "val")
    ]
    if work_error:
        lines += ["", f"The gpu decode mode's device work was not timed: {work_error}"]
    if work:
        lines += [
            "",
            f"The gpu decode mode's device work apart, per batch of {args.batch_size} "
            "(ms; host: until the call returns)",
            "",
            "| images | work | host ms | total ms |",
            "|---|---|---:|---:|",
        ]
        lines += [f"| {name} | {t['host']:.2f} | {t['total']:.2f} |" for name, t in work.items()]
    if prep_seconds is not None:
        lines += ["", f"prepare ({args.threads} workers): {prep_seconds:.1f} s"]
    table = "\n".join(lines) + "\n"
    write_results(args.out, f"data_{device.type}", result, table)


if __name__ == "__main__":
    main()
