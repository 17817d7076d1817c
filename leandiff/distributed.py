"""Where this process stands under ``torchrun`` / ``accelerate launch``: the one rank/world helper of the
package (training, recipes, evaluation)."""
from __future__ import annotations

import os
from typing import Callable


def rank_world() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; (0, 1) for a plain process."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def backend() -> str:
    """The process group's backend: gloo for CPU tensors, and NCCL for CUDA tensors where this rank has a
    GPU (one group serves both: features gathered on the CPU, gradients all-reduced on the GPU)."""
    import torch

    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"


def init_group() -> bool:
    """Initialise the default process group under torchrun when nobody has; True if this call did. With
    GPUs, this rank's is ``LOCAL_RANK`` (set as the current CUDA device first, as NCCL requires)."""
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    dist.init_process_group(backend())
    return True


def lead_and_barrier() -> tuple[bool, Callable[[], None]]:
    """(is this the writing process, barrier): under torchrun (WORLD_SIZE > 1) rank 0 writes and the others
    wait for it at each barrier (the group initialised here when needed, :func:`init_group`); otherwise
    (True, no-op)."""
    if rank_world()[1] <= 1:
        return True, lambda: None
    import torch.distributed as dist

    init_group()
    return dist.get_rank() == 0, dist.barrier
