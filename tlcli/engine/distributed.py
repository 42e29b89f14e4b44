"""Running under torchrun: which process this is, and the few collectives tl needs.

torchrun (`torch.distributed.run`) starts the processes and sets WORLD_SIZE,
RANK and LOCAL_RANK; tl reads them, puts each process on its own device
(`cuda:LOCAL_RANK`, or the CPU) and joins the process group: nccl on CUDA,
gloo on the CPU. Without those variables every call here is a no-op, so the
single-process path is the same code with a world of one.

A rank that dies makes the others fail in their next collective (gloo sees the
closed connection; otherwise the process-group timeout, `distributed.timeout_s`,
bounds the wait), and torchrun then stops the whole group.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterator, Optional

from tlcli.errors import RunError


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def __str__(self) -> str:
        return f"rank {self.rank}/{self.world}"


def current() -> Dist:
    """This process, from torchrun's environment (a world of one without it). Imports no torch."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise RunError("WORLD_SIZE, RANK and LOCAL_RANK must be integers (torchrun sets them)") from None
    if world < 1 or not 0 <= rank < world:
        raise RunError(f"RANK {rank} is outside WORLD_SIZE {world}")
    return Dist(rank, world, local)


def init(device, timeout_s: int) -> Dist:
    """Join the process group once (nccl on CUDA, gloo on the CPU); the device is this rank's."""
    import torch
    import torch.distributed as tdist

    dist = current()
    if dist.enabled and not tdist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        with collective("joining the process group"):
            tdist.init_process_group(backend, timeout=timedelta(seconds=timeout_s),
                                     device_id=device if device.type == "cuda" else None)
    return dist


def shutdown() -> None:
    import torch.distributed as tdist

    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()


@contextlib.contextmanager
def session() -> Iterator[None]:
    """Around a command: the process group, if one was joined, is left cleanly at the end."""
    try:
        yield
    finally:
        if current().enabled:
            shutdown()


@contextlib.contextmanager
def collective(what: str) -> Iterator[None]:
    """A failed collective is a lost peer (a dead rank, a timeout), said in one line."""
    try:
        yield
    except RuntimeError as err:  # DistBackendError, DistNetworkError and gloo's errors subclass it
        first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        raise RunError(f"{current()}: lost the other ranks while {what} ({first}); a rank died or timed out. "
                       "Fix it and rerun; `tl fit --resume` continues from the last epoch") from None


def _active() -> bool:
    import torch.distributed as tdist

    return current().enabled and tdist.is_available() and tdist.is_initialized()


def barrier(what: str) -> None:
    if _active():
        import torch.distributed as tdist

        with collective(what):
            tdist.barrier()


def broadcast(obj: Any, what: str) -> Any:
    """Rank 0's `obj` on every rank."""
    if not _active():
        return obj
    import torch.distributed as tdist

    box = [obj]
    with collective(what):
        tdist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj: Any, what: str) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    if not _active():
        return [obj]
    import torch.distributed as tdist

    found: list[Optional[Any]] = [None] * current().world
    with collective(what):
        tdist.all_gather_object(found, obj)
    return found


def sum_over_ranks(values: list[float], device) -> list[float]:
    """Element-wise sums across ranks (float64, so that counts stay exact)."""
    if not _active():
        return values
    import torch
    import torch.distributed as tdist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    with collective("summing metrics"):
        tdist.all_reduce(t)
    return t.tolist()
