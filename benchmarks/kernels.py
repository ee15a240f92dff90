"""Time one masked SGD step over ResNet-50's parameters: our kernel vs the usual ways to mask."""

import argparse
import datetime
import gc
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn
from torch.nn.utils import prune

# This script shares its name with the package it measures: search the repo root, not benchmarks/.
sys.path[0] = str(Path(__file__).resolve().parents[1])
import kernels  # noqa: E402
from benchmarks.common import device_name, version, write_results  # noqa: E402

SPARSITY = 0.8  # unstructured, random, on every conv weight
LR, MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 1e-4


def _model(device: torch.device) -> nn.Module:
    """torchvision ResNet-50 (random init), channels_last like the engine trains it."""
    return torchvision.models.resnet50().to(device, memory_format=torch.channels_last)


def _keep_masks(model: nn.Module, seed: int = 0) -> dict[nn.Module, Tensor]:
    """Random uint8 keep-masks (1 - SPARSITY kept) for every conv weight, in its memory format."""
    gen = torch.Generator().manual_seed(seed)
    return {
        m: (torch.rand(m.weight.shape, generator=gen) >= SPARSITY)
        .to(m.weight.device, torch.uint8)
        .contiguous(memory_format=torch.channels_last)
        for m in model.modules()
        if isinstance(m, nn.Conv2d)
    }


def _must_move(model: nn.Module, masks: dict[nn.Module, Tensor]) -> int:
    """Bytes an update must move: read w, grad, buf (+ uint8 mask), write w, buf."""
    params = sum(p.numel() * p.element_size() * 5 for p in model.parameters())
    return params + sum(m.numel() for m in masks.values())


def _median_seconds(step: Callable[[], None], device: torch.device, repeats: int) -> float:
    """Median wall time of step(), host work included; warm-up (and Triton compilation) is
    outside the timed region."""
    for _ in range(3):
        step()
    if device.type != "cuda":
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        return statistics.median(times)
    return _event_median(step, repeats)


def _event_median(launch: Callable[[], None], repeats: int) -> float:
    """Median seconds between CUDA events around each launch(), starting on an idle stream."""
    torch.cuda.synchronize()  # host sync: start the timed steps on an idle stream
    pairs = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        for _ in range(repeats)
    ]
    for start, end in pairs:
        start.record()
        launch()
        end.record()
    torch.cuda.synchronize()  # host sync: once, after all repeats, to read the events
    return statistics.median(s.elapsed_time(e) / 1e3 for s, e in pairs)


def _graph_seconds(step: Callable[[], None], repeats: int) -> float | None:
    """Median device time of step() captured once in a CUDA graph and replayed: the host's
    launch cost left out. None if step() cannot be captured."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # capture needs one run on a side stream first
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            step()
    except Exception as e:  # noqa: BLE001 - any failure to capture: report n/a, go on
        print(f"  not capturable: {str(e).splitlines()[0][:120]}")
        return None
    graph.replay()
    return _event_median(graph.replay, repeats)


def _with_grads(model: nn.Module) -> list[nn.Parameter]:
    """The model's parameters, each given a random grad in its own memory format."""
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn_like(p)
    return params


def bench_ours(device: torch.device, masked: bool = True) -> tuple[Callable[[], None], int]:
    """(a) kernels.masked_sgd_: the Triton kernel on CUDA, its torch foreach path on CPU; and
    the bytes a masked step must move. masked=False passes no masks: the time a mask that cost
    nothing to read would allow, the bound on what a smaller (bit-packed) mask could gain."""
    model = _model(device)
    masks = _keep_masks(model)
    params = _with_grads(model)
    ws = [p.detach() for p in params]
    gs = [p.grad for p in params]
    bufs = [torch.zeros_like(w) for w in ws]
    by_param = {id(m.weight): k for m, k in masks.items()}
    ms = [by_param.get(id(p)) if masked else None for p in params]
    lr = torch.tensor(LR, device=device)
    update = kernels.masked_sgd_ if device.type == "cuda" else kernels.masked_sgd_torch_
    step = lambda: update(
        ws, gs, bufs, ms, lr=lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, nesterov=False
    )
    return step, _must_move(model, masks)


def bench_fused_sgd_two_passes(device: torch.device) -> Callable[[], None]:
    """(b) torch fused SGD, with one _foreach_mul_ of grads by masks before, of weights after."""
    model = _model(device)
    masks = _keep_masks(model)
    params = _with_grads(model)
    pruned = [m.weight for m in masks]
    keep = [k.to(m.weight.dtype) for m, k in masks.items()]  # same dtype: foreach fast path
    opt = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, fused=True)

    @torch.no_grad()
    def step() -> None:
        torch._foreach_mul_([p.grad for p in pruned], keep)
        opt.step()
        torch._foreach_mul_(pruned, keep)

    return step


def bench_prune_hooks(device: torch.device) -> Callable[[], None]:
    """(c) torch.nn.utils.prune masks: foreach SGD on weight_orig, then every module's pre-hook."""
    model = _model(device)
    masks = _keep_masks(model)
    for m, k in masks.items():
        prune.custom_from_mask(m, "weight", k.to(m.weight.dtype))
    hooks = [
        (m, h)
        for m in masks
        for h in m._forward_pre_hooks.values()
        if isinstance(h, prune.BasePruningMethod)
    ]
    opt = torch.optim.SGD(
        _with_grads(model), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, foreach=True
    )

    def step() -> None:
        opt.step()
        for m, h in hooks:  # what the next forward pays: weight = weight_orig * weight_mask
            h(m, None)

    return step


def bench_apex_asp_loop(device: torch.device) -> Callable[[], None]:
    """(d) apex ASP style: per-parameter grad.mul_(mask), single-tensor SGD, p.mul_(mask)."""
    model = _model(device)
    masks = {m.weight: k.bool() for m, k in _keep_masks(model).items()}  # ASP keeps bool masks
    opt = torch.optim.SGD(
        _with_grads(model), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, foreach=False
    )

    @torch.no_grad()
    def step() -> None:
        for p, k in masks.items():
            p.grad.mul_(k)
        opt.step()
        for p, k in masks.items():
            p.mul_(k)

    return step


def bench_copy(device: torch.device, nbytes: int) -> Callable[[], None]:
    """A device-to-device copy that moves nbytes (half read, half written), random data."""
    src = torch.rand(nbytes // 8, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def render(result: dict) -> str:
    """The markdown table of a result; on CUDA also sets result["kernel_over_copy"]: the
    kernel's device-time GB/s over the copy's best. The copy is one launch, timed both ways;
    captured in a graph it became a slower copy-engine transfer (H200, 2026-11-27)."""
    methods, copy = result["methods"], result["copy"]
    lines = [
        f"Masked SGD step, ResNet-50, {result['sparsity']:.0%} sparse convs, "
        f"{result['bytes_per_step'] / 1e6:.0f} MB must move",
        f"{result['device']}, torch {result['torch']}, triton {result['triton']}, "
        f"{result['date_utc']}, median of {result['repeats']}",
        "",
    ]
    if copy is None:
        lines += ["| method | ms/step | effective GB/s |", "|---|---:|---:|"]
        lines += [f"| {n} | {r['ms']:.3f} | {r['GB/s']:.1f} |" for n, r in methods.items()]
        return "\n".join(lines) + "\n"
    lines += [
        "ms/step: CUDA events around each call, host work included. graph: the same step",
        "captured in a CUDA graph and replayed, the device's time alone.",
        "",
        "| method | ms/step | GB/s | graph ms | graph GB/s |",
        "|---|---:|---:|---:|---:|",
    ]
    for n, r in {**methods, "device-to-device copy": copy}.items():
        graph = f"{r['graph_ms']:.3f} | {r['graph_GB/s']:.0f}" if "graph_ms" in r else "n/a | n/a"
        lines.append(f"| {n} | {r['ms']:.3f} | {r['GB/s']:.0f} | {graph} |")
    ours = next(iter(methods.values()))
    copy_best = max(copy["GB/s"], copy.get("graph_GB/s", 0.0))
    device_gbs = ours.get("graph_GB/s", ours["GB/s"])
    result["kernel_over_copy"] = device_gbs / copy_best
    lines += [
        "",
        f"kernel (device time) / best copy: {result['kernel_over_copy']:.1%} (target >= 85%); "
        f"with the host's launch work: {ours['GB/s'] / copy_best:.1%}",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    """Run every method on one device, print a markdown table, write it and JSON to --out."""
    parser = argparse.ArgumentParser(description=__doc__)
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", choices=["cpu", "cuda"], default=default_device)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    device = torch.device(args.device)

    step, nbytes = bench_ours(device)
    path = "Triton" if device.type == "cuda" else "foreach"
    benches = {f"(a) kernels.masked_sgd_ ({path})": lambda device: step}
    benches["(a0) the same, masks not read (bound for smaller masks)"] = lambda device: bench_ours(
        device, masked=False
    )[0]
    benches["(b) fused SGD + 2 _foreach_mul_ mask passes"] = bench_fused_sgd_two_passes
    benches["(c) foreach SGD + prune hooks recompute"] = bench_prune_hooks
    benches["(d) apex ASP per-parameter loop"] = bench_apex_asp_loop
    if device.type == "cuda":
        benches["device-to-device copy"] = lambda device: bench_copy(device, nbytes)
    methods = {}
    for name, bench in benches.items():
        gc.collect()
        run = bench(device)
        seconds = _median_seconds(run, device, args.repeats)
        methods[name] = {"ms": seconds * 1e3, "GB/s": nbytes / seconds / 1e9}
        graph = _graph_seconds(run, args.repeats) if device.type == "cuda" else None
        if graph is not None:
            methods[name].update({"graph_ms": graph * 1e3, "graph_GB/s": nbytes / graph / 1e9})
        print(f"{name}: {methods[name]['ms']:.3f} ms", flush=True)  # a timeout keeps these
        del run
    copy = methods.pop("device-to-device copy", None)

    result = {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": version("triton"),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "repeats": args.repeats,
        "sparsity": SPARSITY,
        "bytes_per_step": nbytes,
        "methods": methods,
        "copy": copy,
    }
    write_results(args.out, f"masked_sgd_{device.type}", result, render(result))


if __name__ == "__main__":
    main()
