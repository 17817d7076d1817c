"""Shared pieces of the solvers: the step pairs, coefficient helpers and option checks."""
from __future__ import annotations

import math

import torch

from ..denoiser import Denoiser
from ..errors import UserError
from ..schedule import alpha_sigma


def step_pairs(timesteps) -> list[tuple[float, float]]:
    """[(t_i, t_{i+1})] for a descending sequence, the last pair ending at t = -1 (clean data)."""
    ts = [float(t) for t in torch.as_tensor(timesteps).flatten().tolist()]
    if not ts:
        raise UserError("a solver needs at least one timestep")
    if any(a <= b for a, b in zip(ts, ts[1:])):
        raise UserError(f"timesteps must be strictly decreasing, got {ts[:8]}...")
    if ts[-1] < 0:
        raise UserError(f"timesteps must be >= 0 (the solver itself steps to t = -1), got {ts[-1]}")
    return list(zip(ts, ts[1:] + [-1.0]))


def ab(denoiser: Denoiser, t: float) -> tuple[float, float]:
    """(ᾱ_t, 1 - ᾱ_t) as Python floats (float64 precision), ᾱ = 1 at t = -1."""
    a, s = alpha_sigma(denoiser.schedule, t)
    return a.item() ** 2, s.item() ** 2


def alpha_sigma_f(denoiser: Denoiser, t: float) -> tuple[float, float]:
    """(α_t, σ_t) = (sqrt(ᾱ_t), sqrt(1 − ᾱ_t)) as Python floats; (1, 0) at t = -1."""
    a, s = alpha_sigma(denoiser.schedule, t)
    return a.item(), s.item()


def half_lambda(alpha: float, sigma: float) -> float:
    """λ = log(α/σ), the half log-SNR that DPM-Solver integrates in (Lu et al. 2022a, §3.1); +inf at σ = 0."""
    return math.inf if sigma == 0 else math.log(alpha) - math.log(sigma)


def maybe_clip(x0: torch.Tensor, clip_x0: bool) -> torch.Tensor:
    return x0.clamp(-1, 1) if clip_x0 else x0


def predict(denoiser: Denoiser, x: torch.Tensor, t: float, clip_x0: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(ε̂, x̂₀) from one evaluation; with ``clip_x0`` x̂₀ is clamped to [-1, 1] and ε̂ is recomputed
    from it, so that the pair stays consistent (x = α x̂₀ + σ ε̂) for the ODE/SDE solvers."""
    eps, x0 = denoiser.predict(x, t)
    if clip_x0:
        a, s = alpha_sigma_f(denoiser, t)
        x0 = x0.clamp(-1, 1)
        eps = (x - a * x0) / s
    return eps, x0


def randn_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise shaped like x, drawn on the generator's device and placed on x's (the noise
    rule, :mod:`leandiff.device`: sampling hands an accelerator its own generator, so no copy happens)."""
    if generator is None or generator.device == x.device:
        return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=generator.device).to(x.device)


def check_range(solver: str, name: str, value: float, lo: float, hi: float, *, hi_open: bool = False) -> float:
    """Fail loudly on an option outside [lo, hi] (or [lo, hi) with ``hi_open``); never clamp it."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and lo <= value and (
        value < hi if hi_open else value <= hi)
    if not ok:
        interval = f"[{lo}, {hi})" if hi_open else f"[{lo}, {hi}]"
        raise UserError(f"{solver} needs {name} in {interval}, got {value!r}")
    return float(value)
