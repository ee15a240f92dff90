"""Rank, world and collectives. The only module that reads torchrun's environment.

NCCL when CUDA is used, gloo otherwise. With one process nothing is initialised and every
collective is a no-op, so the same code runs under `python -m` and `torchrun`.
"""

from __future__ import annotations

import datetime
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as tdist

from engine.errors import UserError


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None  # None: a single process, no process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.backend is not None

    def barrier(self) -> None:
        if self.active:
            tdist.barrier()

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum `t` over ranks in place and return it (a host sync for whoever reads it)."""
        if self.active:
            tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
        return t

    def all_reduce_max(self, t: torch.Tensor) -> torch.Tensor:
        """Elementwise max of `t` over ranks, in place (so every rank takes the same decision)."""
        if self.active:
            tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
        return t

    def broadcast_(self, tensors: Iterable[torch.Tensor]) -> None:
        """Rank 0's values of `tensors`, in place on every rank."""
        if self.active:
            for t in tensors:
                tdist.broadcast(t, src=0)

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (run folder names, resume decisions)."""
        if not self.active:
            return obj
        box = [obj]
        tdist.broadcast_object_list(box, src=0)
        return box[0]

    def all_equal(self, t: torch.Tensor) -> bool:
        """Whether `t` is bitwise identical on every rank (masks, checkpoints)."""
        if not self.active:
            return True
        ref = t.clone()
        tdist.broadcast(ref, src=0)
        same = torch.tensor([int(torch.equal(ref, t))], device=t.device)
        tdist.all_reduce(same, op=tdist.ReduceOp.MIN)
        return bool(same.item())


def restart_count() -> int:
    """How often torchrun's elastic agent has restarted this worker group (0 on first start)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def init(device: str = "auto") -> Dist:
    """Join torchrun's process group if there is one; pick the device and backend.

    `device` is "auto" (CUDA if available), "cpu" or "cuda".
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda:
        check_gpu(local_rank, device)
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world == 1:
        return Dist(0, 1, 0, dev, None)
    backend = "nccl" if use_cuda else "gloo"
    timeout = datetime.timedelta(minutes=30)
    tdist.init_process_group(
        backend=backend,
        store=_store(world, timeout),
        rank=rank,
        world_size=world,
        timeout=timeout,
        device_id=dev if use_cuda else None,
    )
    return Dist(rank, world, local_rank, dev, backend)


def check_gpu(local_rank: int, requested: str) -> None:
    """CUDA was asked for (`requested`: cuda, or auto on a machine with CUDA): this process
    needs a GPU of its own, else a user error (not torch's RuntimeError traceback from
    set_device)."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise UserError(
            "recipe key 'run.device': cuda, but torch sees no CUDA GPU here "
            "(use run.device=cpu or auto)"
        )
    if local_rank >= count:
        raise UserError(
            f"recipe key 'run.device': {requested}: local rank {local_rank} needs a GPU of its "
            f"own, but this machine has {count}; start at most {count} processes per node "
            "(torchrun --nproc_per_node)"
        )


def _store(world: int, timeout: datetime.timedelta) -> tdist.Store:
    """The rendezvous store, its keys scoped by elastic restart: after torchrun restarts a
    worker group, the new group must not read the dead group's addresses (seen with gloo:
    'connectFullMesh failed ... Connection refused' on every restart)."""
    store = tdist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world,
        is_master=os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
        and int(os.environ.get("RANK", "0")) == 0,
        timeout=timeout,
    )
    return tdist.PrefixStore(f"/engine/attempt_{restart_count()}", store)


def close(dist: Dist) -> None:
    """Destroy the process group. Older torch (2.4 here; pytorch/pytorch#154976) destroys it
    holding the GIL while it joins the group's threads, which may still need the GIL to free
    the last collective's tensors: a deadlock at exit, seen with gloo. A sleep releases the
    GIL first, so those threads finish."""
    if dist.active and tdist.is_initialized():
        time.sleep(0.05)
        tdist.destroy_process_group()
