"""Low-rank factor pairs and LoRA adapters (L-Diff §4.4; Hu et al. 2021): the layers that the ``lowrank``
and ``lora`` steps insert, and their replay from the ``lowrank`` / ``lora`` surgery records."""
from __future__ import annotations

import copy
import math

import torch
from torch import nn

from .modules import get_module, set_module


def factor_pair(m: nn.Module, rank: int) -> nn.Sequential:
    """An empty (first, second) pair of the shape that replaces ``m`` at ``rank``, on ``m``'s device."""
    bias = m.bias is not None
    kw = {"device": m.weight.device, "dtype": m.weight.dtype}
    if isinstance(m, nn.Linear):
        return nn.Sequential(nn.Linear(m.in_features, rank, bias=False, **kw),
                             nn.Linear(rank, m.out_features, bias=bias, **kw))
    first = nn.Conv2d(m.in_channels, rank, m.kernel_size, stride=m.stride, padding=m.padding, dilation=m.dilation,
                      bias=False, padding_mode=m.padding_mode, **kw)
    return nn.Sequential(first, nn.Conv2d(rank, m.out_channels, 1, bias=bias, **kw))


class LoRA(nn.Module):
    """``base(x) + scale · up(down(x))`` with ``up`` initialised to zero (Hu et al. 2021, §4.1),
    so a fresh adapter leaves the network unchanged. ``down`` has ``base``'s kernel/stride/padding;
    ``up`` is 1×1 (or a Linear). ``generator`` draws ``down``'s initial weights (a step passes one seeded
    by its seed; a replay from a checkpoint loads the weights over them)."""

    def __init__(self, base: nn.Module, rank: int, scale: float = 1.0, generator: torch.Generator | None = None):
        super().__init__()
        self.base = base
        self.scale = float(scale)
        pair = factor_pair(base, rank)
        self.down, self.up = pair[0], pair[1]
        if self.up.bias is not None:  # the base keeps its bias; the adapter has none
            self.up.bias = None
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5), generator=generator)
        nn.init.zeros_(self.up.weight)

    def forward(self, x):
        return self.base(x) + self.scale * self.up(self.down(x))

    @torch.no_grad()
    def merged(self) -> nn.Module:
        """The base layer with W += scale · B A folded in (same shape as the base)."""
        m = copy.deepcopy(self.base)
        a = self.down.weight.reshape(self.down.weight.shape[0], -1)
        b = self.up.weight.reshape(self.up.weight.shape[0], -1)
        m.weight += (self.scale * b @ a).reshape(m.weight.shape)
        return m


def replay_lowrank(net: nn.Module, rec: dict) -> nn.Module:
    for name, k in rec["layers"].items():
        set_module(net, name, factor_pair(get_module(net, name), int(k)))
    return net


def replay_lora(net: nn.Module, rec: dict) -> nn.Module:
    for name, k in rec["layers"].items():
        base = get_module(net, name)
        set_module(net, name, LoRA(base, int(k), float(rec.get("scales", {}).get(name, 1.0))))
    return net
