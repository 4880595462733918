"""Ranks with `torch.distributed`, launched by `torchrun` (or `python -m torch.distributed.run`):
rank and world size from the environment torchrun sets, gloo on CPU and NCCL on GPUs. Nothing
here is specific to one machine: with `--nnodes` and a rendezvous endpoint the same code runs
over several, provided every node sees the output directory (a shared filesystem)."""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from tl_depass.errors import DepassError


@dataclass(frozen=True)
class Ranks:
    rank: int
    world: int
    local_rank: int  # this process's index on its node: its GPU
    started: bool  # whether `start` initialised the process group (and `stop` ends it)

    @property
    def device(self) -> torch.device:
        """Where this rank computes: its own GPU where there are GPUs, else the CPU."""
        return torch.device("cuda", self.local_rank) if torch.cuda.is_available() else torch.device("cpu")


def start() -> Ranks:
    """The process group: the caller's if one is initialised, one started from torchrun's
    environment (WORLD_SIZE > 1), else a single process."""
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size(), local, False)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Ranks(0, 1, 0, False)
    if not dist.is_available():
        raise DepassError("WORLD_SIZE is set but this torch build has no torch.distributed: "
                          "run one process, or install a torch with distributed support")
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return Ranks(dist.get_rank(), dist.get_world_size(), local, True)


def stop(ranks: Ranks) -> None:
    if ranks.started and dist.is_initialized():
        dist.destroy_process_group()


def together(ranks: Ranks, work, on_every_rank: bool = True):
    """`work()` on every rank (or on rank 0 only); if it raises on any rank, every rank raises,
    so that none waits forever for a rank that has stopped. Returns its value (None where it
    did not run)."""
    error, value = None, None
    if on_every_rank or ranks.rank == 0:
        try:
            value = work()
        except Exception as e:  # re-raised below, after the other ranks have heard of it
            error = e
    failed = error is not None
    if ranks.world > 1:
        device = torch.device("cuda", torch.cuda.current_device()) if (
            dist.get_backend() == "nccl") else torch.device("cpu")
        flag = torch.tensor([int(failed)], device=device)
        dist.all_reduce(flag)
        failed = bool(flag.item())
    if error is not None:
        raise error
    if failed:
        raise DepassError("another rank failed (its error is printed above); what was finished "
                          "is kept: rerun the same command to resume")
    return value
