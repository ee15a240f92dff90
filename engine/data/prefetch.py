"""Input prefetch to the GPU on a side stream, so that preparing batch i+1 (host-to-device copy,
and in the gpu decode mode decoding and cropping) overlaps step i on the default stream."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

import torch

Host = TypeVar("Host")
Batch = tuple[torch.Tensor, torch.Tensor]


def to_device(
    host_batches: Iterable[Host], prepare: Callable[[Host], Batch], device: torch.device
) -> Iterator[Batch]:
    """`prepare(host)` for each host batch. On CUDA, one batch ahead and on a side stream: the
    next host batch is fetched and its work queued before the current batch is handed over."""
    if device.type != "cuda":
        for host in host_batches:
            yield prepare(host)
        return
    side = torch.cuda.Stream(device)
    # Device-side wait, no host sync: work queued so far on the default stream (such as the
    # copies of the normalisation constants) comes before the side stream's.
    side.wait_stream(torch.cuda.current_stream(device))
    pending: tuple[Batch, torch.cuda.Event] | None = None
    for host in host_batches:
        with torch.cuda.stream(side):
            batch = prepare(host)
            ready = torch.cuda.Event()
            ready.record(side)
        if pending is not None:
            yield _hand_over(*pending, device)
        pending = batch, ready
    if pending is not None:
        yield _hand_over(*pending, device)


def _hand_over(batch: Batch, ready: torch.cuda.Event, device: torch.device) -> Batch:
    """Make `batch` safe to use on the current stream without a host sync."""
    stream = torch.cuda.current_stream(device)
    # Wait for this batch only (an event, not wait_stream: the side stream already holds the
    # next batch's work, which must keep overlapping the step).
    stream.wait_event(ready)
    for t in batch:
        # The tensors were allocated on the side stream: without this the caching allocator
        # could hand their memory to the next side-stream batch while the step still reads it.
        t.record_stream(stream)
    return batch
