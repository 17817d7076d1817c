"""Reduced-precision execution of a network: bf16 autocast with fp32 outputs (the ``bf16`` runtime, and
cached networks under ``cache(bf16=true)``)."""
from __future__ import annotations

import torch
from torch import nn

from .denoiser import call_network


class Autocast(nn.Module):
    """Run a network under ``torch.autocast`` and hand back fp32 outputs."""

    def __init__(self, net: nn.Module, device_type: str | None = None, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.net = net
        self.device_type = device_type  # None: the input's device (autocast follows the device it runs on)
        self.dtype = dtype

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if x.device.type == "meta":  # shapes only (the device plumbing tests): autocast has no meta backend
            return call_network(self.net, x, t).float()
        with torch.autocast(self.device_type or x.device.type, dtype=self.dtype):
            out = call_network(self.net, x, t)
        return out.float()
