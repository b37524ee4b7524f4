"""Small collectives over the ``torch.distributed`` group of the trainer's ranks.

NCCL reduces CUDA tensors only (a CPU tensor in a collective of an NCCL-only group is an error), gloo CPU
tensors: :func:`collective_device` says which, and the helpers move their small tensors there and back.
"""

from __future__ import annotations

import torch

__all__ = ["all_gather_int", "any_rank", "collective_device", "world_size"]


def world_size() -> int:
    """The number of ranks of the initialized default group; 1 without one."""
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def collective_device() -> torch.device:
    """Where the default group's collectives take their tensors: this rank's CUDA device for NCCL, else the CPU."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def any_rank(flag: bool, world: int | None = None) -> bool:
    """``flag`` or'ed over the ranks (a collective: every rank calls it; ``world`` defaults to the group's size,
    and 1 returns ``flag`` without communicating).

    Loops whose length depends on a rank's own data (episodes that end early) ask it before stopping, so that
    every rank runs the same iterations: under ZeRO-3 each forward of the policy gathers its parameters in a
    collective, and ranks that stopped at different chunks would pair mismatched collectives."""
    world = world_size() if world is None else world
    if world == 1:
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=collective_device())
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def all_gather_int(value: int, world: int | None = None) -> list[int]:
    """Every rank's ``value``, in rank order (a collective; ``world`` 1 returns ``[value]`` without communicating)."""
    world = world_size() if world is None else world
    if world == 1:
        return [int(value)]
    t = torch.zeros(world, dtype=torch.int64, device=collective_device())
    t[torch.distributed.get_rank()] = int(value)
    torch.distributed.all_reduce(t)  # each rank fills its own slot: the sum is the gathered vector
    return [int(v) for v in t.tolist()]
