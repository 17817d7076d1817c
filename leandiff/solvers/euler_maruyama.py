"""Euler–Maruyama on the reverse-time VP SDE (Song et al. 2021, eq. 6 with the VP SDE of eq. 11).

Time is ρ = −log ᾱ (the integrated β, so dρ = β(t) dt). The forward VP SDE reads dx = −½·x dρ + dW_ρ
and its reverse, with the score ∇log p_t(x) = −ε̂/σ_t,  dx = [−½·x + ε̂/σ_t] dρ + dW̄_ρ. One step
from t to s (Δ = ρ_t − ρ_s = log(ᾱ_s/ᾱ_t) > 0):

    x_s = x_t + Δ·(½·x_t − ε̂/σ_t) + sqrt(Δ)·z.

The last step to t = −1 is the usual noise-free denoising step x = x̂₀ (Tweedie), as Song et al. do.
"""
from __future__ import annotations

import math

import torch

from ..denoiser import Denoiser
from ._common import ab, predict, randn_like, step_pairs


@torch.no_grad()
def sample_euler_maruyama(denoiser: Denoiser, x: torch.Tensor, timesteps, *, generator=None, callback=None,
                          clip_x0: bool = False) -> torch.Tensor:
    """Euler–Maruyama; weak order 1, needs many steps (it is the baseline the other SDE solver beats)."""
    for i, (t, s) in enumerate(step_pairs(timesteps)):
        abar_t, one_minus_t = ab(denoiser, t)
        abar_s, _ = ab(denoiser, s)
        eps, x0 = predict(denoiser, x, t, clip_x0)
        if s < 0:
            # Final denoising step.
            x = x0
        else:
            delta = math.log(abar_s) - math.log(abar_t)
            # Drift of the reverse SDE, then Brownian increment.
            x = x + delta * (0.5 * x - eps / one_minus_t ** 0.5) + delta ** 0.5 * randn_like(x, generator)
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "x0": x0})
    return x
