"""Feature caching for ``diffusers.UNet2DModel`` in the manner of DeepCache (Ma, Fang & Wang,
CVPR 2024; lecture slides ``accelerating-diffusion-lecture.md``, "feature reuse").

Adjacent denoising steps produce almost the same *deep* (low-resolution) features of the U-Net;
only the shallow branch — ``conv_in``, the first down block, the last up block and the output
head — has to be recomputed each step. DeepCache §3.2: at a full step the whole network runs and
the input of the last up block (the output of the up path above it, ``F_up``) is cached; at a
cached step only the shallow branch runs and the last up block is fed the cached ``F_up``
together with the fresh skip features of the first down block.

Which solver step a call belongs to: :class:`CachedUNet` is a *call-counter* wrapper that every
solver uses unchanged. Each network call increments a counter; the full network runs when the
schedule says so (below), otherwise the shallow branch. The counter resets itself when a new
sampling run begins, detected by the timestep going *up* (every solver walks t downwards,
including multi-evaluation ones such as Heun, whose second evaluation sits at the next, lower
t), or when the batch shape changes, or when no cache exists yet. :meth:`CachedUNet.reset`
resets explicitly. With Heun / 2nd-order solvers, the counter counts evaluations, not steps, so
interval k means "one full evaluation every k evaluations" — the cost is the same either way.

Schedules (DeepCache §3.3):
- ``uniform``: full network at calls 0, k, 2k, …
- ``nonuniform``: the refresh gap depends on the noise level: k_eff(t) = ceil(k/2) for
  t/T in [0.25, 0.75] (the middle of the trajectory, where DeepCache measures the least feature
  similarity between adjacent steps) and ``k + ceil(k/2) - 1`` elsewhere, so the average stays
  near k. DeepCache's own non-uniform 1:N spaces full steps quadratically around a centre step
  and needs the total step count in advance; a call-counter wrapper does not know it, so this is a
  timestep-driven approximation, stated here.

Cost is accounted honestly: the wrapper logs every call as full or shallow (``calls``) and
:func:`cache_macs` counts the MACs of both paths with torch's FlopCounterMode.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UserError
from ..precision import Autocast
from ..spec import values

SCHEDULES = ("uniform", "nonuniform")


@dataclass(frozen=True)
class CacheConfig:
    interval: int  # k: one full network evaluation every k calls (1 = no caching)
    schedule: str = "uniform"  # "uniform" or "nonuniform" (module docstring)
    num_train_timesteps: int = 1000  # T, to place t on [0, 1] for the non-uniform rule


def _check(cfg: CacheConfig) -> None:
    if cfg.interval < 1:
        raise UserError(f"cache interval must be ≥ 1, got {cfg.interval}")
    if cfg.schedule not in SCHEDULES:
        raise UserError(f"cache schedule must be one of {', '.join(SCHEDULES)}, got {cfg.schedule!r}")


def gap(cfg: CacheConfig, t: float) -> int:
    """Calls between two full evaluations at timestep ``t`` under ``cfg``'s schedule."""
    k = cfg.interval
    if cfg.schedule == "uniform" or k == 1:
        return k
    u = t / cfg.num_train_timesteps
    return math.ceil(k / 2) if 0.25 <= u <= 0.75 else k + math.ceil(k / 2) - 1


class CachedUNet(nn.Module):
    """A ``UNet2DModel`` that runs only its shallow branch between full evaluations (DeepCache).

    ``calls`` logs each call as ``"full"`` or ``"shallow"`` (cleared by :meth:`reset`)."""

    def __init__(self, net: nn.Module, cfg: CacheConfig):
        super().__init__()
        _check(cfg)
        if not hasattr(net, "up_blocks") or len(net.up_blocks) < 2 or len(net.down_blocks) < 2:
            raise UserError("feature caching needs a diffusers UNet2DModel with at least two down/up blocks")
        if any(hasattr(b, "skip_conv") for b in list(net.down_blocks) + list(net.up_blocks)):
            raise UserError("feature caching does not support skip-type (score-sde) U-Net blocks")
        self.net = net
        self.cfg = cfg
        self.reset()

    def reset(self) -> None:
        self._cache: torch.Tensor | None = None
        self._since = 0  # calls since the last full evaluation
        self._last_t: float | None = None
        self.calls: list[str] = []

    def _embed(self, x, t):
        net = self.net
        if net.config.center_input_sample:
            x = 2 * x - 1.0
        t = t if torch.is_tensor(t) else torch.tensor([t], device=x.device)
        if t.ndim == 0:
            t = t[None]
        t = (t * torch.ones(x.shape[0], dtype=t.dtype, device=x.device)).to(x.device)
        emb = net.time_embedding(net.time_proj(t).to(dtype=net.dtype))
        if net.class_embedding is not None:
            raise UserError("feature caching does not support class-conditional UNet2DModels")
        return x, t, emb

    def _head(self, h, t):
        net = self.net
        h = net.conv_out(net.conv_act(net.conv_norm_out(h)))
        if net.config.time_embedding_type == "fourier":
            h = h / t.reshape((h.shape[0],) + (1,) * (h.ndim - 1))
        return h

    def full(self, x, t):
        """The whole U-Net; returns (output, F_up = the input of the last up block)."""
        net = self.net
        x, t, emb = self._embed(x, t)
        h = net.conv_in(x)
        res = (h,)
        for blk in net.down_blocks:
            h, r = blk(hidden_states=h, temb=emb)
            res += r
        if net.mid_block is not None:
            h = net.mid_block(h, emb)
        f_up = None
        for i, blk in enumerate(net.up_blocks):
            if i == len(net.up_blocks) - 1:
                f_up = h
            n = len(blk.resnets)
            r, res = res[-n:], res[:-n]
            h = blk(h, r, emb)
        return self._head(h, t), f_up

    def shallow(self, x, t, f_up):
        """conv_in, the first down block, the last up block fed the cached ``f_up``, the head."""
        net = self.net
        x, t, emb = self._embed(x, t)
        h = net.conv_in(x)
        res = (h,)
        h, r = net.down_blocks[0](hidden_states=h, temb=emb)
        res += r
        last = net.up_blocks[-1]
        n = len(last.resnets)
        # the last up block consumes conv_in's output and the first down block's resnet outputs,
        # i.e. the first n skips (the first down block's downsampled output feeds the deeper up block;
        # it is still computed here and counted in the MACs)
        h = last(f_up, res[:n], emb)
        return self._head(h, t)

    def macs_spent(self, shape: tuple[int, int, int]) -> dict:
        """MACs per image spent by the calls since ``calls`` was last cleared (the harness's hook)."""
        return macs_spent(self, shape)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tv = float(t.flatten()[0]) if torch.is_tensor(t) else float(t)
        new_run = (self._cache is None or self._cache.shape[0] != x.shape[0]
                   or (self._last_t is not None and tv > self._last_t))
        if new_run:
            self._cache, self._since = None, 0
        self._last_t = tv
        if self._cache is None or self._since >= gap(self.cfg, tv):
            out, self._cache = self.full(x, t)
            self._since = 1
            self.calls.append("full")
            return out
        self._since += 1
        self.calls.append("shallow")
        return self.shallow(x, t, self._cache)


@torch.no_grad()
def cache_macs(cached: CachedUNet, shape: tuple[int, int, int], t: float = 500.0) -> dict[str, int]:
    """MACs per image of a full and of a shallow evaluation (FlopCounterMode, MAC = FLOP / 2)."""
    from ..cost import count_macs

    x = torch.zeros(1, *shape)
    tt = torch.full((1,), t)
    full = count_macs(lambda: cached.full(x, tt))
    f_up = cached.full(x, tt)[1]
    shallow = count_macs(lambda: cached.shallow(x, tt, f_up))
    return {"macs_full": full, "macs_shallow": shallow}


def macs_spent(cached: CachedUNet, shape: tuple[int, int, int]) -> dict:
    """MACs per image actually spent by the calls logged since the last reset."""
    m = cache_macs(cached, shape)
    nf, ns = cached.calls.count("full"), cached.calls.count("shallow")
    return {**m, "full_calls": nf, "shallow_calls": ns,
            "macs_per_image_total": nf * m["macs_full"] + ns * m["macs_shallow"],
            "macs_per_call_mean": (nf * m["macs_full"] + ns * m["macs_shallow"]) / max(1, nf + ns)}


@dataclass(frozen=True)
class CacheSpec:
    """The ``cache`` step's and the ``cache`` runtime's arguments: ``cache(interval=3,schedule=nonuniform,bf16=true)``."""

    interval: int = 3  # k: one full network evaluation every k calls (1 = no caching)
    schedule: str = "uniform"  # uniform | nonuniform (module docstring)
    bf16: bool = False  # run the cached network under bf16 autocast (opt-in speed)

    def __post_init__(self):
        _check(CacheConfig(self.interval, self.schedule))

    def describe(self) -> str:
        return f", full network every {self.interval} calls ({self.schedule})" + (", bf16 autocast" if self.bf16 else ", fp32")


def cached_network(ckpt, spec: CacheSpec) -> nn.Module:
    """Runtime network: ``ckpt``'s UNet wrapped in :class:`CachedUNet` (optionally under bf16 autocast)."""
    T = int(ckpt.schedule.num_timesteps)
    net = CachedUNet(ckpt.net.float().eval(), CacheConfig(spec.interval, spec.schedule, T))
    return Autocast(net, dtype=torch.bfloat16) if spec.bf16 else net


def cache_step(ckpt, cfg: CacheSpec, ctx):
    """Feature caching (DeepCache): sets the checkpoint's runtime to cache(interval=k,...); weights unchanged."""
    CachedUNet(ckpt.net, CacheConfig(cfg.interval, cfg.schedule))  # fails loudly on an unsupported network
    meta = dict(ckpt.meta)
    meta["runtime"] = {"name": "cache", "args": values(cfg)}
    return dataclasses.replace(ckpt, meta=meta)
