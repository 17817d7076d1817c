"""``quant(keep=auto)``: which UNet blocks to leave out of int8, chosen by measuring the int8 model itself.

A block is a top-level stage of the network (``down_blocks.i``, ``mid_block``, ``up_blocks.i``). The
search quantizes the model with the real backend once per candidate, each time with that one block kept
in full precision, and measures the relative error of its output against the full-precision network on
held-out calibration inputs (a second draw of the same collector, another seed). Blocks are then kept in
the order of that ranking until the error is at most ``tol``, at most ``max_keep`` of them: ``1 + C + k``
quantizations for C candidates and k kept blocks. On ``zoo:mnist-tiny`` with NNCF the two
highest-resolution stages hold nearly all the error (docs/quantization.md), which no rule of thumb such
as "first and last layer" names.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..denoiser import call_network

Network = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
SKIPPED = ("conv_in", "conv_out", "time_embedding", "class_embedding")  # handled by keep_first_last / keep_time


def candidates(net: nn.Module) -> list[str]:
    """The blocks of ``net`` that hold quantizable layers: the items of its ModuleLists (``down_blocks.0``,
    ...) and its other top-level modules, without the stem, head and time embedding."""
    out = []
    for name, child in net.named_children():
        if name in SKIPPED:
            continue
        parts = [(f"{name}.{i}", m) for i, m in enumerate(child)] if isinstance(child, nn.ModuleList) else [(name, child)]
        out += [n for n, m in parts if any(isinstance(x, (nn.Conv2d, nn.Linear)) for x in m.modules())]
    return out


def outputs(net: Network, xs: torch.Tensor, ts: torch.Tensor, batch: int = 32) -> torch.Tensor:
    """``net`` (a torch module or a runtime network) on the inputs, in batches, as fp32."""
    with torch.no_grad():
        return torch.cat([call_network(net, xs[i:i + batch], ts[i:i + batch]).float() for i in range(0, xs.shape[0], batch)])


def relative_error(net: Network, reference: torch.Tensor, xs: torch.Tensor, ts: torch.Tensor) -> float:
    """‖net − reference‖² / ‖reference‖² over the held-out inputs."""
    return float(((outputs(net, xs, ts) - reference) ** 2).mean() / (reference ** 2).mean().clamp_min(1e-30))


def choose_keep(build: Callable[[tuple[str, ...]], Network], fp_net: nn.Module, held_out, blocks: list[str],
                tol: float = 1e-3, max_keep: int = 3, log: Callable[[str], None] = print) -> tuple[tuple[str, ...], list[dict]]:
    """The blocks to keep (see the module docstring) and the trace of every measured configuration."""
    xs, ts = held_out
    ref = outputs(fp_net, xs, ts)
    trace = []

    def measure(keep: tuple[str, ...]) -> float:
        e = relative_error(build(keep), ref, xs, ts)
        trace.append({"keep": list(keep), "rel_error": e})
        log(f"keep=auto: keep {'+'.join(keep) or 'nothing'}: relative error {e:.2e}")
        return e

    if measure(()) <= tol or max_keep < 1:
        return (), trace
    single = {b: measure((b,)) for b in blocks}
    keep: tuple[str, ...] = ()
    for b in sorted(blocks, key=single.get)[:max_keep]:
        keep += (b,)
        if (single[b] if len(keep) == 1 else measure(keep)) <= tol:
            break
    return keep, trace
