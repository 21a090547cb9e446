"""Multi-process fine-tuning on PyTorch's own engine (``torchrun``).

``torchrun --nproc_per_node K -m binarize_cli convert ...`` sets ``WORLD_SIZE``/``RANK``/
``LOCAL_RANK``; :func:`setup` then joins the process group (gloo on CPU, nccl on GPU). Only
rank 0 writes files or prints results; every rank computes.

The device (``convert --device``, :func:`resolve_device`): ``auto`` (the default) is CUDA when
``torch.cuda.is_available()``, else the CPU; ``cuda`` is the current CUDA device (each rank's
``LOCAL_RANK`` under torchrun); ``cuda:N`` names one (refused under torchrun, which gives each
rank its own). The resolved string (``"cpu"``, ``"cuda:0"``) is what every stage uses.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist

from binarize_cli.core.errors import BadInputError

#: What ``--device`` accepts.
DEVICE_FORMS = "auto, cpu, cuda or cuda:N"


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


def _no_cuda(spec: str) -> str:
    why = (
        "this torch is built without CUDA"
        if torch.version.cuda is None
        else "no CUDA device is visible"
    )
    return f"--device {spec}: {why}; use --device cpu (or auto)"


def resolve_device(spec: str) -> str:
    """The torch device string ``--device spec`` means here (see the module doc).

    Raises BadInputError (one line) for a string of no known form, CUDA asked for where
    there is none, or a CUDA index that is not visible. Reads ``WORLD_SIZE``/``LOCAL_RANK``
    (torchrun) and creates no CUDA context.
    """
    text = str(spec).strip().lower()
    match = re.fullmatch(r"(auto|cpu|cuda)(?::(\d+))?", text)
    if match is None or (match.group(2) is not None and match.group(1) != "cuda"):
        raise BadInputError(f"--device must be {DEVICE_FORMS} (got {spec!r})")
    kind, index = match.group(1), match.group(2)
    if kind == "cpu" or (kind == "auto" and not torch.cuda.is_available()):
        return "cpu"
    if not torch.cuda.is_available():
        raise BadInputError(_no_cuda(text))
    count = torch.cuda.device_count()
    torchrun = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if torchrun and index is not None:
        raise BadInputError(
            f"--device {text}: under torchrun each rank uses the GPU of its LOCAL_RANK; "
            "pass --device cuda"
        )
    if torchrun:
        n = int(os.environ.get("LOCAL_RANK", "0"))
    elif index is not None:
        n = int(index)
    else:  # the current device: 0 unless this process already chose another
        n = torch.cuda.current_device() if torch.cuda.is_initialized() else 0
    if n >= count:
        raise BadInputError(
            f"--device {text}: only {count} CUDA device{'s' if count != 1 else ''} visible "
            f"(cuda:0 to cuda:{count - 1})"
        )
    return f"cuda:{n}"


def setup(device: str = "auto") -> DistContext:
    """Join the process group when launched by torchrun (nccl on CUDA, gloo on the CPU); a
    no-op for a single process. ``device`` is ``--device`` (:func:`resolve_device`)."""
    resolved = resolve_device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext(device=resolved)
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = resolved.startswith("cuda")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(local_rank)
    return DistContext(world_size=world, rank=rank, local_rank=local_rank, device=resolved)


def teardown(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()
