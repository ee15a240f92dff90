"""Input prefetch to the device, so that preparing the next batches (host-to-device copy, and in
the gpu decode mode decoding and cropping) overlaps the step.

Two ways, chosen by the loader:
- on the side (the default, cheap work): on CUDA, batch i+1's work is queued on a side stream by
  the main thread before batch i is handed over;
- in a thread (`in_thread`, for work that blocks the host, such as nvJPEG's decode): a producer
  thread prepares up to AHEAD batches, on a side stream on CUDA, while the main thread steps.
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import torch

Host = TypeVar("Host")
Batch = tuple[torch.Tensor, torch.Tensor]
Ready = torch.cuda.Event | None

# Batches the producer thread may prepare ahead of the one the step uses: two absorb the jitter
# of a producer that takes about as long per batch as the step (nvJPEG on the H200: ~40 ms per
# 256 images against a 38 ms compiled ResNet-50 step), for two batches of device memory.
AHEAD = 2


def to_device(
    host_batches: Iterable[Host],
    prepare: Callable[[Host], Batch],
    device: torch.device,
    *,
    in_thread: bool = False,
) -> Iterator[Batch]:
    """`prepare(host)` for each host batch, in order, prepared ahead of use: on a CUDA side
    stream, and in a producer thread when `in_thread` (also on the CPU). The host batches are
    always fetched in the calling thread."""
    if in_thread:
        yield from _in_thread(host_batches, prepare, device)
        return
    if device.type != "cuda":
        for host in host_batches:
            yield prepare(host)
        return
    side = _side_stream(device)
    pending: tuple[Batch, Ready] | None = None
    for host in host_batches:
        with torch.cuda.stream(side):
            pending_next = prepare(host), _record(side)
        if pending is not None:
            yield _hand_over(*pending, device)
        pending = pending_next
    if pending is not None:
        yield _hand_over(*pending, device)


def _in_thread(
    host_batches: Iterable[Host], prepare: Callable[[Host], Batch], device: torch.device
) -> Iterator[Batch]:
    """The producer-thread way: one worker thread runs the jobs in submission order, so batches
    come out in order; its exceptions are raised here by `Future.result()`."""
    side = _side_stream(device) if device.type == "cuda" else None

    def job(host: Host) -> tuple[Batch, Ready]:
        if side is None:
            return prepare(host), None
        # The CUDA device and the current stream are per thread: set both in the producer.
        with torch.cuda.device(device), torch.cuda.stream(side):
            return prepare(host), _record(side)

    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch")
    pending: deque[Future] = deque()
    try:
        for host in host_batches:
            pending.append(pool.submit(job, host))
            if len(pending) > AHEAD:
                # Waits (GIL released) only when the producer is behind the step.
                yield _hand_over(*pending.popleft().result(), device)
        while pending:
            yield _hand_over(*pending.popleft().result(), device)
    finally:  # also when the consumer stops early: finish the running job, drop the rest
        pool.shutdown(wait=True, cancel_futures=True)


@functools.cache
def _pool_stream(device: torch.device) -> torch.cuda.Stream:
    """One side stream per device for the whole run. Streams come round-robin from torch's pool
    of 32, which NCCL's and nvJPEG's streams are drawn from too: a new one each epoch would, by
    the 32nd, share one with the all-reduces (correct, but serialised with them)."""
    return torch.cuda.Stream(device)


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    side = _pool_stream(device)
    # Device-side wait, no host sync: work queued so far on the default stream (such as the
    # copies of the normalisation constants) comes before the side stream's.
    side.wait_stream(torch.cuda.current_stream(device))
    return side


def _record(stream: torch.cuda.Stream) -> torch.cuda.Event:
    ready = torch.cuda.Event()
    ready.record(stream)
    return ready


def _hand_over(batch: Batch, ready: Ready, device: torch.device) -> Batch:
    """Make `batch` safe to use on the current stream without a host sync (no-op off CUDA)."""
    if ready is None:
        return batch
    stream = torch.cuda.current_stream(device)
    # Wait for this batch only (an event, not wait_stream: the side stream already holds the
    # next batch's work, which must keep overlapping the step).
    stream.wait_event(ready)
    for t in batch:
        # The tensors were allocated on the side stream: without this the caching allocator
        # could hand their memory to the next side-stream batch while the step still reads it.
        t.record_stream(stream)
    return batch
