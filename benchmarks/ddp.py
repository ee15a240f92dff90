"""DDP gradient bucket sizes, timed side by side: the engine's training step (synthetic data,
channels_last) under torchrun once per `ddp.bucket_mb` value, and once without DDP (the same
step on every rank, no all-reduce), the rate that perfect overlap of communication would reach.

    torchrun --standalone --nproc_per_node=8 benchmarks/ddp.py [--bucket-mb 10 25 50 100]

Set the recipe key `ddp.bucket_mb` to the fastest size. Results: a markdown table and JSON in
--out (default benchmarks/results/ddp-<world>x-<device>), written by rank 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repo root, not benchmarks/
from benchmarks.common import environment, time_windows, window_stats, write_results  # noqa: E402
from engine import distributed, optim, train  # noqa: E402
from engine.config import DDPConfig, OptimConfig, PrecisionConfig  # noqa: E402
from engine.distributed import Dist  # noqa: E402
from engine.models import build_model  # noqa: E402
from engine.run import set_determinism  # noqa: E402

LR = 0.1


@dataclass
class Options:
    """The GPU run's defaults; QUICK is the CPU one's (gloo, a tiny model)."""

    arch: str = "resnet50"
    num_classes: int = 1000
    batch_size: int = 256
    image_size: int = 224
    amp: str = "bf16"
    compile: bool = False
    warmup: int = 5
    repeats: int = 5
    steps: int = 6
    bucket_mb: tuple[float, ...] = (10.0, 25.0, 50.0, 100.0, 200.0)


QUICK = dict(
    arch="resnet20", num_classes=10, batch_size=16, image_size=32, amp="off", warmup=2,
    repeats=3, steps=2, bucket_mb=(0.25, 25.0),
)  # fmt: skip


def make_run(opts: Options, dist: Dist, bucket_mb: float | None):
    """`run(n)`: n steps of the engine's step, DDP with `bucket_mb` (None: no DDP)."""
    torch.manual_seed(0)
    model = build_model(opts.arch, opts.num_classes)
    model.to(dist.device, memory_format=torch.channels_last)
    precision = PrecisionConfig(amp=opts.amp, channels_last=True, compile=opts.compile)
    opt = optim.build(model, OptimConfig(lr=LR))
    ranks = dist if bucket_mb is not None else dataclasses.replace(dist, backend=None)
    net = train.wrap(model, precision, ranks, DDPConfig(bucket_mb=bucket_mb or 25.0))
    dtype = train.amp_dtype(precision)
    step = train.make_step(net, opt, None, 0.0, dtype, dist.device.type)
    shape = (opts.batch_size, 3, opts.image_size, opts.image_size)
    images = torch.randn(shape, device=dist.device)  # as the loaders give: in the autocast dtype
    images = images.to(dtype or torch.float32, memory_format=torch.channels_last)
    labels = torch.randint(0, opts.num_classes, (opts.batch_size,), device=dist.device)

    def run(n: int) -> None:
        for _ in range(n):
            step(images, labels)

    return run


def measure(opts: Options, dist: Dist, bucket_mb: float | None) -> dict:
    """Images/s of all ranks together: each window's time is the slowest rank's."""
    run = make_run(opts, dist, bucket_mb)
    dist.barrier()
    _, seconds = time_windows(run, dist.device, opts.warmup, opts.repeats, opts.steps)
    # Host sync (outside the timed windows): the slowest rank's time for each window.
    slowest = dist.all_reduce_max(torch.tensor(seconds, device=dist.device)).tolist()
    stats = window_stats(slowest, opts.steps, opts.batch_size * dist.world_size)
    return {"bucket_mb": bucket_mb, **stats}


def markdown(report: dict) -> str:
    env, o = report["meta"], report["options"]
    lines = [
        f"## DDP bucket sizes: {o['arch']}, batch {o['batch_size']} per rank x "
        f"{report['world_size']} ranks, {o['amp']}, {'compiled' if o['compile'] else 'eager'}",
        "",
        f"{env['device']} ({report['backend']}), torch {env['torch']}, commit "
        f"{env['git_commit']}, {env['date_utc']}. Median of {o['repeats']} windows x "
        f"{o['steps']} steps after {o['warmup']} warm-up steps; each window timed by its "
        "slowest rank. `no DDP`: the same step with no all-reduce.",
        "",
        "| bucket MiB | img/s (all ranks) | spread | ms/step | x no DDP |",
        "|---|---:|---:|---:|---:|",
    ]
    bound = report["rows"][0]["img_per_s"]
    for r in report["rows"]:
        name = "no DDP" if r["bucket_mb"] is None else f"{r['bucket_mb']:g}"
        lines.append(
            f"| {name} | {r['img_per_s']:,.1f} | {r['spread_pct']:.1f}% | {r['step_ms']:.1f} "
            f"| {r['img_per_s'] / bound:.3f} |"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> tuple[Options, Path | None]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"tiny CPU run: {QUICK}")
    parser.add_argument("--bucket-mb", type=float, nargs="+", help="sizes to time, in MiB")
    parser.add_argument("--arch", help="engine.models architecture (default resnet50)")
    parser.add_argument("--batch-size", type=int, help="images per step per rank (default 256)")
    parser.add_argument("--amp", choices=("bf16", "off"), help="autocast dtype (default bf16)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the step")
    parser.add_argument("--out", type=Path, help="folder for ddp.json and ddp.md")
    args = parser.parse_args(argv)
    opts = Options(**(QUICK if args.quick else {}))
    given = {
        "bucket_mb": tuple(args.bucket_mb) if args.bucket_mb else None,
        "arch": args.arch,
        "batch_size": args.batch_size,
        "amp": args.amp,
        "compile": args.compile or None,
    }
    return dataclasses.replace(opts, **{k: v for k, v in given.items() if v is not None}), args.out


def main(argv: list[str] | None = None) -> None:
    opts, out = parse_args(argv)
    dist = distributed.init("cuda" if torch.cuda.is_available() else "cpu")
    if not dist.active:
        print("benchmarks/ddp.py: one process has no DDP; run it under torchrun with "
              "--nproc_per_node=2 or more", file=sys.stderr)  # fmt: skip
        raise SystemExit(2)
    set_determinism(False, dist.device)  # the engine's default: cuDNN autotuning on CUDA
    if dist.device.type == "cpu":
        torch.set_num_threads(1)  # one core per rank: ranks do not fight over cores
    try:
        rows = [measure(opts, dist, None)]
        rows += [measure(opts, dist, mb) for mb in opts.bucket_mb]
    finally:
        distributed.close(dist)
    if not dist.is_main:
        return
    env = environment(dist.device)
    report = {
        "meta": env,
        "options": dataclasses.asdict(opts),
        "world_size": dist.world_size,
        "backend": dist.backend or "one process",
        "rows": rows,
    }
    slug = env["device"].lower().replace(" ", "-")
    out = out or Path("benchmarks/results") / f"ddp-{dist.world_size}x-{slug}"
    write_results(out, "ddp", report, markdown(report))


if __name__ == "__main__":
    main()
