"""Runtimes: how a checkpoint's network is executed.

A runtime is a function ``checkpoint -> network``, where the network is any callable
``(x, t) -> output`` that a :class:`~leandiff.denoiser.Denoiser` can wrap. Samplers, metrics and
cost measurements take the result unchanged. Registered by name in :data:`RUNTIMES`; other
stages add theirs (ONNX Runtime fp32 / int8, ``torch.compile``) with :func:`register_runtime`.

Each runtime function carries a one-line ``description`` attribute saying what it is, so reports
can label speed-ups (and fake-quant simulation, which saves no time) honestly.
"""
from __future__ import annotations

import re
from typing import Callable

import torch
from torch import nn

from .denoiser import Denoiser, call_network
from .errors import UserError

Runtime = Callable[["Checkpoint"], Callable]  # noqa: F821  (leandiff.checkpoint.Checkpoint)


def eager(ckpt) -> nn.Module:
    """PyTorch eager in fp32: the reference every other runtime is compared against."""
    net = ckpt.net.float().eval()
    return net


eager.description = "PyTorch eager, fp32 (reference)"


class Autocast(nn.Module):
    """Run a network under ``torch.autocast`` and hand back fp32 outputs."""

    def __init__(self, net: nn.Module, device_type: str = "cpu", dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.net = net
        self.device_type = device_type
        self.dtype = dtype

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device_type, dtype=self.dtype):
            out = call_network(self.net, x, t)
        return out.float()


def bf16(ckpt) -> nn.Module:
    """fp32 weights, bf16 autocast on CPU (matmuls and convolutions in bf16, fp32 outputs)."""
    return Autocast(ckpt.net.float().eval(), "cpu", torch.bfloat16)


bf16.description = "PyTorch eager, bf16 autocast (CPU)"

RUNTIMES: dict[str, Runtime] = {
    "eager": eager,
    "bf16": bf16,
}


def register_runtime(name: str, fn: Runtime, description: str | None = None) -> None:
    """Add a runtime; ``description`` defaults to the function's own or its docstring's first line."""
    if name in RUNTIMES and RUNTIMES[name] is not fn:
        raise ValueError(f"runtime {name!r} is already registered")
    if description is not None:
        fn.description = description
    elif not hasattr(fn, "description"):
        fn.description = (fn.__doc__ or name).strip().splitlines()[0]
    RUNTIMES[name] = fn


def get_runtime(name: str) -> Runtime:
    if name not in RUNTIMES:
        from .recipe import _load_steps

        _load_steps()  # the compression modules register their runtimes (ort, ort-int8, fake-quant, ...) on import
    try:
        return RUNTIMES[name]
    except KeyError:
        # families registered for k = 1, 2, ... (cache:2, cache-nu:3) are listed once, as NAME:K
        known = sorted({re.sub(r":\d+$", ":K", n) for n in RUNTIMES})
        raise UserError(f"unknown runtime {name!r}; known: {', '.join(known)}") from None


def runtime_network(ckpt, name: str = "eager") -> Callable:
    """The checkpoint's network prepared for execution by runtime ``name``."""
    return get_runtime(name)(ckpt)


def runtime_denoiser(ckpt, name: str = "eager") -> Denoiser:
    """A Denoiser over the checkpoint's network executed by runtime ``name``."""
    return Denoiser(runtime_network(ckpt, name), ckpt.schedule, ckpt.parameterization)
