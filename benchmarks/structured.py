"""Structured pruning pays off in speed: training-step images/s of a dense model and of the same
model after PFEC filter pruning (engine.prune.structured_prune_), measured side by side with the
engine's own step. `python benchmarks/structured.py [--device cpu|cuda] [--out DIR]`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repo root, not benchmarks/
from benchmarks.common import environment, measure, write_results  # noqa: E402
from engine import optim, prune, train  # noqa: E402
from engine.config import OptimConfig, PrecisionConfig  # noqa: E402
from engine.distributed import Dist  # noqa: E402
from engine.models import build_model  # noqa: E402
from engine.run import set_determinism  # noqa: E402

# (arch, classes, image size, batch, [(PFEC fractions or setting, round_to)]): the CIFAR net of
# the paper's table, and ResNet-50 with 30% or 25% of the inner filters of its first three
# stages removed. 30% keeps 44/89/179 of 64/128/256 filters, which tensor-core convolutions take
# slower kernels for (0.77x dense on an H200); round_to 8 makes that 48/88/176; 25% keeps
# 48/96/192.
R50_30 = [0.3, 0.3, 0.3, 0.0]
CASES = {
    "cpu": [("resnet56", 10, 32, 64, [("B", 1)])],
    "cuda": [
        ("resnet56", 10, 32, 256, [("B", 1), ("B", 8)]),
        ("resnet50", 1000, 224, 128, [(R50_30, 1), (R50_30, 8), ([0.25, 0.25, 0.25, 0.0], 1)]),
    ],
}


def step_rate(model: torch.nn.Module, size: int, batch: int, device: torch.device) -> dict:
    """Images/s of the engine's training step (eager, channels_last, bf16 on CUDA)."""
    amp = "bf16" if device.type == "cuda" else "off"
    precision = PrecisionConfig(amp=amp, channels_last=True, compile=False)
    model.to(device, memory_format=torch.channels_last)
    opt = optim.build(model, OptimConfig())
    step = train.make_step(
        train.wrap(model, precision, Dist(device=device)), opt, None, 0.0,
        train.amp_dtype(precision), device.type,
    )  # fmt: skip
    images = torch.randn(batch, 3, size, size, device=device)  # in the autocast dtype, as loaded
    images = images.to(
        train.amp_dtype(precision) or torch.float32, memory_format=torch.channels_last
    )
    labels = torch.randint(0, 10, (batch,), device=device)

    def make_run():
        def run(n: int) -> None:
            for _ in range(n):
                step(images, labels)

        return run

    steps = 10 if device.type == "cuda" else 2
    return measure(make_run, device, warmup=3, repeats=5, steps=steps, batch_size=batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    default = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", choices=["cpu", "cuda"], default=default)
    parser.add_argument("--out", type=Path, help="also write structured_<device>.{json,md} here")
    args = parser.parse_args()
    device = torch.device(args.device)
    set_determinism(False, device)  # the engine's default: cuDNN autotuning on CUDA
    if device.type == "cpu":
        torch.set_num_threads(1)  # steadier on a shared machine
    env = environment(device)
    lines = [
        f"Training step, dense vs PFEC filter-pruned: {env['device']}, torch {env['torch']}, "
        f"{env['date_utc']}",
        "",
        "| arch | pruning | MACs/image | img/s | speed-up |",
        "|---|---|---:|---:|---:|",
    ]
    print("\n".join(lines), flush=True)  # then each row as it is measured: a timeout keeps them
    rows = []
    for arch, classes, size, batch, amounts in CASES[device.type]:
        torch.manual_seed(0)
        dense = build_model(arch, classes)
        models = {"dense": dense}
        for amount, round_to in amounts:
            pruned = build_model(arch, classes)
            pruned.load_state_dict(dense.state_dict())
            prune.structured_prune_(pruned, arch, "l1_filter", amount, round_to=round_to)
            rounded = f", round_to {round_to}" if round_to > 1 else ""
            models[f"l1_filter {amount}{rounded}"] = pruned
        rates = {}
        for name, model in models.items():
            macs = prune.count_flops(model, size)[0]
            rates[name] = step_rate(model, size, batch, device)["img_per_s"]
            speedup = rates[name] / rates["dense"]
            rows.append({"arch": arch, "pruning": name, "macs": macs, "img_per_s": rates[name]})
            lines.append(
                f"| {arch} | {name} | {macs / 1e6:.1f} M | {rates[name]:.0f} | {speedup:.2f}x |"
            )
            print(lines[-1], flush=True)
            model.cpu()  # frees the device for the next model
    if args.out is not None:
        table = "\n".join(lines) + "\n"
        write_results(args.out, f"structured_{device.type}", {**env, "rows": rows}, table)


if __name__ == "__main__":
    main()
