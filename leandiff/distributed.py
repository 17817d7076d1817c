"""Where this process stands under ``torchrun`` / ``accelerate launch``: the one rank/world helper of the
package (training, recipes, evaluation)."""
from __future__ import annotations

import os
from typing import Callable


def rank_world() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; (0, 1) for a plain process."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def lead_and_barrier() -> tuple[bool, Callable[[], None]]:
    """(is this the writing process, barrier): under torchrun (WORLD_SIZE > 1) rank 0 writes and the others
    wait for it at each barrier (gloo, initialised here when needed); otherwise (True, no-op)."""
    if rank_world()[1] <= 1:
        return True, lambda: None
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return dist.get_rank() == 0, dist.barrier
