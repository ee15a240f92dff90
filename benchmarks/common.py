"""Helpers shared by the benchmark scripts: device facts, peak FLOP/s, and the timed windows."""

from __future__ import annotations

import datetime
import functools
import gc
import itertools
import json
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

# Dense tensor-core peaks in TFLOP/s from NVIDIA's datasheets (their "with sparsity" figures
# halved): (name fragments, bf16 = fp16, TF32). The first entry whose fragments all occur in
# torch.cuda.get_device_name() wins, so the PCIe and NVL cards come before the SXM ones. A100
# names go on with "-" or " " ("NVIDIA A100-SXM4-80GB", "NVIDIA A100 80GB PCIe"), so an
# "RTX A1000" matches nothing.
GPU_PEAKS: tuple[tuple[tuple[str, ...], float, float], ...] = (
    (("H100", "PCIe"), 756.5, 378.0),
    (("H100", "NVL"), 835.5, 417.5),
    (("H100",), 989.4, 494.7),
    (("H200", "NVL"), 835.5, 417.5),
    (("H200",), 989.4, 494.7),
    (("A100-",), 312.0, 156.0),
    (("A100 ",), 312.0, 156.0),
)
AMP_DTYPES = {"off": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def device_name(device: torch.device) -> str:
    """GPU or CPU model name."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "cpu"


def version(package: str) -> str | None:
    """Installed version of a package, None when it is absent (triton on CPU-only torch)."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def environment(device: torch.device) -> dict:
    """Device, library versions, date and commit for a results header."""
    try:
        commit = subprocess.run(
            ["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
    except OSError:  # no git on the machine
        commit = ""
    return {
        "device": device_name(device),
        "device_type": device.type,
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torchvision": version("torchvision"),
        "triton": version("triton"),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "python": platform.python_version(),
        "git_commit": commit or None,
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def write_results(out: Path, stem: str, result: dict, table: str) -> None:
    """Print a report's markdown table and write it with its JSON under `out`."""
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{stem}.md").write_text(table)


def gpu_peak(name: str, amp: str) -> float | None:
    """Datasheet peak FLOP/s of GPU `name` for autocast `amp`; None for an unknown card. amp
    "off" counts TF32: cuDNN runs fp32 convolutions as TF32 by default (cudnn.allow_tf32)."""
    for fragments, half, tf32 in GPU_PEAKS:
        if all(f in name for f in fragments):
            return (tf32 if amp == "off" else half) * 1e12
    return None


@functools.cache
def matmul_flops(device_type: str, amp: str) -> float:
    """FLOP/s of one square matmul in `amp`'s dtype, measured now: n grows until a product
    takes 20 ms (or n = 2048), then the best of three."""
    dtype, device = AMP_DTYPES[amp], torch.device(device_type)
    for n in (256, 512, 1024, 2048):
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        torch.mm(a, b)  # warm-up
        seconds = min(_timed_mm(a, b) for _ in range(3))
        if seconds > 0.02:
            break
    return 2 * n**3 / seconds


def _timed_mm(a: torch.Tensor, b: torch.Tensor) -> float:
    """Seconds of one a @ b."""
    sync(a.device)  # host sync: start from an idle device
    start = time.perf_counter()
    torch.mm(a, b)
    sync(a.device)  # host sync: wait for the product
    return time.perf_counter() - start


def peak_flops(device: torch.device, amp: str) -> tuple[float | None, str]:
    """Peak FLOP/s for autocast `amp` on `device`, and where the figure comes from."""
    if device.type == "cuda":
        return gpu_peak(device_name(device), amp), "datasheet"
    return matmul_flops(device.type, amp), "measured matmul"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_windows(
    run: Callable[[int], None], device: torch.device, warmup: int, repeats: int, steps: int
) -> tuple[float, list[float]]:
    """`run(warmup)` untimed (compilation, autotuning, workers starting), then `repeats` timed
    windows of `run(steps)`. Returns the warm-up seconds and each window's seconds. On CUDA,
    events bracket each window and the only sync is after the last one; the peak memory count
    restarts after the warm-up, so cuDNN's trial workspaces while autotuning do not count."""
    start = time.perf_counter()
    run(warmup)
    sync(device)  # host sync: warm-up ends before timing starts
    warmup_s = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # from what stays allocated: the steady state
    if device.type != "cuda":
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            run(steps)
            seconds.append(time.perf_counter() - start)
        return warmup_s, seconds
    events = [torch.cuda.Event(enable_timing=True) for _ in range(repeats + 1)]
    events[0].record()
    for end in events[1:]:
        run(steps)
        end.record()
    sync(device)  # host sync: once, to read the events
    return warmup_s, [a.elapsed_time(b) / 1e3 for a, b in itertools.pairwise(events)]


def measure(
    make_run: Callable[[], Callable[[int], None]],
    device: torch.device,
    *,
    warmup: int,
    repeats: int,
    steps: int,
    batch_size: int,
) -> dict:
    """Build a run with `make_run()` and time it: images/s (median, min, max, spread in % of
    the median), ms per step, warm-up seconds and peak device memory over the timed windows
    (GiB, CUDA only)."""
    if device.type == "cuda":  # free the previous run's memory before building this one
        gc.collect()
        torch.cuda.empty_cache()
    warmup_s, seconds = time_windows(make_run(), device, warmup, repeats, steps)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {**window_stats(seconds, steps, batch_size), "warmup_s": warmup_s, "peak_mem_gib": peak}


def window_stats(seconds: list[float], steps: int, batch_size: int) -> dict:
    """Timed windows of `steps` steps of `batch_size` images -> images/s (median, min, max,
    spread in % of the median) and ms per step."""
    rates = sorted(steps * batch_size / s for s in seconds)
    median = statistics.median(rates)
    return {
        "img_per_s": median,
        "img_per_s_min": rates[0],
        "img_per_s_max": rates[-1],
        "spread_pct": 100 * (rates[-1] - rates[0]) / median,
        "step_ms": 1e3 * statistics.median(seconds) / steps,
    }
