"""Cost of a network: parameters (total and non-zero) and MACs per evaluation."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .denoiser import call_network


def count_params(net: nn.Module) -> dict[str, int]:
    total = sum(p.numel() for p in net.parameters())
    nonzero = sum(int((p != 0).sum()) for p in net.parameters())
    return {"params": total, "params_nonzero": nonzero}


@torch.no_grad()
def macs_per_image(net: nn.Module, shape: tuple[int, int, int], t: float = 500.0) -> int:
    """Multiply-accumulates of one network evaluation at batch 1, counted by torch's
    FlopCounterMode (convolutions, matmuls and attention exactly; MAC = FLOP / 2)."""
    was_training = net.training
    net.eval()
    x = torch.zeros(1, *shape)
    with FlopCounterMode(display=False) as counter:
        call_network(net, x, torch.full((1,), t))
    net.train(was_training)
    return counter.get_total_flops() // 2
