"""Multi-process fine-tuning on PyTorch's own engine (``torchrun``).

``torchrun --nproc_per_node K -m binarize_cli convert ...`` sets ``WORLD_SIZE``/``RANK``/
``LOCAL_RANK``; :func:`setup` then joins the process group (gloo on CPU, nccl on GPU). Only
rank 0 writes files or prints results; every rank computes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    device: str = "cpu"

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def setup() -> DistContext:
    """Join the process group when launched by torchrun; a no-op for a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        return DistContext(device=device)
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and torch.cuda.device_count() > local_rank
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(local_rank)
    return DistContext(
        world_size=world,
        rank=rank,
        local_rank=local_rank,
        device=f"cuda:{local_rank}" if use_cuda else "cpu",
    )


def teardown(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()
