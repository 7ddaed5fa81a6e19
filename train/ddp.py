"""Device selection and DistributedDataParallel set-up for ``haloae-train``.

``torchrun --nproc_per_node=K -m haloae.train.cli ...`` sets RANK / WORLD_SIZE / LOCAL_RANK;
`setup` then joins the process group (nccl on CUDA, gloo on CPU) and picks this rank's
device. Without those variables everything is a single process (world size 1).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from haloae.errors import UserError

_LOG = logging.getLogger(__name__)


class DeviceError(UserError, ValueError):
    """The requested device is not available."""


@dataclass
class DistInfo:
    """Where this process runs and which part of the world it is."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None  # None = not distributed

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` -> a torch device (cuda: one per local rank)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {name}: no CUDA GPU is available here (torch "
                              f"{torch.__version__}); use --device cpu or auto")
        if name == "cuda":
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        return torch.device(name)
    if name != "cpu":
        raise DeviceError(f"--device {name}: use auto, cpu or cuda")
    return torch.device("cpu")


def setup(device: str = "auto") -> DistInfo:
    """Join the torchrun process group if there is one; pick this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    backend = None
    if world > 1:
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        if not dist.is_initialized():
            dist.init_process_group(backend=backend, rank=rank, world_size=world)
        _LOG.info("rank %d/%d on %s (%s)", rank, world, dev, backend)
    return DistInfo(rank, world, local_rank, dev, backend)


def all_mean(values: dict[str, float], info: DistInfo) -> dict[str, float]:
    """Average a dict of floats over all ranks (identity when not distributed)."""
    if not info.distributed or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    t /= info.world_size
    return dict(zip(keys, t.tolist()))


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()
