"""Multistep consistency sampling (Song et al. 2023, "Consistency Models", Alg. 1).

x̂₀ = f(x_T, T); then for each further timestep τ: x_τ = α_τ·x̂₀ + σ_τ·z (fresh noise), x̂₀ = f(x_τ, τ).
One timestep is one-step generation. The Denoiser's x̂₀ is the consistency function for a ``cm``
student; for any other model this is the "denoise fully, then re-noise" sampler. The paper re-noises
to x̄ = x̂₀ + sqrt(τ² − σ_min²)·z; with σ_min ≈ 0.01 on the VP grid the σ_min² term (1e-4) is dropped
so that the solver needs nothing but the Denoiser.
"""
from __future__ import annotations

import torch

from ..denoiser import Denoiser
from ._common import alpha_sigma_f, predict, randn_like, step_pairs


@torch.no_grad()
def sample_consistency(denoiser: Denoiser, x: torch.Tensor, timesteps, *, generator=None, callback=None,
                       clip_x0: bool = False) -> torch.Tensor:
    """Consistency sampling: one evaluation per timestep, re-noising between them (Alg. 1)."""
    for i, (t, s) in enumerate(step_pairs(timesteps)):
        _, x0 = predict(denoiser, x, t, clip_x0)
        if s < 0:
            x = x0
        else:
            # Re-noise the estimate to the next timestep.
            a_s, s_s = alpha_sigma_f(denoiser, s)
            x = a_s * x0 + s_s * randn_like(x, generator)
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "x0": x0})
    return x
