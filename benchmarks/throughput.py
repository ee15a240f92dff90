"""Training images/s of the engine's own step over a grid of settings, beside a typical loop.

Every row is built the way the engine builds a run: engine.models.build_model, channels_last,
prune.unstructured_masks (global magnitude, 80%) for masked rows, optim.build, train.wrap
(torch.compile), train.make_step, and data.build_loaders (synthetic, or the torch backend on a
generated JPEG folder). Warm-up (compilation included) is outside the timed region; then
`repeats` windows of `steps` steps are timed (CUDA events) and summarised by their median.
Writes STEM.json and STEM.md after every row, and STEM.png (with matplotlib) at the end.

    python benchmarks/throughput.py --quick                  # CPU, resnet20 at 32 px, seconds
    python benchmarks/throughput.py                          # the GPU grid for ResNet-50
    python benchmarks/throughput.py --compile eager default --amp bf16 fp16 --weights masked
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import itertools
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

if not __package__:  # run as a file: import from the repo root, not from benchmarks/
    sys.path[0] = str(Path(__file__).resolve().parents[1])
from benchmarks import baseline, common  # noqa: E402
from engine import optim, prune, train  # noqa: E402
from engine.config import DataConfig, OptimConfig, PrecisionConfig  # noqa: E402
from engine.data import build_loaders, prepare  # noqa: E402
from engine.distributed import Dist  # noqa: E402
from engine.models import build_model  # noqa: E402
from engine.run import set_determinism  # noqa: E402

AXES = {
    "compile": (
        "eager",
        "default",
        "reduce-overhead",
        "max-autotune",
        "max-autotune-no-cudagraphs",
    ),
    "layout": ("nhwc", "nchw"),
    "amp": ("bf16", "fp16", "off"),
    "weights": ("dense", "masked"),
    "data": ("synthetic", "jpeg", "jpeg256", "nvjpeg", "nvjpeg-main"),
}
# The baseline each data kind is compared with: jpeg256 rows (the engine's workers on the copy
# that `python -m engine.data.prepare --max-side 256` writes) and nvjpeg rows (the engine's
# `decode: gpu`, decoding in its prefetch thread; nvjpeg-main: in the main thread, to measure
# that thread) against the loop a typical user writes, which decodes full-size JPEGs on the CPU.
BASELINE_DATA = {
    "synthetic": "synthetic",
    "jpeg": "jpeg",
    "jpeg256": "jpeg",
    "nvjpeg": "jpeg",
    "nvjpeg-main": "jpeg",
}
PREPARED_SIDE = {"jpeg256": 256}
SPARSITY = 0.8
LR = 0.1
JPEG_CLASSES = 10


@dataclass(frozen=True)
class Config:
    """One grid point of the benchmark."""

    compile: str = "eager"
    layout: str = "nhwc"
    amp: str = "bf16"
    weights: str = "dense"
    data: str = "synthetic"

    def __post_init__(self) -> None:
        for axis, allowed in AXES.items():
            if getattr(self, axis) not in allowed:
                raise ValueError(f"{axis}={getattr(self, axis)!r}: choose from {allowed}")

    def __str__(self) -> str:
        return "/".join(dataclasses.astuple(self))


def _grid(*specs: str) -> list[Config]:
    """Configs from "compile/layout/amp/weights/data" strings."""
    configs = []
    for spec in specs:
        parts = spec.split("/")
        if len(parts) != len(AXES):
            raise ValueError(f"row {spec!r}: give {'/'.join(AXES)}")
        configs.append(Config(*parts))
    return configs


PRESETS = {
    "quick": _grid(
        "eager/nchw/off/dense/synthetic",
        "eager/nhwc/off/dense/synthetic",
        "eager/nhwc/bf16/dense/synthetic",
        "eager/nhwc/bf16/masked/synthetic",
        "eager/nhwc/bf16/dense/jpeg",
    ),
    # Most telling rows first, since a time budget cuts the grid from the end: compiled
    # synthetic, then the goals' rows (real data against it, masked against dense), then the
    # rest. Compiling ResNet-50 cost 54-80 s on a fresh H100; the later compiled rows reuse its
    # graph (images in the autocast dtype on every backend) from inductor's cache in 3-6 s. The
    # nvjpeg rows are compiled: eager (2,271 img/s on the H200, decoding in the main thread)
    # leaves the host no time to spare, while a compiled step takes little.
    "gpu": _grid(
        "default/nhwc/bf16/dense/synthetic",
        "default/nhwc/bf16/dense/jpeg256",
        "default/nhwc/bf16/masked/synthetic",
        "default/nhwc/bf16/dense/nvjpeg",
        "default/nhwc/bf16/dense/jpeg",
        "eager/nhwc/bf16/dense/synthetic",
        "eager/nhwc/bf16/masked/synthetic",
        "default/nhwc/bf16/dense/nvjpeg-main",
        "eager/nhwc/bf16/dense/jpeg",
        "default/nhwc/fp16/dense/synthetic",
        "eager/nhwc/fp16/dense/synthetic",
        "eager/nchw/off/dense/synthetic",
        "eager/nchw/bf16/dense/synthetic",
        "reduce-overhead/nhwc/bf16/dense/synthetic",
        "eager/nhwc/fp16/masked/synthetic",
    ),
}


def _opt(default: object, help: str) -> object:
    return dataclasses.field(default=default, metadata={"help": help})


@dataclass
class Options:
    """Everything but the grid; the defaults are the GPU run's, QUICK the CPU one's."""

    arch: str = _opt("resnet50", "engine.models architecture")
    num_classes: int = _opt(1000, "model outputs (the JPEG folder has 10 classes)")
    batch_size: int = _opt(256, "images per step")
    image_size: int = _opt(224, "training crop in pixels")
    device: str = _opt("cuda", "cuda or cpu")
    warmup: int = _opt(5, "untimed steps first (compilation, autotuning, workers starting)")
    repeats: int = _opt(5, "timed windows; the table shows their median and spread")
    steps: int = _opt(6, "steps per timed window")
    workers: int = _opt(min(16, os.cpu_count() or 1), "DataLoader workers of the jpeg rows")
    jpeg_root: str = _opt("", "folder for the generated JPEG folders (default: the temp dir)")
    budget_s: float = _opt(0.0, "if > 0, start no row after this many seconds")
    threads: int = _opt(0, "if > 0, torch.set_num_threads (1 is repeatable on a busy CPU)")

    def windows(self, data: str) -> dict[str, int]:
        """warmup, repeats and steps of a row reading `data`. Rows reading files warm up past the
        workers' start-up burst (2 x workers + 1 batches: each worker holds two), and each timed
        window spans at least one batch from every worker, so that batches arriving in rounds
        do not make windows alternately fast and slow."""
        if data == "synthetic":
            return dict(warmup=self.warmup, repeats=self.repeats, steps=self.steps)
        return dict(
            warmup=max(self.warmup, 2 * self.workers + 1),
            repeats=self.repeats,
            steps=max(self.steps, self.workers),
        )

    def total_steps(self, data: str) -> int:
        w = self.windows(data)
        return w["warmup"] + w["repeats"] * w["steps"]


QUICK = dict(
    arch="resnet20", num_classes=10, batch_size=32, image_size=32, device="cpu", warmup=3,
    repeats=5, steps=3, workers=0, threads=1,
)  # fmt: skip


def jpeg_folder(opts: Options, data: str) -> Path:
    """An ImageFolder (train/ and val/, JPEG_CLASSES classes) with enough train images for
    one run reading `data`: ImageNet-like 500x375 photos of ~100 KB for crops of 128 px and
    more, else 2x the crop; for jpeg256, the copy engine.data.prepare makes of them. 64 distinct
    images are encoded; the other files are hard links to them (decoding costs the same; files
    are read from the page cache, as with a warm dataset)."""
    big = opts.image_size >= 128
    width, height = (500, 375) if big else (2 * opts.image_size,) * 2
    side = PREPARED_SIDE.get(data)
    count = (opts.total_steps(data) + 1) * opts.batch_size
    tmp = Path(tempfile.gettempdir())
    name = f"engine-bench-jpeg-{width}x{height}" + (f"-{side}px" if side else "")
    root = Path(opts.jpeg_root) / name if opts.jpeg_root else tmp / name
    marker = root / "bench.json"
    if marker.exists():
        made = json.loads(marker.read_text())
        if made["size"] == [width, height] and made["count"] >= count:
            return root
        shutil.rmtree(root)  # ours (it has the marker), but too small
    elif root.exists() and any(root.iterdir()):
        raise SystemExit(f"--jpeg-root {root} is not empty and was not made by this script")
    rng = np.random.default_rng(0)
    (root / "src").mkdir(parents=True)
    sources = [root / "src" / f"{k:02d}.jpg" for k in range(64)]
    for path in sources:
        path.write_bytes(_jpeg_bytes(rng, width, height))
    if side:
        prepare.prepare(root / "src", root / "prepared", max_side=side)
        sources = [root / "prepared" / path.name for path in sources]
    for split, n in (("train", count), ("val", JPEG_CLASSES)):
        for i in range(n):
            folder = root / split / f"c{i % JPEG_CLASSES:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            try:
                os.link(sources[i % len(sources)], folder / f"{i:07d}.JPEG")
            except OSError:  # no hard links on this file system
                shutil.copyfile(sources[i % len(sources)], folder / f"{i:07d}.JPEG")
    size_kb = sum(p.stat().st_size for p in sources) / len(sources) / 1024
    marker.write_text(json.dumps({"size": [width, height], "count": count, "kb": size_kb}))
    return root


def _jpeg_bytes(rng: np.random.Generator, width: int, height: int) -> bytes:
    """A photo-like JPEG (quality 90): a smooth random colour field with grain."""
    from PIL import Image

    coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC))
    grain = rng.normal(0, 24, (height, width, 3))
    buf = io.BytesIO()
    Image.fromarray((smooth + grain).clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def make_loader(
    data: str, opts: Options, dist: Dist, channels_last: bool, dtype: torch.dtype | None = None
):
    """An engine train loader with opts.total_steps(data) steps: synthetic or the torch
    backend, its images in `dtype` (the engine's autocast dtype; None: float32)."""
    common_kw = dict(
        steps_per_epoch=opts.total_steps(data),
        batch_size=opts.batch_size,
        image_size=opts.image_size,
    )
    if data == "synthetic":
        cfg = DataConfig(backend="synthetic", **common_kw)
    else:  # the torch backend; nvjpeg: the workers read files, nvJPEG decodes on the device
        decode = "gpu" if data.startswith("nvjpeg") else "cpu"
        root = str(jpeg_folder(opts, data))
        cfg = DataConfig(
            backend="torch", root=root, workers=opts.workers, decode=decode, **common_kw
        )
    loader, _ = build_loaders(
        cfg,
        dist=dist,
        seed=0,
        num_classes=opts.num_classes,
        channels_last=channels_last,
        dtype=dtype,
    )
    loader.set_epoch(0)
    if data == "nvjpeg-main":
        loader.prepare_in_thread = False
    return loader


def engine_run(cfg: Config, opts: Options, dist: Dist):
    """`run(n)`: n steps of the engine's step, built as the engine builds it for `cfg`."""
    channels_last = cfg.layout == "nhwc"
    torch.manual_seed(0)
    model = build_model(opts.arch, opts.num_classes)
    model.to(
        dist.device, memory_format=torch.channels_last if channels_last else torch.preserve_format
    )
    masks = None
    if cfg.weights != "dense":
        masks = prune.unstructured_masks(model, "global_magnitude", SPARSITY)
        prune.apply_masks_(model, masks)
    precision = PrecisionConfig(
        amp=cfg.amp,
        channels_last=channels_last,
        compile=cfg.compile != "eager",
        compile_mode="default" if cfg.compile == "eager" else cfg.compile,
    )
    opt = optim.build(model, OptimConfig(lr=LR), masks)
    net = train.wrap(model, precision, dist)
    dtype = train.amp_dtype(precision)
    scaler = torch.amp.GradScaler(dist.device.type) if dtype is torch.float16 else None
    step = train.make_step(net, opt, scaler, 0.0, dtype, dist.device.type)
    batches = iter(make_loader(cfg.data, opts, dist, channels_last, dtype))
    loss_sum = torch.zeros((), device=dist.device)

    def run(n: int) -> None:
        for _ in range(n):
            images, labels = next(batches)
            for group in opt.param_groups:  # as fit: the scheduled LR, set every step
                group["lr"] = LR
            loss, _ = step(images, labels)
            loss_sum.add_(loss)  # on the device, as fit accumulates it: no sync

    return run


def train_flops(opts: Options) -> float:
    """Training FLOPs per image: 3 (forward, two backward products) x 2 x the forward MACs."""
    macs, _ = prune.count_flops(build_model(opts.arch, opts.num_classes), opts.image_size)
    return 6.0 * macs


def run_grid(opts: Options, configs: list[Config], out: Path | None = None) -> dict:
    """Time the baseline (per data kind, when first needed) and every config in order; write
    OUT.json and OUT.md after each row when `out` (a path stem) is given. Returns the report."""
    device = torch.device(opts.device)
    dist = Dist(device=device)
    set_determinism(False, device)  # the engine's default: cuDNN autotuning on CUDA
    flops = train_flops(opts)
    report = {
        "meta": {**common.environment(device), "train_flops_per_image": flops},
        "options": {**dataclasses.asdict(opts), "sparsity": SPARSITY, "lr": LR},
        "windows": {data: opts.windows(data) for data in AXES["data"]},
        "peaks": {},
        "baseline": {},
        "rows": [],
    }
    began = time.monotonic()
    for cfg in configs:
        row: dict = {**dataclasses.asdict(cfg), "status": "ok"}
        if opts.budget_s and time.monotonic() - began > opts.budget_s:
            row["status"] = "skipped: over --budget-s"
        else:
            try:
                torch._dynamo.reset()  # a fresh compile per row, never a silent eager fallback
                kind = BASELINE_DATA[cfg.data]
                if kind not in report["baseline"]:
                    loader = make_loader(kind, opts, dist, channels_last=False)
                    kw = dict(**opts.windows(kind), batch_size=opts.batch_size)
                    b = baseline.measure(opts.arch, opts.num_classes, loader, device, **kw)
                    report["baseline"][kind] = _derive(b, "off", flops, report["peaks"], device)
                    del loader  # frees its device batch before the next row's memory peak
                kw = dict(**opts.windows(cfg.data), batch_size=opts.batch_size)
                r = common.measure(lambda cfg=cfg: engine_run(cfg, opts, dist), device, **kw)
                row.update(_derive(r, cfg.amp, flops, report["peaks"], device))
                base = report["baseline"][kind]["img_per_s"]
                row["vs_baseline"] = row["img_per_s"] / base
            except Exception as e:  # a failing row is reported, the grid goes on
                row["status"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
        report["rows"].append(row)
        print(f"{cfg}: {_cell(row)}", flush=True)
        if out is not None:
            write(report, out, final=False)
    if out is not None:
        write(report, out, final=True)
    return report


def _derive(r: dict, amp: str, flops: float, peaks: dict, device: torch.device) -> dict:
    """Add MFU (dense FLOPs, also for masked rows) against the peak for `amp`."""
    if amp not in peaks:
        peak, source = common.peak_flops(device, amp)
        peaks[amp] = {"flops": peak, "source": source}
    peak = peaks[amp]["flops"]
    return {**r, "mfu": r["img_per_s"] * flops / peak if peak else None}


def _cell(row: dict) -> str:
    """A row's progress line."""
    if row["status"] != "ok":
        return row["status"]
    return f"{row['img_per_s']:,.1f} img/s ({row['vs_baseline']:.2f}x baseline)"


def _setup(row: dict) -> tuple[str, ...]:
    """A row's settings but its data: rows alike but for the data are compared."""
    return tuple(row[axis] for axis in AXES if axis != "data")


def _windows(report: dict, data: str) -> str:
    """How rows reading `data` were timed, in words."""
    w = report["windows"][data]
    return f"{w['repeats']} windows x {w['steps']} steps after {w['warmup']} warm-up steps"


def _fmt(value: float | None, spec: str) -> str:
    """`value` formatted, or "-" when there is none."""
    return "-" if value is None else format(value, spec)


def markdown(report: dict) -> str:
    """The report as a markdown table with a header naming the setup."""
    m, o = report["meta"], report["options"]
    peaks = ", ".join(
        f"{amp} {_fmt(p['flops'] and p['flops'] / 1e12, '.3g')} TFLOP/s ({p['source']})"
        for amp, p in report["peaks"].items()
    )
    lines = [
        f"## Training throughput: {o['arch']}, batch {o['batch_size']}, {o['image_size']} px, "
        f"{m['device']}",
        "",
        f"torch {m['torch']}, torchvision {m['torchvision']}, triton {m['triton']}, "
        f"commit {m['git_commit']}, {m['date_utc']}. Median of {_windows(report, 'synthetic')}"
        f" (rows reading files, {o['workers']} workers: {_windows(report, 'jpeg')}). "
        f"{m['train_flops_per_image'] / 1e9:.3g} GFLOP per training image; peaks: {peaks}.",
        "",
        "| compile | layout | amp | weights | data | img/s | spread | ms/step | x baseline "
        "| x synthetic | MFU | mem GiB | warm-up s |",
        "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rows = [({"compile": "baseline loop", "layout": "nchw", "amp": "off", "weights": "dense",
              "data": data, "status": "ok", "vs_baseline": 1.0, **r})
            for data, r in report["baseline"].items()] + report["rows"]  # fmt: skip
    synthetic = {
        _setup(r): r["img_per_s"] for r in rows if r["data"] == "synthetic" and r["status"] == "ok"
    }
    for r in rows:
        head = f"| {r['compile']} | {r['layout']} | {r['amp']} | {r['weights']} | {r['data']} |"
        if r["status"] != "ok":
            lines.append(f"{head} {r['status']} ||||||||")
            continue
        same = synthetic.get(_setup(r))
        vs_synthetic = r["img_per_s"] / same if same and r["data"] != "synthetic" else None
        lines.append(
            f"{head} {r['img_per_s']:,.1f} | {r['spread_pct']:.1f}% | {r['step_ms']:.1f} | "
            f"{r['vs_baseline']:.2f} | {_fmt(vs_synthetic, '.2f')} | "
            f"{_fmt(r['mfu'] and 100 * r['mfu'], '.1f')}% | "
            f"{_fmt(r['peak_mem_gib'], '.1f')} | {r['warmup_s']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> bool:
    """Bar chart of median images/s with min-max whiskers; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [r for r in report["rows"] if r["status"] == "ok"]
    names = [f"baseline/{d}" for d in report["baseline"]] + [
        "/".join(r[a] for a in AXES) for r in rows
    ]
    stats = list(report["baseline"].values()) + rows
    med = [r["img_per_s"] for r in stats]
    err = [[m - r["img_per_s_min"] for m, r in zip(med, stats, strict=True)],
           [r["img_per_s_max"] - m for m, r in zip(med, stats, strict=True)]]  # fmt: skip
    fig, ax = plt.subplots(figsize=(9, 0.35 * len(names) + 1.2))
    colors = ["0.6"] * len(report["baseline"]) + ["tab:blue"] * len(rows)
    ax.barh(names, med, xerr=err, color=colors)
    ax.invert_yaxis()
    m, o = report["meta"], report["options"]
    ax.set_xlabel("training images/s (median, min-max)")
    ax.set_title(f"{o['arch']}, batch {o['batch_size']}, {o['image_size']} px, {m['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write(report: dict, stem: Path, final: bool) -> None:
    """STEM.json and STEM.md, and when `final` the chart STEM.png."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(report))
    if final and not plot(report, stem.with_suffix(".png")):
        print("matplotlib not installed: no chart", file=sys.stderr)


def parse_args(argv: list[str] | None = None) -> tuple[Options, list[Config], Path]:
    """Options, grid and output stem from the command line."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="small CPU run: " + str(QUICK))
    p.add_argument("--preset", choices=PRESETS, help="named grid (default: quick or gpu)")
    p.add_argument(
        "--rows",
        nargs="+",
        metavar="C/L/A/W/D",
        help="these rows, e.g. default/nhwc/bf16/masked/synthetic",
    )
    for axis, allowed in AXES.items():
        p.add_argument(
            f"--{axis}", nargs="+", choices=allowed, help="grid axis; any given: the product"
        )
    for f in dataclasses.fields(Options):
        flag = f"--{f.name.replace('_', '-')}"
        p.add_argument(flag, type=type(f.default), help=f.metadata["help"])
    p.add_argument("--out", type=Path, help="output stem (default: benchmarks/results/tmp/...)")
    a = p.parse_args(argv)
    given = {f.name: getattr(a, f.name) for f in dataclasses.fields(Options)}
    opts = Options(
        **{**(QUICK if a.quick else {}), **{k: v for k, v in given.items() if v is not None}}
    )
    if not a.quick and not torch.cuda.is_available() and given["device"] is None:
        opts.device = "cpu"
    axes = {axis: getattr(a, axis) for axis in AXES if getattr(a, axis)}
    if a.rows:
        if axes or a.preset:
            p.error("--rows replaces the grid: give no axis flags or --preset with it")
        try:
            configs = _grid(*a.rows)
        except ValueError as e:
            p.error(str(e))
    elif axes:
        values = [axes.get(axis, [getattr(Config(), axis)]) for axis in AXES]
        configs = [Config(*v) for v in itertools.product(*values)]
    else:
        configs = PRESETS[a.preset or ("quick" if a.quick else "gpu")]
    if a.out is None:
        slug = "".join(
            c if c.isalnum() else "-" for c in common.device_name(torch.device(opts.device))
        )
        day = time.strftime("%Y%m%d", time.gmtime())
        a.out = (
            common.ROOT / "benchmarks" / "results" / "tmp" / f"{day}-{slug.lower()}" / "throughput"
        )
    return opts, configs, a.out


def main(argv: list[str] | None = None) -> None:
    """Run the grid, print the table, write the results."""
    opts, configs, out = parse_args(argv)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    report = run_grid(opts, configs, out)
    print("\n" + markdown(report))
    print("wrote", ", ".join(str(p) for p in sorted(out.parent.glob(f"{out.name}.*"))))


if __name__ == "__main__":
    main()
