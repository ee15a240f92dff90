"""The training loop a typical user writes, timed like the engine's step so that every report
carries engine / baseline measured side by side: the same torchvision-built model (via
engine.models), fp32, NCHW, eager, torch.optim.SGD with its defaults, loss.item() every step.

CLI (synthetic data): python benchmarks/baseline.py [--arch resnet50] [--device cuda] ...
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

if not __package__:  # run as a file: import from the repo root, not from benchmarks/
    sys.path[0] = str(Path(__file__).resolve().parents[1])
from benchmarks import common  # noqa: E402
from engine.config import DataConfig  # noqa: E402
from engine.data import build_loaders  # noqa: E402
from engine.distributed import Dist  # noqa: E402
from engine.models import build_model  # noqa: E402


def make_run(
    model: nn.Module, batches: Iterator[tuple[torch.Tensor, torch.Tensor]], device: torch.device
) -> Callable[[int], None]:
    """`run(n)`: n steps of the typical loop over `batches`."""
    model.to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    criterion = nn.CrossEntropyLoss()
    losses: list[float] = []

    def run(n: int) -> None:
        for _ in range(n):
            images, labels = next(batches)
            images, labels = images.to(device), labels.to(device)
            loss = criterion(model(images), labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())  # host sync every step: the usual running-loss log

    return run


def measure(
    arch: str,
    num_classes: int,
    loader,
    device: torch.device,
    *,
    warmup: int,
    repeats: int,
    steps: int,
    batch_size: int,
) -> dict:
    """Time the typical loop on `loader` (an engine train loader built with channels_last off,
    long enough for warmup + repeats * steps steps); common.measure's fields."""

    def build() -> Callable[[int], None]:
        torch.manual_seed(0)
        loader.set_epoch(0)
        return make_run(build_model(arch, num_classes), iter(loader), device)

    return common.measure(
        build, device, warmup=warmup, repeats=repeats, steps=steps, batch_size=batch_size
    )


def main() -> None:
    """Print the baseline's images/s on synthetic data."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    a = parser.parse_args()
    device = torch.device(a.device)
    steps = a.warmup + a.repeats * a.steps
    cfg = DataConfig(
        backend="synthetic", steps_per_epoch=steps, batch_size=a.batch_size, image_size=a.image_size
    )
    dist = Dist(device=device)
    loader, _ = build_loaders(
        cfg, dist=dist, seed=0, num_classes=a.num_classes, channels_last=False
    )
    r = measure(
        a.arch,
        a.num_classes,
        loader,
        device,
        warmup=a.warmup,
        repeats=a.repeats,
        steps=a.steps,
        batch_size=a.batch_size,
    )
    print(
        f"baseline {a.arch} batch {a.batch_size} {a.image_size} px on {common.device_name(device)}:"
        f" {r['img_per_s']:.1f} img/s (min {r['img_per_s_min']:.1f}, max {r['img_per_s_max']:.1f})"
    )


if __name__ == "__main__":
    main()
