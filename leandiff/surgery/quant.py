"""The fake-quantized layer and its quantizer: what a ``quant`` surgery record replays.

The uniform quantizer ŵ = s·clip(round(w/s), c_min, c_max) (MiniDiff, Alg. 2) — :func:`fake_quant`;
observers (range estimators) ``minmax``, ``percentile``, ``mse`` — :data:`OBSERVERS`; the
:class:`QuantLayer` wrapper with one activation scale per timestep group; :class:`QuantConfig`; and
:func:`wrap_network`, which the ``quant`` step and the replay share. Calibration lives in
:mod:`leandiff.compress.calibration`, AdaRound and bias correction in :mod:`leandiff.compress.quant`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from .modules import set_module

# --- the quantizer ---------------------------------------------------------------------------------------------------


def int_range(bits: int, signed: bool) -> tuple[int, int]:
    """(c_min, c_max) of a ``bits``-bit integer grid."""
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)


def fake_quant(x: torch.Tensor, s: torch.Tensor, z: torch.Tensor | float, c_min: int, c_max: int) -> torch.Tensor:
    """x̂ = s·(clip(round(x/s) + z, c_min, c_max) − z)  (MiniDiff Alg. 2 with a zero point z; z = 0 is
    the symmetric case written there as ŵ = s·clip(round(w/s), c_min, c_max)). Inside the clipping
    range |x̂ − x| ≤ s/2."""
    return s * (torch.clamp(torch.round(x / s) + z, c_min, c_max) - z)


def symmetric_scale(absmax: torch.Tensor, bits: int) -> torch.Tensor:
    return torch.clamp(absmax, min=1e-8) / int_range(bits, True)[1]


def affine_params(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point of an unsigned grid covering [lo, hi] (lo ≤ 0 ≤ hi enforced, so 0
    is exact, as in every int8 runtime)."""
    lo, hi = torch.clamp(lo, max=0.0), torch.clamp(hi, min=0.0)
    s = torch.clamp(hi - lo, min=1e-8) / int_range(bits, False)[1]
    return s, torch.round(-lo / s)


# --- observers: values -> clipping range ------------------------------------------------------------------------------

def _minmax(v: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    return v.min(), v.max()


def _percentile(v: torch.Tensor, bits: int, q: float = 0.9999) -> tuple[torch.Tensor, torch.Tensor]:
    v = v.flatten().float()
    return torch.quantile(v, 1 - q), torch.quantile(v, q)


def _mse(v: torch.Tensor, bits: int, grid: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    """The shrunk min-max range α·[lo, hi] (α in (0, 1]) with the least quantize-dequantize MSE."""
    lo, hi = v.min(), v.max()
    best, arg = float("inf"), (lo, hi)
    for a in torch.linspace(0.3, 1.0, grid):
        s, z = affine_params(a * lo, a * hi, bits)
        err = (fake_quant(v, s, z, *int_range(bits, False)) - v).pow(2).mean().item()
        if err < best:
            best, arg = err, (a * lo, a * hi)
    return arg


OBSERVERS: dict[str, Callable] = {"minmax": _minmax, "percentile": _percentile, "mse": _mse}


def weight_scale(w: torch.Tensor, bits: int, per_channel: bool, observer: str) -> torch.Tensor:
    """Symmetric weight scale per output channel (dim 0) or per tensor; ``mse`` searches a clipping
    ratio per channel, other observers use max |w|."""
    flat = w.detach().reshape(w.shape[0], -1) if per_channel else w.detach().reshape(1, -1)
    absmax = flat.abs().amax(dim=1)
    s = symmetric_scale(absmax, bits)
    if observer == "mse":
        c_min, c_max = int_range(bits, True)
        best = torch.full_like(absmax, float("inf"))
        for a in torch.linspace(0.3, 1.0, 40):
            sa = symmetric_scale(a * absmax, bits)
            err = (fake_quant(flat, sa[:, None], 0.0, c_min, c_max) - flat).pow(2).mean(dim=1)
            better = err < best
            best, s = torch.where(better, err, best), torch.where(better, sa, s)
    return s


# --- the quantized layer wrapper ---------------------------------------------------------------------------------------

def layer_op(inner: nn.Module, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``inner`` (a Conv2d or Linear) applied to ``x`` with weight ``w`` in place of its own (same bias)."""
    if isinstance(inner, nn.Conv2d):
        return F.conv2d(x, w, inner.bias, inner.stride, inner.padding, inner.dilation, inner.groups)
    return F.linear(x, w, inner.bias)


class QuantLayer(nn.Module):
    """A Conv2d or Linear whose weights are fake-quantized (symmetric, per channel or per tensor, 2–8
    bits) and whose input activation is fake-quantized (affine, per tensor, 4–16 bits), with one
    activation scale per timestep group. Scales are buffers, so they save and load with the weights."""

    def __init__(self, inner: nn.Module, w_bits: int, a_bits: int, per_channel: bool, groups: int):
        super().__init__()
        self.inner = inner
        self.w_bits, self.a_bits, self.per_channel = w_bits, a_bits, per_channel
        out_ch = inner.weight.shape[0] if per_channel else 1
        dev = inner.weight.device  # inserted into a network on a device: the scales live there too
        self.register_buffer("w_scale", torch.ones(out_ch, device=dev))
        self.register_buffer("a_scale", torch.ones(groups, device=dev))
        self.register_buffer("a_zero", torch.zeros(groups, device=dev))
        self.group: torch.Tensor | None = None  # per-sample timestep group, set by the network's pre-hook
        self.record: list | None = None  # during calibration: (group per sample, input) pairs

    def _qweight(self) -> torch.Tensor:
        w = self.inner.weight
        s = self.w_scale.reshape((-1,) + (1,) * (w.ndim - 1))
        return fake_quant(w, s, 0.0, *int_range(self.w_bits, True))

    def _qinput(self, x: torch.Tensor) -> torch.Tensor:
        g = self.group
        if g is None or g.numel() != x.shape[0]:
            g = torch.zeros(x.shape[0], dtype=torch.long, device=x.device) if g is None else g[:1].expand(x.shape[0])
        shape = (-1,) + (1,) * (x.ndim - 1)
        s, z = self.a_scale[g].reshape(shape), self.a_zero[g].reshape(shape)
        return fake_quant(x, s, z, *int_range(self.a_bits, False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.record is not None:  # calibration: full precision, remember the inputs
            self.record.append((self.group, _subsample(x)))
            return self.inner(x)
        return layer_op(self.inner, self._qinput(x), self._qweight())


def _subsample(x: torch.Tensor, k: int = 4096) -> torch.Tensor:
    """Per sample: its exact min and max plus ≤ k random values (bounded memory for percentile/MSE)."""
    flat = x.detach().reshape(x.shape[0], -1) if x.ndim > 1 else x.detach()[:, None]
    if flat.shape[1] > k:
        idx = torch.randint(0, flat.shape[1], (k,), generator=torch.Generator().manual_seed(flat.shape[1]))
        flat = torch.cat([flat[:, idx], flat.amin(1, keepdim=True), flat.amax(1, keepdim=True)], dim=1)
    return flat.float().clone()


# --- configuration ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class QuantConfig:
    w_bits: int = 8  # weight bits, 2..8 (symmetric, signed grid)
    a_bits: int = 8  # activation bits, 4..16 (affine, unsigned grid)
    per_channel: bool = True  # weight scale per output channel (else one per tensor)
    observer: str = "minmax"  # activation range estimator: minmax | percentile | mse
    w_observer: str = "minmax"  # weight range estimator: minmax | mse
    keep_first_last: bool = True  # conv_in and conv_out stay full precision
    keep_time: bool = True  # the time-embedding MLP stays full precision
    keep: tuple[str, ...] = ()  # more modules (and everything under them) kept full precision, by path
    t_groups: int = 1  # activation scales per timestep group (1 = one scale for all t)
    w_round: str = "nearest"  # weight rounding: nearest | adaround (learned on the calibration set)
    bias_correction: bool = False  # remove each layer's mean output shift from quantization (Nagel et al. 2019)
    adaround_iters: int = 400  # AdaRound optimisation steps per layer

    def __post_init__(self):
        if not 2 <= self.w_bits <= 8:
            raise UserError(f"quant: w must be 2..8 bits, got {self.w_bits}")
        if not 4 <= self.a_bits <= 16:
            raise UserError(f"quant: a must be 4..16 bits, got {self.a_bits}")
        if self.observer not in OBSERVERS:
            raise UserError(f"quant: unknown observer {self.observer!r}; known: {', '.join(OBSERVERS)}")
        if self.w_observer not in ("minmax", "mse"):
            raise UserError(f"quant: unknown weight observer {self.w_observer!r}; known: minmax, mse")
        if self.t_groups < 1:
            raise UserError(f"quant: t_groups must be >= 1, got {self.t_groups}")
        if self.w_round not in ("nearest", "adaround"):
            raise UserError(f"quant: unknown w_round {self.w_round!r}; known: nearest, adaround")
        if self.adaround_iters < 1:
            raise UserError(f"quant: adaround_iters must be >= 1, got {self.adaround_iters}")
        object.__setattr__(self, "keep", tuple(self.keep))  # a list when read back from JSON


def parse_keep(text: str) -> tuple[str, ...]:
    """``keep=down_blocks.0+up_blocks.2``: module paths joined by ``+`` (empty: none)."""
    parts = tuple(p for p in text.split("+") if p)
    bad = [p for p in parts if not all(seg.isidentifier() or seg.isdigit() for seg in p.split("."))]
    if bad:
        raise UserError(f"quant: keep takes module paths joined by '+', e.g. down_blocks.0+up_blocks.2; got {bad[0]!r}")
    return parts


def check_keep(net: nn.Module, keep: tuple[str, ...]) -> None:
    """Every kept path names a module of ``net`` (a typo would silently keep nothing)."""
    names = {n for n, _ in net.named_modules()}
    missing = [k for k in keep if k not in names]
    if missing:
        top = ", ".join(f"{n}.0..{len(m) - 1}" if isinstance(m, nn.ModuleList) else n for n, m in net.named_children())
        raise UserError(f"quant: keep={missing[0]} is no module of this network (its top-level modules: {top})")


def in_kept(path: str, keep: tuple[str, ...]) -> bool:
    """Whether a module path, or an exported node's name that holds one (ONNX ``/down_blocks.0/resnets.0/
    conv1/Conv``, OpenVINO ``__module.net.down_blocks.0/aten::...``), lies under a kept module."""
    dotted = "." + path.replace("/", ".") + "."
    return any(f".{k}." in dotted for k in keep)


def quantizable(net: nn.Module, cfg: QuantConfig) -> list[str]:
    """Names of the Conv2d/Linear modules to quantize under ``cfg``'s keep-in-fp32 options."""
    names = []
    for name, m in net.named_modules():
        if not isinstance(m, (nn.Conv2d, nn.Linear)):
            continue
        if cfg.keep_first_last and name in ("conv_in", "conv_out"):
            continue
        if cfg.keep_time and name.startswith(("time_embedding", "class_embedding")):
            continue
        if in_kept(name, cfg.keep):
            continue
        names.append(name)
    return names


def _group_hook(T: int, groups: int):
    def pre(net, args, kwargs):
        t = args[1] if len(args) > 1 else kwargs.get("timestep")
        x = args[0] if args else kwargs["sample"]
        t = torch.as_tensor(t, dtype=torch.float32).reshape(-1).expand(x.shape[0]) if torch.as_tensor(t).numel() == 1 \
            else torch.as_tensor(t, dtype=torch.float32).reshape(-1)
        g = torch.clamp((t.clamp(min=0) * groups / T).long(), 0, groups - 1)
        for m in net.modules():
            if isinstance(m, QuantLayer):
                m.group = g
    return pre


def wrap_network(net: nn.Module, cfg: QuantConfig, names: list[str], T: int) -> nn.Module:
    """Replace the named layers by :class:`QuantLayer` and install the timestep-group pre-hook."""
    for name in names:
        m = net.get_submodule(name)
        if not isinstance(m, (nn.Conv2d, nn.Linear)):
            raise UserError(f"quant record: {name} is {type(m).__name__}, not Conv2d/Linear")
        set_module(net, name, QuantLayer(m, cfg.w_bits, cfg.a_bits, cfg.per_channel, cfg.t_groups))
    net.register_forward_pre_hook(_group_hook(T, cfg.t_groups), with_kwargs=True)
    return net


def replay_quant(net: nn.Module, rec: dict) -> nn.Module:
    return wrap_network(net, QuantConfig(**rec["config"]), list(rec["modules"]), int(rec["T"]))
