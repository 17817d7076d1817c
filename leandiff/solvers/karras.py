"""Probability-flow ODE solvers of Karras et al. 2022 (EDM, Alg. 1 and 2, deterministic: S_churn = 0).

EDM writes the VP process in the scaled variables x̄ = x/α and σ̄ = σ/α, where the probability-flow
ODE is dx̄/dσ̄ = (x̄ − D(x̄; σ̄))/σ̄ = ε̂ (EDM eq. 1 and 3, Table 1). We integrate in σ̄ and map back,
x = α·x̄. The Euler step in these variables is exactly DDIM with η = 0 (DDIM eq. 13–14, EDM §3).
"""
from __future__ import annotations

import torch

from ..denoiser import Denoiser
from ._common import alpha_sigma_f, predict, step_pairs


@torch.no_grad()
def sample_euler(denoiser: Denoiser, x: torch.Tensor, timesteps, *, generator=None, callback=None,
                 clip_x0: bool = False) -> torch.Tensor:
    """Euler on dx̄/dσ̄ = ε̂ (EDM Alg. 1 without churn); first order, 1 evaluation per step."""
    for i, (t, s) in enumerate(step_pairs(timesteps)):
        a_t, s_t = alpha_sigma_f(denoiser, t)
        a_s, s_s = alpha_sigma_f(denoiser, s)
        d, x0 = predict(denoiser, x, t, clip_x0)  # d = dx̄/dσ̄ = ε̂
        # Euler step.
        x = a_s * (x / a_t + (s_s / a_s - s_t / a_t) * d)
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "x0": x0})
    return x


# Heun's correction is skipped on a step that starts above this σ̄ (α < 1e-3: x is noise to three decimals).
# The trapezoid in σ̄ weights the slope at the step's end by half the step's length. The cosine schedule's first
# timestep has ᾱ ≈ 2.4e-9 (σ̄ ≈ 2e4); a trailing grid jumps from there to σ̄ ≈ 6-30 in one step, where the slope
# changes only near the end, so that weighting was wrong by ~10^4 and Heun returned noise (FID-dom 1,509 on
# zoo:mnist-tiny-v2). Such a step is an Euler (= DDIM) step instead, exact while x̂₀ does not change, and x̂₀
# does not change where x is pure noise. The linear-β schedule never reaches it (σ̄ ≤ 157), so its samples are
# unchanged at every NFE.
HEUN_MAX_SIGMA = 1000.0


@torch.no_grad()
def sample_heun(denoiser: Denoiser, x: torch.Tensor, timesteps, *, generator=None, callback=None,
                clip_x0: bool = False) -> torch.Tensor:
    """Heun's method on dx̄/dσ̄ = ε̂ (EDM Alg. 2 without churn); second order, 2 evaluations per step.

    The last step ends at σ̄ = 0, where the network cannot be evaluated, so it is an Euler step
    (EDM Alg. 2, line 9): N steps spend 2N − 1 evaluations, and the Denoiser's counter reports that. A step
    that starts above σ̄ = :data:`HEUN_MAX_SIGMA` is an Euler step too (one evaluation fewer).
    """
    for i, (t, s) in enumerate(step_pairs(timesteps)):
        a_t, s_t = alpha_sigma_f(denoiser, t)
        a_s, s_s = alpha_sigma_f(denoiser, s)
        h = s_s / a_s - s_t / a_t  # step in σ̄ (negative)
        x_bar = x / a_t
        d, x0 = predict(denoiser, x, t, clip_x0)
        # Euler step.
        x_bar_s = x_bar + h * d
        if s_s > 0 and s_t / a_t <= HEUN_MAX_SIGMA:
            # 2nd-order correction: average the slopes at both ends.
            d_s, _ = predict(denoiser, a_s * x_bar_s, s, clip_x0)
            x_bar_s = x_bar + h * (d + d_s) / 2
        x = a_s * x_bar_s
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "x0": x0})
    return x


sample_heun.nfe_per_step = 2
