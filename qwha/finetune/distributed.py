"""torch.distributed set-up for runs under ``torchrun`` (env RANK / WORLD_SIZE / LOCAL_RANK).

No home-made distribution: the process group is torch's (gloo on CPU, NCCL on CUDA), the wrapper DDP or
FSDP2 (``fully_shard``). A plain ``python`` run is world size 1 and touches none of it.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    created_group: bool  # whether we called init_process_group (destroyed at the process's exit)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_rank() -> int:
    """This process's global rank from the launcher's environment (0 outside torchrun)."""
    return int(os.environ.get("RANK", "0"))


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def resolve_device(device: str | torch.device | None, local_rank: int = 0) -> torch.device:
    """``auto``/None: ``cuda:<local_rank>`` if CUDA is available, else ``cpu``; ``cuda``: its local rank."""
    if isinstance(device, torch.device):
        device = str(device)
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        device = f"cuda:{local_rank}"
    if not (device == "cpu" or device.startswith("cuda:")):
        raise ValueError(f"device={device!r}: allowed values are auto, cpu, cuda, cuda:N")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r}: CUDA is not available on this machine; use device=cpu")
    return torch.device(device)


def setup(device: str | torch.device | None) -> DistEnv:
    """Join the launcher's process group if there is one (gloo on CPU, NCCL on CUDA)."""
    world = env_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world <= 1:
        return DistEnv(0, 1, 0, dev, False)
    created = False
    if not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
            dist.init_process_group("nccl", device_id=dev)
        else:
            dist.init_process_group("gloo")
        created = True
        # Destroyed at exit, not after train(): re-creating the default group in the same process (a
        # second train() call) hangs in torchrun's rendezvous store, so later calls reuse this one.
        atexit.register(_destroy)
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, dev, created)


def all_reduce_sum(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Sum a tensor over processes (identity in a single process)."""
    if env.world_size > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier(env: DistEnv) -> None:
    if env.world_size > 1:
        dist.barrier()


def teardown(env: DistEnv) -> None:
    """End of a successful run: wait for every rank (rank 0 may still be writing the last checkpoint)."""
    barrier(env)


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
